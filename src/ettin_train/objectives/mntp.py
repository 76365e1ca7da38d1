"""Masked next-token prediction (MNTP, as in LLM2Vec): the Ettin blog's objective for the encoder trained
from a decoder. Attention is bidirectional and the inputs are masked as for MLM (BERT's 80/10/10, special
tokens never selected), but a masked token at position i is predicted from the final hidden state at
position i - 1 of the same sequence, so the model keeps predicting "the next token" as the decoder did.
A masked token at a sequence's first position has no predecessor and is not scored (with Ettin's data
the first token is always [CLS], which is never masked)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ettin_train.model import Packed
from ettin_train.objectives.base import Objective
from ettin_train.objectives.mlm import make_collator


def loss(model, batch: dict) -> torch.Tensor:
    # Positions are found before the layers are queued (see mlm.loss).
    packed = Packed.from_mask(batch["attention_mask"])
    labels = batch["labels"].flatten()[packed.indices]
    has_previous = torch.ones_like(labels, dtype=torch.bool)
    has_previous[packed.cu_seqlens[:-1].long()] = False  # first token of each sequence
    scored = ((labels != -100) & has_previous).nonzero().squeeze(1)
    hidden, _ = model.encode(batch["input_ids"], batch["attention_mask"], packed)
    if scored.numel() == 0:  # nothing masked in this microbatch: contribute nothing, keep the graph
        return hidden.sum() * 0.0
    logits = model.predict(hidden[scored - 1])  # the previous position of the same (packed) sequence
    return F.cross_entropy(logits.float(), labels[scored])


MNTP = Objective(name="mntp", causal=False, make_collator=make_collator, loss=loss)
