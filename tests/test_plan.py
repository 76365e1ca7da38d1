"""plan.py through the CLI: `train.py RECIPE --plan --json` prints the contract's keys with the recipe's values."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_train


def test_plan_json_has_the_contract_keys():
    proc = run_train("yamls/demo/encoder/decay.yaml", "--plan", "--json")
    plan = json.loads(proc.stdout)
    for key in ("objective", "size", "params", "seq_len", "global_batch", "tokens", "steps", "lr_peak", "lr_final",
                "mask_rate", "rope_theta_global", "rope_theta_local", "init_from"):
        assert key in plan
    assert plan["objective"] == "mlm" and isinstance(plan["params"], int) and plan["mask_rate"] == 0.15
    assert plan["lr_final"] == pytest.approx(1.5e-3 * 0.04)
    assert plan["init_from"]["checkpoint"] == "demo_runs/encoder/extension"
