"""Causal language modelling on the packed stream: every real token predicts the next one of its own
sequence; the last token of a sequence predicts nothing, so no prediction crosses a boundary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ettin_train.model import Packed
from ettin_train.objectives.base import Objective, SpecialTokens, pad_right


def make_collator(tokens: SpecialTokens, mask_rate: float, seed: int):
    del mask_rate, seed  # nothing is masked; the original ran its collator with mlm_probability 0

    def collate(samples: list[dict]) -> dict:
        input_ids, attention_mask = pad_right([s["input_ids"] for s in samples], tokens.pad)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    return collate


def loss(model, batch: dict) -> torch.Tensor:
    # Positions with a target are found before the layers are queued (see mlm.loss).
    packed = Packed.from_mask(batch["attention_mask"])
    ids = batch["input_ids"].flatten()[packed.indices]
    has_next = torch.ones_like(ids, dtype=torch.bool)
    has_next[packed.cu_seqlens[1:].long() - 1] = False
    scored = has_next.nonzero().squeeze(1)
    hidden, _ = model.encode(batch["input_ids"], batch["attention_mask"], packed)
    logits = model.predict(hidden.index_select(0, scored))
    return F.cross_entropy(logits.float(), ids.roll(-1).index_select(0, scored))


CLM = Objective(name="clm", causal=True, make_collator=make_collator, loss=loss)
