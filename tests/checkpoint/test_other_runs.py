"""Other runs' folders and repositories (issue 21): a run folder and an exported repository know which run they
hold and refuse another one before anything is written, finished or not; every start's recipe is kept; the only
checkpoint damaged is refused, not replaced by a fresh start; checkpoint.keep counts what is on disk; SIGTERM
ends a run with a checkpoint of the step in flight, from which it resumes bit for bit. Real Composer runs, as
forked children of tests/train/fork_runner.py."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.cli import main as train_main
from ettin_train.export import main as export_main
from tests.conftest import tiny_recipe, write_recipe
from tests.train.fork_runner import Runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    with Runner(tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("tmpdir")) as r:
        yield r


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-ba")[1].split("-")[0]) for p in (run_dir / "checkpoints").glob("ep*-ba*-rank0.pt"))


def test_another_run_is_refused_by_a_run_folder_finished_or_not_and_each_start_keeps_its_recipe(tiny_data, tmp_path,
                                                                                                 runner, capsys):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, run_dir, train={"max_duration": "4ba"},
                                                           checkpoint={"interval": "2ba"}))
    result, log = runner.run(recipe, "train.stop_after=2ba")
    assert result["rc"] == 0, log
    first = (run_dir / "recipes" / "start-001.yaml").read_text()
    assert (run_dir / "recipe.yaml").read_text() == first

    before = snapshot(run_dir)
    result, log = runner.run(recipe, "data.shuffle_seed=5")  # a resume on another data stream
    assert result["rc"] == 1 and len(errors(log)) == 1, log
    assert "run.json" in errors(log)[0] and "shuffle_seed" in errors(log)[0]
    assert snapshot(run_dir) == before  # recipe.yaml included

    result, log = runner.run(recipe)  # the same run resumes and finishes; both starts' recipes are kept
    assert result["rc"] == 0 and "done at step 4" in log, log
    assert (run_dir / "recipes" / "start-001.yaml").read_text() == first
    assert (run_dir / "recipe.yaml").read_text() == (run_dir / "recipes" / "start-002.yaml").read_text()

    before = snapshot(run_dir)
    for overrides, names in ((["model.hidden_size=128"], "model.hidden_size 64 vs 128"),
                             (["objective=clm"], "objective is clm"),
                             (["model.hidden_size=128", "--plan"], "model.hidden_size 64 vs 128")):
        capsys.readouterr()
        assert train_main([str(recipe), *overrides]) == 1, overrides
        out = capsys.readouterr()
        assert len(errors(out.err)) == 1 and names in errors(out.err)[0] and "already complete" not in out.out
    assert snapshot(run_dir) == before
    assert train_main([str(recipe)]) == 0 and "already complete: step 4" in capsys.readouterr().out


def test_the_only_checkpoint_damaged_is_refused_and_nothing_changes(tiny_data, tmp_path, runner):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, run_dir, train={"max_duration": "4ba"},
                                                           checkpoint={"interval": "2ba"}))
    result, log = runner.run(recipe, "train.stop_after=2ba")
    assert result["rc"] == 0, log
    only = run_dir / "checkpoints" / "ep0-ba2-rank0.pt"
    data = bytearray(only.read_bytes())
    data[len(data) // 2] ^= 0x10
    only.write_bytes(bytes(data))
    before = snapshot(run_dir)
    result, log = runner.run(recipe)
    assert result["rc"] == 1 and len(errors(log)) == 1, log
    assert str(only) in errors(log)[0] and "damaged" in errors(log)[0]
    assert snapshot(run_dir) == before  # not renamed, the ledger not cut


def test_checkpoint_keep_counts_the_checkpoints_on_disk_across_starts(tiny_data, tmp_path, runner):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, run_dir, train={"max_duration": "6ba"},
                                                           checkpoint={"interval": "1ba", "keep": 2}))
    result, log = runner.run(recipe, "train.stop_after=3ba")
    assert result["rc"] == 0 and steps_on_disk(run_dir) == [2, 3], log
    result, log = runner.run(recipe)  # a requeue: its checkpoints and the earlier ones count together
    assert result["rc"] == 0 and "done at step 6" in log, log
    assert steps_on_disk(run_dir) == [5, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.complete")) == ["ep0-ba5-rank0.pt.complete",
                                                                                   "ep0-ba6-rank0.pt.complete"]


def test_sigterm_saves_the_step_in_flight_and_the_run_resumes_bitwise(tiny_data, tmp_path, runner):
    sections = dict(train={"max_duration": "8ba"}, checkpoint={"interval": "100ba"}, logging={"console_interval": 1})
    whole = write_recipe(tmp_path / "whole.yaml", tiny_recipe(tiny_data, tmp_path / "whole", **sections))
    assert runner.run(whole)[0]["rc"] == 0
    run_dir = tmp_path / "stopped"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, run_dir, **sections))
    result, log = runner.run(recipe, signal="SIGTERM", signal_on="step      2  loss")  # no checkpoint is due before 8
    assert result["rc"] == 143 and result["signal"] is None, log  # it exited by itself
    stopped = steps_on_disk(run_dir)
    assert len(stopped) == 1 and 2 <= stopped[0] < 8 and "SIGTERM received" in log, log
    assert f"stopped on SIGTERM at step {stopped[0]}" in log and "Traceback" not in log
    result, log = runner.run(recipe)
    assert result["rc"] == 0 and f"continues at step {stopped[0] + 1}" in log and "done at step 8" in log, log
    a = model_state_dict(load_checkpoint(tmp_path / "whole" / "checkpoints" / "ep0-ba8-rank0.pt"))
    b = model_state_dict(load_checkpoint(run_dir / "checkpoints" / "ep0-ba8-rank0.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run_dir / "ledger.jsonl").read_text() == (tmp_path / "whole" / "ledger.jsonl").read_text()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def repo_state(repo: Path) -> tuple:
    return git(repo, "tag", "--list"), git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain"), snapshot(repo)


def test_an_export_repository_holds_one_run_and_a_plain_folder_is_not_one(tiny_data, tmp_path, runner, capsys):
    runs = {}
    for name, steps, model in (("a", 2, {}), ("b", 3, {}), ("wide", 3, {"hidden_size": 32, "intermediate_size": 48})):
        runs[name] = tmp_path / name
        recipe = tiny_recipe(tiny_data, runs[name], train={"max_duration": f"{steps}ba"},
                             checkpoint={"interval": f"{steps}ba"})
        recipe["model"] |= model
        result, log = runner.run(write_recipe(tmp_path / f"{name}.yaml", recipe))
        assert result["rc"] == 0, log

    plain = tmp_path / "model"  # a folder holding someone's model
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"weights")
    (plain / "config.json").write_text("{}")
    before = snapshot(plain)
    assert export_main([str(runs["a"]), "--out", str(plain)]) == 2
    assert "not empty and not a git repository" in capsys.readouterr().err
    assert snapshot(plain) == before and not (plain / ".git").exists()

    other = tmp_path / "project"  # another project's repository
    other.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(other)], check=True)
    (other / "README.md").write_text("mine\n")
    git(other, "add", "README.md")
    git(other, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "mine")
    before = repo_state(other)
    assert export_main([str(runs["a"]), "--out", str(other)]) == 2
    assert "did not make" in capsys.readouterr().err and repo_state(other) == before

    repo = tmp_path / "repo"
    assert export_main([str(runs["a"]), "--out", str(repo)]) == 0
    before = repo_state(repo)
    for name, why in (("b", "lineage"), ("wide", "hidden_size")):  # another run of the same model; another model
        capsys.readouterr()
        assert export_main([str(runs[name]), "--out", str(repo)]) == 2, name
        err = capsys.readouterr().err
        assert "holds another run" in err and why in err and "--allow-other-run" in err, err
        assert repo_state(repo) == before
    assert export_main([str(runs["b"]), "--out", str(repo), "--allow-other-run"]) == 0  # said explicitly
    assert git(repo, "tag", "--list").split() == ["step2", "step3"]
