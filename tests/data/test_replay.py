"""Replaying an imported order: step k trains on exactly the order's rows of step k, with the same MLM
masks, on 1 or 2 processes and across a resume; ledger.jsonl proves it step by step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.data.order import OrderIndex
from tests.conftest import REPLAY_STEPS as STEPS
from tests.conftest import REPLAY_WIDTH as WIDTH
from tests.conftest import composer_launcher, run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def _ledger(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def test_replay_is_exact_across_resume_and_world_sizes(tiny_data, order, tmp_path):
    def recipe(name: str) -> Path:
        r = tiny_recipe(tiny_data, tmp_path / name, data={"order": str(order), "seq_len": WIDTH, "num_workers": 2},
                        train={"max_duration": f"{STEPS}ba"}, checkpoint={"interval": "4ba"})
        return write_recipe(tmp_path / f"{name}.yaml", r)

    run_train(str(recipe("whole")))
    whole = _ledger(tmp_path / "whole")
    index = OrderIndex(order)
    assert [line["step"] for line in whole] == list(range(1, STEPS + 1))
    for line in whole:
        rows = index.rows("pretrain", line["step"])
        assert line["data_step"] == line["step"] and line["rows"] == len(rows)
        assert line["rows_sha256"] == index.rows_sha256(rows)  # the published rows, in order
        assert line["tokens"] == sum(len(r) for r in rows)
        assert line["inputs_sha256"] != line["rows_sha256"]  # masking happened

    run_train(str(recipe("split")), "train.stop_after=3ba")
    resumed = run_train(str(recipe("split")))
    assert "resuming from" in resumed.stdout
    assert _ledger(tmp_path / "split") == whole  # same rows and same masks at every step, no step twice
    final = lambda d: model_state_dict(load_checkpoint(d / "checkpoints" / "latest-rank0.pt"))  # noqa: E731
    a, b = final(tmp_path / "whole"), final(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)

    run_train(str(recipe("ddp")), launcher=composer_launcher())
    two = _ledger(tmp_path / "ddp")
    digests = lambda ledger: [(x["rows_sha256"], x["inputs_sha256"]) for x in ledger]  # noqa: E731
    assert digests(two) == digests(whole)

    # two processes, stopped and resumed: the same steps again, and the same weights as without the stop
    run_train(str(recipe("ddp_split")), "train.stop_after=5ba", launcher=composer_launcher())
    run_train(str(recipe("ddp_split")), launcher=composer_launcher())
    assert _ledger(tmp_path / "ddp_split") == two
    a, b = final(tmp_path / "ddp"), final(tmp_path / "ddp_split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replay_refuses_a_run_longer_than_the_order(tiny_data, order, tmp_path):
    r = tiny_recipe(tiny_data, tmp_path / "long", data={"order": str(order), "seq_len": WIDTH},
                    train={"max_duration": "11ba"})
    proc = run_train(str(write_recipe(tmp_path / "long.yaml", r)), check=False)
    assert proc.returncode != 0 and "longer than the order's 10 steps" in proc.stderr
    assert not (tmp_path / "long" / "checkpoints").exists()
