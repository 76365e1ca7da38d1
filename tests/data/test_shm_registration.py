"""Two runs starting at once on one machine (make demo's encoder and decoder chains): streaming registers each
dataset under the first free shared-memory prefix with no lock between processes, so both took prefix 0 and one
failed with FileExistsError '/000000_locals'. Making a training dataset now waits for the machine-wide lock."""

from __future__ import annotations

import subprocess
import sys
import time

CHILD = """
import sys, time
from ettin_train.data.mds import FramedMDSDataset
from ettin_train.objectives.base import SpecialTokens
print("ready", flush=True)
FramedMDSDataset(local=sys.argv[1], shuffle=False, batch_size=1, seq_len=64, force_sep=False,
                 tokens=SpecialTokens(unk=0, cls=1, sep=2, pad=3, mask=4, vocab_size=512))
print(time.time(), flush=True)  # when it was made
"""


def test_a_training_dataset_waits_while_another_process_registers_one(tiny_data):
    from ettin_train.data.mds import shm_registration

    with shm_registration():  # another run, in the middle of making its dataset
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_data / "short")], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(3)  # ample for a dataset over one small local shard folder
        released = time.time()
    made = float(child.stdout.readline())
    assert child.wait(timeout=120) == 0
    assert made >= released, "the dataset was made while another process held the registration lock"


def _shards(folder, n_docs=40):
    import numpy as np

    from ettin_train.data.shards import write_shards

    rng = np.random.default_rng(0)
    docs = [(f"d{i}", rng.integers(5, 500, 300).tolist()) for i in range(n_docs)]
    write_shards(str(folder), docs, seq_len=64, cls_id=1, sep_id=2, size_limit=1 << 12)  # several shards
    return folder


def test_a_local_folders_shards_are_unpacked_once_before_streaming_reads_them_with_streamings_bytes(tmp_path):
    """Two runs on one shard folder no longer race on streaming's fixed `.tmp` name: the dataset's local leader
    unpacks the folder first, under its own file names. The unpacked bytes are streaming's own (its reader unpacks
    the same shards in a second folder: the oracle), so recorded raw hashes still hold."""
    import json

    from streaming import StreamingDataset

    from ettin_train.data.mds import FramedMDSDataset
    from ettin_train.objectives.base import SpecialTokens

    ours, theirs = _shards(tmp_path / "ours"), _shards(tmp_path / "theirs")
    shards = json.loads((ours / "index.json").read_text())["shards"]
    assert len(shards) > 2 and not any((ours / s["raw_data"]["basename"]).exists() for s in shards)
    tokens = SpecialTokens(unk=0, cls=1, sep=2, pad=3, mask=4, vocab_size=512)
    FramedMDSDataset(local=str(ours), shuffle=False, batch_size=1, seq_len=64, force_sep=False, tokens=tokens)
    plain = StreamingDataset(local=str(theirs), shuffle=False, batch_size=1)
    for i in range(plain.num_samples):
        plain[i]  # streaming unpacks each shard as it first reads it
    for s in shards:
        name = s["raw_data"]["basename"]
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert not list(ours.glob("*.part")) and not list(ours.glob("*.tmp"))
