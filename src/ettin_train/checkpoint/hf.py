"""Our Ettin model <-> transformers' ModernBERT classes (transformers 5.x; exported folders also load in 4.57).

    to_hf(model)      EttinModel -> ModernBertForMaskedLM (encoder) | ModernBertDecoderForCausalLM (decoder)
    from_hf(hf_model) the inverse; the returned EttinModel computes what `hf_model` computes
    hf_config(cfg)    the complete transformers config, for writing config.json

Keys (ours -> HF; the decoder class splits the fused Wqkv, whose rows are [q; k; v], each head-major):
    bert.embeddings.*                    -> model.embeddings.*
    bert.encoder.layers.{i}.*            -> model.layers.{i}.*
    bert.encoder.layers.{i}.attn.Wqkv    -> model.layers.{i}.attn.{q,k,v}_proj   (decoder only)
    bert.final_norm.*                    -> model.final_norm.*
    head.* (encoder) / lm_head.* (decoder), decoder.weight (tied), decoder.bias: unchanged

Where the classes differ from the training semantics, and what this module does:
  1. Decoder local window: HF keeps keys with `q - sliding_window < k <= q` (sliding_window keys including
     the query) and sets `sliding_window = local_attention // 2`; training sees sliding_window // 2 previous
     tokens plus the query. So the decoder is written with local_attention = 2 * (sliding_window // 2 + 1)
     (130 for Ettin's 128), which gives 65 keys as in training. The encoder's rule |q - k| <= local_attention // 2
     already matches training, so the encoder keeps local_attention = sliding_window. (Same in 4.57 and 5.x.)
  2. RoPE thetas: 5.x reads `rope_parameters` per layer type (full_attention / sliding_attention) and honours
     the local theta in both classes. 4.57 reads `global_rope_theta` / `local_rope_theta` (and the encoder
     `global_attn_every_n_layers`), so config.json carries those too (`hf_config`).
  3. transformers 4.57's decoder builds both rotary embeddings from the global theta, ignoring
     `local_rope_theta`: a 4.57 user of a decoder whose thetas differ (the 17m extension; the 17m, 32m, 68m and
     400m decays) must call `patch_decoder_local_rope(model)` after from_pretrained. On 5.x it is not needed:
     the function only checks that the local layers already run at the local theta.
  4. ModernBERT's own converter wrote local_rope_theta = -1 (NaN logits): both thetas are always written as
     numbers here.
"""

from __future__ import annotations

import re

import torch
from transformers import (
    ModernBertConfig,
    ModernBertDecoderConfig,
    ModernBertDecoderForCausalLM,
    ModernBertForMaskedLM,
)
try:  # transformers 5.x
    from transformers.initialization import no_init_weights
except ImportError:  # 4.5x
    from transformers.modeling_utils import no_init_weights

from ettin_train.model.config import ModelConfig
from ettin_train.model.ettin import EttinModel

# The ModernBERT tokenizer's ids, which every Ettin model uses.
ETTIN_TOKEN_IDS = dict(pad_token_id=50283, bos_token_id=50281, eos_token_id=50282,
                       cls_token_id=50281, sep_token_id=50282, mask_token_id=50284)


def hf_config(
    cfg: ModelConfig,
    *,
    pad_token_id: int = 50283,
    bos_token_id: int = 50281,
    eos_token_id: int = 50282,
    cls_token_id: int = 50281,
    sep_token_id: int = 50282,
    mask_token_id: int = 50284,
    max_position_embeddings: int = 8192,
    attn_implementation: str | None = "sdpa",
    **extra,
) -> ModernBertConfig | ModernBertDecoderConfig:
    """The complete transformers config of `cfg`, for inference (no dropout). `extra` goes to the config
    as is (e.g. sparse_prediction=True). `hf_config(cfg).to_dict()` is what config.json holds."""
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
               cls_token_id=cls_token_id, sep_token_id=sep_token_id, mask_token_id=mask_token_id)
    for name, value in ids.items():
        if not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary (vocab_size {cfg.vocab_size})")
    half = cfg.sliding_window // 2
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        hidden_activation="gelu", classifier_activation="gelu",  # exact (erf) GELU, as nn.GELU()
        max_position_embeddings=max_position_embeddings,
        initializer_range=cfg.init_std, initializer_cutoff_factor=cfg.init_cutoff_factor,
        norm_eps=cfg.norm_eps, norm_bias=False, attention_bias=False, mlp_bias=False, classifier_bias=False,
        decoder_bias=True, tie_word_embeddings=True,
        attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0,
        layer_types=["full_attention" if cfg.is_global_layer(i) else "sliding_attention" for i in range(cfg.num_layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": float(cfg.rope_theta_global)},
                         "sliding_attention": {"rope_type": "default", "rope_theta": float(cfg.local_theta)}},
        attn_implementation=attn_implementation, **ids,
    )
    if cfg.causal:
        local_attention = 2 * (half + 1)  # HF: sliding_window = local_attention // 2 keys including the query
        config = ModernBertDecoderConfig(**common, local_attention=local_attention,
                                         architectures=["ModernBertDecoderForCausalLM"], **extra)
        assert config.sliding_window == half + 1
    else:
        config = ModernBertConfig(**common, local_attention=cfg.sliding_window,
                                  architectures=["ModernBertForMaskedLM"], **extra)
    # What transformers 4.57 reads instead of layer_types / rope_parameters (5.x ignores these on load).
    config.global_attn_every_n_layers = cfg.global_attn_every_n_layers
    config.global_rope_theta = float(cfg.rope_theta_global)
    config.local_rope_theta = float(cfg.local_theta)
    return config


def _ours_to_hf_key(key: str) -> str:
    key = re.sub(r"^bert\.encoder\.layers\.", "model.layers.", key)
    return re.sub(r"^bert\.", "model.", key)


def _hf_to_ours_key(key: str) -> str:
    key = re.sub(r"^model\.layers\.", "bert.encoder.layers.", key)
    return re.sub(r"^model\.", "bert.", key)


def _inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def rope_thetas(config) -> tuple[float, float]:
    """(global, local) RoPE theta that a transformers 5.x ModernBERT config runs."""
    params = config.rope_parameters
    return float(params["full_attention"]["rope_theta"]), float(params["sliding_attention"]["rope_theta"])


def _local_inv_freq(hf_model) -> torch.Tensor:
    """The inverse frequencies the model's local (sliding-window) layers really use."""
    rotary = hf_model.model.rotary_emb
    if hasattr(rotary, "sliding_attention_inv_freq"):  # 5.x: one table per layer type
        return rotary.sliding_attention_inv_freq.detach().cpu().float()
    if not any(t == "sliding_attention" for t in hf_model.config.layer_types):  # no local layers at all
        return _inv_freq(rope_thetas(hf_model.config)[1], hf_model.config.hidden_size // hf_model.config.num_attention_heads)
    raise RuntimeError(f"{type(rotary).__name__} has no sliding_attention table: an unsupported transformers version")


def patch_decoder_local_rope(hf_model: ModernBertDecoderForCausalLM) -> ModernBertDecoderForCausalLM:
    """For transformers 4.57 users only, whose ModernBertDecoder builds its local rotary embedding from the
    global theta. transformers 5.x honours the local theta, so here this checks that the local layers run
    at `rope_parameters["sliding_attention"]` and returns the model unchanged; it raises if they do not.
    (The 4.57 recipe, without ettin-train, is in docs/export.md.)"""
    config = hf_model.config
    local = rope_thetas(config)[1]
    head_dim = config.hidden_size // config.num_attention_heads
    if not torch.allclose(_local_inv_freq(hf_model), _inv_freq(local, head_dim), rtol=1e-6, atol=0):
        raise RuntimeError(f"this decoder's local layers do not run at its local RoPE theta {local:g}; "
                           "on transformers 4.57 use the patch in docs/export.md")
    return hf_model


def to_hf(
    model: EttinModel,
    *,
    attn_implementation: str | None = "sdpa",
    **config_kwargs,
) -> ModernBertForMaskedLM | ModernBertDecoderForCausalLM:
    """A transformers model (fp32, CPU, eval mode) holding a copy of `model`'s weights.

    config_kwargs go to hf_config (token ids, max_position_embeddings, extra config fields)."""
    cfg = model.config
    config = hf_config(cfg, attn_implementation=attn_implementation, **config_kwargs)
    cls = ModernBertDecoderForCausalLM if cfg.causal else ModernBertForMaskedLM
    with no_init_weights():  # every parameter is overwritten below
        hf_model = cls(config)
    hf_model.tie_weights()
    if not torch.equal(_local_inv_freq(hf_model), _inv_freq(cfg.local_theta, cfg.head_dim)):
        raise RuntimeError(f"transformers built the local rotary table of {cls.__name__} from another theta "
                           f"than {cfg.local_theta:g}")

    ours = model.state_dict()
    state = {}
    for key, value in ours.items():
        value = value.detach().to("cpu", torch.float32)
        hf_key = _ours_to_hf_key(key)
        if cfg.causal and hf_key.endswith(".attn.Wqkv.weight"):
            prefix = hf_key.removesuffix("Wqkv.weight")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                state[f"{prefix}{name}.weight"] = part.clone()
        else:
            state[hf_key] = value.clone()
    hf_model.load_state_dict(state, strict=True)
    if hf_model.decoder.weight is not hf_model.model.embeddings.tok_embeddings.weight:
        raise RuntimeError("transformers did not tie decoder.weight to the token embeddings")
    return hf_model.eval()


def from_hf(hf_model: ModernBertForMaskedLM | ModernBertDecoderForCausalLM, **overrides) -> EttinModel:
    """An EttinModel (fp32, CPU) with `hf_model`'s weights that computes what `hf_model` computes.

    The architecture comes from hf_model's config (layer_types, rope_parameters), with the HF window rules
    translated to ours. `overrides` replace ModelConfig fields afterwards (e.g. sliding_window=128)."""
    config = hf_model.config
    causal = isinstance(hf_model, ModernBertDecoderForCausalLM)
    if not causal and not isinstance(hf_model, ModernBertForMaskedLM):
        raise TypeError(f"from_hf needs ModernBertForMaskedLM or ModernBertDecoderForCausalLM, got {type(hf_model).__name__}")
    unsupported = {
        "norm_bias": config.norm_bias, "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias,
        "classifier_bias": config.classifier_bias, "decoder_bias": not config.decoder_bias,
        "tie_word_embeddings": not config.tie_word_embeddings,
        "hidden_activation": config.hidden_activation != "gelu",
        "classifier_activation": config.classifier_activation != "gelu",
        "rope scaling": any(p.get("rope_type", "default") != "default" for p in config.rope_parameters.values()),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"the Ettin architecture has no equivalent of this model's {', '.join(bad)} setting(s)")

    layer_types = list(config.layer_types)
    n = layer_types.index("full_attention", 1) if layer_types.count("full_attention") > 1 else len(layer_types)
    expected = ["full_attention" if i % n == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if layer_types != expected:
        raise ValueError(f"layer_types {layer_types} are not 'global every n layers from layer 0'")
    head_dim = config.hidden_size // config.num_attention_heads
    global_theta, local_theta = rope_thetas(config)
    if not torch.allclose(_local_inv_freq(hf_model), _inv_freq(local_theta, head_dim), rtol=1e-6, atol=0):
        raise ValueError(f"the local rotary table of this {type(hf_model).__name__} does not match its config's "
                         f"local theta {local_theta:g}")
    # HF decoder: sliding_window keys including the query -> ours: sliding_window // 2 keys before it.
    sliding_window = 2 * (config.sliding_window - 1) if causal else config.local_attention
    cfg = ModelConfig(
        size=None, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=config.num_attention_heads,
        vocab_size=config.vocab_size, causal=causal, global_attn_every_n_layers=n,
        sliding_window=sliding_window, rope_theta_global=global_theta,
        rope_theta_local=None if local_theta == global_theta else local_theta,
        norm_eps=config.norm_eps, init_std=config.initializer_range,
        init_cutoff_factor=config.initializer_cutoff_factor,
    ).replace(**overrides)

    hf_state = {k: v.detach().to("cpu", torch.float32) for k, v in hf_model.state_dict().items()}
    state = {}
    for hf_key, value in hf_state.items():
        key = _hf_to_ours_key(hf_key)
        if causal and key.endswith((".attn.k_proj.weight", ".attn.v_proj.weight")):
            continue
        if causal and key.endswith(".attn.q_proj.weight"):
            prefix = hf_key.removesuffix("q_proj.weight")
            value = torch.cat([hf_state[f"{prefix}{p}_proj.weight"] for p in "qkv"])
            key = key.removesuffix("q_proj.weight") + "Wqkv.weight"
        state[key] = value.clone()
    model = EttinModel(cfg)
    model.load_state_dict(state, strict=True)
    return model
