"""Evaluation metrics of an objective on held-out batches, as sums, so any number of processes adds up
to the same totals: the summed cross-entropy over the scored positions, their count and how many the
model predicted right (argmax). The reported metrics are ratios of the reduced sums:
  mlm, mntp: loss (mean cross-entropy over the masked tokens) and accuracy (masked-token accuracy);
  clm:       loss (mean next-token cross-entropy), accuracy (next-token) and perplexity = exp(loss).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ettin_train.objectives import Objective

SUMS = ("loss_sum", "scored", "correct")


@torch.no_grad()
def evaluate_sums(model, objective: Objective, batches, device: torch.device | None = None,
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """float64 [loss_sum, scored, correct] of `model` over `batches`, in eval mode. The model's training
    mode and the global RNG states are restored afterwards, so training continues exactly as without it."""
    device = device or next(model.parameters()).device
    was_training = model.training
    totals = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
    cuda = [device.index or 0] if device.type == "cuda" else []  # the CPU generator is always forked
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        model.eval()
        try:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                with cast:
                    logits, targets = objective.score(model, batch)
                logits = logits.float()
                ce = F.cross_entropy(logits, targets, reduction="none").double().sum()
                totals += torch.stack([ce, torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
                                       (logits.argmax(-1) == targets).sum().double()])
        finally:
            model.train(was_training)
    return totals


def all_reduce_sums(totals: torch.Tensor) -> torch.Tensor:
    """Sums over the processes of a torch.distributed group (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return totals


def metrics(objective: str, totals: torch.Tensor) -> dict[str, float]:
    """The reported metrics from the reduced sums (see the module docstring)."""
    loss_sum, scored, correct = (float(x) for x in totals.tolist())
    if scored == 0:
        raise ValueError("no position was scored in the held-out batches (nothing masked?): raise mask_rate or batches")
    out = {"loss": loss_sum / scored, "accuracy": correct / scored, "scored_tokens": int(scored)}
    if objective == "clm":
        out["perplexity"] = math.exp(out["loss"])
    return out


def evaluate(model, objective: Objective, batches, **kwargs) -> dict[str, float]:
    """evaluate_sums, reduced over the processes, as metrics."""
    return metrics(objective.name, all_reduce_sums(evaluate_sums(model, objective, batches, **kwargs)))
