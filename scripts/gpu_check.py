"""One call on a GPU machine: are the CUDA attention backends right, how fast is the model step per backend,
and how fast is the real training loop (train.py through Composer) against the bare step and transformers?

    scripts/gpu_wheels.sh                  # here, once: the wheels the GPU machine lacks, into .whl/
    bash scripts/gpu_check.sh              # there (installs .whl/, then runs this) within --budget-s (450 s)
    python scripts/gpu_check.py --smoke --out DIR   # the CPU path CI runs (tiny shapes; 3.5 min on the loaded 2-core dev machine)

In order, each part under a share of --budget-s so the table always comes out:
  1. the GPU agreement tests (tests/model/test_ettin.py -k cuda): every CUDA backend, eager and compiled,
     against the CPU SDPA path in values and gradients, encoder and decoder, windows binding;
  2. the model step per backend (benchmarks/gpu.py: ours with each backend, compiled, and transformers'
     ModernBERT on the same batch), with the profile's top kernels;
  3. the real loop: train.py on synthetic MDS shards (rows of uniform random length 0.2-1.0 x seq, as
     benchmarks/gpu.py's batch) for the 150m encoder at 1024 and 7999 tokens and the 1b decoder at 1024,
     with compiled layers; tokens/s, MFU (speed.py's strict count) and peak memory are read off the progress
     lines after the first (compiling) window; the run is stopped after its last measured window, so no
     final checkpoint is written.
Writes --out/results.md (the table for docs/benchmarks.md), results.json, profile.txt and four logs (seven
files: the device tool brings back at most eight); shards, runs and gpu.py's own files go to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]
from gpu import fmt, step_table  # noqa: E402 - benchmarks/gpu.py: the step table is the same in both

# name (benchmarks/gpu.py's label of the same row), recipe, seq, global batch (= microbatch). The 7999 row runs
# the pretrain recipe at the extension length: the same model and kernels (only RoPE's theta differs).
LOOP_ROWS = [("150m encoder @ 1024 x 64", "yamls/encoder/150m/pretrain.yaml", 1024, 64),
             ("1b decoder @ 1024 x 16", "yamls/decoder/1b/pretrain.yaml", 1024, 16),
             ("150m encoder @ 7999 x 8", "yamls/encoder/150m/pretrain.yaml", 7999, 8)]
SMOKE_MODEL = ["model.size=null", "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=96",
               "model.num_heads=1", "model.vocab_size=512", "model.sliding_window=16"]
PROGRESS = re.compile(r"step\s+(\d+)\s.*?\s([\d.]+)([kMBT]?) tok/s(?:\s+MFU ([\d.]+)%)?(?:\s+mem ([\d.]+) GiB)?")
SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], timeout: float, log_to: Path, env: dict | None = None, stop=None) -> tuple[int, str]:
    """Runs cmd in its own process group, appending its output to log_to; `stop(line)` True ends it early
    (SIGKILL to the group). Returns (exit code: 0 when stopped on purpose, -9 on timeout; the output)."""
    lines: queue.Queue = queue.Queue()
    out: list[str] = []
    with log_to.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
        reader.start()
        deadline, rc = time.perf_counter() + timeout, None
        while rc is None:
            try:
                line = lines.get(timeout=max(0.0, min(1.0, deadline - time.perf_counter())))
            except queue.Empty:
                line = ""
            if line is None:  # the output ended: the process is done
                rc = proc.wait()
                break
            if line:
                out.append(line.rstrip("\n"))
                f.write(line)
                f.flush()
            if line and stop and stop(line):
                rc = 0
            elif time.perf_counter() > deadline:
                rc = -9
        if proc.poll() is None:
            # SIGKILL, not SIGTERM: train.py saves a checkpoint on SIGTERM (preemption), which a measurement
            # does not want to wait for; the next start cleans streaming's leftovers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, "\n".join(out)


# ------------------------------------------------------------------------------------------ 1. agreement


def agreement(out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/model/test_ettin.py", "-k", "cuda"]
    rc, text = run(cmd, timeout, out / "agreement.log")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text.splitlines()[-1] if text else "")}
    return {"rc": rc, **{k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error")}}


# -------------------------------------------------------------------------------------- 2. the model step


def model_step(out: Path, work: Path, timeout: float, smoke: bool) -> list[dict]:
    if smoke:
        args = ["--smoke", "--steps", "1", "--rows", "0", "--variants", "ours sdpa+compile", "transformers sdpa"]
    else:  # the default backend first, then the baseline, then FlexAttention (the default before 2026-12)
        args = ["--steps", "5", "--profile", "--skip-agreement", "--budget-s", str(max(0, timeout - 60)), "--variants",
                "ours varlen+compile", "ours fa4+compile", "ours flash+compile", "transformers sdpa", "ours flex+compile"]
    step_dir = work / "step"  # gpu.py's own results stay here: the device tool brings back at most 8 files
    rc, text = run([sys.executable, "benchmarks/gpu.py", "--out", str(step_dir), *args], timeout, out / "step.log",
                   env={"HF_HUB_OFFLINE": "1"})
    results = [json.loads(line[len("result "):]) for line in text.splitlines() if line.startswith("result ")]
    if (step_dir / "profile.txt").exists():
        (step_dir / "profile.txt").rename(out / "profile.txt")
    log(f"model step: {len(results)} results, rc {rc}")
    return results


# ---------------------------------------------------------------------------------------- 3. the real loop


def make_data(work: Path, seqs: set[int], rows_per_seq: dict[int, int]) -> Path:
    """A byte-level BPE tokenizer (512 tokens) and one MDS folder per sequence length, rows of uniform random
    length 0.2-1.0 x seq (framed by [CLS] ... [SEP]), random ids past the special tokens."""
    import numpy as np

    from ettin_train.data.demo_corpus import stdlib_docstrings, train_tokenizer
    from ettin_train.data.shards import write_shards

    data = work / "data"
    if not (data / "tokenizer").exists():
        tok = train_tokenizer([text for _, text in stdlib_docstrings(60_000)], 512, str(data / "tokenizer"))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    rng = np.random.default_rng(0)
    for seq in seqs:
        folder = data / f"seq{seq}"
        if folder.exists():
            continue
        n = rows_per_seq[seq]
        lengths = rng.integers(int(0.2 * seq), seq + 1, size=n) - 2
        docs = [(f"doc{i}", rng.integers(5, 512, size=int(m)).tolist()) for i, m in enumerate(lengths)]
        write_shards(str(folder), docs, seq, tok.cls_token_id, tok.sep_token_id)
    return data


def parse_progress(text: str) -> list[dict]:
    windows = []
    for line in text.splitlines():
        m = PROGRESS.search(line)
        if m and "] step" in line:
            windows.append(dict(step=int(m.group(1)), tokens_per_s=float(m.group(2)) * SCALE[m.group(3)],
                                mfu=float(m.group(4)) / 100 if m.group(4) else None,
                                peak_mem_gib=float(m.group(5)) if m.group(5) else None))
    return windows


def real_loop(out: Path, work: Path, timeout: float, smoke: bool, steps: int, interval: int) -> list[dict]:
    rows = [("encoder (smoke) @ 64 x 8", "yamls/encoder/150m/pretrain.yaml", 64, 8)] if smoke else LOOP_ROWS
    need = {}
    for _, _, seq, batch in rows:
        need[seq] = max(need.get(seq, 0), batch * (steps + 4))
    data = make_data(work, set(need), need)
    results, started = [], time.perf_counter()
    for i, (name, recipe, seq, batch) in enumerate(rows):
        left = timeout - (time.perf_counter() - started)
        share = left / (len(rows) - i)
        if share < 30:
            results.append(dict(row=name, error="skipped (time budget)"))
            continue
        run_dir = work / "runs" / re.sub(r"\W+", "_", name)
        overrides = [f"run_dir={run_dir}", f"data.path={data / f'seq{seq}'}", f"data.tokenizer={data / 'tokenizer'}",
                     f"data.seq_len={seq}", "data.num_workers=2", f"train.global_batch={batch}", f"train.microbatch={batch}",
                     "train.max_duration=100_000_000_000tok", "checkpoint.interval=100_000_000_000tok", f"logging.console_interval={interval}",
                     "checkpoint.autoresume=false"]
        overrides += (SMOKE_MODEL + ["train.device=cpu"]) if smoke else ["parallel.compile=true"]
        stop = lambda line: bool(re.search(rf"\] step\s+{steps}\s", line))  # noqa: E731
        t0 = time.perf_counter()
        rc, text = run([sys.executable, "train.py", recipe, *overrides], share, out / "loop.log",
                       env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}, stop=stop)
        windows = parse_progress(text)
        measured = [w for w in windows if w["step"] > interval] or windows[-1:]  # the first window compiles
        r = dict(row=name, rc=rc, wall_s=time.perf_counter() - t0, windows=windows)
        if measured and rc == 0:
            r.update(tokens_per_s=statistics.median(w["tokens_per_s"] for w in measured),
                     mfu=statistics.median(w["mfu"] for w in measured) if measured[-1]["mfu"] is not None else None,
                     peak_mem_gib=measured[-1]["peak_mem_gib"])
        else:
            r["error"] = f"exit {rc}, {len(windows)} progress lines (loop.log)"
        log(f"loop {name}: {r.get('tokens_per_s')} tok/s, MFU {r.get('mfu')}, rc {rc}, {r['wall_s']:.0f} s")
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------- report


def table(env: dict, agree: dict, steps: list[dict], loops: list[dict]) -> str:
    done = {r["variant"] for r in steps if "error" not in r}
    default = next((v for v in ("ours varlen+compile", "ours fa4+compile", "ours flash+compile", "ours flex+compile",
                                "ours sdpa+compile") if v in done), None)
    lines = [f"Card: {env['device']}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}. "
             f"torch varlen attention with windows: {env['varlen_window']}; flash-attn-4: {env['fa4']}; "
             f"flash-attn: {env['flash_attn']}. Produced by `scripts/gpu_check.py` in {env['total_s']:.0f} s.", "",
             f"GPU agreement tests (`tests/model/test_ettin.py -k cuda`): {agree.get('passed', 0)} passed, "
             f"{agree.get('failed', 0) + agree.get('error', 0)} failed, {agree.get('skipped', 0)} skipped.", "",
             f"Real loop (train.py through Composer, synthetic MDS shards, compiled layers, bf16) beside the bare "
             f"model step ({default or 'ours'}) and transformers' ModernBERT (SDPA) on benchmarks/gpu.py's batch:", "",
             "| row | loop tokens/s | loop MFU | loop peak mem GiB | step tokens/s | step MFU | loop / step | "
             "transformers tokens/s | loop / transformers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_row = {}
    for r in steps:
        if "error" not in r:
            by_row.setdefault(r["row"], {})[r["variant"]] = r
    for loop in loops:
        if "error" in loop:
            lines.append(f"| {loop['row']} | {loop['error']} | | | | | | | |")
            continue
        variants = by_row.get(loop["row"], {})
        ours, hf = variants.get(default), variants.get("transformers sdpa")
        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
        lines.append(f"| {loop['row']} | {loop['tokens_per_s']:,.0f} | {fmt(loop['mfu'], '.1%')} | "
                     f"{fmt(loop['peak_mem_gib'], '.1f')} | {fmt(ours and ours['tokens_per_s'], ',.0f')} | "
                     f"{fmt(ours and ours['mfu'], '.1%')} | {ratio(loop['tokens_per_s'], ours and ours['tokens_per_s'])} | "
                     f"{fmt(hf and hf['tokens_per_s'], ',.0f')} | {ratio(loop['tokens_per_s'], hf and hf['tokens_per_s'])} |")
    lines += ["", "Model step per backend (benchmarks/gpu.py):", ""] + step_table(steps)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md, results.json and logs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check_work"), help="shards and run folders")
    parser.add_argument("--smoke", action="store_true", help="the CPU path: tiny shapes, no GPU needed")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all three parts")
    parser.add_argument("--steps", type=int, help="loop steps per run (default 30; smoke 4)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["agreement", "step", "loop"], help="parts to leave out")
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    from ettin_train.model import ettin

    on_gpu = torch.cuda.is_available() and not args.smoke
    env = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu (smoke)", torch=torch.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"),
               varlen_window=ettin.VARLEN_WINDOW, fa4="yes" if ettin.fa4_available() else "not installed",
               flash_attn="yes" if ettin.flash_attn_varlen_func is not None else "not installed")
    log(json.dumps(env))
    steps = args.steps or (4 if args.smoke else 30)
    interval = 2 if args.smoke else 10
    left = lambda: args.budget_s - (time.perf_counter() - started)  # noqa: E731

    agree = {} if "agreement" in args.skip else agreement(args.out, timeout=min(90.0, 0.2 * left()))
    log(f"agreement: {agree}")
    step_results = [] if "step" in args.skip else model_step(args.out, args.work, timeout=0.4 * left(),
                                                                    smoke=args.smoke)
    loops = [] if "loop" in args.skip else real_loop(args.out, args.work, timeout=left() - 5, smoke=args.smoke,
                                                     steps=steps, interval=interval)

    env["total_s"] = time.perf_counter() - started
    md = table(env, agree, step_results, loops)
    (args.out / "results.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps(dict(env=env, agreement=agree, step=step_results, loop=loops), indent=1))
    print("\n" + md, flush=True)
    bad = agree.get("failed", 0) + agree.get("error", 0) or agree.get("rc", 0) not in (0, 5)
    bad = bad or any("error" in r and "skipped" not in r["error"] for r in loops)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
