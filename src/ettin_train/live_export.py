"""Export during training (recipe key `export`): each checkpoint, once written, goes through the same steps as
`ettin-export` (convert, verify in transformers, commit, tag step/ext/decay) into `export.repo`, on rank 0.

An export that fails or is refused is reported loudly on stderr and training goes on: the checkpoint is on disk
and `ettin-export` can be re-run on it later (exporting is idempotent). The export builds models, which draws from
the global RNGs; they are restored afterwards so that a run with export trains exactly as one without.

Nothing here imports Composer; `train.callbacks.ExportCheckpoints` calls `CheckpointExporter.export`.
"""

from __future__ import annotations

import contextlib
import io
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
        out = io.StringIO()
        rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = ettin_export.main([str(checkpoint), "--out", str(self.repo)])
            error = None if code == 0 else out.getvalue().strip().splitlines()[-1]
        except Exception as e:  # noqa: BLE001 - whatever went wrong, training must go on
            error = f"{type(e).__name__}: {e}"
        finally:
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
        if error is None:
            for line in out.getvalue().strip().splitlines():
                if line.startswith(checkpoint.name):
                    print(f"[{self.name}] export: {line}", flush=True)
            return True
        bar = "!" * 80
        print(f"{bar}\n[{self.name}] EXPORT FAILED for {checkpoint}: {error}\n[{self.name}] training goes on; export it "
              f"later with: python -m ettin_train.export {checkpoint} --out {self.repo}\n{bar}", file=sys.stderr, flush=True)
        return False
