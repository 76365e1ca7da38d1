"""Architecture settings of an Ettin model and the six published size presets.

The presets are the layer/hidden/intermediate/head shapes of the original configs
(`pretraining/configs/standard/<size>/`); every other value is shared by all 48 Ettin recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

# size name -> (num_layers, hidden_size, intermediate_size, num_heads). Head dim is 64 everywhere.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "17m": (7, 256, 384, 4),
    "32m": (10, 384, 576, 6),
    "68m": (19, 512, 768, 8),
    "150m": (22, 768, 1152, 12),
    "400m": (28, 1024, 2624, 16),
    "1b": (28, 1792, 3840, 28),
}

ATTENTION_BACKENDS = ("auto", "varlen", "fa4", "flash", "flex", "sdpa")


@dataclass
class ModelConfig:
    """One Ettin model. `size` fills the four shape fields that are left unset."""

    size: Optional[str] = "17m"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_heads: Optional[int] = None
    vocab_size: int = 50368
    # Decoders attend causally and name their head `lm_head`; set from the objective, not by hand.
    causal: bool = False
    global_attn_every_n_layers: int = 3
    # Total window of local layers: each token sees sliding_window // 2 tokens on each side (causal: behind).
    sliding_window: int = 128
    rope_theta_global: float = 10000.0
    # None means "same as global": the original's `local_attn_rotary_emb_base: -1`.
    rope_theta_local: Optional[float] = None
    attn_out_dropout: float = 0.1
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_cutoff_factor: float = 2.0
    # The original built its embedding with padding_idx=0 (bert-base-uncased's pad id), so row 0 never
    # receives a gradient through the lookup. Kept for fidelity; set null to train row 0 normally.
    embedding_padding_idx: Optional[int] = 0
    # "auto": on CUDA in bf16/fp16 torch's varlen attention (torch >= 2.11), else flash-attn where
    # installed, else FlexAttention; per-sequence SDPA on CPU. "varlen", "fa4" (flash-attn-4 through
    # torch), "flash", "flex" or "sdpa" force one (docs/model.md).
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.size is not None:
            if self.size not in SIZES:
                raise ValueError(f"model.size: unknown size {self.size!r}; choose one of {', '.join(SIZES)}")
            preset = dict(zip(("num_layers", "hidden_size", "intermediate_size", "num_heads"), SIZES[self.size]))
            for name, value in preset.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads"):
            if getattr(self, name) is None:
                raise ValueError(f"model.{name}: missing (set model.size or give it explicitly)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}")
        if self.sliding_window < 2:
            raise ValueError(f"model.sliding_window must be at least 2 (a window of sliding_window // 2 each side), got {self.sliding_window}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend: {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def local_theta(self) -> float:
        return self.rope_theta_global if self.rope_theta_local is None else self.rope_theta_local

    def is_global_layer(self, layer_id: int) -> bool:
        return layer_id % self.global_attn_every_n_layers == 0

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
