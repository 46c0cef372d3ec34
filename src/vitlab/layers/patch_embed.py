"""Patch embedding: a stride-P convolution that turns an image into a grid of patch tokens."""

from __future__ import annotations

from torch import Tensor, nn

from vitlab.layers.helpers import to_2tuple


def check_image_size(h: int, w: int, patch: tuple[int, int], expected: tuple[int, int] | None, what: str,
                     *, dynamic: bool | str = True) -> None:
    """Raise a clear error when (h, w) does not fit the patch size or a fixed input size.

    ``dynamic``: the option that makes the model take any size, to suggest (True: ``dynamic_img_size=True``;
    False: there is none)."""
    if expected is not None and (h, w) != tuple(expected):
        option = "dynamic_img_size=True" if dynamic is True else dynamic
        raise ValueError(
            f"{what}: input image is {h}x{w} but this model was built for {expected[0]}x{expected[1]}; "
            f"resize the input{', ' if option else ' or '}create the model with img_size=({h}, {w})"
            + (f", or pass {option}" if option else "")
        )
    if h % patch[0] or w % patch[1]:
        raise ValueError(
            f"{what}: input image {h}x{w} is not divisible by the patch size {patch[0]}x{patch[1]}"
        )


def check_model_size(h: int, w: int, patch: tuple[int, int], what: str) -> None:
    """Raise a clear error when a model's own img_size is not a whole number of patches (timm builds such a model
    and drops the remainder; so does :class:`PatchEmbed` with ``drop_remainder``, ViT's)."""
    if h % patch[0] or w % patch[1]:
        fit = "x".join(str(max(p, s // p * p)) for s, p in zip((h, w), patch))
        raise ValueError(f"{what}: img_size {h}x{w} is not a multiple of the patch size {patch[0]}x{patch[1]}; "
                         f"build the model at a multiple of it (e.g. img_size {fit}) and resize inputs to it")


def check_images(x: Tensor, *, in_chans: int, patch: tuple[int, int], expected: tuple[int, int] | None,
                 what: str, dynamic: bool | str = True) -> None:
    """Raise a clear error unless ``x`` is a (batch, in_chans, H, W) batch that fits the patch (and size)."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{what}: expected images of shape (batch, {in_chans}, H, W), got {tuple(x.shape)}")
    check_image_size(x.shape[2], x.shape[3], patch, expected, what, dynamic=dynamic)


class PatchEmbed(nn.Module):
    """Split an image into P x P patches and project each to ``embed_dim``.

    Args:
        img_size: the size the model is built for (sets the position table's grid).
        strict_img_size: reject inputs of another size (turned off by ``dynamic_img_size``).
        drop_remainder: allow an ``img_size`` that is not a multiple of the patch, as timm (and big_vision's VALID
            convolution): the grid is floor(img_size / patch) and the convolution ignores the last rows / columns
            of an input of exactly ``img_size`` (SigLIP so400m/14 at 384 px: 27 x 27 patches, 6 pixels unused).
            Any other input size must still be a whole number of patches.
        ``dynamic_option`` (an attribute): the option a size error suggests, False where the model has none.
        flatten: return tokens (B, N, D); otherwise the map (B, D, H/P, W/P).
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        flatten: bool = True,
        drop_remainder: bool = False,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.drop_remainder = drop_remainder
        if not drop_remainder:
            check_model_size(*self.img_size, self.patch_size, "PatchEmbed")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.dynamic_option: bool | str = True
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = to_2tuple(img_size)
        if not self.drop_remainder:
            check_model_size(*self.img_size, self.patch_size, "PatchEmbed")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    @property
    def has_remainder(self) -> bool:
        """Whether ``img_size`` leaves pixels that no patch covers (``drop_remainder``)."""
        return bool(self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1])

    def dynamic_grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size[0], w // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        # the model's own size is taken whole even where it leaves a remainder (drop_remainder, as timm)
        own = self.drop_remainder and tuple(x.shape[-2:]) == self.img_size
        check_images(x, in_chans=self.in_chans, patch=(1, 1) if own else self.patch_size,
                     expected=self.img_size if self.strict_img_size else None, what="PatchEmbed",
                     dynamic=self.dynamic_option)
        x = self.proj(x)  # (B, D, H/P, W/P)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, D, N) -> (B, N, D)
        return x
