"""The ledger's parts and lines: the same digest as hashing each row on its own (the contract that
data_tools/show_batch.py checks), counts, the rank order of global rows, and the buffered flush on 2 processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from ettin_train.data.ledger import LedgerBuffer, ledger_line, rank_part
from ettin_train.data.order import rows_sha256

PAD = 0


def _batch(rows: list[list[int]], seq: int, left: bool = False, mask_every: int = 0) -> tuple[dict, list, list]:
    """A padded batch of `rows`; MLM-like when mask_every: every k-th real token replaced by 4, label = the id."""
    ids = torch.full((len(rows), seq), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    inputs = []
    for i, row in enumerate(rows):
        at = slice(seq - len(row), seq) if left else slice(0, len(row))
        ids[i, at], mask[i, at] = torch.tensor(row, dtype=torch.long), 1
        real = ids[i, at].clone()
        if mask_every:
            chosen = torch.arange(len(row)) % mask_every == 0
            labels[i, at] = torch.where(chosen, real, torch.full_like(real, -100))
            real[chosen] = 4
            ids[i, at] = real
        inputs.append(real.numpy())
    batch = {"input_ids": ids, "attention_mask": mask, "step": torch.full((len(rows),), 7)}
    if mask_every:
        batch["labels"] = labels
    return batch, [np.array(r) for r in rows], inputs


def test_a_ranks_part_hashes_as_each_row_on_its_own():
    rows = [[5, 6, 7, 8], [], [9], [10, 11, 12, 13, 14, 15]]
    for left in (False, True):
        batch, originals, inputs = _batch(rows, seq=6, left=left, mask_every=2)
        line = ledger_line([rank_part(3, batch)], "pretrain", 1.5)
        assert line == {"step": 3, "phase": "pretrain", "data_step": 7, "rows": 4, "tokens": 11,
                        "rows_sha256": rows_sha256(originals), "inputs_sha256": rows_sha256(inputs), "loss": 1.5}
        assert line["rows_sha256"] != line["inputs_sha256"]  # masking changed the inputs, not the rows


def test_global_rows_are_the_ranks_rows_in_rank_order():
    a, rows_a, _ = _batch([[5, 6], [7]], seq=3)
    b, rows_b, _ = _batch([[8, 9, 10]], seq=3)
    line = ledger_line([rank_part(1, a), rank_part(1, b)], "ext", 0.0)
    assert line["rows"] == 3 and line["tokens"] == 6
    assert line["rows_sha256"] == rows_sha256(rows_a + rows_b) != rows_sha256(rows_b + rows_a)


def test_buffer_writes_at_flush_and_truncation_drops_a_partial_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    buf = LedgerBuffer(path, "pretrain")
    for step in (1, 2, 3):
        buf.add(step, _batch([[5, step]], seq=4)[0], torch.tensor(float(step)))
    assert not path.exists()  # nothing written before the flush
    buf.flush()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    with path.open("a") as f:
        f.write('{"step": 4, "pha')  # a kill in the middle of a write
    buf.truncate_after(2)
    assert [json.loads(x)["loss"] for x in path.read_text().splitlines()] == [1.0, 2.0]


def _two_ranks(rank: int, init: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    buf = LedgerBuffer(Path(out), "pretrain")
    for step in (1, 2):
        rows = [[5 + rank, step], [9]] if rank == 0 else [[20, 21, 22 + step]]
        buf.add(step, _batch(rows, seq=4)[0], torch.tensor(float(step + 2 * rank)))
    buf.flush()
    tdist.destroy_process_group()


def test_two_processes_flush_global_lines_on_rank_zero(tmp_path):
    out = tmp_path / "ledger.jsonl"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for x, step in zip(lines, (1, 2)):
        rows = [np.array([5, step]), np.array([9]), np.array([20, 21, 22 + step])]
        assert x["rows_sha256"] == rows_sha256(rows) and x["rows"] == 3 and x["tokens"] == 6
        assert x["loss"] == (step + (step + 2)) / 2  # the mean of the two ranks' losses
