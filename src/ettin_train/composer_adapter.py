"""The only module that imports Composer: it turns a checked recipe into a Composer `Trainer` and runs it.

Model, objectives, data, schedules and checkpoint reading know nothing of Composer, so a move to
another trainer rewrites this file only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from composer import Callback, ComposerModel, State, Trainer
from composer.core import DataSpec
from composer.devices import DeviceCPU, DeviceGPU
from composer.loggers import Logger, WandBLogger
from composer.utils import dist, reproducibility
from optimi import StableAdamW
from torch.utils.data import DataLoader

from ettin_train import parallel, speed
from ettin_train.checkpoint import find_checkpoint, load_checkpoint, model_state_dict
from ettin_train.checkpoint import resume
from ettin_train.config import Duration, Recipe, recipe_to_dict
from ettin_train.data.order import OrderError, rows_sha256
from ettin_train.data.permuted import PermutedBatches, resolve_sources
from ettin_train.data.replay import ReplayBatches
from ettin_train.live_export import CheckpointExporter
from ettin_train.model import EttinModel
from ettin_train.objectives import Objective, SpecialTokens, get_objective
from ettin_train.preflight import preflight
from ettin_train.reliability import StopRun, reliability_callbacks
from ettin_train.schedules import lr_multiplier


class EttinComposerModel(ComposerModel):
    """Composer's wrapper: the objective's loss is the forward pass. The attribute name `model`
    gives checkpoint keys the `model.` prefix that the original checkpoints have."""

    def __init__(self, model: EttinModel, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective.loss(self.model, batch)

    def loss(self, outputs, batch):
        return outputs


class LRSchedule:
    """Composer calls this after every step; Composer wraps it in a `LambdaLR` (checkpoint key `LambdaLR`)."""

    def __init__(self, recipe: Recipe):
        self.cfg = recipe.scheduler
        self.total, self.unit = Duration.parse(recipe.train.max_duration)

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        t = state.timestamp.token.value if self.unit == "tok" else state.timestamp.batch.value
        return lr_multiplier(self.cfg, t, self.total)


class Progress(Callback):
    """One console line every `interval` steps on rank 0: step, loss, lr, tokens, tokens/s and (on CUDA)
    MFU over the last interval, ETA. The same rates go to the loggers as throughput/*."""

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
        progress, rate = (tokens, (tokens - self.start_tokens) / max(elapsed, 1e-9)) if self.unit == "tok" \
            else (step, (step - self.start_batch) / max(elapsed, 1e-9))
        eta = max(0.0, self.total - progress) / rate if rate > 0 else float("nan")
        lr = state.optimizers[0].param_groups[0]["lr"]
        loss = float(state.loss) if isinstance(state.loss, torch.Tensor) else float("nan")
        print(f"[{self.name}] step {step:>6}  loss {loss:7.4f}  lr {lr:.2e}  tokens {_si(tokens)}/{_si(self.total) if self.unit == 'tok' else '?'}"
              f"  {_si(tok_per_s)} tok/s{mfu}  ETA {_hms(eta)}", flush=True)


class RunMetadata(Callback):
    """Writes what a checkpoint is into it, under `state.callbacks.RunMetadata`: phase, objective, run
    name, the resolved model config and tokenizer, so an exporter needs no recipe. (Checkpoints of the
    original runs lack it; the exporter then asks for --phase.)"""

    def __init__(self, recipe: Recipe):
        self.metadata = {"phase": recipe.phase, "objective": recipe.objective, "run_name": recipe.run_name,
                         "model": recipe_to_dict(recipe)["model"], "tokenizer": recipe.data.tokenizer,
                         "seq_len": recipe.data.seq_len}

    def state_dict(self) -> dict:
        return dict(self.metadata)

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the running recipe's metadata is the truth, and a resumed run writes its own."""


class Ledger(Callback):
    """`ledger.jsonl` in the run folder: one line per step with the step, phase, data step (replay),
    rows, non-padding tokens, the loss, `rows_sha256` (sha256 over the step's global rows in order, each row's
    non-padding ids as little-endian int32; the same digest data_tools/show_batch.py prints for a step
    of an order) and `inputs_sha256` (the same over the model's inputs, i.e. after MLM masking)."""

    def __init__(self, path: Path, phase: str):
        self.path, self.phase = path, phase

    def fit_start(self, state: State, logger: Logger) -> None:
        # A run killed after its last checkpoint wrote lines for steps it will now train again.
        if dist.get_global_rank() == 0 and self.path.exists():
            resumed_at = state.timestamp.batch.value
            lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resumed_at]
            self.path.write_text("".join(ln + "\n" for ln in lines))

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = state.batch
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        labels = batch.get("labels")
        original = ids if labels is None else torch.where(labels.cpu() != -100, labels.cpu(), ids)
        mine = ([original[i][mask[i]].numpy() for i in range(len(ids))], [ids[i][mask[i]].numpy() for i in range(len(ids))],
                float(state.loss) if isinstance(state.loss, torch.Tensor) else float("nan"))
        gathered = dist.all_gather_object(mine)
        if dist.get_global_rank() != 0:
            return
        rows = [r for rank_rows, _, _ in gathered for r in rank_rows]
        inputs = [r for _, rank_inputs, _ in gathered for r in rank_inputs]
        line = {"step": state.timestamp.batch.value, "phase": self.phase,
                "data_step": int(batch["step"][0]) if "step" in batch else None,
                "rows": len(rows), "tokens": int(sum(len(r) for r in rows)),
                "rows_sha256": rows_sha256(rows), "inputs_sha256": rows_sha256(inputs),
                # the mean of the ranks' losses: the loss whose gradient the step applied (DDP/FSDP average)
                "loss": sum(loss for _, _, loss in gathered) / len(gathered)}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


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


class RestoreRngMidEpoch(Callback):
    """Composer 0.32.1 restores the saved RNG state on resume only when it spins the dataloader; with a
    dataset that resumes itself (StreamingDataset) mid-epoch it never does, so dropout masks after a
    resume differ from an uninterrupted run. This restores it just before the first resumed batch,
    after the dataloader iterator has been created (which draws from the RNG in both runs)."""

    def __init__(self):
        self.rng_state = None

    def take_over(self, trainer: Trainer) -> None:
        if trainer._rng_state is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
            self.rng_state, trainer._rng_state = trainer._rng_state, None

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.rng_state is not None:
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None


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


class MetricsOnlyWandB(WandBLogger):
    """Composer's autoresume asks every logger for the latest checkpoint, and WandBLogger then calls the
    wandb API, which fails without an API key (offline runs). Checkpoints live in the run folder only."""

    def download_file(self, remote_file_name: str, *args, **kwargs) -> None:
        raise FileNotFoundError(f"{remote_file_name}: checkpoints are not stored in wandb")


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> StableAdamW:
    """StableAdamW with fully decoupled weight decay; no decay for norms and biases (ndim <= 1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = recipe.optimizer
    return StableAdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay, decouple_lr=True,
        # optimi 0.3 picks its Triton kernels whenever Triton is importable, also for CPU tensors.
        triton=None if torch.cuda.is_available() else False,
    )


def start_phase_from(path: str, recipe: Recipe, model: EttinModel, optimizer: StableAdamW) -> str:
    """Load what `init.load` declares from the previous phase's checkpoint. The learning rate, the
    schedule and the clock are this recipe's: only weights (and moments) come from the checkpoint."""
    try:
        file = find_checkpoint(path)
    except FileNotFoundError as e:
        sys.exit(f"error: init.checkpoint: {e}")
    ckpt = load_checkpoint(file)
    weights = model_state_dict(ckpt)
    # The encoder names its prediction head `head.*`, the decoder `lm_head.*` (as the original classes).
    # A cross-objective continuation takes the other objective's weights with the head renamed.
    renamed = ""
    ours, theirs = model.head_name, "head" if model.head_name == "lm_head" else "lm_head"
    if recipe.init.load == "model" and any(k.startswith(f"{theirs}.") for k in weights) \
            and not any(k.startswith(f"{ours}.") for k in weights):
        weights = {f"{ours}.{k[len(theirs) + 1:]}" if k.startswith(f"{theirs}.") else k: v for k, v in weights.items()}
        kind = "decoder" if theirs == "lm_head" else "encoder"
        renamed = f" ({kind} checkpoint: {theirs}.* renamed {ours}.*)"
    missing, unexpected = sorted(set(model.state_dict()) - set(weights)), sorted(set(weights) - set(model.state_dict()))
    shapes = [k for k, v in model.state_dict().items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        if recipe.init.load != "model" and any(k.startswith(("head.", "lm_head.")) for k in missing):
            sys.exit(f"error: init.checkpoint {file} is a checkpoint of the other objective; a cross-objective start "
                     "takes the weights only: set init.load=model")
        sys.exit(f"error: init.checkpoint {file} does not fit this recipe's model ({recipe.objective}, {model.num_params():,} "
                 f"parameters): missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}")
    model.load_state_dict(weights, strict=True)
    taken = f"model weights{renamed}"
    if recipe.init.load == "model+optimizer":
        saved = ckpt["state"].get("optimizers", {}).get("StableAdamW")
        if saved is None:
            sys.exit(f"error: init.checkpoint {file} has no StableAdamW state; set init.load=model to take only the weights")
        optimizer.load_state_dict(saved)
        opt = recipe.optimizer
        for group, wd in zip(optimizer.param_groups, (opt.weight_decay, 0.0)):
            # torch restores the saved hyperparameters with the moments; the recipe's values win.
            # `max_lr` (the reference for decoupled weight decay) stays as saved, as in the original.
            group.update(lr=opt.lr, initial_lr=opt.lr, weight_decay=wd, beta1=opt.betas[0], beta2=opt.betas[1], eps=opt.eps)
            for key, value in optimizer.defaults.items():  # keys an older optimi (the original's 0.2.1) did not save
                group.setdefault(key, value)
            if not torch.cuda.is_available():
                group["triton"] = False  # a GPU run's choice of kernels does not carry over to the CPU
        taken += " and optimizer moments"
    step = ckpt["state"]["timestamp"]["Timestamp"]["batch"]
    return f"{taken} from {file} (its step {int(step)}); clock, schedule and learning rate start fresh"


def run(recipe: Recipe) -> None:
    on_gpu = recipe.train.device == "gpu" or (recipe.train.device == "auto" and torch.cuda.is_available())
    device = DeviceGPU() if on_gpu else DeviceCPU()
    # Distributed must be up before streaming builds its dataset (streaming starts its own process group).
    parallel.adopt_torchrun_env()
    dist.initialize_dist(device)
    world = dist.get_world_size()
    if recipe.train.global_batch % world and not recipe.data.order:
        sys.exit(f"error: train.global_batch {recipe.train.global_batch} is not divisible by the world size {world}")
    per_device = recipe.train.global_batch // world
    try:
        parallel.check(recipe.parallel, world, on_gpu)
    except parallel.ParallelError as e:
        sys.exit(f"error: {e}")
    reproducibility.seed_all(recipe.train.seed)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.data.tokenizer)
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    if tokens.vocab_size > recipe.model.vocab_size:
        sys.exit(f"error: tokenizer {recipe.data.tokenizer} has {tokens.vocab_size} tokens, more than model.vocab_size {recipe.model.vocab_size}")
    objective = get_objective(recipe.objective)
    model = EttinModel(recipe.model)
    optimizer = build_optimizer(model, recipe)

    run_dir = Path(recipe.run_dir)
    save_folder = run_dir / "checkpoints"
    preflight(recipe, model, save_folder)  # bad inputs stop here; a crashed run's checkpoint folder is repaired
    resuming = recipe.checkpoint.autoresume and (save_folder / "latest-rank0.pt").exists()
    load_path = None
    if resuming:
        started = f"resuming from {os.path.realpath(save_folder / 'latest-rank0.pt')} (model, optimizer, schedule, clock, data position)"
    elif recipe.init.checkpoint:
        started = start_phase_from(recipe.init.checkpoint, recipe, model, optimizer)
    elif recipe.checkpoint.load_path:
        load_path = recipe.checkpoint.load_path
        try:
            if load_path.startswith("hf://"):
                load_path = resume.fetch_hub_file(load_path)
            if not resume.is_remote(load_path):
                load_path = resume.check_full_checkpoint(load_path, {f"model.{k}" for k in model.state_dict()})
        except ValueError as e:  # a recipe value that cannot work: exit 2, as a recipe error
            print(f"error: checkpoint.load_path: {e}", file=sys.stderr)
            sys.exit(2)
        started = f"continuing from {load_path} (checkpoint.load_path: a full resume)"
    else:
        started = "fresh initialisation"

    collate = objective.make_collator(tokens, recipe.data.mask_rate, recipe.train.seed)
    workers = dict(num_workers=recipe.data.num_workers, persistent_workers=recipe.data.num_workers > 0)
    if recipe.data.order:
        order_phase = recipe.data.order_phase or {"pretrain": "pretrain", "extension": "ext", "decay": "decay"}[recipe.phase]
        try:
            dataset = ReplayBatches(recipe.data.order, order_phase, dist.get_global_rank(), world, recipe.data.seq_len, collate)
        except (OrderError, ValueError, KeyError) as e:
            sys.exit(f"error: data.order: {e}")
        steps = dataset.index.steps(order_phase)
        max_value, max_unit = Duration.parse(recipe.train.max_duration)
        if max_unit == "ba" and max_value > steps:
            sys.exit(f"error: train.max_duration {recipe.train.max_duration} is longer than the order's {steps} steps "
                     f"({recipe.data.order} phase {order_phase})")
        per_device = int(dataset.index._table(order_phase)[:, 1].max()) // world
        loader = DataLoader(dataset, batch_size=None, **workers)
    else:
        try:  # one global permutation per epoch, whatever the world size (data/permuted.py)
            dataset = PermutedBatches(resolve_sources(recipe.data), seed=recipe.data.shuffle_seed,
                                      global_batch=recipe.train.global_batch, rank=dist.get_global_rank(), world=world,
                                      phase=recipe.phase, seq_len=recipe.data.seq_len, tokens=tokens,
                                      force_sep=not objective.causal, collate=collate)
        except ValueError as e:
            sys.exit(f"error: {e}")
        loader = DataLoader(dataset, batch_size=None, **workers)
    in_loop_eval = None
    if recipe.eval.sources:  # held-out data checked and read before anything is written
        from ettin_train.eval.loop import HeldOutError, InLoopEval

        try:
            in_loop_eval = InLoopEval(recipe, objective, tokens, world)
        except HeldOutError as e:
            sys.exit(f"error: {e}")
    # The token clock counts real tokens only (the original's count_padding_tokens: false).
    data = DataSpec(loader, get_num_tokens_in_batch=lambda batch: int(batch["attention_mask"].sum()))

    if dist.get_global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        print(f"[{recipe.run_name}] {recipe.objective} {recipe.phase}, {model.num_params():,} parameters, "
              f"{world} process(es) on {'gpu' if on_gpu else 'cpu'} ({parallel.describe(recipe.parallel, world)}), {per_device} sequences per device\n"
              f"[{recipe.run_name}] start: {started}", flush=True)

    restore_rng = RestoreRngMidEpoch()
    callbacks: list[Callback] = [Progress(recipe, recipe.logging.console_interval), restore_rng, RunMetadata(recipe),
                                 Ledger(run_dir / "ledger.jsonl", recipe.phase)]
    if in_loop_eval:
        from ettin_train.eval.loop import EvalLog

        callbacks.append(Evaluate(in_loop_eval, EvalLog(run_dir / "eval.jsonl", recipe.phase), recipe.run_name,
                                  torch.bfloat16 if recipe.train.precision == "amp_bf16" or (recipe.train.precision == "auto" and on_gpu) else None))
    callbacks.append(DataStepCheck())  # replay and own data both tag every batch with its step
    if recipe.train.stop_after:
        callbacks.append(StopAfter(recipe.train.stop_after))
    callbacks += reliability_callbacks(recipe, save_folder)  # atomic checkpoints, non-finite guard, spike monitor
    exporter = ExportCheckpoints(CheckpointExporter(recipe.export.repo, recipe.run_name), recipe.export.every_checkpoint) \
        if recipe.export.repo else None
    callbacks += [exporter] if exporter else []
    # Both loaders (replayed order, own data) seek from a sample count, so a checkpoint without a data position
    # (the original runs') continues at its step without re-reading the epoch.
    layout = resume.CurrentLayout(optimizer.defaults, data_position=lambda n: dataset.state_dict(n, True))
    loggers = []
    wandb = recipe.logging.wandb
    if wandb.project and wandb.mode != "disabled":
        mode = wandb.mode if wandb.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.environ["WANDB_MODE"] = mode
        loggers.append(MetricsOnlyWandB(project=wandb.project, entity=wandb.entity, init_kwargs={"dir": str(run_dir)}))

    precision = recipe.train.precision if recipe.train.precision != "auto" else ("amp_bf16" if on_gpu else "fp32")
    parallelism = parallel.prepare(recipe.parallel, model, world, "cuda" if on_gpu else "cpu")
    trainer = Trainer(
        model=EttinComposerModel(model, objective),
        train_dataloader=data,
        max_duration=_composer_time(recipe.train.max_duration),
        optimizers=optimizer,
        schedulers=LRSchedule(recipe),
        step_schedulers_every_batch=True,
        device=device,
        precision=precision,
        device_train_microbatch_size=recipe.train.microbatch or per_device,
        run_name=recipe.run_name,
        save_folder=str(save_folder),
        save_interval=_composer_time(recipe.checkpoint.interval),
        save_num_checkpoints_to_keep=recipe.checkpoint.keep,
        autoresume=recipe.checkpoint.autoresume,
        load_path=load_path,
        load_ignore_keys=layout,
        seed=recipe.train.seed,
        callbacks=callbacks,
        loggers=loggers,
        progress_bar=False,
        log_to_console=False,
        parallelism_config=parallelism,
    )
    if dist.get_global_rank() == 0 and (resuming or load_path or recipe.init.checkpoint):
        print(_start_block(recipe, trainer, resuming or bool(load_path), layout.notes), flush=True)
    restore_rng.take_over(trainer)
    if exporter:
        exporter.take_over(trainer)
    parallel.after_wrap(model)
    try:
        trainer.fit()
    except StopRun as e:
        sys.exit(f"error: {e}")
    finally:
        trainer.close()
    if dist.get_global_rank() == 0:
        print(f"[{recipe.run_name}] done at step {trainer.state.timestamp.batch.value}; checkpoints in {save_folder}", flush=True)


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


def _composer_time(duration: str) -> str:
    value, unit = Duration.parse(duration)
    return f"{value}{unit}"


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
