"""Checks of everything a recipe points at, run once before the Trainer is built, so a bad input stops
the run with one line (exit status 1) before anything is written: the run folder's identity, the shards against
their index (columns, samples), the tokenizer, a remote's index, the sequence length, room on the checkpoint disk
(`check_inputs`, which `train.py --plan` runs too), and the checkpoint a resume would load. It also repairs
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

from ettin_train import stores
from ettin_train.checkpoint.hf import hf_config
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from ettin_train.checkpoint.sharded import load_sharded
from ettin_train.config import Recipe, recipe_to_dict
from ettin_train.data.mds import ShardUnavailable
from ettin_train.data.order import OrderError, OrderIndex
from ettin_train.data.permuted import resolve_sources
from ettin_train.data.remote import order_folder
from ettin_train.data.shard_record import check_folder
from ettin_train.phases import phase as phase_named
from ettin_train.checkpoint.run_folder import checkpoint_bytes, prepare_resume
from ettin_train.checkpoint.run_identity import SHAPE, RunFolderError, check_run_folder
from ettin_train.model import EttinModel
from ettin_train.data.streaming_leftovers import clean_streaming_leftovers

# What an exported config declares (max_position_embeddings) and so what transformers will accept.
MAX_POSITIONS = inspect.signature(hf_config).parameters["max_position_embeddings"].default


class PreflightError(ValueError):
    """One line naming the key, file or step that is wrong."""


def preflight(recipe: Recipe, save_folder: Path) -> None:
    """Every rank calls this; rank 0 checks and repairs, the others take its verdict."""
    spread = tdist.is_available() and tdist.is_initialized()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        clean_streaming_leftovers()  # a killed earlier run's
        atexit.register(clean_streaming_leftovers)  # ours: runs after streaming's own exit handlers (registered later)
    problem = [None]
    if not spread or tdist.get_rank() == 0:
        try:
            for note in check_inputs(recipe):
                print(f"note: {note}", file=sys.stderr, flush=True)
            check_resume(recipe, save_folder)
        except (PreflightError, RunFolderError) as e:
            problem = [str(e)]
    if spread:
        tdist.broadcast_object_list(problem, src=0)
    if problem[0]:
        sys.exit(f"error: {problem[0]}")


def check_inputs(recipe: Recipe) -> list[str]:
    """Every check of what the recipe points at that writes nothing: run by `train.py --plan` and by every start
    (PreflightError or RunFolderError, one line each). Returns notes for what trains, but maybe not as meant."""
    check_run_folder(recipe)  # run_dir: local, and the run it holds is this recipe's
    check_store(recipe)
    rel = recipe.reliability
    if rel.spike_window <= 0 or rel.nonfinite_max_skips < 0 or rel.min_free_gb < 0:
        raise PreflightError(f"reliability.spike_window must be positive and reliability.nonfinite_max_skips and "
                             f"reliability.min_free_gb not negative, got {rel.spike_window}, {rel.nonfinite_max_skips}, {rel.min_free_gb}")
    if recipe.data.seq_len > MAX_POSITIONS:
        raise PreflightError(f"data.seq_len {recipe.data.seq_len} is longer than the {MAX_POSITIONS} positions the model "
                             "supports (max_position_embeddings of its exported config)")
    tokenizer = check_tokenizer(recipe)
    notes = check_data(recipe, tokenizer)
    with torch.device("meta"):
        model = EttinModel(recipe.model)
    check_room(Path(recipe.run_dir) / "checkpoints", checkpoint_bytes(model) + int(rel.min_free_gb * 2**30))
    return notes


def check_data(recipe: Recipe, tokenizer) -> list[str]:
    """The data the recipe points at: its shards against their index (reliability.verify_shards), what they are
    (data/shard_record.py: tokenizer, framing, dtype) against the recipe, a remote's index, and a replayed order's
    row lengths against data.seq_len. Returns notes for what trains but maybe not as meant."""
    data, verify = recipe.data, recipe.reliability.verify_shards
    if data.download_retry < 1 or data.download_timeout <= 0:
        raise PreflightError(f"data.download_retry must be at least 1 (attempts in all) and data.download_timeout "
                             f"positive, got {data.download_retry} and {data.download_timeout}")
    if data.order_remote and not data.order:
        raise PreflightError(f"data.order_remote {data.order_remote}: set data.order too, the local folder its files are "
                             "downloaded into")
    if data.order:
        check_order_rows(recipe)
        return []
    try:
        sources = resolve_sources(data)  # data.path alone, or each of data.sources
    except ValueError as e:
        raise PreflightError(str(e)) from None
    notes = []
    for source in sources:
        folder = Path(source.local) / (source.split or "")  # the shards themselves, or a remote's cache
        if source.remote is not None:
            if not (folder / "index.json").is_file():  # else streaming reads the cached one
                check_remote(source.remote, source.split, f"{source.key}.remote", data.download_timeout)
            continue  # remote shards are checked by streaming as it downloads them
        if verify != "none":
            check_shards(folder, hashes=verify == "hash", key=f"{source.key}.path")
        try:
            notes += check_folder(folder, f"{source.key}.path", data.seq_len, data.tokenizer, lambda: tokenizer)
        except ValueError as e:
            raise PreflightError(str(e)) from None
    return notes


def check_order_rows(recipe: Recipe) -> None:
    """A replayed order's rows are the original's collated batches, cut to that phase's sequence_length; a
    shorter data.seq_len would stop the run at the first longer row. Refused here, unless data.truncate_long_rows."""
    data = recipe.data
    try:
        index = OrderIndex(data.order, order_folder(data))  # from a store: its index and step tables downloaded here
    except ShardUnavailable as e:
        raise PreflightError(str(e)) from None  # names data.order_remote and the URI
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


def check_store(recipe: Recipe) -> None:
    """checkpoint.remote: a store folder that can be listed (credentials, bucket), for full checkpoints."""
    remote = recipe.checkpoint.remote
    if remote is None:
        return
    if recipe.parallel.checkpoint_format == "sharded":
        raise PreflightError(f"checkpoint.remote {remote}: sharded checkpoints (parallel.checkpoint_format: sharded) are not "
                             "uploaded yet; use parallel.checkpoint_format: full with checkpoint.remote")
    try:
        stores.check_reachable(remote)
    except stores.StoreError as e:
        raise PreflightError(str(e)) from None


def check_resume(recipe: Recipe, save_folder: Path) -> None:
    """Rank 0 at a start: a newer complete checkpoint in checkpoint.remote brought into the run folder, the folder
    repaired after a crash, and the checkpoint a resume loads checked."""
    remote = recipe.checkpoint.remote
    if remote and recipe.checkpoint.autoresume:
        try:
            stores.restore(remote, Path(recipe.run_dir), lambda held: check_run_folder(recipe, held, remote),
                           recipe.checkpoint.verify_digest)
        except stores.StoreError as e:
            raise PreflightError(str(e)) from None
    resume_from = prepare_resume(save_folder, recipe.checkpoint.verify_digest) if recipe.checkpoint.autoresume else None
    if resume_from is not None:
        check_resume_checkpoint(resume_from, recipe)


def check_tokenizer(recipe: Recipe):
    """data.tokenizer loads (a folder here, or a Hub name reachable or cached) and fits model.vocab_size; returns it."""
    from transformers import AutoTokenizer

    from ettin_train.objectives import SpecialTokens

    name = recipe.data.tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        tokens = SpecialTokens.from_tokenizer(tokenizer)
    except Exception as e:  # noqa: BLE001 - a typo'd path, no network, no such repository: one line
        where = "no such folder, nor a Hub tokenizer that can be loaded" if not os.path.exists(name) else "not a tokenizer folder"
        raise PreflightError(f"data.tokenizer {name}: {where} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if tokens.vocab_size > recipe.model.vocab_size:
        raise PreflightError(f"tokenizer {name} has {tokens.vocab_size} tokens, more than model.vocab_size {recipe.model.vocab_size}")
    return tokenizer


def check_remote(remote: str, split: str | None, key: str, timeout: float = 60.0) -> None:
    """The remote's index.json downloads (streaming's own downloader, so its credentials and endpoint settings): a
    bucket without credentials, or a wrong path, is one line here instead of a traceback from a loader worker."""
    import tempfile

    from streaming.base.storage.download import CloudDownloader

    url = "/".join([remote.rstrip("/"), *(p.strip("/") for p in (split or "", "index.json") if p)])  # /abs stays absolute
    with tempfile.TemporaryDirectory(prefix="ettin-remote-") as tmp:
        try:
            CloudDownloader.direct_download(url, os.path.join(tmp, "index.json"), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - whatever the store says, on one line
            hint = ""
            if remote.startswith("s3://"):
                import boto3

                if boto3.Session().get_credentials() is None:
                    hint = "; no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials)"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PreflightError(f"{key} {remote}: cannot download {url} ({type(e).__name__}: {first}){hint}") from None


def check_shards(folder: Path, hashes: bool, key: str = "data.path") -> None:
    """Every shard that `index.json` lists is there with its recorded size (and hash, if asked)."""
    index = folder / "index.json"
    if not index.is_file():
        raise PreflightError(f"{key}: {index} not found (an MDS folder has an index.json)")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (ValueError, KeyError) as e:
        raise PreflightError(f"{key}: {index} is not an MDS index ({type(e).__name__}: {e})") from None
    if not sum(int(shard.get("samples", 0)) for shard in shards):
        raise PreflightError(f"{key}: {index} lists no samples (an empty MDS folder: was the tokenizer run cut short?)")
    for shard in shards:
        check_columns(shard, index, key)
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


INTEGER_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def check_columns(shard: dict, index: Path, key: str) -> None:
    """Training reads `input_ids`, an integer ndarray; an MDS shard says its columns and their encodings."""
    columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
    if "column_names" not in shard:
        return  # not the MDS format (json, xsv): streaming reports it
    if "input_ids" not in columns:
        raise PreflightError(f"{key}: {index} has no column input_ids (its columns: {', '.join(columns) or 'none'}); "
                             "training reads token ids from input_ids")
    encoding = columns["input_ids"]
    kind, _, dtype = encoding.partition(":")
    if kind != "ndarray" or (dtype and dtype not in INTEGER_DTYPES):
        raise PreflightError(f"{key}: column input_ids of {index} is encoded {encoding}, not an integer ndarray "
                             "(e.g. ndarray:uint32, as data/shards.py writes it)")


def check_resume_checkpoint(path: Path, recipe: Recipe) -> None:
    """The checkpoint a resume loads must be of this recipe's objective and model shape (its RunMetadata)."""
    try:  # of a sharded checkpoint (a torch.distributed.checkpoint folder) all but the tensors are read
        ckpt = load_sharded(path, recipe.checkpoint.trust_pickles, tensors=False) if path.is_dir() \
            else safe_load(path, trust_pickles=recipe.checkpoint.trust_pickles, mmap=True)
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
    differ = [f"model.{k} {meta['model'][k]} vs {ours[k]}" for k in SHAPE if meta["model"].get(k) != ours[k]]
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
