"""Train a byte-level BPE tokenizer with the ModernBERT special tokens on a dataset, and save it as a
transformers tokenizer folder that frames text as [CLS] ... [SEP] (what tokenize_to_mds.py and train.py use).

    python data_tools/train_tokenizer.py SOURCE --out TOKENIZER_DIR --vocab-size 50368 [--max-docs 1000000]

SOURCE is read as tokenize_to_mds.py reads it (a `datasets` Hub name with --subset and --split, a local
dataset folder of parquet, JSON lines, arrow or .txt files, or one such file), streamed, in the dataset's
order; the first --max-docs documents with text are used. Special tokens, in this order from id 0:
[UNK] [CLS] [SEP] [PAD] [MASK] (the roles of ModernBERT's 50280..50284; [MASK] strips the space before it).
The byte-level pre-tokenizer adds a prefix space, as the original tokenization did (add_prefix_space).
Ettin itself used its published tokenizer (jhu-clsp/ettin-encoder-150m): pass that to --tokenizer
instead of training one when you continue from its checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", metavar="SOURCE", help="a datasets Hub name, a local dataset folder, or one .parquet/.jsonl/.arrow/.txt file")
    ap.add_argument("--out", required=True, metavar="TOKENIZER_DIR", help="folder to save the tokenizer in (must not exist)")
    ap.add_argument("--vocab-size", type=int, default=50368, help="tokens in all, special tokens included (default: 50368, Ettin's)")
    ap.add_argument("--max-docs", type=int, default=1_000_000, help="documents to train on, from the start (default: 1000000)")
    ap.add_argument("--split", default="train", help="the dataset's split (default: train)")
    ap.add_argument("--subset", help="the dataset's configuration (load_dataset's name)")
    ap.add_argument("--column", default="text", help="the column holding the text (default: text)")
    args = ap.parse_args(argv)

    from ettin_train.data.demo_corpus import SPECIAL_TOKENS, train_tokenizer
    from ettin_train.data.text_source import SourceError, TextSource

    out = Path(args.out)
    if out.exists():
        print(f"train_tokenizer: {out} already exists; pick another --out", file=sys.stderr)
        return 2
    if args.vocab_size <= len(SPECIAL_TOKENS) or args.max_docs < 1:
        print(f"train_tokenizer: --vocab-size must exceed {len(SPECIAL_TOKENS)} and --max-docs be at least 1", file=sys.stderr)
        return 2
    source = TextSource(args.source, args.split, args.subset, args.column)
    try:
        source.check()
        texts = [text for _, text in itertools.islice(source.documents(), args.max_docs)]
    except SourceError as e:
        print(f"train_tokenizer: {e}", file=sys.stderr)
        return 2
    tok = train_tokenizer(texts, args.vocab_size, str(out))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    print(f"trained on {len(texts)} documents: {len(tok)} tokens in {out}; special tokens "
          + ", ".join(f"{t}={i}" for t, i in ids.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
