"""Every bad input of issue #8 is refused before work starts: the exit status, one `error:` line that
names the file, key or step, and nothing a previous run wrote is changed (nor a new run folder made).
Recipe mistakes exit 2 (cli.py); mistakes in what the recipe points at exit 1 (the adapter, preflight)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import tiny_recipe, write_published, write_recipe
from tests.train.fork_runner import Runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    """A finished 2-step run (`prior`), a copy of the shards to damage, an imported order, and a runner."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "logs").mkdir()
    with Runner(root / "logs", tmp_path_factory.mktemp("tmpdir")) as runner:
        recipe = tiny_recipe(tiny_data, root / "prior", train={"max_duration": "2ba"}, checkpoint={"interval": "1ba"})
        result, log = runner.run(write_recipe(root / "prior.yaml", recipe))
        assert result["rc"] == 0, log
        shutil.copytree(tiny_data / "short", root / "shards")
        rng = np.random.default_rng(7)
        steps = {k: [np.concatenate(([1], rng.integers(5, 512, 20), [2])) for _ in range(4)] for k in range(1, 5)}
        write_published(root / "published" / "checkpoint_000001" / "steps_000001_to_000004.parquet", steps, 1, 4, 32)
        from ettin_train.data.order import validate_and_import

        validate_and_import(root / "published", root / "order", vocab_size=512, pad_id=3)
        yield root, recipe, runner


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _damage_shard(root: Path, how: str) -> Path:
    folder = root / f"shards_{how}"
    shutil.copytree(root / "shards", folder)
    shard = folder / json.loads((folder / "index.json").read_text())["shards"][0]["zip_data"]["basename"]
    data = bytearray(shard.read_bytes())
    if how == "missing":
        shard.unlink()
        shard.with_suffix("").unlink(missing_ok=True)  # the raw copy streaming may have decompressed next to it
    elif how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:  # one byte changed, same size
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    return shard


def _tamper_order(root: Path) -> Path:
    order = root / "order_tampered"
    shutil.copytree(root / "order", order)
    table = order / json.loads((order / "order_index.json").read_text())["phases"]["pretrain"]["step_table"]
    t = np.load(table)
    np.save(table, t[::-1].copy())  # the same steps in another order
    return table


# name: (how the recipe changes (dict sections, or None), extra overrides, run in `prior`?, exit status, the
# error line must contain these; "{root}" is the module's folder)
CASES = {
    "recipe does not parse": ("yaml", [], True, 2, ["bad.yaml line"]),
    "unknown key": (None, ["train.max_duraton=4ba"], True, 2, ["'train.max_duraton'", "did you mean 'train.max_duration'"]),
    "wrong type": ({"train": {"global_batch": "eight", "max_duration": "2ba"}}, [], True, 2, ["'train.global_batch'", "bad.yaml", "an integer"]),
    "missing checkpoint": (None, ["init.checkpoint={root}/nowhere.pt"], False, 1, ["init.checkpoint", "nowhere.pt does not exist"]),
    "missing shard": ("missing", [], True, 1, ["shard", "shard.00000.mds.zstd", "is missing"]),
    "truncated shard": ("truncated", [], True, 1, ["shard.00000.mds.zstd is", "bytes, ", "index.json says"]),
    "shard hash": ("changed", ["reliability.verify_shards=hash"], True, 1, ["shard.00000.mds.zstd does not match its xxh64 hash"]),
    "order fingerprint": ("order", ["data.seq_len=32"], False, 1, ["data.order", "fingerprint mismatch", ".npy"]),
    "tokenizer too big": (None, ["model.vocab_size=256"], False, 1, ["tokenizer", "512 tokens", "model.vocab_size 256"]),
    "init: other objective": (None, ["objective=clm", "init.checkpoint={root}/prior"], False, 1, ["ep0-ba2-rank0.pt", "other objective"]),
    "init: another size": (None, ["model.hidden_size=128", "init.load=model", "init.checkpoint={root}/prior"], False, 1,
                           ["ep0-ba2-rank0.pt", "does not fit"]),
    "resume: other objective": (None, ["objective=clm"], True, 1, ["prior/run.json", "objective mlm", "objective is clm"]),
    "resume: another size": (None, ["model.intermediate_size=128"], True, 1, ["another model", "model.intermediate_size 96 vs 128"]),
    "no room for a checkpoint": (None, ["reliability.min_free_gb=1e9"], True, 1, ["checkpoint folder", "GiB free", "min_free_gb"]),
    "sequence too long": (None, ["data.seq_len=9000"], True, 1, ["data.seq_len 9000", "8192 positions"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_work_starts(world, case):
    root, prior_recipe, runner = world
    change, overrides, in_prior, status, expected = CASES[case]
    recipe = dict(prior_recipe, run_dir=str(root / ("prior" if in_prior else "fresh")))
    if isinstance(change, dict):
        recipe = recipe | change
    elif change in ("missing", "truncated", "changed"):
        recipe["data"] = dict(recipe["data"], path=str(_damage_shard(root, change).parent))
    elif change == "order":
        _tamper_order(root)
        recipe["data"] = dict(recipe["data"], order=str(root / "order_tampered"))
    path = write_recipe(root / "bad.yaml", recipe)
    if change == "yaml":
        path.write_text(yaml.safe_dump(recipe) + "train: {max_duration: [2ba\n")
    before = _snapshot(root / "prior")
    result, log = runner.run(path, *(o.format(root=root) for o in overrides))
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert result["rc"] == status and len(errors) == 1, log
    assert all(e.format(root=root) in errors[0] for e in expected), errors[0]
    assert _snapshot(root / "prior") == before
    assert not (root / "fresh").exists()
    if change == "order":
        shutil.rmtree(root / "order_tampered")
