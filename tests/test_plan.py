"""plan.py through the CLI: `train.py RECIPE --plan --json` prints the contract's keys with the recipe's values."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_train


def test_plan_json_has_the_contract_keys(tiny_data, tmp_path):
    # --plan checks what the recipe points at, as a start does: the demo's data is built by make demo, so use ours
    proc = run_train("yamls/demo/encoder/decay.yaml", "--plan", "--json", f"data.path={tiny_data / 'long'}",
                     f"data.tokenizer={tiny_data / 'tokenizer'}", f"run_dir={tmp_path / 'run'}")
    plan = json.loads(proc.stdout)
    for key in ("objective", "size", "params", "seq_len", "global_batch", "tokens", "steps", "lr_peak", "lr_final",
                "mask_rate", "rope_theta_global", "rope_theta_local", "init_from"):
        assert key in plan
    assert plan["objective"] == "mlm" and isinstance(plan["params"], int) and plan["mask_rate"] == 0.15
    assert plan["lr_final"] == pytest.approx(1.5e-3 * 0.04)
    assert plan["init_from"]["checkpoint"] == "demo_runs/encoder/extension"
