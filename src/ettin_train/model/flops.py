"""Model FLOPs of a training step, for MFU (model FLOPs utilisation = training_flops / step time / peak)."""

from __future__ import annotations

from typing import Iterable

import torch

from ettin_train.model.config import ModelConfig


def training_flops_tensor(cfg: ModelConfig, seq_lens: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """FLOPs of one forward + backward pass over a batch, counting only work the model needs.

    seq_lens:  real (non-padding) tokens of each sequence (an int64 tensor); padding costs nothing (the layers run unpadded).
    predicted: positions (a 0-d int64 tensor) that go through the prediction head and the vocabulary projection
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
    Tensor ops only, on the lengths' device, so the progress line counts a step without waiting for the GPU.
    """
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    w = cfg.sliding_window // 2
    n_global = sum(1 for i in range(L) if cfg.is_global_layer(i))
    n = seq_lens.to(torch.int64)

    def tri(m: torch.Tensor) -> torch.Tensor:  # m (m + 1) / 2 for m > 0, else 0
        m = m.clamp_min(0)
        return m * (m + 1) // 2

    if cfg.causal:
        global_pairs, local_pairs = tri(n), tri(n) - tri(n - 1 - w)
    else:
        global_pairs, local_pairs = n * n, n * n - 2 * tri(n - 1 - w)
    layers = 6 * L * (4 * H * H + 3 * H * I) * n.sum()
    attention = 12 * H * (n_global * global_pairs.sum() + (L - n_global) * local_pairs.sum())
    return layers + attention + 6 * (H * H + H * V) * predicted.to(torch.int64)


def training_flops(cfg: ModelConfig, seq_lens: Iterable[int], predicted: int) -> int:
    """`training_flops_tensor` of Python lengths, as an int."""
    lengths = torch.as_tensor(list(seq_lens), dtype=torch.int64)
    return int(training_flops_tensor(cfg, lengths, torch.tensor(int(predicted))))
