"""A run's checkpoint folder as the atomic saver (train/reliability.py) leaves it, read and repaired
without Composer.

A checkpoint is written as `ep*-ba*-rank0.partial.pt`, flushed to disk, renamed to `NAME` and then marked complete
by `NAME.complete` (its size and step); only then does `latest-rank0.pt` move to it, by an atomic
symlink swap. `prepare_resume` runs before every start (preflight.py): it points `latest-rank0.pt` at the
newest checkpoint whose marker matches, and moves anything newer out of the way (`.partial` files are
deleted, unmarked ones renamed `.incomplete`), so a run killed at any moment resumes from the last
complete checkpoint. See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

MARKER = ".complete"
_CHECKPOINT = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """What one checkpoint takes on disk: the weights and Adam's two moments, plus 5% for the rest."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(params * 3 * 1.05)


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder` whose marker exists and names their size, oldest first."""
    found = []
    for f in folder.glob("ep*-ba*-rank0.pt"):
        m, marker = _CHECKPOINT.match(f.name), f.with_name(f.name + MARKER)
        if m and marker.is_file() and f.is_file():
            try:
                ok = json.loads(marker.read_text()).get("bytes") == f.stat().st_size
            except (ValueError, OSError):
                ok = False
            if ok:
                found.append((int(m.group(2)), f))
    return [f for _, f in sorted(found)]


def prepare_resume(folder: Path) -> Path | None:
    """Rank 0, before the Trainer is built: make `latest-rank0.pt` name the newest complete checkpoint
    and move newer, incomplete files aside. A folder without any marker (a run from before markers, or
    the original Ettin checkpoints) is left as it is. Returns the checkpoint a resume will load."""
    if not folder.is_dir():
        return None
    for partial in [*folder.glob("*.partial.pt"), *folder.glob("*.partial")]:
        partial.unlink()  # by construction never complete: a checkpoint is renamed only once written
    complete = complete_checkpoints(folder)
    if not complete and not list(folder.glob(f"*{MARKER}")):
        latest = folder / "latest-rank0.pt"
        return latest if latest.exists() else None
    newest = complete[-1] if complete else None
    newest_step = int(_CHECKPOINT.match(newest.name).group(2)) if newest else -1
    for f in folder.glob("ep*-ba*-rank0.pt"):
        if f not in complete and int(_CHECKPOINT.match(f.name).group(2)) > newest_step:
            f.rename(f.with_name(f.name + ".incomplete"))  # kept for inspection; Composer would refuse it
    latest = folder / "latest-rank0.pt"
    if newest is None:
        latest.unlink(missing_ok=True)
    elif not latest.is_symlink() or Path(os.readlink(latest)).name != newest.name:
        atomic_symlink(newest.name, latest)
    return newest


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` in one rename: a reader sees the old target or the new one, never none."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
