"""What an MDS folder holds, recorded beside its index.json (`ettin_shards.json`), and the checks a run makes
against it before any work: shards written with another tokenizer, another framing or another dtype than
the recipe's are refused; a `data.seq_len` longer than the rows is reported.

The record (written by data_tools/tokenize_to_mds.py and the demo's data):

    {"format": "ettin-shards-v1", "column": "input_ids", "dtype": "uint32", "framing": "[CLS] ... [SEP]",
     "seq_len": 1024, "tokenizer": {"name": "...", "vocab_size": 50368, "vocab_sha256": "...",
                                    "cls_id": 50281, "sep_id": 50282, "pad_id": 50283}}

`vocab_sha256` is the sha256 of the tokenizer's vocabulary (token -> id, every added token included), so
the same tokenizer saved elsewhere or fetched by its Hub name has the same fingerprint. Folders without a
record (the published ones, or shards written by other tools) are checked from what the rows say: the
`input_ids` column must be a uint32 ndarray, read from the column encoding in index.json (or from the
first sample where the encoding leaves the dtype to each sample). No Composer import here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD = "ettin_shards.json"
FORMAT = "ettin-shards-v1"
FRAMING = "[CLS] ... [SEP]"  # the original's samples, which this trainer's loader expects (data/mds.py)
DTYPE = "uint32"  # the original's input_ids


def vocab_sha256(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def make_record(tokenizer, name: str, seq_len: int) -> dict:
    return {"format": FORMAT, "column": "input_ids", "dtype": DTYPE, "framing": FRAMING, "seq_len": seq_len,
            "tokenizer": {"name": name, "vocab_size": len(tokenizer), "vocab_sha256": vocab_sha256(tokenizer),
                          "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id,
                          "pad_id": tokenizer.pad_token_id}}


def write_record(folder: str | Path, record: dict) -> None:
    path = Path(folder) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def read_record(folder: str | Path) -> dict | None:
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: format {record.get('format') if isinstance(record, dict) else None!r}, expected {FORMAT!r}")
    return record


def rows_dtype(folder: Path, index: dict) -> str:
    """The dtype of `input_ids` as the rows store it (no record needed). Raises ValueError if it is not an ndarray."""
    shards = index.get("shards") or []
    if not shards:
        return DTYPE  # nothing to train on: the empty folder is refused elsewhere
    shard = shards[0]
    names, encodings = shard.get("column_names", []), shard.get("column_encodings", [])
    if "input_ids" not in names:
        raise ValueError(f"{folder / 'index.json'}: the shards have no input_ids column (columns: {', '.join(names)})")
    encoding = encodings[names.index("input_ids")]
    if encoding.startswith("ndarray:"):
        return encoding.split(":")[1]
    if encoding != "ndarray":
        raise ValueError(f"{folder / 'index.json'}: input_ids is encoded as {encoding!r}, not an ndarray of token ids")
    return _first_sample_dtype(folder, shard)


def _first_sample_dtype(folder: Path, shard: dict) -> str:
    """Decodes the first sample of a shard in memory (a zstd shard is not decompressed to disk)."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    reader = reader_from_json(str(folder), None, shard)
    if shard.get("zip_data") and not (folder / shard["raw_data"]["basename"]).is_file():
        data = decompress(shard["compression"], (folder / shard["zip_data"]["basename"]).read_bytes())
    else:
        data = (folder / shard["raw_data"]["basename"]).read_bytes()
    import numpy as np

    begin, end = np.frombuffer(data, np.uint32, 2, offset=4)
    return str(reader.decode_sample(data[begin:end])["input_ids"].dtype)


def check_folder(folder: str | Path, key: str, seq_len: int, tokenizer_name: str, tokenizer_loader) -> list[str]:
    """Refuses (ValueError, one line naming `key` and the folder) shards the recipe cannot train on as they are;
    returns notes for what trains but not as the user may think. `tokenizer_loader()` gives the recipe's
    tokenizer; it is called only when a record is there to compare with."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        index = json.loads((folder / "index.json").read_text())
        dtype = rows_dtype(folder, index)
        if dtype != DTYPE:
            raise ValueError(f"{key}: the input_ids of {folder} are {dtype}, not {DTYPE} as the original's shards; "
                             f"write them again as uint32 (data_tools/tokenize_to_mds.py)")
        return []
    if record.get("dtype") != DTYPE:
        raise ValueError(f"{key}: {folder / RECORD} says the input_ids are {record.get('dtype')}, not {DTYPE}")
    if record.get("framing") != FRAMING:
        raise ValueError(f"{key}: {folder / RECORD} says the rows are framed {record.get('framing')!r}, but this trainer "
                         f"reads rows framed {FRAMING!r} (as the original); tokenize again with data_tools/tokenize_to_mds.py")
    theirs = record.get("tokenizer", {})
    ours = vocab_sha256(tokenizer_loader())
    if theirs.get("vocab_sha256") != ours:
        raise ValueError(f"{key}: {folder} was tokenized with {theirs.get('name')} (vocabulary sha256 "
                         f"{str(theirs.get('vocab_sha256'))[:12]}), but data.tokenizer {tokenizer_name} has another "
                         f"vocabulary ({ours[:12]}); set data.tokenizer to the shards' tokenizer or tokenize again")
    rows = record.get("seq_len")
    if isinstance(rows, int) and seq_len > rows:
        return [f"data.seq_len {seq_len} is longer than the rows of {folder} (written for {rows} tokens): samples stay "
                f"at most {rows} tokens long (documents are not packed); tokenize again with --seq-len {seq_len} "
                f"for longer samples"]
    return []
