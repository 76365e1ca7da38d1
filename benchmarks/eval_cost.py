"""What in-loop evaluation costs: whole `train.py` runs of one recipe with and without its `eval` section,
alternated (which goes first alternates too), wall time of each run; prints the ratio (with / without) per pair and their median.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eval_cost.py --steps 60 --interval 10ba --repeats 2

The recipe is the tests' tiny encoder (2 layers, hidden 64, seq 64, global batch 8) on data built on the
spot; each evaluation scores `--batches` batches of `--batch-size` held-out rows. Both sides pay the same
process start, so the ratio understates the cost per step; the script also prints the evaluation's share
computed from the rows: eval rows per interval / training rows per interval (forward only vs forward+backward).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def recipe(data: Path, run_dir: Path, steps: int, eval_cfg: dict | None) -> dict:
    r = {"run_name": "bench-eval", "run_dir": str(run_dir), "objective": "mlm",
         "model": {"size": None, "num_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_heads": 1,
                   "vocab_size": 512, "sliding_window": 16},
         "data": {"path": str(data / "short"), "tokenizer": str(data / "tokenizer"), "seq_len": 64, "num_workers": 0},
         "optimizer": {"lr": 3e-3}, "train": {"global_batch": 8, "max_duration": f"{steps}ba"},
         "checkpoint": {"interval": f"{steps}ba"}, "logging": {"console_interval": steps}}
    if eval_cfg:
        r["eval"] = eval_cfg
    return r


def timed_run(path: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), str(path)], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--interval", default="10ba")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    from ettin_train.data.demo_corpus import build_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_demo_data(str(tmp / "data"), max_chars=150_000, vocab_size=512, seq_lens={"short": 64}, heldout_chars=30_000)
        eval_cfg = {"sources": [str(tmp / "data" / "heldout_short")], "interval": args.interval,
                    "batches": args.batches, "batch_size": args.batch_size}
        ratios = []
        for k in range(args.repeats):
            times = {}
            sides = [("without", None), ("with", eval_cfg)]
            for side, cfg in sides if k % 2 == 0 else sides[::-1]:  # which goes first alternates
                path = tmp / f"{side}{k}.yaml"
                path.write_text(yaml.safe_dump(recipe(tmp / "data", tmp / f"{side}{k}", args.steps, cfg)))
                times[side] = timed_run(path)
            ratios.append(times["with"] / times["without"])
            print(f"repeat {k}: without eval {times['without']:.1f} s, with eval {times['with']:.1f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        every = int(args.interval.removesuffix("ba"))
        print(f"median ratio with/without eval over {args.repeats} pair(s): {statistics.median(ratios):.3f} "
              f"(spread {min(ratios):.3f}-{max(ratios):.3f}); eval rows per interval / training rows: "
              f"{args.batches * args.batch_size} / {every * 8}")


if __name__ == "__main__":
    main()
