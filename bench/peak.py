"""The machine's matmul peak: GEMM GFLOP/s at given shapes (M tokens x K in -> N out), fp32 and
bf16, with the threads torch uses. bench/train_speed.py divides each side's useful FLOP/s by it.

    python bench/peak.py                                  # the benchmark's typical shapes
    python bench/peak.py --shapes '[[1100, 384, 1536]]' --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DEFAULT = [[1120, 384, 1536], [640, 576, 1536], [800, 576, 1536]]


def gflops(m: int, k: int, n: int, dtype, seconds: float = 1.0) -> float:
    """Best GFLOP/s of ``x @ w`` over repeated runs of about ``seconds`` in all."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(k, n, generator=g).to(dtype)
    for _ in range(3):  # warm up
        x @ w
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t = time.perf_counter()
        x @ w
        d = time.perf_counter() - t
        best, spent = min(best, d), spent + d
    return 2 * m * k * n / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", type=json.loads, default=DEFAULT)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = {
        "x".join(map(str, s)): {
            "fp32": gflops(*s, torch.float32),
            "bf16": gflops(*s, torch.bfloat16),
        }
        for s in a.shapes
    }
    if a.json:
        print(json.dumps(out))
        return
    print(f"threads {torch.get_num_threads()}")
    for shape, r in out.items():
        print(f"{shape:18} fp32 {r['fp32']:8.1f} GFLOP/s   bf16 {r['bf16']:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
