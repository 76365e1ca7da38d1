"""Load a recipe: YAML with inheritance (`base: other.yaml`), `dotted.key=value` overrides, and a strict
check against the schema. Every problem is a `RecipeError` with one line that names the key, the file
that set it and, for a typo, the nearest valid key."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ettin_train.config.schema import MISSING, NOT_RECIPE_KEYS, Duration, Recipe
from ettin_train.objectives import OBJECTIVES

COMMAND_LINE = "the command line"


class RecipeError(ValueError):
    """A recipe problem, phrased for the user on one line."""


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> tuple[Recipe, dict[str, str]]:
    """Returns the checked recipe and, for every key that was set, the file (or command line) that set it."""
    layers = _read_chain(Path(path), [])
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise RecipeError(f"override {item!r} is not of the form dotted.key=value")
        try:
            layers.append((COMMAND_LINE, OmegaConf.to_container(OmegaConf.from_dotlist([item]))))
        except OmegaConfBaseException as e:
            raise RecipeError(f"override {item!r} cannot be parsed: {_first_line(e)}") from None
    sources: dict[str, str] = {}
    for source, data in layers:
        for key in _leaf_keys(data):
            sources[key] = source
    try:
        merged = OmegaConf.merge(*(OmegaConf.create(data) for _, data in layers))
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise RecipeError(f"key '{key}' ({_source_of(key, sources, path)}): {_first_line(e)}") from None
    recipe = _build(Recipe, resolved, "", sources, str(path))
    _check_semantics(recipe, sources, str(path))
    # The attention direction follows the objective; it is not a key of its own.
    recipe.model = recipe.model.replace(causal=OBJECTIVES[recipe.objective].causal)
    return recipe, sources


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain dict of a recipe (for --plan and for the copy written into the run folder)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def _read_chain(path: Path, seen: list[Path]) -> list[tuple[str, dict]]:
    if not path.is_file():
        where = f" (named as base by {seen[-1]})" if seen else ""
        raise RecipeError(f"recipe file {path} not found{where}")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: base files form a cycle: {' -> '.join(map(str, seen + [path]))}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', None) or _first_line(e)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return [(str(path), data)]
    return _read_chain(path.parent / str(base), seen + [path.resolve()]) + [(str(path), data)]


def _leaf_keys(data: dict, prefix: str = "") -> typing.Iterator[str]:
    for key, value in data.items():
        full = f"{prefix}{key}"
        yield full
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{full}.")


def _source_of(key: str, sources: dict[str, str], recipe_path) -> str:
    while key:
        if key in sources:
            where = sources[key]
            return f"set on {where}" if where == COMMAND_LINE else f"set in {where}"
        key = key.rpartition(".")[0]
    return f"the default: not set in {recipe_path} or its bases"


def _schema_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        if full in NOT_RECIPE_KEYS:
            continue
        keys.append(full)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _schema_keys(tp, f"{full}.")
    return keys


def _nearest(key: str, candidates: list[str]) -> str:
    leaf = key.rpartition(".")[2]
    by_full = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    by_leaf = [c for c in candidates if c.rpartition(".")[2] in difflib.get_close_matches(leaf, [c.rpartition(".")[2] for c in candidates], n=1, cutoff=0.6)]
    best = by_full or by_leaf
    if best:
        return f"; did you mean '{best[0]}'?"
    siblings = list(dict.fromkeys(c for c in candidates if c.rpartition(".")[0] == key.rpartition(".")[0]))  # each once
    return f"; valid keys here: {', '.join(siblings)}" if siblings else ""


def _build(cls, data: Any, prefix: str, sources: dict[str, str], recipe_path: str):
    where = lambda key: _source_of(key, sources, recipe_path)  # noqa: E731
    if not isinstance(data, dict):
        key = prefix.rstrip(".")
        raise RecipeError(f"key '{key}' ({where(key)}) must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f"{prefix}{f.name}" not in NOT_RECIPE_KEYS}
    for key in data:
        if key not in fields:
            full = f"{prefix}{key}"
            raise RecipeError(f"unknown key '{full}' ({where(full)}){_nearest(full, [prefix + n for n in fields] + _schema_keys(Recipe))}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name, {}), f"{full}.", sources, recipe_path)
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name not in data and has_default and f.default != MISSING:
            continue
        value = data.get(name, MISSING)
        if value == MISSING:
            raise RecipeError(f"missing value for required key '{full}' ({where(full)})")
        if get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]) and isinstance(value, list):
            # a list of sections (data.sources): each item is checked as a section named key[i]
            kwargs[name] = [_build(get_args(tp)[0], v, f"{full}[{i}].", sources, recipe_path) for i, v in enumerate(value)]
            continue
        kwargs[name] = _coerce(tp, value, full, where)
    try:
        return cls(**kwargs)
    except ValueError as e:  # checks of the dataclass itself, phrased "key: problem"
        key = str(e).partition(":")[0]
        raise RecipeError(f"{e} ({where(key)})") from None


def _coerce(tp, value, key: str, where):
    origin, args = get_origin(tp), get_args(tp)
    wrong = lambda expected: RecipeError(  # noqa: E731
        f"key '{key}' ({where(key)}) must be {expected}, got {type(value).__name__} {value!r}"
    )
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, where)
    if origin is Literal:
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise RecipeError(f"key '{key}' ({where(key)}) must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong("a list")
        return [_coerce(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is Duration:
        if not isinstance(value, str):
            raise wrong("a duration string like '8_500_000_000tok' or '100ba'")
        try:
            Duration.parse(value)
        except ValueError as e:
            raise RecipeError(f"key '{key}' ({where(key)}): {e}") from None
        return Duration(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"schema type {tp} of '{key}' is not supported")  # a bug in the schema, not the recipe


def _check_semantics(r: Recipe, sources: dict[str, str], recipe_path: str) -> None:
    """Checks that involve more than one key or a registry."""
    where = lambda key: _source_of(key, sources, recipe_path)  # noqa: E731
    if r.objective not in OBJECTIVES:
        near = difflib.get_close_matches(r.objective, list(OBJECTIVES), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise RecipeError(f"key 'objective' ({where('objective')}) must be one of {', '.join(OBJECTIVES)}, got {r.objective!r}{hint}")
    _, unit = Duration.parse(r.train.max_duration)
    for key, value in (("scheduler.warmup", r.scheduler.warmup), ("scheduler.decay", r.scheduler.decay),
                       ("train.stop_after", r.train.stop_after), ("checkpoint.interval", r.checkpoint.interval)):
        if value is not None and Duration.parse(value)[0] != 0 and Duration.parse(value)[1] != unit:
            raise RecipeError(f"key '{key}' ({where(key)}) is in '{Duration.parse(value)[1]}' but train.max_duration is in '{unit}'; use one unit")
    positive = {"train.global_batch": r.train.global_batch, "data.seq_len": r.data.seq_len, "optimizer.lr": r.optimizer.lr,
                "logging.console_interval": r.logging.console_interval}
    if r.train.microbatch is not None:
        positive["train.microbatch"] = r.train.microbatch
    if r.eval.sources:
        positive |= {"eval.batches": r.eval.batches, "eval.batch_size": r.eval.batch_size,
                     "eval.interval": Duration.parse(r.eval.interval)[0], "eval.seq_len": r.eval.seq_len or r.data.seq_len}
    for key, value in positive.items():
        if value <= 0:
            raise RecipeError(f"key '{key}' ({where(key)}) must be positive, got {value}")
    for i, source in enumerate(r.data.sources):
        if not source.weight > 0:
            key = f"data.sources[{i}].weight"
            raise RecipeError(f"key '{key}' ({where(key)}) must be positive, got {source.weight}")
    if not 0.0 <= r.data.mask_rate < 1.0:
        raise RecipeError(f"key 'data.mask_rate' ({where('data.mask_rate')}) must be in [0, 1), got {r.data.mask_rate}")
    if len(r.optimizer.betas) != 2:
        raise RecipeError(f"key 'optimizer.betas' ({where('optimizer.betas')}) must have two values, got {r.optimizer.betas}")
    if r.checkpoint.load_path and r.init.checkpoint:
        raise RecipeError(f"keys 'checkpoint.load_path' ({where('checkpoint.load_path')}) and 'init.checkpoint' "
                          f"({where('init.checkpoint')}) exclude each other: one continues a run, the other starts a phase")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
