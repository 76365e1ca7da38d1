"""The published batch order (`jhu-clsp/ettin-data-order`): validate, import, and read it back by step.

The published order is parquet, one row per sequence: `input_ids` (list<uint16>, right-padded with
[PAD]) and `step` (uint64, 1-based within the phase), schema metadata `sequence_length`, in phase
folders `checkpoint_*` (pre-training), `ext_*` (mid-training) and `decay_*`, files
`steps_{a:06d}_to_{b:06d}.parquet`. Batch sizes vary from step to step (batch-size warmup).

`validate_and_import` checks all of it first and only then writes, per phase, uncompressed MDS shards
of the rows (non-padding ids as uint32 `input_ids`, plus `step` and `row`, the row's place in its
batch) and a step table (first global sample index, batch size) into a temporary folder that is
renamed to `out_dir` at the end. `OrderIndex` opens the result, checks its fingerprint, and reads a
step's rows by seeking: the cost does not depend on the step number.

No Composer import here: the trainer's replay loader builds on `OrderIndex`.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ettin_train.phases import PHASES as ALL_PHASES, SHORT_NAMES

# Published folder prefix -> the order's phase name (ettin_train.phases: short names pretrain, ext, decay).
PHASE_PREFIXES = {p.order_dir: p.short for p in ALL_PHASES}
PHASES = SHORT_NAMES
FILE_RE = re.compile(r"^steps_(\d+)_to_(\d+)\.parquet$")
FOLDER_RE = re.compile(rf"^({'|'.join(PHASE_PREFIXES)})_(\d+)$")
INDEX_NAME = "order_index.json"
FORMAT = "ettin-order-v1"
COLUMNS = {"input_ids": "ndarray:uint32", "step": "int", "row": "int"}
READ_BATCH_ROWS = 8192


class OrderError(ValueError):
    """One violation of the published order format, or a damaged import: one line naming the file,
    and where it applies the row (0-based index within the file) and the step."""

    def __init__(self, file: str, message: str, row: int | None = None, step: int | None = None):
        self.file, self.row, self.step, self.message = str(file), row, step, message
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if step is not None:
            where.append(f"step {step}")
        super().__init__(f"{', '.join(where)}: {message}")


# ----------------------------------------------------------------------------------------------
# the digest of a step's rows (SPEC: ledger.jsonl and show_batch.py print the same)


def rows_sha256(rows: Sequence[np.ndarray], pad_id: int | None = None) -> str:
    """sha256 over the step's rows in order, each row's non-padding token ids as little-endian int32.
    Rows from `OrderIndex.rows` carry no padding; for right-padded rows pass `pad_id` and the
    trailing pad ids of each row are left out."""
    h = hashlib.sha256()
    for row in rows:
        ids = np.asarray(row).reshape(-1)
        if pad_id is not None:
            keep = np.flatnonzero(ids != pad_id)
            ids = ids[: keep[-1] + 1] if len(keep) else ids[:0]
        h.update(ids.astype("<i4", copy=False).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# finding and validating the published files


@dataclass
class OrderFile:
    path: Path
    rel: str  # path relative to the order folder, as named in errors
    first: int  # step range from the file name
    last: int


@dataclass
class PhaseSource:
    phase: str
    folders: list[str] = field(default_factory=list)
    files: list[OrderFile] = field(default_factory=list)


def discover(order_dir: str | Path, phase: str | None = None) -> list[PhaseSource]:
    """The phase folders and their files, in order (folders by number, files by first step)."""
    root = Path(order_dir)
    if not root.is_dir():
        raise OrderError(str(root), "is not a folder")
    if phase is not None and phase not in PHASES:
        raise OrderError(str(root), f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    found: dict[str, list[tuple[int, str]]] = {}
    for entry in sorted(root.iterdir()):
        m = FOLDER_RE.match(entry.name)
        if entry.is_dir() and m:
            found.setdefault(PHASE_PREFIXES[m.group(1)], []).append((int(m.group(2)), entry.name))
    phases = [p for p in PHASES if p in found and (phase is None or p == phase)]
    if not phases:
        want = f"a {phase} folder ({next(k for k, v in PHASE_PREFIXES.items() if v == phase)}_*)" if phase else \
            "phase folders (checkpoint_*, ext_*, decay_*)"
        raise OrderError(str(root), f"holds no {want}")
    out = []
    for p in phases:
        src = PhaseSource(p)
        for _, name in sorted(found[p]):
            src.folders.append(name)
            files = []
            for f in (root / name).iterdir():
                if f.suffix != ".parquet":
                    continue
                m = FILE_RE.match(f.name)
                rel = f"{name}/{f.name}"
                if not m:
                    raise OrderError(rel, "file name is not steps_AAAAAA_to_BBBBBB.parquet")
                a, b = int(m.group(1)), int(m.group(2))
                if a > b:
                    raise OrderError(rel, f"file name's step range {a}..{b} is empty", step=a)
                files.append(OrderFile(f, rel, a, b))
            src.files.extend(sorted(files, key=lambda x: x.first))
        if not src.files:
            raise OrderError(f"{root}/{src.folders[0]}", f"phase {p} has no steps_*.parquet files")
        out.append(src)
    return out


@dataclass
class Chunk:
    """A validated slice of one file: rows as (n, width) ids, their lengths and steps."""

    ids: np.ndarray
    lengths: np.ndarray
    steps: np.ndarray
    first_row: int  # index in the file of the chunk's first row


def _read_file(f: OrderFile, vocab_size: int, pad_id: int) -> Iterator[Chunk]:
    """Reads one published file in slices, checking its format; raises OrderError on a violation."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # noqa: BLE001 - truncated or not parquet: the footer does not parse
        raise OrderError(f.rel, f"unreadable parquet file (truncated?), steps {f.first}..{f.last} by its name: "
                         f"{type(e).__name__}: {e}".splitlines()[0]) from None
    schema = pf.schema_arrow
    for col in ("input_ids", "step"):
        if col not in schema.names:
            raise OrderError(f.rel, f"has no {col!r} column (columns: {', '.join(schema.names)})")
    meta = schema.metadata or {}
    try:
        width = int(meta[b"sequence_length"])
    except (KeyError, ValueError):
        raise OrderError(f.rel, "schema metadata has no integer 'sequence_length'") from None
    t = schema.field("input_ids").type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_integer(t.value_type):
        raise OrderError(f.rel, f"'input_ids' is {t}, expected list<uint16>")
    row0 = 0
    try:
        batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=["input_ids", "step"])
        for batch in batches:
            col, steps = batch.column("input_ids"), batch.column("step")
            n = len(batch)
            if col.null_count or steps.null_count:
                bad = int(np.flatnonzero(np.asarray(pc.or_(pc.is_null(col), pc.is_null(steps))))[0])
                raise OrderError(f.rel, "null input_ids or step", row=row0 + bad)
            steps_np = steps.to_numpy().astype(np.int64)
            lens = np.asarray(pc.list_value_length(col)).astype(np.int64)
            if (lens != width).any():
                bad = int(np.flatnonzero(lens != width)[0])
                raise OrderError(f.rel, f"row has {lens[bad]} ids, but the schema metadata sequence_length is {width}",
                                 row=row0 + bad, step=int(steps_np[bad]))
            ids = np.asarray(col.flatten()).astype(np.int64).reshape(n, width)
            is_pad = ids == pad_id
            # right padding only: no pad id followed by a non-pad id
            left = is_pad[:, :-1] & ~is_pad[:, 1:]
            if left.any():
                bad = int(np.flatnonzero(left.any(axis=1))[0])
                pos = int(np.flatnonzero(left[bad])[0])
                raise OrderError(f.rel, f"pad id {pad_id} at position {pos} is followed by a non-pad id (padding must be on the right)",
                                 row=row0 + bad, step=int(steps_np[bad]))
            lengths = width - is_pad.sum(axis=1)
            if (lengths == 0).any():
                bad = int(np.flatnonzero(lengths == 0)[0])
                raise OrderError(f.rel, "row is all padding", row=row0 + bad, step=int(steps_np[bad]))
            oov = ids >= vocab_size
            if oov.any():
                bad = int(np.flatnonzero(oov.any(axis=1))[0])
                pos = int(np.flatnonzero(oov[bad])[0])
                raise OrderError(f.rel, f"token id {ids[bad, pos]} at position {pos} is not below vocab_size {vocab_size}",
                                 row=row0 + bad, step=int(steps_np[bad]))
            yield Chunk(ids, lengths, steps_np, row0)
            row0 += n
    except OrderError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged page or row group
        raise OrderError(f.rel, f"unreadable parquet data after row {row0}: {type(e).__name__}: {e}".splitlines()[0],
                         row=row0) from None
    if row0 == 0:
        raise OrderError(f.rel, "has no rows", step=f.first)


class _StepChecker:
    """Checks that a phase's steps start at 1 and increase by one without gaps, file after file,
    and that each file's rows cover exactly the step range in its name. Counts batch sizes."""

    def __init__(self):
        self.last = 0  # last step seen in the phase
        self.sizes: list[int] = []  # batch size of step k at index k - 1

    def file(self, f: OrderFile, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        if f.first != self.last + 1:
            what = "the phase's first step must be 1" if self.last == 0 else f"the previous file ends at step {self.last}"
            raise OrderError(f.rel, f"file name starts at step {f.first}, but {what}", row=0, step=f.first)
        for c in chunks:
            s = c.steps
            prev = np.concatenate(([self.last], s[:-1]))
            d = s - prev
            bad = np.flatnonzero((d != 0) & (d != 1))
            if c.first_row == 0 and len(s) and s[0] != f.first:
                bad = np.concatenate(([0], bad))
            if len(bad):
                i = int(bad[0])
                p = int(prev[i])
                why = (f"steps must increase by one without gaps; step {s[i]} follows step {p}" if s[i] > p
                       else f"steps must not decrease; step {s[i]} follows step {p}")
                if c.first_row + i == 0:
                    why = f"first row's step is {s[0]}, but the file name starts at step {f.first}"
                raise OrderError(f.rel, why, row=c.first_row + i, step=int(s[i]))
            if len(s) and s[-1] > f.last:
                i = int(np.flatnonzero(s > f.last)[0])
                raise OrderError(f.rel, f"step {s[i]} is beyond the file name's range {f.first}..{f.last}",
                                 row=c.first_row + i, step=int(s[i]))
            steps, counts = np.unique(s, return_counts=True)
            for st, n in zip(steps.tolist(), counts.tolist()):
                if st == len(self.sizes):
                    self.sizes[-1] += n
                else:
                    self.sizes.append(n)
            self.last = int(s[-1])
            yield c
        if self.last != f.last:
            raise OrderError(f.rel, f"rows end at step {self.last}, but the file name says {f.last}", step=self.last)


# ----------------------------------------------------------------------------------------------
# importing


def _phase_digests(step_table: np.ndarray, shard_hashes: list[str]) -> tuple[str, str]:
    table = hashlib.sha256(np.ascontiguousarray(step_table, dtype="<i8").tobytes()).hexdigest()
    shards = hashlib.sha256("\n".join(shard_hashes).encode()).hexdigest()
    return table, shards


def _fingerprint(phases: dict[str, dict]) -> str:
    """sha256 over each phase's name, the digest of its step table and the digest of its shards' hashes
    (as OLMo-core fingerprints its data: the order and the content it points at)."""
    h = hashlib.sha256()
    for name in sorted(phases):
        p = phases[name]
        h.update(f"{name}\n{p['step_table_sha256']}\n{p['shards_sha256']}\n".encode())
    return h.hexdigest()


def _shard_hashes(index_json: Path) -> list[str]:
    obj = json.loads(index_json.read_text())
    return [s["raw_data"]["hashes"]["sha256"] for s in obj["shards"]]


def validate(order_dir: str | Path, vocab_size: int, pad_id: int, phase: str | None = None,
             progress: Callable[[str], None] | None = None) -> list[PhaseSource]:
    """Reads the whole published order (or one phase) and checks it; raises the first OrderError."""
    sources = discover(order_dir, phase)
    for src in sources:
        checker = _StepChecker()
        for f in src.files:
            collections.deque(checker.file(f, _read_file(f, vocab_size, pad_id)), maxlen=0)  # run every check, keep nothing
            if progress:
                progress(f"checked {f.rel}: steps {f.first}..{f.last}")
    return sources


def validate_and_import(order_dir: str | Path, out_dir: str | Path, vocab_size: int, pad_id: int,
                        phase: str | None = None, progress: Callable[[str], None] | None = None,
                        shard_size_limit: int = 1 << 27) -> dict:
    """Validates the published order in `order_dir` (all phases, or `phase`), then imports it into
    `out_dir`, which must not exist. Nothing is written before every file has been checked, and the
    import is built in a temporary folder beside `out_dir` and renamed at the end. Returns the index."""
    from streaming import MDSWriter

    out = Path(out_dir)
    if out.exists():
        raise OrderError(str(out), "already exists; refusing to overwrite an imported order (remove it or pick another --out)")
    sources = validate(order_dir, vocab_size, pad_id, phase, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        index: dict = {"format": FORMAT, "vocab_size": vocab_size, "pad_id": pad_id,
                       "source": str(Path(order_dir).resolve()), "phases": {}}
        for src in sources:
            checker = _StepChecker()
            width = longest = 0
            with MDSWriter(out=str(tmp / src.phase), columns=COLUMNS, compression=None, hashes=["sha256"],
                           size_limit=shard_size_limit) as writer:
                row_in_step, cur = 0, 0
                for f in src.files:
                    for c in checker.file(f, _read_file(f, vocab_size, pad_id)):
                        width, longest = max(width, c.ids.shape[1]), max(longest, int(c.lengths.max()))
                        for ids, n, step in zip(c.ids, c.lengths.tolist(), c.steps.tolist()):
                            if step != cur:
                                cur, row_in_step = step, 0
                            writer.write({"input_ids": ids[:n].astype(np.uint32), "step": step, "row": row_in_step})
                            row_in_step += 1
                    if progress:
                        progress(f"imported {f.rel}: steps {f.first}..{f.last}")
            sizes = np.asarray(checker.sizes, dtype=np.int64)
            table = np.stack([np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes], axis=1).astype(np.int64)
            np.save(tmp / src.phase / "step_table.npy", table)
            t_sha, s_sha = _phase_digests(table, _shard_hashes(tmp / src.phase / "index.json"))
            index["phases"][src.phase] = {
                "folder": src.phase, "steps": len(sizes), "samples": int(sizes.sum()), "sequence_length": width,
                "longest_row": longest,  # non-padding tokens of the longest row (sequence_length is the padded width)
                "step_table": f"{src.phase}/step_table.npy", "step_table_sha256": t_sha, "shards_sha256": s_sha,
                "source_folders": src.folders,
                "source_files": [{"file": f.rel, "first_step": f.first, "last_step": f.last} for f in src.files],
            }
        index["fingerprint"] = _fingerprint(index["phases"])
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


# ----------------------------------------------------------------------------------------------
# reading


class OrderIndex:
    """An imported order. `rows(phase, step)` seeks straight to the step's rows: the step table gives
    its first global sample index and batch size, the shard index gives the shard(s) holding them,
    and each shard is read once, from the first of those samples to the last."""

    def __init__(self, out_dir: str | Path, remote=None):
        """`remote` (data/remote.py RemoteFolder, data.order_remote): the order is in a store and `out_dir` is its
        local cache; each file is downloaded when first needed, the index and step tables at once, the shards as
        their steps are read (each checked against its sha256 in index.json)."""
        from streaming.base.format import reader_from_json

        self.root, self.remote = Path(out_dir), remote
        path = self._fetch(INDEX_NAME)
        if not path.is_file():
            raise OrderError(str(path), "not found: not an imported order (run data_tools/import_order.py)")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT:
            raise OrderError(str(path), f"format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.pad_id, self.vocab_size = self.index["pad_id"], self.index["vocab_size"]
        self.fingerprint = self.index["fingerprint"]
        self._tables: dict[str, np.ndarray] = {}
        self._shards: dict[str, tuple[list, list[int]]] = {}
        for name, p in self.index["phases"].items():
            table_path = self._fetch(p["step_table"])
            index_json = self._fetch(f"{p['folder']}/index.json")
            for f in (table_path, index_json):
                if not f.is_file():
                    raise OrderError(str(f), "is missing from the imported order")
            table = np.load(table_path)
            t_sha, s_sha = _phase_digests(table, _shard_hashes(index_json))
            if t_sha != p["step_table_sha256"]:
                raise OrderError(str(table_path), f"fingerprint mismatch: the step table changed since the import (see {INDEX_NAME})")
            if s_sha != p["shards_sha256"]:
                raise OrderError(str(index_json), f"fingerprint mismatch: the shard hashes changed since the import (see {INDEX_NAME})")
            obj = json.loads(index_json.read_text())
            readers = [reader_from_json(str(self.root / p["folder"]), None, s) for s in obj["shards"]]
            starts = np.concatenate(([0], np.cumsum([r.samples for r in readers]))).tolist()
            if starts[-1] != p["samples"] or (len(table) and table[-1].sum() != p["samples"]):
                raise OrderError(str(index_json), f"holds {starts[-1]} samples, but the step table expects {p['samples']}")
            self._tables[name], self._shards[name] = table, (readers, starts)
        if _fingerprint(self.index["phases"]) != self.fingerprint:
            raise OrderError(str(path), "fingerprint mismatch: the phase digests do not add up to the recorded fingerprint")

    def _fetch(self, rel: str, sha256: str | None = None) -> Path:
        """The order's file `rel` in its folder: from the store first when there is one and it is not cached."""
        return self.root / rel if self.remote is None else self.remote.fetch(rel, sha256)

    @property
    def phases(self) -> list[str]:
        return [p for p in PHASES if p in self._tables]

    def _table(self, phase: str) -> np.ndarray:
        if phase not in self._tables:
            raise KeyError(f"phase {phase!r} is not in {self.root} (it has: {', '.join(self.phases)})")
        return self._tables[phase]

    def steps(self, phase: str) -> int:
        """Number of steps in the phase; steps are 1..steps(phase)."""
        return len(self._table(phase))

    def batch_sizes(self, phase: str) -> np.ndarray:
        """The global batch size of every step of the phase, steps 1..steps(phase) in order (int64)."""
        return self._table(phase)[:, 1].astype(np.int64)

    def _entry(self, phase: str, step: int) -> tuple[int, int]:
        table = self._table(phase)
        if not 1 <= step <= len(table):
            raise IndexError(f"step {step} is outside phase {phase}'s steps 1..{len(table)}")
        first, size = table[step - 1]
        return int(first), int(size)

    def longest_row(self, phase: str) -> int:
        """Non-padding tokens of the phase's longest row; an import made before this was recorded gives the
        published sequence_length, which bounds it (rows are the batches padded to their longest)."""
        self._table(phase)
        p = self.index["phases"][phase]
        return int(p.get("longest_row", p["sequence_length"]))

    def batch_size(self, phase: str, step: int) -> int:
        return self._entry(phase, step)[1]

    def first_sample(self, phase: str, step: int) -> int:
        """Global sample index (within the phase's shards) of the step's first row."""
        return self._entry(phase, step)[0]

    def _read_range(self, phase: str, shard: int, lo: int, hi: int) -> list[dict]:
        """Samples lo..hi-1 (shard-relative) of one shard, read with one open and one read."""
        reader = self._shards[phase][0][shard]
        path = os.path.join(reader.dirname, reader.raw_data.basename)
        if self.remote is not None and not os.path.isfile(path):
            self._fetch(f"{self.index['phases'][phase]['folder']}/{reader.raw_data.basename}",
                        reader.raw_data.hashes.get("sha256"))
        with open(path, "rb", 0) as fp:
            fp.seek(4 * (1 + lo))
            offsets = np.frombuffer(fp.read(4 * (hi - lo + 1)), np.uint32).astype(np.int64)
            fp.seek(int(offsets[0]))
            data = fp.read(int(offsets[-1] - offsets[0]))
        if len(data) != offsets[-1] - offsets[0]:
            raise OrderError(path, f"shard is shorter than its offsets say (samples {lo}..{hi - 1})")
        rel = offsets - offsets[0]
        return [reader.decode_sample(data[rel[i]:rel[i + 1]]) for i in range(hi - lo)]

    def locate(self, phase: str, step: int, row: int) -> tuple[str, int]:
        """The shard file holding a step's row, and the row's index in it (for error messages)."""
        g = self.first_sample(phase, step) + row
        readers, starts = self._shards[phase]
        s = bisect.bisect_right(starts, g) - 1
        return os.path.join(readers[s].dirname, readers[s].raw_data.basename), g - starts[s]

    def rows(self, phase: str, step: int) -> list[np.ndarray]:
        """The step's rows in batch order: non-padding token ids (int64 arrays)."""
        first, size = self._entry(phase, step)
        starts = self._shards[phase][1]
        out: list[dict] = []
        g, end = first, first + size
        while g < end:
            s = bisect.bisect_right(starts, g) - 1
            hi = min(end, starts[s + 1])
            out.extend(self._read_range(phase, s, g - starts[s], hi - starts[s]))
            g = hi
        for i, sample in enumerate(out):
            if sample["step"] != step or sample["row"] != i:
                raise OrderError(str(self.root / phase), f"sample {first + i} is step {sample['step']} row {sample['row']}, "
                                 f"but the step table places step {step} row {i} there", row=i, step=step)
        return [s["input_ids"].astype(np.int64) for s in out]

    rows_sha256 = staticmethod(rows_sha256)
