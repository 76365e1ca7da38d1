"""What verification costs: ettin-export (convert, save, reload with transformers, compare logits, hash, commit)
of one randomly initialised checkpoint against a plain `torch.load` + `to_hf` + `save_pretrained` of the same weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export.py --size 150m --repeats 2

The checkpoint is written in our layout (Composer's `ep0-ba{N}-rank0.pt` with RunMetadata) in a temp dir; the
tokenizer named in it is not available offline, so neither side writes tokenizer files. Each repeat exports a
fresh checkpoint (another N) into the same repository, so every repeat really writes and commits.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.checkpoint.hf import to_hf
from ettin_train.export import main as export_main
from ettin_train.model import EttinModel, ModelConfig


def write_checkpoint(folder: Path, cfg: ModelConfig, step: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = EttinModel(cfg)
    meta = {"phase": "pretrain", "objective": "clm" if cfg.causal else "mlm", "run_name": "bench",
            "model": dataclasses.asdict(cfg), "tokenizer": "jhu-clsp/ettin-encoder-150m", "seq_len": 1024}
    ckpt = {"state": {"model": {f"model.{k}": v for k, v in model.state_dict().items()},
                      "callbacks": {"RunMetadata": meta},
                      "timestamp": {"Timestamp": {"batch": step, "token": step * 1000}}}, "rng": []}
    path = folder / f"ep0-ba{step}-rank0.pt"
    torch.save(ckpt, path)
    return path


def plain(path: Path, cfg: ModelConfig, out: Path) -> None:
    model = EttinModel(cfg)
    model.load_state_dict(model_state_dict(load_checkpoint(path)))
    to_hf(model).save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="150m")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    cfg = ModelConfig(size=args.size, attention_backend="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_export, t_plain = [], []
        for r in range(args.repeats):
            ckpt = write_checkpoint(tmp, cfg, step=100 * (r + 1), seed=r)
            t0 = time.perf_counter()
            plain(ckpt, cfg, tmp / f"plain{r}")
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert export_main([str(ckpt), "--out", str(tmp / "repo")]) == 0
            t_export.append(time.perf_counter() - t0)
        e, b = statistics.median(t_export), statistics.median(t_plain)
        size = (tmp / "plain0" / "model.safetensors").stat().st_size / 2**20
        print(f"{args.size} encoder ({size:.0f} MiB safetensors), {torch.get_num_threads()} threads, median of {args.repeats}:")
        print(f"  plain torch.load + to_hf + save_pretrained: {b:6.2f} s   {[round(t, 2) for t in t_plain]}")
        print(f"  ettin-export (+ reload, logit check, hash, commit, tag): {e:6.2f} s   {[round(t, 2) for t in t_export]}")
        print(f"  ratio export / plain: {e / b:.2f}x")


if __name__ == "__main__":
    main()
