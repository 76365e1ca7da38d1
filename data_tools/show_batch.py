"""Show one step of an imported batch order (Pythia batch-viewer style): its batch size, the
`rows_sha256` digest that `ledger.jsonl` records for a trained step, and its first rows.

    python data_tools/show_batch.py --order OUT_DIR --phase pretrain --step 1000 [--tokenizer PATH] [--rows 4]

OUT_DIR is a folder written by data_tools/import_order.py. Rows are decoded with the tokenizer when
one is given, else printed as token ids.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", required=True, metavar="OUT_DIR", help="an imported order (data_tools/import_order.py)")
    ap.add_argument("--phase", required=True, choices=("pretrain", "ext", "decay"))
    ap.add_argument("--step", required=True, type=int, help="1-based step within the phase")
    ap.add_argument("--tokenizer", metavar="PATH", help="decode rows with this tokenizer (a folder or hub name)")
    ap.add_argument("--rows", type=int, default=4, metavar="N", help="how many rows to print (default: 4)")
    args = ap.parse_args(argv)

    from ettin_train.data.order import OrderError, OrderIndex

    try:
        order = OrderIndex(args.order)
        rows = order.rows(args.phase, args.step)
    except (OrderError, KeyError, IndexError) as e:
        print(f"show_batch: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tokens = sum(len(r) for r in rows)
    print(f"phase {args.phase} step {args.step}: batch size {len(rows)}, {tokens} non-padding tokens")
    print(f"rows_sha256 {order.rows_sha256(rows)}")
    print(f"order fingerprint {order.fingerprint}")
    for i, row in enumerate(rows[: args.rows]):
        text = tok.decode(row.tolist()) if tok is not None else " ".join(map(str, row.tolist()))
        print(f"--- row {i} ({len(row)} tokens)\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
