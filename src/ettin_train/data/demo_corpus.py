"""A small real-text corpus and tokenizer made on the spot, with no download: the docstrings of the
installed Python standard library, and a byte-level BPE tokenizer with the ModernBERT special tokens.
Used by `make demo` and by the tests; nothing of it is committed."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def stdlib_docstrings(max_chars: int, min_words: int = 12) -> Iterator[tuple[str, str]]:
    """(id, text) documents, one per standard-library module: its docstrings joined by blank lines,
    in a fixed order, up to `max_chars` in all. Whole modules give documents long enough for the
    long-context phases."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d and len(d.split()) >= min_words)
        if not text:
            continue
        yield str(rel), text
        total += len(text)
        if total >= max_chars:
            return


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str):
    """Trains a byte-level BPE (the family of Ettin's OLMo-derived tokenizer) and saves it as a
    `transformers` fast tokenizer that frames text as `[CLS] ... [SEP]`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # the original used add_prefix_space
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # As ModernBERT's: [MASK] takes the space before it, so "a [MASK] of" reads as a masked word (" list"), not as
    # a lone space followed by a mask (the trainer adds its special tokens without lstrip).
    tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, special=True, normalized=False)])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token=AddedToken("[MASK]", lstrip=True, special=True), bos_token="[CLS]", eos_token="[SEP]",
        model_max_length=8192,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_demo_data(out_dir: str, max_chars: int, vocab_size: int, seq_lens: dict[str, int],
                    heldout_chars: int = 0) -> dict[str, int]:
    """Writes `out_dir/tokenizer` and one MDS folder per entry of `seq_lens` (name -> sequence length).
    With `heldout_chars`, also `heldout_<name>` folders from the documents that follow the training ones
    (other modules, never trained on: evaluation data, docs/eval.md). Returns the samples per folder."""
    from ettin_train.data.shards import write_shards

    docs, heldout, total = [], [], 0
    for doc in stdlib_docstrings(max_chars + heldout_chars):  # one pass over the stdlib (parsing it is the slow part)
        (docs if total < max_chars else heldout).append(doc)  # as stdlib_docstrings(max_chars) would stop
        total += len(doc[1])
    if heldout_chars and not heldout:
        raise ValueError(f"no documents are left after the first {max_chars} characters for held-out data: lower max_chars")
    tok = train_tokenizer([text for _, text in docs], vocab_size, str(Path(out_dir) / "tokenizer"))

    def encode(part):
        if not part:  # no held-out documents asked for: the tokenizer cannot encode an empty batch
            return []
        return [(doc_id, ids) for (doc_id, _), ids in
                zip(part, tok([text for _, text in part], add_special_tokens=False, verbose=False)["input_ids"])]

    train, test = encode(docs), encode(heldout)
    folders = {name: (train, seq_len) for name, seq_len in seq_lens.items()}
    if heldout:
        folders |= {f"heldout_{name}": (test, seq_len) for name, seq_len in seq_lens.items()}
    from ettin_train.data.shard_record import make_record, write_record

    written = {}
    for name, (encoded, seq_len) in folders.items():
        folder = Path(out_dir) / name
        written[name] = write_shards(str(folder), encoded, seq_len, tok.cls_token_id, tok.sep_token_id)
        write_record(folder, make_record(tok, str(Path(out_dir) / "tokenizer"), seq_len))  # what train.py checks
    return written
