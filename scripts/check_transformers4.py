"""Do our exports (written with transformers 5) load right in transformers 4.57, which many users still run?

    python -m pip install --no-deps --target /tmp/tf4 transformers==4.57.6 'huggingface-hub<1' 'tokenizers<0.23'
    .venv/bin/python scripts/check_transformers4.py --transformers4 /tmp/tf4

Writes a tiny encoder and decoder, each with equal and with split RoPE thetas (global 160000, local 10000)
and a window that binds, as ettin-export writes them (`to_hf(...).save_pretrained`), with our logits beside
them; then loads each folder with a plain `from_pretrained` in a second Python that imports transformers
from the --transformers4 folder, and prints the largest logit difference, plain and with PATCH_4_57 (the
4.57 decoder builds its local rotary table from the global theta; docs/export.md quotes this function).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PATCH_4_57 = '''
def patch_decoder_local_rope_4_57(model):
    """transformers 4.57 only: rebuild ModernBertDecoder's local rotary table from config.local_rope_theta."""
    import copy
    inner, config = model.model, model.config
    local = copy.deepcopy(config)
    local.global_rope_theta = config.local_rope_theta  # 4.57 builds both tables from global_rope_theta
    inner.local_rotary_emb = type(inner.local_rotary_emb)(config=local, device=inner.local_rotary_emb.inv_freq.device)
    return model
'''

CASES = {  # name: (causal, rope_theta_global, rope_theta_local)
    "encoder-equal": (False, 160000.0, None),
    "encoder-split": (False, 160000.0, 10000.0),
    "decoder-equal": (True, 160000.0, None),
    "decoder-split": (True, 160000.0, 10000.0),
}


def write_exports(out: Path) -> None:
    import torch

    from ettin_train.checkpoint.hf import to_hf
    from ettin_train.model import EttinModel, ModelConfig

    ids = dict(pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, mask_token_id=4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 512, (2, 48), generator=g)
    for name, (causal, theta_global, theta_local) in CASES.items():
        cfg = ModelConfig(size=None, num_layers=4, hidden_size=128, intermediate_size=192, num_heads=2,
                          vocab_size=512, sliding_window=16, causal=causal, attention_backend="sdpa", init_std=0.08,
                          rope_theta_global=theta_global, rope_theta_local=theta_local)
        torch.manual_seed(1)
        model = EttinModel(cfg).eval()
        to_hf(model, **ids).save_pretrained(out / name)
        with torch.no_grad():
            torch.save({"ids": tokens, "logits": model(tokens)}, out / name / "expected.pt")


def compare(out: Path) -> dict:
    import torch
    import transformers
    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    namespace: dict = {}
    exec(PATCH_4_57, namespace)
    rows = {"transformers": transformers.__version__}
    for name, (causal, _, _) in CASES.items():
        cls = ModernBertDecoderForCausalLM if causal else ModernBertForMaskedLM
        expected = torch.load(out / name / "expected.pt")
        model = cls.from_pretrained(out / name, attn_implementation="sdpa").eval()
        with torch.no_grad():
            plain = (model(input_ids=expected["ids"]).logits - expected["logits"]).abs().max().item()
            patched = None
            if causal:
                namespace["patch_decoder_local_rope_4_57"](model)
                patched = (model(input_ids=expected["ids"]).logits - expected["logits"]).abs().max().item()
        rows[name] = {"plain": plain, "patched": patched}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers4", help="a folder holding transformers 4.57 (pip install --target)")
    parser.add_argument("--compare", help=argparse.SUPPRESS)  # the second Python's half
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(Path(args.compare))))
        return 0
    if not args.transformers4:
        parser.error("--transformers4 is required")
    with tempfile.TemporaryDirectory() as tmp:
        write_exports(Path(tmp))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.transformers4, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, __file__, "--compare", tmp], env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"exports written with this transformers, loaded with transformers {rows.pop('transformers')}:")
    print("| export | max |logit diff|, plain from_pretrained | after patch_decoder_local_rope_4_57 |")
    print("|---|---|---|")
    for name, row in rows.items():
        patched = "-" if row["patched"] is None else f"{row['patched']:.1e}"
        print(f"| {name} | {row['plain']:.1e} | {patched} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
