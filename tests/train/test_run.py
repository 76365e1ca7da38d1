"""Real Composer runs of train.py on real MDS shards: checkpoints, exact resume, phase starts, 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from tests.conftest import composer_launcher, run_train, tiny_recipe, wandb_offline_run, write_recipe

pytestmark = pytest.mark.slow


def _final(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "latest-rank0.pt")


def _assert_same_training_state(a: dict, b: dict) -> None:
    wa, wb = model_state_dict(a), model_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k} differs"
    oa, ob = a["state"]["optimizers"]["StableAdamW"]["state"], b["state"]["optimizers"]["StableAdamW"]["state"]
    for idx in oa:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa[idx][key], ob[idx][key]), f"optimizer {key} of param {idx} differs"
    assert a["state"]["timestamp"]["Timestamp"]["token"] == b["state"]["timestamp"]["Timestamp"]["token"]


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_interrupted_and_resumed_run_matches_uninterrupted_run(tiny_data, tmp_path, objective):
    whole = write_recipe(tmp_path / "whole.yaml", tiny_recipe(tiny_data, tmp_path / "whole", objective))
    run_train(str(whole))

    split_dir = tmp_path / "split"
    split = write_recipe(tmp_path / "split.yaml", tiny_recipe(tiny_data, split_dir, objective))
    first = run_train(str(split), "train.stop_after=6ba")  # ends with a checkpoint at step 6 (not a multiple of 4)
    assert "done at step 6" in first.stdout
    assert sorted(p.name for p in (split_dir / "checkpoints").glob("ep*.pt")) == ["ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"]
    if objective == "clm":
        # As if the process died after step 6 before its checkpoint was complete: only ba4 is left, and
        # the ledger has lines for steps 5 and 6 that the resumed run trains again.
        (split_dir / "checkpoints" / "ep0-ba6-rank0.pt").unlink()
        (split_dir / "checkpoints" / "latest-rank0.pt").unlink()
        (split_dir / "checkpoints" / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")
    second = run_train(str(split))
    assert "resuming from" in second.stdout and "step      8" in second.stdout and "step      4 " not in second.stdout
    _assert_same_training_state(_final(tmp_path / "whole"), _final(split_dir))
    ledger = lambda run: (run / "ledger.jsonl").read_text()  # noqa: E731
    assert ledger(split_dir) == ledger(tmp_path / "whole") and ledger(split_dir).count("\n") == 12
    meta = _final(split_dir)["state"]["callbacks"]["RunMetadata"]
    assert meta["phase"] == "pretrain" and meta["objective"] == objective
    assert meta["model"]["causal"] == (objective == "clm") and meta["model"]["hidden_size"] == 64
    assert (split_dir / "recipe.yaml").exists()


def _check_phase_start(prev_run: Path, run: Path, lr: float, alpha_f: float, steps: int, prev_adam_steps: int) -> None:
    """From the checkpoints: the phase's first step moved the previous phase's final weights by at most a
    few learning rates (a fresh initialisation would be ~0.1 away), its clock started at 0, its schedule is
    its own 1-sqrt from `lr`, and Adam's step count went on from the previous phase's."""
    before = model_state_dict(_final(prev_run))
    first = load_checkpoint(run / "checkpoints" / "ep0-ba1-rank0.pt")
    for key in ("bert.encoder.layers.1.mlp.Wi.weight", "bert.encoder.layers.0.attn.Wqkv.weight"):
        assert (model_state_dict(first)[key] - before[key]).abs().max() < 4 * lr
    end = _final(run)
    assert end["state"]["timestamp"]["Timestamp"]["batch"] == steps
    groups = end["state"]["optimizers"]["StableAdamW"]["param_groups"]
    assert groups[0]["initial_lr"] == pytest.approx(lr)  # the new phase's lr, not the old peak
    # the lr of the last step, set after the one before: 1-sqrt from lr towards alpha_f x lr
    progress = (steps - 1) / steps
    assert groups[0]["lr"] == pytest.approx(lr * (alpha_f + (1 - alpha_f) * (1 - progress**0.5)), rel=1e-6)
    assert int(groups[0]["step"]) == prev_adam_steps + steps
    assert (groups[0]["beta1"], groups[0]["beta2"]) == (0.9, 0.95)  # the phase's betas, not the saved ones


def test_three_phases_each_start_from_the_previous_with_their_own_lr_and_clock(tiny_data, tmp_path):
    """The demo's mechanism on tiny recipes: pretrain -> extension -> decay, each via init.checkpoint."""
    run_train(str(write_recipe(tmp_path / "pre.yaml", tiny_recipe(tiny_data, tmp_path / "pre"))))
    later = dict(data={"path": str(tiny_data / "long"), "seq_len": 128}, model={"rope_theta_global": 160000.0},
                 train={"max_duration": "4ba"}, checkpoint={"interval": "1ba"})
    ext_recipe = tiny_recipe(
        tiny_data, tmp_path / "ext", phase="extension", **later,
        optimizer={"lr": 3e-3, "betas": [0.9, 0.95]},
        scheduler={"name": "one_minus_sqrt", "warmup": "0ba", "decay": None, "alpha_f": 0.5},
        init={"checkpoint": str(tmp_path / "pre"), "load": "model+optimizer"},
        logging={"console_interval": 2, "wandb": {"project": "ettin-test", "mode": "offline", "tags": ["tiny"]}},
        eval={"sources": [str(tiny_data / "heldout_short")], "interval": "2ba", "batches": 1, "batch_size": 4, "seq_len": 64},
    )
    ext = run_train(str(write_recipe(tmp_path / "ext.yaml", ext_recipe)))
    assert "model weights and optimizer moments from" in ext.stdout and "(its step 12)" in ext.stdout
    _check_phase_start(tmp_path / "pre", tmp_path / "ext", lr=3e-3, alpha_f=0.5, steps=4, prev_adam_steps=12)
    # the recipe's wandb logger ran (offline: no key, no network), inside the run folder, with the resolved recipe
    # as its config, the held-out eval in its history, and the group a pair shares
    run, keys = wandb_offline_run(tmp_path / "ext")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"] == yaml.safe_load((tmp_path / "ext" / "recipe.yaml").read_text())["model"] and config["phase"] == "extension"
    assert (run.run_group, run.display_name, list(run.tags)) == ("test-mlm", "test-mlm", ["tiny"])
    assert {"eval/heldout_short/loss", "eval/heldout_short/accuracy"} <= keys

    decay_recipe = tiny_recipe(
        tiny_data, tmp_path / "decay", phase="decay", **(later | {"data": later["data"] | {"mask_rate": 0.15}}),
        optimizer={"lr": 1.5e-3, "betas": [0.9, 0.95]},
        scheduler={"name": "one_minus_sqrt", "warmup": "0ba", "decay": None, "alpha_f": 0.04},
        init={"checkpoint": str(tmp_path / "ext"), "load": "model+optimizer"},
    )
    decay = run_train(str(write_recipe(tmp_path / "decay.yaml", decay_recipe)))
    assert "(its step 4)" in decay.stdout
    _check_phase_start(tmp_path / "ext", tmp_path / "decay", lr=1.5e-3, alpha_f=0.04, steps=4, prev_adam_steps=16)


def test_two_process_gloo_run_through_the_composer_launcher(tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "ddp.yaml", tiny_recipe(tiny_data, tmp_path / "ddp", train={"max_duration": "6ba"},
                                                             checkpoint={"interval": "3ba"}))
    # the `composer` executable itself (the other multi-process tests fork their ranks: tests/conftest.py)
    proc = run_train(str(recipe), launcher=composer_launcher(real=True))
    assert "2 process(es)" in proc.stdout + proc.stderr
    ckpt = _final(tmp_path / "ddp")
    assert ckpt["state"]["timestamp"]["Timestamp"]["batch"] == 6
    assert ckpt["state"]["metadata"]["world_size"] == 2
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert all(torch.isfinite(v).all() for v in model_state_dict(ckpt).values())


def test_a_run_starts_from_an_imported_transformers_checkpoint(tiny_data, tmp_path):
    """ettin-import turns a transformers ModernBERT folder into a checkpoint a recipe starts from."""
    import subprocess
    import sys

    from ettin_train.checkpoint.hf import to_hf
    from ettin_train.config import load_recipe
    from ettin_train.model import EttinModel

    recipe = tiny_recipe(tiny_data, tmp_path / "run", train={"max_duration": "2ba"},
                         init={"checkpoint": str(tmp_path / "imported.pt"), "load": "model"})
    path = write_recipe(tmp_path / "run.yaml", recipe)
    torch.manual_seed(3)
    source = EttinModel(load_recipe(path)[0].model)
    ids = dict(pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, mask_token_id=4)
    to_hf(source, **ids).save_pretrained(tmp_path / "hf")
    subprocess.run([sys.executable, "-m", "ettin_train.import_hf", str(tmp_path / "hf"), str(tmp_path / "imported.pt")],
                   check=True, capture_output=True)

    refused = run_train(str(path), "init.load=model+optimizer", check=False)
    assert refused.returncode != 0 and "has no StableAdamW state" in refused.stderr and "imported.pt" in refused.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

    proc = run_train(str(path))
    assert "model weights from" in proc.stdout and "imported.pt" in proc.stdout
    trained = model_state_dict(_final(tmp_path / "run"))
    start = source.state_dict()["bert.encoder.layers.1.mlp.Wi.weight"]
    moved = trained["bert.encoder.layers.1.mlp.Wi.weight"] - start
    assert 0 < moved.abs().max() < 0.1 * start.abs().max()  # trained on from the imported weights
