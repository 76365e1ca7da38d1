"""Streaming's leftovers: the shared memory and lock files a killed run leaves (and the lock files every
run leaves). preflight.py removes them before a run starts and again at its exit."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

STREAMING_SHM = re.compile(r"^\d{6}_")


def clean_streaming_leftovers() -> list[str]:
    """Removes streaming's shared memory (`/dev/shm/NNNNNN_*`) and lock files (`$TMPDIR/NNNNNN_*filelock`)
    that no live process holds: what a killed run leaves, and the lock files every run leaves (streaming
    skips a prefix whose lock file exists, so they pile up). A prefix with any entry still open or
    mapped by a live process (another run on this machine) is left alone. Returns what was removed."""
    shm, tmp = Path("/dev/shm"), Path(tempfile.gettempdir())
    entries = [p for p in (shm.iterdir() if shm.is_dir() else []) if STREAMING_SHM.match(p.name)]
    entries += [p for p in tmp.iterdir() if STREAMING_SHM.match(p.name) and p.name.endswith("filelock")]
    if not entries:
        return []
    in_use = paths_in_use()
    live_prefixes = {p.name[:6] for p in entries if str(p) in in_use}
    removed = []
    for p in entries:
        if p.name[:6] not in live_prefixes:
            try:
                p.unlink()
            except OSError:  # another user's, or gone already
                continue
            removed.append(str(p))
    return removed


def paths_in_use() -> set[str]:
    """Every path a live process on this machine has open or mapped (that we may read)."""
    used: set[str] = set()
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            with open(f"/proc/{pid}/maps") as maps:
                used.update(line.split(None, 5)[5].strip() for line in maps if "/" in line and len(line.split(None, 5)) == 6)
        except OSError:  # the process ended, or is not ours to read
            continue
    return {u.removesuffix(" (deleted)") for u in used}
