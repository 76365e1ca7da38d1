"""The one function that opens a raw checkpoint file: `torch.load(weights_only=True)` with an allowlist of exactly
the types Composer checkpoints carry, so a downloaded checkpoint cannot run code when it is opened.

A pickle names the callables it needs to rebuild its objects; torch's weights-only unpickler calls only tensors,
plain containers and the allowlist below, and refuses any other name before calling anything. What Composer puts
in a checkpoint beyond tensors and plain Python values (read off real checkpoints with
`torch.serialization.get_unsafe_globals_in_checkpoint`: ours from Composer 0.32.1, and the original runs' layout of
the research's section 3.5, Composer 0.24.1):

- `datetime.timedelta`: the wall-clock fields of every Timestamp (`total_wct`, `batch_wct`, ...), also in the
  saver's list of saved checkpoints;
- numpy's MT19937 state in `rng[*].numpy`: an `ndarray` of `uint32`, rebuilt by `_reconstruct` (named
  `numpy._core.multiarray` by numpy 2, `numpy.core.multiarray` by numpy 1, which the original runs may have
  used), `numpy.dtype`, and `numpy.dtypes.UInt32DType` (numpy >= 1.25 rebuilds a dtype through its class);
- `torch.torch_version.TorchVersion`: `state.metadata.torch_version` (a str subclass).

Anything else stops the load with UnsafeCheckpointError naming the type and the file. `trust_pickles` (the recipe's
`checkpoint.trust_pickles`, the tools' `--trust-pickles`) unpickles the whole file instead, for a file the user
trusts. Nothing here imports Composer.
"""

from __future__ import annotations

import datetime
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
ALLOWED = [
    datetime.timedelta,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    TorchVersion,
]
TRUST_HINT = "if you trust this file, set checkpoint.trust_pickles: true (or pass --trust-pickles to the tool)"


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose pickle needs a type outside the allowlist: one line naming it and the file."""


def allowed_names() -> set[str]:
    names = set()
    for entry in ALLOWED:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def safe_load(path: str | Path, *, trust_pickles: bool = False, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """`torch.load` of one checkpoint file, refusing types outside ALLOWED unless `trust_pickles`.
    `mmap` maps the tensors instead of reading them (preflight reads a few keys of a file of any size); a legacy
    (pre-zip) file cannot be mapped and is read whole."""
    if trust_pickles:
        return _load(path, mmap, map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return _load(path, mmap, map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        shown = f"{path} (-> {os.path.realpath(path)})" if os.path.islink(path) else str(path)
        raise UnsafeCheckpointError(f"refused to open checkpoint {shown}: its pickle needs {_refused(path, e)}, which "
                                    f"a Composer checkpoint does not hold and which could run code; {TRUST_HINT}") from None


def _load(path, mmap: bool, map_location, weights_only: bool) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy format's "mmap can only be used with files saved with ..."
                raise
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def _refused(path, error: Exception) -> str:
    """The names the file's pickle asks for beyond the allowlist (read from its opcodes, nothing called), else the
    line of torch's message that names what it refused."""
    try:
        names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed_names())
    except Exception:  # noqa: BLE001 - a legacy-format file: its opcodes cannot be listed this way
        names = []
    if names:
        return ", ".join(names)
    lines = [ln.strip() for ln in str(error).splitlines() if "Unsupported global" in ln or "but got" in ln or "GLOBAL" in ln]
    return lines[0] if lines else str(error).splitlines()[0]
