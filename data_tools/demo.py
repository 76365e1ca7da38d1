"""The offline demo (`make demo`): a tiny Ettin encoder and decoder through all three phases on the CPU.

1. Builds a corpus from the docstrings of the installed Python standard library, trains a small
   byte-level BPE tokenizer with the ModernBERT special tokens, and writes MDS shards
   (128-token pieces for pre-training, 512-token pieces for extension and decay).
2. Runs `train.py` on yamls/demo/{encoder,decoder}/{pretrain,extension,decay}.yaml in order; each
   later phase starts from the previous phase's run folder (its `init.checkpoint`), as a real run does.
3. Prints where the checkpoints are, and fill-mask and generation samples from the final models.

    python data_tools/demo.py            # everything (about 10 minutes on 2 cores)
    python data_tools/demo.py --samples  # only the samples, from existing runs
Runs are resumable: finished phases are skipped, an interrupted phase resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_runs"
PHASES = ("pretrain", "extension", "decay")
PROMPTS = ("Return the number of [MASK] in the list.", "Raise ValueError if the [MASK] is not found.")
GENERATE = ("Return a new", "This module provides")


def prepare_data() -> None:
    from ettin_train.data.demo_corpus import build_demo_data

    data = OUT / "data"
    if (data / "heldout_short" / "index.json").exists():
        print(f"demo data: reusing {data}")
        return
    t = time.time()
    counts = build_demo_data(str(data), max_chars=1_250_000, vocab_size=4096, seq_lens={"short": 128, "long": 512},
                             heldout_chars=200_000)  # of the stdlib's ~1.5M characters; heldout_*: the recipes' eval.sources
    print(f"demo data: tokenizer and MDS shards in {data} ({counts['short']} + {counts['long']} samples, {time.time() - t:.0f}s)")


def train_all() -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    for objective in ("encoder", "decoder"):
        for phase in PHASES:
            recipe = f"yamls/demo/{objective}/{phase}.yaml"
            print(f"\n=== {objective} / {phase}: python train.py {recipe}", flush=True)
            subprocess.run([sys.executable, "train.py", recipe], cwd=ROOT, env=env, check=True)


def samples() -> None:
    import torch
    from transformers import AutoTokenizer

    from ettin_train.checkpoint import find_checkpoint, load_checkpoint, model_state_dict
    from ettin_train.config import load_recipe
    from ettin_train.model import EttinModel

    tok = AutoTokenizer.from_pretrained(str(OUT / "data" / "tokenizer"))
    models = {}
    for objective in ("encoder", "decoder"):
        recipe, _ = load_recipe(ROOT / "yamls" / "demo" / objective / "decay.yaml")
        model = EttinModel(recipe.model).eval()
        path = find_checkpoint(ROOT / recipe.run_dir)
        model.load_state_dict(model_state_dict(load_checkpoint(path)))
        models[objective] = model
        print(f"{objective}: final checkpoint {path.relative_to(ROOT)}")

    print("\nfill-mask (encoder):")
    for text in PROMPTS:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = models["encoder"](enc["input_ids"], enc["attention_mask"])
        where = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
        top = logits[0, where].topk(5).indices.tolist()
        print(f"  {text!r} -> {[tok.decode([t]).strip() for t in top]}")

    print("\ngeneration (decoder, greedy):")
    for text in GENERATE:
        ids = [tok.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(16):
            with torch.no_grad():
                nxt = int(models["decoder"](torch.tensor([ids]))[0, -1].argmax())
            if nxt == tok.sep_token_id:
                break
            ids.append(nxt)
        print(f"  {text!r} -> {tok.decode(ids[1:])!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", action="store_true", help="only print samples from the existing final checkpoints")
    args = parser.parse_args()
    os.chdir(ROOT)
    start = time.time()
    if not args.samples:
        prepare_data()
        train_all()
    print()
    samples()
    print(f"\ndemo finished in {time.time() - start:.0f}s; runs, checkpoints and recipes copies are in {OUT}/")


if __name__ == "__main__":
    main()
