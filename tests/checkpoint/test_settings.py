"""Where an export's settings come from: the 36 (size, objective, phase) checkpoints of the original layout, with
and without their FlexBERT record, against the values the original configs set (research notes 1.4-1.6)."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

from ettin_train.checkpoint.recipe_table import TABLE, derive
from ettin_train.checkpoint.settings import SettingsError, resolve
from ettin_train.export import main as export_main
from ettin_train.model import EttinModel, ModelConfig
from ettin_train.model.config import SIZES

ROOT = Path(__file__).resolve().parents[2]
COMBINATIONS = list(itertools.product(SIZES, ("mlm", "clm"), ("pretrain", "extension", "decay")))
SHORT = {"pretrain": "pretrain", "extension": "ext", "decay": "decay"}


def original_local_base(size: str, objective: str, phase: str) -> float:
    """`local_attn_rotary_emb_base` as the original configs have it, written out from the research notes (not from
    yamls/); -1 where the config has none (FlexBERT: local layers use rotary_emb_base)."""
    if phase == "pretrain":
        return -1
    if phase == "extension":
        return 10000.0 if size == "17m" else -1  # the 17m `..._de_decay_rope` runs, encoder and decoder
    if objective == "mlm":
        return 160000.0
    return {"150m": -1, "1b": 160000.0}.get(size, 10000.0)  # decoders 17m/32m/68m/400m: `..._reset_rope`


def original_thetas(size: str, objective: str, phase: str) -> tuple[float, float]:
    """(global, local) RoPE theta of the original model."""
    g = 10000.0 if phase == "pretrain" else 160000.0
    local = original_local_base(size, objective, phase)
    return g, g if local == -1 else local


def original_weights(size: str, objective: str, vocab: int = 512) -> dict[str, torch.Tensor]:
    """Original-layout keys with the shapes of `size`, as zero-stride views: no memory for 1b."""
    layers, hidden, inter, _ = SIZES[size]
    cfg = ModelConfig(size=size, vocab_size=vocab, causal=objective == "clm")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in EttinModel(cfg).state_dict().items()}
    assert shapes["bert.encoder.layers.0.mlp.Wi.weight"] == (2 * inter, hidden) and len(
        {k.split(".")[3] for k in shapes if k.startswith("bert.encoder.layers.")}) == layers
    return {k: torch.zeros(1).expand(s) if len(s) else torch.zeros(()) for k, s in shapes.items()}


def flexbert_config(size: str, objective: str, phase: str, vocab: int = 512) -> dict:
    """`integrations.huggingface.model.config` of an original run (the FlexBertConfig.to_dict() keys that matter)."""
    layers, hidden, inter, heads = SIZES[size]
    content = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                   vocab_size=vocab, sliding_window=128, global_attn_every_n_layers=3,
                   rotary_emb_base=original_thetas(size, objective, phase)[0],
                   local_attn_rotary_emb_base=original_local_base(size, objective, phase),
                   causal_mask=objective == "clm", norm_kwargs={"eps": 1e-5, "bias": False})
    cls = "src.bert_layers.model." + ("FlexBertForCausalLM" if objective == "clm" else "FlexBertForMaskedLM")
    return {"model": {"config": {"content": content, "class": cls}}, "tokenizer": {}}


def test_the_table_is_what_the_recipes_say():
    assert derive(ROOT / "yamls") == TABLE


@pytest.mark.parametrize("recorded", [False, True], ids=["records-nothing", "flexbert-record"])
def test_the_36_original_checkpoints_resolve_to_the_original_settings(recorded):
    for size, objective, phase in COMBINATIONS:
        weights = original_weights(size, objective)
        state = {"integrations": {"huggingface": flexbert_config(size, objective, phase)}} if recorded else {}
        s = resolve(state, weights, phase=SHORT[phase])
        cfg = s.config
        where = f"{size} {objective} {phase}"
        assert (cfg.rope_theta_global, cfg.local_theta) == original_thetas(size, objective, phase), where
        assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads) == SIZES[size], where
        assert (cfg.sliding_window, cfg.global_attn_every_n_layers, cfg.causal) == (128, 3, objective == "clm"), where
        assert (s.objective, s.phase) == (objective, phase), where
        theta_source = s.sources["rope_theta_local"]
        assert ("integrations.huggingface" in theta_source) if recorded else ("recipes' table" in theta_source), where


def test_what_cannot_be_resolved_is_refused_naming_the_flag():
    weights = original_weights("17m", "mlm")
    with pytest.raises(SettingsError, match="give --phase"):
        resolve({}, weights)
    odd = {k: torch.zeros(1).expand(v.shape[0] - 4, v.shape[1]) if k.endswith("mlp.Wi.weight") else v
           for k, v in weights.items()}  # an intermediate size no Ettin size has
    with pytest.raises(SettingsError, match="none of the Ettin sizes.*give --rope-theta-global"):
        resolve({}, odd, phase="ext")
    s = resolve({}, odd, phase="ext", rope_theta_global=160000.0, rope_theta_local=10000.0, sliding_window=128,
                global_attn_every_n_layers=3)
    assert s.sources["rope_theta_local"] == "--rope-theta-local" and s.config.local_theta == 10000.0
    # a flag that contradicts the record: both values named
    state = {"integrations": {"huggingface": flexbert_config("17m", "mlm", "extension")}}
    with pytest.raises(SettingsError, match=r"--rope-theta-local 160000 contradicts.*rope_theta_local 10000"):
        resolve(state, weights, phase="ext", rope_theta_local=160000.0)


def _original_checkpoint(path: Path, size: str, objective: str, phase: str, recorded: bool) -> EttinModel:
    """A real (random) model of `size`, saved in the original runs' layout (the ModernBERT vocabulary, whose
    token ids the export writes when the checkpoint names no tokenizer)."""
    g, l = original_thetas(size, objective, phase)
    torch.manual_seed(0)
    model = EttinModel(ModelConfig(size=size, vocab_size=50368, causal=objective == "clm", rope_theta_global=g,
                                   rope_theta_local=l, attention_backend="sdpa")).eval()
    ts = {k: 0 for k in ("iteration", "epoch", "sample", "epoch_in_iteration", "token_in_iteration",
                         "batch_in_epoch", "sample_in_epoch", "token_in_epoch")} | {"batch": 7, "token": 7000}
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}, "timestamp": {"Timestamp": ts}}
    if recorded:
        state["integrations"] = {"huggingface": flexbert_config(size, objective, phase, vocab=50368)}
    torch.save({"state": state, "rng": []}, path)
    return model


@torch.no_grad()
def _logit_diff(model: EttinModel, hf_model) -> float:
    ids = torch.randint(5, 50000, (2, 300), generator=torch.Generator().manual_seed(5))  # past the 128 window
    mask = torch.ones_like(ids)
    mask[1, 200:] = 0
    real = mask.bool()
    return (model(ids, mask)[real] - hf_model(input_ids=ids, attention_mask=mask).logits[real]).abs().max().item()


@pytest.mark.parametrize("size,objective,phase,recorded", [
    ("17m", "mlm", "extension", False),  # local 10000 from the table
    ("17m", "clm", "decay", True),       # local 10000 from the FlexBERT record
])
def test_an_original_checkpoint_exports_as_the_original_model(tmp_path, size, objective, phase, recorded):
    ckpt = tmp_path / "ep0-ba7-rank0.pt"
    model = _original_checkpoint(ckpt, size, objective, phase, recorded)
    repo = tmp_path / "repo"
    assert export_main([str(ckpt), "--out", str(repo), "--phase", SHORT[phase]]) == 0
    tag = subprocess.run(["git", "-C", str(repo), "describe", "--tags"], capture_output=True, text=True, check=True)
    assert tag.stdout.strip() == {"pretrain": "step7", "extension": "ext7", "decay": "decay7"}[phase]
    config = json.loads((repo / "config.json").read_text())
    g, l = original_thetas(size, objective, phase)
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == g
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == l
    cls = ModernBertDecoderForCausalLM if objective == "clm" else ModernBertForMaskedLM
    assert _logit_diff(model, cls.from_pretrained(repo, dtype=torch.float32).eval()) < 1e-4
