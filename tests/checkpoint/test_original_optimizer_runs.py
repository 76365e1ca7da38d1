"""Real Composer runs started from a checkpoint whose optimizer was built and saved as the original's is
(tests/checkpoint/original_optimizer.py: groups `[no decay, decay]`, index-keyed state, optimi 0.2.1 keys): a full
resume and a phase start train their next steps bit for bit like the original optimizer that never left memory."""

from __future__ import annotations

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.config import load_recipe
from tests.checkpoint.original_optimizer import OriginalRun
from tests.conftest import run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

SAVED_AT = 4  # the original's checkpoint: after 4 steps


def _loader_batches(recipe, steps) -> dict[int, dict]:
    """The batches the run's loader gives at these steps (own data: data/permuted.py), for the in-memory optimizer."""
    from transformers import AutoTokenizer

    from ettin_train.data.permuted import PermutedBatches, resolve_sources
    from ettin_train.objectives import SpecialTokens, get_objective

    tokens = SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(recipe.data.tokenizer))
    objective = get_objective(recipe.objective)
    data = PermutedBatches(resolve_sources(recipe.data), seed=recipe.data.shuffle_seed,
                           global_batch=recipe.train.global_batch, rank=0, world=1, phase=recipe.phase,
                           seq_len=recipe.data.seq_len, tokens=tokens, force_sep=not objective.causal,
                           collate=objective.make_collator(tokens, recipe.data.mask_rate, recipe.train.seed))
    batches = {s: data.batch(s) for s in steps}
    del data  # its streaming shared memory, before a run opens the same folder
    return batches


def _original_checkpoint(tiny_data, tmp_path, batches) -> tuple[OriginalRun, object]:
    """The original's optimizer after SAVED_AT warmup steps at the tiny recipe's hyperparameters, saved as
    tmp_path/ep0-ba4-rank0.pt; the run stays in memory, its next step's learning rate the peak."""
    spec = tiny_recipe(tiny_data, tmp_path / "unused", model={"attn_out_dropout": 0.0})
    recipe = load_recipe(write_recipe(tmp_path / "original.yaml", spec))[0]
    opt = recipe.optimizer
    original = OriginalRun(recipe.model, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, seed=3)
    torch.set_num_threads(1)  # the runs' thread count (run_train), so the sums are added in the same order
    for step in range(1, SAVED_AT + 1):
        original.step(batches[step], opt.lr * step / SAVED_AT, _loss(recipe))
    tokens = sum(int(batches[s]["attention_mask"].sum()) for s in range(1, SAVED_AT + 1))
    torch.save(original.checkpoint(samples=SAVED_AT * recipe.train.global_batch, tokens=tokens),
               tmp_path / f"ep0-ba{SAVED_AT}-rank0.pt")
    return original, recipe


def _loss(recipe):
    from ettin_train.objectives import get_objective

    return get_objective(recipe.objective).loss


def _assert_equals_in_memory(ckpt: dict, original: OriginalRun) -> None:
    weights, theirs = model_state_dict(ckpt), original.composer_model.model.state_dict()
    assert weights.keys() == theirs.keys()
    for key in weights:
        assert torch.equal(weights[key], theirs[key]), key
    saved, expected = ckpt["state"]["optimizers"]["StableAdamW"], original.named_state()
    assert set(saved["state"]) == set(expected)  # name-keyed, every parameter
    for name, moments in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[key], expected[name][key]), f"{key} of {name}"
    assert {int(g["step"]) for g in saved["param_groups"]} == {original.steps}


def test_full_resume_of_an_original_checkpoint_trains_like_the_optimizer_that_never_left_memory(tiny_data, tmp_path):
    """checkpoint.load_path on the original's step-4 checkpoint, two steps: the weights and the moments (by name)
    equal the original optimizer's after the same two steps in memory, bit for bit."""
    spec = tiny_recipe(tiny_data, tmp_path / "cont", model={"attn_out_dropout": 0.0}, checkpoint={"interval": "2ba"})
    batches = _loader_batches(load_recipe(write_recipe(tmp_path / "cont.yaml", spec))[0], range(1, SAVED_AT + 3))
    original, recipe = _original_checkpoint(tiny_data, tmp_path, batches)
    for step in (5, 6):  # warmup 3ba, decay the last 4 of 12: steps 5 and 6 train at the peak
        original.step(batches[step], recipe.optimizer.lr, _loss(recipe))

    proc = run_train(str(tmp_path / "cont.yaml"), f"checkpoint.load_path={tmp_path / 'ep0-ba4-rank0.pt'}",
                     "train.stop_after=6ba")
    assert "optimizer moments and hyperparameters (Adam step 4)" in proc.stdout
    assert "converted: optimizer keys the checkpoint's optimi lacks, taken from the recipe: triton" in proc.stdout
    assert "continues at step 5" in proc.stdout
    _assert_equals_in_memory(load_checkpoint(tmp_path / "cont" / "checkpoints" / "ep0-ba6-rank0.pt"), original)


def test_phase_start_from_an_original_checkpoint_trains_like_the_optimizer_that_never_left_memory(tiny_data, tmp_path):
    """init.load=model+optimizer from the original's checkpoint with a new learning rate and weight decay, two
    steps: as the in-memory original optimizer given the phase's hyperparameters (max_lr kept), bit for bit."""
    spec = tiny_recipe(tiny_data, tmp_path / "phase", model={"attn_out_dropout": 0.0},
                       optimizer={"lr": 1e-3, "weight_decay": 2e-4}, scheduler={"warmup": "0ba", "decay": "4ba"},
                       init={"checkpoint": str(tmp_path / "ep0-ba4-rank0.pt"), "load": "model+optimizer"},
                       checkpoint={"interval": "2ba"})
    batches = _loader_batches(load_recipe(write_recipe(tmp_path / "phase.yaml", spec))[0], range(1, SAVED_AT + 1))
    original, recipe = _original_checkpoint(tiny_data, tmp_path, batches)
    no_decay, decay = original.optimizer.param_groups
    for group, wd in ((no_decay, 0.0), (decay, 2e-4)):
        group.update(initial_lr=1e-3, weight_decay=wd)
    for step in (1, 2):  # a new phase: the data from its start, the schedule stable at the phase's lr
        original.step(batches[step], 1e-3, _loss(recipe))

    proc = run_train(str(tmp_path / "phase.yaml"), "train.stop_after=2ba")
    assert "model weights and optimizer moments from" in proc.stdout and "(its step 4)" in proc.stdout
    _assert_equals_in_memory(load_checkpoint(tmp_path / "phase" / "checkpoints" / "ep0-ba2-rank0.pt"), original)


def test_an_original_checkpoint_without_moments_for_a_parameter_is_refused_before_anything_is_written(tiny_data, tmp_path):
    spec = tiny_recipe(tiny_data, tmp_path / "cont", model={"attn_out_dropout": 0.0})
    path = write_recipe(tmp_path / "cont.yaml", spec)
    batches = _loader_batches(load_recipe(path)[0], range(1, SAVED_AT + 1))
    original, _ = _original_checkpoint(tiny_data, tmp_path, batches)
    broken = original.checkpoint(samples=32, tokens=1000)
    decay_ids = broken["state"]["optimizers"]["StableAdamW"]["param_groups"][1]["params"]
    del broken["state"]["optimizers"]["StableAdamW"]["state"][decay_ids[3]]
    torch.save(broken, tmp_path / "ep0-ba4-rank0.pt")
    # (the phase start's refusal: tests/checkpoint/test_optimizer_state.py, in process)
    proc = run_train(str(path), f"checkpoint.load_path={tmp_path / 'ep0-ba4-rank0.pt'}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: checkpoint.load_path: {tmp_path / 'ep0-ba4-rank0.pt'}: ")
    assert proc.stderr.rstrip().endswith("for parameter model.bert.encoder.layers.0.mlp.Wi.weight"), proc.stderr
    assert not (tmp_path / "cont").exists()
