"""What recording a checkpoint's sha256 costs: a save through DigestWriter (the digest taken from the bytes as
torch.save writes them, what the saver does) against a plain torch.save, both fsynced as the saver does; also a
plain save followed by hashing the file (what reading it back would cost), the check at resume (hashing the file),
and the hashing alone, into a sink that writes nothing (the part of the cost that does not depend on the disk).

    .venv/bin/python benchmarks/checkpoint_digest.py [--sizes 150m 1b] [--repeat 3] [--full-1b] [--dir DIR]

The state is a checkpoint's bulk: the size's parameters in fp32 and StableAdamW's two moments (3 x 4 bytes per
parameter), random. 1b's is ~12 GB; without --full-1b it is its weights alone (~4 GB), for a machine with little
memory: the costs are per byte, so the ratio is the same but for the page cache, which a bigger file outgrows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from ettin_train.checkpoint.digest import DigestWriter, file_sha256
from ettin_train.model import EttinModel
from ettin_train.model.config import ModelConfig


class _Discard:
    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def bulk_state(size: str, moments: bool) -> dict:
    with torch.device("meta"):  # shapes only: nothing allocated for the model itself
        shapes = {k: v.shape for k, v in EttinModel(ModelConfig(size=size)).state_dict().items()}
    parts = ("model", "exp_avg", "exp_avg_sq") if moments else ("model",)
    return {part: {k: torch.randn(shape) for k, shape in shapes.items()} for part in parts}


def save_plain(state: dict, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_digest(state: dict, path: str) -> str:
    with open(path, "wb") as f:
        writer = DigestWriter(f)
        torch.save(state, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.hexdigest()


def save_then_read_back(state: dict, path: str) -> str:
    save_plain(state, path)
    return file_sha256(path)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["150m", "1b"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--full-1b", action="store_true", help="1b with its Adam moments (~12 GB in memory)")
    p.add_argument("--dir", default=None, help="where to write (default: the temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for size in args.sizes:
        state = bulk_state(size, moments=size != "1b" or args.full_1b)
        gib = sum(t.numel() * t.element_size() for part in state.values() for t in part.values()) / 2**30
        what = "weights + 2 moments" if len(state) == 3 else "weights only"
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            times = {"plain": [], "digest": [], "read back": [], "verify": []}
            for i in range(args.repeat):  # alternated, so drift in the machine's load hits both alike
                order = [("plain", save_plain), ("digest", save_digest), ("read back", save_then_read_back)]
                for name, fn in order if i % 2 == 0 else order[::-1]:
                    times[name].append(timed(fn, state, path))
                    os.remove(path)
                save_plain(state, path)
                times["verify"].append(timed(file_sha256, path))
                os.remove(path)
        plain = statistics.median(times["plain"])
        ratios = {k: [t / b for t, b in zip(v, times["plain"])] for k, v in times.items()}
        print(f"{size} ({what}, {gib:.2f} GiB), median of {args.repeat}, on {os.cpu_count()} CPU cores:")
        print(f"  plain torch.save + fsync      {plain:7.2f} s")
        for name in ("digest", "read back"):
            r = ratios[name]
            print(f"  {name:<29} {statistics.median(times[name]):7.2f} s   ratio to plain {statistics.median(r):.2f} "
                  f"(spread {min(r):.2f}-{max(r):.2f})")
        v = statistics.median(times["verify"])
        print(f"  verify at resume (sha256)     {v:7.2f} s   {gib / v:.2f} GiB/s from the page cache")
        # the digest's own work, without the disk: torch.save into a sink that only hashes
        sink = [timed(torch.save, state, DigestWriter(_Discard())) for _ in range(args.repeat)]
        h = statistics.median(sink)
        print(f"  hashing alone (no disk)       {h:7.2f} s   {gib / h:.2f} GiB/s: +{h / plain:.0%} of the plain save's time")
        del state


if __name__ == "__main__":
    main()
