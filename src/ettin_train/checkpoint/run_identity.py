"""Which run a run folder holds: `run_dir/run.json`, written at the run's first start, checked at every start.

A run folder is one run: one objective, phase, model shape and data stream. A start whose recipe differs in any
of them (a finished folder given to a recipe of another size, a resume on other data) is refused before anything
is written, finished or not; the recipe of every accepted start is kept beside the earlier ones
(`recipes/start-NNN.yaml`, never overwritten; `recipe.yaml` is a copy of the newest). `lineage` names the model's
whole training (all its phases): a phase started from `init.checkpoint` (or a run continued with
`checkpoint.load_path`) inherits its checkpoint's, a new run draws one. It goes into every checkpoint
(RunMetadata), and ettin-export refuses to put two lineages in one repository. Nothing here imports Composer.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import yaml

from ettin_train.config import Recipe, recipe_to_dict

IDENTITY = "run.json"
RECIPES = "recipes"
# What makes two models the same shape (a checkpoint of one does not load into the other).
SHAPE = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "vocab_size")


class RunFolderError(ValueError):
    """A run folder that this start must not touch; one line naming the key and the folder."""


def check_local_run_dir(recipe: Recipe) -> None:
    """The one place that says where run folders may be: local paths only; a copy in an object store is
    checkpoint.remote (stores.py). Without it `s3://b/x` becomes a folder `s3:`."""
    if "://" in recipe.run_dir:
        raise RunFolderError(f"run_dir {recipe.run_dir}: run_dir must be a local (or network-mounted) folder; to keep the "
                             f"run's checkpoints in an object store, set checkpoint.remote: {recipe.run_dir} and a local "
                             "run_dir (docs/checkpoints.md)")


def model_shape(model: dict) -> dict:
    return {k: model.get(k) for k in SHAPE}


def _file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def data_identity(recipe: Recipe) -> dict | None:
    """What fixes the data stream, independent of where the folders are mounted: each local source by the sha256 of
    its index.json (which lists every shard's size and hash), a remote one by its URI; an imported order by its
    index. None when a source cannot be read (the input checks then say so)."""
    from ettin_train.data.permuted import resolve_sources

    data = recipe.data
    if data.order:
        index = _file_sha256(os.path.join(data.order, "order_index.json"))
        return None if index is None else {"order_index": index, "order_phase": data.order_phase}
    try:
        specs = resolve_sources(data)
    except ValueError:
        return None
    sources = []
    for s in specs:
        where = f"{s.remote}/{s.split or ''}" if s.remote else _file_sha256(os.path.join(s.local, s.split or "", "index.json"))
        if where is None:
            return None
        sources.append([s.key, s.weight, where])
    return {"shuffle_seed": data.shuffle_seed, "global_batch": recipe.train.global_batch, "sources": sources}


def identity(recipe: Recipe) -> dict:
    return {"objective": recipe.objective, "phase": recipe.phase,
            "model": model_shape(recipe_to_dict(recipe)["model"]), "data": data_identity(recipe)}


def read_identity(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / IDENTITY).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"run_dir {run_dir}: {IDENTITY} cannot be read ({type(e).__name__}: {e})") from None


def check_run_folder(recipe: Recipe, held: dict | None = None, held_at: str | None = None) -> None:
    """Refuses a start whose recipe is not the run the folder holds (its run.json, or `held`, the run.json found at
    `held_at`: a store's), finished or not."""
    check_local_run_dir(recipe)
    if held is None:
        held, held_at = read_identity(recipe.run_dir), recipe.run_dir
    if held is None:
        return
    ours, where = identity(recipe), f"{'run_dir' if held_at == recipe.run_dir else 'checkpoint.remote'} {held_at} holds another run ({held_at}/{IDENTITY}:"
    advice = "use another run_dir, or start from its checkpoint with init.checkpoint"
    for key in ("objective", "phase"):
        if held.get(key) != ours[key]:
            raise RunFolderError(f"{where} {key} {held.get(key)}, the recipe's {key} is {ours[key]}); {advice}")
    differ = [f"model.{k} {held['model'].get(k)} vs {ours['model'][k]}" for k in SHAPE if held["model"].get(k) != ours["model"][k]]
    if differ:
        raise RunFolderError(f"{where} another model: {', '.join(differ)} in the recipe); {advice}")
    if held.get("data") and ours["data"] and held["data"] != ours["data"]:
        changed = ", ".join(k for k in ours["data"] if held["data"].get(k) != ours["data"][k]) or "data"
        raise RunFolderError(f"{where} it was trained on other data: data {changed} differ from the recipe's); resume "
                             "with the same data (and data.shuffle_seed, train.global_batch), or use another run_dir")


def checkpoint_lineage(path: str | None) -> str | None:
    """The lineage a local checkpoint file (or run folder) records, None if it records none or cannot be read here
    (start_phase_from / check_full_checkpoint report an unreadable one)."""
    if not path or "://" in path:
        return None
    from ettin_train.checkpoint.composer_format import find_checkpoint, is_sharded
    from ettin_train.checkpoint.safe_load import safe_load

    try:
        file = find_checkpoint(path)
        if is_sharded(file):
            return None
        meta = safe_load(file, mmap=True)["state"]["callbacks"].get("RunMetadata") or {}
    except Exception:  # noqa: BLE001 - reported with its reason where the checkpoint is loaded
        return None
    return meta.get("lineage")


def lineage_of(recipe: Recipe) -> str:
    """Rank 0: this run's lineage (its run.json's, else the checkpoint it starts from, else a new one)."""
    held = read_identity(recipe.run_dir)
    if held and held.get("lineage"):
        return held["lineage"]
    return checkpoint_lineage(recipe.init.checkpoint or recipe.checkpoint.load_path) or uuid.uuid4().hex


def record_start(recipe: Recipe, lineage: str) -> Path:
    """Rank 0, after every check passed: run.json at the first start, and this start's resolved recipe kept as
    recipes/start-NNN.yaml (a new file each start) and copied to recipe.yaml. Returns the kept file."""
    run_dir = Path(recipe.run_dir)
    (run_dir / RECIPES).mkdir(parents=True, exist_ok=True)
    if read_identity(run_dir) is None:
        _write_new(run_dir / IDENTITY, json.dumps(identity(recipe) | {"lineage": lineage}, indent=1) + "\n")
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
    n = len(list((run_dir / RECIPES).glob("start-*.yaml"))) + 1
    while True:
        kept = run_dir / RECIPES / f"start-{n:03d}.yaml"
        try:
            _write_new(kept, text)
            break
        except FileExistsError:
            n += 1
    (run_dir / "recipe.yaml").write_text(text)
    return kept


def _write_new(path: Path, text: str) -> None:
    """Creates `path` (never replacing one) with `text`."""
    with open(path, "x") as f:
        f.write(text)
