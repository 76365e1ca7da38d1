"""The pseudo-log-likelihood scorer: batched (many masked positions per forward, padded rows) it gives what
one forward per position gives, on a real transformers ModernBERT; and on a model whose probabilities are
known, the number worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ettin_train.eval.pll import Item, encode_pair, score, score_loop
from tests.conftest import tiny_masked_lm


def random_items(n: int) -> list[Item]:
    g = torch.Generator().manual_seed(7)
    items = []
    for _ in range(n):
        ctx, cont = int(torch.randint(0, 14, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        body = torch.randint(4, 64, (ctx + cont,), generator=g).tolist()
        items.append(Item((1, *body, 2), tuple(range(1 + ctx, 1 + ctx + cont))))
    return items


def test_batched_scores_equal_one_forward_per_position():
    model = tiny_masked_lm()
    items = random_items(9)  # lengths 3 to 21: rows past the 8-token local window, padded in a batch
    reference = score_loop(model, items, mask_id=3)
    for rows_per_batch in (1, 5, 64):
        got = score(model, items, mask_id=3, pad_id=0, rows_per_batch=rows_per_batch)
        assert [s for s, _ in got] == pytest.approx(reference, abs=1e-5)
    assert len(set(round(r, 3) for r in reference)) == len(reference)  # the items really differ


class LeftNeighbour(torch.nn.Module):
    """Vocabulary of 6, [MASK] = 5. A masked position gives 0.6 to its left neighbour's token and 0.08 to each
    other token; an unmasked one 0.9 to its own token (0.02 each other)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **kwargs):
        b, n = input_ids.shape
        probs = torch.full((b, n, 6), 0.02)
        probs.scatter_(2, input_ids.unsqueeze(-1), 0.9)
        left = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        masked = torch.full((b, n, 6), 0.08).scatter_(2, left.unsqueeze(-1), 0.6)
        probs = torch.where((input_ids == 5).unsqueeze(-1), masked, probs)
        return SimpleNamespace(logits=probs.log())


def test_hand_computed_pll():
    items = [Item((1, 2, 2, 2, 0), (2, 3)),  # each masked alone: both left neighbours are 2 -> log .6 + log .6
             Item((1, 2, 4, 0), (2,)),  # left neighbour 2, token 4 -> log .08, not greedy
             Item((1, 3, 3, 3, 3, 0), (2, 3, 4))]
    got = score(LeftNeighbour(), items, mask_id=5, pad_id=0, rows_per_batch=4)
    # masking all of an item's positions at once would give the second of two neighbours a [MASK] to its left
    assert got[0] == (pytest.approx(2 * math.log(0.6), abs=1e-6), True)
    assert got[1] == (pytest.approx(math.log(0.08), abs=1e-6), False)
    assert got[2] == (pytest.approx(3 * math.log(0.6), abs=1e-6), True)


def test_encode_pair_scores_the_continuation_tokens(tiny_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    item = encode_pair(tok, "Return the number of ", "items in the list.", max_len=64)
    whole = tok("Return the number of items in the list.", add_special_tokens=False)["input_ids"]
    assert item.ids == (tok.cls_token_id, *whole, tok.sep_token_id)
    scored = tok.decode([item.ids[p] for p in item.positions])
    assert scored == " items in the list."  # the context's trailing space goes with the continuation, as in HFLM
    short = encode_pair(tok, "Return the number of ", "items in the list.", max_len=len(item.positions) + 4)
    assert len(short.ids) == len(item.positions) + 4 and short.ids[-len(item.positions) - 1:-1] == item.ids[-len(item.positions) - 1:-1]
    with pytest.raises(ValueError, match="more than the model's"):
        encode_pair(tok, "Return", " items in the list.", max_len=4)
