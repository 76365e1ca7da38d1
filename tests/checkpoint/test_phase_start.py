"""checkpoint/phase_start.py: a phase started from another run's checkpoint (init.checkpoint) takes what
init.load says; a checkpoint of the other objective has its head renamed; one that does not fit is refused
with one line naming the fix."""

from __future__ import annotations

import pytest
import torch

from ettin_train.checkpoint.phase_start import start_phase_from
from ettin_train.config import load_recipe
from ettin_train.model import EttinModel
from ettin_train.train.module import build_optimizer
from tests.conftest import tiny_recipe, write_recipe


@pytest.mark.parametrize("source,target", [("clm", "mntp"), ("clm", "mlm"), ("mlm", "clm")])
def test_cross_start_renames_the_head_and_takes_weights_only(tmp_path, source, target):
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
