"""MNTP (LLM2Vec's masked next-token prediction): bidirectional attention, MLM masking, and the hidden
state at position i - 1 predicts the masked token at position i."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ettin_train.model import EttinModel, ModelConfig
from ettin_train.objectives import SpecialTokens, get_objective

TOKENS = SpecialTokens(unk=0, cls=1, sep=2, pad=3, mask=4, vocab_size=1000)


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(size=None, num_layers=2, hidden_size=64, intermediate_size=96, num_heads=1, vocab_size=1000,
                      sliding_window=8, attn_out_dropout=0.0, causal=get_objective("mntp").causal)
    return EttinModel(cfg).eval()


def _batch(mask_rate=0.3):
    rows = [{"input_ids": np.concatenate(([1], np.arange(n) * 11 % 990 + 5, [2])), "key": k} for k, n in enumerate((40, 17, 29))]
    return get_objective("mntp").make_collator(TOKENS, mask_rate, seed=3)(rows)


def test_mntp_is_bidirectional_with_mlm_masks():
    mntp, mlm = get_objective("mntp"), get_objective("mlm")
    assert mntp.causal is False
    rows = [{"input_ids": np.arange(1, 60), "key": 5}]
    a, b = mntp.make_collator(TOKENS, 0.3, seed=21)(rows), mlm.make_collator(TOKENS, 0.3, seed=21)(rows)
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(a[key], b[key])


def test_mntp_loss_predicts_masked_token_from_previous_position():
    model, batch = _model(), _batch()
    logits = model(batch["input_ids"], batch["attention_mask"])  # (batch, seq, vocab), all positions
    losses = []
    for b in range(logits.shape[0]):
        for i in range(1, logits.shape[1]):
            label = int(batch["labels"][b, i])
            if label != -100:
                losses.append(F.cross_entropy(logits[b, i - 1][None].float(), torch.tensor([label])))
    assert len(losses) > 10
    expected = torch.stack(losses).mean()
    got = get_objective("mntp").loss(model, batch)
    torch.testing.assert_close(got, expected)
    # and it is not the MLM loss (the hidden state at i predicting the token at i)
    assert not torch.allclose(got, get_objective("mlm").loss(model, batch))


def test_mntp_never_scores_a_sequence_start_and_survives_no_masks():
    model = _model()
    batch = _batch()
    batch["labels"][:, 1:] = -100
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # a "masked" first token has no previous position
    loss = get_objective("mntp").loss(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad
