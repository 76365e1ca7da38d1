"""Documents from a `datasets` dataset, read as a stream (so a corpus larger than memory is never loaded
whole): a Hub name (`HuggingFaceFW/fineweb-edu`, with a subset and a split), a local dataset folder
(parquet, JSON lines, arrow or text files, split by their names as `datasets` does; or a `save_to_disk`
folder), or one such file. Used by data_tools/tokenize_to_mds.py and data_tools/train_tokenizer.py.

Documents come in the dataset's own order, the same at every read, so a resumed tokenization can count
its way back to where it stopped. A document's id is its `--id-column` value where the row has one, else
its 0-based row number in the split (`row:N`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

READ_BATCH = 1000  # rows per read from the stream
# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow", ".txt": "text"}


class SourceError(ValueError):
    """One line naming the source, split or column that cannot be read."""


@dataclass(frozen=True)
class TextSource:
    source: str  # a Hub name, or a local file or folder
    split: str = "train"
    subset: Optional[str] = None  # a Hub dataset's configuration (`name=` of load_dataset)
    column: str = "text"
    id_column: str = "id"

    def describe(self) -> dict:
        """What fixes the documents (recorded by tokenize_to_mds to refuse a resume on other input)."""
        d = asdict(self)
        path = Path(self.source)
        if path.exists():
            d["source"] = str(path.resolve())
        return d

    def _stream(self):
        import datasets

        path = Path(self.source)
        if path.is_file():
            builder = BUILDERS.get(path.suffix)
            if builder is None:
                raise SourceError(f"{path}: not a {', '.join(BUILDERS)} file")
            if self.split != "train":
                raise SourceError(f"--split {self.split}: a single file {path} has only the split 'train'")
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))  # memory-mapped arrow: read as it is iterated
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise SourceError(f"--split {self.split}: {path} has the splits {', '.join(ds)}")
                ds = ds[self.split]
            return ds.to_iterable_dataset()
        try:
            return datasets.load_dataset(self.source, self.subset, split=self.split, streaming=True)
        except Exception as e:  # noqa: BLE001 - a missing dataset, split or subset: datasets' own message, on one line
            what = "folder" if path.is_dir() else "dataset (not a local path, so a Hub name)"
            raise SourceError(f"{self.source}: cannot read this {what} with split {self.split!r}"
                              f"{f' and subset {self.subset!r}' if self.subset else ''}: "
                              f"{type(e).__name__}: {e}".splitlines()[0]) from None

    def documents(self) -> Iterator[tuple[str, str]]:
        """(id, text) in the dataset's order; rows with an empty text are skipped (their row number is kept)."""
        k = 0
        for batch in self._stream().iter(batch_size=READ_BATCH):  # by batches: ~100x faster than row by row
            if self.column not in batch:
                raise SourceError(f"--column {self.column}: {self.source} has no such column (columns: {', '.join(batch)})")
            texts = batch[self.column]
            ids = batch.get(self.id_column) or [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                if not isinstance(text, str):
                    raise SourceError(f"--column {self.column}: {self.source} row {k} holds {type(text).__name__}, not text")
                if text.strip():
                    yield (str(doc_id) if doc_id is not None else f"row:{k}"), text
                k += 1

    def check(self) -> None:
        """Reads the first document: a missing source, split or column fails here, before anything is written."""
        for _ in self.documents():
            return
        raise SourceError(f"{self.source}: split {self.split!r} holds no document with text in column {self.column!r}")
