"""Tokenize a text corpus into MDS shards in the original Ettin layout (one sample = one framed piece
of one document; columns input_ids uint32, id, len), resumably and in parallel.

    python data_tools/tokenize_to_mds.py INPUT --out OUT_DIR --tokenizer PATH --seq-len 1024 [--workers 4]

INPUT is one file or a folder of files:
  *.txt            one document per line (empty lines are skipped)
  *.jsonl          one JSON object per line, with a `text` field (and optionally `id`)
  *.parquet        a `text` column (and optionally `id`)
Each document is cut into pieces of seq_len - 2 tokens framed [CLS] ... [SEP]; a tail shorter than
--min-len tokens is dropped. With --short-tails backfill (the original's 1024-token data), a tail shorter
than --backfill-len gets tokens moved from the end of the piece before it until it has --backfill-len.

Resumable: documents are taken in fixed chunks of --chunk-docs, in input order; each chunk is written
to its own subfolder OUT_DIR/part_NNNNNN and marked done (a `DONE` file) when complete. Rerunning the
same command skips done chunks and redoes any chunk that has no mark, so an interrupted job loses and
duplicates nothing. At the end the parts' index.json files are merged into OUT_DIR/index.json
(streaming's merge_index), which `streaming.StreamingDataset(local=OUT_DIR)` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

META = "tokenize_meta.json"


def input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet") and p.is_file())
    if not files:
        raise SystemExit(f"tokenize_to_mds: {path} holds no .txt, .jsonl or .parquet files")
    return files


def documents(files: list[Path], root: Path) -> Iterator[tuple[str, str]]:
    """(id, text) documents in a fixed order; ids default to `file:index`."""
    for f in files:
        name = str(f.relative_to(root)) if f != root else f.name
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            cols = ["text"] + (["id"] if "id" in pf.schema_arrow.names else [])
            k = 0
            for batch in pf.iter_batches(batch_size=4096, columns=cols):
                texts = batch.column("text").to_pylist()
                ids = batch.column("id").to_pylist() if "id" in cols else [None] * len(texts)
                for doc_id, text in zip(ids, texts):
                    if text:
                        yield (str(doc_id) if doc_id is not None else f"{name}:{k}"), text
                    k += 1
            continue
        with open(f, encoding="utf-8") as fp:
            for k, line in enumerate(fp):
                if f.suffix == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"tokenize_to_mds: {f}:{k + 1}: not JSON ({e})")
                    text = obj.get("text")
                    if text:
                        yield str(obj.get("id", f"{name}:{k}")), text
                else:
                    text = line.rstrip("\n")
                    if text.strip():
                        yield f"{name}:{k}", text


def chunks(docs: Iterator[tuple[str, str]], size: int) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    batch, c = [], 0
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield c, batch
            batch, c = [], c + 1
    if batch:
        yield c, batch


_TOK = None


def _init(tokenizer: str) -> None:
    global _TOK
    from transformers import AutoTokenizer

    _TOK = AutoTokenizer.from_pretrained(tokenizer)


def _work(job: tuple[int, list[tuple[str, str]], str, int, int, int | None]) -> tuple[int, int, int]:
    """Tokenizes and writes one chunk to its part folder; returns (chunk, documents, samples)."""
    from ettin_train.data.shards import write_shards
    from ettin_train.objectives.base import SpecialTokens

    c, docs, out, seq_len, min_len, backfill_len = job
    tokens = SpecialTokens.from_tokenizer(_TOK)
    part = Path(out) / f"part_{c:06d}"
    if part.exists():  # an interrupted earlier attempt: start this chunk over
        shutil.rmtree(part)
    ids = _TOK([text for _, text in docs], add_special_tokens=False)["input_ids"]
    n = write_shards(str(part), ((doc_id, x) for (doc_id, _), x in zip(docs, ids)), seq_len, tokens.cls, tokens.sep,
                     min_len=min_len, backfill_len=backfill_len)
    if n == 0:  # MDSWriter writes no index.json for an empty dataset; keep one so the merge sees the part
        (part / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    (part / "DONE").write_text(json.dumps({"documents": len(docs), "samples": n}) + "\n")
    return c, len(docs), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", metavar="INPUT", help="a .txt/.jsonl/.parquet file, or a folder of them")
    ap.add_argument("--out", required=True, metavar="OUT_DIR")
    ap.add_argument("--tokenizer", required=True, metavar="PATH", help="a transformers tokenizer (folder or hub name)")
    ap.add_argument("--seq-len", required=True, type=int, metavar="N", help="sample length including [CLS] and [SEP]")
    ap.add_argument("--workers", type=int, default=1, metavar="K", help="tokenizing processes (default: 1)")
    ap.add_argument("--chunk-docs", type=int, default=10_000, help="documents per resumable chunk (default: 10000)")
    ap.add_argument("--min-len", type=int, default=16, help="drop tail pieces with fewer tokens (default: 16)")
    ap.add_argument("--short-tails", choices=("drop", "backfill"), default="drop",
                    help="tails of at least --min-len tokens: keep as they are (drop only shorter ones), or backfill them")
    ap.add_argument("--backfill-len", type=int, metavar="N",
                    help="with --short-tails backfill: fill tails up to N tokens (default: seq_len // 2, the original's 512 of 1024)")
    ap.add_argument("--stop-after", type=int, metavar="C", help="stop after the first C chunks, without merging (a partial run)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from tqdm import tqdm

    backfill_len = None
    if args.short_tails == "backfill":
        backfill_len = args.backfill_len if args.backfill_len is not None else args.seq_len // 2
        if not args.min_len <= backfill_len <= args.seq_len - 2:
            print(f"tokenize_to_mds: --backfill-len {backfill_len} must be between --min-len {args.min_len} and "
                  f"--seq-len - 2 ({args.seq_len - 2})", file=sys.stderr)
            return 2
    elif args.backfill_len is not None:
        print("tokenize_to_mds: --backfill-len needs --short-tails backfill", file=sys.stderr)
        return 2
    src, out = Path(args.input), Path(args.out)
    if not src.exists():
        print(f"tokenize_to_mds: {src} does not exist", file=sys.stderr)
        return 2
    files = input_files(src)
    root = src if src.is_dir() else src.parent
    meta = {"input": [str(f.resolve()) for f in files], "tokenizer": args.tokenizer, "seq_len": args.seq_len,
            "chunk_docs": args.chunk_docs, "min_len": args.min_len}
    if backfill_len is not None:  # only then, so outputs of earlier versions (always drop) still resume
        meta["backfill_len"] = backfill_len
    try:
        _init(args.tokenizer)  # before --out is touched, so a typo leaves nothing behind that blocks the next run
    except Exception as e:  # noqa: BLE001 - no such folder, not a tokenizer, no network: one line
        print(f"error: --tokenizer {args.tokenizer} cannot be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0]})",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta and not any(out.glob("part_*/DONE")):  # a run that failed before finishing a chunk: start over
            for part in out.glob("part_*"):
                shutil.rmtree(part)
            meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        elif old != meta:
            diff = ", ".join(k for k in {**meta, **old} if old.get(k) != meta.get(k))
            print(f"tokenize_to_mds: {out} was started with different settings ({diff}); use a new --out", file=sys.stderr)
            return 2
    else:
        if any(out.iterdir()):
            print(f"tokenize_to_mds: {out} is not empty and is not an earlier tokenize_to_mds output", file=sys.stderr)
            return 2
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    (out / "index.json").unlink(missing_ok=True)  # merged again at the end

    def todo():
        for c, docs in chunks(documents(files, root), args.chunk_docs):
            if args.stop_after is not None and c >= args.stop_after:
                return
            if (out / f"part_{c:06d}" / "DONE").exists():
                bar.update(len(docs))
                skipped.append(c)
                continue
            yield c, docs, str(out), args.seq_len, args.min_len, backfill_len

    skipped: list[int] = []
    samples = 0
    bar = tqdm(unit="doc", desc="tokenize", file=sys.stderr)
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers, initializer=_init, initargs=(args.tokenizer,)) as pool:
            for _, n_docs, n in pool.imap_unordered(_work, todo()):
                bar.update(n_docs)
                samples += n
    else:
        for job in todo():
            _, n_docs, n = _work(job)
            bar.update(n_docs)
            samples += n
    bar.close()
    if skipped:
        print(f"resumed: {len(skipped)} chunk(s) were already done")
    if args.stop_after is not None:
        print(f"stopped after {args.stop_after} chunk(s); rerun without --stop-after to finish")
        return 0

    from streaming.base.util import merge_index

    parts = sorted(p for p in out.glob("part_*") if p.is_dir())
    missing = [p.name for p in parts if not (p / "DONE").exists()]
    if missing:
        print(f"tokenize_to_mds: parts without a DONE mark: {', '.join(missing)}", file=sys.stderr)
        return 2
    merge_index([str(p / "index.json") for p in parts], str(out))
    total = sum(json.loads((p / "DONE").read_text())["samples"] for p in parts)
    print(f"wrote {total} samples in {len(parts)} part(s) to {out} (this run: {samples})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
