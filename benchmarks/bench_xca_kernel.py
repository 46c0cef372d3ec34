"""XCA's channel attention: F.scaled_dot_product_attention against two batched matmuls and a softmax.

XCiT-T at 224 px has per head a 48 x 48 map over 196 tokens: SDPA then runs over a "sequence" of 48
channels with a "head size" of 196. Interleaved rounds, 1 thread, medians in ms per call:

    /work/main/.venv/bin/python benchmarks/bench_xca_kernel.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

B, H, D, N = 8, 4, 48, 196


def main() -> None:
    torch.set_num_threads(1)
    q, k, v = (torch.randn(B, H, D, N) for _ in range(3))
    t = torch.rand(H, 1, 1)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(F.normalize(q, dim=-1) * t, F.normalize(k, dim=-1), v, scale=1.0)

    def explicit() -> torch.Tensor:
        a = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * t
        return a.softmax(-1) @ v

    for dtype in ("float32", "bfloat16"):
        res: dict[str, list[float]] = {"sdpa": [], "explicit": []}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            for f in (sdpa, explicit):
                for _ in range(5):
                    f()
            for _ in range(7):
                for name, f in (("sdpa", sdpa), ("explicit", explicit)):
                    t0 = time.perf_counter()
                    for _ in range(50):
                        f()
                    res[name].append((time.perf_counter() - t0) / 50 * 1e3)
        print(dtype, {n: round(statistics.median(x), 3) for n, x in res.items()})


if __name__ == "__main__":
    main()
