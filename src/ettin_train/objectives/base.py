"""What every objective shares: the special token ids, right-padding, and the registry entry type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the ModernBERT special tokens in the tokenizer in use (Ettin: 50280-50284)."""

    unk: int
    cls: int
    sep: int
    pad: int
    mask: int
    vocab_size: int  # tokens the tokenizer can emit; random MLM replacements are drawn below it

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialTokens":
        ids = {name: getattr(tok, f"{name}_token_id") for name in ("unk", "cls", "sep", "pad", "mask")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer {tok.name_or_path!r} lacks the special token(s) {', '.join(missing)}")
        return cls(**ids, vocab_size=len(tok))

    @property
    def all(self) -> tuple[int, ...]:
        return (self.unk, self.cls, self.sep, self.pad, self.mask)


def pad_right(rows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to the longest one (as the original collator did); returns input_ids and attention_mask."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@dataclass(frozen=True)
class Objective:
    """A training objective: its attention direction, how a batch is collated, and its loss.

    `make_collator(tokens, mask_rate, seed)` returns a function from a list of samples
    (dicts with `input_ids` and `key`, a stable integer id of the sample) to a batch dict.
    `loss(model, batch)` returns the mean loss over the positions the objective scores.
    `score(model, batch)` returns (logits, targets) of those positions, for evaluation (eval/metrics.py).
    """

    name: str
    causal: bool
    make_collator: Callable
    loss: Callable
    score: Callable
