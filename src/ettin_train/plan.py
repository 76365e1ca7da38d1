"""What a recipe will do, computed without training: `python train.py RECIPE.yaml --plan [--json]`."""

from __future__ import annotations

import math

import torch

from ettin_train.config import Duration, Recipe
from ettin_train.model import EttinModel
from ettin_train.objectives import get_objective
from ettin_train.schedules import final_multiplier

# Share of a sequence's slots that hold real tokens when the recipe does not say: Ettin's pre-training
# batches averaged ~615 real tokens per 1024 slots (8.5B tokens per ~2997 steps of 4608 sequences).
DEFAULT_FILL = 0.6


def make_plan(recipe: Recipe) -> dict:
    objective = get_objective(recipe.objective)
    cfg = recipe.model
    with torch.device("meta"):
        params = EttinModel(cfg).num_params()
    total, unit = Duration.parse(recipe.train.max_duration)
    mean_tokens = recipe.data.mean_tokens_per_seq or DEFAULT_FILL * recipe.data.seq_len
    tokens_per_step = recipe.train.global_batch * mean_tokens
    tokens, steps = (total, math.ceil(total / tokens_per_step)) if unit == "tok" else (round(total * tokens_per_step), total)
    interval = Duration.parse(recipe.checkpoint.interval)[0]
    init = recipe.init
    return {
        "run_name": recipe.run_name,
        "run_dir": recipe.run_dir,
        "objective": objective.name,
        "phase": recipe.phase,
        "size": cfg.size,
        "params": params,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_heads,
        "vocab_size": cfg.vocab_size,
        "seq_len": recipe.data.seq_len,
        "global_batch": recipe.train.global_batch,
        "microbatch": recipe.train.microbatch,
        "tokens": tokens,
        "steps": steps,
        "steps_are_estimated": unit == "tok",
        "mean_tokens_per_seq": mean_tokens,
        "checkpoints": math.ceil(total / interval),
        "scheduler": recipe.scheduler.name,
        "warmup": recipe.scheduler.warmup,
        "lr_peak": recipe.optimizer.lr,
        "lr_final": recipe.optimizer.lr * final_multiplier(recipe.scheduler, total),
        "weight_decay": recipe.optimizer.weight_decay,
        "mask_rate": 0.0 if objective.causal else recipe.data.mask_rate,
        "rope_theta_global": cfg.rope_theta_global,
        "rope_theta_local": cfg.local_theta,
        "sliding_window": cfg.sliding_window,
        "data": recipe.data.path,
        "init_from": None if not init.checkpoint else {"checkpoint": init.checkpoint, "load": init.load,
                                                       "fresh": ["learning rate", "schedule", "clock"]},
        # a full resume (checkpoint.load_path excludes init.checkpoint): nothing starts fresh
        **({"init_from": {"checkpoint": recipe.checkpoint.load_path, "load": "full", "fresh": []}}
           if recipe.checkpoint.load_path else {}),
        "autoresume": recipe.checkpoint.autoresume,
    }


def format_plan(plan: dict) -> str:
    est = "~" if plan["steps_are_estimated"] else ""
    init = plan["init_from"]
    start = "fresh initialisation" if init is None else f"{init['load']} from {init['checkpoint']} (fresh: {', '.join(init['fresh']) or 'nothing'})"
    rows = [
        ("run", f"{plan['run_name']} -> {plan['run_dir']}"),
        ("objective / phase", f"{plan['objective']} / {plan['phase']}"),
        ("model", f"{plan['size'] or 'custom'}: {plan['layers']} layers, hidden {plan['hidden_size']}, "
                  f"intermediate {plan['intermediate_size']}, {plan['heads']} heads, vocab {plan['vocab_size']}"),
        ("parameters", f"{plan['params']:,} ({plan['params'] / 1e6:.1f}M)"),
        ("sequence", f"{plan['seq_len']} tokens, RoPE theta {plan['rope_theta_global']:g} global / "
                     f"{plan['rope_theta_local']:g} local, window {plan['sliding_window']}"),
        ("batch", f"{plan['global_batch']} sequences, microbatch {plan['microbatch'] or 'whole device batch'}"),
        ("budget", f"{plan['tokens']:,} tokens, {est}{plan['steps']:,} steps "
                   f"(at {plan['mean_tokens_per_seq']:.0f} real tokens per sequence)"),
        ("schedule", f"{plan['scheduler']}, warmup {plan['warmup']}, lr {plan['lr_peak']:g} -> {plan['lr_final']:g}"),
        ("masking", f"{plan['mask_rate']:.0%}" if plan["mask_rate"] else "none (causal)"),
        ("data", plan["data"]),
        ("checkpoints", f"{plan['checkpoints']} in {plan['run_dir']}/checkpoints, autoresume {'on' if plan['autoresume'] else 'off'}"),
        ("starts from", start),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
