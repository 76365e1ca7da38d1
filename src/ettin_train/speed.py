"""Tokens per second and MFU (model FLOPs utilisation) for the progress line and the loggers.

MFU = model FLOPs of the steps in a window (`model.flops.training_flops_tensor` over each batch's real
sequence lengths and predicted positions, summed over ranks) / the window's wall time / (world size x
the card's dense bf16 peak). Only on CUDA: a CPU has no meaningful peak, so no MFU is printed there.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ettin_train.model.config import ModelConfig
from ettin_train.model.flops import training_flops_tensor

# Dense (not 2:4 sparse) bf16 tensor-core peak per card, from the vendors' data sheets. Matched in
# order against torch.cuda.get_device_name(), so the PCIe H100 comes before the generic H100 (SXM).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
]

PEAK_ENV = "ETTIN_PEAK_FLOPS"


def peak_flops(device_name: Optional[str], override: Optional[float] = None) -> Optional[float]:
    """The recipe's `logging.peak_flops`, else $ETTIN_PEAK_FLOPS, else the table; None when unknown."""
    if override:
        return float(override)
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    for name, peak in PEAK_BF16_FLOPS:
        if device_name and name.lower() in device_name.lower():
            return peak
    return None


def batch_flops_tensor(cfg: ModelConfig, batch: dict) -> torch.Tensor:
    """Training FLOPs of one device batch (`model.flops.training_flops_tensor`) as an int64 tensor on the batch's
    device, so counting a step never waits for the device (read it at a log interval). Real lengths from the
    attention mask; predicted positions are the labelled ones (MLM, MNTP) or, without labels (CLM), every real
    token but each sequence's last."""
    n = batch["attention_mask"].sum(dim=1, dtype=torch.int64)
    if "labels" in batch:
        predicted = (batch["labels"] != -100).sum(dtype=torch.int64)
    else:
        predicted = n.sum() - (n > 0).sum()
    return training_flops_tensor(cfg, n, predicted)


def batch_flops(cfg: ModelConfig, batch: dict) -> int:
    """`batch_flops_tensor` read as a Python int (a host sync where the batch is on a GPU: not for the loop)."""
    return int(batch_flops_tensor(cfg, batch))


class SpeedWindow:
    """Tokens/s and MFU over the steps since the last report."""

    def __init__(self, cfg: ModelConfig, peak: Optional[float], world: int):
        self.cfg, self.peak, self.world = cfg, peak, world
        self.time = self.tokens = None
        self.flops = 0  # this rank's FLOPs since the last report: 0 or an int64 tensor on the batches' device

    def start(self, now: float, tokens: int) -> None:
        self.time, self.tokens, self.flops = now, tokens, 0

    def add(self, batch: dict) -> None:
        """This rank's batch; counted only when there is a peak to compare with. Adds on the batch's device
        without reading the count back (int64 holds 9.2e18 FLOPs: hours of a GPU at full rate per window)."""
        if self.peak:
            self.flops = self.flops + batch_flops_tensor(self.cfg, batch)

    def report(self, now: float, tokens: int, global_flops: Optional[float]) -> dict[str, float]:
        """The window's rates (tokens are the global clock; global_flops: `flops` summed over ranks),
        then a new window starts."""
        elapsed = max(now - self.time, 1e-9)
        out = {"throughput/tokens_per_sec": (tokens - self.tokens) / elapsed}
        if self.peak and global_flops is not None:
            out["throughput/mfu"] = global_flops / elapsed / (self.world * self.peak)
        self.start(now, tokens)
        return out


def local_flops_tensor(window: SpeedWindow) -> torch.Tensor:
    """This rank's window FLOPs as a float64 tensor of one element to sum over ranks (on the device the
    batches were counted on)."""
    if isinstance(window.flops, torch.Tensor):
        return window.flops.to(torch.float64).reshape(1)
    return torch.tensor([float(window.flops)], dtype=torch.float64)
