"""The linear probe: a separable task is learned, the same seed gives the same number, a bad file is refused
naming its line."""

from __future__ import annotations

import json

import pytest
import torch

from ettin_train.eval.probe import ProbeError, fit_predict, probe
from tests.conftest import tiny_masked_lm


def test_separable_synthetic_features_are_classified():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 16, generator=g, dtype=torch.float64) * 3
    labels = [i % 3 for i in range(300)]
    x = centres[labels] + torch.randn(300, 16, generator=g, dtype=torch.float64)
    pred = fit_predict(x[:200], [f"c{v}" for v in labels[:200]], x[200:], seed=0)
    accuracy = sum(p == f"c{t}" for p, t in zip(pred, labels[200:])) / 100
    assert accuracy >= 0.95
    shuffled = fit_predict(x[:200], [f"c{v}" for v in torch.randperm(200, generator=g).remainder(3).tolist()], x[200:])
    assert sum(p == f"c{t}" for p, t in zip(shuffled, labels[200:])) / 100 < 0.6  # random labels teach nothing


def write_probe(path, n=24):
    words = {"file": ["Open the file and read its lines.", "Write the bytes to the file path."],
             "number": ["Return the integer value of x.", "Add two numbers and return the sum."]}
    with path.open("w") as f:
        for i in range(n):
            label = "file" if i % 2 else "number"
            text = words[label][(i // 2) % 2] + f" Case {i}."
            f.write(json.dumps({"text": text, "label": label, "split": "test" if i % 4 in (0, 1) and i < 8 else "train"}) + "\n")
    return path


def test_probe_on_a_frozen_model_is_reproducible(tiny_data, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    model = tiny_masked_lm(len(tok))
    path = write_probe(tmp_path / "probe.jsonl")
    first, again = probe(model, tok, path, seed=5), probe(model, tok, path, seed=5)
    assert first == again and first["items"] == 4
    assert first["accuracy"] >= 0.75  # the two classes share no content words


def test_bad_probe_file_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a", "label": 1, "split": "train"}) + "\n" + '{"text": "b"}\n')
    with pytest.raises(ProbeError, match=r"bad.jsonl:2: not a JSON object with text, label and split"):
        probe(None, None, path)
