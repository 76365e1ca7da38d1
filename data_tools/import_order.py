"""Validate the published Ettin batch order (parquet, `jhu-clsp/ettin-data-order`) and import it as
MDS shards plus a step table that `OrderIndex` (and the trainer's replay) reads by step.

    python data_tools/import_order.py ORDER_DIR --out OUT_DIR [--vocab-size 50368] [--pad-id 50283] [--phase ext]

ORDER_DIR holds the phase folders `checkpoint_*` (pre-training), `ext_*`, `decay_*`. Every file is
checked before anything is written; a violation stops the import with exit status 2 and one line
naming the file, the row and the step. OUT_DIR must not exist. Formats: docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See docs/data.md for the formats and the fingerprint.")
    ap.add_argument("order_dir", metavar="ORDER_DIR", help="folder with checkpoint_*/ext_*/decay_* phase folders")
    ap.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the imported order (must not exist)")
    ap.add_argument("--vocab-size", type=int, default=50368, help="token ids must be below this (default: 50368, Ettin)")
    ap.add_argument("--pad-id", type=int, default=50283, help="the [PAD] id used for right padding (default: 50283, Ettin)")
    ap.add_argument("--phase", choices=("pretrain", "ext", "decay"), help="import only this phase (default: all found)")
    ap.add_argument("--shard-size", type=int, default=1 << 27, help="MDS shard size limit in bytes (default: 128 MiB)")
    args = ap.parse_args(argv)

    from ettin_train.data.order import OrderError, validate_and_import

    t = time.time()
    try:
        index = validate_and_import(args.order_dir, args.out, args.vocab_size, args.pad_id, phase=args.phase,
                                    progress=lambda line: print(line, flush=True), shard_size_limit=args.shard_size)
    except OrderError as e:
        print(f"import_order: {e}", file=sys.stderr)
        return 2
    for name, p in index["phases"].items():
        print(f"{name}: {p['steps']} steps, {p['samples']} rows, from {len(p['source_files'])} files")
    print(f"imported to {args.out} in {time.time() - t:.1f}s; fingerprint {index['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
