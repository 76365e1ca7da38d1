"""The architecture: published sizes and parameter names, tied weights, and the unpadded path."""

from __future__ import annotations

import pytest
import torch

from ettin_train.model import SIZES, EttinModel, ModelConfig, Packed

# Parameter counts with tied embeddings and decoder bias (research section 1.4).
PUBLISHED_PARAMS = {"17m": 16.9e6, "32m": 32.1e6, "68m": 68.5e6, "150m": 149.7e6, "400m": 395.9e6, "1b": 1031.3e6}


def tiny(**kw) -> ModelConfig:
    base = dict(size=None, num_layers=4, hidden_size=64, intermediate_size=96, num_heads=2, vocab_size=300,
                sliding_window=8, attn_out_dropout=0.0)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("size", list(SIZES))
def test_size_presets_have_the_published_parameter_counts(size):
    with torch.device("meta"):
        model = EttinModel(ModelConfig(size=size))
    assert round(model.num_params() / 1e5) == round(PUBLISHED_PARAMS[size] / 1e5)


def test_parameter_names_are_the_original_training_code_names():
    # The 48 keys of FlexBertForMaskedLM with the 17m config (research section 2.2).
    with torch.device("meta"):
        enc = EttinModel(ModelConfig(size="17m"))
        dec = EttinModel(ModelConfig(size="17m", causal=True))
    expected = {"bert.embeddings.tok_embeddings.weight", "bert.embeddings.norm.weight", "bert.final_norm.weight",
                "head.dense.weight", "head.norm.weight", "decoder.weight", "decoder.bias"}
    for i in range(7):
        layer = f"bert.encoder.layers.{i}."
        expected |= {layer + k for k in ("attn.Wqkv.weight", "attn.Wo.weight", "mlp_norm.weight", "mlp.Wi.weight", "mlp.Wo.weight")}
        if i > 0:
            expected.add(layer + "attn_norm.weight")
    assert set(enc.state_dict()) == expected and len(expected) == 48
    assert set(dec.state_dict()) == {k.replace("head.", "lm_head.") if k.startswith("head.") else k for k in expected}
    assert enc.decoder.weight is enc.bert.embeddings.tok_embeddings.weight


def test_shapes_follow_the_original_layout():
    with torch.device("meta"):
        sd = EttinModel(ModelConfig(size="150m")).state_dict()
    assert sd["bert.encoder.layers.3.attn.Wqkv.weight"].shape == (3 * 768, 768)
    assert sd["bert.encoder.layers.3.mlp.Wi.weight"].shape == (2 * 1152, 768)
    assert sd["bert.encoder.layers.3.mlp.Wo.weight"].shape == (768, 1152)
    assert sd["decoder.bias"].shape == (50368,)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_does_not_change_real_positions(causal):
    torch.manual_seed(0)
    model = EttinModel(tiny(causal=causal)).eval()
    ids = torch.randint(5, 300, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 9:] = 0
    batched = model(ids, mask)
    for b in range(3):
        n = int(mask[b].sum())
        alone = model(ids[b : b + 1, :n])[0]
        torch.testing.assert_close(batched[b, :n], alone, atol=1e-5, rtol=1e-5)
        assert batched[b, n:].abs().sum() == 0


def test_decoder_never_sees_the_future():
    torch.manual_seed(0)
    model = EttinModel(tiny(causal=True)).eval()
    ids = torch.randint(5, 300, (2, 30))
    changed = ids.clone()
    changed[:, 20:] = 7
    torch.testing.assert_close(model(ids)[:, :20], model(changed)[:, :20])
    assert not torch.allclose(model(ids)[:, 20:], model(changed)[:, 20:])


def test_local_window_is_half_the_sliding_window_each_side():
    packed = Packed.from_mask(torch.ones(1, 12, dtype=torch.long))
    mask = packed.sdpa_mask(half_window=4, causal=False)[0, 0]
    assert mask[6].nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    causal = packed.sdpa_mask(half_window=4, causal=True)[0, 0]
    assert causal[6].nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 6]
    model = EttinModel(tiny(num_layers=3))
    assert [layer.attn.half_window for layer in model.bert.encoder["layers"]] == [-1, 4, 4]  # global on 0, 3, 6, ...


def test_local_layers_use_local_theta():
    model = EttinModel(tiny(num_layers=4, rope_theta_global=160000.0, rope_theta_local=10000.0))
    thetas = [layer.attn.rope_theta for layer in model.bert.encoder["layers"]]
    assert thetas == [160000.0, 10000.0, 10000.0, 160000.0]
    assert EttinModel(tiny(rope_theta_global=5.0)).bert.encoder["layers"][1].attn.rope_theta == 5.0  # None -> global


def test_first_layer_skips_attention_norm_and_init_is_truncated():
    torch.manual_seed(0)
    model = EttinModel(tiny())
    layers = model.bert.encoder["layers"]
    assert isinstance(layers[0].attn_norm, torch.nn.Identity) and isinstance(layers[1].attn_norm, torch.nn.LayerNorm)
    w = layers[1].attn.Wqkv.weight
    assert w.abs().max() <= 2 * 0.02 + 1e-7 and 0.015 < w.std() < 0.025
    assert layers[1].attn.Wo.weight.std() < w.std() / 2  # output projections scaled by 1/sqrt(2 * layers)
    assert model.decoder.bias.abs().sum() == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("half_window", [-1, 4, 5])
def test_per_sequence_attention_equals_padded_masked_attention(causal, half_window):
    """The CPU path (one sequence at a time, local layers in blocks) computes the same attention as
    one SDPA call on the re-padded batch with the full boolean mask (the GPU fallback)."""
    import torch.nn.functional as F

    from ettin_train.model.ettin import packed_sdpa

    torch.manual_seed(0)
    mask = torch.zeros(4, 23, dtype=torch.long)
    for b, n in enumerate((23, 1, 6, 17)):
        mask[b, :n] = 1
    packed = Packed.from_mask(mask)
    q, k, v = (torch.randn(int(mask.sum()), 2, 8) for _ in range(3))
    ours = packed_sdpa(q, k, v, packed, half_window, causal)
    qp, kp, vp = (packed.pad(t).transpose(1, 2) for t in (q, k, v))
    padded = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=packed.sdpa_mask(half_window, causal))
    torch.testing.assert_close(ours, packed.unpad(padded.transpose(1, 2)), atol=1e-5, rtol=1e-5)


def _window_binding_batch(seq: int = 40):
    """Padding, a length-1 row and rows longer than the window (sliding_window 8: 4 keys each side)."""
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (4, seq))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 1:] = 0
    mask[3, 7:] = 0
    return ids, mask


def _agreement_cfg(causal: bool, **kw) -> ModelConfig:
    # head dim 64 as every Ettin size (the flash kernels need a multiple of 8); layers: global, local, local
    base = dict(size=None, num_layers=3, hidden_size=128, intermediate_size=192, num_heads=2, vocab_size=300,
                sliding_window=8, causal=causal, attn_out_dropout=0.0, attention_backend="sdpa")
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("causal", [False, True])
def test_flex_backend_matches_sdpa_forward_on_cpu(causal):
    """The FlexAttention path computes the same logits as the SDPA path, with padding, a length-1 row and
    rows longer than the window. Forward only: torch >= 2.14 refuses FlexAttention's backward on the CPU
    ("FlexAttention does not support backward on CPU"); its gradients are checked on CUDA
    (test_cuda_backend_matches_cpu_sdpa_in_values_and_gradients)."""
    cfg = _agreement_cfg(causal)
    torch.manual_seed(0)
    sdpa, flex = EttinModel(cfg), EttinModel(cfg.replace(attention_backend="flex"))
    flex.load_state_dict(sdpa.state_dict())
    ids, mask = _window_binding_batch()
    with torch.no_grad():
        torch.testing.assert_close(flex(ids, mask), sdpa(ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_layers_trace_whole_and_compute_the_same_model(causal):
    """compile_layers() compiles each layer with fullgraph=True (a graph break would raise): the CPU SDPA
    path, masks built in prepare(), traces whole and gives the eager logits and gradients."""
    cfg = _agreement_cfg(causal)
    torch.manual_seed(0)
    eager, compiled = EttinModel(cfg), EttinModel(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_layers(backend="aot_eager")
    ids, mask = _window_binding_batch()
    for model in (eager, compiled):
        model(ids, mask)[mask.bool()].square().mean().backward()
    torch.testing.assert_close(compiled(ids, mask), eager(ids, mask), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_an_attention_backend_that_cannot_run_here_is_a_clear_error():
    model = EttinModel(_agreement_cfg(False, attention_backend="varlen"))
    ids, mask = _window_binding_batch()
    with pytest.raises(RuntimeError, match="attention_backend=varlen needs .* a CUDA device"):
        model(ids, mask)
    with pytest.raises(ValueError, match="model.attention_backend: 'fa3' is not one of auto, varlen, fa4"):
        _agreement_cfg(False, attention_backend="fa3")


# ---------------------------------------------------------------------------- CUDA agreement (GPU machine)
# Each CUDA backend in bf16 autocast (as Composer's amp_bf16) against the CPU SDPA path in fp32: logits and
# every gradient. bf16 has its own error, so a backend passes when its error is at most twice that of the
# padded SDPA kernel on CUDA in the same bf16 run (plus 1e-3), and below 3e-2. Run by scripts/gpu_check.py.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA agreement test: needs a CUDA device")


def _run_model(model: EttinModel, ids, mask, device: str, bf16: bool):
    model.zero_grad(set_to_none=True)
    ids, mask = ids.to(device), mask.to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids, mask)
    logits.float()[mask.bool()].square().mean().backward()
    return logits.detach().float().cpu(), [p.grad.detach().float().cpu() for p in model.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# Compiled layers are checked for the custom-op backends only: flex compiles its kernel even in eager layers,
# and flash/sdpa are not what compiled training uses.
BACKEND_CASES = [(b, False) for b in ("varlen", "fa4", "flash", "flex", "sdpa")] + [("varlen", True), ("fa4", True)]


@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,compiled", BACKEND_CASES)
def test_cuda_backend_matches_cpu_sdpa_in_values_and_gradients(backend, causal, compiled):
    from ettin_train.model.ettin import backend_runs

    if not backend_runs(backend, torch.device("cuda"), torch.bfloat16):
        pytest.skip(f"attention backend {backend} is not installed or not supported by this torch/GPU")
    cfg = _agreement_cfg(causal)
    ids, mask = _window_binding_batch(seq=100)
    torch.manual_seed(0)
    ref = EttinModel(cfg)
    ref_logits, ref_grads = _run_model(ref, ids, mask, "cpu", bf16=False)
    errors = {}
    for name in ("sdpa", backend):
        model = EttinModel(cfg.replace(attention_backend=name)).cuda()
        model.load_state_dict(ref.state_dict())
        if compiled and name == backend:
            model.compile_layers()  # inductor, fullgraph: a graph break fails the test
        logits, grads = _run_model(model, ids, mask, "cuda", bf16=True)
        assert logits[~mask.bool()].abs().sum() == 0  # padding stays zero
        errors[name] = [_rel(logits, ref_logits)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    for i, (err, base) in enumerate(zip(errors[backend], errors["sdpa"])):
        what = "logits" if i == 0 else f"grad of {list(dict(ref.named_parameters()))[i - 1]}"
        assert err <= 2 * base + 1e-3 and err < 3e-2, f"{backend}: {what} rel err {err:.2e} (sdpa bf16: {base:.2e})"
