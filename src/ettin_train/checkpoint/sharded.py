"""Reading a sharded checkpoint (a `torch.distributed.checkpoint` folder: `.metadata` and `__{rank}_0.distcp` files)
without running code from it, as safe_load does for a checkpoint file.

torch.distributed.checkpoint itself unpickles `.metadata` with plain `pickle` and each non-tensor entry of the state
(the clock, the RNG, the callbacks' states, the optimizer's hyperparameters) with a full `torch.load` (not weights-only).
Here `.metadata` is unpickled with a `pickle.Unpickler` whose `find_class` allows exactly the classes that
torch's metadata of a real checkpoint (Composer 0.32.1, FSDP2, torch 2.14) carries, `METADATA_CLASSES`, and each
non-tensor entry goes through safe_load (the allowlist of a checkpoint file); the tensors are read by torch with
`weights_only=True` as before. A folder whose metadata names a data file outside it is refused too.
`trust_pickles` reads the folder with torch's own reader instead.

`load_sharded(folder, keys=...)` reads only the entries under `keys` (e.g. `state.timestamp`): the clock of a
checkpoint of any size costs its metadata and a few hundred bytes. Nothing here imports Composer; `SafeReading` is
also what Composer's own sharded load is given (train/shims.py).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem, metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

from ettin_train.checkpoint.safe_load import TRUST_HINT, UnsafeCheckpointError, safe_load

METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, from torch's own table
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: the folder it was written to
}
DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}  # torch.float32, ...


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, shown: str):
        super().__init__(file)
        self.shown = shown

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES or (module == "torch" and name in DTYPES):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refused to open checkpoint {self.shown}: its pickle needs {module}.{name}, which "
                                    f"the metadata of a sharded checkpoint does not hold and which could run code; {TRUST_HINT}")


def read_metadata(folder: Path) -> metadata.Metadata:
    """The folder's `.metadata`, unpickled with only METADATA_CLASSES, after checking that it names only files of
    the folder."""
    path = Path(folder) / ".metadata"
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f, _shown(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or not a pickle: say which file
            raise ValueError(f"{path} is not a readable checkpoint metadata ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(md, metadata.Metadata) or not isinstance(md.storage_data, dict):
        raise UnsafeCheckpointError(f"refused to open checkpoint {_shown(path)}: it holds a {type(md).__name__}, not the "
                                    "metadata of a sharded checkpoint")
    for info in md.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, filesystem._StorageInfo) or not isinstance(name, str) or Path(name).name != name \
                or name in ("", ".", ".."):
            raise UnsafeCheckpointError(f"refused to open checkpoint {_shown(path)}: it names {name!r} as a data file, "
                                        "which is not a file of its folder")
    return md


def _shown(path: Path) -> str:
    """`path` for a message, with what it resolves to when a link is on the way (`latest-rank0.pt/`)."""
    real = os.path.realpath(path)
    return str(path) if real == os.path.abspath(path) else f"{path} (-> {real})"


class SafeReading:
    """For a FileSystemReader (torch's, or a subclass such as Composer's): the metadata read by read_metadata, the
    non-tensor entries by safe_load."""

    def read_metadata(self, *args, **kwargs) -> metadata.Metadata:
        if kwargs.get("rank") is not None:  # a rank's own metadata (no coordination): not written by Composer
            raise FileNotFoundError(f"{self.path}: only the folder's .metadata is read")
        if getattr(self, "_metadata", None) is None:  # read once: Composer asks for it three times
            self._metadata = read_metadata(Path(self.path))
        return self._metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _SafeBytes(planner, Path(self.path)))


class SafeFileSystemReader(SafeReading, FileSystemReader):
    pass


class _SafeBytes:
    """A DefaultLoadPlanner whose non-tensor entries are opened by safe_load (torch's would unpickle them whole)."""

    def __init__(self, planner, folder: Path):
        self._planner, self._folder = planner, folder

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        loaded = safe_load(value, name=f"{_shown(self._folder)} (entry {fqn})")
        planner = self._planner
        if planner.flatten_state_dict:  # what DefaultLoadPlanner.load_bytes does with what it unpickled
            set_element(planner.original_state_dict, planner.mappings[fqn], loaded)
        else:
            planner.state_dict[fqn] = loaded


def load_sharded(folder: Path, trust_pickles: bool = False, keys: Iterable[str] | None = None,
                 tensors: bool = True) -> dict:
    """The dict of a sharded checkpoint, each tensor put back together from its shards (the same keys as a full
    checkpoint). With `keys` (dotted prefixes such as `state.timestamp`) only the entries under them are read; with
    `tensors` false every non-tensor entry is read and each tensor is a meta tensor of its shape and dtype (nothing
    of the tensors is read)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    reader = FileSystemReader(str(folder)) if trust_pickles else SafeFileSystemReader(str(folder))
    md = reader.read_metadata()  # refused here with its own message: torch's loader would retry and wrap it
    entries = md.state_dict_metadata
    if not tensors:
        keys = [k for k, v in entries.items() if isinstance(v, metadata.BytesStorageMetadata)]
    checkpoint: dict = {}
    try:
        if keys is None or keys:
            _load_state_dict(checkpoint, storage_reader=reader, no_dist=True,
                             planner=_EmptyStateDictLoadPlanner(keys=None if keys is None else set(keys)))
    except CheckpointException as e:
        for exc, _ in e.failures.values():  # torch wraps what a step raised: give back ours as it was
            if isinstance(exc, UnsafeCheckpointError):
                raise exc from None
        raise
    if not tensors:
        for k, v in entries.items():
            if isinstance(v, metadata.TensorStorageMetadata):
                set_element(checkpoint, md.planner_data[k], torch.empty(v.size, dtype=v.properties.dtype, device="meta"))
    return checkpoint
