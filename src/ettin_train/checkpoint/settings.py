"""Which model a checkpoint holds, and where each of its settings comes from.

A checkpoint says what it is in one of three records (`read_record`):
  - `state.callbacks.RunMetadata`, written by our trainer into every checkpoint (phase, objective, the whole model
    config, the tokenizer);
  - `state.integrations.ettin_import`, written by `ettin-import` from the transformers config (objective, the whole
    model config, the phase when that config names one);
  - `state.integrations.huggingface.model.config`, written by Composer into the original Ettin runs' checkpoints:
    FlexBERT's config (`rotary_emb_base`, `local_attn_rotary_emb_base`, `sliding_window`, ...; no phase).
`resolve` takes every value that decides the model from the record; a value the record lacks comes from the
exporter's flag, else from the recipes' table (checkpoint/recipe_table.py: size from the weights' shapes, objective
from the head keys, phase from --phase); where neither can say, it refuses and names the flag to pass. A flag that
contradicts the record is refused with both values. The shapes always come from the weights, and a record that
disagrees with them is refused too. `recorded_config` is the model of the record alone, for the export's check.

Nothing here imports Composer or transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ettin_train.checkpoint.recipe_table import TABLE
from ettin_train.model.config import SIZES, ModelConfig
from ettin_train.phases import phase as phase_named

HEAD_DIM = 64  # every Ettin size; FlexBERT checkpoints record their heads, ours record the whole config
# The settings that decide the model besides its shapes, and the exporter flag that gives each.
FLAGS = {"rope_theta_global": "--rope-theta-global", "rope_theta_local": "--rope-theta-local",
         "sliding_window": "--sliding-window", "global_attn_every_n_layers": "--global-every"}
SHAPES = ("num_layers", "hidden_size", "intermediate_size", "vocab_size", "causal")
DECIDING = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "vocab_size", "causal", *FLAGS)


class SettingsError(ValueError):
    """The checkpoint, the flags and the table cannot give one model: one line naming the value and the flag."""


@dataclass
class Record:
    """What a checkpoint records about itself. `model` has only the fields the record holds, with
    rope_theta_local always a number (the theta the local layers run at)."""

    source: str
    model: dict
    objective: str | None = None
    phase: str | None = None
    tokenizer: str | None = None


@dataclass
class Settings:
    config: ModelConfig
    objective: str
    phase: str
    tokenizer: str | None
    record: Record | None
    sources: dict[str, str] = field(default_factory=dict)  # field -> where its value came from

    def lines(self) -> list[str]:
        """One line per value that decides the export: `name = value (source)`."""
        values = {name: getattr(self.config, name) for name in DECIDING} | {"objective": self.objective, "phase": self.phase}
        values["rope_theta_local"] = self.config.local_theta
        return [f"  {name} = {fmt(value)}  ({self.sources[name]})" for name, value in values.items()]

    def all_recorded(self) -> bool:
        return self.record is not None and all(s == self.record.source for s in self.sources.values())


def fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _model_fields(model: dict) -> dict:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {k: v for k, v in model.items() if k in known}
    if "rope_theta_global" in out and out.get("rope_theta_local") is None:
        out["rope_theta_local"] = out["rope_theta_global"]  # None means "the same as global"
    return out


def _flexbert(content: dict, cls: str) -> dict:
    """Our fields from the FlexBERT config dict of an original run; only what it holds."""
    names = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_attention_heads": "num_heads", "vocab_size": "vocab_size", "sliding_window": "sliding_window",
             "global_attn_every_n_layers": "global_attn_every_n_layers", "rotary_emb_base": "rope_theta_global",
             "causal_mask": "causal"}
    model = {ours: content[theirs] for theirs, ours in names.items() if theirs in content}
    if cls.endswith("ForCausalLM"):
        model["causal"] = True
    elif cls.endswith("ForMaskedLM"):
        model.setdefault("causal", False)
    local = content.get("local_attn_rotary_emb_base")
    if local is not None and local != -1:  # FlexBERT's -1: local layers use rotary_emb_base
        model["rope_theta_local"] = local
    elif local == -1 and "rope_theta_global" in model:
        model["rope_theta_local"] = model["rope_theta_global"]
    for key in ("rope_theta_global", "rope_theta_local"):
        if key in model:
            model[key] = float(model[key])
    if "norm_kwargs" in content and "eps" in (content["norm_kwargs"] or {}):
        model["norm_eps"] = float(content["norm_kwargs"]["eps"])
    return model


def read_record(state: dict) -> Record | None:
    """The record a checkpoint's `state` holds (the first of RunMetadata, ettin_import, the original runs')."""
    meta = (state.get("callbacks") or {}).get("RunMetadata")
    if meta:
        return Record("RunMetadata", _model_fields(meta["model"]), meta.get("objective"), meta.get("phase"),
                      meta.get("tokenizer"))
    integrations = state.get("integrations") or {}
    imported = integrations.get("ettin_import")
    if imported:
        return Record(f"ettin-import of {imported.get('source')}", _model_fields(imported["model_config"]),
                      imported.get("objective"), imported.get("phase"), imported.get("tokenizer"))
    hf = ((integrations.get("huggingface") or {}).get("model") or {}).get("config") or {}
    if isinstance(hf.get("content"), dict):
        model = _flexbert(hf["content"], str(hf.get("class", "")))
        objective = None if "causal" not in model else ("clm" if model["causal"] else "mlm")
        return Record("the original run's config (integrations.huggingface)", model, objective) if model else None
    return None


def weight_shapes(weights: dict[str, torch.Tensor]) -> dict:
    """What the weights themselves say (original FlexBERT key names): layers, widths, vocabulary, which head."""
    try:
        vocab, hidden = weights["bert.embeddings.tok_embeddings.weight"].shape
        layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("bert.encoder.layers."))
        intermediate = weights["bert.encoder.layers.0.mlp.Wi.weight"].shape[0] // 2  # GLU: [input; gate]
    except (KeyError, ValueError, IndexError):
        raise SettingsError("the weights are not an Ettin model (no bert.embeddings.tok_embeddings / "
                            "bert.encoder.layers.*.mlp.Wi)") from None
    heads = {k.split(".")[0] for k in weights if k.startswith(("head.", "lm_head."))}
    if len(heads) != 1:
        raise SettingsError("the weights have neither head.* (encoder) nor lm_head.* (decoder)" if not heads
                            else "the weights have both head.* and lm_head.*")
    return dict(num_layers=layers, hidden_size=hidden, intermediate_size=intermediate, vocab_size=vocab,
                causal=heads == {"lm_head"})


def size_of(shapes: dict) -> str | None:
    """The Ettin size whose layers and widths these are (the vocabulary is not part of a size)."""
    key = (shapes["num_layers"], shapes["hidden_size"], shapes["intermediate_size"])
    return next((name for name, s in SIZES.items() if s[:3] == key), None)


def resolve(state: dict, weights: dict[str, torch.Tensor], *, phase: str | None = None,
            **flags: float | int | None) -> Settings:
    """The model, objective and phase of a checkpoint and where each value came from; `flags` are the
    exporter's (rope_theta_global, rope_theta_local, sliding_window, global_attn_every_n_layers), None when not given."""
    record = read_record(state)
    recorded = record.model if record else {}
    sources: dict[str, str] = {}
    values: dict = {}

    shapes = weight_shapes(weights)
    for name in SHAPES:
        if name in recorded and recorded[name] != shapes[name]:
            raise SettingsError(f"{record.source} records {name} {recorded[name]}, but the weights have {shapes[name]}")
        values[name], sources[name] = shapes[name], record.source if name in recorded else "the weights"
    if "num_heads" in recorded:
        values["num_heads"], sources["num_heads"] = recorded["num_heads"], record.source
    else:
        values["num_heads"], sources["num_heads"] = shapes["hidden_size"] // HEAD_DIM, f"head dim {HEAD_DIM} (every Ettin size)"

    objective = "clm" if shapes["causal"] else "mlm"
    sources["objective"] = "the head keys (lm_head: clm, head: mlm)"
    if record and record.objective:
        objective, sources["objective"] = record.objective, record.source

    given = phase_named(phase).name if phase else None
    recorded_phase = record.phase if record else None
    if recorded_phase and given and given != recorded_phase:
        raise SettingsError(f"--phase {phase} contradicts the phase {recorded_phase!r} that {record.source} records")
    final_phase = recorded_phase or given
    if not final_phase:
        what = f"{record.source} records no phase" if record else "the checkpoint records nothing (a checkpoint of the original runs?)"
        raise SettingsError(f"{what}: give --phase (pretrain, ext or decay) to name its tag")
    sources["phase"] = record.source if recorded_phase else "--phase"

    size = size_of(shapes)
    row_key = (size, "clm" if shapes["causal"] else "mlm", final_phase)
    for name, flag in FLAGS.items():
        value = flags.get(name)
        if name in recorded:
            if value is not None and value != recorded[name]:
                raise SettingsError(f"{flag} {fmt(value)} contradicts the checkpoint: {record.source} records "
                                    f"{name} {fmt(recorded[name])}")
            values[name], sources[name] = recorded[name], record.source
        elif value is not None:
            values[name], sources[name] = value, flag
        elif row_key in TABLE:
            values[name] = TABLE[row_key][list(FLAGS).index(name)]
            sources[name] = f"the recipes' table: {row_key[1]} {size} {final_phase} (yamls/{'decoder' if shapes['causal'] else 'encoder'}/{size}/{final_phase}.yaml)"
        else:
            raise SettingsError(f"the checkpoint records no {name} and its shape (layers {shapes['num_layers']}, hidden "
                                f"{shapes['hidden_size']}, intermediate {shapes['intermediate_size']}) is none of the "
                                f"Ettin sizes, so the recipes' table cannot say: give {flag}")

    cfg = _config(recorded | values)  # the record's other fields (norm_eps, init, ...) kept
    return Settings(cfg, objective, final_phase, record.tokenizer if record else None, record, sources)


def _config(fields: dict) -> ModelConfig:
    fields = dict(fields, size=None, attention_backend="sdpa")
    if fields.get("rope_theta_local") == fields.get("rope_theta_global"):
        fields["rope_theta_local"] = None
    return ModelConfig(**fields)


def recorded_config(record: Record | None) -> ModelConfig | None:
    """The model the record alone describes (no flags, no table, no inference), or None when the record
    does not hold every value that decides the model."""
    if record is None or any(name not in record.model for name in DECIDING):
        return None
    return _config(record.model)
