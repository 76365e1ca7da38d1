"""Held-out data for evaluation: a fixed set of rows, the same in every evaluation of every checkpoint.

A held-out source is an MDS folder that training never reads. Its rows are the first `batches * batch_size`
samples of `numpy.random.Generator(PCG64DXSM(seed)).permutation(num_samples)` (a spread sample, not the
first documents), framed as training frames them, in batches of `batch_size`. Row j of the set is masked
with `numpy.random.default_rng([seed, j])` (the MLM collator's rule keyed by j), so every evaluation of
every checkpoint sees the same masks, whatever the number of processes: rank r of W scores rows
[r*B/W, (r+1)*B/W) of each batch, and the sums over ranks are the sums over the batch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ettin_train.data.mds import frame, shm_registration
from ettin_train.objectives import Objective, SpecialTokens


class HeldOutError(ValueError):
    """A held-out source that cannot be used (one line, naming the folder)."""


@dataclass(frozen=True)
class EvalSettings:
    """What fixes the evaluation rows and masks; a table or eval.jsonl is only comparable under the same."""

    batches: int = 4
    batch_size: int = 32
    seq_len: int = 1024
    mask_rate: float = 0.15  # the original's eval masking, fixed across phases (data.mask_rate changes), so curves compare
    seed: int = 1234


def index_digest(folder: str) -> str:
    """sha256 of a source's index.json: the same shards copied to another folder have the same digest."""
    with open(os.path.join(folder, "index.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_disjoint(heldout: list[str], training: list[str]) -> None:
    """Refuses a held-out folder that is a training folder, inside one, holds one, or is a copy of one
    (same index.json, i.e. the same shards). Samples shared between different shard sets are not looked for."""
    train = [(t, os.path.realpath(t), index_digest(t) if os.path.isfile(os.path.join(t, "index.json")) else None)
             for t in training]
    for h in heldout:
        real, digest = os.path.realpath(h), index_digest(h)
        for t, t_real, t_digest in train:
            nested = os.path.commonpath([real, t_real]) in (real, t_real)
            if nested or digest == t_digest:
                how = "is a copy of" if not nested else "is" if real == t_real else "overlaps"
                raise HeldOutError(f"held-out source {h} {how} the training source {t}: evaluation data must be "
                                   "data training never reads")


def read_rows(folder: str, settings: EvalSettings) -> list[np.ndarray]:
    """The held-out rows' raw token ids, read once (they are few) through streaming."""
    from streaming import StreamingDataset

    if not os.path.isfile(os.path.join(folder, "index.json")):
        raise HeldOutError(f"held-out source {folder}: {os.path.join(folder, 'index.json')} does not exist (MDS shards)")
    with shm_registration():
        ds = StreamingDataset(local=folder, shuffle=False, batch_size=settings.batch_size)
    need, have = settings.batches * settings.batch_size, int(ds.num_samples)
    if have < need:
        raise HeldOutError(f"held-out source {folder} holds {have} samples; {settings.batches} batches of "
                           f"{settings.batch_size} need {need}")
    chosen = np.random.Generator(np.random.PCG64DXSM(settings.seed)).permutation(have)[:need]
    return [np.asarray(ds.get_item(int(i))["input_ids"]) for i in chosen]


class HeldOut:
    """The collated batches of one held-out source for one objective, this rank's share of each."""

    def __init__(self, folder: str, objective: Objective, tokens: SpecialTokens, settings: EvalSettings,
                 rows: list[np.ndarray] | None = None):
        self.folder, self.objective, self.settings = folder, objective, settings
        raw = rows if rows is not None else read_rows(folder, settings)
        self.rows = [frame(r, settings.seq_len, tokens, force_sep=not objective.causal) for r in raw]
        self.collate = objective.make_collator(tokens, settings.mask_rate, settings.seed)

    def batches(self, rank: int = 0, world: int = 1):
        b = self.settings.batch_size
        if b % world:
            raise HeldOutError(f"eval batch size {b} is not divisible by the world size {world}")
        share = b // world
        for k in range(self.settings.batches):
            first = k * b + rank * share
            yield self.collate([{"input_ids": self.rows[j], "key": j} for j in range(first, first + share)])
