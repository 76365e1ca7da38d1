"""Safe checkpoint loading (issue 17): real checkpoints of both layouts open weights-only without any opt-in, the
allowlist is exactly the types they carry, and a planted pickle that would run code is refused, naming the type and
the file, without running it, by every tool that opens a checkpoint."""

from __future__ import annotations

import builtins
import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, allowed_names, safe_load
from ettin_train.export import main as export_main
from tests.checkpoint.test_resume import original_layout
from tests.conftest import ROOT, run_train, tiny_recipe, write_recipe


class WritesMarker:
    """Unpickling this runs `exec`, which writes `path`: what a malicious checkpoint would do (with worse code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.exec, (f"open({self.path!r}, 'w').write('the pickle ran code')",)


def plant(checkpoint: dict, out: Path, marker: Path) -> Path:
    """`checkpoint` with a code-running object among its callbacks' states, saved as a real file at `out`."""
    evil = {**checkpoint, "state": {**checkpoint["state"], "callbacks": {**checkpoint["state"]["callbacks"],
                                                                          "Innocent": {"payload": WritesMarker(marker)}}}}
    torch.save(evil, out)
    return out


@pytest.fixture(scope="module")
def ours(tiny_data, tmp_path_factory) -> Path:
    """A real 2-step Composer run of ours; its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("ours")
    recipe = tiny_recipe(tiny_data, root / "run", train={"max_duration": "2ba"}, checkpoint={"interval": "1ba"})
    run_train(str(write_recipe(root / "r.yaml", recipe)))
    return root / "run" / "checkpoints" / "ep0-ba2-rank0.pt"


@pytest.mark.slow
def test_both_layouts_open_weights_only_and_the_allowlist_is_what_they_carry(ours, tmp_path):
    """Ours (Composer 0.32.1) and the original runs' layout (section 3.5) load without trust_pickles, to the same
    values a full unpickle gives; the names their pickles ask for, beyond what torch allows by itself, are the
    allowlist (less numpy 1's spelling of _reconstruct and the dtype class, which pickles name differently)."""
    trusted = torch.load(ours, map_location="cpu", weights_only=False)
    original = tmp_path / "ep0-ba2-rank0.pt"
    torch.save(original_layout(trusted), original)
    carried = set()
    for path in (ours, original):
        loaded, full = load_checkpoint(path), torch.load(path, map_location="cpu", weights_only=False)
        assert all(torch.equal(a, b) for a, b in zip(model_state_dict(loaded).values(), model_state_dict(full).values()))
        assert loaded["state"]["timestamp"] == full["state"]["timestamp"]  # timedeltas included
        assert (loaded["rng"][0]["numpy"][1] == full["rng"][0]["numpy"][1]).all()  # numpy's MT19937 state
        carried |= set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    spelled_otherwise = {"numpy.core.multiarray._reconstruct"}
    assert carried == allowed_names() - spelled_otherwise


@pytest.mark.slow
def test_a_checkpoint_written_with_numpy_1_opens(ours, tmp_path):
    """numpy 1 (which the original runs may have had) pickles the RNG array's rebuild as
    numpy.core.multiarray._reconstruct: the same file with that spelling loads weights-only."""
    legacy = io.BytesIO()  # the pre-zip format: one pickle stream, where a global is plain text
    torch.save(torch.load(ours, map_location="cpu", weights_only=False), legacy, _use_new_zipfile_serialization=False)
    data = legacy.getvalue()
    assert b"numpy._core.multiarray\n_reconstruct" in data
    (tmp_path / "np1.pt").write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    loaded = safe_load(tmp_path / "np1.pt", mmap=True)  # a legacy file cannot be mapped: read whole
    assert loaded["rng"][0]["numpy"][0] == "MT19937" and loaded["rng"][0]["numpy"][1].shape == (624,)


@pytest.mark.slow
def test_a_code_running_pickle_is_refused_by_name_and_runs_nothing(ours, tmp_path):
    marker = tmp_path / "ran"
    evil = plant(torch.load(ours, map_location="cpu", weights_only=False), tmp_path / "ep0-ba2-rank0.pt", marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint(evil)
    assert "builtins.exec" in str(refused.value) and str(evil) in str(refused.value)
    assert "checkpoint.trust_pickles" in str(refused.value) and not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        safe_load(evil, mmap=True)
    assert not marker.exists()
    # the opt-in unpickles it whole: the file really would have run code
    load_checkpoint(evil, trust_pickles=True)
    assert marker.read_text() == "the pickle ran code"


@pytest.mark.slow
def test_ettin_export_refuses_a_code_running_checkpoint_unless_trusted(ours, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = plant(torch.load(ours, map_location="cpu", weights_only=False), tmp_path / "ep0-ba2-rank0.pt", marker)
    assert export_main([str(evil), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "refused to open checkpoint" in err and "builtins.exec" in err and str(evil) in err and "--trust-pickles" in err
    assert not marker.exists()
    assert export_main([str(evil), "--out", str(tmp_path / "hf"), "--trust-pickles"]) == 0
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume", "init.checkpoint", "checkpoint.load_path"])
def test_training_refuses_a_code_running_checkpoint_before_anything_runs(ours, tiny_data, tmp_path, how):
    """A run folder's newest complete checkpoint (autoresume), a phase start and a full resume from a file: each
    stops with one line naming the type and the file, and the pickle's code never runs."""
    marker = tmp_path / "ran"
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, run_dir, train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"})
    full = torch.load(ours, map_location="cpu", weights_only=False)
    if how == "resume":
        (run_dir / "checkpoints").mkdir(parents=True)
        evil = plant(full, run_dir / "checkpoints" / "ep0-ba2-rank0.pt", marker)
        (run_dir / "checkpoints" / "latest-rank0.pt").symlink_to(evil.name)
        overrides = []
    else:
        evil = plant(full, tmp_path / "downloaded.pt", marker)
        overrides = [f"{how}={evil}"]
    proc = run_train(str(write_recipe(tmp_path / "r.yaml", recipe)), *overrides, check=False)
    assert proc.returncode != 0, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and "builtins.exec" in errors[-1] and str(evil) in errors[-1], proc.stderr[-3000:]
    assert not marker.exists() and not (run_dir / "ledger.jsonl").exists()  # nothing ran, nothing trained


class Dtype:
    """Pickles as numpy.dtype(*args) followed, if given, by the dtype's __setstate__(state): what a file can ask for."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return (np.dtype, *self.reduce)


class Array:
    """Pickles as numpy pickles an array (`_reconstruct`, then `__setstate__`), with any dtype and data."""

    def __init__(self, shape, dtype, data):
        self.state = (1, shape, dtype, False, data)

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state)


CRAFTED_NUMPY = {
    "object array": Array((2,), Dtype(("O8", False, True)), [1, 2]),
    "structured array": Array((2,), Dtype(([("a", "<u4"), ("b", "<u4")], False, True)), b"\x01" * 16),
    # __setstate__ gives numpy's uint32 dtype the object flag: its bytes become pointers (attacker-chosen: 0x41414141)
    "uint32 given object flags": Array((2,), Dtype(("u4", False, True), (3, "|", None, None, None, -1, -1, 1)), b"\x41" * 8),
}
LOAD_AND_PRINT = """
import sys
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, safe_load
try:
    loaded = safe_load(sys.argv[1])
except UnsafeCheckpointError as e:
    print("refused:", e)
else:
    print("loaded:", repr(loaded), flush=True)
"""


@pytest.mark.parametrize("case", sorted(CRAFTED_NUMPY))
def test_a_crafted_numpy_array_in_the_rng_state_is_refused_naming_the_file(tmp_path, case):
    """The RNG state's array is rebuilt from raw bytes as uint32 only: an object or structured dtype, or numpy's
    uint32 dtype with a crafted state, never comes out of the load (in a child: on a loader that lets one through,
    printing it follows the crafted pointers)."""
    evil = tmp_path / "ep0-ba2-rank0.pt"
    torch.save({"state": {"model": {"w": torch.ones(2)}}, "rng": [{"numpy": ("MT19937", CRAFTED_NUMPY[case], 0, 0, 0.0)}]}, evil)
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PRINT, str(evil)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("refused:"), (proc.returncode, proc.stdout[-500:], proc.stderr[-1000:])
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1 and str(evil) in line and "numpy dtype" in line and "trust_pickles" in line


def test_the_rng_state_of_numpy_1_and_2_opens_as_the_same_uint32_array(tmp_path):
    """numpy's MT19937 state, pickled by numpy 2 (`numpy._core`) and with numpy 1's name (`numpy.core`), in both
    torch formats, loads weights-only to a plain uint32 array equal to the saved one, which numpy accepts back."""
    state = np.random.RandomState(7).get_state()
    for zip_format in (True, False):
        buffer = io.BytesIO()
        torch.save({"rng": [{"numpy": state}]}, buffer, _use_new_zipfile_serialization=zip_format)
        # a global is plain text only in the legacy format: numpy 1's name is written there
        for spelling in (b"numpy._core.multiarray",) if zip_format else (b"numpy._core.multiarray", b"numpy.core.multiarray"):
            data = buffer.getvalue().replace(b"numpy._core.multiarray\n", spelling + b"\n")
            (tmp_path / "rng.pt").write_bytes(data)
            loaded = safe_load(tmp_path / "rng.pt")["rng"][0]["numpy"]
            assert type(loaded[1]) is np.ndarray and loaded[1].dtype == np.uint32 and loaded[1].flags.c_contiguous
            assert loaded[0] == "MT19937" and (loaded[1] == state[1]).all() and loaded[2:] == state[2:]
            rng = np.random.RandomState()
            rng.set_state(loaded)
            assert rng.random() == np.random.RandomState(7).random()
