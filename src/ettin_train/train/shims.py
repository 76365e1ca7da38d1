"""Every workaround for a gap in the libraries this trainer stands on (Composer 0.32.1, torch, torch-optimi,
wandb), in one place, each with the reason and its test in tests/train/test_shims.py. When a library fixes
its side, the shim and its call site go; nothing else in the package works around a library.
"""

from __future__ import annotations

import inspect
import os
import tarfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as tdist
from composer import Callback, State, Trainer
from composer.callbacks import CheckpointSaver
from composer.loggers import Logger, WandBLogger
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import reproducibility
from composer.utils.parallelism import FSDP2Config

from ettin_train.checkpoint.digest import DigestWriter
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from ettin_train.checkpoint.sharded import SafeReading


def adopt_torchrun_env() -> None:
    """torchrun sets GROUP_RANK where the Composer launcher sets NODE_RANK, which Composer reads (and
    assumes 0 when unset): with torchrun on several nodes every node would call itself node 0."""
    if "GROUP_RANK" in os.environ and "NODE_RANK" not in os.environ:
        os.environ["NODE_RANK"] = os.environ["GROUP_RANK"]


_SIGNAL_PREFIX = "._signal_file_node"


def per_node_signal_files() -> None:
    """Composer 0.32.1's `dist.get_node_signal_file_name` broadcasts rank 0's name, node rank included, to every
    node (mosaicml/llm-foundry#1736). In a run folder the nodes share (NFS, Lustre: the usual case) every node's
    local rank 0 then writes and removes the same file at autoresume and at a checkpoint load, and the second
    removal fails (FileNotFoundError). Each node keeps rank 0's random part and puts in its own node rank."""
    from composer.utils import dist as composer_dist

    broadcast = composer_dist.get_node_signal_file_name
    if getattr(broadcast, "per_node", False):
        return

    def per_node(rng=None) -> str:
        name = broadcast(rng)
        if not name.startswith(_SIGNAL_PREFIX):  # another Composer's format: leave it as it is
            return name
        return f"{_SIGNAL_PREFIX}{composer_dist.get_node_rank()}_{name[len(_SIGNAL_PREFIX):].split('_', 1)[-1]}"

    per_node.per_node = True
    composer_dist.get_node_signal_file_name = per_node


def optimi_triton() -> Optional[bool]:
    """torch-optimi 0.3 picks its Triton kernels whenever Triton is importable, also for CPU tensors, where
    they fail: on a machine without CUDA the foreach kernels are asked for (`triton=False`)."""
    return None if torch.cuda.is_available() else False


@dataclass
class HybridFSDP2Config(FSDP2Config):
    """FSDP2Config with a replicate dimension. Composer builds the device mesh from
    `data_parallel_replicate_degree`, which FSDP2Config pins to None (so plain FSDP2Config is never
    hybrid); a 2-D mesh (replicate, shard) makes fully_shard shard within a group and all-reduce across."""

    replicate_degree: Optional[int] = None

    @property
    def data_parallel_replicate_degree(self) -> Optional[int]:
        return self.replicate_degree


def ddp_activation_checkpointing(model: torch.nn.Module, check_fn) -> None:
    """Composer applies activation checkpointing only with FSDP; for DDP the layers are wrapped here with
    Composer's own helper, so both strategies checkpoint the same modules."""
    from composer.distributed.activation_checkpointing import apply_ac

    apply_ac(model, True, False, check_fn)


_GLOO_PATCHED = False


def average_on_gloo() -> None:
    """gloo has no ReduceOp.AVG, and torch 2.7 used it in two places that FSDP2 on a CPU reaches. torch 2.14
    averages correctly on gloo by itself (measured by tests/train/test_shims.py); the patch, which then computes
    the same, stays for the torch >= 2.11 releases between, where it was not measured:

    - FSDP2's gradient reduce-scatter asks for AVG on fp32 gradients; on gloo the result is the SUM, a
      gradient world-size times DDP's (Adam hides most of it; clipping, SGD and gradient norms do not).
      For gloo groups FSDP2 reduces with SUM and then divides by the data-parallel size: the mean, as DDP
      computes it (torch's own `force_sum_reduction_for_comms`; a torch without it is left as it is).
    - A mean over a sharded DTensor (StableAdamW's RMS of a whole parameter) reduces with AVG and fails.
      On gloo it becomes a SUM divided by the mesh size.

    NCCL groups are untouched. Applied once per process."""
    global _GLOO_PATCHED
    if _GLOO_PATCHED:
        return
    _GLOO_PATCHED = True
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives
    from torch.distributed.tensor.placement_types import Partial

    divide_factors = collectives._get_gradient_divide_factors
    signature = inspect.signature(divide_factors)

    if "force_sum_reduction_for_comms" in signature.parameters:  # ask for torch's own SUM-then-divide on gloo
        def gloo_divide_factors(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if tdist.get_backend(bound.arguments["reduce_scatter_group"]) == "gloo":
                bound.arguments["force_sum_reduction_for_comms"] = True
            return divide_factors(*bound.args, **bound.kwargs)

        collectives._get_gradient_divide_factors = gloo_divide_factors

    reduce_value = Partial._reduce_value

    def gloo_reduce_value(self, tensor, mesh, mesh_dim):
        if self.reduce_op == "avg" and tdist.get_backend(mesh.get_group(mesh_dim)) == "gloo":
            return funcol.all_reduce(tensor, reduceOp="sum", group=(mesh, mesh_dim)) / mesh.size(mesh_dim)
        return reduce_value(self, tensor, mesh, mesh_dim)

    Partial._reduce_value = gloo_reduce_value


def before_each_checkpoint_write(state: State, fn) -> None:
    """Composer has no event before a checkpoint is written (BATCH_CHECKPOINT fires after it, and on every step):
    `fn()` is run inside each CheckpointSaver's write, which all ranks enter together, just before it."""
    for saver in (cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)):
        write = saver._save_checkpoint

        def write_after(state: State, logger: Logger, write=write) -> None:
            fn()
            write(state, logger)

        saver._save_checkpoint = write_after


class RestoreRngMidEpoch(Callback):
    """Composer 0.32.1 restores the saved RNG state on resume only when it spins the dataloader; with a
    dataset that resumes itself (StreamingDataset, our loaders) mid-epoch it never does, so dropout masks
    after a resume differ from an uninterrupted run. This restores it just before the first resumed batch,
    after the dataloader iterator has been created (which draws from the RNG in both runs)."""

    def __init__(self):
        self.rng_state = None

    def take_over(self, trainer: Trainer) -> None:
        """Right after the Trainer is built: take the RNG state Composer loaded but will not apply."""
        if trainer._rng_state is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
            self.rng_state, trainer._rng_state = trainer._rng_state, None

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.rng_state is not None:
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None


class MetricsOnlyWandB(WandBLogger):
    """Composer's autoresume asks every logger for the latest checkpoint, and WandBLogger then calls the
    wandb API, which fails without an API key (offline runs). Checkpoints live in the run folder only."""

    def download_file(self, remote_file_name: str, *args, **kwargs) -> None:
        raise FileNotFoundError(f"{remote_file_name}: checkpoints are not stored in wandb")


_SHARDED_READERS = {name: getattr(composer_checkpoint, name) for name in ("FileSystemReaderWithValidation",
                                                                          "DistCPObjectStoreReader")}
_SAFE_SHARDED_READERS = {name: type(f"Safe{name}", (SafeReading, reader), {}) for name, reader in _SHARDED_READERS.items()}


def route_checkpoint_loads(trust_pickles: bool) -> None:
    """Composer opens checkpoints (autoresume, load_path) with `torch.load(weights_only=False)` in
    `composer.utils.checkpoint._torch_load_with_validation`, which runs any code a pickle names. It goes through
    checkpoint/safe_load.py instead, as every other load here does (`checkpoint.trust_pickles` opts out).
    A sharded checkpoint is read by the storage readers `load_sharded_checkpoint` builds (a local folder, an object
    store), whose torch base unpickles `.metadata` and the non-tensor entries whole; they are given checkpoint/
    sharded.py's reading of both (`SafeReading`)."""

    def load(checkpoint_filepath, map_location):
        path = composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath)
        return safe_load(path, trust_pickles=trust_pickles, map_location=map_location)

    composer_checkpoint._torch_load_with_validation = load
    for name, reader in (_SHARDED_READERS if trust_pickles else _SAFE_SHARDED_READERS).items():
        setattr(composer_checkpoint, name, reader)


class _TarballRefused(BaseException):
    """Raised from inside Composer's `load_checkpoint`, whose retry (of any Exception, 5 times, 34 s of backoff)
    would download the tarball again; `checked_tarballs`' wrapper gives it back as an UnsafeCheckpointError."""


def _inside_only(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Python's `data` extraction filter (no member or link outside the folder, no devices, no setuid bits) that
    also refuses an absolute name instead of writing it below the folder."""
    try:
        if os.path.isabs(member.name):
            raise tarfile.AbsolutePathError(member)
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError as e:
        raise _TarballRefused(f"refused to extract checkpoint tarball: {e}; a Composer checkpoint tarball holds "
                              "only files of its folder") from None


class _CheckedTarFile(tarfile.TarFile):
    extraction_filter = staticmethod(_inside_only)


_composer_load_checkpoint = composer_checkpoint.load_checkpoint


def checked_tarballs() -> None:
    """Composer's `download_checkpoint` extracts a `.tar` load_path (remote or not) member by member with no
    filter, so a member `../../x`, an absolute name or a link out of the folder writes anywhere the process may.
    The module's tarballs are opened as `_CheckedTarFile`, whose default filter refuses each such member before it
    is written; the refusal ends the load at once, as an UnsafeCheckpointError naming the member."""

    def load_checkpoint(path, *args, **kwargs):
        try:
            return _composer_load_checkpoint(path, *args, **kwargs)
        except _TarballRefused as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from None

    composer_checkpoint.tarfile = SimpleNamespace(open=_CheckedTarFile.open)  # its only use of the module: open
    composer_checkpoint.load_checkpoint = load_checkpoint


_original_write = composer_checkpoint._write_checkpoint_file
_digests: dict[str, str] = {}


def digest_checkpoint_writes() -> None:
    """Composer writes a checkpoint in `_write_checkpoint_file`; the replacement writes the same bytes through a
    DigestWriter, so the saver's completion marker gets the file's sha256 without reading the file back."""
    composer_checkpoint._write_checkpoint_file = _write_with_digest


def written_digest(filename: str) -> str | None:
    """The sha256 of the file Composer just wrote under `filename` (taken once), or None if it was not hashed."""
    return _digests.pop(str(filename), None)


def _write_with_digest(state_dict: dict, filename: str) -> None:
    if composer_checkpoint.is_tar(filename) or composer_checkpoint.is_compressed_pt(filename):
        return _original_write(state_dict, filename)  # not a plain file: the saver reads it back instead
    with open(filename, "wb") as f:
        writer = DigestWriter(f)
        torch.save(state_dict, writer)
    _digests[str(filename)] = writer.hexdigest()
