"""Paths past ``torch-bf16-compile`` for ViT-S/16 at batch 16 on an AMX CPU: what each one gains, measured.

Issue 13 asks for ViT-S/16 at >= 1.3x timm's best eager setting with >= 99% top-1 agreement with float32;
``torch-bf16-compile`` reaches 1.13-1.21x (RESULTS "Deployment on an AMX CPU"). Its forward is about two
thirds oneDNN bfloat16 linear layers (at ~85% of the large-matmul rate) and a quarter the CPU flash-attention
kernel. This script measures the ways past that which PyTorch itself offers; none of them is in vitlab, and
the code here is a probe, not a runtime:

1. attention alone (B 16, 6 heads, 197 tokens, 64 dims, bfloat16): ``scaled_dot_product_attention`` as ViT
   calls it (strided q/k/v from the fused qkv), on contiguous copies, with the sequence padded to 208 / 224
   tokens and the pad keys masked, in float16, and written out (matmul, softmax, matmul);
2. whole model, in interleaved rounds against ``torch-bf16-compile`` (both compiled with freezing):
   - ``int8-dynamic``: every linear layer int8 through oneDNN's AMX kernels (``onednn.qlinear_pointwise``,
     weights per output channel, prepacked once), the activation's scale taken per call from its maximum
     (per tensor: the kernel takes one scale), bias and GELU fused into fc1's kernel;
   - ``int8-static``: the same with activation scales calibrated once on images, so fc1 writes int8 straight
     into fc2 and the quantisation of LayerNorm outputs fuses into the norm;
   - ``llga``: the bfloat16 model traced with TorchScript and oneDNN Graph fusion (``torch.jit.
     enable_onednn_fusion``), attention written out so its pattern fuses;
3. agreement with float32 of the two int8 paths (and of bfloat16) on a trained checkpoint and real images
   (``--checkpoint``, ``--data``), calibrating ``int8-static`` on other images of the same source.

    /work/main/.venv/bin/python benchmarks/explore_vit_cpu_paths.py --rounds 16 \
        --checkpoint RUN/model.safetensors --data CIFAR_FOLDER

Results go to benchmarks/results/vit_cpu_paths.json; numbers and conclusions in RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitlab
from vitlab.benchmark import machine_info, paired_ratio, run_interleaved
from vitlab.export.runtimes import Compiled, build_runtime
from vitlab.layers.attention import Attention
from vitlab.layers.mlp import Mlp

# oneDNN int8 weights, prepacked once, with the zero points the kernel asks for; a custom op's arguments
# cannot carry oneDNN's opaque tensors, so each layer passes the index of its entry here
_PACKED: list[tuple[Tensor, Tensor, Tensor]] = []


@torch.library.custom_op("vitlab_probe::int8_linear", mutates_args=())
def int8_linear(qx: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor, handle: int, post_op: str,
                out_scale: float, out_int8: bool) -> Tensor:
    packed, x_zp, w_zp = _PACKED[handle]
    return torch.ops.onednn.qlinear_pointwise.tensor(qx, x_scale, x_zp, packed, w_scale, w_zp, bias, out_scale, 0,
                                                     torch.int8 if out_int8 else bias.dtype, post_op, [], "none")


@int8_linear.register_fake
def _(qx, x_scale, w_scale, bias, handle, post_op, out_scale, out_int8):
    return qx.new_empty((qx.shape[0], w_scale.shape[0]), dtype=torch.int8 if out_int8 else bias.dtype)


class Int8Linear(nn.Module):
    """``lin`` with int8 weights (symmetric, per output channel). ``in_scale`` None: the input's scale is its
    maximum / 127, per call; a float: that fixed scale. ``out_scale``: write int8 at that scale (for a layer
    whose consumer takes int8, ``int8_input``)."""

    def __init__(self, lin: nn.Linear, *, in_scale: float | None = None, post_op: str = "none",
                 out_scale: float | None = None, int8_input: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = lin.weight.detach().float()
        w_scale = w.abs().amax(1).clamp_min(1e-12) / 127
        qw = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.handle = len(_PACKED)
        _PACKED.append((torch.ops.onednn.qlinear_prepack(qw, None), torch.zeros((), dtype=torch.int32),
                        torch.zeros(len(w), dtype=torch.int32)))
        self.register_buffer("w_scale", w_scale)
        bias = lin.bias.detach() if lin.bias is not None else torch.zeros(len(w))
        self.register_buffer("bias", bias.to(dtype))
        self.in_scale = in_scale
        if in_scale is not None:
            self.register_buffer("x_scale", torch.tensor(float(in_scale)))
        self.post_op, self.out_scale, self.int8_input = post_op, out_scale, int8_input

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.int8_input:
            qx, scale = x2, self.x_scale
        else:
            scale = self.x_scale if self.in_scale is not None else (x2.abs().amax().float() / 127).clamp_min(1e-12)
            qx = torch.round(x2.float() / scale).clamp(-127, 127).to(torch.int8)
        y = int8_linear(qx, scale, self.w_scale, self.bias, self.handle, self.post_op, self.out_scale or 1.0,
                        self.out_scale is not None)
        return y.reshape(*x.shape[:-1], -1)


def calibrate(model: nn.Module, batches: list[Tensor]) -> dict[str, float]:
    """Largest |value| seen at each quantised input: qkv, proj and fc1 inputs, and the GELU output (fc2's)."""
    amax: dict[str, float] = {}

    def record(name: str, output: bool):
        def hook(mod, inputs, out):
            v = (out if output else inputs[0]).detach().float().abs().amax().item()
            amax[name] = max(amax.get(name, 0.0), v)
        return hook

    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            hooks += [mod.qkv.register_forward_hook(record(name + ".qkv", False)),
                      mod.proj.register_forward_hook(record(name + ".proj", False))]
        elif isinstance(mod, Mlp):
            hooks += [mod.fc1.register_forward_hook(record(name + ".fc1", False)),
                      mod.act.register_forward_hook(record(name + ".act", True))]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return amax


def int8_copy(model_bf16: nn.Module, amax: dict[str, float] | None) -> nn.Module:
    """Every linear layer of the blocks int8 (the head stays bfloat16); ``amax`` None: dynamic scales."""
    m = copy.deepcopy(model_bf16)
    s = (lambda key: amax[key] / 127) if amax is not None else (lambda key: None)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, Attention):
            mod.qkv = Int8Linear(mod.qkv, in_scale=s(name + ".qkv"))
            mod.proj = Int8Linear(mod.proj, in_scale=s(name + ".proj"))
        elif isinstance(mod, Mlp) and type(mod.act) is nn.GELU and mod.act.approximate == "none":
            hidden = s(name + ".act")
            mod.fc1 = Int8Linear(mod.fc1, in_scale=s(name + ".fc1"), post_op="gelu", out_scale=hidden)
            mod.act = nn.Identity()
            mod.fc2 = Int8Linear(mod.fc2, in_scale=hidden, int8_input=hidden is not None)
    return m


class Bf16Input(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.to(torch.bfloat16)).float()


def attention_probe(rounds: int) -> dict:
    b, h, n, d = 16, 6, 197, 64
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.bfloat16)

    def split(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return z.reshape(b, -1, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)

    def padded(p: int):
        mask = torch.zeros(1, 1, 1, p, dtype=torch.bfloat16)
        mask[..., n:] = float("-inf")
        return lambda: F.scaled_dot_product_attention(*split(F.pad(qkv, (0, 0, 0, p - n))), attn_mask=mask)[:, :, :n]

    q, k, v = split(qkv)
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    qh, kh, vh = (t.half() for t in (qc, kc, vc))
    steps = {
        "sdpa_as_vit_calls_it": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa_contiguous": lambda: F.scaled_dot_product_attention(qc, kc, vc),
        "sdpa_pad208_masked": padded(208),
        "sdpa_pad224_masked": padded(224),
        "sdpa_float16": lambda: F.scaled_dot_product_attention(qh, kh, vh),
        "written_out": lambda: ((qc @ kc.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ vc,
        "softmax_alone": lambda: (qc @ kc.transpose(-1, -2)).softmax(-1),
        "qk_matmul_alone": lambda: qc @ kc.transpose(-1, -2),
    }
    stats = run_interleaved(steps, repeats=rounds, min_repeat_s=0.2)
    base = stats["sdpa_as_vit_calls_it"]
    flops = 4 * b * h * n * n * d
    return {name: {"ms": s.median * 1e3, "time_vs_sdpa": 1 / paired_ratio(s, base).median,
                   "gflops_if_full_attention": flops / s.median / 1e9} for name, s in stats.items()}


def model_probe(rounds: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224").eval()
    nn.init.normal_(model.head.weight, std=0.02)  # the zero-initialised head would make every logit equal
    x = torch.randn(batch, 3, 224, 224)
    base = build_runtime("torch-bf16-compile", model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    contenders = {
        "int8-dynamic": Compiled(Bf16Input(int8_copy(bf16, None)), freeze=True),
        "int8-static": Compiled(Bf16Input(int8_copy(bf16, calibrate(bf16, [x.bfloat16()]))), freeze=True),
    }
    written_out = copy.deepcopy(bf16)
    for mod in written_out.modules():
        if isinstance(mod, Attention):
            mod.fused = False
    torch.jit.enable_onednn_fusion(True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        contenders["llga"] = Bf16Input(torch.jit.freeze(torch.jit.trace(written_out, (x.bfloat16(),))))
    steps = {"torch-bf16-compile": partial(base, x)} | {name: partial(m, x) for name, m in contenders.items()}
    with torch.no_grad():
        ref = model(x)
        max_diff = {name: (m(x) - ref).abs().max().item() for name, m in contenders.items()}
        stats = run_interleaved(steps, repeats=rounds, warmup=3)
    out = {}
    for name, s in stats.items():
        r = paired_ratio(s, stats["torch-bf16-compile"])
        out[name] = {"images_per_s": batch / s.median, "speed_vs_bf16_compile": r.to_dict(),
                     "max_logit_diff_vs_float32": max_diff.get(name)}
    return out


def agreement_probe(checkpoint: str, data: str, n_eval: int, n_calibrate: int) -> dict:
    from vitlab.export.onnx import images_from_source, preprocess

    model = vitlab.load_model(checkpoint).eval()
    x = preprocess(images_from_source(data, n_calibrate + n_eval), model.preprocessing)
    calibration, images = x[:n_calibrate], x[n_calibrate:]
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    amax = calibrate(bf16, [calibration[i:i + 64].bfloat16() for i in range(0, n_calibrate, 64)])
    paths = {"bf16-weights": Bf16Input(bf16), "int8-dynamic": Bf16Input(int8_copy(bf16, None)),
             "int8-static": Bf16Input(int8_copy(bf16, amax))}

    def logits(m: nn.Module) -> Tensor:
        with torch.no_grad():
            return torch.cat([m(images[i:i + 250]) for i in range(0, len(images), 250)])

    ref = logits(model).argmax(1)
    return {"checkpoint": checkpoint, "data": data, "images": len(images), "calibration_images": n_calibrate,
            **{name: (logits(m).argmax(1) == ref).float().mean().item() for name, m in paths.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", help="a trained vitlab ViT checkpoint for the agreement probe")
    p.add_argument("--data", help="an image source for the agreement probe (calibration and evaluation images)")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "vit_cpu_paths.json"))
    args = p.parse_args()
    if not (hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()):
        sys.exit("this probe needs PyTorch's oneDNN int8 kernels (an x86 build with oneDNN)")
    torch.set_num_threads(args.threads)
    result = {"machine": machine_info(), "argv": sys.argv[1:], "attention": attention_probe(args.rounds),
              "model": model_probe(args.rounds, args.batch)}
    if args.checkpoint and args.data:
        result["agreement"] = agreement_probe(args.checkpoint, args.data, args.images, args.calibration_images)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
