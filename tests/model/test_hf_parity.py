"""Our model against transformers' real ModernBERT classes (the oracle), fp32, eval mode.

Each model is random with non-trivial norms and decoder bias, and a large enough init that attention is
sharp, so a wrong window, theta or key shows up far above the 1e-4 tolerance (the negative tests check that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.checkpoint.hf import from_hf, patch_decoder_local_rope, rope_thetas, to_hf
from ettin_train.import_hf import main as import_main
from ettin_train.model import SIZES, EttinModel, ModelConfig

TOL = 1e-4
# A 512-token vocabulary needs special ids inside it (the HF embedding's padding_idx must exist).
IDS = dict(pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, mask_token_id=4)


def shape(size: str) -> dict:
    return dict(zip(("num_layers", "hidden_size", "intermediate_size", "num_heads"), SIZES[size]))


CONFIGS = {
    # name: (architecture, longest sequence of the test batch)
    "tiny": (dict(num_layers=4, hidden_size=128, intermediate_size=192, num_heads=2, sliding_window=20), 48),
    # 17m shapes with the decay phases' split theta (local 10000, global 160000), small window
    "17m": (dict(**shape("17m"), sliding_window=16, rope_theta_global=160000.0, rope_theta_local=10000.0), 40),
    # 32m shapes with the real window (64 each side), sequences well past it
    "32m": (dict(**shape("32m"), sliding_window=128, rope_theta_global=160000.0), 150),
}


def make_model(name: str, causal: bool, seed: int = 0) -> EttinModel:
    arch, _ = CONFIGS[name]
    cfg = ModelConfig(size=None, vocab_size=512, causal=causal, attention_backend="sdpa", init_std=0.08, **arch)
    torch.manual_seed(seed)
    model = EttinModel(cfg)
    with torch.no_grad():  # norms and the decoder bias are ones/zeros at init: make a wrong mapping visible
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def make_batch(longest: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded, lengths from 5 to `longest` (all but one longer than the small windows)."""
    g = torch.Generator().manual_seed(seed)
    lens = [longest, longest - 11, 5, longest // 2 + 3]
    ids = torch.randint(5, 512, (len(lens), longest), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    ids[mask == 0] = IDS["pad_token_id"]
    return ids, mask


@torch.no_grad()
def max_diff(model: EttinModel, hf_model, ids, mask, positions=None) -> float:
    ours = model(ids, mask)
    theirs = hf_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool() if positions is None else positions
    assert torch.isfinite(theirs[real]).all()
    return (ours[real] - theirs[real]).abs().max().item()


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_and_round_trip(name, causal):
    model = make_model(name, causal)
    hf_model = to_hf(model, **IDS)
    assert isinstance(hf_model, ModernBertDecoderForCausalLM if causal else ModernBertForMaskedLM)
    assert rope_thetas(hf_model.config) == (model.config.rope_theta_global, model.config.local_theta)
    ids, mask = make_batch(CONFIGS[name][1])
    assert max_diff(model, hf_model, ids, mask) < TOL

    back = from_hf(hf_model)
    for field in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "vocab_size", "causal",
                  "sliding_window", "rope_theta_global", "local_theta", "global_attn_every_n_layers", "norm_eps"):
        assert getattr(back.config, field) == getattr(model.config, field), field
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert back.decoder.weight is back.bert.embeddings.tok_embeddings.weight


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_left_padding_matches_too(causal):
    """HF numbers positions over the padded row; RoPE and the windows are relative, so only rounding differs."""
    model = make_model("tiny", causal)
    ids, mask = make_batch(48)
    assert max_diff(model, to_hf(model, **IDS), ids.flip(1), mask.flip(1)) < TOL


def test_decoder_window_needs_one_more_key(tmp_path):
    """transformers' decoder keeps `sliding_window` keys including the query; training keeps w before it plus
    the query. Written the ModernBERT way (local_attention = our sliding_window), HF drops the farthest key."""
    model = make_model("tiny", causal=True)
    half = model.config.sliding_window // 2
    hf_model = to_hf(model, **IDS)
    assert hf_model.config.sliding_window == half + 1  # local_attention written as 2 * (half + 1)
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["local_attention"] == 2 * (half + 1) and config["sliding_window"] == half + 1
    ids, mask = make_batch(48)
    reloaded = ModernBertDecoderForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert reloaded.config.sliding_window == half + 1
    assert max_diff(model, reloaded, ids, mask) < TOL

    # What ModernBERT's convention writes: local_attention = sliding_window -> HF window of `half` keys.
    config["local_attention"] = model.config.sliding_window
    config["sliding_window"] = half  # 5.x reads sliding_window when config.json has it
    (tmp_path / "config.json").write_text(json.dumps(config))
    naive = ModernBertDecoderForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert naive.config.sliding_window == half
    position = torch.arange(ids.shape[1])[None, :].expand_as(ids)
    near = mask.bool() & (position < half)  # the window does not bind yet: same keys either way
    assert max_diff(model, naive, ids, mask, near) < TOL
    assert max_diff(model, naive, ids, mask, mask.bool() & (position >= half)) > 1e-2

    # Without `local_attention` in config.json the window falls back to the class default 128 // 2 = 64.
    del config["local_attention"], config["sliding_window"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModernBertDecoderForCausalLM.from_pretrained(tmp_path).config.sliding_window == 64


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_split_thetas_load_with_a_plain_from_pretrained(tmp_path, causal):
    """transformers 5 runs local layers at rope_parameters["sliding_attention"] in both classes (4.57's decoder
    ignored the local theta). config.json also carries the 4.57 keys. The theta matters: the same folder
    with the local theta set to the global one computes something else, and from_hf imports what it runs."""
    model = make_model("17m", causal=causal)
    assert (model.config.rope_theta_global, model.config.local_theta) == (160000.0, 10000.0)
    to_hf(model, **IDS).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 160000.0
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert (config["global_rope_theta"], config["local_rope_theta"]) == (160000.0, 10000.0)
    assert config["global_attn_every_n_layers"] == model.config.global_attn_every_n_layers

    cls = ModernBertDecoderForCausalLM if causal else ModernBertForMaskedLM
    ids, mask = make_batch(40)
    plain = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert max_diff(model, plain, ids, mask) < TOL
    if causal:
        assert patch_decoder_local_rope(plain) is plain  # on 5.x only a check

    config["rope_parameters"]["sliding_attention"]["rope_theta"] = 160000.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    wrong = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert max_diff(model, wrong, ids, mask) > 1e-2
    if causal:  # a local table that is not the config's theta (what 4.57 built) is refused, not run
        broken = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        broken.model.rotary_emb.sliding_attention_inv_freq.mul_(2.0)
        with pytest.raises(RuntimeError, match="do not run at its local RoPE theta"):
            patch_decoder_local_rope(broken)
    as_run = from_hf(wrong)
    assert as_run.config.local_theta == 160000.0
    assert max_diff(as_run.eval(), wrong, ids, mask) < TOL


@torch.no_grad()
def test_decoder_cached_generation_matches_past_the_window():
    """Token-by-token decoding with transformers' cache (it keeps sliding_window - 1 keys) gives our logits."""
    model = make_model("tiny", causal=True)
    hf_model = to_hf(model, **IDS)
    ids = torch.randint(5, 512, (1, 3 * model.config.sliding_window), generator=torch.Generator().manual_seed(3))
    ours = model(ids)
    out = hf_model(input_ids=ids[:, :4], use_cache=True)
    steps = [out.logits[0]]
    for t in range(4, ids.shape[1]):
        out = hf_model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits[0])
    assert (torch.cat(steps) - ours[0]).abs().max().item() < TOL


def test_import_hf_writes_a_loadable_checkpoint_and_never_overwrites(tmp_path, capsys):
    encoder = make_model("tiny", causal=False)
    to_hf(encoder, **IDS).save_pretrained(tmp_path / "enc")
    out = tmp_path / "enc.pt"
    assert import_main([str(tmp_path / "enc"), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    checkpoint = load_checkpoint(out)
    assert checkpoint["state"]["integrations"]["ettin_import"]["objective"] == "mlm"
    assert all(k.startswith("model.") for k in checkpoint["state"]["model"])
    fresh = EttinModel(encoder.config).eval()
    fresh.load_state_dict(model_state_dict(checkpoint), strict=True)
    ids, mask = make_batch(48)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask), encoder(ids, mask))

    # The real command line refuses before loading anything: exit 2, one line naming the file, file intact.
    before = out.read_bytes()
    run = subprocess.run([sys.executable, "-m", "ettin_train.import_hf", str(tmp_path / "enc"), str(out)],
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert run.returncode == 2
    err = run.stderr.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "refusing to overwrite" in err
    assert out.read_bytes() == before

    # A decoder whose local theta differs: the import uses the theta config.json declares.
    decoder = make_model("17m", causal=True)
    to_hf(decoder, **IDS).save_pretrained(tmp_path / "dec")
    assert import_main([str(tmp_path / "dec"), str(tmp_path / "dec.pt")]) == 0
    fresh = EttinModel(decoder.config).eval()
    fresh.load_state_dict(model_state_dict(load_checkpoint(tmp_path / "dec.pt")), strict=True)
    ids, mask = make_batch(40)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask), decoder(ids, mask))
