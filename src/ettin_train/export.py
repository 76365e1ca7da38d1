"""`python -m ettin_train.export SOURCE --out REPO_DIR` (also `ettin-export`): raw checkpoints -> a git repository
of verified transformers checkpoints, one commit and one tag per checkpoint (`step{N}`, `ext{N}`, `decay{N}`).

SOURCE is a checkpoint file, a folder of `ep*-ba*-rank0.pt`, or a run folder (its `checkpoints/`); the
`latest-rank0.pt` symlink is not a checkpoint of its own. Each checkpoint, in batch order:
  1. its model: every setting from what the checkpoint records (our RunMetadata, ettin-import's record, or the
     original runs' FlexBERT config); what it does not record from the flags, else from the recipes' table
     (checkpoint/settings.py, which names the flag to pass where neither can say); printed with its sources;
  2. converted with ettin_train.checkpoint.hf.to_hf and written to a staging folder: model.safetensors,
     config.json (with ettin_phase, ettin_step, ettin_tokens, ettin_source), tokenizer files, README.md;
  3. verified against the checkpoint's own record, not against step 1: the staged folder loaded by transformers'
     own class (from_pretrained, fp32, eval) must have the recorded settings, and give the logits of our model built
     from the recorded settings within 1e-4 on a fixed probe batch (right padding, sequences past the local window);
  4. checked against the repository: a tag that exists with the same model.safetensors bytes is "already
     exported" (nothing happens); a tag that exists with other bytes, or a new tag whose bytes equal an
     existing tag's (the Pythia/OLMo duplicate-branch failure), is refused (exit 2) before anything is written;
  5. copied into REPO_DIR, committed on `main` and tagged. `ettin_export.json` in the repository records the
     sha256 of every tag's model.safetensors.
N is the batch counter of the checkpoint within its phase (each phase's clock starts at 0).
`export_checkpoint` does all of it for one checkpoint and returns an ExportResult (live_export.py calls it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ettin_train.checkpoint.composer_format import CHECKPOINT_NAME
from ettin_train.checkpoint.settings import DECIDING, FLAGS, Settings, SettingsError, fmt
from ettin_train.phases import phase as phase_named

PROG = "ettin-export"
TOL = 1e-4
MANIFEST = "ettin_export.json"
IDENTITY = "ettin_run.json"  # which run the repository holds: objective, model shape, lineage
GITATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class Refused(Exception):
    """An export that must not happen (exit 2)."""


class VerificationFailed(Exception):
    """The written folder does not reproduce the checkpoint (exit 1)."""


@dataclass
class Export:
    source: Path
    settings: Settings
    step: int
    tokens: int
    model: "torch.nn.Module"
    weights: dict
    lineage: str | None = None  # the training run across its phases (RunMetadata; None for the original runs')

    @property
    def phase(self) -> str:
        return self.settings.phase

    @property
    def objective(self) -> str:
        return self.settings.objective

    @property
    def tag(self) -> str:
        return phase_named(self.phase).tag_of(self.step)


@dataclass
class ExportResult:
    """What happened to one checkpoint: `exported` (committed and tagged) or `skipped` (the tag holds it already)."""

    source: Path
    tag: str
    status: str
    phase: str
    step: int
    tokens: int
    diff: float

    def line(self) -> str:
        if self.status == "skipped":
            return f"{self.source.name}: {self.tag} already exported (same weights); nothing to do"
        return (f"{self.source.name}: exported as {self.tag} (phase {self.phase}, step {self.step}, {self.tokens} tokens; "
                f"logits match transformers within {self.diff:.1e})")


@dataclass
class ExportFlags:
    """The exporter's options for checkpoints that do not record everything (None: not given)."""

    phase: str | None = None
    tokenizer: str | None = None
    rope_theta_global: float | None = None
    rope_theta_local: float | None = None
    sliding_window: int | None = None
    global_attn_every_n_layers: int | None = None
    trust_pickles: bool = False  # unpickle whole files (checkpoint/safe_load.py), only for files the user trusts
    allow_other_run: bool = False  # export into a repository that holds another run (its tags then mix two runs)


# ---------------------------------------------------------------- reading checkpoints

def _count(value) -> int:
    return int(getattr(value, "value", value))


def read_export(path: Path, flags: ExportFlags, log: Callable[[str], None] = print) -> Export:
    """Our model of one checkpoint, with its settings and their sources, and its clock."""
    from ettin_train.checkpoint import digest, load_checkpoint, model_state_dict
    from ettin_train.checkpoint.safe_load import UnsafeCheckpointError
    from ettin_train.checkpoint.settings import resolve
    from ettin_train.model import EttinModel

    problem = digest.check(path)  # a file damaged since it was written would export wrong weights silently
    if problem:
        raise Refused(f"{problem}: damaged since it was written; not exported")
    try:
        ckpt = load_checkpoint(path, trust_pickles=flags.trust_pickles)
    except UnsafeCheckpointError as e:
        raise Refused(str(e)) from None
    state = ckpt["state"]
    weights = model_state_dict(ckpt)
    try:
        settings = resolve(state, weights, phase=flags.phase, **{name: getattr(flags, name) for name in FLAGS})
    except SettingsError as e:
        raise Refused(f"{path.name}: {e}") from None
    if flags.tokenizer:
        settings.tokenizer = flags.tokenizer
    if not settings.all_recorded():
        log(f"{path.name}: exported with these settings:\n" + "\n".join(settings.lines()))
    model = EttinModel(settings.config)
    model.load_state_dict(weights, strict=True)
    ts = state["timestamp"]["Timestamp"]
    step, tokens = _count(ts["batch"]), _count(ts["token"])
    m = CHECKPOINT_NAME.match(path.name)
    if m and int(m.group(2)) != step:
        log(f"{PROG}: note: {path.name} holds batch {step} (its clock), which names the tag")
    lineage = ((state.get("callbacks") or {}).get("RunMetadata") or {}).get("lineage")
    return Export(path, settings, step, tokens, model.eval(), weights, lineage)


# ---------------------------------------------------------------- writing and verifying

def load_tokenizer(name: str | None, log: Callable[[str], None] = print):
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        log(f"{PROG}: note: tokenizer {name} is not available locally ({type(e).__name__}); no tokenizer files written")
        return None


def token_ids(tokenizer) -> dict[str, int]:
    from ettin_train.checkpoint.hf import ETTIN_TOKEN_IDS

    if tokenizer is None:
        return dict(ETTIN_TOKEN_IDS)
    ids = dict(pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
               sep_token_id=tokenizer.sep_token_id, mask_token_id=tokenizer.mask_token_id)
    ids.update(bos_token_id=ids["cls_token_id"], eos_token_id=ids["sep_token_id"])
    return {k: (ETTIN_TOKEN_IDS[k] if v is None else v) for k, v in ids.items()}


def split_decoder_theta(cfg) -> bool:
    """A decoder whose local layers use another theta than its global ones: transformers 4.57 needs a patch."""
    return cfg.causal and cfg.local_theta != cfg.rope_theta_global


# config.json's `ettin_note` and the model card's, for transformers 4.57 users (5.x reads both thetas).
DECODER_NOTE = ("This decoder's local layers use another RoPE theta than its global layers (rope_parameters). "
                "transformers 5 honours both. transformers 4.57's ModernBertDecoderForCausalLM builds its local rotary "
                "embedding from the global theta: on 4.57, rebuild it after from_pretrained (see the README).")
PATCH_457 = """import copy
local = copy.deepcopy(model.config)
local.global_rope_theta = model.config.local_rope_theta
model.model.local_rotary_emb = type(model.model.local_rotary_emb)(config=local)"""


def probe_batch(cfg, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random ids, right padded, lengths past the local window (2w + 20, w + 5) and below it."""
    w = cfg.sliding_window
    lens = [2 * w + 20, w + 5, max(w // 2, 1) + 3, 7]
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (len(lens), max(lens)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    ids[mask == 0] = pad_id
    return ids, mask


def load_hf_folder(folder: str | Path, causal: bool):
    """The folder as a user of transformers loads it (fp32, eval)."""
    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    cls = ModernBertDecoderForCausalLM if causal else ModernBertForMaskedLM
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


@torch.no_grad()
def max_logit_diff(model, hf_model, pad_id: int) -> float:
    ids, mask = probe_batch(model.config, pad_id)
    ours = model(ids, mask)
    theirs = hf_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    if not torch.isfinite(theirs[real]).all():
        return float("inf")
    return (ours[real] - theirs[real]).abs().max().item()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _deciding(cfg) -> dict:
    """The values that decide a model, as they act: the window as its tokens per side, the global-layer
    pattern as the layers it makes global (every 3 and every 5 are one model when there are 2 layers)."""
    values = {name: getattr(cfg, name) for name in DECIDING}
    values["rope_theta_local"] = cfg.local_theta
    values["sliding_window"] = cfg.sliding_window // 2
    values["global_attn_every_n_layers"] = [i for i in range(cfg.num_layers) if cfg.is_global_layer(i)]
    return values


def verify(ex: Export, folder: Path, pad_id: int) -> float:
    """The staged folder, loaded by transformers, against the checkpoint's record (not against the settings the
    export was built from): the settings transformers runs must be the recorded ones, and its logits those of our
    model built from the record alone. Returns the max logit difference; raises VerificationFailed."""
    from ettin_train.checkpoint.hf import from_hf
    from ettin_train.checkpoint.settings import recorded_config
    from ettin_train.model import EttinModel

    where = f"{ex.source.name} ({ex.tag})"
    hf_model = load_hf_folder(folder, ex.settings.config.causal)
    try:
        runs = _deciding(from_hf(hf_model).config)  # what transformers really runs (its rotary tables included)
    except ValueError as e:
        raise VerificationFailed(f"{where}: transformers' model of the written folder is not an Ettin model: {e}") from None
    record = ex.settings.record
    reference = recorded_config(record) or ex.settings.config  # nothing recorded: the printed settings
    recorded = {name: value for name, value in (record.model if record else {}).items() if name in DECIDING}
    expected = _deciding(reference.replace(**recorded))
    source = record.source if record else "the settings printed above"
    unit = {"sliding_window": " tokens per side", "global_attn_every_n_layers": " (the global layers)"}
    for name in DECIDING:
        if runs[name] != expected[name]:
            raise VerificationFailed(f"{where}: the written folder runs {name} {fmt(runs[name])}{unit.get(name, '')} in "
                                     f"transformers, but {source} records {fmt(expected[name])}; nothing was committed")
    model = EttinModel(reference)
    model.load_state_dict(ex.weights, strict=True)
    diff = max_logit_diff(model.eval(), hf_model, pad_id)
    if not diff <= TOL:
        raise VerificationFailed(f"{where}: transformers' {'decoder' if reference.causal else 'encoder'} loaded from the "
                                 f"written folder differs from our model of the recorded settings by {diff:.3g} (> {TOL:g}) "
                                 "in logits on the probe batch; nothing was committed")
    return diff


def stage(ex: Export, folder: Path, log: Callable[[str], None] = print) -> tuple[str, float]:
    """Writes the HF folder of `ex` into `folder`, verifies it; returns (sha256 of model.safetensors, max diff)."""
    from ettin_train.checkpoint.hf import to_hf

    cfg = ex.model.config
    tokenizer = load_tokenizer(ex.settings.tokenizer, log)
    ids = token_ids(tokenizer)
    split = split_decoder_theta(cfg)
    extra = dict(ettin_phase=ex.phase, ettin_step=ex.step, ettin_tokens=ex.tokens, ettin_source=ex.source.name,
                 ettin_objective=ex.objective)
    if split:
        extra["ettin_note"] = DECODER_NOTE
    hf_model = to_hf(ex.model, **ids, **extra)
    hf_model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    del hf_model

    diff = verify(ex, folder, ids["pad_token_id"])
    digest = sha256(folder / "model.safetensors")
    (folder / "README.md").write_text(model_card(ex, digest, diff, split))
    (folder / ".gitattributes").write_text(GITATTRIBUTES)
    return digest, diff


def card_license(source: Path) -> str:
    """`export.license` of the run's recipe.yaml (RUN/checkpoints/CKPT -> RUN/recipe.yaml), else the schema's default."""
    import yaml

    from ettin_train.config.schema import ExportConfig

    for recipe in (source.parent / "recipe.yaml", source.parent.parent / "recipe.yaml"):
        if recipe.is_file():
            return str(((yaml.safe_load(recipe.read_text()) or {}).get("export") or {}).get("license") or ExportConfig.license)
    return ExportConfig.license


def card_header(ex: Export) -> list[str]:
    """The YAML header the Hub reads from a model card: library, pipeline (the widget), license, tags."""
    causal = ex.model.config.causal
    tags = ["ettin", "modernbert", "decoder" if causal else "encoder", ex.objective, f"phase-{ex.phase}"]
    return ["---", "library_name: transformers", f"pipeline_tag: {'text-generation' if causal else 'fill-mask'}",
            f"license: {card_license(ex.source)}", "tags:", *(f"- {t}" for t in tags), "---", ""]


def model_card(ex: Export, digest: str, diff: float, split: bool) -> str:
    cfg = ex.model.config
    kind = "ModernBertDecoderForCausalLM" if cfg.causal else "ModernBertForMaskedLM"
    lines = [
        *card_header(ex),
        f"# {ex.tag}", "",
        f"Ettin {'decoder' if cfg.causal else 'encoder'} ({ex.objective}), phase `{ex.phase}`, batch {ex.step} of the phase, "
        f"{ex.tokens:,} tokens seen in the phase. Exported from `{ex.source.name}` by `{PROG}`.", "",
        f"```python\nfrom transformers import {kind}\nmodel = {kind}.from_pretrained(REPO, revision=\"{ex.tag}\")  # REPO on the Hub\n"
        f"# a local clone: from_pretrained ignores revision there; load the tag with\n"
        f"from ettin_train.checkpoint.tags import load_tag\nmodel, tokenizer = load_tag(LOCAL_REPO, \"{ex.tag}\")\n```", "",
        f"RoPE theta {cfg.rope_theta_global:g} (global layers) / {cfg.local_theta:g} (local layers), local window "
        f"{cfg.sliding_window}, a global layer every {cfg.global_attn_every_n_layers}.", "",
        f"Verified at export: transformers' `{kind}` loaded from this folder runs the settings the checkpoint records "
        f"and reproduced the training model's logits (max |diff| {diff:.2e} <= {TOL:g}, fp32, on a right-padded probe "
        f"batch with sequences past the {cfg.sliding_window}-token local window). sha256 of model.safetensors: `{digest}`.", "",
    ]
    if split:
        lines += ["**Decoder local RoPE theta.** " + DECODER_NOTE, "", f"```python\n{PATCH_457}\n```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the repository

def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in (("GIT_AUTHOR_NAME", PROG), ("GIT_AUTHOR_EMAIL", f"{PROG}@localhost"),
                 ("GIT_COMMITTER_NAME", PROG), ("GIT_COMMITTER_EMAIL", f"{PROG}@localhost")):
        env.setdefault(k, v)
    # Weights hardly compress; zlib on a 600 MB blob would be most of the export's time.
    proc = subprocess.run(["git", "-C", str(repo), "-c", "core.compression=0", *args],
                          capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc


def open_repo(repo: Path) -> None:
    """Creates REPO_DIR as a git repository on `main`, or checks that it is one, on `main`, with a clean tree. A
    folder that is neither empty nor a repository ettin-export made (a model someone saved there, another project's
    repository) is refused untouched."""
    if not (repo / ".git").exists():
        if repo.exists() and (not repo.is_dir() or any(repo.iterdir())):
            raise Refused(f"{repo} is not empty and not a git repository: ettin-export writes only into a new or empty "
                          "folder or a repository it made; choose another --out")
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q")
        git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
        return
    has_commits = git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False).returncode == 0
    if has_commits and not (repo / MANIFEST).exists() and not (repo / IDENTITY).exists():
        raise Refused(f"{repo} is a git repository that ettin-export did not make (no {MANIFEST}); choose another --out")
    branch = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False).stdout.strip()
    if branch != "main":
        raise Refused(f"{repo} is on {branch or 'a detached HEAD'}, not main: check out main first")
    if git(repo, "status", "--porcelain").stdout.strip():
        raise Refused(f"{repo} has uncommitted changes: commit or remove them first")


def run_identity(ex: Export) -> dict:
    from ettin_train.checkpoint.run_identity import model_shape

    return {"objective": ex.objective, "model": model_shape(dataclasses.asdict(ex.model.config)), "lineage": ex.lineage}


def check_same_run(repo: Path, ex: Export, allow_other_run: bool) -> None:
    """A repository holds one run (its phases, tagged step/ext/decay): a checkpoint of another objective, model shape
    or lineage is refused, unless --allow-other-run. Repositories from before IDENTITY take the first one exported."""
    path = repo / IDENTITY
    if allow_other_run or not path.exists():
        return
    held, ours = json.loads(path.read_text()), run_identity(ex)
    differ = [f"{k} {held.get(k)} vs {ours[k]}" for k in ("objective", "model") if held.get(k) != ours[k]]
    if held.get("lineage") and ours["lineage"] and held["lineage"] != ours["lineage"]:
        differ.append(f"lineage {held['lineage']} vs {ours['lineage']} (another training run)")
    if differ:
        raise Refused(f"{ex.source.name}: {repo} holds another run ({IDENTITY}: {'; '.join(differ)} in this checkpoint); "
                      "export it into its own repository, or pass --allow-other-run to mix them")


def read_manifest(repo: Path) -> dict[str, dict]:
    path = repo / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def tag_hashes(repo: Path) -> dict[str, str]:
    """sha256 of model.safetensors for every tag of the repository (the manifest, else the tagged blob)."""
    manifest = read_manifest(repo)
    out = {}
    for tag in git(repo, "tag", "--list").stdout.split():
        if tag in manifest:
            out[tag] = manifest[tag]["sha256"]
            continue
        blob = subprocess.run(["git", "-C", str(repo), "cat-file", "blob", f"{tag}:model.safetensors"],
                              capture_output=True)
        out[tag] = hashlib.sha256(blob.stdout).hexdigest() if blob.returncode == 0 else ""
    return out


def check_new(ex: Export, digest: str, hashes: dict[str, str]) -> bool:
    """False when already exported; raises Refused for a moved tag or a duplicate payload."""
    if ex.tag in hashes:
        if hashes[ex.tag] == digest:
            return False
        raise Refused(f"{ex.source.name}: tag {ex.tag} exists with other weights; refusing to move it")
    same = [t for t, h in hashes.items() if h == digest]
    if same:
        raise Refused(f"{ex.source.name}: tag {ex.tag} would hold weights byte-identical to existing tag {same[0]}; refused")
    return True


def commit(repo: Path, ex: Export, staged: Path, digest: str) -> None:
    """Copies the staged folder into the repository, commits on main and tags; restores the tree on failure."""
    had_head = git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False).returncode == 0
    manifest = read_manifest(repo)
    manifest[ex.tag] = dict(sha256=digest, source=ex.source.name, phase=ex.phase, step=ex.step, tokens=ex.tokens)
    try:
        for path in staged.iterdir():
            shutil.copy2(path, repo / path.name)
        (repo / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        held = json.loads((repo / IDENTITY).read_text()) if (repo / IDENTITY).exists() else {}
        if not held.get("lineage"):  # the first run's, or the first that records a lineage
            (repo / IDENTITY).write_text(json.dumps(run_identity(ex), indent=1, sort_keys=True) + "\n")
        git(repo, "add", "-A")
        message = (f"{ex.tag}: {ex.source.name}, phase {ex.phase}, step {ex.step}, {ex.tokens} tokens\n\n"
                   f"model.safetensors sha256 {digest}")
        git(repo, "commit", "-q", "-m", message)
        git(repo, "tag", "-a", ex.tag, "-m", message)
    except BaseException:
        if had_head:
            git(repo, "reset", "-q", "--hard", "HEAD", check=False)
        else:
            git(repo, "rm", "-rq", "--cached", "--ignore-unmatch", ".", check=False)
        git(repo, "clean", "-fdq", check=False)
        raise


def export_checkpoint(path: str | Path, repo: str | Path, flags: ExportFlags | None = None,
                      log: Callable[[str], None] = print) -> ExportResult:
    """Exports one checkpoint file (or sharded folder) into the repository `repo` (created if missing).
    Raises Refused (nothing written) or VerificationFailed (nothing committed)."""
    from transformers.utils import logging as hf_logging

    path, repo = Path(path), Path(repo).resolve()
    flags = flags or ExportFlags()
    ex = read_export(path, flags, log)  # a refused setting stops here, before REPO_DIR is made
    open_repo(repo)
    check_same_run(repo, ex, flags.allow_other_run)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers 5 draws save/load bars on stderr: keep it to our one line
    try:
        with tempfile.TemporaryDirectory(prefix="ettin-export-") as tmp:
            staged = Path(tmp)
            digest, diff = stage(ex, staged, log)
            status = "exported" if check_new(ex, digest, tag_hashes(repo)) else "skipped"
            if status == "exported":
                commit(repo, ex, staged, digest)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return ExportResult(path, ex.tag, status, ex.phase, ex.step, ex.tokens, diff)


def _tag_refs(lines: str) -> dict[str, str]:
    """tag -> object id, from `git show-ref --tags` / `git ls-remote --tags` output (peeled ^{} lines dropped)."""
    out = {}
    for line in lines.splitlines():
        sha, _, ref = line.partition(" ") if " " in line else line.partition("\t")
        ref = ref.strip()
        if ref.startswith("refs/tags/") and not ref.endswith("^{}"):
            out[ref.removeprefix("refs/tags/")] = sha.strip()
    return out


def push(repo: Path, remote: str) -> int:
    """git push REMOTE main --tags; on failure, which tags the remote holds (as here) and which it does not."""
    proc = git(repo, "push", remote, "main", "--tags", check=False)
    local = _tag_refs(git(repo, "show-ref", "--tags", check=False).stdout)
    if proc.returncode == 0:
        print(f"pushed main and {len(local)} tag(s) to {remote}")
        return 0
    print(f"{PROG}: push to {remote} failed: {proc.stderr.strip()}", file=sys.stderr)
    listed = git(repo, "ls-remote", "--tags", remote, check=False)
    if listed.returncode != 0:
        print(f"{PROG}: could not list the tags of {remote} either; none can be assumed pushed", file=sys.stderr)
        return 1
    there = _tag_refs(listed.stdout)
    pushed = sorted(t for t in local if there.get(t) == local[t])
    missing = sorted(t for t in local if t not in there)
    other = sorted(t for t in local if t in there and there[t] != local[t])
    print(f"{PROG}: tags on {remote}: {' '.join(pushed) or 'none'}", file=sys.stderr)
    print(f"{PROG}: tags NOT on {remote}: {' '.join(missing) or 'none'}", file=sys.stderr)
    if other:
        print(f"{PROG}: tags on {remote} pointing elsewhere (not moved): {' '.join(other)}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Every setting comes from what the checkpoint records; the flags below are for checkpoints that do not "
               "record it (the original runs': then the recipes' table, by the size of the weights, the objective of "
               "the head and --phase, fills in what the flags do not give). A flag that contradicts the record is "
               "refused. The values used and their sources are printed. See docs/export.md.")
    p.add_argument("source", help="a checkpoint file, a folder of ep*-ba*-rank0.pt, or a run folder, local or in an "
                   "object store (s3://BUCKET/PREFIX, gs://..., hf://datasets/...: its complete checkpoints are downloaded)")
    p.add_argument("--out", required=True, type=Path, help="the git repository to export into (created if missing)")
    p.add_argument("--phase", choices=["pretrain", "ext", "decay"],
                   help="the phase of checkpoints that do not record one (tags step{N}, ext{N}, decay{N})")
    p.add_argument("--tokenizer", help="tokenizer folder or Hub name to copy into the export (default: the checkpoint's)")
    p.add_argument("--push", metavar="REMOTE", help="git push REMOTE main --tags afterwards")
    p.add_argument("--trust-pickles", action="store_true",
                   help="unpickle checkpoints whole, also types a Composer checkpoint does not hold (only for files you trust)")
    p.add_argument("--allow-other-run", action="store_true",
                   help="export into a repository that holds another run (another objective, model or training run)")
    p.add_argument("--rope-theta-global", type=float, help="global RoPE theta, where the checkpoint records none")
    p.add_argument("--rope-theta-local", type=float, help="local RoPE theta, where the checkpoint records none")
    p.add_argument("--sliding-window", type=int, help="local attention window, where the checkpoint records none")
    p.add_argument("--global-every", type=int, dest="global_attn_every_n_layers",
                   help="a global attention layer every N layers, where the checkpoint records none")
    return p


def main(argv: list[str] | None = None) -> int:
    from ettin_train import stores
    from ettin_train.checkpoint.composer_format import list_checkpoints

    args = build_parser().parse_args(argv)
    flags = ExportFlags(**{k: getattr(args, k) for k in ExportFlags.__dataclass_fields__})
    repo = args.out.resolve()
    counts = {"exported": 0, "skipped": 0}
    try:
        try:
            # a run folder in an object store: its complete checkpoints, downloaded into a local cache (stores.py)
            source = stores.local_copy(args.source) if stores.is_store(args.source) else args.source
            checkpoints = list_checkpoints(source)
        except (FileNotFoundError, stores.StoreError) as e:
            raise Refused(str(e)) from None
        for path in checkpoints:
            result = export_checkpoint(path, repo, flags)
            print(result.line())
            counts[result.status] += 1
    except Refused as e:
        print(f"{PROG}: refused: {e}", file=sys.stderr)
        return 2
    except VerificationFailed as e:
        print(f"{PROG}: verification failed: {e}", file=sys.stderr)
        return 1
    print(f"{repo}: {counts['exported']} exported, {counts['skipped']} already there")
    if args.push:
        return push(repo, args.push)
    return 0


if __name__ == "__main__":
    sys.exit(main())
