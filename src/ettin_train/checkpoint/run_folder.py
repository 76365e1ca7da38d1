"""A run's checkpoint folder as the atomic saver (train/reliability.py) leaves it, read and repaired
without Composer.

A checkpoint is written as `ep*-ba*-rank0.partial.pt`, flushed to disk, renamed to `NAME` and then marked complete
by `NAME.complete` (its size, step and sha256: checkpoint/digest.py); only then does `latest-rank0.pt` move to it, by an atomic
symlink swap. `prepare_resume` runs before every start (preflight.py): it points `latest-rank0.pt` at the
newest checkpoint whose marker matches, and moves anything newer out of the way (`.partial` files are
deleted, unmarked ones renamed `.incomplete`, damaged ones `.damaged`), so a run killed at any moment resumes from the last
complete checkpoint. See docs/reliability.md.

`finished_run` says whether the checkpoint autoresume would load has reached the recipe's `train.max_duration`: a
finished run started again (a Slurm requeue, a pipeline step run twice) is then reported complete by train.py,
which exits 0 without building the trainer (Composer would refuse a clock at max_duration). A recipe whose
max_duration grew is not finished and continues. Nothing here imports Composer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ettin_train.checkpoint import digest
from ettin_train.checkpoint.composer_format import CHECKPOINT_NAME, LATEST, is_sharded
from ettin_train.checkpoint.digest import MARKER
from ettin_train.checkpoint.run_identity import RunFolderError
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from ettin_train.checkpoint.sharded import load_sharded
from ettin_train.config import Duration, Recipe


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """What one checkpoint takes on disk: the weights and Adam's two moments, plus 5% for the rest."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(params * 3 * 1.05)


def marked_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder` that have a completion marker, oldest first."""
    found = [(int(m.group(2)), f) for f in folder.glob("ep*-ba*-rank0.pt")
             if (m := CHECKPOINT_NAME.match(f.name)) and f.is_file() and digest.read_marker(f) is not None]
    return [f for _, f in sorted(found)]


def prepare_resume(folder: Path, verify_digest: bool = True) -> Path | None:
    """Rank 0, before the Trainer is built: make `latest-rank0.pt` name the newest complete checkpoint
    and move newer, incomplete files aside. The newest marked checkpoint is checked against its marker (size and
    sha256; the size only with `verify_digest` false); one that no longer matches was damaged after it was
    written: it is renamed `.damaged` (never deleted), said so, and the one before it is checked instead; when no
complete one is left, RunFolderError and nothing changes (a fresh start would cut the run's ledger). A folder
    without any marker (a run from before markers, or the original Ettin checkpoints) is left as it is. Returns
    the checkpoint a resume will load."""
    if not folder.is_dir():
        return None
    marked = marked_checkpoints(folder)
    if not marked and not list(folder.glob(f"*{MARKER}")):
        _remove_partials(folder)
        latest = folder / "latest-rank0.pt"
        return latest if latest.exists() else None
    newest, damaged = None, []
    for f in reversed(marked):
        problem = digest.check(f, digest=verify_digest)
        if problem is None:
            newest = f
            break
        damaged.append((f, problem))
    if damaged and newest is None:  # resuming "from the one before" would be a fresh start over the run's ledger
        f, problem = damaged[0]
        raise RunFolderError(f"checkpoint {f} is damaged ({problem}) and no complete checkpoint of this run is left "
                             "before it; nothing was changed: restore it from a copy, or move the run folder aside "
                             "to start again")
    _remove_partials(folder)
    for f, problem in damaged:
        aside = digest.set_aside(f)
        print(f"warning: checkpoint {f.name} is damaged ({problem}); set aside as {aside.name}, "
              "resuming from the checkpoint before it", file=sys.stderr, flush=True)
    newest_step = int(CHECKPOINT_NAME.match(newest.name).group(2)) if newest else -1
    for f in folder.glob("ep*-ba*-rank0.pt"):
        if f not in marked and int(CHECKPOINT_NAME.match(f.name).group(2)) > newest_step:
            f.rename(f.with_name(f.name + ".incomplete"))  # kept for inspection; Composer would refuse it
    latest = folder / "latest-rank0.pt"
    if newest is None:
        latest.unlink(missing_ok=True)
    elif not latest.is_symlink() or Path(os.readlink(latest)).name != newest.name:
        atomic_symlink(newest.name, latest)
    return newest


def _remove_partials(folder: Path) -> None:
    for partial in [*folder.glob("*.partial.pt"), *folder.glob("*.partial")]:
        partial.unlink()  # by construction never complete: a checkpoint is renamed only once written


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


CLOCK = {"ba": "batch", "tok": "token"}  # max_duration unit -> the Timestamp field it is measured on


@dataclass
class Finished:
    run_name: str
    step: int
    tokens: int
    max_duration: str
    checkpoint: Path

    def line(self) -> str:
        return (f"[{self.run_name}] already complete: step {self.step}, {self.tokens:,} tokens (train.max_duration "
                f"{self.max_duration}); final checkpoint {self.checkpoint}. Nothing to train; raise "
                "train.max_duration to continue it.")


def read_clock(path: Path, trust_pickles: bool = False) -> dict[str, int]:
    """The Timestamp of a checkpoint, without reading its tensors (a file is memory-mapped; of a sharded folder only
    the clock's entries are read)."""
    if is_sharded(path):
        state = load_sharded(path, trust_pickles, keys=["state.timestamp"])["state"]
    else:
        state = safe_load(path, trust_pickles=trust_pickles, mmap=True)["state"]
    return {k: int(getattr(v, "value", v)) for k, v in state["timestamp"]["Timestamp"].items() if k in ("batch", "token")}


def finished_run(recipe: Recipe) -> Finished | None:
    """The run's final checkpoint when the checkpoint autoresume would load has reached train.max_duration."""
    latest = Path(recipe.run_dir) / "checkpoints" / LATEST
    if not recipe.checkpoint.autoresume or not latest.exists():
        return None
    target = latest.parent / os.readlink(latest) if latest.is_symlink() else latest
    try:
        clock = read_clock(target, recipe.checkpoint.trust_pickles)
    except UnsafeCheckpointError:
        raise  # never opened with a full unpickle: said at once (cli.py), as the trainer's preflight would
    except Exception:  # noqa: BLE001 - unreadable (a crash mid-write): the trainer's preflight repairs and reports it
        return None
    total, unit = Duration.parse(recipe.train.max_duration)
    if clock[CLOCK[unit]] < total:
        return None
    if digest.check(target, digest=recipe.checkpoint.verify_digest):  # damaged: the trainer sets it aside, resumes
        return None
    return Finished(recipe.run_name, clock["batch"], clock["token"], recipe.train.max_duration, target)
