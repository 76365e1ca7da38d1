"""What the trainer's own per-step bookkeeping costs the host: the ledger and the FLOP count for MFU,
before (per step: each row sliced and hashed, all_gather_object of every row, `.tolist()` of the lengths)
and after (per step: one vectorised copy of the rows' bytes and a FLOP count in tensor ops; per log
interval: one gather, the hashing and one all-reduce), on this machine's CPU.

    .venv/bin/python benchmarks/host_costs.py            # one process, then two processes on gloo

Batches are the benchmark shapes (150m encoder 64 x 1024 and 8 x 7999, MLM-masked, rows of random length).
On a GPU the "before" code also waited for the device at every step where the batch lived there; Composer
0.32.1 hands callbacks the host batch, so these host costs are what remains. Printed: ms per step
(median of repeats, spread) and the ratio before / after.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from ettin_train.data.ledger import LedgerBuffer
from ettin_train.data.order import rows_sha256
from ettin_train.model import ModelConfig
from ettin_train.model.flops import training_flops
from ettin_train.speed import SpeedWindow

INTERVAL = 100  # steps per flush: the default logging.console_interval


def make_batch(rows: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(int(0.2 * seq), seq + 1, (rows,), generator=g)
    mask = (torch.arange(seq)[None] < lens[:, None]).long()
    ids = torch.randint(5, 50280, (rows, seq), generator=g) * mask
    chosen = (torch.rand(rows, seq, generator=g) < 0.3) & mask.bool()
    return {"input_ids": torch.where(chosen, 50284, ids), "attention_mask": mask,
            "labels": torch.where(chosen, ids, -100), "step": torch.full((rows,), 1)}


def before_step(batch: dict, cfg: ModelConfig, gather) -> None:
    """The code this replaces (the Ledger callback's batch_end and speed.batch_flops as of 2026-11-28)."""
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    labels = batch["labels"]
    original = torch.where(labels.cpu() != -100, labels.cpu(), ids)
    mine = ([original[i][mask[i]].numpy() for i in range(len(ids))], [ids[i][mask[i]].numpy() for i in range(len(ids))], 0.0)
    gathered = gather(mine)
    rows = [r for rank_rows, _, _ in gathered for r in rank_rows]
    inputs = [r for _, rank_inputs, _ in gathered for r in rank_inputs]
    rows_sha256(rows), rows_sha256(inputs)
    lengths = batch["attention_mask"].sum(dim=1)
    training_flops(cfg, lengths.tolist(), int((batch["labels"] != -100).sum()))


def _gather_all(obj):
    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def measure(batch: dict, cfg: ModelConfig, steps: int, repeats: int, path) -> dict[str, list[float]]:
    times = {"before": [], "after": []}
    window = SpeedWindow(cfg, peak=1.0, world=1)
    loss = torch.tensor(2.5)
    for _ in range(repeats):
        if tdist.is_initialized():
            tdist.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            before_step(batch, cfg, _gather_all)
        times["before"].append((time.perf_counter() - t) / steps)
        buf = LedgerBuffer(path, "pretrain")
        if tdist.is_initialized():
            tdist.barrier()
        t = time.perf_counter()
        window.start(0.0, 0)
        for step in range(1, steps + 1):
            buf.add(step, batch, loss)
            window.add(batch)
            if step % INTERVAL == 0 or step == steps:
                buf.flush()
        float(window.flops)
        times["after"].append((time.perf_counter() - t) / steps)
    return times


def report(name: str, times: dict[str, list[float]]) -> None:
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    spread = lambda xs: (max(xs) - min(xs)) * 1e3  # noqa: E731
    print(f"{name}: before {b * 1e3:.2f} ms/step (spread {spread(times['before']):.2f}), after {a * 1e3:.2f} ms/step "
          f"(spread {spread(times['after']):.2f}); before / after = {b / a:.1f}x", flush=True)


SHAPES = [("150m encoder 64 x 1024", 64, 1024), ("150m encoder 8 x 7999", 8, 7999)]


def _worker(rank: int, init: str, tmp: str, steps: int, repeats: int) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = ModelConfig(size="150m")
    for name, rows, seq in SHAPES:
        times = measure(make_batch(rows, seq, seed=rank), cfg, steps, repeats, os.path.join(tmp, f"l{rank}.jsonl"))
        if rank == 0:
            report(f"2 processes (gloo), {name} per rank", times)
    tdist.destroy_process_group()


def main() -> int:
    import tempfile

    torch.set_num_threads(1)
    steps, repeats = 100, 3
    print(f"host: {os.cpu_count()} CPUs, torch {torch.__version__}, python {sys.version.split()[0]}; "
          f"{steps} steps per repeat, {repeats} repeats, flush every {INTERVAL} steps", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig(size="150m")
        for name, rows, seq in SHAPES:
            report(f"1 process, {name}", measure(make_batch(rows, seq), cfg, steps, repeats, os.path.join(tmp, "l.jsonl")))
        mp.spawn(_worker, args=(f"file://{tmp}/rendezvous", tmp, steps, repeats), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
