"""`python train.py RECIPE.yaml --plan --plot lr.png`: the learning rate and the global batch size
against tokens, for this recipe and the chain of earlier phases it starts from.

The chain follows `init.checkpoint` back: a run folder (or a checkpoint file inside one) is matched to
the recipe that writes that `run_dir`, searched for in the `yamls/` tree the recipe lives in (the
nearest ancestor folder named `yamls`, else the recipe's own folder). A phase whose recipe cannot be
found ends the chain; the plot then starts at that phase.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import yaml

from ettin_train.config import Duration, Recipe, RecipeError, load_recipe
from ettin_train.plan import DEFAULT_FILL
from ettin_train.schedules import lr_multiplier

POINTS = 400  # samples per phase (plus the exact phase ends)


def _norm(path: str) -> str:
    return os.path.normpath(path.rstrip("/"))


def _search_root(recipe_path: Path) -> Path:
    for parent in recipe_path.resolve().parents:
        if parent.name == "yamls":
            return parent
    return recipe_path.resolve().parent


def _recipes_by_run_dir(root: Path) -> dict[str, Path]:
    """run_dir -> recipe file, for every recipe under root that loads (bases and fragments do not)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text()
        if "run_dir" not in text:  # base files and per-size fragments set no run_dir
            continue
        try:  # fast path: the run_dir the file itself sets (recipes set their own)
            run_dir = (yaml.safe_load(text) or {}).get("run_dir")
        except yaml.YAMLError:
            continue
        if not isinstance(run_dir, str) or "${" in run_dir:
            try:
                run_dir = load_recipe(path)[0].run_dir
            except RecipeError:
                continue
        shown = Path(os.path.relpath(path)) if not os.path.relpath(path).startswith("..") else path
        found.setdefault(_norm(run_dir), shown)
    return found


def phase_chain(recipe_path: str | Path, overrides: Sequence[str] = ()) -> list[tuple[Path, Recipe]]:
    """This recipe and the earlier phases it starts from, earliest first. Overrides apply to this recipe only."""
    recipe_path = Path(recipe_path)
    recipe, _ = load_recipe(recipe_path, overrides)
    chain = [(recipe_path, recipe)]
    index = None
    seen = {_norm(recipe.run_dir)}
    while chain[0][1].init.checkpoint:
        if index is None:
            index = _recipes_by_run_dir(_search_root(recipe_path))
        start = _norm(chain[0][1].init.checkpoint)
        # a run folder, or a checkpoint file somewhere inside one
        match = next((d for d in sorted(index, key=len, reverse=True) if start == d or start.startswith(d + os.sep)), None)
        if match is None or match in seen:
            break
        seen.add(match)
        earlier, _ = load_recipe(index[match])
        chain.insert(0, (index[match], earlier))
    return chain


def _tokens_per_step(recipe: Recipe) -> float:
    mean = recipe.data.mean_tokens_per_seq or DEFAULT_FILL * recipe.data.seq_len
    return recipe.train.global_batch * mean


def schedule_series(chain: list[tuple[Path, Recipe]]) -> list[dict]:
    """Per phase: name, tokens (cumulative over the chain), lr, batch size, and the lr at both ends."""
    series, offset = [], 0.0
    for path, recipe in chain:
        total, unit = Duration.parse(recipe.train.max_duration)
        scale = 1.0 if unit == "tok" else _tokens_per_step(recipe)  # steps -> estimated tokens
        ts = [total * i / POINTS for i in range(POINTS + 1)]
        warmup = Duration.parse(recipe.scheduler.warmup)[0]
        if 0 < warmup < total:
            ts = sorted(set(ts + [warmup]))
        lr = [recipe.optimizer.lr * lr_multiplier(recipe.scheduler, t, total) for t in ts]
        series.append({
            "name": f"{recipe.run_name} ({recipe.objective}, {recipe.phase})",
            "recipe": str(path),
            "tokens": [offset + t * scale for t in ts],
            "lr": lr,
            # The global batch is constant in every phase (the original's batch-size warmup is not a key
            # here: replaying the published data order reproduces it; see docs/recipes.md).
            "batch": [recipe.train.global_batch] * len(ts),
            "lr_start": lr[0],
            "lr_end": lr[-1],
        })
        offset += total * scale
    return series


def plot_schedule(recipe_path: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> list[dict]:
    """Writes the PNG and returns the plotted series (see `schedule_series`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = schedule_series(phase_chain(recipe_path, overrides))
    fig, (ax_lr, ax_bs) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(3, 1))
    for s in series:
        x = [t / 1e9 for t in s["tokens"]]
        ax_lr.plot(x, s["lr"], label=s["name"])
        ax_bs.plot(x, s["batch"])
        for ax in (ax_lr, ax_bs):
            ax.axvline(x[0], color="grey", lw=0.5, ls=":")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.legend(fontsize=8)
    ax_lr.set_title(f"{Path(recipe_path).name}: learning rate and batch size" + (" (with the phases it starts from)" if len(series) > 1 else ""))
    ax_bs.set_ylabel("global batch (sequences)")
    ax_bs.set_xlabel("tokens (billions, cumulative over the phases shown)")
    top = max(max(s["batch"]) for s in series)
    ax_bs.set_ylim(0, top * 1.2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return series
