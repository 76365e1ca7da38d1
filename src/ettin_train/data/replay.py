"""Replay an imported batch order (`data_tools/import_order.py`): step k's global batch is exactly the
order's rows of step k, whatever the world size and the number of loader workers.

Each rank takes a contiguous share of the step's rows (rank r of W: rows [r*B/W, (r+1)*B/W)), so the
ranks' rows concatenated in rank order are the step's rows in order. MLM masks are a pure function of
(seed, phase, step, row). Resuming seeks straight to the next step: Composer hands the dataset the
number of samples consumed, which the step table turns into a step count, so nothing is iterated.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ettin_train.data.mds import DataError, first_pad, frame
from ettin_train.data.order import PHASES, OrderIndex
from ettin_train.objectives.base import SpecialTokens


def mask_key(phase: str, step: int, row: int) -> int:
    """The integer that seeds one row's MLM mask (with the run's seed): unique per (phase, step, row)."""
    return (PHASES.index(phase) << 48) | (step << 16) | row


class ReplayBatches(IterableDataset):
    """Yields this rank's collated share of each step's batch, from `start_step` on, with a `step` field."""

    def __init__(self, order_dir: str, phase: str, rank: int, world: int, seq_len: int, collate,
                 tokens: SpecialTokens | None = None, force_sep: bool = False, truncate: bool = False, remote=None):
        """`tokens`: the recipe's special tokens ([PAD] inside a row is refused; rows are cut with [SEP] when
        `force_sep`); `truncate`: cut rows longer than `seq_len` (data.truncate_long_rows) instead of refusing them;
        `remote`: the order's store (data.order_remote), `order_dir` then being its cache (data/remote.py)."""
        self.index = OrderIndex(order_dir, remote)
        if phase not in self.index.phases:
            raise ValueError(f"data.order_phase: {order_dir} has no phase {phase!r} (it has {', '.join(self.index.phases)})")
        self.order_dir, self.phase, self.rank, self.world = order_dir, phase, rank, world
        self.seq_len, self.collate = seq_len, collate
        self.tokens, self.force_sep, self.truncate = tokens, force_sep, truncate
        self.start_step = 1
        sizes = self.index.batch_sizes(phase)
        self.samples_before = np.concatenate(([0], np.cumsum(sizes)))  # global samples consumed before step k+1

    def __len__(self) -> int:  # the phase's steps (one epoch), as StreamingDataset reports its whole epoch
        return self.index.steps(self.phase)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker w makes steps start+w, start+w+W, ...; the DataLoader takes them round robin, in step order.
        for step in range(self.start_step + worker, self.index.steps(self.phase) + 1, workers):
            yield self.batch(step)

    def batch(self, step: int) -> dict:
        rows = self.index.rows(self.phase, step)
        if len(rows) % self.world:
            raise ValueError(f"{self.order_dir} phase {self.phase} step {step} has {len(rows)} rows, "
                             f"which {self.world} ranks cannot share equally")
        share = len(rows) // self.world
        first = self.rank * share
        samples, cut = [], []
        for row in range(first, first + share):
            ids = rows[row]
            pos = None if self.tokens is None else first_pad(ids, self.tokens)
            if pos is not None:
                shard, sample = self.index.locate(self.phase, step, row)
                raise DataError(f"{shard} sample {sample} (order {self.order_dir} phase {self.phase} step {step} row {row}): "
                                f"[PAD] id {self.tokens.pad} at position {pos} inside the row; the original's loader refuses "
                                f"padding inside a sample, and the loss would score it")
            if len(ids) > self.seq_len:
                if not self.truncate:
                    raise DataError(f"{self.order_dir} phase {self.phase} step {step} row {row} has {len(ids)} tokens, "
                                    f"more than data.seq_len {self.seq_len}")
                ids = frame(ids, self.seq_len, self.tokens, self.force_sep)  # the original's cut (data/mds.py)
            cut.append(len(ids) < len(rows[row]))
            samples.append({"input_ids": ids, "key": mask_key(self.phase, step, row)})
        batch = self.collate(samples)
        batch["step"] = torch.full((share,), step, dtype=torch.long)
        if self.truncate:  # ledger.jsonl counts them (truncated_rows)
            batch["truncated"] = torch.tensor(cut, dtype=torch.long)
        return batch

    # Composer's dataset-resumption protocol (as for StreamingDataset): no dataloader spinning.
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict:
        steps_done = int(np.searchsorted(self.samples_before, num_samples))
        if self.samples_before[steps_done] != num_samples:
            raise ValueError(f"{num_samples} samples do not end a step of {self.order_dir} phase {self.phase}")
        return {"steps_done": steps_done, "fingerprint": self.index.fingerprint, "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.index.fingerprint or state.get("phase") != self.phase:
            raise ValueError(f"the checkpoint was trained on another order (fingerprint {state.get('fingerprint')}, "
                             f"phase {state.get('phase')}) than {self.order_dir} phase {self.phase} ({self.index.fingerprint})")
        self.start_step = state["steps_done"] + 1
