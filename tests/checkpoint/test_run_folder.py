"""A finished run started again (a Slurm requeue, a pipeline step run twice) says it is complete and exits 0
without building the trainer; a run whose recipe grew continues."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def test_a_finished_run_run_again_is_complete_and_a_longer_one_continues(tiny_data, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, run, train={"max_duration": "4ba"},
                                                           checkpoint={"interval": "2ba"}))
    run_train(str(recipe))
    final = run / "checkpoints" / "ep0-ba4-rank0.pt"
    tokens = torch.load(final, weights_only=False)["state"]["timestamp"]["Timestamp"]["token"]
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    ledger = (run / "ledger.jsonl").read_text()

    again = run_train(str(recipe))  # check=True: exit status 0
    assert "already complete: step 4" in again.stdout and f"{tokens:,} tokens" in again.stdout
    assert str(final) in again.stdout
    assert "continues at step" not in again.stdout and "parameters" not in again.stdout  # no trainer was built
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    assert (run / "ledger.jsonl").read_text() == ledger

    plan = json.loads(run_train(str(recipe), "--plan", "--json").stdout)
    assert plan["complete"] == {"step": 4, "tokens": tokens, "checkpoint": str(final)}

    longer = run_train(str(recipe), "train.max_duration=6ba")
    assert "continues at step 5" in longer.stdout and "done at step 6" in longer.stdout
    assert (run / "checkpoints" / "ep0-ba6-rank0.pt").is_file()
