"""Visual tokenizers for masked image modelling: one protocol, one file format.

A tokenizer turns images into one discrete token per patch of the backbone that learns to predict
them (BEiT, BEiT v2). vitlab has three, all frozen during masked image modelling:

* :class:`~vitlab.ssl.beit.KMeansTokenizer` (``kind="kmeans"``): a k-means codebook over per-patch
  normalised pixels, fitted before training (not in the official code; a CPU-scale stand-in);
* :class:`~vitlab.ssl.dvae.DVAETokenizer` (``kind="dvae"``): the encoder of a discrete VAE trained by
  ``vitlab pretrain --method dvae`` (BEiT v1's tokenizer kind; BEiT used DALL-E's);
* :class:`~vitlab.ssl.vqkd.VQKDTokenizer` (``kind="vqkd"``): BEiT v2's vector-quantised knowledge
  distillation tokenizer, trained by ``vitlab pretrain --method vqkd --teacher CKPT``.

The protocol (:class:`Tokenizer`): ``tokenize(pixels)`` takes images (B, C, H, W) as **[0, 1] pixels**
(the masked-image objective un-normalises its backbone's input first, so a tokenizer never depends on
the backbone's mean/std) and returns token ids (B, rows, cols) on the patch grid; ``token_grid((H, W))``
says which grid that is for an input size; ``vocab_size``; ``kind`` and ``config()`` (JSON) rebuild it.
A tokenizer that reads a fixed number of channels says so in ``channels`` (k-means, dVAE: those of the
images it was fitted or trained on); one that adapts any input (VQ-KD: its encoder converts grey and colour)
has none. :func:`check_channels` and :func:`check_grid` refuse a tokenizer that does not fit a backbone.

The file (:func:`save_tokenizer`, :func:`load_tokenizer`): one safetensors file whose header holds
``{"vitlab_tokenizer": {"kind", "version", "config"}}`` as JSON and whose tensors are the tokenizer's
state dict. Reading it executes no code: the kind names a class in :data:`TOKENIZER_KINDS`, built from
its config, then loaded strictly. ``vitlab pretrain --method dvae|vqkd`` writes ``tokenizer.safetensors``
into its run directory; ``--tokenizer`` takes that file or the run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.checkpoints.io import CheckpointError, CheckpointNotFoundError, atomic_write, parse_json, read_safetensors

TOKENIZER_FILE = "tokenizer.safetensors"
HEADER_KEY = "vitlab_tokenizer"
FORMAT_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    """What a masked-image objective needs from a visual tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def tokenize(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels (B, C, H, W) -> token ids (B, rows, cols), long."""
        ...

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the tokens of an image of ``size`` (H, W)."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (``from_config`` rebuilds the module)."""
        ...


def _kinds() -> dict[str, type]:
    from vitlab.ssl.beit import KMeansTokenizer
    from vitlab.ssl.dvae import DVAETokenizer
    from vitlab.ssl.vqkd import VQKDTokenizer

    return {"kmeans": KMeansTokenizer, "dvae": DVAETokenizer, "vqkd": VQKDTokenizer}


TOKENIZER_KINDS = ("kmeans", "dvae", "vqkd")


def save_tokenizer(tokenizer: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``tokenizer`` (a :class:`Tokenizer` module) as a self-describing safetensors file."""
    from safetensors.torch import save_file

    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"save_tokenizer: {type(tokenizer).__name__} does not implement the Tokenizer protocol")
    header = {"kind": tokenizer.kind, "version": FORMAT_VERSION, "config": tokenizer.config(), **(extra or {})}
    sd = {k: v.detach().contiguous().cpu() for k, v in tokenizer.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={HEADER_KEY: json.dumps(header)}))


def tokenizer_path(source: str | os.PathLike) -> Path:
    """The tokenizer file of ``source``: the file itself, or ``DIR/tokenizer.safetensors`` of a run directory."""
    p = Path(source).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE
        if not p.is_file():
            raise CheckpointNotFoundError(
                f"--tokenizer {source}: the directory has no {TOKENIZER_FILE} (it is written at the end of "
                f"`vitlab pretrain --method dvae` or `--method vqkd`)")
    elif not p.is_file():
        raise CheckpointNotFoundError(f"--tokenizer {source}: no such file or directory ({p.absolute()})")
    return p


def load_tokenizer(source: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Read a tokenizer file (or a run directory holding one): frozen, in eval mode, on ``device``."""
    path = tokenizer_path(source)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"--tokenizer {path}: expected a {TOKENIZER_FILE} written by vitlab pretrain "
                              f"(--method dvae or vqkd), got a {path.suffix or 'suffix-less'} file")
    sd, header = read_safetensors(path)
    if HEADER_KEY not in header:
        raise CheckpointError(f"--tokenizer {path}: not a vitlab tokenizer (no {HEADER_KEY!r} metadata; a "
                              f"backbone's model.safetensors is not a tokenizer)")
    try:
        meta = parse_json(header[HEADER_KEY])
    except ValueError as e:  # malformed, nested too deeply, an integer of too many digits
        raise CheckpointError(f"--tokenizer {path}: tokenizer metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"--tokenizer {path}: tokenizer metadata is a JSON {type(meta).__name__}, not an object")
    kinds = _kinds()
    kind = meta.get("kind")
    if kind not in kinds:
        raise CheckpointError(f"--tokenizer {path}: unknown tokenizer kind {kind!r} (known: {', '.join(kinds)})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"--tokenizer {path}: format version {meta['version']} is newer than this vitlab "
                              f"reads ({FORMAT_VERSION})")
    try:
        tok = kinds[kind].from_config(meta.get("config", {}))
        tok.load_state_dict(sd, strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"--tokenizer {path}: cannot rebuild the {kind} tokenizer ({e})") from e
    return tok.to(device).eval().requires_grad_(False)


def to_pixels(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Undo a model's input normalisation: (B, C, H, W) -> [0, 1] pixels (clamped)."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def normalise(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """[0, 1] pixels -> a model's input (per-channel mean/std)."""
    m = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - m) / s


def resize_to(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize to ``size`` (H, W) when it differs (a no-op otherwise), clamped to [0, 1]."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=tuple(size), mode="bicubic", align_corners=False).clamp(0, 1)


def check_channels(tokenizer: Tokenizer, channels: int, who: str, source: str | os.PathLike | None = None) -> None:
    """Refuse a tokenizer made for images of another number of channels than the backbone's (and the data's).

    Tokenizers without a ``channels`` attribute adapt their input themselves and always pass."""
    made_for = getattr(tokenizer, "channels", None)
    if made_for is None or int(made_for) == int(channels):
        return
    where = f" ({source})" if source is not None else ""

    def kind(c: int) -> str:
        return {1: "1-channel (grayscale)", 3: "3-channel (colour)"}.get(int(c), f"{c}-channel")

    raise ValueError(f"{who}: the {tokenizer.kind} tokenizer{where} was made for {kind(made_for)} images, but the "
                     f"backbone (and the data) has {kind(channels)} ones; train a tokenizer on this data "
                     f"(`vitlab pretrain --method dvae` with the same --data), or leave --tokenizer out for a k-means "
                     f"tokenizer fitted on it")


def check_grid(tokenizer: Tokenizer, size: tuple[int, int], grid: tuple[int, int], who: str) -> None:
    """Refuse a tokenizer whose tokens do not lie on the backbone's patch grid."""
    got = tuple(tokenizer.token_grid(tuple(size)))
    if got != tuple(grid):
        raise ValueError(f"{who}: the {tokenizer.kind} tokenizer gives a {got[0]}x{got[1]} token grid for "
                         f"{size[0]}x{size[1]} images, but the backbone has a {grid[0]}x{grid[1]} patch grid; "
                         f"train the tokenizer for this backbone's patch size and resolution")


__all__ = ["TOKENIZER_FILE", "TOKENIZER_KINDS", "Tokenizer", "check_channels", "check_grid", "load_tokenizer",
           "normalise", "resize_to", "save_tokenizer", "to_pixels", "tokenizer_path"]
