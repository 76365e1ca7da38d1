"""The loaders' speed: tokens/s one loader process delivers with MLM masking, and the time to the
first batch after resuming early versus late (resume must not iterate), for the replay of an order
and for own data (data/permuted.py: one MDS source, and a mixture of two).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/loader.py                  # both, defaults below
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/loader.py --only own --samples 20000 --rows 64 --tokens 600

It writes a synthetic order in the published parquet format (rows framed [CLS] ... [SEP], Ettin's ids),
imports it with data/order.py, then reads it through `ReplayBatches` exactly as a training run does
(one process, no DataLoader workers: the number is per worker). Goals (issue #4): at least 1M tokens/s
per worker, and the first batch after resuming at the last step within 2x of resuming at step 10.
Own data: synthetic MDS shards (zstd, as tokenize_to_mds writes them) read through `PermutedBatches`;
its resume goes to step 10 and to step --steps, far past the end of the data (many epochs later).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ettin_train.data.order import validate_and_import
from ettin_train.data.permuted import PermutedBatches, SourceSpec
from ettin_train.data.replay import ReplayBatches
from ettin_train.objectives import SpecialTokens, get_objective

TOKENS = SpecialTokens(unk=50280, cls=50281, sep=50282, pad=50283, mask=50284, vocab_size=50368)
FILE_STEPS = 20_000  # steps per parquet file, as the published order splits a phase into many files


def write_order(root: Path, steps: int, rows: int, tokens: int, width: int, long_steps: int) -> None:
    """`steps` steps of `rows` rows. The first `long_steps` steps and the last 10 have ~`tokens` real tokens
    per row (throughput, and a fair late resume); the rest one row of 8 tokens (batch sizes vary in the real
    order too), which keeps a 500k-step order small on disk."""
    rng = np.random.default_rng(0)
    for first in range(1, steps + 1, FILE_STEPS):
        last = min(steps, first + FILE_STEPS - 1)
        ids, step_col = [], []
        for step in range(first, last + 1):
            full = step <= long_steps or step > steps - 10
            lengths = np.clip(rng.normal(tokens, tokens / 4, rows).astype(int), 3, width) if full else [8]
            for length in lengths:
                row = np.full(width, TOKENS.pad, dtype=np.uint16)
                row[0], row[1 : length - 1], row[length - 1] = TOKENS.cls, rng.integers(0, 50280, length - 2), TOKENS.sep
                ids.append(row)
                step_col.append(step)
        table = pa.Table.from_arrays([pa.array(list(ids), type=pa.list_(pa.uint16())), pa.array(step_col, type=pa.uint64())],
                                     names=["input_ids", "step"])
        table = table.replace_schema_metadata({b"sequence_length": str(width).encode()})
        path = root / "checkpoint_000001" / f"steps_{first:06d}_to_{last:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)


def write_mds(folder: Path, samples: int, tokens: int, width: int, seed: int) -> None:
    """`samples` framed samples of ~`tokens` tokens in the tokenize_to_mds layout."""
    from streaming import MDSWriter

    from ettin_train.data.shards import COLUMNS

    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(folder), columns=COLUMNS, compression="zstd", size_limit=1 << 26) as writer:
        for k, length in enumerate(np.clip(rng.normal(tokens, tokens / 4, samples).astype(int), 3, width)):
            ids = np.concatenate(([TOKENS.cls], rng.integers(0, 50280, length - 2), [TOKENS.sep])).astype(np.uint32)
            writer.write({"input_ids": ids, "id": f"doc{k}#0", "len": len(ids)})


def bench_replay(args, collate) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_order(root / "published", args.steps, args.rows, args.tokens, args.width, args.long_steps)
        validate_and_import(root / "published", root / "imported", vocab_size=TOKENS.vocab_size, pad_id=TOKENS.pad)
        print(f"synthetic order: {args.steps:,} steps ({args.long_steps + 10} of {args.rows} rows of ~{args.tokens} tokens, "
              f"the rest 1 short row) written and imported in {time.perf_counter() - t:.0f}s")

        data = ReplayBatches(str(root / "imported"), "pretrain", rank=0, world=1, seq_len=args.width, collate=collate)
        throughput("replay", [lambda step=step: data.batch(step) for step in range(1, args.long_steps + 1)], args.repeats)

        def first_batch_after_resume(step: int) -> float:
            t = time.perf_counter()
            resumed = ReplayBatches(str(root / "imported"), "pretrain", rank=0, world=1, seq_len=args.width, collate=collate)
            resumed.load_state_dict(data.state_dict(int(data.samples_before[step - 1]), True))
            batch = next(iter(resumed))
            assert int(batch["step"][0]) == step
            return time.perf_counter() - t

        resume_ratio("replay", first_batch_after_resume, args)


def bench_own(args, collate) -> None:
    from streaming.base.util import clean_stale_shared_memory

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_mds(root / "a", args.samples, args.tokens, args.width, seed=1)
        write_mds(root / "b", args.samples // 4, args.tokens, args.width, seed=2)
        print(f"synthetic MDS: {args.samples:,} + {args.samples // 4:,} samples of ~{args.tokens} tokens written in "
              f"{time.perf_counter() - t:.0f}s")
        for name, sources in (("own data, one source", [SourceSpec("data", str(root / "a"), None, None, 1.0)]),
                              ("own data, mixture 0.7/0.3", [SourceSpec("a", str(root / "a"), None, None, 0.7),
                                                             SourceSpec("b", str(root / "b"), None, None, 0.3)])):
            bench_permuted(name, sources, args, collate)
            clean_stale_shared_memory()


def bench_permuted(name: str, sources: list[SourceSpec], args, collate) -> None:
    data = PermutedBatches(sources, seed=21, global_batch=args.rows, rank=0, world=1, phase="pretrain",
                           seq_len=args.width, tokens=TOKENS, force_sep=True, collate=collate)
    steps = min(args.long_steps, args.samples // args.rows)
    for step in range(1, steps + 1):  # streaming decompresses each zstd shard on first use: not measured
        data.batch(step)
    throughput(name, [lambda step=step: data.batch(step) for step in range(1, steps + 1)], args.repeats)

    def first_batch_after_resume(step: int) -> float:
        t = time.perf_counter()
        data.load_state_dict(data.state_dict((step - 1) * args.rows, True))
        data._perms.clear()  # a fresh process has no permutation yet
        batch = next(iter(data))
        assert int(batch["step"][0]) == step
        return time.perf_counter() - t

    resume_ratio(name, first_batch_after_resume, args)


def throughput(name: str, batches, repeats: int) -> None:
    rates = []
    for _ in range(repeats):
        t, n = time.perf_counter(), 0
        for make_batch in batches:
            n += int(make_batch()["attention_mask"].sum())
        rates.append(n / (time.perf_counter() - t))
    print(f"{name}: tokens/s per loader worker with 30% MLM masking (min/median/max over {repeats}): "
          f"{min(rates) / 1e6:.2f} / {statistics.median(rates) / 1e6:.2f} / {max(rates) / 1e6:.2f} M  (goal >= 1M)")


def resume_ratio(name: str, first_batch_after_resume, args) -> None:
    early = [first_batch_after_resume(10) for _ in range(args.repeats)]
    late = [first_batch_after_resume(args.steps) for _ in range(args.repeats)]
    print(f"{name}: first batch after resuming at step 10: median {statistics.median(early) * 1e3:.1f} ms; "
          f"at step {args.steps:,}: median {statistics.median(late) * 1e3:.1f} ms; "
          f"ratio {statistics.median(late) / statistics.median(early):.2f}x  (goal <= 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("replay", "own"), help="run one of the two loaders (default: both)")
    parser.add_argument("--steps", type=int, default=500_000, help="steps in the synthetic order; the late resume step")
    parser.add_argument("--rows", type=int, default=64, help="rows per step (per device)")
    parser.add_argument("--tokens", type=int, default=600, help="mean real tokens per row in the throughput steps")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--long-steps", type=int, default=200, help="steps with full-size rows, read for throughput")
    parser.add_argument("--samples", type=int, default=20_000, help="own data: samples of the first source (the second: 1/4)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    collate = get_objective("mlm").make_collator(TOKENS, 0.3, seed=21)
    if args.only != "own":
        bench_replay(args, collate)
    if args.only != "replay":
        bench_own(args, collate)


if __name__ == "__main__":
    main()
