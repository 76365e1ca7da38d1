"""The run's own callbacks: the console line, the checkpoint's metadata, the step ledger, the data-step check,
`train.stop_after`, in-loop evaluation and live export. Reliability's callbacks are in reliability.py; workarounds in shims.py."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from composer import Callback, State, Trainer
from composer.devices import DeviceGPU
from composer.loggers import Logger
from composer.utils import dist

from ettin_train import speed
from ettin_train.config import Duration, Recipe, recipe_to_dict
from ettin_train.data.ledger import LedgerBuffer
from ettin_train.live_export import CheckpointExporter
from ettin_train.train import shims


class Progress(Callback):
    """One console line every `interval` steps on rank 0: step, loss, lr, tokens, tokens/s and (on CUDA)
    MFU over the last interval and peak memory, ETA. The same rates go to the loggers as throughput/*."""

    def __init__(self, recipe: Recipe, interval: int):
        self.interval = interval
        self.total, self.unit = Duration.parse(recipe.train.max_duration)
        self.name = recipe.run_name
        self.start_time = self.start_tokens = self.start_batch = None
        self.model_cfg, self.peak_override = recipe.model, recipe.logging.peak_flops
        self.window = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.start_time = time.perf_counter()
        self.start_tokens, self.start_batch = state.timestamp.token.value, state.timestamp.batch.value
        on_gpu = isinstance(state.device, DeviceGPU)
        peak = speed.peak_flops(torch.cuda.get_device_name(), self.peak_override) if on_gpu else None
        self.window = speed.SpeedWindow(self.model_cfg, peak, dist.get_world_size())
        self.window.start(self.start_time, self.start_tokens)

    def batch_end(self, state: State, logger: Logger) -> None:
        step = state.timestamp.batch.value
        done = (state.timestamp.token.value if self.unit == "tok" else step) >= self.total
        self.window.add(state.batch)
        if step % self.interval and not done:
            return
        flops = None
        if self.window.peak:  # every rank takes part in the sum
            flops = state.device.tensor_to_device(speed.local_flops_tensor(self.window))
            dist.all_reduce(flops)
            flops = float(flops.item())
        rates = self.window.report(time.perf_counter(), state.timestamp.token.value, flops)
        if dist.get_global_rank() != 0:
            return
        logger.log_metrics(rates)
        elapsed = time.perf_counter() - self.start_time
        tokens = state.timestamp.token.value
        tok_per_s = rates["throughput/tokens_per_sec"]
        mfu = f"  MFU {rates['throughput/mfu']:.1%}" if "throughput/mfu" in rates else ""
        if isinstance(state.device, DeviceGPU):  # the peak since the run started, allocated by torch
            mfu += f"  mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        progress, rate = (tokens, (tokens - self.start_tokens) / max(elapsed, 1e-9)) if self.unit == "tok" \
            else (step, (step - self.start_batch) / max(elapsed, 1e-9))
        eta = max(0.0, self.total - progress) / rate if rate > 0 else float("nan")
        lr = state.optimizers[0].param_groups[0]["lr"]
        loss = float(state.loss.detach()) if isinstance(state.loss, torch.Tensor) else float("nan")
        print(f"[{self.name}] step {step:>6}  loss {loss:7.4f}  lr {lr:.2e}  tokens {_si(tokens)}/{_si(self.total) if self.unit == 'tok' else '?'}"
              f"  {_si(tok_per_s)} tok/s{mfu}  ETA {_hms(eta)}", flush=True)


class RunMetadata(Callback):
    """Writes what a checkpoint is into it, under `state.callbacks.RunMetadata`: phase, objective, run
    name, the resolved model config and tokenizer, and the lineage (checkpoint/run_identity.py), so an exporter needs no recipe. (Checkpoints of the
    original runs lack it; the exporter then asks for --phase.)"""

    def __init__(self, recipe: Recipe, lineage: str | None = None):
        self.metadata = {"phase": recipe.phase, "objective": recipe.objective, "run_name": recipe.run_name,
                         "model": recipe_to_dict(recipe)["model"], "tokenizer": recipe.data.tokenizer,
                         "seq_len": recipe.data.seq_len, "lineage": lineage}

    def state_dict(self) -> dict:
        return dict(self.metadata)

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the running recipe's metadata is the truth, and a resumed run writes its own."""


class Ledger(Callback):
    """`ledger.jsonl` in the run folder, one line per step (data/ledger.py says what a line holds). Each
    step is buffered on its rank without waiting on the device; the lines are written at every progress
    interval, before every checkpoint (so a checkpoint's steps are always in the ledger) and at the end."""

    def __init__(self, path: Path, phase: str, interval: int):
        self.buffer, self.interval = LedgerBuffer(path, phase), interval

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.buffer.truncate_after(state.timestamp.batch.value)
        # Every checkpoint's steps must be in the ledger before the checkpoint exists.
        shims.before_each_checkpoint_write(state, self.buffer.flush)

    def batch_end(self, state: State, logger: Logger) -> None:
        step = state.timestamp.batch.value
        self.buffer.add(step, state.batch, state.loss)
        if step % self.interval == 0:
            self.buffer.flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.buffer.flush()


class DataStepCheck(Callback):
    """Replay: the trainer's step and the order's step must agree at every step."""

    def after_dataloader(self, state: State, logger: Logger) -> None:
        data_step, step = int(state.batch["step"][0]), state.timestamp.batch.value + 1
        if data_step != step:
            raise RuntimeError(f"data step {data_step} != trainer step {step}: the loader drifted from the order")


class StopAfter(Callback):
    """`train.stop_after`: end the run with a checkpoint at a point before max_duration (a planned
    preemption) without changing the schedule, which is computed from max_duration."""

    def __init__(self, stop_after: str):
        self.at, self.unit = Duration.parse(stop_after)

    def batch_end(self, state: State, logger: Logger) -> None:
        now = state.timestamp.token.value if self.unit == "tok" else state.timestamp.batch.value
        if now >= self.at:
            state.stop_training()


class Evaluate(Callback):
    """The recipe's `eval` (eval/loop.py): held-out metrics on every rank when due, after the step and before
    its checkpoint, to the console, the loggers and run_dir/eval.jsonl."""

    def __init__(self, loop, log, run_name: str, autocast_dtype):
        self.loop, self.log, self.name, self.autocast = loop, log, run_name, autocast_dtype
        self.before = (0, 0)

    def fit_start(self, state: State, logger: Logger) -> None:
        self.before = (state.timestamp.token.value, state.timestamp.batch.value)
        if dist.get_global_rank() == 0:
            self.log.drop_after(state.timestamp.batch.value)

    def batch_end(self, state: State, logger: Logger) -> None:
        now, before = (state.timestamp.token.value, state.timestamp.batch.value), self.before
        self.before = now
        if not self.loop.due(before, now):
            return
        wrapper = state.model.module if isinstance(state.model, torch.nn.parallel.DistributedDataParallel) else state.model
        results = self.loop.run(wrapper.model, dist.get_global_rank(), self.autocast)
        if dist.get_global_rank() == 0:
            from ettin_train.eval.loop import console_line, logger_metrics

            self.log.append(now[1], now[0], results)
            logger.log_metrics(logger_metrics(results))
            print(console_line(self.name, now[1], results), flush=True)


class ExportCheckpoints(Callback):
    """`export.repo`: exports each checkpoint as the CheckpointSaver writes it (see live_export.py), or with
    `export.every_checkpoint: false` only the last one, at the end of the run."""

    def __init__(self, exporter: CheckpointExporter, every_checkpoint: bool):
        self.exporter, self.every, self.done, self.saver = exporter, every_checkpoint, set(), None

    def take_over(self, trainer: Trainer) -> None:
        self.saver = trainer._checkpoint_saver
        # Callbacks run in list order and the Trainer appends its saver last: run after it.
        trainer.state.callbacks.remove(self)
        trainer.state.callbacks.append(self)

    def _export_new(self, last_only: bool) -> None:
        if dist.get_global_rank() != 0 or self.saver is None:
            return
        new = [p for p in self.saver.saved_checkpoints if p not in self.done]
        for path in new[-1:] if last_only else new:
            self.exporter.export(path)
        self.done.update(new)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.every:
            self._export_new(last_only=False)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self.batch_checkpoint(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._export_new(last_only=not self.every)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _hms(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
