"""Crash-safe checkpoints, the non-finite loss guard and the loss-spike monitor: Composer's saver and callbacks.

The write order that makes a checkpoint atomic, and the repair of the folder before a resume, are described in
checkpoint/run_folder.py (which needs no Composer); see docs/reliability.md.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import torch
from composer import Callback, State
from composer.callbacks import CheckpointSaver
from composer.loggers import Logger
from composer.utils import checkpoint, dist

from ettin_train import stores
from ettin_train.checkpoint.digest import file_sha256, write_marker
from ettin_train.checkpoint.run_folder import MARKER, atomic_symlink, checkpoint_bytes, fsync, marked_checkpoints
from ettin_train.train import shims
from ettin_train.train.module import composer_time

class StopRun(Exception):
    """Ends a run with one line for the user: a NaN or infinite loss or gradient (`train.nonfinite:
    stop`), or no room for the next checkpoint. Not a RuntimeError, which Composer inspects for
    out-of-memory retries."""


class AtomicCheckpointSaver(CheckpointSaver):
    """Composer's saver with the write made atomic (temporary name, fsync, rename, marker, symlink swap)
    and the free space checked before each write, for local, monolithic (rank-0) checkpoints."""

    def __init__(self, folder: str, save_interval: str, keep: int, min_free_bytes: int = 0, remote: str | None = None):
        super().__init__(folder=folder, filename="ep{epoch}-ba{batch}-rank{rank}.pt", remote_file_name=None,
                         latest_filename="latest-rank{rank}.pt",
                         latest_remote_file_name=f"{folder}/latest-rank{{rank}}.pt",
                         save_interval=save_interval, num_checkpoints_to_keep=keep)
        self.min_free_bytes = min_free_bytes
        # checkpoint.remote: each checkpoint this rank writes is uploaded, its marker last (stores.py)
        self.store = stores.Store(remote) if remote else None
        self.last_complete: str | None = None
        self.estimate = 0
        # Called as on_stage(stage, step, path) after each stage of a write ("written": the .partial.pt is on
        # disk; "renamed", "marked", "linked"). Only the tests' fault injector (tests/faults.py) sets it.
        self.on_stage: Callable[[str, int, str], None] | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        super().fit_start(state, logger)
        self.estimate = checkpoint_bytes(state.model)
        latest = Path(self.folder) / "latest-rank0.pt"
        self.last_complete = os.path.realpath(latest) if latest.exists() else None
        if self.store is not None and dist.get_global_rank() == 0:
            try:
                stores.upload_missing(self.store, Path(self.folder).parent)
            except stores.StoreError as e:
                raise StopRun(str(e)) from None

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        if state.fsdp_sharded_state_dict_enabled:
            # A sharded checkpoint (parallel.checkpoint_format: sharded) is a folder every rank writes its part of;
            # Composer's own saver writes it in place, so it is not atomic (docs/reliability.md). Full ones are.
            super()._save_checkpoint(state, logger)
            self.last_complete = self.saved_checkpoints[-1] if self.saved_checkpoints else self.last_complete
            return
        step = state.timestamp.batch.value
        self.last_checkpoint_batch = state.timestamp.batch
        final = checkpoint.get_save_filename(state, self.filename.format(state, keep_placeholders=True))
        self.all_saved_checkpoints_to_timestamp[final] = state.timestamp
        problem = [self._no_room(final, step) if dist.get_global_rank() == 0 else None]
        dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise StopRun(problem[0])
        partial = final.removesuffix(".pt") + ".partial.pt"  # Composer picks the writer by the extension
        saved = checkpoint._save_checkpoint(state, partial, weights_only=self.weights_only, ignore_keys=self.ignore_keys)
        if saved is None:  # ranks other than 0 write nothing; rank 0 renames and marks it next
            self.last_complete = final
            return
        self._stage("written", step, partial)
        fsync(partial)
        os.replace(partial, final)
        fsync(os.path.dirname(final), directory=True)
        self._stage("renamed", step, final)
        # the sha256 of the bytes as they were written (shims.digest_checkpoint_writes), else read back once
        write_marker(final, step, shims.written_digest(partial) or file_sha256(final))
        self._stage("marked", step, final)
        atomic_symlink(os.path.basename(final), Path(self.latest_filename.format(state)))
        fsync(os.path.dirname(final), directory=True)
        self._stage("linked", step, final)
        self.last_complete = final
        self.saved_checkpoints.append(final)
        if self.store is not None:
            try:  # a checkpoint the store does not hold stops the run: the next node's resume would miss it
                stores.upload_checkpoint(self.store, Path(final), Path(final).parent.parent)
                if self.num_checkpoints_to_keep > 0:
                    stores.prune(self.store, self.num_checkpoints_to_keep)
            except stores.StoreError as e:
                raise StopRun(f"{e}; the checkpoint of step {step} is complete locally ({final}): run the same command "
                              "to resume from it") from None
        if self.num_checkpoints_to_keep > 0:
            # What is on disk, not what this start wrote: a requeued run's earlier checkpoints count too.
            on_disk = marked_checkpoints(Path(final).parent)
            for old in on_disk[: max(0, len(on_disk) - self.num_checkpoints_to_keep)]:
                Path(f"{old}{MARKER}").unlink(missing_ok=True)  # unmark first: a half-deleted one is never picked
                old.unlink()
                if str(old) in self.saved_checkpoints:
                    self.saved_checkpoints.remove(str(old))

    def _stage(self, stage: str, step: int, path: str) -> None:
        if self.on_stage is not None:
            self.on_stage(stage, step, path)

    def _no_room(self, final: str, step: int) -> str | None:
        previous = os.path.getsize(self.last_complete) if self.last_complete and os.path.exists(self.last_complete) else 0
        need = max(previous, self.estimate) + self.min_free_bytes
        free = shutil.disk_usage(os.path.dirname(final)).free
        if free < need:
            return (f"no room for the checkpoint of step {step} in {os.path.dirname(final)}: {free / 2**30:.2f} GiB free, "
                    f"{need / 2**30:.2f} GiB needed; last complete checkpoint: {self.last_complete}")
        return None


class NonFiniteGuard(Callback):
    """Checks the loss and every gradient before the optimizer steps. `stop`: raise StopRun
    naming the step, the batch's data position and the last complete checkpoint, before the weights
    change. `skip`: leave weights and moments as they are, count the step, and stop after `max_skips`."""

    def __init__(self, mode: str, max_skips: int, saver: AtomicCheckpointSaver):
        self.mode, self.max_skips, self.saver = mode, max_skips, saver
        self.skipped = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))

    def fit_start(self, state: State, logger: Logger) -> None:
        for optimizer in state.optimizers:
            step = optimizer.step  # the LR scheduler's step-counting wrapper around the optimizer's step

            def guarded(closure=None, _step=step):
                return self._guarded(state, logger, _step, closure)

            guarded._wrapped_by_lr_sched = True  # it calls the scheduler's wrapper: torch need not warn
            optimizer.step = guarded

    def _guarded(self, state: State, logger: Logger, step, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # forward and backward of every microbatch, as the optimizer would run them
        grads = [p.grad for group in state.optimizers[0].param_groups for p in group["params"] if p.grad is not None]
        finite = (loss is None or math.isfinite(float(loss))) and bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())
        flag = torch.tensor([0 if finite else 1], device=grads[0].device if grads else "cpu")
        dist.all_reduce(flag, reduce_operation="MAX")  # every rank takes the same decision
        if not flag.item():
            step()
            return loss
        at = state.timestamp.batch.value + 1
        what = f"non-finite loss or gradient (loss {loss}) at step {at} ({self._data_position(state)})"
        if self.mode == "stop" or self.skipped >= self.max_skips:
            why = "" if self.mode == "stop" else f" after skipping {self.skipped} steps (train.nonfinite_max_skips)"
            raise StopRun(f"{what}{why}; weights not updated; last complete checkpoint: "
                                 f"{self.saver.last_complete or 'none'}")
        self.skipped += 1
        logger.log_metrics({"train/skipped_steps": self.skipped})
        if dist.get_global_rank() == 0:
            print(f"[{state.run_name}] {what}: step skipped ({self.skipped} skipped so far)", flush=True)
        return loss

    @staticmethod
    def _data_position(state: State) -> str:
        if isinstance(state.batch, dict) and "step" in state.batch:
            return f"data step {int(state.batch['step'][0])}"
        first = state.timestamp.sample_in_epoch.value
        return f"data step {state.timestamp.batch_in_epoch.value + 1} of epoch {state.timestamp.epoch.value}, samples {first}.."


class SpikeMonitor(Callback):
    """Logs a loss more than `zscore` standard deviations above the mean of the last `window` normal
    steps (spikes stay out of the window, so a run of them keeps being reported). Counts them as
    `train/loss_spikes`; the window and the count are in the checkpoint, so a resume reports the same."""

    def __init__(self, window: int, zscore: float):
        self.window, self.zscore = window, zscore
        self.losses: collections.deque = collections.deque(maxlen=window)
        self.spikes = 0

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.losses = collections.deque(state.get("losses", []), maxlen=self.window)
        self.spikes = int(state.get("spikes", 0))

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = float(state.loss.detach()) if isinstance(state.loss, torch.Tensor) else float("nan")
        if not math.isfinite(loss):
            return
        if len(self.losses) == self.window:
            mean = sum(self.losses) / self.window
            std = (sum((x - mean) ** 2 for x in self.losses) / self.window) ** 0.5
            if loss > mean + self.zscore * max(std, 1e-6 * abs(mean)):
                self.spikes += 1
                logger.log_metrics({"train/loss_spikes": self.spikes})
                if dist.get_global_rank() == 0:
                    print(f"[{state.run_name}] loss spike at step {state.timestamp.batch.value}: {loss:.4f} vs mean "
                          f"{mean:.4f} (std {std:.4f}) of the last {self.window} steps", flush=True)
                return
        self.losses.append(loss)


class SaveOnSignal(Callback):
    """SIGTERM (what Slurm, torchrun and Composer's launcher send before they kill) or SIGUSR1 (Slurm's `--signal`):
    the step in flight finishes, then the run stops with a checkpoint of that step (Composer saves at the end of
    training), so a preempted run loses no more than that step plus the write. The ranks agree on the step (one
    all-reduced flag per step), as a signal reaches them at different moments."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.stopped: str | None = None  # the signal's name once the run stopped for it
        self.previous: dict = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}

    def _note(self, signum, frame) -> None:
        self.received = self.received or signum

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_world_size() == 1:  # nothing to agree on: no device copy and no host sync on the step's path
            received = self.received or 0
        else:  # every rank stops after the same step (one small all-reduce per step)
            flag = state.device.tensor_to_device(torch.tensor([self.received or 0]))
            dist.all_reduce(flag, reduce_operation="MAX")
            received = int(flag.item())
        if not received or self.stopped or state.get_elapsed_duration() >= 1.0:  # the last step ends the run anyway
            return
        self.received = self.received or received
        self.stopped = signal.Signals(self.received).name
        state.stop_training()
        if dist.get_global_rank() == 0:
            print(f"[{state.run_name}] {self.stopped} received: stopping after step {state.timestamp.batch.value} with "
                  "a checkpoint of it", flush=True)

    def fit_end(self, state: State, logger: Logger) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def save_after_data_failure(trainer) -> str:
    """The data of the next step could not be read (the store failed mid-run): the weights, optimizer, clock and data
    position are still those after the last finished step, so one process writes its checkpoint now, as a preemption
    would (SaveOnSignal). With several processes only the failing rank knows (the others wait in the next step's
    collectives), so the last interval checkpoint is the one to resume from. Returns what the error line adds."""
    state = trainer.state
    saver = next(cb for cb in state.callbacks if isinstance(cb, AtomicCheckpointSaver))
    step = state.timestamp.batch.value
    resume = "run the same command to resume once the store serves it again"
    if dist.get_world_size() == 1 and step > 0 and saver.last_checkpoint_batch != state.timestamp.batch:
        try:
            saver._save_checkpoint(state, trainer.logger)
        except Exception as e:  # noqa: BLE001 - the data error is the news; say the checkpoint failed too
            why = (str(e).strip().splitlines() or [""])[0]
            return f"the checkpoint of step {step} failed too ({type(e).__name__}: {why}); last complete checkpoint: " \
                   f"{saver.last_complete or 'none'}"
        return f"checkpoint of step {step}: {saver.last_complete}; {resume}"
    latest = Path(saver.folder) / "latest-rank0.pt"  # rank 0's file, what a resume loads, whichever rank failed
    return f"stopped before step {step + 1}; last complete checkpoint: {os.path.realpath(latest) if latest.exists() else 'none'}; {resume}"


def reliability_callbacks(recipe, save_folder: Path) -> list[Callback]:
    """The callbacks run() appends: the atomic saver (Composer then uses it instead of its own), the
    non-finite guard and the spike monitor."""
    rel = recipe.reliability
    saver = AtomicCheckpointSaver(str(save_folder), composer_time(recipe.checkpoint.interval), recipe.checkpoint.keep,
                                  min_free_bytes=int(rel.min_free_gb * 2**30), remote=recipe.checkpoint.remote)
    return [saver, NonFiniteGuard(rel.nonfinite, rel.nonfinite_max_skips, saver), SpikeMonitor(rel.spike_window, rel.spike_zscore)]
