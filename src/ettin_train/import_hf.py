"""`python -m ettin_train.import_hf HF_DIR OUT.pt` (also `ettin-import`): an HF ModernBERT model -> a checkpoint
that a phase can start from.

HF_DIR is a local folder (or a Hub name, where the network allows) holding a `ModernBertForMaskedLM` or a
`ModernBertDecoderForCausalLM`. OUT.pt gets Composer's layout with the original key names:
    {'state': {'model': {'model.<key>': tensor}, 'timestamp': {'Timestamp': {... all 0}},
               'integrations': {'ettin_import': {source, objective, model_config, transformers_version}}},
     'rng': []}
It holds weights only: the phase that loads it takes the architecture, the clock and the optimizer from its
recipe. An existing OUT.pt is never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import torch

PROG = "ettin-import"


def build_checkpoint(model, source: str) -> dict:
    """The Composer-layout checkpoint dict of an EttinModel (weights, a zero clock, metadata)."""
    cfg = model.config
    import transformers

    zero = {k: 0 for k in ("iteration", "epoch", "batch", "sample", "token", "epoch_in_iteration",
                           "token_in_iteration", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")}
    zero.update({k: datetime.timedelta(0) for k in ("total_wct", "iteration_wct", "epoch_wct", "batch_wct")})
    meta = {
        "source": source,
        "objective": "clm" if cfg.causal else "mlm",
        "model_config": dataclasses.asdict(cfg),
        "transformers_version": transformers.__version__,
    }
    weights = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"state": {"model": weights, "timestamp": {"Timestamp": zero}, "integrations": {"ettin_import": meta}},
            "rng": []}


def load_hf(source: str):
    """The HF model in `source` (fp32, SDPA, eval), with the decoder's declared local RoPE theta in force."""
    from transformers import AutoConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin_train.checkpoint.hf import patch_decoder_local_rope

    config = AutoConfig.from_pretrained(source)
    classes = {"modernbert": ModernBertForMaskedLM, "modernbert-decoder": ModernBertDecoderForCausalLM}
    if config.model_type not in classes:
        raise ValueError(f"{source} holds a {config.model_type!r} model, not ModernBERT (modernbert or modernbert-decoder)")
    hf_model = classes[config.model_type].from_pretrained(source, torch_dtype=torch.float32, attn_implementation="sdpa")
    if config.model_type == "modernbert-decoder":
        # transformers 4.57 runs the decoder's local layers at the global theta; config.json declares the trained one.
        patch_decoder_local_rope(hf_model)
    return hf_model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="folder (or Hub name) of a ModernBertForMaskedLM / ModernBertDecoderForCausalLM")
    parser.add_argument("out", help="checkpoint file to write (.pt); never overwritten")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"{PROG}: {out} already exists; refusing to overwrite it", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"{PROG}: folder {out.parent} does not exist", file=sys.stderr)
        return 2

    from ettin_train.checkpoint.hf import from_hf

    try:
        hf_model = load_hf(args.hf_dir)
    except (OSError, ValueError) as err:
        print(f"{PROG}: cannot load {args.hf_dir}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    model = from_hf(hf_model)
    checkpoint = build_checkpoint(model, args.hf_dir)
    try:
        with open(out, "xb") as f:  # exclusive: fails rather than replace a file that appeared meanwhile
            torch.save(checkpoint, f)
    except FileExistsError:
        print(f"{PROG}: {out} already exists; refusing to overwrite it", file=sys.stderr)
        return 2
    except BaseException:
        out.unlink(missing_ok=True)
        raise

    cfg = model.config
    print(f"wrote {out}: {type(hf_model).__name__} from {args.hf_dir} -> objective {'clm' if cfg.causal else 'mlm'}, "
          f"{len(checkpoint['state']['model'])} tensors, {model.num_params():,} parameters")
    print(f"  layers {cfg.num_layers}, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
          f"heads {cfg.num_heads}, vocab {cfg.vocab_size}, sliding_window {cfg.sliding_window}, "
          f"rope theta {cfg.rope_theta_global:g} global / {cfg.local_theta:g} local")
    if cfg.causal and cfg.local_theta != cfg.rope_theta_global:
        print(f"  note: local theta {cfg.local_theta:g} is what config.json declares; transformers 4.57 runs this "
              f"decoder's local layers at the global {cfg.rope_theta_global:g} (it ignores local_rope_theta)")
    if cfg.causal and hf_model.config.sliding_window == 64:  # transformers' default, local_attention=128
        print(f"  note: transformers' sliding_window {hf_model.config.sliding_window} counts the query itself, so this "
              f"folder runs local layers with {cfg.sliding_window // 2} previous tokens; Ettin trained decoders with "
              "64 (sliding_window 128). A phase loading this file uses its recipe's model.sliding_window.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
