"""Our Ettin model <-> transformers' ModernBERT classes (checked against transformers 4.57.6).

    to_hf(model)      EttinModel -> ModernBertForMaskedLM (encoder) | ModernBertDecoderForCausalLM (decoder)
    from_hf(hf_model) the inverse; the returned EttinModel computes what `hf_model` computes
    hf_config(cfg)    the complete transformers config, for writing config.json

Keys (ours -> HF; the decoder class splits the fused Wqkv, whose rows are [q; k; v], each head-major):
    bert.embeddings.*                    -> model.embeddings.*
    bert.encoder.layers.{i}.*            -> model.layers.{i}.*
    bert.encoder.layers.{i}.attn.Wqkv    -> model.layers.{i}.attn.{q,k,v}_proj   (decoder only)
    bert.final_norm.*                    -> model.final_norm.*
    head.* (encoder) / lm_head.* (decoder), decoder.weight (tied), decoder.bias: unchanged

Where the 4.57.6 classes differ from the training semantics, and what this module does:
  1. Decoder local window: HF keeps keys with `q - sliding_window < k <= q` (sliding_window keys including
     the query) and sets `sliding_window = local_attention // 2`; training sees sliding_window // 2 previous
     tokens plus the query. So the decoder is written with local_attention = 2 * (sliding_window // 2 + 1)
     (130 for Ettin's 128), which gives 65 keys as in training. The encoder's rule |q - k| <= local_attention // 2
     already matches training, so the encoder keeps local_attention = sliding_window.
  2. Decoder config round trip: ModernBertDecoderConfig does not store `local_attention`, so a saved and
     reloaded config falls back to 128 // 2 = 64. `local_attention` is set as an attribute so that config.json
     carries it (after from_pretrained it is gone again; hf_config/to_hf set it anew).
  3. Decoder local RoPE theta: ModernBertDecoderModel builds both rotary embeddings from `global_rope_theta`,
     so `local_rope_theta` is ignored. to_hf refuses such a decoder (local != global theta) unless
     patch_local_rope=True, which replaces the model's `local_rotary_emb` in memory (patch_decoder_local_rope).
     config.json still says the truth (both thetas), but a plain from_pretrained of it runs local layers at the
     global theta: whoever loads such a folder with 4.57.6 must call patch_decoder_local_rope again.
  4. ModernBERT's own converter wrote local_rope_theta = -1 (NaN logits): both thetas are always written as
     numbers here.
"""

from __future__ import annotations

import copy
import re
import warnings

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
        global_attn_every_n_layers=cfg.global_attn_every_n_layers,
        global_rope_theta=float(cfg.rope_theta_global), local_rope_theta=float(cfg.local_theta),
        attn_implementation=attn_implementation, **ids,
    )
    if not cfg.causal:
        return ModernBertConfig(**common, local_attention=cfg.sliding_window,
                                architectures=["ModernBertForMaskedLM"], **extra)
    local_attention = 2 * (half + 1)  # HF: sliding_window = local_attention // 2 keys including the query
    layer_types = ["full_attention" if cfg.is_global_layer(i) else "sliding_attention" for i in range(cfg.num_layers)]
    config = ModernBertDecoderConfig(**common, local_attention=local_attention, layer_types=layer_types,
                                     architectures=["ModernBertDecoderForCausalLM"], **extra)
    config.local_attention = local_attention  # not stored by the class: without it config.json reloads as 64
    assert config.sliding_window == half + 1
    return config


def _ours_to_hf_key(key: str) -> str:
    key = re.sub(r"^bert\.encoder\.layers\.", "model.layers.", key)
    return re.sub(r"^bert\.", "model.", key)


def _hf_to_ours_key(key: str) -> str:
    key = re.sub(r"^model\.layers\.", "bert.encoder.layers.", key)
    return re.sub(r"^model\.", "bert.", key)


def _inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def patch_decoder_local_rope(hf_model: ModernBertDecoderForCausalLM) -> ModernBertDecoderForCausalLM:
    """Rebuild the decoder's local rotary embedding from `config.local_rope_theta` (4.57.6 builds it from the
    global theta). In place; a no-op when the two thetas are equal. Also restores `config.local_attention`."""
    config = hf_model.config
    config.local_attention = 2 * config.sliding_window
    inner = hf_model.model
    local_config = copy.deepcopy(config)
    local_config.global_rope_theta = config.local_rope_theta  # `rope_theta` maps to global_rope_theta
    rotary = type(inner.local_rotary_emb)(config=local_config, device=inner.local_rotary_emb.inv_freq.device)
    inner.local_rotary_emb = rotary
    return hf_model


def to_hf(
    model: EttinModel,
    *,
    patch_local_rope: bool = False,
    attn_implementation: str | None = "sdpa",
    **config_kwargs,
) -> ModernBertForMaskedLM | ModernBertDecoderForCausalLM:
    """A transformers model (fp32, CPU, eval mode) holding a copy of `model`'s weights.

    config_kwargs go to hf_config (token ids, max_position_embeddings, extra config fields). A decoder whose
    local theta differs from its global theta raises unless patch_local_rope=True (see the module docstring)."""
    cfg = model.config
    config = hf_config(cfg, attn_implementation=attn_implementation, **config_kwargs)
    cls = ModernBertDecoderForCausalLM if cfg.causal else ModernBertForMaskedLM
    with no_init_weights():  # every parameter is overwritten below
        hf_model = cls(config)
    hf_model.tie_weights()

    if cfg.causal and not torch.equal(hf_model.model.local_rotary_emb.inv_freq.cpu(),
                                      _inv_freq(cfg.local_theta, cfg.head_dim)):
        if not patch_local_rope:
            raise ValueError(
                f"this decoder was trained with local RoPE theta {cfg.local_theta:g} and global {cfg.rope_theta_global:g}, "
                "but transformers' ModernBertDecoderForCausalLM builds its local rotary embedding from the global "
                "theta, so a plain from_pretrained of the export would not reproduce it. Pass patch_local_rope=True "
                "and load the export with ettin_train.checkpoint.hf.patch_decoder_local_rope(model) after from_pretrained"
            )
        patch_decoder_local_rope(hf_model)

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

    The architecture comes from hf_model's config, with the HF window rules translated to ours, and for the
    decoder the local theta its local rotary embedding really uses (with a warning when that is not the
    config's local_rope_theta). `overrides` replace ModelConfig fields afterwards (e.g. sliding_window=128)."""
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
        "rope_scaling": bool(getattr(config, "rope_scaling", None)),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"the Ettin architecture has no equivalent of this model's {', '.join(bad)} setting(s)")

    n = config.global_attn_every_n_layers
    head_dim = config.hidden_size // config.num_attention_heads
    global_theta = float(config.global_rope_theta)
    local_theta = float(config.local_rope_theta if config.local_rope_theta is not None else global_theta)
    if causal:
        expected = ["full_attention" if i % n == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != expected:
            raise ValueError(f"layer_types {config.layer_types} are not 'global every {n} layers from layer 0'")
        # HF: sliding_window keys including the query -> ours: sliding_window // 2 keys before it.
        sliding_window = 2 * (config.sliding_window - 1)
        used = hf_model.model.local_rotary_emb.inv_freq.detach().cpu().float()
        if not torch.allclose(used, _inv_freq(local_theta, head_dim), rtol=1e-6, atol=0):
            if not torch.allclose(used, _inv_freq(global_theta, head_dim), rtol=1e-6, atol=0):
                raise ValueError("the decoder's local rotary embedding matches neither of its config's thetas")
            warnings.warn(f"config.local_rope_theta is {local_theta:g}, but this ModernBertDecoder's local layers run at "
                          f"the global theta {global_theta:g} (transformers ignores local_rope_theta); imported as "
                          "they run. Call patch_decoder_local_rope(model) first to import the declared theta.")
            local_theta = global_theta
    else:
        sliding_window = config.local_attention
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
