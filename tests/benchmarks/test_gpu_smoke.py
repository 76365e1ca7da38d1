"""The CPU-sized path of benchmarks/gpu.py: the script CI can run where no GPU is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_path_runs_and_both_models_compute_the_same_loss(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--steps", "1", "--out", str(tmp_path),
         "--variants", "ours sdpa+compile", "transformers sdpa"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {a["backend"] for a in results["agreement"]} >= {"sdpa"}  # FlexAttention: no backward on a CPU
    assert all(a["ok"] for a in results["agreement"]), results["agreement"]
    by_row: dict[str, dict[str, dict]] = {}
    for r in results["results"]:
        assert "error" not in r, r
        by_row.setdefault(r["row"], {})[r["variant"]] = r
    assert len(by_row) == 2  # the encoder row and the decoder row
    for row, variants in by_row.items():
        ours, theirs = variants["ours sdpa+compile"], variants["transformers sdpa"]
        assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-4, row
        assert ours["tokens_per_s"] > 0 and ours["real_tokens"] == theirs["real_tokens"]
    assert "| ours sdpa+compile |" in (tmp_path / "results.md").read_text()
