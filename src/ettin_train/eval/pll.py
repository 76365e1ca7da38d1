"""Pseudo-log-likelihood (PLL) of a continuation under a masked language model (Salazar et al. 2020,
"Masked Language Model Scoring", arXiv 1910.14659): each continuation token is masked in turn, alone, and the
log-probabilities the model gives the true token at the masked position are summed. It gives an encoder a
score for the same (context, continuation) pairs a decoder scores by its log-likelihood, so both halves of a
pair answer the same multiple-choice and cloze items (harness.py).

`score` is the batched scorer: an item of n scored positions becomes n rows (the sequence with one position
masked), and the rows of many items go through the model together, `rows_per_batch` at a time, so one forward
scores many masked positions. `score_loop`, one forward per position, is the reference it is checked and
measured against (tests/eval/test_pll.py, benchmarks/pll_cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Item:
    """Token ids of a whole sequence (special tokens included) and the positions whose tokens are scored."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]


def _rows(items: list[Item], mask_id: int) -> list[tuple[int, int, list[int]]]:
    """(item index, masked position, ids with that position masked) for every scored position."""
    rows = []
    for i, item in enumerate(items):
        for p in item.positions:
            ids = list(item.ids)
            ids[p] = mask_id
            rows.append((i, p, ids))
    return rows


def _masked_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary at one position per row ([rows, vocab], float32). A transformers
    ModernBERT runs its head only there (sparse_prediction, as in its training); other models give all logits."""
    if hasattr(model, "sparse_prediction"):
        labels = torch.full_like(ids, getattr(model, "sparse_pred_ignore_index", -100))
        rows = torch.arange(len(ids), device=ids.device)
        labels[rows, positions] = ids[rows, positions].clamp(min=0)
        was = model.sparse_prediction
        model.sparse_prediction = True
        try:
            logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits  # [rows, vocab], row order
        finally:
            model.sparse_prediction = was
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ids), device=ids.device), positions]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def score(model, items: list[Item], mask_id: int, pad_id: int, rows_per_batch: int = 64,
          device: torch.device | str | None = None) -> list[tuple[float, bool]]:
    """(PLL, greedy) per item: the summed log-probability of its tokens at its positions, each masked alone,
    and whether every one of them is the model's top prediction there. Rows are sorted by length, so a batch
    pads little; the sums do not depend on `rows_per_batch`."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = sorted(_rows(items, mask_id), key=lambda r: -len(r[2]))
    totals = [0.0] * len(items)
    greedy = [True] * len(items)
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start:start + rows_per_batch]
        width = len(chunk[0][2])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (_, _, row) in enumerate(chunk):
            ids[j, :len(row)] = torch.tensor(row)
            mask[j, :len(row)] = 1
        positions = torch.tensor([p for _, p, _ in chunk])
        targets = torch.tensor([items[i].ids[p] for i, p, _ in chunk])
        logp = _masked_logprobs(model, ids.to(device), mask.to(device), positions.to(device)).cpu()
        picked = logp[torch.arange(len(chunk)), targets].double()
        top = logp.argmax(-1) == targets
        for j, (i, _, _) in enumerate(chunk):
            totals[i] += float(picked[j])
            greedy[i] = greedy[i] and bool(top[j])
    return list(zip(totals, greedy))


@torch.no_grad()
def score_loop(model, items: list[Item], mask_id: int) -> list[float]:
    """The reference: for each item and position, one forward of the unpadded sequence with that position
    masked, all logits, log-softmax, the true token's log-probability; summed per item."""
    device = next(model.parameters()).device
    out = []
    for item in items:
        total = 0.0
        for p in item.positions:
            ids = torch.tensor([list(item.ids)], device=device)
            ids[0, p] = mask_id
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, p]
            total += float(torch.log_softmax(logits.float(), -1)[item.ids[p]])
        out.append(total)
    return out


def encode_pair(tokenizer, context: str, continuation: str, max_len: int) -> Item:
    """The item of an lm-eval (context, continuation) request for a masked LM: `[CLS] context continuation
    [SEP]`, the continuation's tokens scored. Split as lm-eval's HFLM splits it for a decoder (trailing spaces
    of the context move to the continuation; the continuation's tokens are those of the whole text after the
    context's), so both halves score the same continuation. A context too long loses tokens on its left."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} has no tokens of its own")
    room = max_len - 2 - len(cont)
    if room < 0:
        raise ValueError(f"the continuation {continuation[:40]!r}... has {len(cont)} tokens, more than the model's "
                         f"{max_len} positions hold")
    ctx = ctx[max(0, len(ctx) - room):]
    ids = (tokenizer.cls_token_id, *ctx, *cont, tokenizer.sep_token_id)
    return Item(ids, tuple(range(1 + len(ctx), 1 + len(ctx) + len(cont))))
