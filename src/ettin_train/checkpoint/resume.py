"""Continuing a run from a raw Composer checkpoint, and the block that says what a run's start took.

A full resume (`checkpoint.load_path`, or autoresume from the run folder) continues the same run at the next
batch: Composer restores the weights, the optimizer (moments and hyperparameters), the `LambdaLR` scheduler, the
clock, the RNG and the data position. Checkpoints of the original runs (Composer 0.24.1 with torch-optimi 0.2.1,
research section 3.5) differ from what Composer 0.32.1 with optimi 0.3 reads; `CurrentLayout` rewrites them in
memory while Composer loads them (its `load_ignore_keys` hook), so local and remote files are handled alike:

- the optimizer state, keyed by parameter index in the original's groups `[no decay, decay]` (ours is keyed by
  name), is matched to this run's parameters by identity and rewritten keyed by name in this optimizer's groups,
  with the group keys optimi 0.2.1 did not have (`triton`) filled in (`optimizer_state.py`);
- `dataset_state.train` None (the original used a map-style loader and saved no position): the position is the
  clock's, so the loader (the replayed order, or own data's permutation) seeks straight to the next step.

Nothing here imports Composer.
"""

from __future__ import annotations

from ettin_train.checkpoint import digest
from ettin_train.checkpoint.composer_format import find_checkpoint, is_sharded
from ettin_train.checkpoint.optimizer_state import ParamLayout
from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from ettin_train.checkpoint.sharded import load_sharded

# What Composer 0.32.1's load_path downloads: its object stores by URI. Not http(s): its Trainer has no backend for
# them (NotImplementedError deep in the load), so they are refused here in one line; a Hub file is hf://.
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure")


def hub_file(uri: str) -> dict:
    """`hf://[datasets/|models/]ORG/NAME[@REVISION]/PATH` (huggingface_hub's notation) as hf_hub_download arguments."""
    rest = uri.removeprefix("hf://")
    repo_type = "model"
    for kind in ("datasets", "models", "spaces"):
        if rest.startswith(f"{kind}/"):
            repo_type, rest = kind[:-1], rest[len(kind) + 1:]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{uri}: a Hub file is hf://[datasets/]ORG/NAME[@REVISION]/PATH")
    name, _, revision = parts[1].partition("@")
    return dict(repo_id=f"{parts[0]}/{name}", filename=parts[2], repo_type=repo_type, revision=revision or None)


def fetch_hub_file(uri: str) -> str:
    """Downloads an hf:// checkpoint into the Hugging Face cache (shared by the ranks of a node, which huggingface_hub
    locks; a second run finds it there; HF_TOKEN for private repositories) and returns the local path."""
    from huggingface_hub import hf_hub_download

    args = hub_file(uri)
    try:
        return hf_hub_download(**args)
    except Exception as e:  # noqa: BLE001 - offline, missing file, no access: one line saying which
        raise ValueError(f"{uri}: cannot download it from the Hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def is_remote(path: str) -> bool:
    """True for a URI that Composer downloads (checked: an unsupported scheme raises ValueError); False for a local path."""
    scheme, sep, _ = path.partition("://")
    if not sep:
        return False
    if scheme.lower() not in REMOTE_SCHEMES:
        raise ValueError(f"{path}: cannot download {scheme}:// paths (Composer can: {', '.join(REMOTE_SCHEMES)}; "
                         "and hf:// through huggingface_hub)")
    return True


def check_full_checkpoint(path: str, model_keys: set[str], layout: ParamLayout, trust_pickles: bool = False,
                          verify_digest: bool = True, reads_sharded: bool = False) -> str:
    """The local checkpoint `path` names (a file, a sharded folder, or a run folder's newest), after checking that it
    holds a whole training state for this model, with moments for each of `layout`'s parameters; a sharded one only
    for a run that reads them (`reads_sharded`: Composer loads one only with FSDP's sharded state dict). Raises
    ValueError with a one-line reason (UnsafeCheckpointError for a pickle that needs types a checkpoint does not hold)."""
    try:
        file = find_checkpoint(path)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if is_sharded(file) and not reads_sharded:
        raise ValueError(f"{file} is a sharded checkpoint: a run loads one with parallel.checkpoint_format: sharded "
                         "(an FSDP strategy)")
    damage = digest.check(file, digest=verify_digest)  # a file with a marker: as it was written?
    if damage:
        raise ValueError(f"{damage}: damaged since it was written")
    try:  # only the keys are read here, however large the checkpoint: a file is mapped, a folder's tensors left unread
        ckpt = load_sharded(file, trust_pickles, tensors=False) if is_sharded(file) \
            else safe_load(file, trust_pickles=trust_pickles, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
        raise ValueError(f"{file} is not a readable checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{file} is not a Composer checkpoint (no state.model)")
    theirs = set(state["model"])
    missing, unexpected = sorted(model_keys - theirs), sorted(theirs - model_keys)
    if missing or unexpected:
        raise ValueError(f"{file} does not fit this recipe's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if "StableAdamW" not in (state.get("optimizers") or {}):
        raise ValueError(f"{file} has no StableAdamW state, so it cannot be continued as the same run; "
                         "to start from its weights use init.checkpoint with init.load=model")
    try:
        layout.match(state["optimizers"]["StableAdamW"])
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if "Timestamp" not in (state.get("timestamp") or {}):
        raise ValueError(f"{file} has no timestamp, so the step to continue at is unknown")
    return str(file)


class CurrentLayout:
    """Composer's `load_ignore_keys` callable: rewrites a checkpoint's state in place into the layout this stack
    reads (see the module docstring); `notes` says what it changed, for the start block."""

    def __init__(self, layout: ParamLayout, data_position):
        # data_position(samples consumed in the epoch) -> the dataset's state dict (both loaders can seek)
        self.layout, self.data_position = layout, data_position
        self.notes: list[str] = []

    def __call__(self, checkpoint: dict) -> None:
        state = checkpoint.get("state", {})
        opt = (state.get("optimizers") or {}).get("StableAdamW")
        if opt is not None:
            self._optimizer(opt)
        data = state.get("dataset_state")
        if isinstance(data, dict) and data.get("train") is None:
            samples = int(state["timestamp"]["Timestamp"]["sample_in_epoch"])
            state["dataset_state"] = dict(data, train=self.data_position(samples))
            self.notes.append(f"no data position in the checkpoint: the loader seeks past its first {samples:,} samples")

    def _optimizer(self, opt: dict) -> None:
        matched, added = self.layout.rebuild(opt, keyed="name")
        opt.clear()
        opt.update(matched)
        if added:
            self.notes.append(f"optimizer keys the checkpoint's optimi lacks, taken from the recipe: {', '.join(sorted(added))}")


def start_block(name: str, loaded: list[str], reset: list[str], notes: list[str], next_step: int) -> str:
    """The lines printed before training, under the `start:` line: what was loaded, what was reset, the step."""
    lines = [f"  loaded: {'; '.join(loaded) or 'nothing'}", f"  reset: {'; '.join(reset) or 'nothing'}"]
    lines += [f"  converted: {note}" for note in notes]
    lines.append(f"  continues at step {next_step}")
    return "\n".join(f"[{name}]{line}" for line in lines)


def phase_start_parts(load: str, adam_step: int) -> tuple[list[str], list[str]]:
    """(loaded, reset) for a phase start (`init.checkpoint`)."""
    loaded = ["model weights"]
    reset = ["learning rate, schedule and clock (step 0)", "data position (the start of the data)", "RNG (train.seed)"]
    if load == "model+optimizer":
        loaded.append(f"optimizer moments (Adam step {adam_step})")
    else:
        reset.insert(0, "optimizer moments")
    return loaded, reset


def resume_parts(batch: int, tokens: int, adam_step: int, rng_ranks: int, epoch: int, sample_in_epoch: int,
                 data_restored: bool) -> tuple[list[str], list[str]]:
    """(loaded, reset) for a full resume, from the state Composer restored."""
    loaded = ["model weights", f"optimizer moments and hyperparameters (Adam step {adam_step})", "scheduler (LambdaLR)",
              f"clock (step {batch}, {tokens:,} tokens)"]
    reset = []
    if rng_ranks:
        loaded.append(f"RNG ({rng_ranks} rank(s))")
    else:
        reset.append("RNG (train.seed)")
    how = "the loader seeks there" if data_restored else "the loader re-reads the epoch up to there"
    loaded.append(f"data position (epoch {epoch}, sample {sample_in_epoch:,}, {how})")
    return loaded, reset
