"""The recipe's `parallel` section turned into Composer's FSDP2 settings, activation checkpointing and
`torch.compile` of the layers, so that the strategy logic reads in one place (the workarounds it needs,
gloo's averaging and the hybrid mesh, are in shims.py).

FSDP2 (`torch.distributed.fsdp.fully_shard`), not FSDP1: Composer 0.32.1's FSDP1 path calls
`torch.cuda.current_device()` and cannot run on a CPU, so only FSDP2 can be tested here.
"""

from __future__ import annotations

import os
from typing import Optional

import torch.distributed as tdist
from composer.utils.parallelism import FSDP2Config

from ettin_train.config.schema import ParallelConfig
from ettin_train.model import EttinModel
from ettin_train.train.shims import HybridFSDP2Config, average_on_gloo, ddp_activation_checkpointing


class ParallelError(ValueError):
    """A parallel setting that does not fit the world this run was launched with."""


def check(cfg: ParallelConfig, world: int) -> None:
    """What the recipe could not know: the world size. Raises ParallelError. (`hybrid` runs on a CPU since
    torch 2.14: torch 2.7's HSDP waited on a CUDA stream event after its all-reduce and was refused there.)"""
    shard_degrees(cfg, world)


def shard_degrees(cfg: ParallelConfig, world: int) -> Optional[int]:
    """The replicate degree of a hybrid run (None for the other strategies)."""
    if cfg.strategy != "hybrid":
        return None
    shard = cfg.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % shard:
        raise ParallelError(f"parallel.shard_size {shard} does not divide the world size {world}")
    return world // shard


def prepare(cfg: ParallelConfig, model: EttinModel, world: int, device_type: str) -> Optional[dict]:
    """Marks which modules FSDP wraps and checkpoints, compiles the layers, and returns the Trainer's
    `parallelism_config` (None for DDP, which Composer applies by itself when world > 1)."""
    layers = list(model.bert.encoder["layers"])
    # Each layer is its own FSDP unit (all-gathered just before it runs); the embeddings, the head and
    # the tied output projection stay in the root unit, as tied weights must share one unit.
    model.fsdp_wrap_fn = lambda module: any(module is layer for layer in layers)
    model.activation_checkpointing_fn = lambda module: any(module is layer for layer in layers)
    if cfg.compile:  # FSDP2's hooks run inside each compiled layer: let dynamo break around them there
        model.compile_layers(fullgraph=cfg.strategy == "ddp")
    if cfg.strategy == "ddp":
        if cfg.activation_checkpointing:
            ddp_activation_checkpointing(model, model.activation_checkpointing_fn)
        return None
    if device_type == "cpu" and tdist.is_initialized() and tdist.get_backend() == "gloo":
        average_on_gloo()
    common = {"reshard_after_forward": cfg.strategy != "shard_grad_op",
              "activation_checkpointing": cfg.activation_checkpointing, "state_dict_type": cfg.checkpoint_format}
    replicate = shard_degrees(cfg, world)
    fsdp = HybridFSDP2Config(replicate_degree=replicate, **common) if replicate else FSDP2Config(**common)
    return {"fsdp": fsdp}


def after_wrap(model: EttinModel) -> None:
    """The objectives call `encode` and `predict`, not `forward`; FSDP2 gathers a unit's parameters
    only around registered methods, so the root unit (embeddings, head) registers both."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        for method in ("encode", "predict"):
            register_fsdp_forward_method(model, method)


# What a collective raises when another process of the run is gone: gloo's transport errors (the peer's socket
# closed because it died, or a timeout because it hangs) and torch.distributed's error classes (NCCL).
_LOST = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe")


def lost_process(error: BaseException, rank: int, last_checkpoint: str | None) -> str | None:
    """One line for a collective that failed because another process of the run is gone (killed, or hung past
    parallel.timeout_s), else None (an error of another kind, to be raised as it is)."""
    if not (isinstance(error, tdist.DistError) or any(s in str(error) for s in _LOST)):
        return None
    first = str(error).strip().splitlines()[0][:200]
    return (f"rank {rank} lost another process of this run ({first}); the launcher names the one that ended first. "
            f"Last complete checkpoint: {last_checkpoint or 'none'}; run the same command to resume from it")


def describe(cfg: ParallelConfig, world: int) -> str:
    """For the start line: how the model is spread."""
    extras = [name for name, on in (("activation checkpointing", cfg.activation_checkpointing),
                                    ("compiled layers", cfg.compile)) if on]
    what = cfg.strategy if world > 1 or cfg.strategy != "ddp" else "single process"
    if cfg.strategy == "hybrid":
        replicate = shard_degrees(cfg, world)
        what += f" (shard groups of {world // replicate} x {replicate} replicas)"
    if cfg.strategy != "ddp":
        what += f", {cfg.checkpoint_format} checkpoints"
    return ", ".join([what] + extras)
