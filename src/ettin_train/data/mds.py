"""Read MDS shards for training, with the original loader's framing of each sample."""

from __future__ import annotations

import numpy as np
from streaming import StreamingDataset

from ettin_train.objectives.base import SpecialTokens


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


class FramedMDSDataset(StreamingDataset):
    """A `StreamingDataset` whose samples are `{"input_ids", "key"}`: framed token ids, and the global
    sample index, which seeds that sample's MLM mask so masks do not depend on ranks or workers."""

    def __init__(self, *, seq_len: int, tokens: SpecialTokens, force_sep: bool, **kwargs):
        super().__init__(**kwargs)
        self.seq_len, self.tokens, self.force_sep = seq_len, tokens, force_sep

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        sample = super().get_item(sample_id, retry)
        return {"input_ids": frame(sample["input_ids"], self.seq_len, self.tokens, self.force_sep), "key": int(sample_id)}
