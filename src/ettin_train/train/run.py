"""`run(recipe)`: a checked recipe turned into a Composer `Trainer` and trained, step by step.

This package (src/ettin_train/train/) is the only one that imports Composer. Model, objectives, data,
schedules, preflight and checkpoint reading know nothing of Composer, so a move to another trainer
rewrites this package only.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from composer import Callback, Trainer
from composer.core import DataSpec
from composer.devices import DeviceCPU, DeviceGPU
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from ettin_train import stores
from ettin_train.checkpoint import resume, run_identity
from ettin_train.checkpoint.optimizer_state import ParamLayout
from ettin_train.checkpoint.phase_start import start_phase_from
from ettin_train.checkpoint.run_folder import finished_run
from ettin_train.config import Duration, Recipe, recipe_to_dict
from ettin_train.data.order import OrderError
from ettin_train.data.permuted import PermutedBatches, resolve_sources
from ettin_train.data.mds import DataError, ShardUnavailable
from ettin_train.data.remote import order_folder
from ettin_train.data.replay import ReplayBatches
from ettin_train.live_export import CheckpointExporter
from ettin_train.model import EttinModel
from ettin_train.objectives import SpecialTokens, get_objective
from ettin_train.phases import phase as phase_named
from ettin_train.preflight import preflight
from ettin_train.train import parallel
from ettin_train.train.callbacks import (DataStepCheck, Evaluate, ExportCheckpoints, Ledger, Progress, RunMetadata,
                                        StopAfter)
from ettin_train.train.module import EttinComposerModel, LRSchedule, build_optimizer, composer_time
from ettin_train.train.reliability import SaveOnSignal, StopRun, reliability_callbacks, save_after_data_failure
from ettin_train.train.shims import (MetricsOnlyWandB, RestoreRngMidEpoch, adopt_torchrun_env, checked_tarballs,
                                     digest_checkpoint_writes, per_node_signal_files, route_checkpoint_loads)


def run(recipe: Recipe, extra_callbacks: Sequence[Callback] = ()) -> None:
    """Train `recipe`. `extra_callbacks` go after the run's own (train.py passes none; the tests' fault injector
    comes in this way)."""
    device, world = _start_processes(recipe)
    on_gpu = isinstance(device, DeviceGPU)
    run_dir = Path(recipe.run_dir)
    save_folder = run_dir / "checkpoints"
    preflight(recipe, save_folder)  # bad inputs stop here; a crashed run's checkpoint folder is repaired
    done = finished_run(recipe) if recipe.checkpoint.remote else None  # its final checkpoint came from the store
    if done:
        if dist.get_global_rank() == 0:
            print(done.line(), flush=True)
        return
    tokens = _special_tokens(recipe)
    objective = get_objective(recipe.objective)
    model = EttinModel(recipe.model)
    optimizer = build_optimizer(model, recipe)
    start = _starting_point(recipe, model, optimizer, save_folder)
    dataset, loader, per_device = _data(recipe, objective, tokens, world)
    evaluate = _in_loop_eval(recipe, objective, tokens, world, on_gpu)  # held-out data read before anything is written
    lineage = [run_identity.lineage_of(recipe) if dist.get_global_rank() == 0 else None]
    dist.broadcast_object_list(lineage, src=0)
    if dist.get_global_rank() == 0:
        run_identity.record_start(recipe, lineage[0])  # run.json at the first start; this start's recipe kept
        print(f"[{recipe.run_name}] {recipe.objective} {recipe.phase}, {model.num_params():,} parameters, "
              f"{world} process(es) on {'gpu' if on_gpu else 'cpu'} ({parallel.describe(recipe.parallel, world)}), "
              f"{per_device} sequences per device\n[{recipe.run_name}] start: {start.described}", flush=True)

    restore_rng = RestoreRngMidEpoch()
    exporter = ExportCheckpoints(CheckpointExporter(recipe.export.repo, recipe.run_name), recipe.export.every_checkpoint) \
        if recipe.export.repo else None
    on_signal = SaveOnSignal()
    callbacks = _callbacks(recipe, save_folder, restore_rng, exporter, evaluate, lineage[0]) + [on_signal] + list(extra_callbacks)
    # Both loaders (replayed order, own data) seek from a sample count, so a checkpoint without a data position
    # (the original runs') continues at its step without re-reading the epoch.
    layout = resume.CurrentLayout(ParamLayout.of(model, optimizer), data_position=lambda n: dataset.state_dict(n, True))
    loggers = _loggers(recipe, run_dir)
    parallelism = parallel.prepare(recipe.parallel, model, world, "cuda" if on_gpu else "cpu")
    route_checkpoint_loads(recipe.checkpoint.trust_pickles)  # Composer's own loads (autoresume, load_path)
    checked_tarballs()  # a .tar load_path: no member is written outside its folder
    per_node_signal_files()  # nodes sharing the run folder: a signal file each
    digest_checkpoint_writes()  # the saver's marker gets the sha256 of the bytes as written
    trainer = Trainer(
        model=EttinComposerModel(model, objective),
        # The token clock counts real tokens only (the original's count_padding_tokens: false).
        train_dataloader=DataSpec(loader, get_num_tokens_in_batch=lambda batch: int(batch["attention_mask"].sum())),
        max_duration=composer_time(recipe.train.max_duration),
        optimizers=optimizer,
        schedulers=LRSchedule(recipe),
        step_schedulers_every_batch=True,
        device=device,
        precision=recipe.train.precision if recipe.train.precision != "auto" else ("amp_bf16" if on_gpu else "fp32"),
        device_train_microbatch_size=recipe.train.microbatch or per_device,
        run_name=recipe.run_name,
        save_folder=str(save_folder),
        save_interval=composer_time(recipe.checkpoint.interval),
        save_num_checkpoints_to_keep=recipe.checkpoint.keep,
        autoresume=recipe.checkpoint.autoresume,
        load_path=start.load_path,
        load_ignore_keys=layout,
        seed=recipe.train.seed,
        callbacks=callbacks,
        loggers=loggers,
        progress_bar=False,
        log_to_console=False,
        parallelism_config=parallelism,
        dist_timeout=recipe.parallel.timeout_s,
    )
    if dist.get_global_rank() == 0 and start.from_checkpoint:
        print(_start_block(recipe, trainer, start.full_resume, layout.notes), flush=True)
    restore_rng.take_over(trainer)
    if exporter:
        exporter.take_over(trainer)
    parallel.after_wrap(model)
    lost = None
    try:
        trainer.fit()
    except StopRun as e:
        sys.exit(f"error: {e}")
    except ShardUnavailable as e:  # the store failed for good: one line naming the shard, and where to resume from
        problem = f"{e.line()}; {save_after_data_failure(trainer)}"
        if world == 1:
            sys.exit(f"error: {problem}")
        lost = problem  # the other processes wait in the next step: close()'s barrier would never meet theirs
    except DataError as e:  # a sample that cannot be trained on ([PAD] inside it): one line naming the shard and sample
        sys.exit(f"error: {e.line()}")
    except RuntimeError as e:
        latest = save_folder / "latest-rank0.pt"
        lost = parallel.lost_process(e, dist.get_global_rank(), os.path.realpath(latest) if latest.exists() else None)
        if lost is None:
            raise
    finally:
        if lost is None:  # with a process gone, close()'s barrier would fail (or wait parallel.timeout_s) again
            trainer.close()
    if lost:
        print(f"error: {lost}", file=sys.stderr, flush=True)  # at once: the launcher's SIGTERM may follow
        sys.exit(1)
    if on_signal.stopped:  # not finished: a non-zero status, so a pipeline does not go on to the next phase
        if dist.get_global_rank() == 0:
            print(f"[{recipe.run_name}] stopped on {on_signal.stopped} at step {trainer.state.timestamp.batch.value}; "
                  f"checkpoint {os.path.realpath(save_folder / 'latest-rank0.pt')}; run the same command to resume", flush=True)
        sys.exit(128 + signal.Signals[on_signal.stopped].value)
    if dist.get_global_rank() == 0:
        print(f"[{recipe.run_name}] done at step {trainer.state.timestamp.batch.value}; checkpoints in {save_folder}", flush=True)


def _start_processes(recipe: Recipe) -> tuple[DeviceCPU | DeviceGPU, int]:
    """The device, the process group and the seeds; settings that do not fit the world exit here."""
    on_gpu = recipe.train.device == "gpu" or (recipe.train.device == "auto" and torch.cuda.is_available())
    device = DeviceGPU() if on_gpu else DeviceCPU()
    # Distributed must be up before streaming builds its dataset (streaming starts its own process group).
    adopt_torchrun_env()
    dist.initialize_dist(device, timeout=recipe.parallel.timeout_s)
    world = dist.get_world_size()
    if recipe.train.global_batch % world and not recipe.data.order:
        sys.exit(f"error: train.global_batch {recipe.train.global_batch} is not divisible by the world size {world}")
    try:
        parallel.check(recipe.parallel, world)
    except parallel.ParallelError as e:
        sys.exit(f"error: {e}")
    reproducibility.seed_all(recipe.train.seed)
    return device, world


def _special_tokens(recipe: Recipe) -> SpecialTokens:
    from transformers import AutoTokenizer

    return SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(recipe.data.tokenizer))  # checked by preflight


@dataclass
class _Start:
    described: str  # for the start line
    load_path: str | None = None  # what Composer loads (checkpoint.load_path); autoresume finds its own
    full_resume: bool = False  # the clock, schedule and data position come from the checkpoint
    from_checkpoint: bool = False


def _starting_point(recipe: Recipe, model: EttinModel, optimizer, save_folder: Path) -> _Start:
    """A resume of this run, the previous phase's checkpoint (init.checkpoint), a full load of another run's
    (checkpoint.load_path), or a fresh initialisation."""
    if recipe.checkpoint.autoresume and (save_folder / "latest-rank0.pt").exists():
        return _Start(f"resuming from {os.path.realpath(save_folder / 'latest-rank0.pt')} (model, optimizer, schedule, "
                      "clock, data position)", full_resume=True, from_checkpoint=True)
    if recipe.init.checkpoint:
        return _Start(start_phase_from(recipe.init.checkpoint, recipe, model, optimizer), from_checkpoint=True)
    if recipe.checkpoint.load_path:
        load_path = recipe.checkpoint.load_path
        try:
            if stores.is_store(load_path) and not load_path.startswith("hf://"):
                load_path = _from_store(load_path, Path(recipe.run_dir) / "from-store")
            elif load_path.startswith("hf://"):
                load_path = resume.fetch_hub_file(load_path)
            if not resume.is_remote(load_path):
                load_path = resume.check_full_checkpoint(load_path, {f"model.{k}" for k in model.state_dict()},
                                                         ParamLayout.of(model, optimizer),
                                                         recipe.checkpoint.trust_pickles, recipe.checkpoint.verify_digest,
                                                         reads_sharded=recipe.parallel.checkpoint_format == "sharded")
        except ValueError as e:  # a recipe value that cannot work: exit 2, as a recipe error
            print(f"error: checkpoint.load_path: {e}", file=sys.stderr)
            sys.exit(2)
        return _Start(f"continuing from {load_path} (checkpoint.load_path: a full resume)", load_path=load_path,
                      full_resume=True, from_checkpoint=True)
    return _Start("fresh initialisation")


def _from_store(uri: str, dest: Path) -> str:
    """A load_path in an object store, downloaded by rank 0 and checked against the marker beside it (stores.py);
    every rank gets the local path or the one-line refusal (ValueError)."""
    result = [None]
    if dist.get_global_rank() == 0:
        try:
            result = [("ok", str(stores.fetch_checkpoint(uri, dest)))]
        except (ValueError, stores.StoreError) as e:
            result = [("error", str(e))]
    dist.broadcast_object_list(result, src=0)
    kind, value = result[0]
    if kind == "error":
        raise ValueError(value)
    return value


def _data(recipe: Recipe, objective, tokens: SpecialTokens, world: int):
    """The dataset (a replayed order, or one global permutation per epoch of the recipe's own data), its
    loader, and the sequences per device of the largest step."""
    collate = objective.make_collator(tokens, recipe.data.mask_rate, recipe.train.seed)
    workers = dict(num_workers=recipe.data.num_workers, persistent_workers=recipe.data.num_workers > 0,
                   worker_init_fn=_leave_signals_to_the_trainer if recipe.data.num_workers > 0 else None)
    per_device = recipe.train.global_batch // world
    if recipe.data.order:
        order_phase = recipe.data.order_phase or phase_named(recipe.phase).short
        try:
            dataset = ReplayBatches(recipe.data.order, order_phase, dist.get_global_rank(), world, recipe.data.seq_len, collate,
                                    tokens=tokens, force_sep=not objective.causal, truncate=recipe.data.truncate_long_rows,
                                    remote=order_folder(recipe.data))
        except (OrderError, ValueError, KeyError) as e:
            sys.exit(f"error: data.order: {e}")
        steps = dataset.index.steps(order_phase)
        max_value, max_unit = Duration.parse(recipe.train.max_duration)
        if max_unit == "ba" and max_value > steps:
            sys.exit(f"error: train.max_duration {recipe.train.max_duration} is longer than the order's {steps} steps "
                     f"({recipe.data.order} phase {order_phase})")
        per_device = int(dataset.index.batch_sizes(order_phase).max()) // world
    else:
        try:  # one global permutation per epoch, whatever the world size (data/permuted.py)
            dataset = PermutedBatches(resolve_sources(recipe.data), seed=recipe.data.shuffle_seed,
                                      global_batch=recipe.train.global_batch, rank=dist.get_global_rank(), world=world,
                                      phase=recipe.phase, seq_len=recipe.data.seq_len, tokens=tokens,
                                      force_sep=not objective.causal, collate=collate)
        except ValueError as e:
            sys.exit(f"error: {e}")
    return dataset, DataLoader(dataset, batch_size=None, **workers), per_device


def _leave_signals_to_the_trainer(_worker: int) -> None:
    """A loader worker ignores SIGTERM, which Slurm sends to every process of a job: the trainer then finishes its
    step and saves (SaveOnSignal) instead of failing on a dead worker. Workers still exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _in_loop_eval(recipe: Recipe, objective, tokens: SpecialTokens, world: int, on_gpu: bool) -> Evaluate | None:
    """The recipe's `eval` (off while eval.sources is empty); a held-out source that cannot be used exits here."""
    if not recipe.eval.sources:
        return None
    from ettin_train.eval.loop import EvalLog, HeldOutError, InLoopEval

    try:
        loop = InLoopEval(recipe, objective, tokens, world)
    except HeldOutError as e:
        sys.exit(f"error: {e}")
    bf16 = recipe.train.precision == "amp_bf16" or (recipe.train.precision == "auto" and on_gpu)
    return Evaluate(loop, EvalLog(Path(recipe.run_dir) / "eval.jsonl", recipe.phase), recipe.run_name,
                    torch.bfloat16 if bf16 else None)


def _callbacks(recipe: Recipe, save_folder: Path, restore_rng: RestoreRngMidEpoch,
               exporter: ExportCheckpoints | None, evaluate: Evaluate | None, lineage: str) -> list[Callback]:
    run_dir = Path(recipe.run_dir)
    callbacks: list[Callback] = [Progress(recipe, recipe.logging.console_interval), restore_rng, RunMetadata(recipe, lineage),
                                 Ledger(run_dir / "ledger.jsonl", recipe.phase, recipe.logging.console_interval)]
    callbacks += [evaluate] if evaluate else []  # after the step's console line, before its checkpoint
    callbacks.append(DataStepCheck())  # replay and own data both tag every batch with its step
    if recipe.train.stop_after:
        callbacks.append(StopAfter(recipe.train.stop_after))
    callbacks += reliability_callbacks(recipe, save_folder)  # atomic checkpoints, non-finite guard, spike monitor
    return callbacks + ([exporter] if exporter else [])


def _loggers(recipe: Recipe, run_dir: Path) -> list:
    wandb = recipe.logging.wandb
    if not wandb.project or wandb.mode == "disabled":
        return []
    mode = wandb.mode if wandb.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    group = wandb.group or (f"ettin-{recipe.model.size}" if recipe.model.size else recipe.run_name)
    # the full resolved recipe is the run's config (Composer adds its own hyperparameters beside it)
    return [MetricsOnlyWandB(project=wandb.project, entity=wandb.entity, group=group, name=wandb.name or recipe.run_name,
                             tags=list(wandb.tags) or None, init_kwargs={"dir": str(run_dir), "config": recipe_to_dict(recipe)})]


def _start_block(recipe: Recipe, trainer: Trainer, full_resume: bool, notes: list[str]) -> str:
    """What the run took from a checkpoint, read off the state Composer restored (so remote paths too)."""
    ts, group = trainer.state.timestamp, trainer.state.optimizers[0].param_groups[0]
    adam_step = int(group.get("step", 0))
    if full_resume:
        loaded, reset = resume.resume_parts(
            ts.batch.value, ts.token.value, adam_step, len(trainer._rng_state or []), ts.epoch.value,
            ts.sample_in_epoch.value, bool(trainer.state.dataset_resumption.get("train")))
    else:
        loaded, reset = resume.phase_start_parts(recipe.init.load, adam_step)
    return resume.start_block(recipe.run_name, loaded, reset, notes, ts.batch.value + 1)
