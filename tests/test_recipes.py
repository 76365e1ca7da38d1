"""The Ettin recipes in yamls/{encoder,decoder,cross}/ against the original configs.

The expected values are written here from the research notes (shared/reference/ettin-recipe-research.md
sections 1.2-1.7), not generated from the YAML files, so a wrong value in a recipe fails a test.
"""

from __future__ import annotations

import math

import pytest
import torch

from ettin_train.config import Duration, load_recipe
from ettin_train.model import EttinModel
from ettin_train.plan import make_plan
from tests.conftest import ROOT

SIZES = ["17m", "32m", "68m", "150m", "400m", "1b"]
B = 1_000_000_000

# Research 1.4: peak lr, weight decay, warmup (tokens), microbatch; 2.2 / 1.4: parameter counts.
PEAK = {"17m": 3e-3, "32m": 3e-3, "68m": 3e-3, "150m": 8e-4, "400m": 5e-4, "1b": 5e-4}
WD = {"17m": 3e-4, "32m": 3e-4, "68m": 3e-4, "150m": 1e-5, "400m": 1e-5, "1b": 5e-5}
WARMUP = {"17m": 4 * B, "32m": 4 * B, "68m": 3 * B, "150m": 3 * B, "400m": 2 * B, "1b": 2 * B}
PARAMS_M = {"17m": 16.9, "32m": 32.1, "68m": 68.5, "150m": 149.7, "400m": 395.9, "1b": 1031.3}
SHAPES = {"17m": (7, 256, 384, 4), "32m": (10, 384, 576, 6), "68m": (19, 512, 768, 8), "150m": (22, 768, 1152, 12),
          "400m": (28, 1024, 2624, 16), "1b": (28, 1792, 3840, 28)}
MICROBATCH = {  # research 1.4, 1.5, 1.6, 1.7
    "pretrain": {"17m": 144, "32m": 128, "68m": 96, "150m": 72, "400m": 48, "1b": 24},
    "extension": {"17m": 24, "32m": 24, "68m": 18, "150m": 16, "400m": 6, "1b": 2},
    "decay": {"17m": 12, "32m": 12, "68m": 8, "150m": 12, "400m": 2, "1b": 2},
    "cross": {"17m": 12, "32m": 12, "68m": 8, "150m": 12, "400m": 4, "1b": 2},
}
TOKENS = {  # research 1.1, 1.7
    "pretrain": {s: 1_700 * B for s in SIZES},
    "extension": {**{s: 250 * B for s in SIZES}, "1b": 83_333_000_000},
    "decay": {**{s: 50 * B for s in SIZES}, "1b": 16_666_666_667},
    "cross": {**{s: 50 * B for s in SIZES}, "1b": 16_666_666_667},
}
# local RoPE theta; None = "absent" in the original config (= the global theta)
LOCAL_THETA = {
    ("encoder", "pretrain"): {s: None for s in SIZES},
    ("decoder", "pretrain"): {s: None for s in SIZES},
    ("encoder", "extension"): {**{s: None for s in SIZES}, "17m": 10000.0},
    ("decoder", "extension"): {**{s: None for s in SIZES}, "17m": 10000.0},
    ("encoder", "decay"): {s: 160000.0 for s in SIZES},
    ("decoder", "decay"): {"17m": 10000.0, "32m": 10000.0, "68m": 10000.0, "150m": None, "400m": 10000.0, "1b": 160000.0},
}
GLOBAL_THETA = {"pretrain": 10000.0, "extension": 160000.0, "decay": 160000.0, "cross": 160000.0}
MASK = {"pretrain": 0.3, "extension": 0.3, "decay": 0.15}
SEQ = {"pretrain": 1024, "extension": 7999, "decay": 7999, "cross": 7999}


def _lr(phase: str, size: str) -> tuple[float, float]:
    """(lr at the start of the phase, lr at its end), research 1.4-1.7 (decay: the README's intent)."""
    peak = PEAK[size]
    return {"pretrain": (peak, peak), "extension": (peak, 0.5 * peak), "decay": (0.5 * peak, 0.02 * peak),
            "cross": (0.5 * peak, 0.5 * peak * 0.02)}[phase]


def _all_recipes():
    for objective in ("encoder", "decoder"):
        for size in SIZES:
            for phase in ("pretrain", "extension", "decay"):
                yield objective, size, phase, ROOT / "yamls" / objective / size / f"{phase}.yaml"
    for size in SIZES:
        for direction in ("encoder_to_decoder", "decoder_to_encoder"):
            yield direction, size, "cross", ROOT / "yamls" / "cross" / size / f"{direction}.yaml"


RECIPES = list(_all_recipes())


@pytest.fixture(scope="module")
def loaded():
    return {(o, s, p): load_recipe(path)[0] for o, s, p, path in RECIPES}


@pytest.fixture(scope="module")
def params():
    out = {}
    for size in SIZES:
        recipe, _ = load_recipe(ROOT / "yamls" / "encoder" / size / "pretrain.yaml")
        with torch.device("meta"):
            out[size] = EttinModel(recipe.model).num_params()
    return out


def test_there_are_48_recipes_and_they_all_load(loaded):
    assert len(RECIPES) == 48 and all(path.is_file() for *_, path in RECIPES)
    assert len(loaded) == 48


@pytest.mark.parametrize("size", SIZES)
def test_model_shape_and_parameter_count(loaded, params, size):
    assert params[size] / 1e6 == pytest.approx(PARAMS_M[size], abs=0.051)
    if size == "17m":
        assert params[size] == 16_913_600  # built from the original module tree (research 2.2)
    for (objective, s, phase), recipe in loaded.items():
        if s == size:
            m = recipe.model
            assert (m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads) == SHAPES[size]
            assert m.vocab_size == 50368 and m.sliding_window == 128 and m.global_attn_every_n_layers == 3
            assert m.causal == (objective in ("decoder", "encoder_to_decoder"))


@pytest.mark.parametrize("objective,size,phase,path", RECIPES, ids=[f"{o}-{s}-{p}" for o, s, p, _ in RECIPES])
def test_recipe_values(loaded, objective, size, phase, path):
    r = loaded[(objective, size, phase)]
    plan = make_plan(r)
    # constants (research 1.2)
    assert r.train.global_batch == 4608 and plan["global_batch"] == 4608
    assert r.data.tokenizer == "bclavie/olmo_bert_template" and r.data.shuffle_seed == 21 and r.data.num_workers == 6
    assert r.optimizer.betas == [0.9, 0.98] and r.optimizer.eps == 1e-6
    assert r.train.seed == (210 if phase == "cross" else 21)
    # per size and phase
    assert r.train.microbatch == MICROBATCH[phase][size]
    assert Duration.parse(r.train.max_duration) == (TOKENS[phase][size], "tok") and plan["tokens"] == TOKENS[phase][size]
    assert r.optimizer.weight_decay == pytest.approx(WD[size])
    start, end = _lr(phase, size)
    assert plan["lr_peak"] == pytest.approx(start, rel=1e-9) and plan["lr_final"] == pytest.approx(end, rel=1e-9)
    assert r.data.seq_len == SEQ[phase]
    assert r.model.rope_theta_global == GLOBAL_THETA[phase]
    interval = Duration.parse(r.checkpoint.interval)[0]
    if phase == "cross":
        assert r.model.rope_theta_local == 160000.0
        assert r.scheduler.name == "warmup_stable_decay" and r.scheduler.alpha_f == 0.02
        assert Duration.parse(r.scheduler.warmup)[0] == (1 * B if size == "1b" else 3 * B)
        assert Duration.parse(r.scheduler.decay)[0] == (3_333_000_000 if size == "1b" else 10 * B)
        assert interval == (3_333_000_000 if size == "1b" else 10 * B)
        assert r.init.load == "model"
        source = "encoder" if objective == "encoder_to_decoder" else "decoder"
        assert r.init.checkpoint == f"runs/{source}-{size}/decay"
        if objective == "decoder_to_encoder":
            assert r.objective == "mntp" and r.data.mask_rate == 0.15
        else:
            assert r.objective == "clm"
        return
    assert interval == 8_500_000_000
    assert r.objective == {"encoder": "mlm", "decoder": "clm"}[objective]
    assert r.model.rope_theta_local == LOCAL_THETA[(objective, phase)][size]
    if objective == "encoder":
        assert r.data.mask_rate == MASK[phase] and plan["mask_rate"] == MASK[phase]
    assert r.run_dir == f"runs/{objective}-{size}/{phase}"
    if phase == "pretrain":
        assert r.scheduler.name == "warmup_stable_decay" and Duration.parse(r.scheduler.decay)[0] == 0
        assert Duration.parse(r.scheduler.warmup)[0] == WARMUP[size]
        assert r.init.checkpoint is None
        assert r.data.mean_tokens_per_seq == 615
    else:
        previous = {"extension": "pretrain", "decay": "extension"}[phase]
        assert r.scheduler.name == "one_minus_sqrt" and r.scheduler.decay is None
        assert r.scheduler.alpha_f == {"extension": 0.5, "decay": 0.04}[phase]
        assert Duration.parse(r.scheduler.warmup)[0] == 0
        assert r.init.checkpoint == f"runs/{objective}-{size}/{previous}" and r.init.load == "model+optimizer"


def test_every_later_phase_starts_from_a_recipe_run_dir(loaded):
    run_dirs = {r.run_dir for r in loaded.values()}
    assert len(run_dirs) == 48
    for r in loaded.values():
        assert r.init.checkpoint is None or r.init.checkpoint in run_dirs


def test_plot_draws_the_chain_with_recipe_lr_endpoints(tmp_path):
    from ettin_train.plot import plot_schedule

    out = tmp_path / "lr.png"
    series = plot_schedule(ROOT / "yamls" / "cross" / "150m" / "decoder_to_encoder.yaml", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s["name"].split(" ")[0] for s in series] == ["decoder-150m-pretrain", "decoder-150m-extension",
                                                         "decoder-150m-decay", "cross-150m-decoder_to_encoder"]
    for s, phase in zip(series, ("pretrain", "extension", "decay", "cross")):
        start, end = _lr(phase, "150m")
        if phase in ("pretrain", "cross"):  # warmup from 1e-10 x lr
            assert s["lr_start"] == pytest.approx(start * 1e-10) and max(s["lr"]) == pytest.approx(start)
        else:
            assert s["lr_start"] == pytest.approx(start)
        assert s["lr_end"] == pytest.approx(end)
        assert set(s["batch"]) == {4608}
    ends = [s["tokens"][-1] for s in series]
    assert ends == pytest.approx([1700 * B, 1950 * B, 2000 * B, 2050 * B])
    # an override applies to the plotted recipe only: the literal-code decay (starts at the peak)
    series = plot_schedule(ROOT / "yamls" / "encoder" / "150m" / "decay.yaml", out, ["optimizer.lr=8.0e-4"])
    assert [s["lr_start"] for s in series[1:]] == pytest.approx([8e-4, 8e-4])
    assert series[-1]["lr_end"] == pytest.approx(0.04 * 8e-4) and math.isclose(series[1]["lr_end"], 4e-4)


@pytest.mark.parametrize("source,target", [("clm", "mntp"), ("clm", "mlm"), ("mlm", "clm")])
def test_cross_start_renames_the_head_and_takes_weights_only(tmp_path, source, target):
    from ettin_train.checkpoint.phase_start import start_phase_from
    from ettin_train.train.module import build_optimizer
    from tests.conftest import tiny_recipe, write_recipe

    def build(objective, **model):
        recipe, _ = load_recipe(write_recipe(tmp_path / f"{objective}.yaml", tiny_recipe(
            tmp_path, tmp_path / "run", objective, init={"checkpoint": str(tmp_path / "ckpt.pt"), "load": "model"},
            model={"vocab_size": 64, **model})))
        torch.manual_seed(len(objective) + len(model))
        net = EttinModel(recipe.model)
        return recipe, net, build_optimizer(net, recipe)

    _, old, _ = build(source)
    torch.save({"state": {"model": {f"model.{k}": v for k, v in old.state_dict().items()},
                          "timestamp": {"Timestamp": {"batch": 7}}}}, tmp_path / "ckpt.pt")
    recipe, new, opt = build(target)
    message = start_phase_from(str(tmp_path / "ckpt.pt"), recipe, new, opt)
    src, dst = old.head_name, new.head_name
    assert src != dst and f"{src}.* renamed {dst}.*" in message and "optimizer" not in message
    for key, value in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[key.replace(f"{src}.", f"{dst}.", 1) if key.startswith(f"{src}.") else key], value)
    recipe.init.load = "model+optimizer"  # moments of another objective's run: refused, with the fix named
    with pytest.raises(SystemExit, match="init.load=model"):
        start_phase_from(str(tmp_path / "ckpt.pt"), recipe, build(target)[1], opt)
    recipe.init.load = "model"  # another size: refused
    big_recipe, big, big_opt = build(target, hidden_size=128)
    with pytest.raises(SystemExit, match="does not fit"):
        start_phase_from(str(tmp_path / "ckpt.pt"), big_recipe, big, big_opt)
