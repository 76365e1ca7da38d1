"""GPU check of the `parallel` options on one CUDA device, without Composer (the GPU image lacks it):
tokens/s and MFU (ettin_train.speed) of a 150m encoder training step under each variant that
`parallel.prepare` sets up through Composer: no sharding (DDP's compute on one GPU), FSDP2 per layer
(as the wrap function marks it), FSDP2 + activation checkpointing, FSDP2 + compiled layers, and
compiled layers alone. bf16 autocast (amp_bf16). Run: python scripts/check_parallel_gpu.py [--steps 10]."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as tdist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from ettin_train.model import EttinModel, ModelConfig
from ettin_train.objectives import SpecialTokens, get_objective
from ettin_train.speed import batch_flops, peak_flops


def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    tokens = SpecialTokens(unk=0, cls=1, sep=2, pad=3, mask=4, vocab_size=vocab)
    collate = get_objective("mlm").make_collator(tokens, 0.3, seed)
    out = []
    for b in range(n):
        lengths = rng.integers(200, seq + 1, size=batch)  # mixed lengths, as real data (mean ~600 of 1024)
        samples = [{"input_ids": rng.integers(5, vocab, size=int(k)).astype(np.uint32), "key": b * batch + i}
                   for i, k in enumerate(lengths)]
        out.append({k: v.cuda() for k, v in collate(samples).items()})
    return out


def build(variant: str, cfg: ModelConfig) -> EttinModel:
    torch.manual_seed(0)
    model = EttinModel(cfg).cuda()
    layers = list(model.bert.encoder["layers"])
    if "compile" in variant:
        for layer in layers:
            layer.compile()
    if "ac" in variant:
        apply_activation_checkpointing(model, lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                                       check_fn=lambda m: any(m is layer for layer in layers))
    if "fsdp" in variant:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        for method in ("encode", "predict"):
            register_fsdp_forward_method(model, method)
    return model


def measure(variant: str, cfg: ModelConfig, data: list[dict], warmup: int, peak: float | None) -> dict:
    model = build(variant, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = get_objective("mlm").loss
    torch.cuda.reset_peak_memory_stats()
    losses = []

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    compile_start = time.perf_counter()
    for batch in data[:warmup]:
        step(batch)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - compile_start
    timed = data[warmup:]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    flops = sum(batch_flops(cfg, b) for b in timed)
    return {"variant": variant, "tok_s": tokens / seconds, "mfu": flops / seconds / peak if peak else None,
            "step_ms": 1000 * seconds / len(timed), "warmup_s": warm_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="150m")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="eager,fsdp,fsdp+ac,fsdp+compile,compile")
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    tdist.init_process_group("nccl", rank=0, world_size=1)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    print(f"device {name}; dense bf16 peak from ettin_train.speed: {peak}; torch {torch.__version__}", flush=True)
    cfg = ModelConfig(size=args.size, attn_out_dropout=0.0)
    data = batches(args.warmup + args.steps, args.batch, args.seq, cfg.vocab_size)
    for variant in args.variants.split(","):
        try:
            r = measure(variant, cfg, data, args.warmup, peak)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"{variant:14s} {r['tok_s']:>10,.0f} tok/s  MFU {mfu:>6}  step {r['step_ms']:7.1f} ms  "
                  f"warm-up {r['warmup_s']:6.1f} s  peak {r['peak_gib']:5.1f} GiB  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on: one variant failing says what it is, the others still run
            print(f"{variant:14s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        torch.cuda.empty_cache()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
