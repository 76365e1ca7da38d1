"""Tokens/s and MFU: the peak table and its overrides, and the FLOPs counted for a real collated batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ettin_train.model import ModelConfig
from ettin_train.model.flops import training_flops
from ettin_train.objectives import SpecialTokens, get_objective
from ettin_train.speed import PEAK_ENV, SpeedWindow, batch_flops, batch_flops_tensor, local_flops_tensor, peak_flops


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", None)])
def test_peak_is_the_cards_dense_bf16_peak(name, peak, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops(name) == peak


def test_recipe_then_environment_override_the_table(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "5e14")
    assert peak_flops("NVIDIA H100 80GB HBM3") == 5e14
    assert peak_flops("NVIDIA H100 80GB HBM3", override=1e15) == 1e15


def _tokens() -> SpecialTokens:
    return SpecialTokens(unk=3, cls=1, sep=2, pad=0, mask=4, vocab_size=64)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_batch_flops_count_real_tokens_and_predicted_positions(objective):
    cfg = ModelConfig(size=None, num_layers=3, hidden_size=64, intermediate_size=96, num_heads=1, vocab_size=64,
                      sliding_window=8, causal=objective == "clm")
    collate = get_objective(objective).make_collator(_tokens(), 0.3, 21)
    rows = [np.arange(5, 5 + n, dtype=np.uint32) for n in (12, 7, 20)]
    batch = collate([{"input_ids": r, "key": i} for i, r in enumerate(rows)])
    if objective == "mlm":
        predicted = int((batch["labels"] != -100).sum())
        assert 0 < predicted < 39
    else:
        predicted = 39 - 3  # every real token but the last of each sequence predicts the next
    assert batch_flops(cfg, batch) == training_flops(cfg, [12, 7, 20], predicted)


def test_window_reports_tokens_per_second_and_mfu_and_restarts():
    window = SpeedWindow(ModelConfig(), peak=1e12, world=2)
    window.start(now=10.0, tokens=1000)
    window.flops = 123  # only this rank's; the report gets the sum over ranks
    rates = window.report(now=12.0, tokens=5000, global_flops=1e12)
    assert rates == {"throughput/tokens_per_sec": 2000.0, "throughput/mfu": 0.25}  # 1e12 / 2 s / (2 x 1e12)
    assert window.flops == 0 and window.tokens == 5000
    no_peak = SpeedWindow(ModelConfig(), peak=None, world=1)
    no_peak.start(0.0, 0)
    no_peak.add({"attention_mask": torch.ones(2, 4)})
    assert no_peak.flops == 0 and "throughput/mfu" not in no_peak.report(1.0, 8, None)


@pytest.mark.parametrize("causal", [False, True])
def test_device_side_flop_count_equals_the_formula_for_every_length(causal):
    """The tensor count (no host sync) equals training_flops for empty rows, rows within the window, at
    its edge and far beyond it, on the published 150m shape (where the sums are large)."""
    cfg = ModelConfig(size="150m", causal=causal)
    lengths = [0, 1, 2, 63, 64, 65, 66, 129, 1000, 1024, 7999]
    mask = (torch.arange(7999)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = torch.full_like(mask, -100)
    labels[:, ::3] = 7
    labels[mask == 0] = -100
    assert int(batch_flops_tensor(cfg, {"attention_mask": mask})) == training_flops(cfg, lengths, sum(lengths) - 10)
    predicted = int((labels != -100).sum())
    assert batch_flops(cfg, {"attention_mask": mask, "labels": labels}) == training_flops(cfg, lengths, predicted)


def test_window_adds_counts_without_reading_them_back():
    cfg = ModelConfig(size=None, num_layers=2, hidden_size=64, intermediate_size=96, num_heads=1, vocab_size=64)
    window = SpeedWindow(cfg, peak=1e12, world=1)
    window.start(0.0, 0)
    batch = {"attention_mask": torch.ones(2, 5, dtype=torch.long)}
    window.add(batch)
    window.add(batch)
    assert isinstance(window.flops, torch.Tensor)  # still a tensor: nothing was read back per step
    assert float(local_flops_tensor(window)[0]) == 2 * training_flops(cfg, [5, 5], 8)
