"""The Ettin architecture (FlexBERT as configured by every Ettin recipe), encoder and decoder in one class.

Parameter names are those of the original training code's state dict (`bert.embeddings.tok_embeddings`,
`bert.encoder.layers.{i}.attn.Wqkv`, `head.*` / `lm_head.*`, `decoder.*`), so raw checkpoints of the
original runs load without a key map.

The layers run on *unpadded* tokens: `Packed` holds the real tokens of a batch as one (tokens, hidden)
stream, so padding costs no FLOPs in projections, MLPs and norms. Attention is the only place that
needs sequence structure; it has these backends in one module:
  - "varlen": torch's own varlen flash attention (`torch.nn.attention.varlen.varlen_attn`, FA2 kernels
             inside torch) on the packed stream with cu_seqlens, causality and the window (CUDA, bf16/fp16;
             torch >= 2.11, whose varlen_attn takes `window_size`). A torch custom op, so compiled layers
             trace it whole;
  - "fa4":   the same op with torch's FlashAttention-4 implementation activated (needs the optional
             `flash-attn-4` package and a torch with `activate_flash_attention_impl`; Hopper/Blackwell);
  - "flash": flash-attn's varlen kernel on the packed stream (CUDA, bf16/fp16);
  - "flex":  PyTorch FlexAttention on the packed stream with a block-sparse mask built from the sequence
             boundaries and the window (compiled kernel on CUDA; the unfused reference on CPU, for tests);
  - "sdpa":  PyTorch scaled_dot_product_attention; on CPU one sequence at a time (local layers in
             window-sized blocks), on GPU on a re-padded view with a boolean mask.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ettin_train.model.config import ModelConfig

try:  # optional GPU extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:  # torch >= 2.10; only 2.11 and later take window_size (2.10's takes is_causal alone)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None
# The local layers need the window, so a varlen_attn without window_size counts as missing.
VARLEN_WINDOW = varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters

FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def fa4_available() -> bool:
    """flash-attn-4 installed and a torch that can route its flash kernels to it."""
    try:
        from torch.nn.attention import activate_flash_attention_impl  # noqa: F401
        import flash_attn.cute  # noqa: F401 - the optional flash-attn-4 package
    except Exception:  # noqa: BLE001 - missing, or its CuTe DSL runtime fails to load: then it does not run here
        return False
    return VARLEN_WINDOW


def activate_fa4() -> None:
    """Route torch's flash-attention kernels (varlen_attn's included) to FlashAttention-4. Process-wide:
    every later flash SDPA call in this process runs FA4 too, so it is done only when a model asks for fa4."""
    from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl

    if current_flash_attention_impl() != "FA4":
        activate_flash_attention_impl("FA4")

_compiled_flex = None


def _flex_kernel(on_cuda: bool):
    """flex_attention runs as a fused kernel only when compiled; uncompiled it materialises the scores."""
    global _compiled_flex
    if not on_cuda:
        return flex_attention
    if _compiled_flex is None:  # token counts vary per batch: let dynamo mark them dynamic, not recompile each
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


@dataclass
class Packed:
    """Where the real tokens of a right- (or left-) padded batch live, and per-batch caches."""

    indices: torch.Tensor  # (tokens,) flat positions in the (batch * seq) grid
    positions: torch.Tensor  # (tokens,) position of each token within its sequence
    cu_seqlens: torch.Tensor  # (batch + 1,) int32 sequence boundaries in the packed stream
    max_seqlen: int
    batch: int
    seqlen: int
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Packed":
        mask = attention_mask.bool()
        lengths = mask.sum(1, dtype=torch.int32)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        indices = mask.flatten().nonzero().squeeze(1)  # a host sync (the token count), before any layer runs
        return cls(
            indices=indices,
            positions=(mask.cumsum(1) - 1).flatten()[indices],
            cu_seqlens=cu,
            max_seqlen=int(lengths.max()) if lengths.numel() else 0,
            batch=mask.shape[0],
            seqlen=mask.shape[1],
        )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (batch, seq, ...) with zeros at padding."""
        out = x.new_zeros(self.batch * self.seqlen, *x.shape[1:])
        return out.index_copy(0, self.indices, x).view(self.batch, self.seqlen, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.indices)

    def rope(self, theta: float, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", theta, dim, dtype)
        if key not in self._cache:
            inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=self.positions.device, dtype=torch.float32) / dim)
            freqs = self.positions.float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (tokens, 1, dim): broadcast over heads
            self._cache[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._cache[key]

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each sequence in the packed stream (one host sync per batch)."""
        if "spans" not in self._cache:
            cu = self.cu_seqlens.tolist()
            self._cache["spans"] = list(zip(cu[:-1], cu[1:]))
        return self._cache["spans"]

    def block_mask(self, n: int, half_window: int, causal: bool) -> torch.Tensor:
        """(blocks, 1, w, keys) boolean mask of `windowed_sdpa` for a sequence of n tokens."""
        key = ("blocks", n, half_window, causal)
        if key not in self._cache:
            w, device = half_window, self.indices.device
            span = 2 * w if causal else 3 * w  # keys per block: the blocks before (and after) and its own
            blocks = -(-n // w)
            rel = torch.arange(span, device=device)[None, :] - w - torch.arange(w, device=device)[:, None]
            allowed = (rel <= 0) & (rel >= -w) if causal else rel.abs() <= w  # (w, span): key - query
            key_pos = torch.arange(blocks, device=device)[:, None] * w - w + torch.arange(span, device=device)
            valid = (key_pos >= 0) & (key_pos < n)  # (blocks, span)
            # The padded queries of the last block keep their own key, so no row is empty.
            mask = (allowed[None] & valid[:, None, :]) | (rel == 0)[None]
            self._cache[key] = mask[:, None]
        return self._cache[key]

    def flex_mask(self, half_window: int, causal: bool):
        """FlexAttention BlockMask over the packed stream: same sequence, within the window, causal if asked.
        Tokens of one row are contiguous in the stream, so stream distance is position distance."""
        key = ("flex", half_window, causal)
        if key not in self._cache:
            row = self.indices // self.seqlen  # (tokens,) which sequence each token belongs to

            def allowed(b, h, q, k):
                keep = row[q] == row[k]
                if causal:
                    keep = keep & (k <= q)
                if half_window >= 0:
                    keep = keep & ((q - k).abs() <= half_window)
                return keep

            n = self.indices.numel()
            # Compiled, the mask is built block by block; uncompiled it evaluates all n^2 pairs (fine on CPU tests).
            try:
                self._cache[key] = create_block_mask(allowed, None, None, n, n, device=row.device, _compile=row.is_cuda)
            except TypeError:  # a torch without the private _compile flag
                self._cache[key] = create_block_mask(allowed, None, None, n, n, device=row.device)
        return self._cache[key]

    def sdpa_mask(self, half_window: int, causal: bool) -> torch.Tensor:
        """(batch, 1, seq, seq) boolean mask: True where a query may attend to a key."""
        key = ("mask", half_window, causal)
        if key not in self._cache:
            device = self.indices.device
            valid = torch.zeros(self.batch * self.seqlen, dtype=torch.bool, device=device)
            valid[self.indices] = True
            valid = valid.view(self.batch, self.seqlen)
            i = torch.arange(self.seqlen, device=device)
            rel = i[None, :] - i[:, None]  # key - query
            allowed = torch.ones_like(rel, dtype=torch.bool)
            if half_window >= 0:
                allowed &= rel.abs() <= half_window
            if causal:
                allowed &= rel <= 0
            mask = allowed[None, :, :] & valid[:, None, :] & valid[:, :, None]
            # Padding queries attend to themselves so no row is empty (an empty row gives NaN in SDPA).
            mask |= torch.eye(self.seqlen, dtype=torch.bool, device=device)[None]
            self._cache[key] = mask[:, None]
        return self._cache[key]


def windowed_sdpa(q, k, v, packed: Packed, n: int, half_window: int, causal: bool) -> torch.Tensor:
    """Sliding-window attention of one sequence, (heads, n, dim), in blocks: each block of w = half_window
    queries attends to the 3w keys of the blocks before, at and after it (causal: before and at), masked to
    |key - query| <= w. Costs n * 3w scores instead of n^2."""
    w = half_window
    h, _, d = q.shape
    blocks = -(-n // w)
    pad = blocks * w - n
    span, after = (2 * w, pad) if causal else (3 * w, pad + w)
    qb = F.pad(q, (0, 0, 0, pad)).view(h, blocks, w, d).transpose(0, 1)  # (blocks, heads, w, dim)
    kb, vb = (F.pad(t, (0, 0, w, after)).unfold(1, span, w).permute(1, 0, 3, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=packed.block_mask(n, w, causal))
    return out.transpose(0, 1).reshape(h, blocks * w, d)[:, :n]


def packed_sdpa(q, k, v, packed: Packed, half_window: int, causal: bool) -> torch.Tensor:
    """SDPA on the packed stream one sequence at a time: no padding and no (seq x seq) mask. Global layers
    run each sequence whole (`is_causal` for decoders); local layers run `windowed_sdpa`."""
    out = []
    for start, end in packed.spans():
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, n, dim)
        n = end - start
        if half_window < 0 or n <= half_window + 1:  # the window does not bind
            o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=causal)[0]
        else:
            o = windowed_sdpa(qs, ks, vs, packed, n, half_window, causal)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (GPT-NeoX) rotary embedding over the whole head dim, as the original."""
    return x * cos + rotate_half(x) * sin


def LayerNorm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=False)


class Attention(nn.Module):
    """Global layers see the whole sequence; local layers see sliding_window // 2 tokens each side."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.num_heads, self.head_dim, self.causal = cfg.num_heads, cfg.head_dim, cfg.causal
        is_global = cfg.is_global_layer(layer_id)
        self.half_window = -1 if is_global else cfg.sliding_window // 2
        self.rope_theta = cfg.rope_theta_global if is_global else cfg.local_theta
        self.backend = cfg.attention_backend
        self.resolved: str | None = None  # this batch's backend, set by prepare()
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.out_drop = nn.Dropout(cfg.attn_out_dropout)

    def prepare(self, packed: Packed, dtype: torch.dtype) -> None:
        """Build this batch's RoPE table and masks once per batch, before the layers run, so a compiled
        layer only reads them (no host sync, no cache filling inside the graph)."""
        packed.rope(self.rope_theta, self.head_dim, dtype)
        # Resolved here, eagerly: the availability checks (imports) must not run inside a compiled layer.
        backend = self.resolved = self._resolve_backend(packed.indices, dtype)
        if backend == "flex":
            packed.flex_mask(self.half_window, self.causal)
            _flex_kernel(packed.indices.is_cuda)  # create the compiled kernel outside the layer's graph
        elif backend == "fa4":
            activate_fa4()
        elif backend == "sdpa" and packed.indices.is_cuda:
            packed.sdpa_mask(self.half_window, self.causal)
        elif backend == "sdpa":
            for start, end in packed.spans():
                if 0 <= self.half_window < end - start - 1:  # the window binds: windowed_sdpa's block mask
                    packed.block_mask(end - start, self.half_window, self.causal)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        q, k, v = self.Wqkv(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = packed.rope(self.rope_theta, self.head_dim, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        backend = self.resolved if self.resolved is not None else self._resolve_backend(q, q.dtype)
        if backend in ("varlen", "fa4"):
            out = varlen_attn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen,
                              window_size=self.window_size())
        elif backend == "flash":
            out = flash_attn_varlen_func(
                q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen,
                causal=self.causal, window_size=(self.half_window, self.half_window),
            )
        elif backend == "flex":
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, tokens, dim)
            out = _flex_kernel(q.is_cuda)(q, k, v, block_mask=packed.flex_mask(self.half_window, self.causal))
            out = out[0].transpose(0, 1)
        elif not q.is_cuda:  # per sequence: cheaper than a padded batch with a (seq x seq) mask on CPU
            out = packed_sdpa(q, k, v, packed, self.half_window, self.causal)
        else:
            q, k, v = (packed.pad(t).transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.sdpa_mask(self.half_window, self.causal))
            out = packed.unpad(out.transpose(1, 2))
        return self.out_drop(self.Wo(out.reshape(x.shape[0], -1)))

    def window_size(self) -> tuple[int, int]:
        """(keys left, keys right) of a query in flash-attention's convention, -1 for unbounded: a decoder
        sees no key to its right; a local layer sees half_window each side."""
        return (self.half_window, 0 if self.causal else self.half_window)

    def _resolve_backend(self, t: torch.Tensor, dtype: torch.dtype) -> str:
        """auto on CUDA in bf16/fp16: torch's varlen attention, else flash-attn, else FlexAttention; CUDA in
        fp32: FlexAttention; CPU: per-sequence SDPA. An explicit backend that cannot run here is an error."""
        if self.backend == "auto":
            if not t.is_cuda:
                return "sdpa"
            return next(b for b in ("varlen", "flash", "flex") if backend_runs(b, t.device, dtype))
        if not backend_runs(self.backend, t.device, dtype):
            raise RuntimeError(f"model.attention_backend={self.backend} needs {BACKEND_NEEDS[self.backend]}, "
                               "a CUDA device and bf16/fp16 activations")
        return self.backend


BACKEND_NEEDS = {"varlen": "torch >= 2.11 (varlen_attn with window_size)",
                 "fa4": "the flash-attn-4 package and torch >= 2.11", "flash": "flash-attn"}


def backend_runs(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an attention backend can run on this device with these activations (flex and sdpa run anywhere;
    the flash kernels need CUDA and bf16/fp16)."""
    fast = device.type == "cuda" and dtype in FLASH_DTYPES
    return {"varlen": fast and VARLEN_WINDOW, "fa4": fast and fa4_available(),
            "flash": fast and flash_attn_varlen_func is not None}.get(backend, True)


class GLU(nn.Module):
    """GeGLU: Wi projects to 2 x intermediate, split into input and gate, Wo(gelu(input) * gate)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.act = nn.GELU()
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(inp) * gate)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        # The embedding output is already normalised, so the first layer skips its attention norm.
        self.attn_norm = nn.Identity() if layer_id == 0 else LayerNorm(cfg)
        self.attn = Attention(cfg, layer_id)
        self.mlp_norm = LayerNorm(cfg)
        self.mlp = GLU(cfg)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), packed)
        return x + self.mlp(self.mlp_norm(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.embedding_padding_idx)
        self.norm = LayerNorm(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))})
        self.final_norm = LayerNorm(cfg)

    def forward(self, input_ids: torch.Tensor, packed: Packed) -> torch.Tensor:
        x = self.embeddings(input_ids.flatten()[packed.indices])
        # Fill the batch's caches here, outside any compiled layer, in the dtype the projections will have.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        for layer in self.encoder["layers"]:
            layer.attn.prepare(packed, dtype)
        for layer in self.encoder["layers"]:
            x = layer(x, packed)
        return self.final_norm(x)


class PredictionHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.act = nn.GELU()
        self.norm = LayerNorm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class EttinModel(nn.Module):
    """Backbone + prediction head + output projection tied to the token embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.bert = Backbone(cfg)
        # The original names the head `lm_head` in its causal class and `head` in its masked-LM class.
        self.head_name = "lm_head" if cfg.causal else "head"
        self.add_module(self.head_name, PredictionHead(cfg))
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        self.decoder.weight = self.bert.embeddings.tok_embeddings.weight
        self.reset_parameters()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               packed: Packed | None = None) -> tuple[torch.Tensor, Packed]:
        """Final hidden states of the real tokens, (tokens, hidden), and where they sit in the batch.
        `packed`: the batch's Packed when the caller built it already (Packed.from_mask(attention_mask))."""
        packed = Packed.from_mask(attention_mask) if packed is None else packed
        return self.bert(input_ids, packed), packed

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for the given hidden states (only call it on the positions you score)."""
        return self.decoder(getattr(self, self.head_name)(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position, (batch, seq, vocab), zeros at padding. For inference and tests."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, packed = self.encode(input_ids, attention_mask)
        return packed.pad(self.predict(hidden))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """`full_megatron`: truncated normal (+-2 std); output projections scaled by 1/sqrt(2 * layers)."""
        cfg = self.config
        std = cfg.init_std
        out_std = std / math.sqrt(2.0 * cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.decoder:
                s = out_std if name.endswith(".Wo") else std
                nn.init.trunc_normal_(module.weight, std=s, a=-cfg.init_cutoff_factor * s, b=cfg.init_cutoff_factor * s)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std, a=-cfg.init_cutoff_factor * std, b=cfg.init_cutoff_factor * std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.decoder.bias)

    def compile_layers(self, backend: str = "inductor", fullgraph: bool = True) -> None:
        """torch.compile each layer; the per-batch mask and RoPE building stays eager (Backbone.forward).
        fullgraph (the default): a graph break is an error, not a silent slowdown. Every attention backend
        traces whole: varlen_attn is a custom op, FlexAttention a higher-order op, the CPU SDPA path plain
        tensor code on masks built in prepare(). FSDP2 puts its hooks on the layers, inside the compiled
        call, so parallel.prepare turns fullgraph off there. Layers differ in window and first-layer norm, and
        the token count varies per batch, so a model needs a handful of graph variants: raise dynamo's
        per-function limit so none falls back to eager. backend: aot_eager for CPU tests (no code generation)."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in self.bert.encoder["layers"]:
            layer.compile(backend=backend, fullgraph=fullgraph)

    def num_params(self) -> int:
        """Unique parameters: the tied decoder weight counts once, its bias counts."""
        return sum(p.numel() for p in self.parameters())
