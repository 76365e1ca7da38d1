"""Each Composer shim (src/ettin_train/shims.py) against Composer 0.32.1's own functions: its checkpoint loads go
through the safe loader, and its checkpoint writes record the file's sha256."""

from __future__ import annotations

import builtins
import datetime
import hashlib

import pytest
import torch
from composer.utils import checkpoint as composer_checkpoint

from ettin_train import shims
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError


class _RunsCode:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_composers_checkpoint_load_refuses_a_code_running_pickle(tmp_path):
    """safe_torch_load is what Composer's autoresume and load_path call (composer.utils.checkpoint._restore_checkpoint)."""
    marker = tmp_path / "ran"
    torch.save({"state": {"model": {"w": torch.ones(2)}, "callbacks": {"X": _RunsCode(marker)}}}, tmp_path / "evil.pt")
    plain = {"state": {"model": {"w": torch.arange(3.0)}, "timestamp": {"Timestamp": {"total_wct": datetime.timedelta(seconds=3)}}}}
    torch.save(plain, tmp_path / "plain.pt")
    shims.route_checkpoint_loads(trust_pickles=False)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*builtins\.exec"):
        composer_checkpoint.safe_torch_load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    loaded = composer_checkpoint.safe_torch_load(str(tmp_path / "plain.pt"))
    assert torch.equal(loaded["state"]["model"]["w"], plain["state"]["model"]["w"])
    shims.route_checkpoint_loads(trust_pickles=True)  # checkpoint.trust_pickles: true
    composer_checkpoint.safe_torch_load(str(tmp_path / "evil.pt"))
    assert marker.read_text() == "ran"
    shims.route_checkpoint_loads(trust_pickles=False)


def test_composers_checkpoint_write_records_the_files_sha256(tmp_path):
    shims.digest_checkpoint_writes()
    path = str(tmp_path / "ep0-ba1-rank0.partial.pt")
    state = {"state": {"model": {"w": torch.randn(256, 256)}}, "rng": [{"python": (3, (1, 2), None)}]}
    composer_checkpoint._write_checkpoint_file(state, path)
    with open(path, "rb") as f:
        assert shims.written_digest(path) == hashlib.sha256(f.read()).hexdigest()
    assert shims.written_digest(path) is None  # taken once
    assert torch.equal(torch.load(path, weights_only=True)["state"]["model"]["w"], state["state"]["model"]["w"])
