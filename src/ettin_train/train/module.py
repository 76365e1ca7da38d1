"""What Composer trains: the model wrapped as a `ComposerModel`, the optimizer, and the learning-rate schedule."""

from __future__ import annotations

import torch
from composer import ComposerModel, State
from optimi import StableAdamW

from ettin_train.checkpoint.optimizer_state import weight_decay_groups
from ettin_train.config import Duration, Recipe
from ettin_train.model import EttinModel
from ettin_train.objectives import Objective
from ettin_train.schedules import lr_multiplier
from ettin_train.train.shims import optimi_triton


class EttinComposerModel(ComposerModel):
    """Composer's wrapper: the objective's loss is the forward pass. The attribute name `model`
    gives checkpoint keys the `model.` prefix that the original checkpoints have."""

    def __init__(self, model: EttinModel, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective.loss(self.model, batch)

    def loss(self, outputs, batch):
        return outputs


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> StableAdamW:
    """StableAdamW with fully decoupled weight decay, in the original's groups: [no decay (norms, biases), decay]."""
    opt = recipe.optimizer
    return StableAdamW(
        weight_decay_groups(model, opt.weight_decay),
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay, decouple_lr=True,
        triton=optimi_triton(),
    )


class LRSchedule:
    """Composer calls this after every step; Composer wraps it in a `LambdaLR` (checkpoint key `LambdaLR`)."""

    def __init__(self, recipe: Recipe):
        self.cfg = recipe.scheduler
        self.total, self.unit = Duration.parse(recipe.train.max_duration)

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        t = state.timestamp.token.value if self.unit == "tok" else state.timestamp.batch.value
        return lr_multiplier(self.cfg, t, self.total)


def composer_time(duration: str) -> str:
    """A recipe duration (`100ba`, `2_000tok`, ...) as Composer's Time string."""
    value, unit = Duration.parse(duration)
    return f"{value}{unit}"
