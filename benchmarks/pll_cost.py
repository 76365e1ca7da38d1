"""What scoring a tag by pseudo-log-likelihood costs: the batched scorer (`eval.pll.score`, many masked rows per
forward) against the direct loop (`eval.pll.score_loop`, one forward per masked position), in the same process,
on the same items, alternated; prints the time of each, their ratio per repeat and the median, and the time per
item (an item: one context and one continuation, as one choice of a multiple-choice question is).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pll_cost.py --size 17m --items 48 --repeats 3

The model is a random Ettin encoder of `--size` (the preset's shape: the cost does not depend on the weights)
converted to transformers' ModernBertForMaskedLM, fp32; items are random token ids, a context of `--context`
tokens and a continuation of `--continuation` tokens each (a HellaSwag ending is ~20 tokens after ~40 of context).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="17m")
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--context", type=int, default=40)
    p.add_argument("--continuation", type=int, default=20)
    p.add_argument("--rows-per-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    from ettin_train.checkpoint.hf import to_hf
    from ettin_train.eval.pll import Item, score, score_loop
    from ettin_train.model import EttinModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(size=args.size, attention_backend="sdpa")
    model = to_hf(EttinModel(cfg), max_position_embeddings=1024).to(args.device).eval()
    special = 50281, 50282, 50283, 50284  # cls, sep, pad, mask (the preset's vocabulary)
    g = torch.Generator().manual_seed(1)
    n = args.context + args.continuation
    items = [Item((special[0], *torch.randint(0, 50000, (n,), generator=g).tolist(), special[1]),
                  tuple(range(1 + args.context, 1 + n))) for _ in range(args.items)]

    def batched():
        return score(model, items, special[3], special[2], args.rows_per_batch, args.device)

    def loop():
        return score_loop(model, items, special[3])

    batched(), loop()  # warm-up (allocator, kernels)
    times = {"batched": [], "loop": []}
    for r in range(args.repeats):
        for name, fn in ((("batched", batched), ("loop", loop)) if r % 2 == 0 else (("loop", loop), ("batched", batched))):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    print(f"{args.size} encoder on {args.device}, {args.items} items of {args.context} + {args.continuation} tokens "
          f"({args.items * args.continuation} masked positions), {args.rows_per_batch} rows per forward")
    for r in range(args.repeats):
        print(f"repeat {r}: batched {times['batched'][r]:.2f} s  loop {times['loop'][r]:.2f} s  "
              f"loop / batched {times['loop'][r] / times['batched'][r]:.2f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median: loop / batched {med['loop'] / med['batched']:.2f}; per item: batched {1000 * med['batched'] / args.items:.1f} ms, "
          f"loop {1000 * med['loop'] / args.items:.1f} ms")


if __name__ == "__main__":
    main()
