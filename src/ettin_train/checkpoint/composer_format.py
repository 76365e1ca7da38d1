"""The raw Composer checkpoint layout: `ep{E}-ba{B}-rank0.pt` holding `{'state': {'model': ...,
'optimizers': {'StableAdamW': ...}, 'schedulers': {'LambdaLR': ...}, 'timestamp': ...}, 'rng': [...]}`,
with model keys prefixed `model.` (Composer's wrapper attribute)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

_NAME = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest `ep*-ba*-rank0.pt` in a folder (or its `checkpoints/`)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for folder in (path / "checkpoints", path):
        found = [(int(m.group(2)), f) for f in folder.glob("ep*-ba*-rank0.pt") if (m := _NAME.match(f.name))]
        if found:
            return max(found)[1]
    raise FileNotFoundError(f"no checkpoint (ep*-ba*-rank0.pt) in {path} or {path / 'checkpoints'}")


def load_checkpoint(path: str | Path) -> dict:
    # Composer pickles its Timestamp and RNG objects, so this is a full (trusted-file) unpickle.
    return torch.load(find_checkpoint(path), map_location="cpu", weights_only=False)


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights with Composer's `model.` prefix removed: the original FlexBERT key names."""
    state = checkpoint["state"]["model"]
    return {k.removeprefix("model."): v for k, v in state.items()}
