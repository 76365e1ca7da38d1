"""What the reliability checks cost, measured on this machine: the non-finite guard's gradient check per
step (17m and 150m models), and hashing shards for reliability.verify_shards=hash (xxh64, per GiB).

    .venv/bin/python benchmarks/reliability_costs.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from streaming.base.hashing import get_hash

from ettin_train.model import EttinModel
from ettin_train.model.config import ModelConfig


def _median_s(fn, repeat: int = 7) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(times) - min(times)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for size in ("17m", "150m"):
        model = EttinModel(ModelConfig(size=size))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        grads = [p.grad for p in model.parameters()]
        check = lambda: bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())  # noqa: E731  (the guard's check)
        med, spread = _median_s(check)
        n = sum(g.numel() for g in grads)
        print(f"guard check, {size} ({n / 1e6:.0f}M parameters): median {med * 1e3:.1f} ms (spread {spread * 1e3:.1f} ms)")
    data = os.urandom(256 << 20)
    med, spread = _median_s(lambda: get_hash("xxh64", data), repeat=5)
    print(f"xxh64 over 256 MiB in memory: {0.25 / med:.2f} GiB/s (median of 5, spread {spread * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
