"""The CPU path of scripts/gpu_check.py, as CI runs it: the CUDA agreement tests skip cleanly, the real
train.py loop runs on synthetic shards and its progress lines become the table. (The model-step part is
benchmarks/gpu.py's smoke path, run by tests/benchmarks/test_gpu_smoke.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_path_writes_the_table_from_a_real_loop(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--skip", "step",
                           "--out", str(out), "--work", str(work)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    agree = results["agreement"]
    assert agree["skipped"] >= 10 and agree["failed"] == agree["error"] == agree["passed"] == 0  # no CUDA here
    [loop] = results["loop"]
    assert [w["step"] for w in loop["windows"]] == [2, 4] and loop["tokens_per_s"] > 0
    assert loop["mfu"] is None  # no peak on a CPU, so no MFU is printed
    run_dir = next((work / "runs").iterdir())
    assert not list((run_dir / "checkpoints").glob("ep*.pt"))  # stopped after its last window: no final checkpoint
    # steps 1-2 were flushed at the step-2 interval, before the step-4 line that stopped the run was printed
    assert len((run_dir / "ledger.jsonl").read_text().splitlines()) >= 2
    md = (out / "results.md").read_text()
    assert "| encoder (smoke) @ 64 x 8 | " in md and "0 failed" in md
