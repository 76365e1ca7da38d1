"""In-loop evaluation (the recipe's `eval` section), without Composer: when an evaluation is due, running it
on this process's share of every held-out source (the sums reduced over all processes), and eval.jsonl.

Due: each time the clock (tokens or batches, as `eval.interval` says) passes a multiple of the interval,
and at the end of train.max_duration. The decision depends only on the clock before and after a step, so a
resumed run evaluates at exactly the steps an uninterrupted one does; eval.jsonl lines past the checkpoint a
run resumes from are dropped first (a run killed after an evaluation writes it again, with the same numbers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ettin_train.config import Duration
from ettin_train.eval.data import EvalSettings, HeldOut, HeldOutError, check_disjoint
from ettin_train.eval.metrics import evaluate

__all__ = ["EvalLog", "HeldOutError", "InLoopEval", "console_line", "logger_metrics"]


class InLoopEval:
    def __init__(self, recipe, objective, tokens, world: int):
        from ettin_train.data.permuted import resolve_sources

        cfg = recipe.eval
        self.settings = EvalSettings(cfg.batches, cfg.batch_size, cfg.seq_len or recipe.data.seq_len, cfg.mask_rate, cfg.seed)
        self.every, self.unit = Duration.parse(cfg.interval)
        self.total, self.total_unit = Duration.parse(recipe.train.max_duration)
        for i, folder in enumerate(cfg.sources):
            if not os.path.isfile(os.path.join(folder, "index.json")):
                raise HeldOutError(f"eval.sources[{i}]: {os.path.join(folder, 'index.json')} does not exist (MDS shards)")
        # An imported order (data.order) names no folders; its rows come from the original corpus.
        training = [] if recipe.data.order else [os.path.join(s.local, s.split or "") for s in resolve_sources(recipe.data)]
        check_disjoint(list(cfg.sources), training)
        if cfg.batch_size % world:
            raise HeldOutError(f"eval.batch_size {cfg.batch_size} is not divisible by the world size {world}")
        self.world = world
        self.sets = {Path(folder).resolve().name: HeldOut(folder, objective, tokens, self.settings) for folder in cfg.sources}
        self.objective = objective

    def _clock(self, tokens: int, batches: int, unit: str) -> int:
        return tokens if unit == "tok" else batches

    def due(self, before: tuple[int, int], after: tuple[int, int]) -> bool:
        """Whether the step that moved the clock from `before` to `after` ((tokens, batches)) ends with an evaluation."""
        passed = self._clock(*after, self.unit) // self.every > self._clock(*before, self.unit) // self.every
        ended = self._clock(*before, self.total_unit) < self.total <= self._clock(*after, self.total_unit)
        return passed or ended

    def run(self, model, rank: int, autocast_dtype: torch.dtype | None = None) -> dict[str, dict]:
        """Held-out source name -> metrics; every process must call it (the sums are all-reduced)."""
        return {name: evaluate(model, self.objective, held.batches(rank, self.world), autocast_dtype=autocast_dtype)
                for name, held in self.sets.items()}


class EvalLog:
    """run_dir/eval.jsonl: one line per evaluation and source (step, tokens, phase, data, metrics)."""

    def __init__(self, path: Path, phase: str):
        self.path, self.phase = Path(path), phase

    def drop_after(self, step: int) -> None:
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in lines))

    def append(self, step: int, tokens: int, results: dict[str, dict]) -> None:
        with self.path.open("a") as f:
            for name, m in results.items():
                f.write(json.dumps({"step": step, "tokens": tokens, "phase": self.phase, "data": name, **m}) + "\n")


def console_line(run_name: str, step: int, results: dict[str, dict]) -> str:
    parts = [f"{name}: loss {m['loss']:.4f}  acc {m['accuracy']:.3f}" + (f"  ppl {m['perplexity']:.2f}" if "perplexity" in m else "")
             for name, m in results.items()]
    return f"[{run_name}] eval step {step:>6}  " + "  |  ".join(parts)


def logger_metrics(results: dict[str, dict]) -> dict[str, float]:
    """eval/<source>/<metric> for the loggers (wandb)."""
    return {f"eval/{name}/{k}": v for name, m in results.items() for k, v in m.items()}
