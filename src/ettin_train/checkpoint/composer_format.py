"""The raw Composer checkpoint layout: `ep{E}-ba{B}-rank0.pt` holding `{'state': {'model': ...,
'optimizers': {'StableAdamW': ...}, 'schedulers': {'LambdaLR': ...}, 'timestamp': ...}, 'rng': [...]}`,
with model keys prefixed `model.` (Composer's wrapper attribute).

A run with `parallel.checkpoint_format: sharded` writes instead a `torch.distributed.checkpoint` folder
`ep{E}-ba{B}/` (`.metadata` and one `__{rank}_0.distcp` per rank) holding the same dict; it is read
here on one CPU process with no process group (checkpoint/sharded.py)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ettin_train.checkpoint.safe_load import safe_load
from ettin_train.checkpoint.sharded import load_sharded

# The names Composer gives checkpoints (and latest-rank0.pt, a symlink, is not one of its own).
CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
SHARDED_NAME = re.compile(r"^ep(\d+)-ba(\d+)$")
LATEST = "latest-rank0.pt"


def is_sharded(path: Path) -> bool:
    """A torch.distributed.checkpoint folder (sharded checkpoint)."""
    return path.is_dir() and (path / ".metadata").is_file()


def list_checkpoints(path: str | Path) -> list[Path]:
    """A checkpoint as given, or the checkpoints in a folder (or its `checkpoints/`) in batch order: the
    `ep*-ba*-rank0.pt` files and sharded `ep*-ba*/` folders, not symlinks such as latest-rank0.pt."""
    path = Path(path)
    if path.is_file() or is_sharded(path):
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for folder in (path / "checkpoints", path):
        found = sorted((int(m.group(2)), f) for f in folder.glob("ep*-ba*") if not f.is_symlink() and (
            ((m := CHECKPOINT_NAME.match(f.name)) and f.is_file()) or ((m := SHARDED_NAME.match(f.name)) and is_sharded(f))))
        if found:
            return [f for _, f in found]
    raise FileNotFoundError(f"no checkpoint (ep*-ba*-rank0.pt or a sharded ep*-ba*/ folder) in {path} or {path / 'checkpoints'}")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest checkpoint in a folder (or its `checkpoints/`)."""
    return list_checkpoints(path)[-1]


def load_checkpoint(path: str | Path, trust_pickles: bool = False) -> dict:
    """The whole checkpoint `path` names, on the CPU, refusing types a Composer checkpoint does not hold unless
    `trust_pickles`: a file by safe_load (weights-only), a sharded folder by checkpoint/sharded.py (its metadata
    and non-tensor entries by the same kind of allowlist)."""
    path = find_checkpoint(path)
    if not is_sharded(path):
        return safe_load(path, trust_pickles=trust_pickles)
    return load_sharded(path, trust_pickles)


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights with Composer's `model.` prefix removed: the original FlexBERT key names."""
    state = checkpoint["state"]["model"]
    return {k.removeprefix("model."): v for k, v in state.items()}
