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
