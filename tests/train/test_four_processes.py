"""Four processes on CPU (gloo): HSDP (`hybrid`, 2 shard groups of 2) trains as DDP does, and a sharded
checkpoint written by 4 FSDP processes resumes on 2 and on 1 (elastic resume) with the same batches and steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from tests.conftest import composer_launcher, run_ledger, run_train, tiny_recipe, write_recipe

# 4 processes on 2 shared cores: a fixture's runs can take longer than the suite's 900 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# Summing in another order. Every row of this recipe's 9 steps is a full 64-token sequence (shuffle seed 2 of the
# tiny data), so each rank's mean loss is over the same number of tokens and the mean of the ranks' means is
# the mean over the batch: 1, 2 and 4 processes then compute the same loss and gradient, and differ only in
# the order float32 sums are taken (per rank, then across ranks). Measured, full_shard on 4 processes against
# 1 process: losses within 1e-6, weights within 1.2e-7 after 9 steps; 1e-5 is the tolerance
# tests/train/test_parallel.py gives FSDP against DDP.
SUM_ORDER_TOL = 1e-5


def _recipe(data: Path, run_dir: Path, **parallel) -> dict:
    # clm and no dropout: no random numbers drawn per rank, so every world size computes the same function.
    return tiny_recipe(data, run_dir, "clm", data={"shuffle_seed": 2}, model={"attn_out_dropout": 0.0},
                       train={"max_duration": "9ba"}, checkpoint={"interval": "3ba"}, logging={"console_interval": 1},
                       parallel=parallel)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("four")


@pytest.fixture(scope="module")
def hybrid_runs(tiny_data, root) -> Path:
    """hybrid: 4 processes in 2 shard groups of 2, 3 steps. ddp: 1 process, the same 3 steps."""
    recipe = write_recipe(root / "hybrid.yaml", _recipe(tiny_data, root / "hybrid", strategy="hybrid", shard_size=2))
    proc = run_train(str(recipe), "train.stop_after=3ba", launcher=composer_launcher(4), timeout=900)
    assert "4 process(es) on cpu (hybrid (shard groups of 2 x 2 replicas), full checkpoints)" in proc.stdout
    run_train(str(write_recipe(root / "ddp.yaml", _recipe(tiny_data, root / "ddp"))), "train.stop_after=3ba")
    return root


@pytest.fixture(scope="module")
def elastic_runs(tiny_data, root) -> Path:
    """four: full_shard on 4 processes, sharded checkpoints at steps 3, 6, 9 (the one 4-process run the resumes
    read). on2, on1: copies of four without its step-9 checkpoint, resumed on 2 and on 1 process."""
    four = write_recipe(root / "four.yaml", _recipe(tiny_data, root / "four", strategy="full_shard",
                                                    checkpoint_format="sharded"))
    proc = run_train(str(four), launcher=composer_launcher(4), timeout=900)
    assert "4 process(es) on cpu (full_shard, sharded checkpoints)" in proc.stdout
    for name, launcher in (("on2", composer_launcher(2)), ("on1", None)):
        shutil.copytree(root / "four", root / name, symlinks=True)
        for done in (root / name / "checkpoints").glob("ep0-ba9*"):  # as if the 4-process run had stopped at 6
            shutil.rmtree(done) if done.is_dir() else done.unlink()
        latest = root / name / "checkpoints" / "latest-rank0.pt"
        latest.unlink()
        latest.symlink_to("ep0-ba6")
        proc = run_train(str(four), f"run_dir={root / name}", launcher=launcher, timeout=900)
        assert "resuming from" in proc.stdout and "ep0-ba6" in proc.stdout and "step      6" not in proc.stdout
    return root


def test_hybrid_shards_within_groups_and_trains_like_ddp(hybrid_runs):
    runs = hybrid_runs
    hybrid, ddp = run_ledger(runs / "hybrid"), run_ledger(runs / "ddp")
    assert sorted(hybrid) == [1, 2, 3]
    for step in hybrid:
        assert hybrid[step]["rows_sha256"] == ddp[step]["rows_sha256"]
        assert abs(hybrid[step]["loss"] - ddp[step]["loss"]) < SUM_ORDER_TOL, f"step {step}"
    weights = model_state_dict(load_checkpoint(runs / "hybrid" / "checkpoints" / "ep0-ba3-rank0.pt"))
    assert _max_difference(weights, model_state_dict(load_checkpoint(runs / "ddp" / "checkpoints" / "ep0-ba3-rank0.pt"))) < SUM_ORDER_TOL


@pytest.mark.parametrize("resumed", ["on2", "on1"])
def test_sharded_checkpoint_of_four_processes_resumes_on_fewer(elastic_runs, resumed):
    runs = elastic_runs
    ledger, four = run_ledger(runs / resumed), run_ledger(runs / "four")
    assert sorted(ledger) == sorted(four) == list(range(1, 10))  # each step once
    for step in (7, 8, 9):  # the same batches in the same order, and the same steps
        assert ledger[step]["rows_sha256"] == four[step]["rows_sha256"] and ledger[step]["tokens"] == four[step]["tokens"]
        assert abs(ledger[step]["loss"] - four[step]["loss"]) < SUM_ORDER_TOL, f"step {step}"
    assert four[9]["loss"] < four[6]["loss"] - 1e-3  # the resumed steps trained
    end, four_end = load_checkpoint(runs / resumed / "checkpoints" / "ep0-ba9"), load_checkpoint(runs / "four" / "checkpoints" / "ep0-ba9")
    assert end["state"]["timestamp"]["Timestamp"]["token"] == four_end["state"]["timestamp"]["Timestamp"]["token"]
    groups = end["state"]["optimizers"]["StableAdamW"]["param_groups"]
    assert int(groups[0]["step"]) == 9
    assert _max_difference(model_state_dict(end), model_state_dict(four_end)) < SUM_ORDER_TOL
