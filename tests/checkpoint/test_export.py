"""ettin-export on real runs: an encoder and a decoder through pretrain -> extension -> decay, every checkpoint
exported into one git repository per objective, each tag checked out and loaded by transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.checkpoint.hf import patch_decoder_local_rope
from ettin_train.export import main as export_main
from ettin_train.model import EttinModel, ModelConfig
from tests.conftest import run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

TAGS = ["decay2", "ext1", "ext2", "step2", "step4"]


def _train(data: Path, root: Path, objective: str) -> list[Path]:
    """Three tiny phases; returns the run folders. The decoder's decay splits the thetas (local 10k, global 160k)."""
    pre = tiny_recipe(data, root / "pre", objective, train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"},
                      export={"license": "apache-2.0"})  # the model card's license (the later phases keep the default)
    run_train(str(write_recipe(root / "pre.yaml", pre)))
    later = dict(data={"path": str(data / "long"), "seq_len": 128},
                 scheduler={"name": "one_minus_sqrt", "warmup": "0ba", "decay": None, "alpha_f": 0.5})
    ext = tiny_recipe(data, root / "ext", objective, phase="extension", **later,
                      model={"rope_theta_global": 160000.0}, train={"max_duration": "2ba"},
                      checkpoint={"interval": "1ba"}, init={"checkpoint": str(root / "pre"), "load": "model+optimizer"})
    run_train(str(write_recipe(root / "ext.yaml", ext)))
    model = {"rope_theta_global": 160000.0} | ({"rope_theta_local": 10000.0} if objective == "clm" else {})
    decay = tiny_recipe(data, root / "decay", objective, phase="decay", **later, model=model,
                        train={"max_duration": "2ba"}, checkpoint={"interval": "2ba"},
                        init={"checkpoint": str(root / "ext"), "load": "model+optimizer"})
    run_train(str(write_recipe(root / "decay.yaml", decay)))
    return [root / "pre", root / "ext", root / "decay"]


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """objective -> (run folders, repo with every checkpoint exported), built on first use."""
    cache = {}

    def get(objective: str):
        if objective not in cache:
            root = tmp_path_factory.mktemp(f"export-{objective}")
            runs = _train(tiny_data, root, objective)
            repo = root / "repo"
            for run in runs:
                assert export_main([str(run), "--out", str(repo)]) == 0
            cache[objective] = (runs, repo)
        return cache[objective]

    return get


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def tags(repo: Path) -> list[str]:
    return sorted(git(repo, "tag", "--list").split())


def state_of(repo: Path) -> tuple[list[str], str, str]:
    return tags(repo), git(repo, "rev-list", "--count", "HEAD").strip(), git(repo, "status", "--porcelain")


def our_model(checkpoint: Path) -> EttinModel:
    ckpt = load_checkpoint(checkpoint)
    cfg = ModelConfig(**ckpt["state"]["callbacks"]["RunMetadata"]["model"]).replace(attention_backend="sdpa")
    model = EttinModel(cfg)
    model.load_state_dict(model_state_dict(ckpt))
    return model.eval()


@torch.no_grad()
def logit_diff(model: EttinModel, hf_model) -> float:
    g = torch.Generator().manual_seed(7)
    lens = [70, 41, 9]  # the window is 16: two sequences far past it
    ids = torch.randint(5, 512, (3, 70), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    ids[mask == 0] = hf_model.config.pad_token_id
    real = mask.bool()
    return (model(ids, mask)[real] - hf_model(input_ids=ids, attention_mask=mask).logits[real]).abs().max().item()


def checkout(repo: Path, tag: str, dest: Path) -> Path:
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", tag], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_every_tag_reproduces_its_checkpoint_and_reexport_changes_nothing(exported, objective, tmp_path):
    runs, repo = exported(objective)
    assert tags(repo) == TAGS
    assert git(repo, "rev-list", "--count", "main").strip() == "5"
    assert git(repo, "describe", "--tags", "main").strip() == "decay2"  # main holds the latest export
    phase_of = {"step": ("pretrain", runs[0]), "ext": ("extension", runs[1]), "decay": ("decay", runs[2])}
    for tag in TAGS:
        prefix, step = tag.rstrip("0123456789"), int(tag[len(tag.rstrip("0123456789")):])
        phase, run = phase_of[prefix]
        folder = checkout(repo, tag, tmp_path / tag)
        config = json.loads((folder / "config.json").read_text())
        assert (config["ettin_phase"], config["ettin_step"]) == (phase, step)
        assert config["ettin_source"] == f"ep0-ba{step}-rank0.pt" and config["ettin_tokens"] > 0
        assert (folder / "tokenizer.json").exists() and (folder / "README.md").exists()
        cls = ModernBertDecoderForCausalLM if objective == "clm" else ModernBertForMaskedLM
        hf_model = cls.from_pretrained(folder, dtype=torch.float32).eval()
        split_theta = objective == "clm" and tag == "decay2"
        assert ("ettin_note" in config) == split_theta
        if split_theta:
            assert (config["local_rope_theta"], config["global_rope_theta"]) == (10000.0, 160000.0)
            assert "model.model.local_rotary_emb" in (folder / "README.md").read_text()  # the 4.57 users' patch
            patch_decoder_local_rope(hf_model)
        ours = our_model(run / "checkpoints" / config["ettin_source"])
        assert logit_diff(ours, hf_model) < 1e-4, tag

    before = state_of(repo)
    for run in runs:
        assert export_main([str(run), "--out", str(repo)]) == 0
    assert state_of(repo) == before


def _refused(source: Path, repo: Path, capsys, *flags: str) -> str:
    before = state_of(repo)
    capsys.readouterr()
    assert export_main([str(source), "--out", str(repo), *flags]) == 2
    assert state_of(repo) == before  # nothing written, nothing committed, no tag
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_moved_tag_and_a_duplicate_payload_are_refused(exported, tmp_path, capsys):
    runs, repo = exported("mlm")
    repo_copy = tmp_path / "repo"
    shutil.copytree(repo, repo_copy)
    ckpt = load_checkpoint(runs[0] / "checkpoints" / "ep0-ba4-rank0.pt")

    # step4 again, with other weights: the tag is never moved
    other = {k: v + 1e-3 if v.is_floating_point() else v for k, v in ckpt["state"]["model"].items()}
    moved = dict(ckpt, state=dict(ckpt["state"], model=other))
    torch.save(moved, tmp_path / "ep0-ba4-rank0.pt")
    err = _refused(tmp_path / "ep0-ba4-rank0.pt", repo_copy, capsys)
    assert "step4" in err and "ep0-ba4-rank0.pt" in err and "other weights" in err

    # step6 with step4's weights: the Pythia/OLMo duplicate-branch failure
    timestamp = {"Timestamp": dict(ckpt["state"]["timestamp"]["Timestamp"], batch=6)}
    dup = dict(ckpt, state=dict(ckpt["state"], timestamp=timestamp))
    torch.save(dup, tmp_path / "ep0-ba6-rank0.pt")
    err = _refused(tmp_path / "ep0-ba6-rank0.pt", repo_copy, capsys)
    assert "step6" in err and "step4" in err and "byte-identical" in err


def test_push_delivers_every_tag_and_a_failed_push_says_what_is_missing(exported, tmp_path):
    runs, repo = exported("clm")
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    # through the command line, as a user runs it: everything is exported already, then pushed
    proc = subprocess.run([sys.executable, "-m", "ettin_train.export", str(runs[2]), "--out", str(repo),
                           "--push", str(bare)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "already exported" in proc.stdout
    remote = sorted({line.split("refs/tags/")[1].removesuffix("^{}")
                     for line in git(repo, "ls-remote", "--tags", str(bare)).splitlines()})
    assert remote == TAGS
    assert git(bare, "rev-parse", "main") == git(repo, "rev-parse", "main")

    # a remote that refuses one tag (an `update` hook): the rest arrive, and the report names the missing one
    strict = tmp_path / "strict.git"
    subprocess.run(["git", "init", "-q", "--bare", str(strict)], check=True)
    hook = strict / "hooks" / "update"
    hook.write_text('#!/bin/sh\n[ "$1" = refs/tags/ext2 ] && exit 1\nexit 0\n')
    hook.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "ettin_train.export", str(runs[2]), "--out", str(repo),
                           "--push", str(strict)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "tags NOT on" in proc.stderr and "NOT on " + str(strict) + ": ext2\n" in proc.stderr
    assert "on " + str(strict) + ": decay2 ext1 step2 step4\n" in proc.stderr


def test_flags_that_contradict_the_run_metadata_are_refused_with_both_values(exported, tmp_path, capsys):
    runs, repo = exported("mlm")
    ckpt = runs[0] / "checkpoints" / "ep0-ba4-rank0.pt"  # pre-training: RunMetadata records theta 10000, window 16
    err = _refused(ckpt, repo, capsys, "--rope-theta-global", "160000")
    assert "--rope-theta-global 160000" in err and "RunMetadata records rope_theta_global 10000" in err
    err = _refused(ckpt, repo, capsys, "--sliding-window", "128")
    assert "--sliding-window 128" in err and "sliding_window 16" in err
    err = _refused(ckpt, repo, capsys, "--phase", "decay")
    assert "--phase decay" in err and "'pretrain'" in err


def test_a_verification_failure_commits_nothing(exported, tmp_path, monkeypatch, capsys):
    import ettin_train.export as export

    runs, repo = exported("mlm")
    ckpt = load_checkpoint(runs[0] / "checkpoints" / "ep0-ba4-rank0.pt")
    timestamp = {"Timestamp": dict(ckpt["state"]["timestamp"]["Timestamp"], batch=8)}
    other = {k: v * 1.01 if v.is_floating_point() else v for k, v in ckpt["state"]["model"].items()}
    torch.save(dict(ckpt, state=dict(ckpt["state"], model=other, timestamp=timestamp)), tmp_path / "ep0-ba8-rank0.pt")
    repo_copy = tmp_path / "repo"
    shutil.copytree(repo, repo_copy)
    before = state_of(repo_copy)
    monkeypatch.setattr(export, "max_logit_diff", lambda *a: 0.5)  # as a wrong conversion would
    assert export_main([str(tmp_path / "ep0-ba8-rank0.pt"), "--out", str(repo_copy)]) == 1
    assert "step8" in capsys.readouterr().err and state_of(repo_copy) == before


def test_model_cards_have_the_hub_header_and_a_tag_loads_its_own_weights(exported, tmp_path):
    """The README's YAML header (what the Hub reads); load_tag gives the tag's weights, where
    from_pretrained(local_repo, revision=tag) silently gives main's."""
    import yaml
    from safetensors.torch import load_file

    from ettin_train.checkpoint.tags import load_tag

    _, repo = exported("mlm")
    for tag, license in (("step2", "apache-2.0"), ("ext1", "mit")):
        card = git(repo, "show", f"{tag}:README.md")
        assert card.startswith("---\n")
        header = yaml.safe_load(card.split("---\n")[1])
        assert header == {"library_name": "transformers", "pipeline_tag": "fill-mask", "license": license,
                          "tags": ["ettin", "modernbert", "encoder", "mlm", "phase-pretrain" if tag == "step2" else "phase-extension"]}

    step2 = load_file(checkout(repo, "step2", tmp_path / "step2") / "model.safetensors")
    model, tokenizer = load_tag(repo, "step2", dtype=torch.float32)
    assert type(model).__name__ == "ModernBertForMaskedLM" and tokenizer is not None
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in step2.items())
    main = ModernBertForMaskedLM.from_pretrained(str(repo), revision="step2", dtype=torch.float32).state_dict()
    key = "model.embeddings.tok_embeddings.weight"
    assert not torch.equal(main[key], step2[key])  # the pitfall load_tag avoids: main (decay2), not step2
    with pytest.raises(ValueError, match="no tag step99"):
        load_tag(repo, "step99")
