"""Tokenize a dataset into MDS shards in the original Ettin layout (one sample = one framed piece of one
document; columns input_ids uint32, id, len), streaming, in parallel and resumably.

    python data_tools/tokenize_to_mds.py SOURCE --out OUT_DIR --tokenizer PATH --seq-len 1024 [--workers 4]
    python data_tools/tokenize_to_mds.py HuggingFaceFW/fineweb-edu --subset sample-10BT --split train --column text ...

SOURCE is a `datasets` dataset: a Hub name (with --subset and --split), a local dataset folder (parquet,
JSON lines, arrow or .txt files, one split per file-name prefix as `datasets` reads them, or a save_to_disk
folder) or one such file. It is read as a stream, so a corpus larger than memory is never held whole.
The text is --column (default: text); a document's id is --id-column where the row has one, else `row:N`.
Each document is cut into pieces of seq_len - 2 tokens framed [CLS] ... [SEP]; a tail shorter than
--min-len tokens is dropped. With --short-tails backfill (the original's 1024-token data), a tail shorter
than --backfill-len gets tokens moved from the end of the piece before it until it has --backfill-len.

OUT_DIR gets ettin_shards.json beside index.json: the tokenizer (name and vocabulary fingerprint), the
framing, the row length and the dtype, which train.py checks against the recipe before any work.

Resumable: documents are taken in fixed chunks of --chunk-docs, in the dataset's order; each chunk is
written to its own subfolder OUT_DIR/part_NNNNNN and marked done (a `DONE` file, written last) when
complete. Rerunning the same command after an interruption (even a kill -9) skips done chunks and redoes
any chunk without the mark, so it loses and duplicates no document. A run that failed before finishing
any chunk leaves nothing a later run must respect: rerun with any settings. At the end the parts'
index.json files are merged into OUT_DIR/index.json (streaming's merge_index).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

META = "tokenize_meta.json"


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


def _work(job: tuple[int, list[tuple[str, str]], str, int, int, int | None]) -> tuple[int, int, int, int]:
    """Tokenizes and writes one chunk to its part folder; returns (chunk, documents, samples, tokens)."""
    from ettin_train.data.shards import write_shards

    c, docs, out, seq_len, min_len, backfill_len = job
    part = Path(out) / f"part_{c:06d}"
    if part.exists():  # an interrupted earlier attempt: start this chunk over
        shutil.rmtree(part)
    ids = _TOK([text for _, text in docs], add_special_tokens=False, verbose=False)["input_ids"]
    n = write_shards(str(part), ((doc_id, x) for (doc_id, _), x in zip(docs, ids)), seq_len, _TOK.cls_token_id,
                     _TOK.sep_token_id, min_len=min_len, backfill_len=backfill_len)
    if n == 0:  # MDSWriter writes no index.json for an empty dataset; keep one so the merge sees the part
        (part / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    done = part / "DONE.tmp"  # renamed: a kill leaves either no mark or a whole one
    done.write_text(json.dumps({"documents": len(docs), "samples": n}) + "\n")
    done.rename(part / "DONE")
    return c, len(docs), n, sum(len(x) for x in ids)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)  # one line, as every other tool
    return 2


def _parts(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("part_*") if p.is_dir())


def prepare_out(out: Path, meta: dict) -> str | None:
    """Makes OUT_DIR ready for this run; returns an error, or None. A folder with done chunks of the same
    settings is resumed; one of an earlier run that finished no chunk is started over, whatever its settings."""
    if not out.exists():
        out.mkdir(parents=True)
    meta_path = out / META
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = None
        done = [p for p in _parts(out) if (p / "DONE").exists()]
        if old != meta and done:
            diff = ", ".join(k for k in {**meta, **(old or {})} if (old or {}).get(k) != meta.get(k))
            return f"{out} holds {len(done)} done chunk(s) of a run with other settings ({diff}); use a new --out"
        if old != meta:  # nothing done: what is there is ours and worth nothing
            for p in _parts(out):
                shutil.rmtree(p)
            meta_path.unlink()
    elif any(out.iterdir()):
        return f"{out} is not empty and is not an earlier tokenize_to_mds output"
    if not meta_path.exists():
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    for name in ("index.json", "ettin_shards.json"):  # written again at the end
        (out / name).unlink(missing_ok=True)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", metavar="SOURCE", help="a datasets Hub name, a local dataset folder, or one .parquet/.jsonl/.arrow/.txt file")
    ap.add_argument("--out", required=True, metavar="OUT_DIR")
    ap.add_argument("--tokenizer", required=True, metavar="PATH", help="a transformers tokenizer (folder or hub name)")
    ap.add_argument("--seq-len", required=True, type=int, metavar="N", help="sample length including [CLS] and [SEP]")
    ap.add_argument("--split", default="train", help="the dataset's split (default: train)")
    ap.add_argument("--subset", help="the dataset's configuration (load_dataset's name), e.g. sample-10BT")
    ap.add_argument("--column", default="text", help="the column holding the text (default: text)")
    ap.add_argument("--id-column", default="id", help="the column holding document ids, where rows have it (default: id)")
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

    backfill_len = None
    if args.short_tails == "backfill":
        backfill_len = args.backfill_len if args.backfill_len is not None else args.seq_len // 2
        if not args.min_len <= backfill_len <= args.seq_len - 2:
            return _fail(f"--backfill-len {backfill_len} must be between --min-len {args.min_len} and "
                         f"--seq-len - 2 ({args.seq_len - 2})")
    elif args.backfill_len is not None:
        return _fail("--backfill-len needs --short-tails backfill")
    if args.workers < 1 or args.chunk_docs < 1:
        return _fail("--workers and --chunk-docs must be at least 1")

    from ettin_train.data.shard_record import make_record, write_record
    from ettin_train.data.text_source import SourceError, TextSource

    source = TextSource(args.source, args.split, args.subset, args.column, args.id_column)
    try:  # the tokenizer and the first document are read before OUT_DIR is touched
        _init(args.tokenizer)
    except Exception as e:  # noqa: BLE001 - a typo in the path, or a Hub name offline
        return _fail(f"--tokenizer {args.tokenizer}: cannot load it ({type(e).__name__}: {e})".splitlines()[0])
    if _TOK.cls_token_id is None or _TOK.sep_token_id is None:
        return _fail(f"--tokenizer {args.tokenizer} has no [CLS] or [SEP] token to frame samples with")
    try:
        source.check()
    except SourceError as e:
        return _fail(str(e))
    out = Path(args.out)
    meta = {"source": source.describe(), "tokenizer": args.tokenizer, "seq_len": args.seq_len,
            "chunk_docs": args.chunk_docs, "min_len": args.min_len}
    if backfill_len is not None:
        meta["backfill_len"] = backfill_len
    problem = prepare_out(out, meta)
    if problem:
        return _fail(problem)

    from tqdm import tqdm

    skipped: list[int] = []
    bar = tqdm(unit="doc", desc="tokenize", file=sys.stderr, dynamic_ncols=True)

    def todo():
        for c, docs in chunks(source.documents(), args.chunk_docs):
            if args.stop_after is not None and c >= args.stop_after:
                return
            if (out / f"part_{c:06d}" / "DONE").exists():
                bar.update(len(docs))
                skipped.append(c)
                continue
            yield c, docs, str(out), args.seq_len, args.min_len, backfill_len

    samples = tokens = 0

    def finished(result) -> None:
        nonlocal samples, tokens
        _, n_docs, n, t = result
        samples, tokens = samples + n, tokens + t
        bar.update(n_docs)
        bar.set_postfix(samples=samples, tokens=tokens, refresh=False)

    try:
        if args.workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.workers, initializer=_init, initargs=(args.tokenizer,)) as pool:
                pending: collections.deque = collections.deque()  # bounded: the stream is read as fast as it is used
                for job in todo():
                    pending.append(pool.apply_async(_work, (job,)))
                    while len(pending) >= 2 * args.workers:
                        finished(pending.popleft().get())
                while pending:
                    finished(pending.popleft().get())
        else:
            for job in todo():
                finished(_work(job))
    except SourceError as e:  # a bad row further in: the chunks before it are done and kept
        bar.close()
        return _fail(f"{e} (the chunks done so far are kept: fix it and rerun to continue)")
    bar.close()
    if skipped:
        print(f"resumed: {len(skipped)} chunk(s) were already done")
    if args.stop_after is not None:
        print(f"stopped after {args.stop_after} chunk(s); rerun without --stop-after to finish")
        return 0

    from streaming.base.util import merge_index

    parts = _parts(out)
    missing = [p.name for p in parts if not (p / "DONE").exists()]
    if missing:  # a part beyond the input's end (the input shrank since): not ours to merge
        return _fail(f"parts without a DONE mark: {', '.join(missing)}")
    merge_index([str(p / "index.json") for p in parts], str(out))
    write_record(out, make_record(_TOK, args.tokenizer, args.seq_len))
    total = sum(json.loads((p / "DONE").read_text())["samples"] for p in parts)
    print(f"wrote {total} samples in {len(parts)} part(s) to {out} (this run: {samples} samples, {tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
