"""Run under `torchrun --nproc_per_node 2` on CPU (gloo) by tests/train/test_shims.py: one training step of a
tiny Ettin decoder with DDP's gradient (all-reduced mean) and under FSDP2 (fully_shard per layer, as train/parallel.prepare wraps it), each
rank on its own batch. Prints the FSDP/DDP gradient ratio without and with shims.average_on_gloo(),
and the largest parameter difference after one StableAdamW step; exits 1 if the patched run differs."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as tdist
from optimi import StableAdamW
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from ettin_train.model import EttinModel, ModelConfig
from ettin_train.objectives import get_objective
from ettin_train.train import shims


def fsdp_copy(model: EttinModel) -> EttinModel:
    sharded = copy.deepcopy(model)
    for layer in sharded.bert.encoder["layers"]:
        fully_shard(layer)
    fully_shard(sharded)
    for method in ("encode", "predict"):
        register_fsdp_forward_method(sharded, method)
    return sharded


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()}


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}


def main() -> int:
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    torch.manual_seed(0)
    cfg = ModelConfig(size=None, num_layers=2, hidden_size=64, intermediate_size=96, num_heads=1, vocab_size=128,
                      sliding_window=16, causal=True, attn_out_dropout=0.0)
    model = EttinModel(cfg)
    loss_fn = get_objective("clm").loss
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch, as in data parallelism
    batch = {"input_ids": torch.randint(5, 128, (4, 24), generator=gen), "attention_mask": torch.ones(4, 24, dtype=torch.long)}
    batch["attention_mask"][1, 20:] = 0

    # DDP's gradient: each rank's own, all-reduced and divided by the world size.
    ddp_model = copy.deepcopy(model)
    loss_fn(ddp_model, batch).backward()
    for p in ddp_model.parameters():
        tdist.all_reduce(p.grad)
        p.grad /= tdist.get_world_size()
    reference = grads(ddp_model)

    def fsdp_grads() -> tuple[EttinModel, dict[str, torch.Tensor]]:
        sharded = fsdp_copy(model)
        loss_fn(sharded, batch).backward()
        return sharded, grads(sharded)

    _, unpatched = fsdp_grads()
    shims.average_on_gloo()
    sharded, patched = fsdp_grads()
    key = "bert.encoder.layers.1.mlp.Wi.weight"
    ratio_before = float(unpatched[key].norm() / reference[key].norm())
    ratio_after = float(patched[key].norm() / reference[key].norm())
    grad_diff = max(float((patched[n] - reference[n]).abs().max()) for n in reference)

    # One optimizer step each: StableAdamW's RMS over a sharded parameter reduces across ranks (AVG).
    for m in (ddp_model, sharded):
        opt = StableAdamW(m.parameters(), lr=1e-2, triton=False)
        opt.step()
    step_diff = max(float((a - b).abs().max()) for a, b in zip(params(ddp_model).values(), params(sharded).values()))
    if rank == 0:
        print(f"grad ratio FSDP/DDP without patch {ratio_before:.4f} with patch {ratio_after:.4f}; "
              f"max grad diff {grad_diff:.2e}; max param diff after a StableAdamW step {step_diff:.2e}", flush=True)
    tdist.destroy_process_group()
    return 0 if grad_diff < 1e-6 and step_diff < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
