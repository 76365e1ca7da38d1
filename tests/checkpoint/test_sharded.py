"""Sharded checkpoints (torch.distributed.checkpoint folders of an FSDP run) under the policy of checkpoint files
(issue 21): a real one opens without any opt-in, to what torch's own unpickling gives; a crafted `.metadata` or a
crafted non-tensor entry that would run code is refused naming the folder by every path that opens one, and its
code never runs; the clock is read without the tensors; `checkpoint.load_path` can name one."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.checkpoint.run_folder import read_clock
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError
from ettin_train.checkpoint.sharded import METADATA_CLASSES
from ettin_train.export import main as export_main
from tests.checkpoint.test_safe_load import WritesMarker
from tests.conftest import run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow
FSDP = {"strategy": "full_shard", "checkpoint_format": "sharded"}


def torch_reads(folder: Path) -> dict:
    """torch's own reading of a sharded checkpoint (plain pickle for the metadata, full unpickle of each entry):
    the oracle for what the folder holds, and what runs a crafted folder's code."""
    checkpoint: dict = {}
    _load_state_dict(checkpoint, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return checkpoint


def plant(real: Path, out: Path, marker: Path, where: str) -> Path:
    """A copy of the sharded checkpoint `real` at `out` whose `.metadata` (where="metadata") or one of whose
    non-tensor entries (where="entry", a callback's state) runs code when unpickled."""
    if where == "metadata":
        shutil.copytree(real, out)
        with open(real / ".metadata", "rb") as f:
            md = pickle.load(f)
        md.storage_meta.modules = [WritesMarker(marker)]
        with open(out / ".metadata", "wb") as f:
            pickle.dump(md, f)
    else:
        state = torch_reads(real)
        state["state"]["callbacks"]["Innocent"] = {"payload": WritesMarker(marker)}
        dcp_save(state, storage_writer=FileSystemWriter(str(out)), no_dist=True)
    return out


@pytest.fixture(scope="module")
def sharded(tiny_data, tmp_path_factory) -> Path:
    """A real 2-step FSDP run (1 process, full_shard) with sharded checkpoints after steps 1 and 2; its recipe."""
    root = tmp_path_factory.mktemp("sharded")
    recipe = tiny_recipe(tiny_data, root / "run", train={"max_duration": "2ba"}, checkpoint={"interval": "1ba"}, parallel=FSDP)
    run_train(str(write_recipe(root / "fsdp.yaml", recipe)))
    assert (root / "run" / "checkpoints" / "ep0-ba2" / ".metadata").is_file()
    return root


def test_a_sharded_checkpoint_opens_without_opt_in_and_the_allowlist_is_what_its_metadata_carries(sharded):
    folder = sharded / "run" / "checkpoints" / "ep0-ba2"

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            names.add((module, name))
            return super().find_class(module, name)

    names: set = set()
    with open(folder / ".metadata", "rb") as f:
        Recording(f).load()
    dtypes = {(m, n) for m, n in names if m == "torch" and isinstance(getattr(torch, n), torch.dtype)}
    assert names - dtypes == METADATA_CLASSES

    loaded, full = load_checkpoint(folder), torch_reads(folder)
    assert all(torch.equal(a, b) for a, b in zip(model_state_dict(loaded).values(), model_state_dict(full).values()))
    assert loaded["state"]["timestamp"] == full["state"]["timestamp"]  # timedeltas included
    assert loaded["state"]["callbacks"]["RunMetadata"] == full["state"]["callbacks"]["RunMetadata"]
    ours, theirs = loaded["rng"][0]["numpy"], full["rng"][0]["numpy"]
    assert ours[0] == theirs[0] == "MT19937" and (ours[1] == theirs[1]).all() and ours[2:] == theirs[2:]


@pytest.mark.parametrize("where", ["metadata", "entry"])
def test_a_code_running_sharded_checkpoint_is_refused_by_the_loader_and_ettin_export(sharded, tmp_path, capsys, where):
    marker = tmp_path / "ran"
    evil = plant(sharded / "run" / "checkpoints" / "ep0-ba2", tmp_path / "ep0-ba2", marker, where)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint(evil)
    assert "builtins.exec" in str(refused.value) and str(evil) in str(refused.value) and len(str(refused.value).splitlines()) == 1
    assert not marker.exists()
    assert export_main([str(evil), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "refused to open checkpoint" in err and "builtins.exec" in err and str(evil) in err and "--trust-pickles" in err
    assert not marker.exists()
    load_checkpoint(evil, trust_pickles=True)  # the opt-in unpickles it whole: the folder really would have run code
    assert marker.read_text() == "the pickle ran code"


@pytest.mark.parametrize("how, where", [("resume", "entry"), ("plan", "metadata"), ("plan", "entry"),
                                        ("init.checkpoint", "metadata"), ("checkpoint.load_path", "entry")])
def test_training_refuses_a_code_running_sharded_checkpoint_before_anything_runs(sharded, tiny_data, tmp_path, how, where):
    """A run folder's sharded checkpoint (autoresume, and `train.py --plan`, which reads its clock), a phase start and a
    full resume from one: each stops with one line naming the folder (or, --plan of a crafted entry, never opens
    that entry), and the code never runs."""
    marker = tmp_path / "ran"
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, run_dir, train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"}, parallel=FSDP)
    real = sharded / "run" / "checkpoints" / "ep0-ba2"
    if how in ("resume", "plan"):
        evil = plant(real, run_dir / "checkpoints" / "ep0-ba2", marker, where)
        (run_dir / "checkpoints" / "latest-rank0.pt").symlink_to(evil.name)
        overrides = ["--plan"] if how == "plan" else []
    else:
        evil = plant(real, tmp_path / "downloaded", marker, where)
        overrides = [f"{how}={evil}"]
    proc = run_train(str(write_recipe(tmp_path / "r.yaml", recipe)), *overrides, check=False)
    assert not marker.exists(), proc.stderr[-3000:]
    assert not (run_dir / "ledger.jsonl").exists()  # nothing trained
    if (how, where) == ("plan", "entry"):  # --plan reads only the clock's entries: the crafted one is never opened
        assert proc.returncode == 0 and "already complete" not in proc.stdout, proc.stderr[-3000:]
        return
    assert proc.returncode != 0, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and "builtins.exec" in errors[-1] and str(evil) in errors[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_the_clock_of_a_sharded_checkpoint_is_read_without_its_tensors(sharded):
    """`read_clock` (run at every train.py start, --plan included, by `finished_run`) reads the metadata and the
    clock's entries: a few percent of this tiny folder, a vanishing part of a real one (counted by the kernel: the
    bytes this process read, /proc/self/io rchar)."""
    folder = sharded / "run" / "checkpoints" / "ep0-ba2"

    def bytes_read() -> int:
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])

    read_clock(folder)  # imports and first-use costs out of the count
    before = bytes_read()
    clock = read_clock(folder)
    spent = bytes_read() - before
    size = sum(f.stat().st_size for f in folder.iterdir())
    metadata, tensors = (folder / ".metadata").stat().st_size, size - (folder / ".metadata").stat().st_size
    assert clock == {"batch": 2, "token": int(torch_reads(folder)["state"]["timestamp"]["Timestamp"]["token"])}
    assert spent < metadata + 0.05 * tensors, (spent, metadata, size)


def test_checkpoint_load_path_names_a_sharded_folder_and_the_run_continues_from_it(sharded, tiny_data, tmp_path):
    """A full resume of another run's sharded checkpoint in a new run folder: it continues at step 3 from the folder's
    clock and weights; a run that does not read sharded checkpoints (DDP) is refused in one line."""
    folder = sharded / "run" / "checkpoints" / "ep0-ba2"
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, run_dir, train={"max_duration": "3ba"}, checkpoint={"interval": "1ba"}, parallel=FSDP)
    proc = run_train(str(write_recipe(tmp_path / "r.yaml", recipe)), f"checkpoint.load_path={folder}")
    assert f"continuing from {folder}" in proc.stdout and "continues at step 3" in proc.stdout, proc.stdout
    assert [line.split('"step": ')[1].split(",")[0] for line in (run_dir / "ledger.jsonl").read_text().splitlines()] == ["3"]
    end = load_checkpoint(run_dir / "checkpoints" / "ep0-ba3")
    assert int(end["state"]["timestamp"]["Timestamp"]["batch"]) == 3
    assert int(end["state"]["optimizers"]["StableAdamW"]["param_groups"][0]["step"]) == 3  # Adam went on from step 2

    ddp = tiny_recipe(tiny_data, tmp_path / "ddp", train={"max_duration": "3ba"})
    proc = run_train(str(write_recipe(tmp_path / "ddp.yaml", ddp)), f"checkpoint.load_path={folder}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint.load_path:")
    assert "parallel.checkpoint_format: sharded" in proc.stderr and not (tmp_path / "ddp").exists()
