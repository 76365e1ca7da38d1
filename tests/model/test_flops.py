"""training_flops against what the model really runs: torch's FLOP counter for every matmul of a real
forward + backward step, and the model's own attention masks for the attention term."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ettin_train.model import EttinModel, ModelConfig, Packed
from ettin_train.model.flops import training_flops
from ettin_train.objectives import clm, mlm


def tiny(causal: bool) -> ModelConfig:
    return ModelConfig(size=None, num_layers=4, hidden_size=64, intermediate_size=96, num_heads=2, vocab_size=300,
                       sliding_window=8, causal=causal, attention_backend="sdpa")


def batch(lens: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = max(lens)
    ids = torch.randint(5, 300, (len(lens), L), generator=g)
    mask = torch.zeros(len(lens), L, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    labels = torch.full_like(ids, -100)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    labels[chosen] = ids[chosen]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def allowed_pairs(cfg: ModelConfig, attention_mask: torch.Tensor) -> tuple[int, int]:
    """(query, key) pairs among real tokens that the model's global and local masks allow, per layer."""
    packed = Packed.from_mask(attention_mask)
    real = attention_mask.bool()
    pair_real = real[:, :, None] & real[:, None, :]
    count = lambda half: int((packed.sdpa_mask(half, cfg.causal)[:, 0] & pair_real).sum())  # noqa: E731
    return count(-1), count(cfg.sliding_window // 2)


@pytest.mark.parametrize("causal", [False, True])
def test_flops_equal_counted_matmuls_plus_masked_attention(causal):
    cfg = tiny(causal)
    lens = [30, 12, 5, 9]  # longer and shorter than the local window (4 each side)
    b = batch(lens)
    model = EttinModel(cfg)
    objective = clm if causal else mlm
    with FlopCounterMode(display=False) as counter:
        objective.loss(model, b).backward()
    counts = counter.get_flop_counts()["Global"]
    # SDPA on CPU is not counted by torch, so everything torch counts here is a projection (mm / addmm).
    matmuls = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    assert matmuls == sum(counts.values())
    predicted = sum(n - 1 for n in lens) if causal else int((b["labels"] != -100).sum())
    global_pairs, local_pairs = allowed_pairs(cfg, b["attention_mask"])
    n_global = sum(cfg.is_global_layer(i) for i in range(cfg.num_layers))
    attention = 12 * cfg.hidden_size * (n_global * global_pairs + (cfg.num_layers - n_global) * local_pairs)
    assert training_flops(cfg, lens, predicted) == matmuls + attention


def test_flops_hand_example():
    # One bidirectional sequence of 10 tokens, window 2 each side: local pairs 3+4+5*6+4+3 = 44, global 100.
    cfg = ModelConfig(size=None, num_layers=3, hidden_size=2, intermediate_size=1, num_heads=1, vocab_size=5,
                      sliding_window=4, global_attn_every_n_layers=3)
    linear = 6 * 3 * (4 * 2 * 2 + 3 * 2 * 1) * 10
    attention = 12 * 2 * (100 + 2 * 44)
    head = 6 * (2 * 2 + 2 * 5) * 3
    assert training_flops(cfg, [10], 3) == linear + attention + head
    # Causal: global 55 pairs, local each query sees itself and up to 2 before: 1+2+3*8 = 27.
    causal = cfg.replace(causal=True)
    assert training_flops(causal, [10], 9) == linear + 12 * 2 * (55 + 2 * 27) + 6 * (2 * 2 + 2 * 5) * 9
