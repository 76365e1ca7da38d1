"""Full resume from raw Composer checkpoints (ours, and the original runs' layout of research section 3.5), the
start block a run prints, export during training, and a 2-process run exporting as a 1-process run does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.export import main as export_main
from tests.checkpoint.original_optimizer import OPTIMI_021_GROUP, TIMESTAMP_KEYS, original_envelope
from tests.conftest import REPLAY_STEPS, REPLAY_WIDTH, composer_launcher, run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def original_layout(ckpt: dict) -> dict:
    """One of our checkpoints rewritten field by field into the original runs' layout (Composer 0.24.1, optimi
    0.2.1, DDP, section 3.5): optimizer state keyed by parameter index in our groups' order (the original's,
    `[no decay, decay]`), optimi 0.2.1 group fields, and the original's envelope (original_optimizer.py, which also
    builds such a checkpoint the way the original code does)."""
    state = ckpt["state"]
    opt = state["optimizers"]["StableAdamW"]
    index, groups = {}, []
    for group in opt["param_groups"]:
        ids = list(range(len(index), len(index) + len(group["params"])))
        index.update(zip(group["params"], ids))
        groups.append({k: (ids if k == "params" else group[k]) for k in OPTIMI_021_GROUP})
    moments = {index[name]: dict(v) for name, v in opt["state"].items()}
    assert set(moments) == set(range(len(index)))  # every parameter has state (the tied decoder.weight is one)
    ts = state["timestamp"]["Timestamp"]
    return original_envelope(dict(state["model"]), {"state": moments, "param_groups": groups},
                             dict(state["schedulers"]["LambdaLR"]), {k: ts[k] for k in TIMESTAMP_KEYS},
                             [dict(r, cuda=torch.zeros(16, dtype=torch.uint8)) for r in ckpt["rng"]])


def _ckpt(run: Path, step: int) -> dict:
    return load_checkpoint(run / "checkpoints" / f"ep0-ba{step}-rank0.pt")


def _assert_same(a: dict, b: dict) -> None:
    wa, wb = model_state_dict(a), model_state_dict(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = a["state"]["optimizers"]["StableAdamW"], b["state"]["optimizers"]["StableAdamW"]
    assert oa["state"].keys() == ob["state"].keys()
    for name in oa["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa["state"][name][key], ob["state"][name][key]), f"{key} of {name}"
    assert [int(g["step"]) for g in oa["param_groups"]] == [int(g["step"]) for g in ob["param_groups"]]
    assert a["state"]["timestamp"]["Timestamp"]["token"] == b["state"]["timestamp"]["Timestamp"]["token"]
    assert a["state"]["schedulers"]["LambdaLR"]["last_epoch"] == b["state"]["schedulers"]["LambdaLR"]["last_epoch"]


def _ledger(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]


def _tags(repo: Path) -> list[str]:
    return sorted(subprocess.run(["git", "-C", str(repo), "tag"], capture_output=True, text=True, check=True).stdout.split())


def test_full_resume_from_an_original_layout_checkpoint_continues_the_run(tiny_data, tmp_path):
    """An uninterrupted 6-step run (exporting each checkpoint as it goes); its step-3 checkpoint rewritten into the
    original layout; a new run continued from it with checkpoint.load_path, stopped at step 5 and autoresumed, ends
    with the uninterrupted run's weights, moments, clock and scheduler, bit for bit, having trained on the same rows."""
    repo = tmp_path / "hf"
    whole = tiny_recipe(tiny_data, tmp_path / "whole", train={"max_duration": "6ba"}, checkpoint={"interval": "3ba"},
                        export={"repo": str(repo)})
    proc = run_train(str(write_recipe(tmp_path / "whole.yaml", whole)))
    # export during training: every checkpoint tagged, and the exports drew nothing from the training RNG (the
    # continued run below, which exports nothing, would otherwise differ after step 3)
    assert _tags(repo) == ["step3", "step6"] and "export: ep0-ba3-rank0.pt: exported as step3" in proc.stdout

    source = _ckpt(tmp_path / "whole", 3)
    torch.save(original_layout(source), tmp_path / "ep0-ba3-rank0.pt")
    cont_dir = tmp_path / "cont"
    cont = tiny_recipe(tiny_data, cont_dir, train={"max_duration": "6ba"}, checkpoint={"interval": "3ba"})
    cont_yaml = write_recipe(tmp_path / "cont.yaml", cont)
    first = run_train(str(cont_yaml), f"checkpoint.load_path={tmp_path / 'ep0-ba3-rank0.pt'}", "train.stop_after=5ba")
    block = first.stdout[first.stdout.index("] start:"):]
    assert "continuing from" in block and "ep0-ba3-rank0.pt" in block
    assert "loaded: model weights; optimizer moments and hyperparameters (Adam step 3); scheduler (LambdaLR); " \
           "clock (step 3, " in block
    assert "RNG (1 rank(s)); data position (epoch 0, sample 24, the loader seeks there)" in block
    assert "converted: optimizer keys the checkpoint's optimi lacks, taken from the recipe: triton" in block
    assert "converted: no data position in the checkpoint: the loader seeks past its first 24 samples" in block
    assert "continues at step 4" in block
    # the first step after the resume is step 4, on the rows the uninterrupted run trained at step 4
    assert _ledger(cont_dir)[0] == _ledger(tmp_path / "whole")[3]

    second = run_train(str(cont_yaml), f"checkpoint.load_path={tmp_path / 'ep0-ba3-rank0.pt'}")
    assert "resuming from" in second.stdout and "ep0-ba5-rank0.pt" in second.stdout  # autoresume wins over load_path
    assert "data position (epoch 0, sample 40, the loader seeks there)" in second.stdout
    assert "continues at step 6" in second.stdout
    _assert_same(_ckpt(cont_dir, 6), _ckpt(tmp_path / "whole", 6))
    assert _ledger(cont_dir) == _ledger(tmp_path / "whole")[3:]


def test_an_original_layout_checkpoint_on_a_replayed_order_seeks_to_its_step(tiny_data, order, tmp_path):
    """The original runs saved no data position; on the published order (data.order) the step is the position, so
    a continued run seeks straight to step 5 and trains on the order's rows of steps 5-8, as the uninterrupted run."""
    recipe = lambda name: write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(  # noqa: E731
        tiny_data, tmp_path / name, data={"order": str(order), "seq_len": REPLAY_WIDTH},
        train={"max_duration": f"{REPLAY_STEPS}ba"}, checkpoint={"interval": "4ba"}))
    run_train(str(recipe("whole")))
    torch.save(original_layout(_ckpt(tmp_path / "whole", 4)), tmp_path / "ep0-ba4-rank0.pt")
    proc = run_train(str(recipe("cont")), f"checkpoint.load_path={tmp_path / 'ep0-ba4-rank0.pt'}")
    assert "the loader seeks past its first" in proc.stdout and "the loader seeks there" in proc.stdout
    assert "continues at step 5" in proc.stdout
    assert _ledger(tmp_path / "cont") == _ledger(tmp_path / "whole")[4:]
    _assert_same(_ckpt(tmp_path / "cont", REPLAY_STEPS), _ckpt(tmp_path / "whole", REPLAY_STEPS))


def test_load_path_problems_stop_before_anything_is_written(tiny_data, tmp_path):
    base = tiny_recipe(tiny_data, tmp_path / "run", train={"max_duration": "2ba"})
    path = write_recipe(tmp_path / "run.yaml", base)

    both = run_train(str(path), f"checkpoint.load_path={tmp_path}", f"init.checkpoint={tmp_path}", check=False)
    assert both.returncode == 2 and both.stderr.count("\n") == 1
    assert "'checkpoint.load_path'" in both.stderr and "'init.checkpoint'" in both.stderr

    weights_only = {"state": {"model": {f"model.{k}": v for k, v in _tiny_weights(path).items()},
                              "timestamp": {"Timestamp": {"batch": 0}}}}
    torch.save(weights_only, tmp_path / "weights.pt")
    for target, message in ((tmp_path / "nothing.pt", "does not exist"),
                            (tmp_path / "weights.pt", "has no StableAdamW state")):
        proc = run_train(str(path), f"checkpoint.load_path={target}", check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("error: checkpoint.load_path: ") and str(target) in proc.stderr and message in proc.stderr
        assert not (tmp_path / "run").exists()
    # remote paths go to Composer's downloader, which knows these schemes, or (hf://) to huggingface_hub
    from ettin_train.checkpoint.resume import fetch_hub_file, hub_file, is_remote

    assert is_remote("s3://bucket/run/ep0-ba5996-rank0.pt") and not is_remote(str(tmp_path / "weights.pt"))
    with pytest.raises(ValueError, match="ftp://"):
        is_remote("ftp://host/ep0-ba5996-rank0.pt")
    with pytest.raises(ValueError, match="https://"):  # Composer 0.32.1's Trainer has no http backend: one line here
        is_remote("https://host/ep0-ba5996-rank0.pt")
    assert hub_file("hf://datasets/jhu-clsp/ettin-checkpoints@v1/encoder-17m/pretrain/ep0-ba2997-rank0.pt") == dict(
        repo_id="jhu-clsp/ettin-checkpoints", filename="encoder-17m/pretrain/ep0-ba2997-rank0.pt", repo_type="dataset",
        revision="v1")
    with pytest.raises(ValueError, match="cannot download it from the Hub"):  # the tests run offline
        fetch_hub_file("hf://datasets/jhu-clsp/ettin-checkpoints/encoder-17m/ep0-ba2997-rank0.pt")


def _tiny_weights(recipe_path: Path) -> dict:
    from ettin_train.config import load_recipe
    from ettin_train.model import EttinModel

    return EttinModel(load_recipe(recipe_path)[0].model).state_dict()


def test_a_two_process_checkpoint_exports_as_a_one_process_one(tiny_data, tmp_path):
    """The same global batch of 8 on 1 process and on 2 (composer -n 2, gloo DDP), exported: the same tag, the same
    config.json and the same weights up to float summation order. With one sequence per microbatch and no dropout
    the two runs compute the same gradient, (1/8) x the sum of the 8 per-sequence gradients; only the order of
    that sum differs (Composer accumulates in one process, DDP sums two halves with all-reduce), which moved the
    weights by at most 7.5e-9 (a few float32 ulps) when this test was written; it allows 1e-6."""
    common = dict(model={"attn_out_dropout": 0.0}, train={"max_duration": "2ba", "microbatch": 1},
                  checkpoint={"interval": "1ba"})
    run_train(str(write_recipe(tmp_path / "one.yaml", tiny_recipe(tiny_data, tmp_path / "one", **common))))
    # the 2-process run exports while it trains; every_checkpoint false: only its final checkpoint
    two = tiny_recipe(tiny_data, tmp_path / "two", **common, export={"repo": str(tmp_path / "hf-two"), "every_checkpoint": False})
    run_train(str(write_recipe(tmp_path / "two.yaml", two)), launcher=composer_launcher())
    assert export_main([str(tmp_path / "one" / "checkpoints" / "ep0-ba2-rank0.pt"), "--out", str(tmp_path / "hf-one")]) == 0

    assert _tags(tmp_path / "hf-one") == _tags(tmp_path / "hf-two") == ["step2"]
    config = lambda repo: (repo / "config.json").read_text()  # noqa: E731
    assert config(tmp_path / "hf-one") == config(tmp_path / "hf-two")
    from safetensors.torch import load_file

    one, two = load_file(tmp_path / "hf-one" / "model.safetensors"), load_file(tmp_path / "hf-two" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-6), key
    # both trained on the same tokens at each step (the rows are split over the ranks in another order)
    assert [s["tokens"] for s in _ledger(tmp_path / "one")] == [s["tokens"] for s in _ledger(tmp_path / "two")]


def test_a_failed_export_during_training_is_loud_and_training_goes_on(tiny_data, tmp_path):
    """The repository already has a tag step2 with other weights: exporting step 2 is refused, loudly; the run
    trains on, and step 4 is exported."""
    repo = tmp_path / "hf"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *a],  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    git("symbolic-ref", "HEAD", "refs/heads/main")
    (repo / "model.safetensors").write_bytes(b"other weights")
    (repo / "ettin_export.json").write_text("{}\n")  # an export repository (another one is refused whole, test_other_runs)
    git("add", "model.safetensors", "ettin_export.json")
    git("commit", "-q", "-m", "someone else's step2")
    git("tag", "step2")
    recipe = tiny_recipe(tiny_data, tmp_path / "run", train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"},
                         export={"repo": str(repo)})
    proc = run_train(str(write_recipe(tmp_path / "run.yaml", recipe)))
    assert "done at step 4" in proc.stdout
    assert "EXPORT FAILED for" in proc.stderr and "ep0-ba2-rank0.pt" in proc.stderr and "tag step2 exists with other weights" in proc.stderr
    assert "training goes on" in proc.stderr and "python -m ettin_train.export" in proc.stderr
    assert _tags(repo) == ["step2", "step4"] and "exported as step4" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "ep0-ba2-rank0.pt").exists()
