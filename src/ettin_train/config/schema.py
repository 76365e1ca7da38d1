"""The recipe schema: every key a recipe may set, its type and its default.

A recipe is YAML; `config.loading` merges it with its bases and the command-line overrides and checks
it against these dataclasses, so a key that is not here (or a value of the wrong type) stops the run.
Durations are strings with a unit, as in the original configs: `8_500_000_000tok` or `100ba`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from ettin_train.model.config import ModelConfig

MISSING = "???"  # OmegaConf's marker for a value that must be given

_DURATION = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*(tok|ba)\s*$")


class Duration(str):
    """`<number>tok` (non-padding tokens, summed over ranks) or `<number>ba` (optimizer steps)."""

    @staticmethod
    def parse(text: str) -> tuple[int, str]:
        m = _DURATION.match(str(text))
        if not m:
            raise ValueError(f"{text!r} is not a duration like '8_500_000_000tok' or '100ba'")
        return int(float(m.group(1).replace("_", ""))), m.group(2)


@dataclass
class DataSource:
    """One source of a mixture (data/permuted.py): its share of every global batch follows `weight`."""

    # MDS folder, relative to data.path (or absolute); with `remote`, the folder streaming downloads into.
    path: str = MISSING
    remote: Optional[str] = None
    split: Optional[str] = None
    weight: float = 1.0


@dataclass
class DataConfig:
    # Folder of MDS shards (the `index.json` folder, or its parent when `split` is set).
    path: str = MISSING
    # Optional remote copy (s3://, gs://, hf://, ...) that streaming downloads into `path`, shard by shard as
    # training first needs it (`path` is then the local cache; docs/data.md, "Shards in an object store").
    remote: Optional[str] = None
    split: Optional[str] = None
    # With a remote: the most bytes of shards the local cache keeps per source (streaming's cache_limit: bytes, or
    # "20gb"); the coldest shards are deleted and downloaded again when needed. null: keep every shard.
    cache_limit: Optional[str] = None
    # With a remote: attempts per file download (streaming's download_retry: the total, at least 1, with a backoff
    # of 1, 2, 4 ... seconds between them) and the seconds one attempt may take. A shard that fails them all ends
    # the run with one line naming it, after a checkpoint of the last finished step.
    download_retry: int = 2
    download_timeout: float = 60.0
    # Tokenizer folder or Hub name (Ettin: jhu-clsp/ettin-encoder-150m); only its special tokens are used.
    tokenizer: str = MISSING
    seq_len: int = 1024
    # MLM masking probability; ignored by clm.
    mask_rate: float = 0.3
    shuffle_seed: int = 21
    num_workers: int = 2
    # An imported batch order (data_tools/import_order.py): step k trains on exactly the order's rows of
    # step k (then `path`, `shuffle_seed` and train.global_batch are not used). Its phase follows
    # `phase` (pretrain, extension -> ext, decay) unless `order_phase` names one.
    order: Optional[str] = None
    # An imported order in an object store (s3://, gs://, hf://, as `remote`): `order` is then its local cache, each
    # file downloaded once when first read and checked (the index by its fingerprint, each shard by its sha256).
    order_remote: Optional[str] = None
    order_phase: Optional[Literal["pretrain", "ext", "decay"]] = None
    # With data.order: rows longer than seq_len (the order's phase was cut at a longer sequence_length) are refused
    # before any work; true cuts them as the original's loader does (text_data.py: keep seq_len tokens; for
    # encoders the last becomes [SEP]) and ledger.jsonl counts them per step (`truncated_rows`).
    truncate_long_rows: bool = False
    # Where streaming writes the decompressed copies of zstd shards (each shard is read from its .zstd file and
    # decompressed once; by default the copy lands beside it, in `path`). Set it to keep `path` read-only or to
    # put the copies on a faster or larger disk. Not with `remote` (then `path` is already the cache).
    local_cache: Optional[str] = None
    # Mean real tokens per sequence, only for the step estimate in --plan (Ettin pre-training: ~615 of 1024).
    mean_tokens_per_seq: Optional[float] = None
    # A mixture: several MDS sources with weights, mixed in every global batch (docs/data.md); then
    # `path` is the folder the sources' paths are relative to, and `remote`/`split` are not used.
    sources: list[DataSource] = field(default_factory=list)


@dataclass
class OptimizerConfig:
    """StableAdamW (torch-optimi) with fully decoupled weight decay, none on norms and biases."""

    lr: float = MISSING
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-5


@dataclass
class SchedulerConfig:
    """warmup_stable_decay: linear warmup, constant, then a linear decay over the last `decay`.
    one_minus_sqrt: after `warmup`, lr * (alpha_f + (1 - alpha_f) * (1 - sqrt(progress))) over `decay`
    (default: the rest of the phase). Both end at alpha_f * lr."""

    name: Literal["warmup_stable_decay", "one_minus_sqrt"] = "warmup_stable_decay"
    warmup: Duration = Duration("0tok")
    decay: Optional[Duration] = None
    alpha_f: float = 0.02


@dataclass
class TrainConfig:
    global_batch: int = 4608
    # Sequences per forward/backward on one device; the rest of the per-device batch is accumulated.
    microbatch: Optional[int] = None
    max_duration: Duration = MISSING
    # Stop (with a checkpoint) after this point without changing the schedule: a planned preemption.
    stop_after: Optional[Duration] = None
    precision: Literal["auto", "fp32", "amp_bf16"] = "auto"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    seed: int = 21


@dataclass
class CheckpointConfig:
    interval: Duration = Duration("8_500_000_000tok")
    # How many checkpoints to keep in the run folder; -1 keeps all (Ettin kept every one).
    keep: int = -1
    # Continue from the newest checkpoint in the run folder if there is one.
    autoresume: bool = True
    # Continue another run from this checkpoint: a file, a run folder (its newest), an hf://[datasets/]ORG/NAME/PATH,
    # a file or run folder in s3:// or gs:// (checked against its marker), or a URI Composer downloads (oci://, azure://), ours or in the original runs' layout. A full resume: weights, optimizer, scheduler, clock, RNG
    # and data position, at the next batch (init.checkpoint instead starts a new phase). Autoresume wins once
    # this run has checkpoints of its own.
    load_path: Optional[str] = None
    # Checkpoints are opened weights-only: tensors, plain values and the few types Composer writes (timestamps,
    # numpy's RNG state); a pickle needing anything else is refused, since it could run code. true: unpickle
    # everything, for a file you trust (checkpoint/safe_load.py).
    trust_pickles: bool = False
    # Before resuming, check the newest checkpoint against the sha256 its marker recorded (a damaged one is set
    # aside and the one before it used). false: check only its size, for huge checkpoints on slow disks, where
    # reading every byte once more at each start costs minutes.
    verify_digest: bool = True
    # An object store folder (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, hf://datasets/ORG/NAME/PREFIX) that holds a
    # copy of the run folder: each checkpoint is uploaded as it is written, its completion marker last, with the
    # ledger, run.json and recipes; keep prunes it too. A start whose run_dir has no newer complete checkpoint (an
    # empty disk after a requeue) resumes from the store's newest complete one. run_dir stays local (stores.py).
    remote: Optional[str] = None


@dataclass
class InitConfig:
    """Where a phase starts from. Ignored when the run folder already has a checkpoint (autoresume)."""

    # A checkpoint file, or a run folder (its newest checkpoint), of the previous phase.
    checkpoint: Optional[str] = None
    # What is taken from it: the weights, or the weights and the optimizer moments. The learning rate,
    # schedule and clock always start fresh from this recipe.
    load: Literal["model", "model+optimizer"] = "model+optimizer"


@dataclass
class ExportConfig:
    """Export during training: each checkpoint is converted, verified in transformers and tagged
    step/ext/decay in a git repository as soon as it is written (as ettin-export does), on rank 0."""

    # The git repository (created if missing); null: no export during training.
    repo: Optional[str] = None
    # false: export only the run's final checkpoint.
    every_checkpoint: bool = True
    # The license the exported model card declares to the Hub (a Hub license id; the Ettin models are MIT).
    license: str = "mit"


@dataclass
class WandbConfig:
    project: Optional[str] = None  # wandb logging is on when a project is set
    entity: Optional[str] = None
    # auto: online when WANDB_API_KEY is set, else offline (synced later with `wandb sync`).
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # The run's group; null: "ettin-<model.size>" (or run_name without a size), so a pair's encoder and decoder,
    # all their phases, share one group. ettin-eval --wandb-group puts the downstream table beside them.
    group: Optional[str] = None
    # The run's name in wandb; null: run_name.
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    # Print a progress line every this many steps.
    console_interval: int = 100
    # Dense bf16 peak FLOP/s of one GPU for MFU; default: $ETTIN_PEAK_FLOPS, else looked up by card name
    # (H100, H200, A100; src/ettin_train/speed.py). No MFU is shown for an unknown card or on a CPU.
    peak_flops: Optional[float] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ReliabilityConfig:
    """What a run does with bad numbers and bad inputs; docs/reliability.md explains each choice."""

    # A NaN or infinite loss or gradient: stop (naming the step and the last complete checkpoint),
    # or skip the step (weights and moments untouched, counted) and stop after nonfinite_max_skips.
    nonfinite: Literal["stop", "skip"] = "stop"
    nonfinite_max_skips: int = 100
    # A loss more than spike_zscore standard deviations above the mean of the last spike_window steps is logged.
    spike_window: int = 100
    spike_zscore: float = 6.0
    # Shards checked before training: size (stat each file against index.json: cheap), hash (also each
    # hash index.json records: reads every byte), none.
    verify_shards: Literal["size", "hash", "none"] = "size"
    # Free space to keep on the checkpoint disk beyond one checkpoint, checked at start and before each write.
    min_free_gb: float = 0.0


@dataclass
class ParallelConfig:
    """How a run spreads over processes; docs/launching.md says which strategy to choose by size."""

    # ddp: every process holds the whole model and optimizer (fastest for 17m-150m).
    # full_shard: FSDP2, parameters, gradients and optimizer state sharded over all processes; each
    #   layer's parameters are gathered for the forward and again for the backward (least memory).
    # shard_grad_op: as full_shard, but gathered parameters stay until the backward (ZeRO-2: more
    #   memory, one all-gather less per layer).
    # hybrid: full_shard within a group of `shard_size` processes (one node), replicated across groups.
    strategy: Literal["ddp", "full_shard", "shard_grad_op", "hybrid"] = "ddp"
    # hybrid only: processes per shard group; default: the processes of one node (LOCAL_WORLD_SIZE).
    shard_size: Optional[int] = None
    # Recompute each layer's activations in the backward instead of keeping them.
    activation_checkpointing: bool = False
    # torch.compile each transformer layer (for GPUs; docs/launching.md says what was measured).
    compile: bool = False
    # full: one file ep{E}-ba{B}-rank0.pt gathered on rank 0 (what the original runs wrote, what export
    # reads fastest). sharded (FSDP strategies only): a torch.distributed.checkpoint folder ep{E}-ba{B}/
    # that every rank writes its part of, reloadable on another number of processes.
    checkpoint_format: Literal["full", "sharded"] = "full"
    # How long a process waits in a collective (an all-reduce, a barrier) for the others before it gives up: what
    # bounds the end of a run that lost a process which hangs instead of exiting (a frozen node); one that exits
    # is noticed at once (docs/reliability.md). It must exceed the longest wait of a healthy run: the other ranks
    # wait while rank 0 writes a checkpoint. Composer's default.
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.checkpoint_format == "sharded" and self.strategy == "ddp":
            raise ValueError("parallel.checkpoint_format: 'sharded' needs an FSDP strategy (full_shard, shard_grad_op, "
                             "hybrid); with ddp every rank holds the whole model, so use 'full'")
        if self.shard_size is not None and (self.strategy != "hybrid" or self.shard_size <= 0):
            raise ValueError(f"parallel.shard_size: {self.shard_size} is for strategy 'hybrid' and must be positive "
                             f"(strategy is {self.strategy!r})")


@dataclass
class EvalConfig:
    """In-loop evaluation on held-out data (docs/eval.md): off while `sources` is empty (as the original runs)."""

    # Held-out MDS folders that training never reads (a training folder, one inside it or a copy is refused).
    sources: list[str] = field(default_factory=list)
    # Evaluate each time the clock passes a multiple of this (tok or ba), and at the end of max_duration.
    interval: Duration = Duration("100ba")
    # Batches of `batch_size` rows (all processes together) per source: the same rows and masks every time.
    batches: int = 4
    batch_size: int = 32
    # The context of the evaluation rows; null: data.seq_len. Fix it across phases to compare their curves.
    seq_len: Optional[int] = None
    # MLM/MNTP masking of the evaluation rows, fixed across phases (data.mask_rate changes between them).
    # 0.15: what the original runs evaluated at (their eval_loader's mlm_probability), whatever they trained at.
    mask_rate: float = 0.15
    # Fixes which rows of each source are taken and their masks.
    seed: int = 1234


@dataclass
class Recipe:
    run_name: str = MISSING
    # Everything a run writes goes here: checkpoints/, ledger.jsonl, recipe.yaml.
    run_dir: str = MISSING
    objective: str = MISSING
    phase: Literal["pretrain", "extension", "decay"] = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys that exist on a dataclass but are not the recipe's to set (derived from other keys).
NOT_RECIPE_KEYS = {"model.causal"}
