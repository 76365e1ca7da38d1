"""Workarounds in Composer 0.32.1, each a replacement of one Composer function, installed by `install` before the
Trainer is built; tests/test_shims.py checks each against Composer itself.

- `route_checkpoint_loads`: Composer opens checkpoints (autoresume, load_path) with
  `torch.load(weights_only=False)` in `composer.utils.checkpoint._torch_load_with_validation`, which runs any code
  a pickle names. It goes through checkpoint/safe_load.py instead, as every other load here does.
- `digest_checkpoint_writes`: Composer writes a checkpoint in `_write_checkpoint_file`; the replacement writes the
  same bytes through a DigestWriter, so the saver's completion marker gets the file's sha256 without reading
  the file back (`written_digest`).
"""

from __future__ import annotations

import torch
from composer.utils import checkpoint as composer_checkpoint

from ettin_train.checkpoint.digest import DigestWriter
from ettin_train.checkpoint.safe_load import safe_load

_original_write = composer_checkpoint._write_checkpoint_file
_digests: dict[str, str] = {}


def install(trust_pickles: bool) -> None:
    route_checkpoint_loads(trust_pickles)
    digest_checkpoint_writes()


def route_checkpoint_loads(trust_pickles: bool) -> None:
    def load(checkpoint_filepath, map_location):
        path = composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath)
        return safe_load(path, trust_pickles=trust_pickles, map_location=map_location)

    composer_checkpoint._torch_load_with_validation = load


def digest_checkpoint_writes() -> None:
    composer_checkpoint._write_checkpoint_file = _write_with_digest


def written_digest(filename: str) -> str | None:
    """The sha256 of the file Composer just wrote under `filename` (taken once), or None if it was not hashed."""
    return _digests.pop(str(filename), None)


def _write_with_digest(state_dict: dict, filename: str) -> None:
    if composer_checkpoint.is_tar(filename) or composer_checkpoint.is_compressed_pt(filename):
        return _original_write(state_dict, filename)  # not a plain file: the saver reads it back instead
    with open(filename, "wb") as f:
        writer = DigestWriter(f)
        torch.save(state_dict, writer)
    _digests[str(filename)] = writer.hexdigest()
