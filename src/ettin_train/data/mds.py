"""Read MDS shards for training, with the original loader's framing of each sample."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
from streaming import StreamingDataset

from ettin_train.objectives.base import SpecialTokens


class DataError(ValueError):
    """A sample the run cannot train on, found as it is read: one line naming the shard and the sample. (A plain
    one-argument exception, so a DataLoader worker's copy re-raised in the main process keeps the type.)"""

    def line(self) -> str:
        """The message alone, also from a worker's copy (whose text is the worker's whole traceback)."""
        last = str(self).strip().splitlines()[-1]
        return last.split(f"{type(self).__name__}: ", 1)[-1]


class ShardUnavailable(DataError):
    """A shard (or an imported order's file) that the store did not deliver after every download attempt: the run
    ends with one line naming it, and a checkpoint of the last finished step (train/run.py)."""


def first_pad(ids: np.ndarray, tokens: SpecialTokens) -> int | None:
    hits = np.flatnonzero(np.asarray(ids) == tokens.pad)
    return int(hits[0]) if len(hits) else None


def frame(ids: np.ndarray, seq_len: int, tokens: SpecialTokens, force_sep: bool) -> np.ndarray:
    """The original `NoStreamingDataset.__getitem__`: prepend [CLS] if missing, truncate to seq_len;
    for encoders, a sample that does not end in [SEP] is cut to seq_len - 1 and gets one."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0 or ids[0] != tokens.cls:
        ids = np.concatenate(([tokens.cls], ids))
    ids = ids[:seq_len]
    if force_sep and ids[-1] != tokens.sep:
        ids = np.concatenate((ids[: seq_len - 1], [tokens.sep]))
    return ids


@contextlib.contextmanager
def shm_registration():
    """Held while a StreamingDataset is made. streaming registers each dataset under the first free shared-memory
    prefix (/dev/shm, machine-wide) with no lock between unrelated processes: two runs starting at the same moment
    (make demo's encoder and decoder chains) both took prefix 0 and one failed with FileExistsError
    '/000000_locals'. Only a node's local leader takes the lock: the other ranks of its run wait for it at
    streaming's barrier inside the same constructor, and must not wait for the lock too."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        yield
        return
    import fcntl

    # In /dev/shm itself: the lock covers exactly the namespace it guards (two fake nodes on one machine, each with
    # a /dev/shm of its own, must not wait for each other: their ranks meet at streaming's barrier).
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    with open(os.path.join(folder, "ettin-streaming-shm.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def unpack_shards(folder: str) -> None:
    """Decompresses each zstd shard of a local MDS folder (no remote) that has no raw copy yet, as streaming would
    on first read, but under a name of this process's own, renamed into place. streaming unpacks to one fixed
    `.tmp` name: two runs reading the same folder (an encoder and a decoder on the same shards; make demo's two
    chains) unpacked the same shard at once and one failed with FileNotFoundError on its rename."""
    import json

    from streaming.base.compression import decompress

    index = os.path.join(folder, "index.json")
    if not os.path.isfile(index):
        return  # preflight names a missing index; streaming raises its own error here
    with open(index) as f:
        shards = json.load(f)["shards"]
    for shard in shards:
        zipped, raw = shard.get("zip_data"), shard.get("raw_data")
        if not zipped or not raw or os.path.exists(os.path.join(folder, raw["basename"])):
            continue
        with open(os.path.join(folder, zipped["basename"]), "rb") as f:
            data = decompress(shard["compression"], f.read())
        target = os.path.join(folder, raw["basename"])
        part = f"{target}.{os.getpid()}.part"
        with open(part, "wb") as f:
            f.write(data)
        os.replace(part, target)


class FramedMDSDataset(StreamingDataset):
    """A `StreamingDataset` whose samples are `{"input_ids", "key"}`: framed token ids, and the global
    sample index, which seeds that sample's MLM mask so masks do not depend on ranks or workers."""

    def __init__(self, *, seq_len: int, tokens: SpecialTokens, force_sep: bool, **kwargs):
        with shm_registration():
            if not kwargs.get("remote") and int(os.environ.get("LOCAL_RANK", "0")) == 0:
                unpack_shards(os.path.join(kwargs["local"], kwargs.get("split") or ""))
            super().__init__(**kwargs)
        self.seq_len, self.tokens, self.force_sep = seq_len, tokens, force_sep

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        try:
            sample = super().get_item(sample_id, retry)
        except Exception as e:  # noqa: BLE001 - streaming retried the download already (download_retry)
            raise ShardUnavailable(self._unavailable(sample_id, e)) from None
        pos = first_pad(sample["input_ids"], self.tokens)
        if pos is not None:  # the original asserts it away (text_data.py); trained on, the CLM loss would score it
            shard, index = self.spanner[sample_id]
            reader = self.shards[shard]
            name = (reader.zip_data or reader.raw_data).basename
            raise DataError(f"{reader.dirname}/{name} sample {index} (global sample {sample_id}): [PAD] id "
                            f"{self.tokens.pad} at position {pos} inside the sample; the original's loader refuses it "
                            f"and the loss would score it: write the shards without padding")
        return {"input_ids": frame(sample["input_ids"], self.seq_len, self.tokens, self.force_sep), "key": int(sample_id)}

    def _unavailable(self, sample_id: int, e: Exception) -> str:
        shard, index = self.spanner[sample_id]
        reader, stream = self.shards[shard], self.streams[self.stream_per_shard[shard]]
        name = (reader.zip_data or reader.raw_data).basename
        where = os.path.join(stream.remote, stream.split, name) if stream.remote else os.path.join(reader.dirname, name)
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        tries = f" after {stream.download_retry} download attempt(s)" if stream.remote else ""
        return f"shard {where} (sample {index}, global sample {sample_id}) could not be read{tries}: {type(e).__name__}: {cause}"
