"""What `ettin-eval` evaluates: the checkpoints of a run folder, the tags of an export repository, or the
revisions of a Hub repository, each as a `Point` (model kind, phase, step, tokens of its phase) that is
listed cheaply up front (so a missing tag stops the run before anything is computed) and loaded on demand.

Tags are named as the exporter names them (export.py): `step{N}` (pre-training), `ext{N}`, `decay{N}`;
a run folder's checkpoints get the tag their export would get.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


PHASES = ("pretrain", "extension", "decay")


class SourceError(ValueError):
    """A source or tag that cannot be evaluated (one line)."""


@dataclass
class Point:
    source: str
    tag: str
    phase: str
    step: int
    tokens: int | None  # tokens seen in its phase (each phase's clock starts at 0); None when unknown
    objective: str | None  # None until loaded when the listing cannot say (Hub revisions of other exporters)
    # -> (EttinModel, objective, tokenizer: a folder or Hub name, a loaded tokenizer, or None)
    load: Callable[[], tuple[object, str, object]] = field(repr=False)
    # (an empty folder) -> the transformers folder of the point (downstream tasks load it with its HF class)
    hf_folder: Callable[[Path], Path] | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "decoder" if self.objective == "clm" else "encoder"


def select(tags_by_source: dict[str, list[str]], patterns: list[str] | None) -> dict[str, list[str]]:
    """Per source, its tags (in their order) that match any pattern (fnmatch: `step*`, `ext*`, or exact
    names); a name or pattern that matches no tag of any source is an error."""
    if not patterns:
        return tags_by_source
    for p in patterns:
        if not any(fnmatch.fnmatchcase(t, p) for tags in tags_by_source.values() for t in tags):
            where = ", ".join(tags_by_source)
            some = sorted({t for tags in tags_by_source.values() for t in tags})
            raise SourceError(f"tag {p!r} does not exist in {where} (it has {', '.join(some[:8]) or 'no tags'}"
                              f"{', ...' if len(some) > 8 else ''})")
    return {s: [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)] for s, tags in tags_by_source.items()}


# ---------------------------------------------------------------- run folders (raw checkpoints)

def _run_points(folder: Path, trust_pickles: bool = False) -> list[Point]:
    from ettin_train.checkpoint.composer_format import list_checkpoints
    from ettin_train.checkpoint.safe_load import UnsafeCheckpointError, safe_load
    from ettin_train.export import ExportFlags, Refused, read_export
    from ettin_train.phases import phase as phase_named

    try:
        files = list_checkpoints(folder)
    except FileNotFoundError as e:
        raise SourceError(str(e)) from None
    points = []
    for f in files:
        try:  # mmap: the clock and metadata without reading the weights
            state = safe_load(f, trust_pickles=trust_pickles, mmap=True)["state"] if f.is_file() else None
        except UnsafeCheckpointError as e:
            raise SourceError(str(e)) from None
        meta = (state or {}).get("callbacks", {}).get("RunMetadata") if state else None
        if not meta:
            raise SourceError(f"{f}: no RunMetadata (a checkpoint of the original runs or a sharded one): export it with "
                              "ettin-export --phase ... and evaluate the repository")
        ts = state["timestamp"]["Timestamp"]
        step, tokens = int(getattr(ts["batch"], "value", ts["batch"])), int(getattr(ts["token"], "value", ts["token"]))

        def load(f=f):
            try:
                ex = read_export(f, ExportFlags(trust_pickles=trust_pickles), log=lambda line: None)
            except Refused as e:
                raise SourceError(str(e)) from None
            return ex.model, ex.objective, ex.settings.tokenizer

        def hf_folder(dest: Path, f=f) -> Path:
            return _write_hf_folder(read_export(f, ExportFlags(trust_pickles=trust_pickles), log=lambda line: None), dest)

        points.append(Point(str(folder), phase_named(meta["phase"]).tag_of(step), meta["phase"], step, tokens,
                            meta["objective"], load, hf_folder))
    return points


def _write_hf_folder(ex, dest: Path) -> Path:
    """A run folder's checkpoint as the transformers folder its export would hold (unverified, not committed)."""
    from ettin_train.checkpoint.hf import to_hf
    from ettin_train.export import load_tokenizer, token_ids

    tokenizer = load_tokenizer(ex.settings.tokenizer, log=lambda line: None)
    to_hf(ex.model, **token_ids(tokenizer), ettin_objective=ex.objective).save_pretrained(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return dest


# ---------------------------------------------------------------- export repositories and the Hub

def _from_hf_folder(folder: Path):
    """An EttinModel from a transformers folder our exporter wrote (or any ModernBERT encoder/decoder)."""
    from ettin_train.checkpoint.hf import from_hf
    from ettin_train.export import load_hf_folder

    config = json.loads((folder / "config.json").read_text())
    causal = "ModernBertDecoderForCausalLM" in config.get("architectures", [])
    model = from_hf(load_hf_folder(folder, causal), attention_backend="sdpa")
    tokenizer = None
    if (folder / "tokenizer.json").exists():  # loaded now: the folder of a tag is removed after loading
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, config.get("ettin_objective", "clm" if causal else "mlm"), tokenizer


def _repo_points(repo: Path, workdir: Path) -> list[Point]:
    from ettin_train.checkpoint.tags import checkout_tag
    from ettin_train.export import MANIFEST

    listed = subprocess.run(["git", "-C", str(repo), "tag", "--list"], capture_output=True, text=True)
    if listed.returncode:
        raise SourceError(f"{repo}: not a git repository ({listed.stderr.strip()})")
    manifest = json.loads((repo / MANIFEST).read_text()) if (repo / MANIFEST).exists() else {}
    tags = sorted(listed.stdout.split(), key=lambda t: (_phase_of_tag(t), manifest.get(t, {}).get("step", 0), t))
    points = []
    for tag in tags:
        entry = manifest.get(tag)
        if entry is None:
            raise SourceError(f"{repo}: tag {tag} is not in {MANIFEST} (not written by ettin-export)")

        def load(tag=tag):
            dest = checkout_tag(repo, tag, tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir))
            try:
                return _from_hf_folder(dest)  # the weights are in memory now, and the tokenizer loaded (cli.run)
            finally:
                shutil.rmtree(dest, ignore_errors=True)

        config = subprocess.run(["git", "-C", str(repo), "show", f"{tag}:config.json"], capture_output=True, text=True)
        objective = json.loads(config.stdout).get("ettin_objective") if config.returncode == 0 else None
        points.append(Point(str(repo), tag, entry["phase"], entry["step"], entry["tokens"], objective, load,
                            lambda dest, tag=tag: checkout_tag(repo, tag, dest)))
    return points


def _hub_points(name: str) -> list[Point]:
    """hf://ORG/NAME: its branches and tags as revisions, each described by its config.json (our exports
    record ettin_phase, ettin_step, ettin_tokens, ettin_objective). Needs the network; not run by the tests."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    repo = name.removeprefix("hf://")
    refs = HfApi().list_repo_refs(repo)
    points = []
    for rev in sorted({r.name for r in (*refs.branches, *refs.tags)} - {"main"}):
        config = json.loads(Path(hf_hub_download(repo, "config.json", revision=rev)).read_text())
        causal = "ModernBertDecoderForCausalLM" in config.get("architectures", [])

        def load(rev=rev):
            return _from_hf_folder(Path(snapshot_download(repo, revision=rev)))

        phase = config.get("ettin_phase", PHASES[_phase_of_tag(rev)])
        points.append(Point(name, rev, phase, config.get("ettin_step", _step_of_tag(rev)), config.get("ettin_tokens"),
                            config.get("ettin_objective", "clm" if causal else "mlm"), load,
                            lambda dest, rev=rev: Path(snapshot_download(repo, revision=rev))))
    return sorted(points, key=lambda p: (PHASES.index(p.phase), p.step, p.tag))


def _phase_of_tag(tag: str) -> int:
    return 1 if tag.startswith("ext") else 2 if tag.startswith("decay") else 0


def _step_of_tag(tag: str) -> int:
    digits = "".join(c for c in tag if c.isdigit())
    return int(digits) if digits else 0


def list_points(source: str, workdir: Path, trust_pickles: bool = False) -> list[Point]:
    """Every point of one source (run folder, checkpoint folder, export repository or hf://ORG/NAME), in
    training order; `select` picks the ones to evaluate (all of them fix the phase boundaries)."""
    if source.startswith("hf://"):
        return _hub_points(source)
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source} does not exist")
    if (path / ".git").exists():
        return _repo_points(path, workdir)
    return _run_points(path, trust_pickles)


def cumulative_tokens(points: list[Point]) -> tuple[dict[int, int | None], dict[str, dict[str, int]]]:
    """Tokens seen since the start of pre-training for each point (by id), and the phase boundaries per
    model kind. A phase starts where the latest earlier phase of the same kind ended: the most tokens of
    any of its listed points (its final checkpoint, which the exporter and the run folder always hold)."""
    ends: dict[tuple[str, str], int] = {}
    for p in points:
        if p.tokens is not None:
            ends[(p.kind, p.phase)] = max(ends.get((p.kind, p.phase), 0), p.tokens)
    starts: dict[str, dict[str, int]] = {}
    for kind in {p.kind for p in points}:
        offset, starts[kind] = 0, {}
        for phase in PHASES:
            if (kind, phase) in ends:
                starts[kind][phase] = offset
                offset += ends[(kind, phase)]
    return ({id(p): None if p.tokens is None else starts[p.kind][p.phase] + p.tokens for p in points}, starts)
