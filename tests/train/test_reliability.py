"""Reliability (issue #8) on real Composer runs: SIGKILL at random points (also inside the checkpoint
write) and resume to the same weights; NaN losses stop or skip; loss spikes are logged; streaming's
leftovers and loader workers are gone after a kill. Attempts run as forked children of
tests/train/fork_runner.py, so each pays for training, not for importing torch."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.checkpoint.run_folder import MARKER
from tests.conftest import tiny_recipe, write_recipe
from tests.train.fork_runner import Runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    with Runner(tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("tmpdir")) as r:
        yield r


def _latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest-rank0.pt"
    return int(os.readlink(latest).split("-ba")[1].split("-")[0]) if latest.is_symlink() else 0


def _weights(path: Path) -> dict:
    return model_state_dict(load_checkpoint(path))


def test_sigkill_at_random_points_then_resume_reaches_the_uninterrupted_weights(tiny_data, tmp_path, runner):
    """>= 10 SIGKILLs in a row at seeded random points (inside the checkpoint write, between its rename,
    marker and symlink, after a backward pass, or at a random time); after each, every visible checkpoint
    loads and latest-rank0.pt names a complete one; the last resume ends bitwise where a run that was
    never killed ends."""
    recipe = tiny_recipe(tiny_data, tmp_path / "whole", checkpoint={"interval": "1ba"})
    whole = write_recipe(tmp_path / "whole.yaml", recipe)
    assert runner.run(whole)[0]["rc"] == 0

    run_dir = tmp_path / "killed"
    killed = write_recipe(tmp_path / "killed.yaml", recipe | {"run_dir": str(run_dir)})
    rng = random.Random(8)
    kills, points_hit = 0, []
    while kills < 10:
        resume = _latest_step(run_dir)
        point = rng.choice(["write", "write", "rename", "marker", "link", "backward", "time"])
        step = min(12, resume + rng.randint(1, 3))
        if point == "time":
            result, log = runner.run(killed, kill_after=rng.uniform(0.3, 4.0))
        else:
            result, log = runner.run(killed, fault=f"{point}@{step}")
        if result["signal"] is None:  # a timer that fired after the run ended: not a kill
            assert result["rc"] == 0, log
            break
        kills, points_hit = kills + 1, points_hit + [point]
        visible = sorted((run_dir / "checkpoints").glob("ep*-ba*-rank0.pt"))
        for f in visible:
            torch.load(f, map_location="cpu", weights_only=False)  # no visible checkpoint fails to load
        if (run_dir / "checkpoints" / "latest-rank0.pt").exists():
            latest = (run_dir / "checkpoints" / "latest-rank0.pt").resolve()
            assert Path(str(latest) + MARKER).is_file(), f"latest-rank0.pt -> {latest.name}, which is not marked complete"
    assert kills >= 10 and "write" in points_hit, points_hit
    result, log = runner.run(killed)
    assert result["rc"] == 0 and "done at step 12" in log, log
    a, b = _weights(tmp_path / "whole" / "checkpoints" / "latest-rank0.pt"), _weights(run_dir / "checkpoints" / "latest-rank0.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run_dir / "ledger.jsonl").read_text() == (tmp_path / "whole" / "ledger.jsonl").read_text()
    assert not list((run_dir / "checkpoints").glob("*.partial*"))  # swept by the resumes


def test_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tiny_data, tmp_path, runner):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run"))
    result, log = runner.run(recipe, fault="nan@6")
    assert result["rc"] == 1, log
    last = tmp_path / "run" / "checkpoints" / "ep0-ba4-rank0.pt"
    line = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "at step 6 (data step 6)" in line[0] and str(last) in line[0], log
    assert sorted(p.name for p in last.parent.glob("ep*.pt")) == ["ep0-ba4-rank0.pt"]
    assert all(torch.isfinite(v).all() for v in _weights(last).values())  # the last good checkpoint loads


def test_nan_loss_skipped_when_configured_and_spikes_logged(tiny_data, tmp_path, runner):
    """reliability.nonfinite=skip: step 6 leaves weights and Adam moments as they were and is counted;
    a loss 8x the window's mean at step 10 is reported as a spike, and no other step is."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run", checkpoint={"interval": "1ba"},
                                                           reliability={"nonfinite": "skip", "spike_window": 3, "spike_zscore": 4.0}))
    result, log = runner.run(recipe, fault="nan@6,spike@10")
    assert result["rc"] == 0 and "done at step 12" in log, log
    assert "at step 6 (data step 6): step skipped (1 skipped so far)" in log
    spikes = [ln for ln in log.splitlines() if "loss spike" in ln]
    assert len(spikes) == 1 and "loss spike at step 10" in spikes[0], log
    ckpts = tmp_path / "run" / "checkpoints"
    before, after = load_checkpoint(ckpts / "ep0-ba5-rank0.pt"), load_checkpoint(ckpts / "ep0-ba6-rank0.pt")
    assert all(torch.equal(v, model_state_dict(after)[k]) for k, v in model_state_dict(before).items())
    sa, sb = (c["state"]["optimizers"]["StableAdamW"]["state"] for c in (before, after))
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    final = load_checkpoint(ckpts / "latest-rank0.pt")["state"]["callbacks"]
    assert final["NonFiniteGuard"]["skipped"] == 1 and final["SpikeMonitor"]["spikes"] == 1


def _streaming_leftovers(tmpdir: Path) -> set[str]:
    """Streaming's shared memory and lock files that no live process holds: what a killed run leaves."""
    from ettin_train.data.streaming_leftovers import STREAMING_SHM, paths_in_use

    found = {str(p) for p in Path("/dev/shm").iterdir() if STREAMING_SHM.match(p.name)}
    found |= {str(p) for p in tmpdir.iterdir() if STREAMING_SHM.match(p.name) and p.name.endswith("filelock")}
    return found - paths_in_use()


def test_a_killed_run_leaves_no_workers_and_the_next_run_removes_its_shared_memory(tiny_data, tmp_path, runner):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run", data={"num_workers": 2},
                                                           train={"max_duration": "6ba"}))
    # Forks of tests/train/fork_runner.py other than this attempt's: every fork server of this and other test
    # sessions (conftest.run_train has one) and their attempts, whose parent is a live fork server.
    forks = lambda: {p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith("tests/train/fork_runner.py")}  # noqa: E731
    before = forks()
    result, log = runner.run(recipe, fault="backward@3")
    assert result["signal"] == 9, log
    orphans = lambda: [p for p in forks() - before - {str(runner.proc.pid)} if _ppid(p) not in forks()]  # noqa: E731
    deadline = time.monotonic() + 30
    while orphans() and time.monotonic() < deadline:  # loader workers notice their parent's death and exit
        time.sleep(0.5)
    assert not orphans()
    # Whether this kill left streaming's shared memory depends on where the loader opened it (Python's resource
    # tracker unlinks some of it once every holder is gone), so plant what a killed run leaves: a segment and a
    # lock file in streaming's naming that no live process holds.
    left = {Path("/dev/shm") / "000977_ettin_test_locals", runner.tmpdir / "000977_ettin_test_filelock"}
    for path in left:
        path.write_bytes(b"\0" * 8)
    assert {str(p) for p in left} <= _streaming_leftovers(runner.tmpdir)
    result, log = runner.run(recipe)
    assert result["rc"] == 0 and "done at step 6" in log, log
    # The next run's start removed the killed run's leftovers, and its own end removed its lock files.
    assert not any(p.exists() for p in left) and not _streaming_leftovers(runner.tmpdir)
    assert not list(runner.tmpdir.glob("*filelock"))


def _ppid(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_nan_on_two_processes_stops_both_ranks_before_the_step(tiny_data, tmp_path):
    """Through the Composer launcher on gloo: the ranks agree on the bad step (one all-reduced flag), both
    exit, and the checkpoint before it is the newest and loads."""
    from tests.conftest import ROOT, composer_launcher, run_train

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run", train={"max_duration": "6ba"},
                                                           checkpoint={"interval": "2ba"}))
    # tests/train/faults.py is train.py with the fault injector among the callbacks
    proc = run_train("nan@3", str(recipe), launcher=composer_launcher(), check=False,
                     script=ROOT / "tests" / "train" / "faults.py")
    assert proc.returncode != 0
    assert "at step 3" in proc.stderr and "ep0-ba2-rank0.pt" in proc.stderr, proc.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("ep*.pt")) == ["ep0-ba2-rank0.pt"]
    assert load_checkpoint(ckpts / "latest-rank0.pt")["state"]["timestamp"]["Timestamp"]["batch"] == 2
