"""Export during training (recipe key `export`): each checkpoint, once written, goes through the same steps as
`ettin-export` (convert, verify in transformers, commit, tag step/ext/decay) into `export.repo`, on rank 0.

An export that fails or is refused is reported loudly on stderr and training goes on: the checkpoint is on disk
and `ettin-export` can be re-run on it later (exporting is idempotent). The export builds models, which draws from
the global RNGs; they are restored afterwards so that a run with export trains exactly as one without.

Nothing here imports Composer; `train.callbacks.ExportCheckpoints` calls `CheckpointExporter.export`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from ettin_train import export as ettin_export


class CheckpointExporter:
    def __init__(self, repo: str | Path, run_name: str):
        self.repo, self.name = Path(repo), run_name

    def export(self, checkpoint: str | Path) -> bool:
        checkpoint = Path(checkpoint)
        rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
        def log(line: str) -> None:
            print(f"[{self.name}] export: {line}", flush=True)

        try:
            result = ettin_export.export_checkpoint(checkpoint, self.repo, log=log)
            log(result.line())
            return True
        except Exception as e:  # noqa: BLE001 - whatever went wrong (refused, verification, a bug), training goes on
            error = str(e) if isinstance(e, (ettin_export.Refused, ettin_export.VerificationFailed)) else f"{type(e).__name__}: {e}"
        finally:
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
        bar = "!" * 80
        print(f"{bar}\n[{self.name}] EXPORT FAILED for {checkpoint}: {error}\n[{self.name}] training goes on; export it "
              f"later with: python -m ettin_train.export {checkpoint} --out {self.repo}\n{bar}", file=sys.stderr, flush=True)
        return False
