"""The one function that opens a raw checkpoint file: `torch.load(weights_only=True)` with an allowlist of exactly
the types Composer checkpoints carry, so a downloaded checkpoint cannot run code when it is opened.

A pickle names the callables it needs to rebuild its objects; torch's weights-only unpickler calls only tensors,
plain containers and the allowlist below, and refuses any other name before calling anything. What Composer puts
in a checkpoint beyond tensors and plain Python values (read off real checkpoints with
`torch.serialization.get_unsafe_globals_in_checkpoint`: ours from Composer 0.32.1, and the original runs' layout of
the research's section 3.5, Composer 0.24.1):

- `datetime.timedelta`: the wall-clock fields of every Timestamp (`total_wct`, `batch_wct`, ...), also in the
  saver's list of saved checkpoints;
- numpy's MT19937 state in `rng[*].numpy`: an `ndarray` of `uint32`, named by `_reconstruct` (named
  `numpy._core.multiarray` by numpy 2, `numpy.core.multiarray` by numpy 1, which the original runs may have
  used), `numpy.ndarray` and `numpy.dtype`;
- `torch.torch_version.TorchVersion`: `state.metadata.torch_version` (a str subclass).

The numpy names are not numpy's own functions: the unpickler would run numpy's `__setstate__` on what they return,
and a crafted state gives an object or structured dtype over attacker-chosen bytes (pointers that a later print
follows). They stand for inert records (`_DType`, `_Array`) of what the file asks for; once the load ends each array
is built from its raw bytes as `uint32`, and any other dtype, flags or layout is refused naming the file.

Anything else stops the load with UnsafeCheckpointError naming the type and the file. `trust_pickles` (the recipe's
`checkpoint.trust_pickles`, the tools' `--trust-pickles`) unpickles the whole file instead, for a file the user
trusts. Nothing here imports Composer.
"""

from __future__ import annotations

import datetime
import os
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.torch_version import TorchVersion


class _DType:
    """What `numpy.dtype(spec, align, copy)` and its `__setstate__` were asked for: recorded, never given to numpy."""

    def __init__(self, *args):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state


class _NDArray:
    """Stands for the `numpy.ndarray` class that `_reconstruct` is given."""


class _Array:
    """What `_reconstruct(ndarray, shape, typecode)` and the array's `__setstate__` were asked for; `array()` builds
    it, only as the RNG state's C-ordered uint32 array."""

    def __init__(self, *args):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state

    def array(self) -> np.ndarray:
        state = self.state
        if not (self.args[:1] == (_NDArray,) and isinstance(state, tuple) and len(state) == 5):
            raise ValueError(f"a numpy array it rebuilds with {self.args!r}, not as numpy pickles one")
        _, shape, dtype, fortran, raw = state
        byteorder = _uint32_byteorder(dtype)
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape) and fortran is False
                and type(raw) is bytes and len(raw) == 4 * int(np.prod(shape))):
            raise ValueError("a numpy array whose shape, order or bytes do not fit a uint32 array")
        return np.frombuffer(raw, dtype=np.dtype(f"{byteorder}u4")).reshape(shape).astype(np.uint32)


def _uint32_byteorder(dtype) -> str:
    """'<' or '>' for a recorded dtype that is exactly numpy's pickle of uint32, else ValueError naming it."""
    if isinstance(dtype, _DType) and dtype.args == ("u4", False, True) and isinstance(dtype.state, tuple) \
            and len(dtype.state) == 8 and dtype.state[0] == 3 and dtype.state[1] in ("<", ">") \
            and dtype.state[2:] == (None, None, None, -1, -1, 0):
        return dtype.state[1]
    shown = (dtype.args, dtype.state) if isinstance(dtype, _DType) else type(dtype).__name__
    raise ValueError(f"a numpy dtype {shown!r} that is not the uint32 of an RNG state (an object or structured dtype "
                     "could point anywhere in memory)")


def _arrays(obj):
    """`obj` with every recorded array built (containers rebuilt only where one changed); ValueError for a dtype
    outside an array or an array that is not a plain uint32 one."""
    if isinstance(obj, _Array):
        return obj.array()
    if isinstance(obj, _DType):
        _uint32_byteorder(obj)
        return np.dtype(np.uint32)
    if obj is _NDArray:
        raise ValueError("numpy.ndarray outside an array")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _recorded(v):
                obj[k] = _arrays(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if _recorded(v):
                obj[i] = _arrays(v)
    elif isinstance(obj, tuple) and any(map(_recorded, obj)):
        return type(obj)(*map(_arrays, obj)) if hasattr(obj, "_fields") else tuple(map(_arrays, obj))
    return obj


def _recorded(v) -> bool:
    """Holds, or may hold, a numpy record to build: tensors and plain values are passed over."""
    return isinstance(v, (dict, list, tuple, _Array, _DType)) or v is _NDArray


ALLOWED = [
    datetime.timedelta,
    (_NDArray, "numpy.ndarray"),
    (_DType, "numpy.dtype"),
    (_Array, "numpy._core.multiarray._reconstruct"),
    (_Array, "numpy.core.multiarray._reconstruct"),
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


def safe_load(path: str | Path | IO[bytes], *, trust_pickles: bool = False, mmap: bool = False,
              map_location: Any = "cpu", name: str | None = None) -> Any:
    """`torch.load` of one checkpoint file (or an open one, `name` saying what it is), refusing types outside ALLOWED
    unless `trust_pickles`. `mmap` maps the tensors instead of reading them (preflight reads a few keys of a file of
    any size); a legacy (pre-zip) file cannot be mapped and is read whole."""
    if trust_pickles:
        return _load(path, mmap, map_location, weights_only=False)
    shown = name or (f"{path} (-> {os.path.realpath(path)})" if os.path.islink(path) else str(path))
    try:
        with torch.serialization.safe_globals(ALLOWED):
            loaded = _load(path, mmap, map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refused to open checkpoint {shown}: its pickle needs {_refused(path, e)}, which "
                                    f"a Composer checkpoint does not hold and which could run code; {TRUST_HINT}") from None
    try:
        return _arrays(loaded)
    except ValueError as e:  # a numpy record that is not the RNG state's uint32 array
        raise UnsafeCheckpointError(f"refused to open checkpoint {shown}: its pickle builds {e}, which a Composer "
                                    f"checkpoint does not hold; {TRUST_HINT}") from None


def _load(path, mmap: bool, map_location, weights_only: bool) -> Any:
    if hasattr(path, "seek"):
        path.seek(0)
    if mmap and not hasattr(path, "read"):
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
        if hasattr(path, "seek"):
            path.seek(0)
        names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed_names())
    except Exception:  # noqa: BLE001 - a legacy-format file: its opcodes cannot be listed this way
        names = []
    if names:
        return ", ".join(names)
    lines = [ln.strip() for ln in str(error).splitlines() if "Unsupported global" in ln or "but got" in ln or "GLOBAL" in ln]
    return lines[0] if lines else str(error).splitlines()[0]
