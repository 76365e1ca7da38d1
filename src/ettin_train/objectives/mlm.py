"""Masked language modelling: BERT's 80/10/10 masking, the head and loss only on masked positions."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ettin_train.model import Packed
from ettin_train.objectives.base import Objective, SpecialTokens, pad_right


def mask_row(ids: np.ndarray, tokens: SpecialTokens, rate: float, rng: np.random.Generator):
    """Returns (inputs, labels) for one row. Special tokens are never selected; of the selected
    positions 80% become [MASK], 10% a random token, 10% stay (transformers' DataCollatorForLanguageModeling)."""
    labels = np.full(len(ids), -100, dtype=np.int64)
    selected = (rng.random(len(ids)) < rate) & ~np.isin(ids, tokens.all)
    labels[selected] = ids[selected]
    inputs = ids.astype(np.int64, copy=True)
    draw = rng.random(len(ids))
    inputs[selected & (draw < 0.8)] = tokens.mask
    randomised = selected & (draw >= 0.8) & (draw < 0.9)
    inputs[randomised] = rng.integers(0, tokens.vocab_size, size=int(randomised.sum()))
    return inputs, labels


def make_collator(tokens: SpecialTokens, mask_rate: float, seed: int):
    """Masks are a pure function of (seed, sample key), so they do not depend on the world size,
    the number of loader workers, or whether the run was resumed."""

    def collate(samples: list[dict]) -> dict:
        rows, labels = [], []
        for s in samples:
            inputs, lab = mask_row(s["input_ids"], tokens, mask_rate, np.random.default_rng([seed, int(s["key"])]))
            rows.append(inputs)
            labels.append(lab)
        input_ids, attention_mask = pad_right(rows, tokens.pad)
        label_ids, _ = pad_right(labels, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}

    return collate


def loss(model, batch: dict) -> torch.Tensor:
    # The masked positions are found before the layers are queued: their host sync (how many) then waits
    # for the batch's copy to the device only, not for the forward pass, and the head runs on them alone.
    packed = Packed.from_mask(batch["attention_mask"])
    labels = batch["labels"].flatten()[packed.indices]
    scored = (labels != -100).nonzero().squeeze(1)
    hidden, _ = model.encode(batch["input_ids"], batch["attention_mask"], packed)
    if scored.numel() == 0:  # a microbatch without a masked token: contribute nothing, keep the graph
        return hidden.sum() * 0.0
    logits = model.predict(hidden.index_select(0, scored))
    return F.cross_entropy(logits.float(), labels.index_select(0, scored))


MLM = Objective(name="mlm", causal=False, make_collator=make_collator, loss=loss)
