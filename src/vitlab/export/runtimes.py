"""Inference runtimes behind one interface: :func:`build_runtime` and :func:`load_for_inference`.

======================  ==================================================================================
``torch``               the PyTorch model in float32
``torch-bf16``          CPU autocast to bfloat16 (fast on CPUs with AVX-512 BF16 / AMX), logits back in float32:
                        matmuls and convolutions in bfloat16; norms, softmax and the residual stream in float32
``torch-bf16-full``     a bfloat16 copy of the model (weights, activations and residual stream; timm's
                        ``--model-dtype bfloat16``), logits back in float32: no per-call casts, half the memory
                        traffic, faster than autocast on AMX CPUs; agreement with float32 is a little lower
``torch-compile``       ``torch.compile`` with inductor's freezing (weights folded in as constants and prepacked
                        for oneDNN: inference only); the first call's time is reported as compile time, and a
                        failure to compile falls back to eager with a logged warning
``torch-bf16-compile``  ``torch-bf16-full``'s bfloat16 copy, compiled as ``torch-compile`` (the linear layers run
                        as oneDNN kernels with fused bias and activations, AMX on CPUs that have it)
``torch-int8``          ``torch.ao`` dynamic int8 quantisation of the ``nn.Linear`` layers (convs stay float)
``onnx``                ONNX Runtime on an exported file (exported and validated on the fly from a checkpoint)
``onnx-int8``           ONNX Runtime on an int8 export (linear layers quantised, see :func:`quantize_int8`)
======================  ==================================================================================

Every runtime is an ``nn.Module`` mapping images (B, C, H, W) to float32 logits (B, K), with the
``preprocessing``, ``class_names`` and ``num_classes`` of the model it runs, so predict/eval/benchmark
treat them alike.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from vitlab.export.runtime import OnnxModel, is_onnx_file

log = logging.getLogger(__name__)

RUNTIMES: tuple[str, ...] = ("torch", "torch-bf16", "torch-bf16-full", "torch-compile", "torch-bf16-compile",
                              "torch-int8", "onnx", "onnx-int8")


def parse_runtimes(spec: str) -> list[str]:
    """``"torch,onnx-int8"`` -> ["torch", "onnx-int8"], each checked against :data:`RUNTIMES`."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in RUNTIMES]
    if bad or not names:
        raise ValueError(f"--runtime: unknown runtime(s) {bad or spec!r}; choose from {', '.join(RUNTIMES)}")
    return names


class Runtime(nn.Module):
    """A model run one way; ``setup_s`` is the time spent preparing it (export, quantisation; for
    ``torch-compile`` the compile, measured on the first call).

    Inference only: a runtime is in eval mode from construction on, and ``train()`` keeps it there
    (``train(True)`` is logged once and ignored), so dropout and drop-path never run in it and a compiled
    graph never recompiles for a changed mode. The inner model is the one given: switching that model's mode
    directly (``torch`` shares the caller's model) is not prevented."""

    def __init__(self, name: str, inner: nn.Module, *, reference: nn.Module | None = None,
                 setup_s: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.inner = inner
        described = reference if reference is not None else inner
        self.preprocessing = described.preprocessing
        self.num_classes = described.num_classes
        self.class_names = list(getattr(described, "class_names", None) or
                                [str(i) for i in range(self.num_classes)])
        self.model_name = getattr(described, "model_name", type(described).__name__)
        self.task = getattr(described, "task", "classification")
        self.score_function = getattr(described, "score_function", "softmax")
        self.setup_s = setup_s
        self._refused_train = False
        self.eval()

    def train(self, mode: bool = True) -> Runtime:
        """Stays in eval mode (see the class): ``train(True)`` is ignored, with a warning the first time."""
        if mode and not self._refused_train:
            self._refused_train = True
            log.warning("runtime %s is inference only: train(True) ignored, it stays in eval mode", self.name)
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        from vitlab.train.evaluate import logits_of

        with torch.no_grad():
            return logits_of(self.inner(x)).float()


class Bf16Autocast(nn.Module):
    """Runs ``model`` under CPU (or CUDA) bfloat16 autocast."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        from vitlab.train.evaluate import logits_of

        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return logits_of(self.model(x)).float()


class Bf16Model(nn.Module):
    """A bfloat16 copy of ``model``: images are cast to bfloat16 on the way in, logits to float32 on the way
    out. Integer buffers (relative-position indices) keep their dtype; the float32 model is left as it was."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.bfloat16).eval()

    def forward(self, x: Tensor) -> Tensor:
        from vitlab.train.evaluate import logits_of

        return logits_of(self.model(x.to(torch.bfloat16))).float()


class Compiled(nn.Module):
    """``torch.compile(model)``, compiled on the first call; falls back to eager (logged) when compiling or
    running the compiled graph fails. ``compile_s`` holds the first call's time (the compile; in training only the
    forward's: the backward graph compiles in the first backward, which ``fit`` times with it).

    ``freeze=True`` (inference only) compiles with inductor's freezing: parameters become constants of the
    graph, so linear and convolution weights are prepacked once and their bias and activation fused into
    oneDNN's kernels. Later changes to the parameters are not seen by the compiled graph.

    In inference (``freeze=True``, or the model in eval mode), the first batch of a size not run before and
    smaller than the largest run so far (the last, partial batch of a folder or data set) is padded with zero
    images to that size and their outputs dropped: a new batch size would compile again (10-30 s for a ViT-S on
    a CPU), the padded rows cost a fraction of one batch. A size that comes again is compiled and runs as it is
    (a server warmed at batch 16 and then answering single images would otherwise compute 16 images for each).
    Sizes already run (batch 1 after batch 16) run as they are."""

    def __init__(self, model: nn.Module, *, freeze: bool = False, **compile_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        # not a child module: its parameters are ``model``'s, and state_dict() must not list them twice
        object.__setattr__(self, "compiled", torch.compile(model, **compile_kwargs))
        self.freeze = freeze
        self.compile_s: float | None = None
        self.failed: str | None = None
        self.batch_sizes: set[int] = set()  # batch sizes the compiled graph has run in inference
        self.padded_sizes: set[int] = set()  # sizes padded once: the next batch of such a size compiles

    def _call_compiled(self, x: Tensor) -> Tensor:
        if not self.freeze:
            return self.compiled(x)
        # freezing is read from inductor's config when a graph compiles (first call, or a new input shape);
        # ``torch.compile(options=...)`` does not reach the pass that prepacks the weights, the config does
        from torch._inductor import config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x)

    def forward(self, x: Any) -> Any:
        if self.failed is not None:
            return self.model(x)
        # a training step's input is the whole batch (a tuple of images and targets, a dict): run as it comes,
        # never padded; only an image tensor is padded
        n = padded = x.shape[0] if isinstance(x, Tensor) else 0
        if isinstance(x, Tensor):
            padded = self._padded_size(n)
        given = x
        if padded > n:
            x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
        t0 = time.perf_counter()
        try:
            out = self._call_compiled(x)
        except Exception as e:  # inductor needs a C++ compiler; any failure means: run eager
            self.fall_back(e)
            return self.model(given)
        # a size compiled for training is another graph: it does not count here; nor does a batch not a tensor
        if self._inference() and isinstance(given, Tensor):
            self.batch_sizes.add(padded)
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - t0
            log.info("torch.compile: first %s (compile) took %.1f s",
                     "call" if self._inference() else "training forward", self.compile_s)
        return _first_rows(out, n) if padded > n else out

    def fall_back(self, error: BaseException, *, where: str = "") -> None:
        """Run eager from now on, and say why (``where``: the failed part, when not the forward's compile)."""
        self.failed = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        log.warning("torch.compile failed%s (%s); running eager instead", where, self.failed)

    def _inference(self) -> bool:
        return self.freeze or not self.model.training

    def _padded_size(self, n: int) -> int:
        if (not self._inference() or n in self.batch_sizes or not self.batch_sizes or n > max(self.batch_sizes)
                or n in self.padded_sizes):
            return n
        self.padded_sizes.add(n)
        return max(self.batch_sizes)


def _first_rows(out: Any, n: int) -> Any:
    """The first ``n`` rows of every tensor in a model's output (a tensor, tuple, list or dict of them)."""
    if isinstance(out, Tensor):
        return out[:n]
    if isinstance(out, dict):
        return {k: _first_rows(v, n) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_first_rows(v, n) for v in out)
    return out


def compile_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``torch.compile`` with the fallback of :class:`Compiled` (for training: the module's parameters are
    the original's, so optimisers and checkpoints see the same tensors)."""
    try:
        return Compiled(model, **kwargs)
    except Exception as e:
        log.warning("torch.compile is not available (%s); running eager", e)
        return model


def quantize_torch_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its ``nn.Linear`` layers dynamically quantised to int8 (``torch.ao``).

    Convolutions (the patch embedding, a hybrid's ResNet stem) stay float: dynamic quantisation of Conv2d
    is known to destroy accuracy (pytorch#70480)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation in favour of torchao
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def onnx_from_model(model: nn.Module, *, int8: bool, dynamic_batch: bool = True, **export_kwargs: Any) -> OnnxModel:
    """Export ``model`` into a temporary file (validated as always) and load it, for running a checkpoint
    through ONNX Runtime without keeping a file (``--runtime onnx``); the file is removed once ONNX Runtime
    has read it. ``export_kwargs`` go to :func:`~vitlab.export.export_onnx`."""
    from vitlab.export.onnx import export_onnx

    if int8:
        # the caller measures int8 agreement itself (eval over its data set, benchmark and predict on their
        # images): the export's own refusal below 98% on its few validation images (one miss in 16 is 94%)
        # would stop the measurement it is there for. The float export's checks still apply.
        export_kwargs.setdefault("min_agreement", 0.0)
    with tempfile.TemporaryDirectory(prefix="vitlab-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, path, dynamic_batch=dynamic_batch, int8=int8, timing=False, **export_kwargs)
        return OnnxModel(path)


def build_runtime(name: str, model: nn.Module | None = None, *, onnx_path: str | os.PathLike | None = None,
                  **export_kwargs: Any) -> Runtime:
    """The runtime ``name`` for a PyTorch ``model`` or an exported ``onnx_path``.

    ``export_kwargs`` go to :func:`~vitlab.export.export_onnx` when an ONNX runtime is made from a model.
    """
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    if onnx_path is not None:
        if name not in ("onnx", "onnx-int8"):
            raise ValueError(f"{onnx_path} is an ONNX file: it runs with --runtime onnx, not {name}")
        m = OnnxModel(onnx_path)
        int8 = bool(m.meta.get("int8"))
        if name == "onnx-int8" and not int8:  # running it float under an int8 name would report the wrong thing
            raise ValueError(f"{onnx_path} is a float32 ONNX file: --runtime onnx-int8 needs a file written by "
                             f"`vitlab export --int8`, or a checkpoint (quantised on the fly)")
        return Runtime("onnx-int8" if int8 else "onnx", m)
    if model is None:
        raise ValueError("build_runtime: give a model or an ONNX file")
    model = model.eval()
    t0 = time.perf_counter()
    if name == "torch":
        inner: nn.Module = model
    elif name == "torch-bf16":
        inner = Bf16Autocast(model)
    elif name == "torch-bf16-full":
        inner = Bf16Model(model)
    elif name == "torch-compile":
        inner = compile_model(model, freeze=True)
    elif name == "torch-bf16-compile":
        inner = Bf16Model(model)
        inner.model = compile_model(inner.model, freeze=True)
    elif name == "torch-int8":
        inner = quantize_torch_int8(model)
    else:
        inner = onnx_from_model(model, int8=name == "onnx-int8", **export_kwargs)
    return Runtime(name, inner, reference=model, setup_s=time.perf_counter() - t0)


def cpu_only(name: str) -> bool:
    """Whether the runtime ``name`` runs on the CPU only: ONNX Runtime here, and torch.ao's int8 kernels."""
    return name.startswith("onnx") or name == "torch-int8"


def runtime_device(name: str, device: torch.device) -> torch.device:
    """Where the runtime ``name`` runs when ``device`` is asked: the CPU for :func:`cpu_only` runtimes."""
    return torch.device("cpu") if cpu_only(name) else device


def slow_bf16_reason(name: str, device: torch.device) -> str | None:
    """Why the bfloat16 runtime ``name`` will be slow on ``device`` (None: it will not be). Without
    AVX512-BF16 or AMX-BF16, PyTorch emulates bfloat16 on the CPU, slower than float32."""
    import platform

    from vitlab.train.hardware import cpu_has_bf16

    if "bf16" not in name or device.type != "cpu" or cpu_has_bf16():
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/cpuinfo"):
        return None  # the flags are x86's, read from Linux's /proc/cpuinfo: elsewhere we cannot tell
    return (f"--runtime {name}: this CPU has neither AVX512-BF16 nor AMX-BF16, so PyTorch emulates bfloat16 "
            "(slower than float32); torch or torch-compile will be faster here")


def setup_seconds(rt: Runtime) -> float:
    """Preparation time of a runtime, including a compile that happened on its first call."""
    compile_s = sum(m.compile_s or 0.0 for m in rt.inner.modules() if isinstance(m, Compiled))
    return rt.setup_s + compile_s


def compile_failure(rt: Runtime) -> str | None:
    """Why a compiled runtime runs eager instead (None: it compiled, or it is not a compiled runtime)."""
    return next((m.failed for m in rt.inner.modules() if isinstance(m, Compiled) and m.failed), None)


def load_for_inference(path: str | os.PathLike, runtime: str = "auto", *, model_name: str | None = None,
                       model_args: dict[str, Any] | None = None) -> tuple[Runtime, nn.Module | None]:
    """(runtime, float32 PyTorch model or None) for a checkpoint or an ONNX file.

    ``runtime="auto"``: ONNX Runtime for an ``.onnx`` file, PyTorch float32 otherwise. The PyTorch model
    is returned too (None for an ONNX file) so that callers can report agreement with float32.
    ``model_name``: the registered architecture of weights that do not name it (``vitlab.load_model``'s);
    ``model_args``: config options their tensors do not show.
    """
    if is_onnx_file(path):
        if runtime not in ("auto", "onnx", "onnx-int8"):
            raise ValueError(f"{path} is an ONNX file: use --runtime onnx (or leave --runtime out), not {runtime}")
        if model_name is not None or model_args:
            raise ValueError(f"{path} is an ONNX file, which names its model itself: leave --model / --model-arg out")
        return build_runtime("onnx" if runtime == "auto" else runtime, onnx_path=path), None
    import vitlab

    model = vitlab.load_model(path, model_name=model_name, **(model_args or {})).eval()
    return build_runtime("torch" if runtime == "auto" else runtime, model), model


def agreement(a: Tensor, b: Tensor) -> float:
    """Top-1 agreement of two logit batches."""
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item() if len(a) else 1.0
