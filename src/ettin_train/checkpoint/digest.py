"""A checkpoint's sha256, computed while it is written, recorded in its completion marker, checked before use.

A checkpoint that was complete when written can be damaged later: a truncated copy, a flipped bit on a network
disk. `torch.load` notices neither when the damage is inside a tensor's bytes, so a resume or an export would go
on from wrong weights. The marker `NAME.complete` (written by the saver, train/reliability.py) records
`{"step", "bytes", "sha256"}`; `check` compares a file against it. The digest is taken from the bytes as
`torch.save` hands them to the file (`DigestWriter`), so a save reads nothing back; benchmarks/checkpoint_digest.py
measures what it costs. Nothing here imports Composer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MARKER = ".complete"
_CHUNK = 16 << 20


class DigestWriter:
    """A binary file wrapper for `torch.save` that hashes every byte on its way to the file. torch's zip writer
    only appends (it never seeks back), so the digest is the file's."""

    def __init__(self, f):
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_marker(checkpoint: str | Path, step: int, sha256: str | None) -> None:
    """`NAME.complete` via a temporary name, fsynced, then renamed: a marker is whole or absent."""
    marker = f"{checkpoint}{MARKER}"
    record = {"step": step, "bytes": os.path.getsize(checkpoint)} | ({"sha256": sha256} if sha256 else {})
    with open(marker + ".partial", "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".partial", marker)


def read_marker(checkpoint: str | Path) -> dict | None:
    """The marker's record, or None when there is none (or it is not one: a marker is written whole or not at all)."""
    try:
        record = json.loads(Path(f"{checkpoint}{MARKER}").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check(checkpoint: str | Path, digest: bool = True) -> str | None:
    """None if `checkpoint` is what its marker recorded (its size, and with `digest` its sha256, when the marker
    has one: markers written before digests have only the size); else one line saying how it differs.
    A file without a marker (the original runs', a downloaded one) is not checked: None."""
    record = read_marker(checkpoint)
    if record is None:
        return None
    size = Path(checkpoint).stat().st_size
    if size != record.get("bytes"):
        return f"{checkpoint} is {size} bytes, its marker {Path(checkpoint).name}{MARKER} recorded {record.get('bytes')}"
    if digest and record.get("sha256") and file_sha256(checkpoint) != record["sha256"]:
        return f"{checkpoint} does not match the sha256 its marker {Path(checkpoint).name}{MARKER} recorded"
    return None


def set_aside(checkpoint: Path) -> Path:
    """Renames a damaged checkpoint `NAME.damaged` (and its marker `NAME.damaged.complete-was`), never deleting
    it: the user may still want to look at it, or trust it. A second damaged file of the same name gets `.damaged.1`."""
    target, n = checkpoint.with_name(checkpoint.name + ".damaged"), 0
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{checkpoint.name}.damaged.{n}")
    checkpoint.rename(target)
    marker = Path(f"{checkpoint}{MARKER}")
    if marker.exists():
        marker.rename(f"{target}{MARKER}-was")
    return target
