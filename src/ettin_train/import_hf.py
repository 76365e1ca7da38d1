"""`python -m ettin_train.import_hf HF_DIR OUT.pt` (also `ettin-import`): an HF ModernBERT model -> a checkpoint
that a phase can start from.

HF_DIR is a local folder (or a Hub name, where the network allows) holding a `ModernBertForMaskedLM` or a
`ModernBertDecoderForCausalLM`. OUT.pt gets Composer's layout with the original key names:
    {'state': {'model': {'model.<key>': tensor}, 'timestamp': {'Timestamp': {... all 0}},
               'integrations': {'ettin_import': {source, objective, phase, tokenizer, model_config,
                                                  transformers_version}}},
     'rng': []}
`model_config` is the complete ModelConfig read off the transformers config (sizes, both RoPE thetas, the window,
the global-layer pattern, causal), so `ettin-export` exports it with exactly these settings; `phase` is the
config's `ettin_phase` (our own exports carry one), else null (ettin-export then asks --phase for the tag).
A phase that starts from OUT.pt takes the architecture, the clock and the optimizer from its recipe.
An existing OUT.pt is never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import torch

PROG = "ettin-import"


def build_checkpoint(model, source: str, phase: str | None = None, tokenizer: str | None = None) -> dict:
    """The Composer-layout checkpoint dict of an EttinModel (weights, a zero clock, metadata)."""
    cfg = model.config
    import transformers

    zero = {k: 0 for k in ("iteration", "epoch", "batch", "sample", "token", "epoch_in_iteration",
                           "token_in_iteration", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")}
    zero.update({k: datetime.timedelta(0) for k in ("total_wct", "iteration_wct", "epoch_wct", "batch_wct")})
    meta = {
        "source": source,
        "objective": "clm" if cfg.causal else "mlm",
        "phase": phase,
        "tokenizer": tokenizer,
        "model_config": dataclasses.asdict(cfg),
        "transformers_version": transformers.__version__,
    }
    weights = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"state": {"model": weights, "timestamp": {"Timestamp": zero}, "integrations": {"ettin_import": meta}},
            "rng": []}


def load_hf(source: str):
    """The HF model in `source` (fp32, SDPA, eval); its local layers checked to run at the declared local theta."""
    from transformers import AutoConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin_train.checkpoint.hf import patch_decoder_local_rope

    config = AutoConfig.from_pretrained(source)
    classes = {"modernbert": ModernBertForMaskedLM, "modernbert-decoder": ModernBertDecoderForCausalLM}
    if config.model_type not in classes:
        raise ValueError(f"{source} holds a {config.model_type!r} model, not ModernBERT (modernbert or modernbert-decoder)")
    hf_model = classes[config.model_type].from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
    if config.model_type == "modernbert-decoder":
        patch_decoder_local_rope(hf_model)  # transformers 5: a check that the local theta is in force
    return hf_model.eval()


def _phase_of(hf_model) -> str | None:
    """The phase our own exports record in config.json (`ettin_phase`), if any."""
    from ettin_train.phases import NAMES

    phase = getattr(hf_model.config, "ettin_phase", None)
    return phase if phase in NAMES else None


def _tokenizer_of(source: str) -> str | None:
    """`source` when it holds a tokenizer the exporter can copy (a local folder with tokenizer files, or a Hub name)."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    return source if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None


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
    checkpoint = build_checkpoint(model, args.hf_dir, _phase_of(hf_model), _tokenizer_of(args.hf_dir))
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
          f"a global layer every {cfg.global_attn_every_n_layers}, rope theta {cfg.rope_theta_global:g} global / "
          f"{cfg.local_theta:g} local")
    phase = checkpoint["state"]["integrations"]["ettin_import"]["phase"]
    print(f"  phase {phase} (config.json's ettin_phase)" if phase else
          "  phase: not in config.json (ettin-export asks --phase to name the tag)")
    if cfg.causal and hf_model.config.sliding_window == 64:  # transformers' default, local_attention=128
        print(f"  note: transformers' sliding_window {hf_model.config.sliding_window} counts the query itself, so this "
              f"folder runs local layers with {cfg.sliding_window // 2} previous tokens; Ettin trained decoders with "
              "64 (sliding_window 128). A phase loading this file uses its recipe's model.sliding_window.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
