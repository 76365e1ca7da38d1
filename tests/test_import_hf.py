"""ettin-import -> ettin-export gives back the transformers model that went in: both RoPE thetas, the window,
the global-layer pattern, every weight; flags that contradict what the import recorded are refused; and the
export's check catches settings that are not the recorded ones."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from transformers import (AutoTokenizer, ModernBertConfig, ModernBertDecoderConfig, ModernBertDecoderForCausalLM,
                          ModernBertForMaskedLM)

from ettin_train.checkpoint import load_checkpoint
from ettin_train.export import main as export_main
from ettin_train.import_hf import main as import_main

LAYER_TYPES = ["full_attention", "sliding_attention"] * 3  # a global layer every 2
THETAS = {"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


def hf_source(folder: Path, tokenizer_dir: Path, causal: bool):
    """A transformers ModernBERT built from transformers' own config classes (not our hf_config), saved with a
    tokenizer: split thetas 160000 / 10000, local window 16 (encoder) or 17 keys with the query (decoder)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
                  layer_types=LAYER_TYPES, rope_parameters=THETAS, **ids)
    torch.manual_seed(11)
    if causal:
        model = ModernBertDecoderForCausalLM(ModernBertDecoderConfig(**common, local_attention=34))
    else:
        model = ModernBertForMaskedLM(ModernBertConfig(**common, local_attention=16, cls_token_id=tokenizer.cls_token_id,
                                                       sep_token_id=tokenizer.sep_token_id,
                                                       mask_token_id=tokenizer.mask_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def _state(repo: Path) -> tuple[str, str]:
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout  # noqa: E731
    return git("tag", "--list"), git("status", "--porcelain")


@pytest.fixture
def imported(tiny_data, tmp_path):
    def make(causal: bool):
        source = hf_source(tmp_path / "hf", tiny_data / "tokenizer", causal)
        assert import_main([str(tmp_path / "hf"), str(tmp_path / "imported.pt")]) == 0
        return source, tmp_path / "imported.pt"
    return make


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_an_imported_model_round_trips_exactly(imported, tmp_path, causal):
    source, checkpoint = imported(causal)
    meta = load_checkpoint(checkpoint)["state"]["integrations"]["ettin_import"]
    recorded = meta["model_config"]
    assert (recorded["rope_theta_global"], recorded["rope_theta_local"]) == (160000.0, 10000.0)
    assert (recorded["global_attn_every_n_layers"], recorded["causal"]) == (2, causal)
    assert meta["objective"] == ("clm" if causal else "mlm") and meta["phase"] is None

    repo = tmp_path / "repo"
    assert export_main([str(checkpoint), "--out", str(repo), "--phase", "decay"]) == 0
    assert _state(repo)[0].split() == ["decay0"]
    cls = type(source)
    back = cls.from_pretrained(repo, dtype=torch.float32).eval()
    for name in ("layer_types", "rope_parameters", "sliding_window", "local_attention", "num_hidden_layers",
                 "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        assert getattr(back.config, name) == getattr(source.config, name), name
    theirs, ours = source.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    ids = torch.randint(5, 512, (2, 70), generator=torch.Generator().manual_seed(2))  # 70 tokens, window 16
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.no_grad():
        a = source(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        b = back(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert torch.equal(a, b)


def test_flags_that_contradict_the_import_are_refused_with_both_values(imported, tmp_path, capsys):
    _, checkpoint = imported(False)
    capsys.readouterr()
    repo = tmp_path / "repo"
    assert export_main([str(checkpoint), "--out", str(repo), "--phase", "ext", "--rope-theta-local", "160000"]) == 2
    err = capsys.readouterr().err
    assert "--rope-theta-local 160000" in err and "rope_theta_local 10000" in err and "ettin-import" in err
    assert err.count("\n") == 1 and not repo.exists()  # refused before anything is written
    # without --phase: the tag cannot be named, and the message says which flag to pass
    assert export_main([str(checkpoint), "--out", str(repo)]) == 2
    assert "give --phase" in capsys.readouterr().err and not repo.exists()


def test_the_check_compares_with_the_record_not_with_the_settings_used(imported, tmp_path, monkeypatch, capsys):
    """An exporter that gets a setting wrong (as PHASE_THETAS did) is caught: the check reads the record itself."""
    import ettin_train.checkpoint.settings as settings

    _, checkpoint = imported(True)
    resolve = settings.resolve

    def wrong(*args, **kwargs):
        s = resolve(*args, **kwargs)
        s.config = s.config.replace(rope_theta_local=None)  # local layers at the global 160000
        return s

    monkeypatch.setattr(settings, "resolve", wrong)
    repo = tmp_path / "repo"
    assert export_main([str(checkpoint), "--out", str(repo), "--phase", "decay"]) == 1
    err = capsys.readouterr().err
    assert "rope_theta_local 160000" in err and "records 10000" in err and "nothing was committed" in err
    assert _state(repo)[0] == ""
