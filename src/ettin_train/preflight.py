"""Checks of everything a recipe points at, run once before the Trainer is built, so a bad input stops
the run with one line (exit status 1) before anything is written: the shards against their index, the
sequence length, room on the checkpoint disk, and the checkpoint a resume would load. It also repairs
the checkpoint folder after a crash (checkpoint/run_folder.prepare_resume) and removes streaming's leftovers
from killed runs. The recipe itself was checked when it was loaded (exit status 2). Nothing it imports imports
Composer (only src/ettin_train/train/ does)."""

from __future__ import annotations

import atexit
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from ettin_train.checkpoint.hf import hf_config
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from ettin_train.config import Recipe, recipe_to_dict
from ettin_train.data.order import OrderError, OrderIndex
from ettin_train.data.permuted import resolve_sources
from ettin_train.data.shard_record import check_folder
from ettin_train.phases import phase as phase_named
from ettin_train.checkpoint.run_folder import checkpoint_bytes, prepare_resume
from ettin_train.data.streaming_leftovers import clean_streaming_leftovers

# What an exported config declares (max_position_embeddings) and so what transformers will accept.
MAX_POSITIONS = inspect.signature(hf_config).parameters["max_position_embeddings"].default


class PreflightError(ValueError):
    """One line naming the key, file or step that is wrong."""


def preflight(recipe: Recipe, model: torch.nn.Module, save_folder: Path) -> None:
    """Every rank calls this; rank 0 checks and repairs, the others take its verdict."""
    spread = tdist.is_available() and tdist.is_initialized()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        clean_streaming_leftovers()  # a killed earlier run's
        atexit.register(clean_streaming_leftovers)  # ours: runs after streaming's own exit handlers (registered later)
    problem = [None]
    if not spread or tdist.get_rank() == 0:
        try:
            check_inputs(recipe, model, save_folder)
        except PreflightError as e:
            problem = [str(e)]
    if spread:
        tdist.broadcast_object_list(problem, src=0)
    if problem[0]:
        sys.exit(f"error: {problem[0]}")


def check_inputs(recipe: Recipe, model: torch.nn.Module, save_folder: Path) -> None:
    rel = recipe.reliability
    if rel.spike_window <= 0 or rel.nonfinite_max_skips < 0 or rel.min_free_gb < 0:
        raise PreflightError(f"reliability.spike_window must be positive and reliability.nonfinite_max_skips and "
                             f"reliability.min_free_gb not negative, got {rel.spike_window}, {rel.nonfinite_max_skips}, {rel.min_free_gb}")
    if recipe.data.seq_len > MAX_POSITIONS:
        raise PreflightError(f"data.seq_len {recipe.data.seq_len} is longer than the {MAX_POSITIONS} positions the model "
                             "supports (max_position_embeddings of its exported config)")
    for note in check_data(recipe):
        print(f"note: {note}", file=sys.stderr, flush=True)
    resume_from = prepare_resume(save_folder, recipe.checkpoint.verify_digest) if recipe.checkpoint.autoresume else None
    if resume_from is not None:
        check_resume_checkpoint(resume_from, recipe)
    check_room(save_folder, checkpoint_bytes(model) + int(rel.min_free_gb * 2**30))


def check_data(recipe: Recipe, missing_ok: bool = False) -> list[str]:
    """The data the recipe points at, before any work: its shards against their index (reliability.verify_shards),
    what they are (data/shard_record.py: tokenizer, framing, dtype) against the recipe, and a replayed order's
    row lengths against data.seq_len. Returns notes for what trains but maybe not as meant. `missing_ok`
    (train.py --plan) skips sources that are not there, where a run would refuse them."""
    data, verify = recipe.data, recipe.reliability.verify_shards
    if data.order:
        if not (missing_ok and not Path(data.order).exists()):
            check_order_rows(recipe)
        return []
    try:
        sources = resolve_sources(data, missing_ok=missing_ok)  # data.path alone, or each of data.sources
    except ValueError as e:
        raise PreflightError(str(e)) from None
    notes = []
    for source in sources:
        folder = Path(source.local) / (source.split or "")  # the shards themselves, cached or not
        if source.remote is not None or not (folder / "index.json").is_file():
            continue  # remote shards are checked by streaming as it downloads them; missing ones only with missing_ok
        if verify != "none":
            check_shards(folder, hashes=verify == "hash", key=f"{source.key}.path")
        try:
            notes += check_folder(folder, f"{source.key}.path", data.seq_len, data.tokenizer, _tokenizer(data.tokenizer))
        except ValueError as e:
            raise PreflightError(str(e)) from None
    return notes


def _tokenizer(name: str):
    """Loads the recipe's tokenizer once, when a shard record asks for it."""
    loaded = []

    def load():
        if not loaded:
            from transformers import AutoTokenizer

            try:
                loaded.append(AutoTokenizer.from_pretrained(name))
            except Exception as e:  # noqa: BLE001 - a wrong path or an unreachable Hub name
                raise ValueError(f"data.tokenizer: {name} cannot be loaded ({type(e).__name__}: {e})".splitlines()[0]) from None
        return loaded[0]

    return load


def check_order_rows(recipe: Recipe) -> None:
    """A replayed order's rows are the original's collated batches, cut to that phase's sequence_length; a
    shorter data.seq_len would stop the run at the first longer row. Refused here, unless data.truncate_long_rows."""
    data = recipe.data
    try:
        index = OrderIndex(data.order)
    except (OrderError, ValueError) as e:
        raise PreflightError(f"data.order: {e}") from None
    phase = data.order_phase or phase_named(recipe.phase).short
    if phase not in index.phases:
        return  # the loader names the phases there are
    longest = index.longest_row(phase)
    if longest > data.seq_len and not data.truncate_long_rows:
        raise PreflightError(f"data.order: {data.order} phase {phase} has rows of up to {longest} tokens, longer than "
                             f"data.seq_len {data.seq_len}: set data.seq_len: {longest}, or data.truncate_long_rows: true "
                             f"to cut them as the original's loader does (counted in ledger.jsonl)")


def check_shards(folder: Path, hashes: bool, key: str = "data.path") -> None:
    """Every shard that `index.json` lists is there with its recorded size (and hash, if asked)."""
    index = folder / "index.json"
    if not index.is_file():
        raise PreflightError(f"{key}: {index} not found (an MDS folder has an index.json)")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (ValueError, KeyError) as e:
        raise PreflightError(f"{key}: {index} is not an MDS index ({type(e).__name__}: {e})") from None
    from streaming.base.hashing import get_hash

    for shard in shards:
        # A compressed shard is read from its zip file; streaming may have left the raw one next to it.
        entries = [e for e in (shard.get("zip_data"), shard.get("raw_data")) if e]
        present = [e for e in entries if (folder / e["basename"]).is_file()]
        if not present:
            raise PreflightError(f"{key}: shard {folder / entries[0]['basename']} listed in {index} is missing")
        for entry in present:
            path = folder / entry["basename"]
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise PreflightError(f"{key}: shard {path} is {size} bytes, {index} says {entry['bytes']} (truncated or replaced)")
            if hashes:
                data = path.read_bytes()
                for algo, want in entry.get("hashes", {}).items():
                    if get_hash(algo, data) != want:
                        raise PreflightError(f"{key}: shard {path} does not match its {algo} hash in {index}")


def check_resume_checkpoint(path: Path, recipe: Recipe) -> None:
    """The checkpoint a resume loads must be of this recipe's objective and model shape (its RunMetadata)."""
    if path.is_dir():  # a sharded checkpoint (a torch.distributed.checkpoint folder): Composer's load checks shapes
        return
    try:
        ckpt = safe_load(path, trust_pickles=recipe.checkpoint.trust_pickles, mmap=True)
    except UnsafeCheckpointError as e:
        raise PreflightError(str(e)) from None
    except Exception as e:  # any unreadable file: say which, not a traceback from deep in Composer
        raise PreflightError(f"checkpoint {path} (the newest complete one in {path.parent}) cannot be read: "
                             f"{type(e).__name__}: {e}".splitlines()[0]) from None
    meta = ckpt.get("state", {}).get("callbacks", {}).get("RunMetadata")
    if not meta:
        return  # written before RunMetadata existed: Composer's own load checks the shapes
    ours = recipe_to_dict(recipe)["model"]
    if meta["objective"] != recipe.objective:
        raise PreflightError(f"run_dir {recipe.run_dir} holds a {meta['objective']} checkpoint ({path.name}), but the recipe's "
                             f"objective is {recipe.objective}: use another run_dir, or start from it with init.checkpoint")
    shape = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "vocab_size")
    differ = [f"model.{k} {meta['model'][k]} vs {ours[k]}" for k in shape if meta["model"].get(k) != ours[k]]
    if differ:
        raise PreflightError(f"run_dir {recipe.run_dir} holds a checkpoint of another model ({path.name}: "
                             f"{', '.join(differ)} in the recipe); use another run_dir")


def check_room(save_folder: Path, need: int) -> None:
    probe = save_folder
    while not probe.exists():
        probe = probe.parent  # the folder is created later; its disk is the nearest existing parent's
    free = shutil.disk_usage(probe).free
    if free < need:
        raise PreflightError(f"checkpoint folder {save_folder}: {free / 2**30:.2f} GiB free, a checkpoint and "
                             f"reliability.min_free_gb need {need / 2**30:.2f} GiB")
