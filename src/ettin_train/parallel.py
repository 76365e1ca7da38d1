"""The recipe's `parallel` section turned into Composer's FSDP2 settings, activation checkpointing and
`torch.compile` of the layers. Like composer_adapter, this module is Composer-facing; it is kept apart
so that the strategy logic reads in one place.

FSDP2 (`torch.distributed.fsdp.fully_shard`), not FSDP1: Composer 0.32.1's FSDP1 path calls
`torch.cuda.current_device()` and cannot run on a CPU, so only FSDP2 can be tested here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as tdist
from composer.utils.parallelism import FSDP2Config

from ettin_train.config.schema import ParallelConfig
from ettin_train.model import EttinModel


@dataclass
class HybridFSDP2Config(FSDP2Config):
    """FSDP2Config with a replicate dimension. Composer builds the device mesh from
    `data_parallel_replicate_degree`, which FSDP2Config pins to None (so plain FSDP2Config is never
    hybrid); a 2-D mesh (replicate, shard) makes fully_shard shard within a group and all-reduce across."""

    replicate_degree: Optional[int] = None

    @property
    def data_parallel_replicate_degree(self) -> Optional[int]:
        return self.replicate_degree


class ParallelError(ValueError):
    """A parallel setting that does not fit the world this run was launched with."""


def adopt_torchrun_env() -> None:
    """torchrun sets GROUP_RANK where the Composer launcher sets NODE_RANK, which Composer reads (and
    assumes 0 when unset): with torchrun on several nodes every node would call itself node 0."""
    if "GROUP_RANK" in os.environ and "NODE_RANK" not in os.environ:
        os.environ["NODE_RANK"] = os.environ["GROUP_RANK"]


def check(cfg: ParallelConfig, world: int, on_gpu: bool) -> None:
    """What the recipe could not know: the device and the world size. Raises ParallelError."""
    if cfg.strategy == "hybrid" and not on_gpu:
        # torch 2.7's HSDP waits on a CUDA stream event after its all-reduce; on a CPU there is none.
        raise ParallelError("parallel.strategy 'hybrid' needs GPUs: torch 2.7's FSDP2 cannot run HSDP on a CPU; "
                            "use full_shard")
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
            # Composer applies activation checkpointing only with FSDP; for DDP we wrap the layers ourselves.
            from composer.distributed.activation_checkpointing import apply_ac

            apply_ac(model, True, False, model.activation_checkpointing_fn)
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


_PATCHED = False


def average_on_gloo() -> None:
    """gloo has no ReduceOp.AVG, and torch 2.7 uses it in two places that FSDP2 on a CPU reaches:

    - FSDP2's gradient reduce-scatter asks for AVG on fp32 gradients; on gloo the result is the SUM, a
      gradient world-size times DDP's (Adam hides most of it; clipping, SGD and gradient norms do not).
      For gloo groups the divide factors become a pre-divide of 1 (so FSDP2 reduces with SUM) and a
      post-divide by the data-parallel size: the mean, as DDP computes it.
    - A mean over a sharded DTensor (StableAdamW's RMS of a whole parameter) reduces with AVG and fails.
      On gloo it becomes a SUM divided by the mesh size.

    NCCL groups are untouched. Applied once per process."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives
    from torch.distributed.tensor.placement_types import Partial

    divide_factors = collectives._get_gradient_divide_factors

    def gloo_divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type=""):
        if tdist.get_backend(reduce_scatter_group) != "gloo":
            return divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type)
        size = reduce_scatter_group.size() * (all_reduce_group.size() if all_reduce_group is not None else 1)
        return 1.0, float(size)

    collectives._get_gradient_divide_factors = gloo_divide_factors

    reduce_value = Partial._reduce_value

    def gloo_reduce_value(self, tensor, mesh, mesh_dim):
        if self.reduce_op == "avg" and tdist.get_backend(mesh.get_group(mesh_dim)) == "gloo":
            return funcol.all_reduce(tensor, reduceOp="sum", group=(mesh, mesh_dim)) / mesh.size(mesh_dim)
        return reduce_value(self, tensor, mesh, mesh_dim)

    Partial._reduce_value = gloo_reduce_value


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
