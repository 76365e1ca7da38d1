"""`ledger.jsonl` without waiting on the device: what each step trained on, written at log intervals.

A ledger line per step holds the step, phase, data step, rows, non-padding tokens, the loss,
`truncated_rows` (only when a replay cuts rows longer than data.seq_len: how many of the step's rows were cut),
`rows_sha256` (sha256 over the step's global rows in order, each row's non-padding ids as little-endian
int32; what data_tools/show_batch.py prints for a step of an order) and `inputs_sha256` (the same over the
model's inputs, after MLM masking).

The bytes come from the host copy of the batch (Composer 0.32.1 hands callbacks the loader's CPU batch at
batch end; a batch on a GPU would be copied back, a sync). The loss stays a device tensor until the flush.
Each rank buffers its part of every step; at a flush (every `interval` steps, before each checkpoint
and at the end of training) one gather brings the buffered parts to rank 0, which hashes and writes the
lines, and one all-reduce averages the losses. A step's global rows are the ranks' rows in rank order.
Nothing here imports Composer: the trainer's callback only calls `add`, `flush` and `truncate_after`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist


@dataclass
class RankPart:
    """One rank's part of one step: its rows' non-padding ids, concatenated in row order, as <i4 bytes."""

    step: int
    data_step: Optional[int]
    rows: int
    tokens: int
    original: bytes  # the labels where MLM masked a position, the inputs elsewhere: the data's own ids
    inputs: bytes
    truncated: Optional[int] = None  # rows cut to data.seq_len (a replay with data.truncate_long_rows), else None


def _host(t) -> np.ndarray:
    return t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def rank_part(step: int, batch: dict) -> RankPart:
    """This rank's part of a step from its batch, vectorised: a boolean index of the (rows, seq) grid is
    row-major, so it yields each row's non-padding ids in order, rows in order."""
    ids, mask = _host(batch["input_ids"]), _host(batch["attention_mask"]).astype(bool)
    original = ids if "labels" not in batch else np.where(_host(batch["labels"]) != -100, _host(batch["labels"]), ids)
    data_step = int(_host(batch["step"]).reshape(-1)[0]) if "step" in batch else None
    truncated = int(_host(batch["truncated"]).sum()) if "truncated" in batch else None
    return RankPart(step=step, data_step=data_step, rows=len(ids), tokens=int(mask.sum()),
                    original=original[mask].astype("<i4").tobytes(), inputs=ids[mask].astype("<i4").tobytes(),
                    truncated=truncated)


def ledger_line(parts: list[RankPart], phase: str, loss: float) -> dict:
    """The ledger line of one step from every rank's part, in rank order (`truncated_rows` only where rows are cut)."""
    line = {"step": parts[0].step, "phase": phase, "data_step": parts[0].data_step,
            "rows": sum(p.rows for p in parts), "tokens": sum(p.tokens for p in parts),
            "rows_sha256": hashlib.sha256(b"".join(p.original for p in parts)).hexdigest(),
            "inputs_sha256": hashlib.sha256(b"".join(p.inputs for p in parts)).hexdigest(),
            "loss": loss}
    if parts[0].truncated is not None:
        line["truncated_rows"] = sum(p.truncated for p in parts)
    return line


class LedgerBuffer:
    """Buffers this rank's steps and writes their lines on rank 0 at a flush. Every rank must call
    `flush` at the same steps (it gathers); `add` never communicates and never waits on the device."""

    def __init__(self, path: Path | str, phase: str):
        self.path, self.phase = Path(path), phase
        self.parts: list[RankPart] = []
        self.losses: list[torch.Tensor] = []

    def truncate_after(self, step: int) -> None:
        """A run killed after its last checkpoint wrote lines for steps it will now train again; a kill in
        the middle of a write leaves a partial last line. Keep the complete lines up to `step` (rank 0)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def add(self, step: int, batch: dict, loss) -> None:
        self.parts.append(rank_part(step, batch))
        # kept on its device; clone: Composer may reuse the tensor it hands over
        self.losses.append(loss.detach().float().reshape(()).clone() if isinstance(loss, torch.Tensor)
                           else torch.tensor(float("nan")))

    def flush(self) -> None:
        """Gather the buffered parts to rank 0 and write one line per step (one gather, one all-reduce)."""
        if not self.parts:
            return
        distributed = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
        losses = torch.stack(self.losses).double()  # the mean in float64, as a Python sum of floats
        if distributed:
            rank, world = tdist.get_rank(), tdist.get_world_size()
            if tdist.get_backend() == "nccl":
                losses = losses.cuda()
            tdist.all_reduce(losses)  # the mean of the ranks' losses: what DDP/FSDP's averaged gradient descends
            losses = losses / world
            gathered = [None] * world if rank == 0 else None
            tdist.gather_object(self.parts, gathered, dst=0)
        else:
            rank, gathered = 0, [self.parts]
        loss_values = losses.tolist()
        self.parts, self.losses = [], []
        if rank != 0:
            return
        lines = [ledger_line([rank_parts[i] for rank_parts in gathered], self.phase, loss_values[i])
                 for i in range(len(gathered[0]))]
        with self.path.open("a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
