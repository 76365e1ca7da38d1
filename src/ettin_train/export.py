"""`python -m ettin_train.export SOURCE --out REPO_DIR` (also `ettin-export`): raw checkpoints -> a git repository
of verified transformers checkpoints, one commit and one tag per checkpoint (`step{N}`, `ext{N}`, `decay{N}`).

SOURCE is a checkpoint file, a folder of `ep*-ba*-rank0.pt`, or a run folder (its `checkpoints/`); the
`latest-rank0.pt` symlink is not a checkpoint of its own. Each checkpoint, in batch order:
  1. its model: from the RunMetadata our runs write into every checkpoint, or (checkpoints of the original
     runs) from --phase, the shape read off the weights and the --rope-theta-*/--sliding-window flags;
  2. converted with ettin_train.checkpoint.hf.to_hf and written to a staging folder: model.safetensors,
     config.json (with ettin_phase, ettin_step, ettin_tokens, ettin_source), tokenizer files, README.md;
  3. verified: the staged folder loaded by transformers' own class (from_pretrained, fp32, eval) gives our
     model's logits within 1e-4 on a fixed probe batch (right padding, sequences past the local window);
  4. checked against the repository: a tag that exists with the same model.safetensors bytes is "already
     exported" (nothing happens); a tag that exists with other bytes, or a new tag whose bytes equal an
     existing tag's (the Pythia/OLMo duplicate-branch failure), is refused (exit 2) before anything is written;
  5. copied into REPO_DIR, committed on `main` and tagged. `ettin_export.json` in the repository records the
     sha256 of every tag's model.safetensors.
N is the batch counter of the checkpoint within its phase (each phase's clock starts at 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

PROG = "ettin-export"
TOL = 1e-4
MANIFEST = "ettin_export.json"
PREFIX = {"pretrain": "step", "extension": "ext", "decay": "decay"}
PHASE_FLAG = {"pretrain": "pretrain", "ext": "extension", "extension": "extension", "decay": "decay"}
# The original runs' thetas when a checkpoint does not say: (global, local).
PHASE_THETAS = {"pretrain": (10000.0, 10000.0), "extension": (160000.0, 160000.0), "decay": (160000.0, 160000.0)}
_NAME = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
GITATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
DECODER_NOTE = ("This decoder was trained with a local RoPE theta that differs from its global theta. transformers "
                "4.57.6's ModernBertDecoderForCausalLM builds its local rotary embedding from the global theta, so after "
                "from_pretrained call ettin_train.checkpoint.hf.patch_decoder_local_rope(model) to run it as trained.")


class Refused(Exception):
    """An export that must not happen (exit 2)."""


class VerificationFailed(Exception):
    """The written folder does not reproduce the checkpoint (exit 1)."""


@dataclass
class Export:
    source: Path
    phase: str  # pretrain | extension | decay
    step: int
    tokens: int
    objective: str
    model: "torch.nn.Module"
    tokenizer: str | None

    @property
    def tag(self) -> str:
        return f"{PREFIX[self.phase]}{self.step}"


# ---------------------------------------------------------------- finding and reading checkpoints

def list_checkpoints(source: str | Path) -> list[Path]:
    """The checkpoint files of SOURCE in batch order (symlinks such as latest-rank0.pt are not checkpoints)."""
    from ettin_train.checkpoint.composer_format import is_sharded

    source = Path(source)
    if source.is_file() or is_sharded(source):
        return [source.resolve()]
    if not source.is_dir():
        raise Refused(f"{source} does not exist")
    for folder in (source / "checkpoints", source):
        found = sorted((int(m.group(2)), f) for f in folder.glob("ep*-ba*-rank0.pt")
                       if (m := _NAME.match(f.name)) and not f.is_symlink())
        # parallel.checkpoint_format: sharded writes ep{E}-ba{B}/ folders instead
        found += sorted((int(m.group(2)), f) for f in folder.glob("ep*-ba*")
                        if (m := re.match(r"^ep(\d+)-ba(\d+)$", f.name)) and is_sharded(f) and not f.is_symlink())
        if found:
            return [f for _, f in found]
    raise Refused(f"no checkpoint (ep*-ba*-rank0.pt) in {source} or {source / 'checkpoints'}")


def _count(value) -> int:
    return int(getattr(value, "value", value))


def infer_model_config(weights: dict[str, torch.Tensor], *, theta_global: float, theta_local: float,
                       sliding_window: int, global_every: int):
    """A ModelConfig from the shapes of original-layout weights (head dim 64, as every Ettin size)."""
    from ettin_train.model import ModelConfig

    vocab, hidden = weights["bert.embeddings.tok_embeddings.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"bert\.encoder\.layers\.(\d+)\.", k)))
    intermediate = weights["bert.encoder.layers.0.mlp.Wi.weight"].shape[0] // 2  # GLU: [input; gate]
    causal = any(k.startswith("lm_head.") for k in weights)
    if not causal and not any(k.startswith("head.") for k in weights):
        raise Refused("the weights have neither head.* (encoder) nor lm_head.* (decoder)")
    return ModelConfig(size=None, num_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                       num_heads=hidden // 64, vocab_size=vocab, causal=causal, sliding_window=sliding_window,
                       global_attn_every_n_layers=global_every, rope_theta_global=theta_global,
                       rope_theta_local=None if theta_local == theta_global else theta_local,
                       attention_backend="sdpa")


def read_export(path: Path, args: argparse.Namespace) -> Export:
    """Our model of one checkpoint and what it is (phase, clock, tokenizer)."""
    from ettin_train.checkpoint import load_checkpoint, model_state_dict
    from ettin_train.model import EttinModel, ModelConfig

    ckpt = load_checkpoint(path)
    state = ckpt["state"]
    weights = model_state_dict(ckpt)
    flag_phase = PHASE_FLAG[args.phase] if args.phase else None
    meta = (state.get("callbacks") or {}).get("RunMetadata")
    if meta:
        phase = meta["phase"]
        if flag_phase and flag_phase != phase:
            raise Refused(f"{path.name}: --phase {args.phase} contradicts the checkpoint's own phase {phase!r}")
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields}).replace(attention_backend="sdpa")
        objective = meta["objective"]
        tokenizer = args.tokenizer or meta.get("tokenizer")
    else:
        if not flag_phase:
            raise Refused(f"{path.name} has no RunMetadata (a checkpoint of the original runs?): give --phase")
        phase = flag_phase
        g, l = PHASE_THETAS[phase]
        g = g if args.rope_theta_global is None else args.rope_theta_global
        l = l if args.rope_theta_local is None else args.rope_theta_local
        cfg = infer_model_config(weights, theta_global=g, theta_local=l, sliding_window=args.sliding_window,
                                 global_every=args.global_every)
        objective = "clm" if cfg.causal else "mlm"
        tokenizer = args.tokenizer
    model = EttinModel(cfg)
    model.load_state_dict(weights, strict=True)
    ts = state["timestamp"]["Timestamp"]
    step, tokens = _count(ts["batch"]), _count(ts["token"])
    m = _NAME.match(path.name)
    if m and int(m.group(2)) != step:
        print(f"{PROG}: note: {path.name} holds batch {step} (its clock), which names the tag")
    return Export(path, phase, step, tokens, objective, model.eval(), tokenizer)


# ---------------------------------------------------------------- writing and verifying

def load_tokenizer(name: str | None):
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        print(f"{PROG}: note: tokenizer {name} is not available locally ({type(e).__name__}); no tokenizer files written")
        return None


def token_ids(tokenizer) -> dict[str, int]:
    from ettin_train.checkpoint.hf import ETTIN_TOKEN_IDS

    if tokenizer is None:
        return dict(ETTIN_TOKEN_IDS)
    ids = dict(pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
               sep_token_id=tokenizer.sep_token_id, mask_token_id=tokenizer.mask_token_id)
    ids.update(bos_token_id=ids["cls_token_id"], eos_token_id=ids["sep_token_id"])
    return {k: (ETTIN_TOKEN_IDS[k] if v is None else v) for k, v in ids.items()}


def needs_rope_patch(cfg) -> bool:
    return cfg.causal and cfg.local_theta != cfg.rope_theta_global


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
    """The folder as a user of transformers loads it (fp32, eval), with the decoder's local theta patched."""
    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin_train.checkpoint.hf import patch_decoder_local_rope

    cls = ModernBertDecoderForCausalLM if causal else ModernBertForMaskedLM
    hf_model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    config = hf_model.config
    if causal and config.local_rope_theta != config.global_rope_theta:
        patch_decoder_local_rope(hf_model)
    return hf_model


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


def stage(ex: Export, folder: Path) -> tuple[str, float]:
    """Writes the HF folder of `ex` into `folder`, verifies it; returns (sha256 of model.safetensors, max diff)."""
    from ettin_train.checkpoint.hf import to_hf

    cfg = ex.model.config
    tokenizer = load_tokenizer(ex.tokenizer)
    ids = token_ids(tokenizer)
    patch = needs_rope_patch(cfg)
    extra = dict(ettin_phase=ex.phase, ettin_step=ex.step, ettin_tokens=ex.tokens, ettin_source=ex.source.name,
                 ettin_objective=ex.objective)
    if patch:
        extra["ettin_note"] = DECODER_NOTE
    hf_model = to_hf(ex.model, **ids, **extra)
    hf_model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    del hf_model

    diff = max_logit_diff(ex.model, load_hf_folder(folder, cfg.causal), ids["pad_token_id"])
    if not diff <= TOL:
        raise VerificationFailed(f"{ex.source.name} ({ex.tag}): transformers' {'decoder' if cfg.causal else 'encoder'} "
                                 f"loaded from the written folder differs from our model by {diff:.3g} (> {TOL:g}) "
                                 "in logits on the probe batch; nothing was committed")
    digest = sha256(folder / "model.safetensors")
    (folder / "README.md").write_text(model_card(ex, digest, diff, patch))
    (folder / ".gitattributes").write_text(GITATTRIBUTES)
    return digest, diff


def model_card(ex: Export, digest: str, diff: float, patch: bool) -> str:
    cfg = ex.model.config
    kind = "ModernBertDecoderForCausalLM" if cfg.causal else "ModernBertForMaskedLM"
    lines = [
        f"# {ex.tag}", "",
        f"Ettin {'decoder' if cfg.causal else 'encoder'} ({ex.objective}), phase `{ex.phase}`, batch {ex.step} of the phase, "
        f"{ex.tokens:,} tokens seen in the phase. Exported from `{ex.source.name}` by `{PROG}`.", "",
        f"```python\nfrom transformers import {kind}\nmodel = {kind}.from_pretrained(REPO, revision=\"{ex.tag}\")\n```", "",
        f"Verified at export: transformers' `{kind}` loaded from this folder reproduced the training model's logits "
        f"(max |diff| {diff:.2e} <= {TOL:g}, fp32, on a right-padded probe batch with sequences past the "
        f"{cfg.sliding_window}-token local window). sha256 of model.safetensors: `{digest}`.", "",
    ]
    if patch:
        lines += ["**Decoder local RoPE theta.** " + DECODER_NOTE, "",
                  "```python\nfrom ettin_train.checkpoint.hf import patch_decoder_local_rope\n"
                  "patch_decoder_local_rope(model)\n```", ""]
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
    """Creates REPO_DIR as a git repository on `main`, or checks that it is one, on `main`, with a clean tree."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q")
        git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
        return
    branch = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False).stdout.strip()
    if branch != "main":
        raise Refused(f"{repo} is on {branch or 'a detached HEAD'}, not main: check out main first")
    if git(repo, "status", "--porcelain").stdout.strip():
        raise Refused(f"{repo} has uncommitted changes: commit or remove them first")


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


def export_one(path: Path, repo: Path, args: argparse.Namespace) -> str:
    ex = read_export(path, args)
    with tempfile.TemporaryDirectory(prefix="ettin-export-") as tmp:
        staged = Path(tmp)
        digest, diff = stage(ex, staged)
        if not check_new(ex, digest, tag_hashes(repo)):
            print(f"{ex.source.name}: {ex.tag} already exported (same weights); nothing to do")
            return "skipped"
        commit(repo, ex, staged, digest)
    print(f"{ex.source.name}: exported as {ex.tag} (phase {ex.phase}, step {ex.step}, {ex.tokens} tokens; "
          f"logits match transformers within {diff:.1e})")
    return "exported"


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
        epilog="Checkpoints without RunMetadata (the original runs') need --phase; their shape is read off the weights "
               "(head dim 64), and their RoPE thetas default to the original recipe's: pretrain 10000/10000, ext and "
               "decay 160000/160000 (global/local). See docs/export.md.")
    p.add_argument("source", help="a checkpoint file, a folder of ep*-ba*-rank0.pt, or a run folder")
    p.add_argument("--out", required=True, type=Path, help="the git repository to export into (created if missing)")
    p.add_argument("--phase", choices=["pretrain", "ext", "decay"],
                   help="the phase of checkpoints without RunMetadata (tags step{N}, ext{N}, decay{N})")
    p.add_argument("--tokenizer", help="tokenizer folder or Hub name to copy into the export (default: the checkpoint's)")
    p.add_argument("--push", metavar="REMOTE", help="git push REMOTE main --tags afterwards")
    p.add_argument("--rope-theta-global", type=float, default=None,
                   help="without RunMetadata: global RoPE theta (default: 10000 pretrain, 160000 ext/decay)")
    p.add_argument("--rope-theta-local", type=float, default=None,
                   help="without RunMetadata: local RoPE theta (default: 10000 pretrain, 160000 ext/decay)")
    p.add_argument("--sliding-window", type=int, default=128, help="without RunMetadata: local window (default 128)")
    p.add_argument("--global-every", type=int, default=3, help="without RunMetadata: a global layer every N (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repo = args.out.resolve()
    try:
        checkpoints = list_checkpoints(args.source)
        open_repo(repo)
        counts = {"exported": 0, "skipped": 0}
        for path in checkpoints:
            counts[export_one(path, repo, args)] += 1
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
