"""Pre-training throughput of each self-supervised objective next to a plain supervised step.

Every arm trains the same backbone (one optimiser step = the objective's step, backward, AdamW step and
the objective's hooks: DINO's clipping and teacher EMA), on in-memory random images, one thread:

* supervised: cross entropy on the class token's logits (10 classes), images at the model's size;
* mpp: 50% of patch embeddings corrupted, 3-bit colour head;
* mae: 75% of patches removed, decoder ``--mae-decoder`` (width x depth);
* beit: ~40% of patches masked in blocks, k-means tokenizer (512 tokens) run on every batch;
* beit_dvae: the same with a (randomly initialised) discrete VAE of vitlab's as the tokenizer (8192 codes);
* beit2: BEiT v2: a VQ-KD tokenizer (a second backbone of the same size, 8192 x 32 codes) on every batch, and the
  patch-aggregation head (2 blocks) on top of the masked-token loss;
* vqkd: one step of training BEiT v2's tokenizer: the backbone as its encoder, the codebook, a 1-block decoder
  regressing a frozen teacher's features (a second backbone of the same size);
* dino: 2 global crops at the model's size + ``--local`` local crops at 3/7 of it, K = ``--dino-k``;
  teacher forward on the global crops. DINO's throughput counts *images* (each image gives 2 + N views).

Arms alternate within each round (supervised, mpp, mae, beit, dino, then reversed); images/s is the median
over rounds and the ratio to supervised is the median of per-round ratios. No peer is involved: this
measures vitlab's objectives against vitlab's own supervised step.

    /work/main/.venv/bin/python benchmarks/bench_ssl.py                       # ViT-Ti/8 at 64 px, ~2 min
    /work/main/.venv/bin/python benchmarks/bench_ssl.py --model vit_small_patch16_224 --img-size 96 --patch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

import vitlab  # noqa: E402
from vitlab.ssl import DINO, MAE, VQKD, BEiT, BEiT2, DiscreteVAE, DVAETokenizer, MaskedPatchPrediction  # noqa: E402
from vitlab.train.objective import ClassificationObjective  # noqa: E402


def build(args, method: str):
    torch.manual_seed(0)
    kw = dict(img_size=args.img_size, patch_size=args.patch, num_classes=10 if method == "supervised" else 0)
    if method == "dino":
        kw["dynamic_img_size"] = True
    if method == "mae":
        kw["pos_embed"] = "sincos"
    model = vitlab.create_model(args.model, **kw)
    if method == "supervised":
        obj = ClassificationObjective()
    elif method == "mpp":
        obj = MaskedPatchPrediction(model)
    elif method == "mae":
        dim, depth = (int(v) for v in args.mae_decoder.split("x"))
        obj = MAE(model, decoder_dim=dim, decoder_depth=depth, decoder_heads=max(1, dim // 32))
    elif method == "beit":
        obj = BEiT(model, vocab_size=512).fit_tokenizer(torch.randn(64, 3, args.img_size, args.img_size), iters=2)
    elif method == "beit_dvae":
        obj = BEiT(model, tokenizer=DVAETokenizer(DiscreteVAE.for_backbone(model)))
    elif method in ("beit2", "vqkd"):
        other = vitlab.create_model(args.model, **kw)  # the teacher (vqkd) or the tokenizer's encoder (beit2)
        if method == "vqkd":
            obj = VQKD(model, teacher=other)
        else:
            vq = VQKD(other, teacher=vitlab.create_model(args.model, **kw))
            vq.quantizer.initted.fill_(True)
            obj = BEiT2(model, tokenizer=vq.tokenizer(other))
    else:
        obj = DINO(model, out_dim=args.dino_k)
    steps = args.steps + args.skip
    obj.setup(model, steps_per_epoch=1, total_steps=steps)  # DINO: last layer frozen in the first step only
    params = list(model.parameters()) + obj.parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    B, S = args.batch_size, args.img_size
    if method == "dino":
        local = max(args.patch, round(S * 3 / 7 / args.patch) * args.patch)
        batch = ([torch.randn(B, 3, S, S) for _ in range(2)] + [torch.randn(B, 3, local, local)
                                                                  for _ in range(args.local)], None)
    else:
        batch = (torch.randn(B, 3, S, S), torch.randint(0, 10, (B,)))
    model.train()
    obj.train()
    return model, obj, opt, batch


def run_arm(args, method: str) -> float:
    model, obj, opt, batch = build(args, method)
    times = []
    for i in range(args.skip + args.steps):
        t0 = time.perf_counter()
        loss, _ = obj.step(model, batch)
        loss.backward()
        obj.before_optimizer_step(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.after_optimizer_step(i + 1)
        float(loss.detach())
        if i >= args.skip:
            times.append(time.perf_counter() - t0)
    return args.batch_size / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--mae-decoder", default="128x2", help="decoder width x depth")
    p.add_argument("--dino-k", type=int, default=4096)
    p.add_argument("--local", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    arms = ["supervised", "mpp", "mae", "beit", "beit_dvae", "beit2", "vqkd", "dino"]
    rows: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        for a in order:
            rows[a].append(run_arm(args, a))
        print(f"round {r + 1}: " + ", ".join(f"{a} {rows[a][-1]:.1f}" for a in arms), flush=True)
    result = {}
    for a in arms:
        ratios = [x / s for x, s in zip(rows[a], rows["supervised"], strict=True)]
        result[a] = {"img_per_s": round(statistics.median(rows[a]), 1), "ratio": round(statistics.median(ratios), 2),
                     "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)]}
    print(json.dumps({"args": vars(args), "result": result}, indent=2))


if __name__ == "__main__":
    main()
