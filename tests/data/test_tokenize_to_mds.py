"""data_tools/tokenize_to_mds.py: a dataset (jsonl, parquet, arrow; a split, a column) -> framed MDS samples
that StreamingDataset reads, in parallel, with a record of what they are; an interrupted run (stopped, or
killed with SIGKILL) resumes to exactly the samples of an uninterrupted one, and a failed run blocks nothing.
data_tools/train_tokenizer.py: a tokenizer with the ModernBERT special tokens from the same sources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "data_tools" / "tokenize_to_mds.py"
SEQ_LEN = 32


def main_in_process(*args: str, capsys) -> tuple[int, str, str]:
    """Runs the script's main() here (saves a process start); returns its exit status, stdout and stderr."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenize_to_mds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    code = mod.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_in_process(*args: str, capsys) -> str:
    code, out, err = main_in_process(*args, capsys=capsys)
    assert code == 0, err[-3000:]
    return out


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


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory) -> list[dict]:
    """~370 short documents (docstring paragraphs) with ids: many chunks for the resume tests."""
    from ettin_train.data.demo_corpus import stdlib_docstrings

    docs = []
    for doc_id, text in stdlib_docstrings(max_chars=40_000):
        docs += [{"id": f"{doc_id}/{k}", "body": p} for k, p in enumerate(text.split("\n\n")) if len(p.split()) >= 8]
    return docs


def test_dataset_folders_splits_and_columns_and_the_shards_record(tmp_path, paragraphs, tiny_data, capsys):
    """A local dataset folder read as `datasets` reads it: parquet files split by name, a text column other than
    `text`; a save_to_disk (arrow) folder gives the same samples; the output records what it holds."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = str(tiny_data / "tokenizer")
    train, valid = paragraphs[:60], paragraphs[60:80]
    folder = tmp_path / "ds"
    folder.mkdir()
    for name, rows in (("train-00000-of-00002", train[:30]), ("train-00001-of-00002", train[30:]), ("validation-00000", valid)):
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
    common = ["--tokenizer", tok, "--seq-len", str(SEQ_LEN), "--min-len", "4", "--column", "body", "--chunk-docs", "16"]
    run_in_process(str(folder), "--out", str(tmp_path / "valid"), "--split", "validation", *common, capsys=capsys)
    got = read_samples(tmp_path / "valid")
    assert {i.rpartition("#")[0] for i, _ in got} == {d["id"] for d in valid}  # that split only, every document

    from transformers import AutoTokenizer

    encode = AutoTokenizer.from_pretrained(tok)
    want = []
    for d in valid:
        ids = encode(d["body"], add_special_tokens=False)["input_ids"]
        want += [(f"{d['id']}#{k}", [1, *ids[s:s + SEQ_LEN - 2], 2])
                 for k, s in enumerate(range(0, len(ids), SEQ_LEN - 2)) if len(ids[s:s + SEQ_LEN - 2]) >= 4]
    assert got == want  # an independent tokenization and framing, in the dataset's order

    datasets.DatasetDict({"train": datasets.Dataset.from_list(train)}).save_to_disk(str(tmp_path / "arrow"))
    run_in_process(str(tmp_path / "arrow"), "--out", str(tmp_path / "from_arrow"), *common, capsys=capsys)
    run_in_process(str(folder), "--out", str(tmp_path / "from_parquet"), *common, capsys=capsys)
    assert read_samples(tmp_path / "from_arrow") == read_samples(tmp_path / "from_parquet")

    record = json.loads((tmp_path / "valid" / "ettin_shards.json").read_text())
    assert record["seq_len"] == SEQ_LEN and record["dtype"] == "uint32" and record["framing"] == "[CLS] ... [SEP]"
    import hashlib

    vocab = sorted(encode.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    assert record["tokenizer"]["vocab_sha256"] == hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    assert record["tokenizer"]["name"] == tok and record["tokenizer"]["pad_id"] == 3


def test_killed_mid_run_then_rerun_loses_and_duplicates_no_document(tmp_path, paragraphs, tiny_data, capsys):
    """SIGKILL to the whole process group while chunks are being written; the same command again finishes with
    exactly the samples of an uninterrupted run. (One process: a worker pool's start costs a minute on a shared
    2-core machine; the pool's parts are written and marked the same way, test_jsonl_to_framed_shards_and_resume.)"""
    import os
    import signal
    import time

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in paragraphs[:60]))
    args = [sys.executable, str(SCRIPT), str(src), "--tokenizer", str(tiny_data / "tokenizer"), "--seq-len", str(SEQ_LEN),
            "--min-len", "4", "--column", "body", "--chunk-docs", "1", "--workers", "1"]
    run_in_process(*args[2:-2], "--chunk-docs", "50", "--out", str(tmp_path / "full"), capsys=capsys)  # one process
    full = read_samples(tmp_path / "full")

    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while len(list(out.glob("part_*/DONE"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("part_*/DONE")))
    assert 5 <= done < 60 and not (out / "index.json").exists()  # killed mid-run
    stdout = run_in_process(*args[2:], "--out", str(out), capsys=capsys)
    assert "resumed: " in stdout and int(stdout.split("resumed: ")[1].split()[0]) >= done
    assert read_samples(out) == full


def test_a_failed_run_blocks_no_later_run(tmp_path, paragraphs, tiny_data, capsys):
    """Bad input stops the tool with one line before OUT_DIR exists; a run that finished no chunk leaves an
    OUT_DIR that a run with other settings takes over; one with done chunks is resumed, not overwritten."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in paragraphs[:20]))
    tok, out = str(tiny_data / "tokenizer"), tmp_path / "out"
    common = ["--seq-len", str(SEQ_LEN), "--min-len", "4", "--chunk-docs", "4"]
    for bad, says in ((["--tokenizer", str(tmp_path / "no_such_tokenizer"), "--column", "body"], "--tokenizer"),
                      (["--tokenizer", tok], "--column text: "),
                      (["--tokenizer", tok, "--column", "body", "--split", "test"], "--split test")):
        code, _, err = main_in_process(str(src), "--out", str(out), *common, *bad, capsys=capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()

    # an earlier run that wrote its settings and a half chunk, then died: any new run starts over
    out.mkdir()
    (out / "tokenize_meta.json").write_text(json.dumps({"seq_len": 999}))
    (out / "part_000000").mkdir()
    run_in_process(str(src), "--out", str(out), "--tokenizer", tok, "--column", "body", *common, capsys=capsys)
    assert read_samples(out)
    # done chunks of other settings are never overwritten
    code, _, err = main_in_process(str(src), "--out", str(out), "--tokenizer", tok, "--column", "body", *common[:-1], "8",
                                   capsys=capsys)
    assert code == 2 and "chunk_docs" in err and (out / "part_000004" / "DONE").exists()


def test_train_tokenizer_has_the_modernbert_special_tokens_and_frames_text(tmp_path, paragraphs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    pq.write_table(pa.Table.from_pylist(paragraphs), tmp_path / "docs.parquet")
    script = ROOT / "data_tools" / "train_tokenizer.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "docs.parquet"), "--out", str(tmp_path / "tok"),
                           "--vocab-size", "300", "--column", "body", "--max-docs", "100"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "trained on 100 documents" in proc.stdout
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300
    assert [tok.unk_token, tok.cls_token, tok.sep_token, tok.pad_token, tok.mask_token] == ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    ids = tok("Return the value.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "docs.parquet"), "--out", str(tmp_path / "tok")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
