"""Test-only fault injection: a Composer callback that kills the process or spoils the loss at a chosen step,
installed by the tests into a real run (train.py never installs it, and no environment variable does).

    FaultInjector("write@4,nan@6")           # the callback, for run(recipe, extra_callbacks=[...])
    python tests/train/faults.py FAULTS RECIPE.yaml [overrides]   # train.py with the faults (e.g. under `composer -n 2`)

Points: `write@N` truncates step N's `.partial.pt` to half and SIGKILLs (a kill inside `torch.save`);
`rename@N`, `marker@N`, `link@N` SIGKILL after that stage of the checkpoint write; `backward@N` after step
N's backward pass, before its optimizer step; `nan@N` multiplies step N's loss by NaN; `spike@N` by 8.
"""

from __future__ import annotations

import os
import signal
import sys

from composer import Callback, State
from composer.loggers import Logger

from ettin_train.train.reliability import AtomicCheckpointSaver


class FaultInjector(Callback):
    def __init__(self, spec: str):
        self.points = {p for p in spec.split(",") if p}

    def _at(self, point: str, step: int) -> bool:
        rank = os.environ.get("RANK", "0")
        return f"{point}@{step}" in self.points or f"{point}@{step}/rank{rank}" in self.points

    def _die_if(self, point: str, step: int) -> None:
        if self._at(point, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def fit_start(self, state: State, logger: Logger) -> None:
        for callback in state.callbacks:
            if isinstance(callback, AtomicCheckpointSaver):
                callback.on_stage = self._checkpoint_stage

    def _checkpoint_stage(self, stage: str, step: int, path: str) -> None:
        if stage == "written" and self._at("write", step):  # as if killed half-way through torch.save
            os.truncate(path, os.path.getsize(path) // 2)
            self._die_if("write", step)
        self._die_if({"renamed": "rename", "marked": "marker", "linked": "link"}.get(stage, ""), step)

    def after_loss(self, state: State, logger: Logger) -> None:
        step = state.timestamp.batch.value + 1
        if self._at("nan", step):
            state.loss = state.loss * float("nan")
        if self._at("spike", step):
            state.loss = state.loss * 8.0

    def after_backward(self, state: State, logger: Logger) -> None:
        self._die_if("backward", state.timestamp.batch.value + 1)
        if self._at("hang", state.timestamp.batch.value + 1):
            os.kill(os.getpid(), signal.SIGSTOP)


def train_with_faults(spec: str, args: list[str]) -> int:
    """What train.py does (ettin_train.cli.main), with the fault injector among the run's callbacks."""
    from ettin_train.config import RecipeError, load_recipe
    from ettin_train.train.run import run

    try:
        recipe, _ = load_recipe(args[0], args[1:])
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(recipe, extra_callbacks=[FaultInjector(spec)] if spec else [])
    return 0


if __name__ == "__main__":
    sys.exit(train_with_faults(sys.argv[1], sys.argv[2:]))
