"""One MLM training step (forward, backward, AdamW step) of our EttinModel against transformers'
ModernBertForMaskedLM in its fastest documented CPU configuration (SDPA attention, sparse_prediction=True,
so its head also runs only on masked positions). Same process, same config, same weights, same batch.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step.py --sizes 17m 32m --batch 4 --seq 1024 --repeats 5

The batch is Ettin-like: right-padded rows of random length (mean ~0.6 x seq, the longest = seq), 30% of
the real tokens masked. Dropout is 0 in both (HF's attention_dropout would also drop attention weights).
The two models alternate step by step, so load from other processes hits both alike; the ratio is
reported per repeat (HF step time / our step time) with its spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ettin_train.checkpoint.hf import to_hf
from ettin_train.model import EttinModel, ModelConfig
from ettin_train.model.flops import training_flops
from ettin_train.objectives import mlm

MASK_ID, PAD_ID = 50284, 50283


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(int(0.2 * seq), seq + 1, (batch,), generator=g)
    lens[0] = seq
    ids = torch.randint(0, 50280, (batch, seq), generator=g) % vocab
    mask = (torch.arange(seq)[None, :] < lens[:, None]).long()
    chosen = (torch.rand(batch, seq, generator=g) < 0.3) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.full_like(ids, MASK_ID), ids)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def spread(values: list[float]) -> str:
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


def bench(size: str, batch: int, seq: int, repeats: int, warmup: int) -> None:
    cfg = ModelConfig(size=size, attention_backend="sdpa", attn_out_dropout=0.0)
    torch.manual_seed(0)
    ours = EttinModel(cfg).train()
    theirs = to_hf(ours, attn_implementation="sdpa", sparse_prediction=True).train()
    data = make_batch(batch, seq, cfg.vocab_size)
    real = int(data["attention_mask"].sum())
    predicted = int((data["labels"] != -100).sum())
    flops = training_flops(cfg, data["attention_mask"].sum(1).tolist(), predicted)

    def step_ours(opt):
        loss = mlm.loss(ours, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def step_theirs(opt):
        loss = theirs(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    runs = {"ours": (step_ours, torch.optim.AdamW(ours.parameters(), lr=1e-4)),
            "transformers": (step_theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    first_loss = {}
    for r in range(warmup + repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            step, opt = runs[name]
            start = time.perf_counter()
            loss = step(opt)
            elapsed = time.perf_counter() - start
            first_loss.setdefault(name, loss)
            if r >= warmup:
                times[name].append(elapsed)

    print(f"\n== {size}: {ours.num_params():,} params, batch {batch} x {seq} = {batch * seq} slots, "
          f"{real} real tokens ({real / (batch * seq):.0%}), {predicted} masked; "
          f"first-step loss ours {first_loss['ours']:.6f}, transformers {first_loss['transformers']:.6f}")
    for name, ts in times.items():
        tps = [real / t for t in ts]
        print(f"  {name:13s} step s (min/median/max) {spread(ts)}   real tokens/s {spread(tps)}   "
              f"model GFLOP/s (median) {flops / statistics.median(ts) / 1e9:.2f}")
    ratios = [t_hf / t_ours for t_ours, t_hf in zip(times["ours"], times["transformers"])]
    print(f"  speed-up ours vs transformers (per repeat, min/median/max): {spread(ratios)}x; "
          f"ratio of medians {statistics.median(times['transformers']) / statistics.median(times['ours']):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["17m", "32m"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("warning: other processes are running; with several threads each, OpenMP waits dominate the step "
              "times. Rerun on an idle machine or with OMP_NUM_THREADS=1.")
    for size in args.sizes:
        bench(size, args.batch, args.seq, args.repeats, args.warmup)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
