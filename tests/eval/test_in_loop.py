"""The recipe's `eval` during real Composer runs: it leaves training bit for bit as without it, its numbers
on 1 and 2 processes are those of ettin-eval on the same checkpoints, and a run stopped after an evaluation
and resumed from an earlier checkpoint writes the eval.jsonl of a run that never stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.eval.cli import main as eval_main
from tests.conftest import composer_launcher, run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

EVAL = {"interval": "2ba", "batches": 2, "batch_size": 4, "seq_len": 64}


def recipe(data: Path, run_dir: Path, with_eval: bool) -> dict:
    return tiny_recipe(data, run_dir, "mlm", train={"max_duration": "8ba"}, checkpoint={"interval": "4ba"},
                       eval={**EVAL, "sources": [str(data / "heldout_short")]} if with_eval else {})


def lines(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("in-loop")
    for name, with_eval in (("plain", False), ("eval", True)):
        run_train(str(write_recipe(root / f"{name}.yaml", recipe(tiny_data, root / name, with_eval))))
    two = write_recipe(root / "two.yaml", recipe(tiny_data, root / "two", True))
    run_train(str(two), launcher=composer_launcher())
    return root


def test_a_run_with_eval_trains_bit_for_bit_like_one_without(runs):
    assert [x["loss"] for x in lines(runs / "eval", "ledger.jsonl")] == [x["loss"] for x in lines(runs / "plain", "ledger.jsonl")]
    for step in (4, 8):
        a = model_state_dict(load_checkpoint(runs / "eval" / "checkpoints" / f"ep0-ba{step}-rank0.pt"))
        b = model_state_dict(load_checkpoint(runs / "plain" / "checkpoints" / f"ep0-ba{step}-rank0.pt"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (runs / "plain" / "eval.jsonl").exists()
    assert [x["step"] for x in lines(runs / "eval", "eval.jsonl")] == [2, 4, 6, 8]


@pytest.mark.parametrize("run", ["eval", "two"])
def test_in_loop_numbers_on_one_and_two_processes_are_ettin_evals_on_the_same_checkpoints(runs, tiny_data, tmp_path, run):
    """ettin-eval (one process, the same settings) on the checkpoints the run wrote at the evaluated steps."""
    out = tmp_path / "sweep"
    assert eval_main([str(runs / run), "--data", str(tiny_data / "heldout_short"), "--out", str(out), "--seq-len", "64",
                      "--batches", "2", "--batch-size", "4", "--mask-rate", "0.15", "--seed", "1234"]) == 0
    sweep = {r["step"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    logged = {x["step"]: x for x in lines(runs / run, "eval.jsonl")}
    assert sorted(sweep) == [4, 8]
    for step in (4, 8):
        assert logged[step]["scored_tokens"] == sweep[step]["scored_tokens"]
        assert logged[step]["tokens"] == sweep[step]["tokens"]
        assert logged[step]["loss"] == pytest.approx(sweep[step]["loss"], rel=1e-6)
        assert logged[step]["accuracy"] == pytest.approx(sweep[step]["accuracy"], abs=1e-9)


def test_a_stopped_and_resumed_run_writes_the_eval_jsonl_of_one_that_never_stopped(runs, tiny_data, tmp_path):
    """Stopped after the evaluation of step 6 and resumed from the checkpoint of step 4 (as after a kill
    between an evaluation and the next checkpoint): step 6 is evaluated once, with the same numbers."""
    path = write_recipe(tmp_path / "r.yaml", recipe(tiny_data, tmp_path / "r", True))
    run_train(str(path), "train.stop_after=6ba")
    ckpts = tmp_path / "r" / "checkpoints"
    assert [x["step"] for x in lines(tmp_path / "r", "eval.jsonl")] == [2, 4, 6]
    for f in ckpts.glob("ep0-ba6-rank0.pt*"):
        f.unlink()
    (ckpts / "latest-rank0.pt").unlink()
    os.symlink("ep0-ba4-rank0.pt", ckpts / "latest-rank0.pt")
    proc = run_train(str(path))
    assert "resuming from" in proc.stdout and "eval step      6" in proc.stdout
    assert lines(tmp_path / "r", "eval.jsonl") == lines(runs / "eval", "eval.jsonl")


def test_eval_data_that_is_training_data_stops_the_run_before_it_writes(tiny_data, tmp_path):
    bad = tiny_recipe(tiny_data, tmp_path / "bad", "mlm", eval={**EVAL, "sources": [str(tiny_data / "short")]})
    proc = run_train(str(write_recipe(tmp_path / "bad.yaml", bad)), check=False)
    assert proc.returncode != 0 and "is the training source" in proc.stderr
    assert not (tmp_path / "bad").exists()
