"""`init.checkpoint`: a phase that starts from the previous phase's checkpoint takes its weights (and, with
`init.load: model+optimizer`, Adam's moments); the learning rate, the schedule and the clock are the new
recipe's. Nothing here imports Composer: the checkpoint is read as a plain file (composer_format.py)."""

from __future__ import annotations

import sys

import torch

from ettin_train.checkpoint import digest
from ettin_train.checkpoint.composer_format import find_checkpoint, load_checkpoint, model_state_dict
from ettin_train.checkpoint.optimizer_state import OptimizerStateError, ParamLayout, weight_decay_groups
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError
from ettin_train.config import Recipe
from ettin_train.model import EttinModel


def start_phase_from(path: str, recipe: Recipe, model: EttinModel, optimizer: torch.optim.Optimizer) -> str:
    """Load what `init.load` declares from the previous phase's checkpoint. The learning rate, the
    schedule and the clock are this recipe's: only weights (and moments) come from the checkpoint.
    Returns the start line's description; a checkpoint that does not fit exits with one error line."""
    try:
        file = find_checkpoint(path)
    except FileNotFoundError as e:
        sys.exit(f"error: init.checkpoint: {e}")
    problem = digest.check(file, digest=recipe.checkpoint.verify_digest)
    if problem:
        sys.exit(f"error: init.checkpoint: {problem}: damaged since it was written")
    try:
        ckpt = load_checkpoint(file, trust_pickles=recipe.checkpoint.trust_pickles)
    except UnsafeCheckpointError as e:
        sys.exit(f"error: init.checkpoint: {e}")
    weights = model_state_dict(ckpt)
    # The encoder names its prediction head `head.*`, the decoder `lm_head.*` (as the original classes).
    # A cross-objective continuation takes the other objective's weights with the head renamed.
    renamed = ""
    ours, theirs = model.head_name, "head" if model.head_name == "lm_head" else "lm_head"
    if recipe.init.load == "model" and any(k.startswith(f"{theirs}.") for k in weights) \
            and not any(k.startswith(f"{ours}.") for k in weights):
        weights = {f"{ours}.{k[len(theirs) + 1:]}" if k.startswith(f"{theirs}.") else k: v for k, v in weights.items()}
        kind = "decoder" if theirs == "lm_head" else "encoder"
        renamed = f" ({kind} checkpoint: {theirs}.* renamed {ours}.*)"
    missing, unexpected = sorted(set(model.state_dict()) - set(weights)), sorted(set(weights) - set(model.state_dict()))
    shapes = [k for k, v in model.state_dict().items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        if recipe.init.load != "model" and any(k.startswith(("head.", "lm_head.")) for k in missing):
            sys.exit(f"error: init.checkpoint {file} is a checkpoint of the other objective; a cross-objective start "
                     "takes the weights only: set init.load=model")
        sys.exit(f"error: init.checkpoint {file} does not fit this recipe's model ({recipe.objective}, {model.num_params():,} "
                 f"parameters): missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}")
    model.load_state_dict(weights, strict=True)
    taken = f"model weights{renamed}"
    if recipe.init.load == "model+optimizer":
        saved = ckpt["state"].get("optimizers", {}).get("StableAdamW")
        if saved is None:
            sys.exit(f"error: init.checkpoint {file} has no StableAdamW state; set init.load=model to take only the weights")
        try:  # matched by parameter name (or the original's index order), not by group position
            matched, _ = ParamLayout.of(model, optimizer).rebuild(saved, keyed="index")
        except OptimizerStateError as e:
            sys.exit(f"error: init.checkpoint {file}: {e}")
        optimizer.load_state_dict(matched)
        opt = recipe.optimizer
        for group, fresh in zip(optimizer.param_groups, weight_decay_groups(model, opt.weight_decay)):
            # torch restores the saved hyperparameters with the moments; the recipe's values win.
            # `max_lr` (the reference for decoupled weight decay) stays as saved, as in the original.
            group.update(lr=opt.lr, initial_lr=opt.lr, weight_decay=fresh["weight_decay"], beta1=opt.betas[0],
                         beta2=opt.betas[1], eps=opt.eps)
        taken += " and optimizer moments"
    step = ckpt["state"]["timestamp"]["Timestamp"]["batch"]
    return f"{taken} from {file} (its step {int(step)}); clock, schedule and learning rate start fresh"
