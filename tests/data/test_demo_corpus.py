"""The demo corpus builder (data/demo_corpus.py) with its defaults."""

from __future__ import annotations

import json


def test_build_demo_data_without_heldout_writes_only_the_training_folders(tmp_path):
    """heldout_chars=0 (the default): no held-out documents, so no heldout_* folder, and the training shards
    are written whole (an empty held-out set once crashed the encoding with an IndexError)."""
    from ettin_train.data.demo_corpus import build_demo_data

    counts = build_demo_data(str(tmp_path), max_chars=20_000, vocab_size=300, seq_lens={"short": 64})
    assert set(counts) == {"short"} and counts["short"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short", "tokenizer"]
    index = json.loads((tmp_path / "short" / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == counts["short"]
