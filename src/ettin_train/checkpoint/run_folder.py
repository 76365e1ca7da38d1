"""Is this run already finished? Read off its run folder before anything is built.

A finished run started again (a Slurm requeue, a pipeline step run twice) would autoresume from its final
checkpoint, and Composer refuses a run whose clock has reached `max_duration`. `finished_run` reads the clock of the
checkpoint autoresume would load (`latest-rank0.pt`) and says whether it is at or past the recipe's
`train.max_duration`; train.py then reports the run complete and exits 0. A recipe whose max_duration grew is not
finished and continues as usual. Nothing here imports Composer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ettin_train.checkpoint.composer_format import LATEST, is_sharded, load_checkpoint
from ettin_train.config import Duration, Recipe

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


def read_clock(path: Path) -> dict[str, int]:
    """The Timestamp of a checkpoint, without reading its tensors (a file is memory-mapped)."""
    if is_sharded(path):
        state = load_checkpoint(path)["state"]
    else:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["state"]
    return {k: int(getattr(v, "value", v)) for k, v in state["timestamp"]["Timestamp"].items() if k in ("batch", "token")}


def finished_run(recipe: Recipe) -> Finished | None:
    """The run's final checkpoint when the checkpoint autoresume would load has reached train.max_duration."""
    latest = Path(recipe.run_dir) / "checkpoints" / LATEST
    if not recipe.checkpoint.autoresume or not latest.exists():
        return None
    target = latest.parent / os.readlink(latest) if latest.is_symlink() else latest
    try:
        clock = read_clock(target)
    except Exception:  # noqa: BLE001 - unreadable (a crash mid-write): the trainer's preflight repairs and reports it
        return None
    total, unit = Duration.parse(recipe.train.max_duration)
    if clock[CLOCK[unit]] < total:
        return None
    return Finished(recipe.run_name, clock["batch"], clock["token"], recipe.train.max_duration, target)
