"""data_tools/tokenize_to_mds.py: jsonl -> framed MDS samples that StreamingDataset reads, in parallel,
and an interrupted run resumes to exactly the samples of an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "data_tools" / "tokenize_to_mds.py"
SEQ_LEN = 32


def run_in_process(*args: str, capsys) -> str:
    """Runs the script's main() here (saves a process start); returns its stdout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenize_to_mds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    assert mod.main(list(args)) == 0
    return capsys.readouterr().out


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_data) -> Path:
    from ettin_train.data.demo_corpus import stdlib_docstrings

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as fp:
        fp.writelines(json.dumps({"id": doc_id, "text": text}) + "\n" for doc_id, text in stdlib_docstrings(max_chars=40_000))
    return path


def read_samples(folder: Path) -> list[tuple[str, list[int]]]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    try:
        return [(s["id"], s["input_ids"].tolist()) for s in (ds[i] for i in range(ds.num_samples))]
    finally:
        from streaming.base.util import clean_stale_shared_memory

        del ds
        clean_stale_shared_memory()


def test_jsonl_to_framed_shards_and_resume(tmp_path, corpus, tiny_data, capsys):
    tok = str(tiny_data / "tokenizer")
    n_docs = len(corpus.read_text().splitlines())
    common = ["--tokenizer", tok, "--seq-len", str(SEQ_LEN), "--chunk-docs", "2", "--min-len", "4"]

    # uninterrupted, two worker processes
    run(str(corpus), "--out", str(tmp_path / "full"), *common, "--workers", "2")
    full = read_samples(tmp_path / "full")
    assert full and all(ids[0] == 1 and ids[-1] == 2 and len(ids) <= SEQ_LEN for _, ids in full)  # [CLS] ... [SEP]
    assert len({i for i, _ in full}) == len(full)  # no duplicates
    assert n_docs >= 6 and len({i.split("#")[0] for i, _ in full}) > n_docs // 2

    # independent check of the first document's pieces
    from transformers import AutoTokenizer

    first = json.loads(corpus.read_text().splitlines()[0])
    ids = AutoTokenizer.from_pretrained(tok)(first["text"], add_special_tokens=False)["input_ids"]
    pieces = [[1, *ids[k:k + SEQ_LEN - 2], 2] for k in range(0, len(ids), SEQ_LEN - 2) if len(ids[k:k + SEQ_LEN - 2]) >= 4]
    assert [s for i, s in full if i.startswith(first["id"] + "#")] == pieces

    # interrupted: the first 2 chunks, then a chunk left half-written (no DONE mark), then the full job
    out = tmp_path / "resumed"
    stdout = run_in_process(str(corpus), "--out", str(out), *common, "--stop-after", "2", capsys=capsys)
    assert "stopped after 2" in stdout and not (out / "index.json").exists()
    assert sorted(p.name for p in out.glob("part_*")) == ["part_000000", "part_000001"]
    (out / "part_000002").mkdir()
    (out / "part_000002" / "shard.00000.mds").write_bytes(b"garbage")
    stdout = run_in_process(str(corpus), "--out", str(out), *common, capsys=capsys)
    assert "resumed: 2 chunk(s)" in stdout
    assert read_samples(out) == full

    # a different setting on the same output is refused
    proc = run(str(corpus), "--out", str(out), *common[:3], "64", *common[4:], check=False)
    assert proc.returncode == 2 and "seq_len" in proc.stderr


def test_short_tails_are_backfilled_from_the_piece_before(tmp_path, corpus, tiny_data, capsys):
    """--short-tails backfill: a document's pieces are the same tokens in the same order as without it
    (moved, not copied), and its last piece has at least --backfill-len tokens when it has a piece before."""
    from transformers import AutoTokenizer

    tok = str(tiny_data / "tokenizer")
    common = ["--tokenizer", tok, "--seq-len", str(SEQ_LEN), "--min-len", "4"]
    run_in_process(str(corpus), "--out", str(tmp_path / "filled"), *common, "--short-tails", "backfill", "--backfill-len", "20",
                   capsys=capsys)
    filled = read_samples(tmp_path / "filled")
    body = SEQ_LEN - 2
    encode = AutoTokenizer.from_pretrained(tok)
    backfilled = 0
    for line in corpus.read_text().splitlines():
        doc = json.loads(line)
        ids = encode(doc["text"], add_special_tokens=False)["input_ids"]
        pieces = [s for i, s in filled if i.rpartition("#")[0] == doc["id"]]
        assert all(p[0] == 1 and p[-1] == 2 and len(p) <= SEQ_LEN for p in pieces)
        content = [t for p in pieces for t in p[1:-1]]
        tail = len(ids) % body
        if len(ids) > body and 4 <= tail < 20:  # a short tail after full pieces: filled from the piece before
            backfilled += 1
            assert content == ids and len(pieces[-1]) - 2 == 20 and len(pieces[-2]) - 2 == body - (20 - tail)
        elif tail and tail < 4:  # too short even to backfill: dropped, as without the option
            assert content == ids[: len(ids) - tail]
        else:
            assert content == ids
    assert backfilled >= 3

    proc = run(str(corpus), "--out", str(tmp_path / "bad"), *common, "--short-tails", "backfill", "--backfill-len", "40",
               check=False)
    assert proc.returncode == 2 and "--backfill-len 40 must be between --min-len 4 and --seq-len - 2 (30)" in proc.stderr
    assert not (tmp_path / "bad").exists()
