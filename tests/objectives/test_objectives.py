"""MLM masking (80/10/10, specials untouched, deterministic) and the two losses."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ettin_train.model import EttinModel, ModelConfig
from ettin_train.objectives import SpecialTokens, get_objective
from ettin_train.objectives.mlm import mask_row

TOKENS = SpecialTokens(unk=0, cls=1, sep=2, pad=3, mask=4, vocab_size=1000)


def test_mlm_masks_at_the_rate_with_80_10_10_and_never_specials():
    rng = np.random.default_rng(0)
    ids = np.concatenate(([1], rng.integers(5, 1000, 200_000), [2]))
    inputs, labels = mask_row(ids, TOKENS, 0.3, np.random.default_rng(1))
    selected = labels != -100
    assert abs(selected.mean() - 0.3) < 0.005
    assert labels[0] == -100 and labels[-1] == -100 and inputs[0] == 1 and inputs[-1] == 2
    assert (labels[selected] == ids[selected]).all() and (inputs[~selected] == ids[~selected]).all()
    to_mask = (inputs[selected] == 4).mean()
    kept = (inputs[selected] == ids[selected]).mean()
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.001) < 0.01  # random may hit the same token rarely


def test_mlm_masks_are_a_function_of_seed_and_sample_key():
    collate = get_objective("mlm").make_collator(TOKENS, 0.3, seed=21)
    rows = [{"input_ids": np.arange(1, 60), "key": 5}, {"input_ids": np.arange(1, 40), "key": 9}]
    a, b = collate(rows), collate(rows[::-1])
    torch.testing.assert_close(a["labels"][0], b["labels"][1])  # same sample, same mask, any position in the batch
    c = get_objective("mlm").make_collator(TOKENS, 0.3, seed=22)(rows)
    assert not torch.equal(a["labels"], c["labels"])
    assert a["attention_mask"][1].sum() == 39 and (a["input_ids"][1, 39:] == TOKENS.pad).all()


def _model(causal):
    torch.manual_seed(0)
    cfg = ModelConfig(size=None, num_layers=2, hidden_size=64, intermediate_size=96, num_heads=1, vocab_size=1000,
                      sliding_window=8, attn_out_dropout=0.0, causal=causal)
    return EttinModel(cfg).eval()


def test_mlm_loss_is_cross_entropy_on_masked_positions_only():
    model = _model(False)
    rows = [{"input_ids": np.arange(1, 50) * 7 % 990 + 5, "key": k} for k in range(3)]
    batch = get_objective("mlm").make_collator(TOKENS, 0.3, seed=0)(rows)
    expected = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]).flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(get_objective("mlm").loss(model, batch), expected)


def test_clm_loss_predicts_the_next_token_within_each_sequence():
    model = _model(True)
    rows = [{"input_ids": np.arange(n) * 13 % 990 + 5, "key": 0} for n in (30, 12, 21)]
    batch = get_objective("clm").make_collator(TOKENS, 0.0, seed=0)(rows)
    logits = model(batch["input_ids"], batch["attention_mask"])
    targets = batch["input_ids"].clone()
    targets[batch["attention_mask"] == 0] = -100
    # position t predicts t + 1; a sequence's last real token predicts nothing (no cross-sequence target)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
    torch.testing.assert_close(get_objective("clm").loss(model, batch), expected)
