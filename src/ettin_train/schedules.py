"""Learning-rate multipliers as plain functions of the clock (tokens or steps since the phase began).

They reproduce the original schedulers (`bert24 src/scheduler.py`, Composer's LinearScheduler):
  warmup_stable_decay: linear 1e-10 -> 1 over `warmup`, 1 until the last `decay`, then linear to alpha_f.
  one_minus_sqrt:      the same warmup, then alpha_f + (1 - alpha_f) * (1 - sqrt(progress)) over `decay`.

Past the end of the phase (t > total: only when the clock overshoots the budget) they follow the original too:
a linear decay keeps falling below alpha_f, down to 0, and 1-sqrt stays at alpha_f. One exception: a
warmup_stable_decay without a decay stays at 1, where the original divides by zero (docs/decisions.md).
"""

from __future__ import annotations

import math

from ettin_train.config.schema import Duration, SchedulerConfig

WARMUP_START = 1e-10  # Composer's LinearScheduler(alpha_i=1e-10) used by the original WSD warmup


def lr_multiplier(cfg: SchedulerConfig, t: float, total: float) -> float:
    warmup = Duration.parse(cfg.warmup)[0]
    decay = total - warmup if cfg.decay is None else Duration.parse(cfg.decay)[0]
    decay_start = total - decay
    if t < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * t / warmup
    if t < decay_start or decay <= 0:
        return 1.0
    progress = (t - decay_start) / decay  # above 1 past the end of the phase
    if cfg.name == "warmup_stable_decay":
        return max(0.0, 1.0 + (cfg.alpha_f - 1.0) * progress)
    if cfg.name == "one_minus_sqrt":
        return cfg.alpha_f + (1.0 - cfg.alpha_f) * (1.0 - math.sqrt(min(1.0, progress)))
    raise ValueError(f"scheduler.name: unknown schedule {cfg.name!r}")


def final_multiplier(cfg: SchedulerConfig, total: float) -> float:
    return lr_multiplier(cfg, total, total)
