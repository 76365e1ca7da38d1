"""Optimizer state matched to parameters by identity (checkpoint/optimizer_state.py), from states built the way the
original builds and saves its optimizer (tests/checkpoint/original_optimizer.py), and the phase start that uses it."""

from __future__ import annotations

import pytest
import torch

from ettin_train.checkpoint.optimizer_state import OptimizerStateError, ParamLayout
from ettin_train.config import load_recipe
from ettin_train.model import EttinModel
from ettin_train.objectives.mlm import loss as mlm_loss
from tests.checkpoint.original_optimizer import OriginalRun
from tests.conftest import tiny_recipe, write_recipe

MOMENTS = ("exp_avg", "exp_avg_sq", "eps_sq")


def _recipe(tmp_path, **sections):
    sections = {"model": {"vocab_size": 64, "attn_out_dropout": 0.0}, **sections}
    return load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run", **sections)))[0]


def _batch(seed: int, vocab: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _original(recipe, lr: float = 3e-3, steps: int = 3) -> OriginalRun:
    """The original's optimizer after `steps` steps of a warmup to `lr` (its peak), on the recipe's model."""
    opt = recipe.optimizer
    run = OriginalRun(recipe.model, lr=lr, betas=opt.betas, eps=opt.eps, weight_decay=0.01, seed=5)
    for s in range(steps):
        run.step(_batch(s), lr * (s + 1) / steps, mlm_loss)
    return run


def _ours(recipe):
    from ettin_train.train.module import build_optimizer

    model = EttinModel(recipe.model)
    return model, build_optimizer(model, recipe)


def test_an_original_index_keyed_state_lands_on_the_parameters_it_was_saved_for(tmp_path):
    recipe = _recipe(tmp_path)
    original = _original(recipe)
    saved, expected = original.saved_optimizer(), original.named_state()
    assert [len(g["params"]) for g in saved["param_groups"]] == [7, 10]  # [no decay, decay], as the original
    model, optimizer = _ours(recipe)
    matched, added = ParamLayout.of(model, optimizer).rebuild(saved, keyed="name")
    assert added == ["triton"]  # optimi 0.2.1 saved none
    assert set(matched["state"]) == set(expected)
    for name, state in matched["state"].items():
        for key in MOMENTS:
            assert torch.equal(state[key], expected[name][key]), f"{key} of {name}"
    decay = {n: g["weight_decay"] for g in matched["param_groups"] for n in g["params"]}
    assert decay["model.bert.final_norm.weight"] == decay["model.decoder.bias"] == 0.0
    assert decay["model.bert.encoder.layers.0.attn.Wqkv.weight"] == 0.01
    assert all(g["triton"] is False and int(g["step"]) == 3 for g in matched["param_groups"])


def test_groups_saved_in_another_order_are_matched_by_their_parameters(tmp_path):
    recipe = _recipe(tmp_path)
    original = _original(recipe)
    saved, expected = original.saved_optimizer(), original.named_state()
    saved["param_groups"].reverse()  # [decay, no decay], as this project built them before
    model, optimizer = _ours(recipe)
    matched, _ = ParamLayout.of(model, optimizer).rebuild(saved, keyed="name")
    for name, state in matched["state"].items():
        assert torch.equal(state["exp_avg"], expected[name]["exp_avg"]), name
    # name-keyed (Composer's own layout) in any group order: the names decide
    named = {"state": dict(matched["state"]), "param_groups": matched["param_groups"][::-1]}
    again, added = ParamLayout.of(model, optimizer).rebuild(named, keyed="name")
    assert added == [] and all(again["state"][n] is matched["state"][n] for n in matched["state"])


def test_the_next_step_after_loading_equals_the_optimizer_that_never_left_memory(tmp_path):
    """The original's state loaded into our optimizer (index-keyed, in our groups) and one step on the same batch
    with the same weights: the weights and moments equal the original optimizer's own next step, bit for bit."""
    recipe = _recipe(tmp_path)
    original = _original(recipe)
    saved = original.saved_optimizer()
    model, optimizer = _ours(recipe)
    model.load_state_dict(original.composer_model.model.state_dict())
    matched, _ = ParamLayout.of(model, optimizer).rebuild(saved, keyed="index")
    optimizer.load_state_dict(matched)
    for group in optimizer.param_groups:
        group["lr"] = 2e-3
    optimizer.zero_grad()
    mlm_loss(model, _batch(9)).backward()
    optimizer.step()
    original.step(_batch(9), 2e-3, mlm_loss)
    theirs = original.named_state()
    for name, p in model.named_parameters():
        assert torch.equal(p, original.composer_model.get_parameter(f"model.{name}")), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], theirs[f"model.{name}"][key]), f"{key} of {name}"


def test_a_state_without_moments_for_a_parameter_is_refused_naming_it(tmp_path):
    recipe = _recipe(tmp_path)
    saved = _original(recipe).saved_optimizer()
    model, optimizer = _ours(recipe)
    layout = ParamLayout.of(model, optimizer)
    first_decay = saved["param_groups"][1]["params"][0]
    del saved["state"][first_decay]  # the embedding, the first 2-D weight
    with pytest.raises(OptimizerStateError, match=r"for parameter model\.bert\.embeddings\.tok_embeddings\.weight$"):
        layout.rebuild(saved, keyed="index")
    other = _original(_recipe(tmp_path, model={"vocab_size": 64, "intermediate_size": 32})).saved_optimizer()
    with pytest.raises(OptimizerStateError, match=r"shape \[192, 64\] for parameter model\.bert\.encoder\.layers\.0\.mlp\.Wi"):
        layout.match(other)


def test_a_phase_start_takes_the_original_moments_by_name(tmp_path):
    """start_phase_from with init.load=model+optimizer on a checkpoint written as the original writes it: every
    parameter's moments are the ones saved for its name; the recipe's hyperparameters win, max_lr stays saved."""
    from ettin_train.checkpoint.phase_start import start_phase_from

    recipe = _recipe(tmp_path, init={"checkpoint": str(tmp_path / "ckpt.pt"), "load": "model+optimizer"},
                     optimizer={"lr": 1e-3, "weight_decay": 2e-4})
    original = _original(recipe)
    torch.save(original.checkpoint(samples=24, tokens=500), tmp_path / "ckpt.pt")
    model, optimizer = _ours(recipe)
    message = start_phase_from(str(tmp_path / "ckpt.pt"), recipe, model, optimizer)
    assert "and optimizer moments" in message and "its step 3" in message
    expected = original.named_state()
    for name, p in model.named_parameters():
        for key in MOMENTS:
            assert torch.equal(optimizer.state[p][key], expected[f"model.{name}"][key]), f"{key} of {name}"
    by_kind = {len(g["params"]): g for g in optimizer.param_groups}
    assert by_kind[7]["weight_decay"] == 0.0 and by_kind[10]["weight_decay"] == 2e-4
    assert all(g["lr"] == 1e-3 and g["max_lr"] == 3e-3 and g["triton"] is False
               for g in optimizer.param_groups)
    # a checkpoint whose state misses a parameter is refused, naming it, before any training
    broken = original.checkpoint(samples=24, tokens=500)
    del broken["state"]["optimizers"]["StableAdamW"]["state"][0]
    torch.save(broken, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"init.checkpoint .*ckpt.pt: .* for parameter model\.bert\.embeddings\.norm\.weight$"):
        start_phase_from(str(tmp_path / "ckpt.pt"), recipe, *_ours(recipe))
