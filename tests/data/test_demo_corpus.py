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


def test_mask_takes_the_space_before_it_as_modernberts_does(tmp_path):
    """"a [MASK] of" must read as a masked word: the words it was trained on carry their space (" list"), so a
    lone space token before the mask made fill-mask answer word pieces that follow a bare space."""
    from transformers import AutoTokenizer

    from ettin_train.data.demo_corpus import stdlib_docstrings, train_tokenizer

    train_tokenizer([text for _, text in stdlib_docstrings(20_000)], 300, str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))  # as saved: what the export and fill-mask load
    ids = tok("Return a [MASK] of the names.", add_special_tokens=False)["input_ids"]
    at = ids.index(tok.mask_token_id)
    assert tok.convert_ids_to_tokens(ids[at - 1:at + 1]) == ["Ġa", "[MASK]"]  # no lone "Ġ" between them


def test_heldout_documents_follow_the_training_ones(tmp_path):
    """With heldout_chars, the training shards hold exactly what stdlib_docstrings(max_chars) gives, and the
    held-out ones the modules after it, none of them trained on."""
    from streaming import StreamingDataset

    from ettin_train.data.demo_corpus import build_demo_data, stdlib_docstrings

    build_demo_data(str(tmp_path), max_chars=10_000, vocab_size=300, seq_lens={"short": 64}, heldout_chars=90_000)
    trained = {doc_id for doc_id, _ in stdlib_docstrings(10_000)}
    following = {doc_id for doc_id, _ in stdlib_docstrings(100_000)} - trained
    ids = {name: {row["id"].split("#")[0] for row in StreamingDataset(local=str(tmp_path / name), shuffle=False, batch_size=1)}
           for name in ("short", "heldout_short")}  # ids of pieces: "module.py#piece"
    assert ids["short"] == trained
    assert ids["heldout_short"] and ids["heldout_short"] <= following
