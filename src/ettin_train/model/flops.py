"""Model FLOPs of a training step, for MFU (model FLOPs utilisation = training_flops / step time / peak)."""

from __future__ import annotations

from typing import Iterable

from ettin_train.model.config import ModelConfig


def training_flops(cfg: ModelConfig, seq_lens: Iterable[int], predicted: int) -> int:
    """FLOPs of one forward + backward pass over a batch, counting only work the model needs.

    seq_lens:  real (non-padding) tokens of each sequence; padding costs nothing (the layers run unpadded).
    predicted: positions that go through the prediction head and the vocabulary projection
               (MLM: the masked positions; CLM: the positions with a label, i.e. real tokens minus one per
               sequence when the last token of each sequence has no target).

    With H = hidden size, I = intermediate size, V = vocabulary, L = layers, T = sum(seq_lens), M = predicted,
    and a backward pass costing twice the forward (so training = 3 x forward = 6 x multiply-adds):

        layers     6 * L * (4 H^2 + 3 H I) * T          Wqkv 3H^2 + Wo H^2, GLU Wi 2HI + Wo IH, per real token
        attention  12 * H * sum over layers and sequences of pairs(n)
                   QK^T and PV each take 2 H FLOPs per allowed (query, key) pair in the forward pass;
                   pairs(n) for a sequence of n real tokens (w = sliding_window // 2, T(m) = m (m + 1) / 2
                   for m > 0, else 0):
                       global, bidirectional  n^2                    global, causal  T(n)
                       local,  bidirectional  n^2 - 2 T(n - 1 - w)   local,  causal  T(n) - T(n - 1 - w)
                   (a local layer drops the pairs farther apart than w; causal keeps keys at or before the query)
        head       6 * (H^2 + H V) * M                  head.dense and the tied decoder, only where predicted

    Embedding lookups, norms, activations, softmax, biases and the loss are not counted, as is usual for MFU;
    neither is any recomputation a kernel does (flash-attn's backward) or masked work an SDPA kernel wastes.
    """
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    w = cfg.sliding_window // 2
    n_global = sum(1 for i in range(L) if cfg.is_global_layer(i))
    n_local = L - n_global

    def tri(m: int) -> int:
        return m * (m + 1) // 2 if m > 0 else 0

    tokens = global_pairs = local_pairs = 0
    for n in seq_lens:
        n = int(n)
        tokens += n
        if cfg.causal:
            global_pairs += tri(n)
            local_pairs += tri(n) - tri(n - 1 - w)
        else:
            global_pairs += n * n
            local_pairs += n * n - 2 * tri(n - 1 - w)

    layers = 6 * L * (4 * H * H + 3 * H * I) * tokens
    attention = 12 * H * (n_global * global_pairs + n_local * local_pairs)
    head = 6 * (H * H + H * V) * int(predicted)
    return layers + attention + head
