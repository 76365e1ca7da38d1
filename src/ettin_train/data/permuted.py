"""Own data without an order: MDS shards read in one global permutation per epoch, the same at any world
size and number of loader workers, optionally a mixture of several sources with weights.

The stream of one source is its epochs' permutations one after another: epoch e is
`numpy.random.Generator(numpy.random.PCG64DXSM(seed + e)).permutation(num_samples)` (the original
`DistributedSamplerPCG64DXSM`, seed = data.shuffle_seed). In a mixture, source i's epoch e uses
`PCG64DXSM([seed, e, i])` instead, so equally sized sources are not shuffled alike. Step k (1-based) takes
the global samples ((k-1)*B, k*B] of the mixed stream; rank r of W takes rows [r*B/W, (r+1)*B/W).

Mixing: the first n samples of the mixed stream hold s_i(n) samples of source i, the Sainte-Lague
(Webster) apportionment of n seats to the weights. It is house monotone (s_i never falls as n grows), so
step k takes s_i(kB) - s_i((k-1)B) >= 0 rows from source i, and |s_i(n) - n*w_i| stays about 1 at
every n. Within a step the rows are in seat order (each seat's priority (j + 1/2) / w_i, ties by source),
so sources are interleaved, not blocked by rank. All of it is computed from k alone: resuming at step k
reads only step k's samples (plus one permutation per source), never earlier batches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ettin_train.data.replay import mask_key
from ettin_train.phases import phase as phase_named


@dataclass(frozen=True)
class SourceSpec:
    """One source of a run: `local` (the MDS folder, or the cache folder of `remote`), `remote`, `split`, weight,
    and `cache`: where streaming writes the decompressed copies of a local folder's zstd shards (data.local_cache;
    None: beside the shards)."""

    key: str  # the recipe key that declared it, for error messages: data or data.sources[i]
    local: str
    remote: str | None
    split: str | None
    weight: float
    cache: str | None = None
    # data.cache_limit, data.download_retry, data.download_timeout: streaming's own settings of the same names
    download: tuple = (None, 2, 60.0)

    def streaming_args(self) -> dict:
        """StreamingDataset's local/remote/split and download settings. With a cache, the shards' folder is
        streaming's `remote` (a local path: it copies each shard into `local` and decompresses it there), so the
        data folder is only read."""
        limit, retry, timeout = self.download
        limit = limit if self.remote or self.cache else None  # evicting from a plain local folder deletes the data
        args = {"cache_limit": limit, "download_retry": retry, "download_timeout": timeout, "split": self.split}
        if self.cache is None:
            return {"local": self.local, "remote": self.remote, **args}
        return {"local": self.cache, "remote": self.local, **args}


def resolve_sources(data) -> list[SourceSpec]:
    """The recipe's sources: `data.sources` (each path relative to data.path), or data.path alone.
    Raises ValueError naming the key of a source that cannot be read."""
    cache = data.local_cache
    if cache is not None and (data.remote or any(s.remote for s in data.sources)):
        raise ValueError("data.local_cache: a source with a remote is already downloaded and decompressed into its path; "
                         "use local_cache only for shards on a local (or mounted) disk")
    if data.cache_limit is not None and cache is None and not (data.remote or any(s.remote for s in data.sources)):
        raise ValueError("data.cache_limit: evicting a shard deletes it from its folder, and without data.remote (or "
                         "data.local_cache) that folder holds the only copy; set it only for shards downloaded into a cache")
    download = (data.cache_limit, data.download_retry, data.download_timeout)
    if not data.sources:
        specs = [SourceSpec("data", data.path, data.remote, data.split, 1.0, cache, download)]
    else:  # one cache folder per source: streaming keeps one dataset per local folder
        specs = [SourceSpec(f"data.sources[{i}]", os.path.join(data.path, s.path), s.remote, s.split, s.weight,
                            None if cache is None else os.path.join(cache, f"source{i}"), download)
                 for i, s in enumerate(data.sources)]
    seen: dict[str, str] = {}
    for s in specs:
        real = os.path.realpath(s.local)
        if real in seen:  # streaming refuses two datasets on one folder, and the mixture would be unclear
            raise ValueError(f"{s.key}.path: {s.local} is also the folder of {seen[real]}")
        seen[real] = s.key
        index = os.path.join(s.local, s.split or "", "index.json")
        if s.remote is None and not os.path.isfile(index):
            raise ValueError(f"{s.key}.path: {index} does not exist (MDS shards, or set {s.key}.remote to download them)")
        if s.cache is not None and os.path.realpath(s.cache) == real:
            raise ValueError(f"data.local_cache: {s.cache} is the shards' own folder ({s.key}.path); leave it unset for that")
    return specs


def apportion(weights: list[Fraction], n: int) -> list[int]:
    """Sainte-Lague seats of a house of n for weights summing to 1; seat j of party i has priority
    (j + 1/2) / w_i, ties go to the lower index. Exact arithmetic, so the same on every machine."""
    seats = [math.floor(n * w + Fraction(1, 2)) for w in weights]  # all seats of priority <= n: a prefix
    while sum(seats) < n:
        i = min(range(len(weights)), key=lambda i: ((seats[i] + Fraction(1, 2)) / weights[i], i))
        seats[i] += 1
    while sum(seats) > n:
        i = max((i for i in range(len(weights)) if seats[i]), key=lambda i: ((seats[i] - Fraction(1, 2)) / weights[i], i))
        seats[i] -= 1
    return seats


class Mixture:
    """Which (source, position in that source's stream) fills each row of a step: arithmetic only, no I/O."""

    def __init__(self, weights: list[float], global_batch: int):
        total = sum(Fraction(w) for w in weights)
        self.weights = [Fraction(w) / total for w in weights]
        self.global_batch = global_batch
        # Integer seat priorities in the same order as (j + 1/2) / w_i: (2j + 1) * scale_i, with w_i = p_i / q
        # and scale_i = lcm(p) / p_i (sorting Fractions cost 0.4 s for a step of 4608 rows).
        q = math.lcm(*(w.denominator for w in self.weights))
        p = [int(w * q) for w in self.weights]
        self._scale = [math.lcm(*p) // p_i for p_i in p]

    def rows(self, step: int) -> list[tuple[int, int]]:
        first, last = (step - 1) * self.global_batch, step * self.global_batch
        if len(self.weights) == 1:
            return [(0, p) for p in range(first, last)]
        before, after = apportion(self.weights, first), apportion(self.weights, last)
        seats = [((2 * j + 1) * self._scale[i], i, j) for i in range(len(self.weights)) for j in range(before[i], after[i])]
        return [(i, j) for _, i, j in sorted(seats)]


class PermutedBatches(IterableDataset):
    """Yields this rank's collated share of each step's global batch from `start_step` on (without end:
    epochs follow each other), with a `step` field. Samples are read by index through streaming."""

    def __init__(self, sources: list[SourceSpec], *, seed: int, global_batch: int, rank: int, world: int, phase: str,
                 seq_len: int, tokens, force_sep: bool, collate):
        from ettin_train.data.mds import FramedMDSDataset

        if global_batch % world:
            raise ValueError(f"train.global_batch {global_batch} is not divisible by the world size {world}")
        self.sources, self.seed, self.phase = sources, seed, phase_named(phase).short  # mask keys use the order's names, as replay does
        self.global_batch, self.rank, self.world, self.collate = global_batch, rank, world, collate
        self.datasets = [FramedMDSDataset(**s.streaming_args(), shuffle=False, batch_size=global_batch // world,
                                          seq_len=seq_len, tokens=tokens, force_sep=force_sep)
                         for s in sources]
        self.sizes = [int(d.num_samples) for d in self.datasets]
        for s, n in zip(sources, self.sizes):
            if n == 0:
                raise ValueError(f"{s.key}.path: {s.local} holds no samples")
        self.mixture = Mixture([s.weight for s in sources], global_batch)
        self.start_step = 1
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation): one epoch kept

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            seed = self.seed + epoch if len(self.sources) == 1 else [self.seed, epoch, source]
            perm = np.random.Generator(np.random.PCG64DXSM(seed)).permutation(self.sizes[source])
            cached = self._perms[source] = (epoch, perm)
        return cached[1]

    def sample_index(self, source: int, position: int) -> int:
        """The sample of `source` at `position` in its stream (epoch after epoch, no sample dropped)."""
        epoch, offset = divmod(position, self.sizes[source])
        return int(self.permutation(source, epoch)[offset])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker w makes steps start+w, start+w+W, ...; the DataLoader takes them round robin, in step order.
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += workers

    def batch(self, step: int) -> dict:
        share = self.global_batch // self.world
        first = self.rank * share
        samples = []
        for row, (source, position) in enumerate(self.mixture.rows(step)[first : first + share], start=first):
            ids = self.datasets[source].get_item(self.sample_index(source, position))["input_ids"]
            # Masks keyed by the place in training, not the sample: a sample met again in a later epoch
            # is masked anew, and the key is the replay's, whatever the world size, workers or resume.
            samples.append({"input_ids": ids, "key": mask_key(self.phase, step, row)})
        batch = self.collate(samples)
        batch["step"] = torch.full((share,), step, dtype=torch.long)
        return batch

    def fingerprint(self) -> dict:
        """What fixes the stream: a checkpoint resumed on other data or settings would silently differ."""
        return {"seed": self.seed, "global_batch": self.global_batch,
                "sources": [[s.key, s.weight, n] for s, n in zip(self.sources, self.sizes)]}

    # Composer's dataset-resumption protocol: `num_samples` is the global samples of this (endless) epoch.
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict:
        steps_done, rest = divmod(num_samples, self.global_batch)
        if rest:
            raise ValueError(f"{num_samples} samples do not end a step of {self.global_batch} (train.global_batch)")
        return {"steps_done": steps_done, "stream": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("stream"), self.fingerprint()
        if saved != now:
            changed = ", ".join(k for k in now if (saved or {}).get(k) != now[k]) or "format"
            raise ValueError(f"the checkpoint's data stream differs from this recipe's in {changed}: "
                             f"checkpoint {saved}, recipe {now}; resume with the same data, or start a new run folder")
        self.start_step = state["steps_done"] + 1
