"""Tokenizing a corpus into MDS shards: data_tools/tokenize_to_mds.py against the plain loop it replaces
(`datasets.load_dataset` + `Dataset.map(tokenize, batched=True, num_proc=K)` + one `MDSWriter` writing each
document's framed pieces), on the same corpus, tokenizer, framing and workers. Prints tokens/s per core
for each (K workers = K cores) and their ratio, and checks that both wrote the same samples.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tokenize_mds.py                       # defaults below
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tokenize_mds.py --docs 50000 --workers 2 --repeats 3

The corpus is the standard library's docstring paragraphs, repeated to --docs documents, in one parquet
file; the tokenizer is a 4096-token byte-level BPE trained on them (data/demo_corpus.py). No download.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_corpus(path: Path, docs: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ettin_train.data.demo_corpus import stdlib_docstrings

    paragraphs = [p for _, text in stdlib_docstrings(max_chars=600_000) for p in text.split("\n\n") if len(p.split()) >= 8]
    texts = [paragraphs[k % len(paragraphs)] for k in range(docs)]
    pq.write_table(pa.table({"id": [f"d{k}" for k in range(docs)], "text": texts}), path)
    return paragraphs


def plain_loop(corpus: Path, out: Path, tokenizer: str, seq_len: int, workers: int) -> int:
    """What a user writes without the tool; returns the tokens tokenized."""
    import datasets
    from transformers import AutoTokenizer

    from ettin_train.data.shards import write_shards

    tok = AutoTokenizer.from_pretrained(tokenizer)
    ds = datasets.load_dataset("parquet", data_files=str(corpus), split="train", keep_in_memory=True)
    ds = ds.map(lambda b: {"input_ids": tok(b["text"], add_special_tokens=False)["input_ids"]}, batched=True,
                num_proc=workers if workers > 1 else None, remove_columns=["text"], keep_in_memory=True)
    write_shards(str(out), ((r["id"], r["input_ids"]) for r in ds), seq_len, tok.cls_token_id, tok.sep_token_id)
    return sum(len(x) for x in ds["input_ids"])


def ours(corpus: Path, out: Path, tokenizer: str, seq_len: int, workers: int) -> int:
    sys.path.insert(0, str(ROOT / "data_tools"))  # importable by name: the worker pool's processes import it too
    import tokenize_to_mds as mod

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = mod.main([str(corpus), "--out", str(out), "--tokenizer", tokenizer, "--seq-len", str(seq_len),
                         "--workers", str(workers), "--chunk-docs", "2000"])
    if code:
        raise SystemExit(f"tokenize_to_mds exited {code}")
    return int(buf.getvalue().split("samples, ")[-1].split(" tokens")[0])


def samples(folder: Path) -> list[tuple[str, list[int]]]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    got = [(s["id"], s["input_ids"].tolist()) for s in (ds[i] for i in range(ds.num_samples))]
    del ds
    clean_stale_shared_memory()
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=30_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ettin_train.data.demo_corpus import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paragraphs = write_corpus(root / "corpus.parquet", args.docs)
        train_tokenizer(paragraphs, 4096, str(root / "tok"))
        results: dict[str, list[float]] = {"plain": [], "ours": []}
        for r in range(args.repeats):
            for name, fn in (("plain", plain_loop), ("ours", ours)):
                out = root / f"{name}{r}"
                t = time.perf_counter()
                tokens = fn(root / "corpus.parquet", out, str(root / "tok"), args.seq_len, args.workers)
                results[name].append(tokens / (time.perf_counter() - t) / args.workers)
        same = samples(root / "plain0") == samples(root / "ours0")
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {"docs": args.docs, "tokens": tokens, "workers": args.workers, "seq_len": args.seq_len, "same_samples": same,
              **{f"{k}_tokens_per_s_per_core": [round(x) for x in v] for k, v in results.items()},
              "ratio_ours_to_plain": round(med["ours"] / med["plain"], 2)}
    print(json.dumps(report))
    print(f"tokens/s per core (median of {args.repeats}): plain datasets.map + MDSWriter {med['plain']:,.0f}, "
          f"tokenize_to_mds {med['ours']:,.0f}: ratio {med['ours'] / med['plain']:.2f}x; same samples: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
