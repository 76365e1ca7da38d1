"""Write tokenized documents as MDS shards in the original layout.

Each document is cut into pieces of `seq_len - 2` tokens and each piece is framed as
`[CLS] ... [SEP]`, so one MDS sample is one (piece of a) document: the original did not pack
documents together. Columns as in the original: `input_ids` (uint32 ndarray), `id` (str), `len` (int).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

COLUMNS = {"input_ids": "ndarray:uint32", "id": "str", "len": "int"}


def chunk_document(ids: list[int], seq_len: int, cls_id: int, sep_id: int, min_len: int = 16,
                   backfill_len: int | None = None) -> Iterator[np.ndarray]:
    """Pieces of one document, each framed and at most `seq_len` long. A tail piece shorter than
    `min_len` content tokens is dropped (the original's always_skip_size). With `backfill_len`, a tail
    (a last piece after at least one full piece) shorter than that gets tokens moved, not copied, from the
    end of the piece before it until it has `backfill_len` (the original's --backfill --backfill_no_duplicates,
    which moved a random number of tokens; we move the fixed amount so a rerun writes the same samples)."""
    body = seq_len - 2
    pieces = [ids[start : start + body] for start in range(0, len(ids), body)]
    if backfill_len is not None and len(pieces) > 1 and min_len <= len(pieces[-1]) < backfill_len:
        moved = min(backfill_len, body) - len(pieces[-1])
        pieces[-2], pieces[-1] = pieces[-2][:-moved], [*pieces[-2][-moved:], *pieces[-1]]
    for piece in pieces:
        if len(piece) < min_len:
            continue
        yield np.asarray([cls_id, *piece, sep_id], dtype=np.uint32)


def write_shards(out_dir: str, docs: Iterable[tuple[str, list[int]]], seq_len: int, cls_id: int, sep_id: int,
                 min_len: int = 16, size_limit: int = 1 << 26, backfill_len: int | None = None) -> int:
    """Writes (doc_id, token ids) documents as MDS shards in `out_dir`; returns the number of samples."""
    from streaming import MDSWriter

    n = 0
    with MDSWriter(out=out_dir, columns=COLUMNS, compression="zstd", size_limit=size_limit,
                   hashes=["xxh64"]) as writer:  # recorded so a changed shard can be found (reliability.verify_shards: hash)
        for doc_id, ids in docs:
            for k, piece in enumerate(chunk_document(ids, seq_len, cls_id, sep_id, min_len, backfill_len)):
                writer.write({"input_ids": piece, "id": f"{doc_id}#{k}", "len": len(piece)})
                n += 1
    return n
