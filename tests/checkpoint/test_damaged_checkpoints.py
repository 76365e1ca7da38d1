"""Checkpoints damaged after they were written (issue 17): a truncated copy and a flipped byte are detected
against the sha256 the completion marker recorded, ettin-export refuses them, and a resume sets the damaged one
aside (renamed, never deleted) and continues from the one before it to the weights of a run never damaged."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.export import main as export_main
from ettin_train.checkpoint.run_folder import prepare_resume
from tests.conftest import tiny_recipe, write_recipe
from tests.train.fork_runner import Runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    with Runner(tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("tmpdir")) as r:
        yield r


@pytest.fixture(scope="module")
def whole(tiny_data, tmp_path_factory, runner) -> Path:
    """A 6-step run with checkpoints at steps 2, 4 and 6, never damaged."""
    root = tmp_path_factory.mktemp("whole")
    recipe = write_recipe(root / "r.yaml", tiny_recipe(tiny_data, root / "run", train={"max_duration": "6ba"},
                                                       checkpoint={"interval": "2ba"}))
    result, log = runner.run(recipe)
    assert result["rc"] == 0, log
    return root / "run"


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":  # a copy that stopped early
        path.write_bytes(data[: len(data) * 2 // 3])
    else:  # one bit flipped in the middle of the file, where the tensors are: torch.load does not notice
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in items for t in _tensors(v)]


def test_the_marker_records_the_files_sha256(whole):
    """Written by the saver from the bytes as they went to disk: the same as hashing the file afterwards."""
    for step in (2, 4, 6):
        ckpt = whole / "checkpoints" / f"ep0-ba{step}-rank0.pt"
        record = json.loads(Path(f"{ckpt}.complete").read_text())
        assert record == {"step": step, "bytes": ckpt.stat().st_size, "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_checkpoint_is_refused_set_aside_and_the_run_resumes_from_the_one_before(whole, tiny_data, tmp_path,
                                                                                           runner, how, capsys):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, run_dir, train={"max_duration": "6ba"},
                                                           checkpoint={"interval": "2ba"}))
    result, log = runner.run(recipe, "train.stop_after=4ba")
    assert result["rc"] == 0, log
    newest = run_dir / "checkpoints" / "ep0-ba4-rank0.pt"
    good = newest.read_bytes()
    damage(newest, how)
    if how == "flipped":  # the damage a plain load lets through: a tensor silently differs
        intact, hurt = torch.load(whole / "checkpoints" / "ep0-ba4-rank0.pt", weights_only=False), torch.load(newest, weights_only=False)
        assert any(not torch.equal(a, b) for a, b in zip(_tensors(intact), _tensors(hurt)))
    damaged_bytes = newest.read_bytes()

    assert export_main([str(newest), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert str(newest) in err and "damaged since it was written" in err and not (tmp_path / "hf" / "config.json").exists()

    result, log = runner.run(recipe)
    assert result["rc"] == 0, log
    assert "warning: checkpoint ep0-ba4-rank0.pt is damaged" in log and "set aside as ep0-ba4-rank0.pt.damaged" in log
    assert "resuming from" in log and "ep0-ba2-rank0.pt" in log and "continues at step 3" in log
    aside = run_dir / "checkpoints" / "ep0-ba4-rank0.pt.damaged"
    assert aside.read_bytes() == damaged_bytes and damaged_bytes != good  # kept as it was, never deleted
    a = model_state_dict(load_checkpoint(whole / "checkpoints" / "ep0-ba6-rank0.pt"))
    b = model_state_dict(load_checkpoint(run_dir / "checkpoints" / "ep0-ba6-rank0.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run_dir / "ledger.jsonl").read_text() == (whole / "ledger.jsonl").read_text()


@pytest.mark.parametrize("how, resumes_at", [("truncated", 2), ("flipped", 4)])
def test_verify_digest_false_checks_only_the_size(whole, tmp_path, how, resumes_at):
    """checkpoint.verify_digest: false (huge checkpoints, slow disks) still catches a truncated file by its size,
    but no longer a flipped byte: the trade the key makes."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(whole / "checkpoints", folder, symlinks=True)
    (folder / "ep0-ba6-rank0.pt").unlink()  # step 4 the newest, as in a run stopped there
    (folder / "ep0-ba6-rank0.pt.complete").unlink()
    damage(folder / "ep0-ba4-rank0.pt", how)
    assert prepare_resume(folder, verify_digest=False).name == f"ep0-ba{resumes_at}-rank0.pt"
    assert (folder / "latest-rank0.pt").resolve().name == f"ep0-ba{resumes_at}-rank0.pt"
