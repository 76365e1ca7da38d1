"""Shards and imported orders in an object store (the tests' S3 server, over HTTP): a run on them trains bit for bit
like a run on the same local files, a wrong prefix is one line before any work, and a shard the store stops
serving mid-run ends the run with one line naming it and a checkpoint from which the same command resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from ettin_train.cli import main as train_main
from tests.conftest import REPLAY_STEPS, REPLAY_WIDTH, S3Store, composer_launcher, run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

STEPS, BATCH, SEED = 8, 8, 21


@pytest.fixture(scope="module")
def sharded(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's `short` samples rewritten into many small zstd shards, so a run needs a new shard at later steps."""
    from streaming import MDSWriter, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    from ettin_train.data.shards import COLUMNS

    out = tmp_path_factory.mktemp("sharded") / "short"
    source = StreamingDataset(local=str(tiny_data / "short"), shuffle=False, batch_size=1)
    try:
        with MDSWriter(out=str(out), columns=COLUMNS, compression="zstd", size_limit=4096, hashes=["xxh64"]) as writer:
            for i in range(source.num_samples):
                sample = source[i]
                writer.write({"input_ids": sample["input_ids"], "id": sample["id"], "len": sample["len"]})
    finally:
        del source
        clean_stale_shared_memory()
    (out / "ettin_shards.json").write_text((tiny_data / "short" / "ettin_shards.json").read_text())  # the same rows
    return out


def _recipe(tiny_data: Path, run_dir: Path, data: dict, **sections) -> Path:
    r = tiny_recipe(tiny_data, run_dir, data={"num_workers": 1, **data}, train={"max_duration": f"{STEPS}ba"},
                    checkpoint={"interval": "4ba"}, **sections)
    return write_recipe(run_dir.parent / f"{run_dir.name}.yaml", r)


@pytest.fixture(scope="module")
def local_run(tiny_data, sharded, tmp_path_factory) -> Path:
    """One run on the local shards: what every run on their copy in the store must equal."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_train(str(_recipe(tiny_data, run_dir, {"path": str(sharded)})))
    return run_dir


def _weights(run_dir: Path) -> dict:
    return model_state_dict(load_checkpoint(run_dir / "checkpoints" / "latest-rank0.pt"))


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    assert (a / "ledger.jsonl").read_text() == (b / "ledger.jsonl").read_text()
    assert (a / "ledger.jsonl").read_text().count("\n") == STEPS


def _shards(folder: Path) -> list[str]:
    return [s["zip_data"]["basename"] for s in json.loads((folder / "index.json").read_text())["shards"]]


def test_a_run_on_shards_in_the_store_with_a_small_cache_equals_the_run_on_the_same_local_shards(
        s3: S3Store, tiny_data, sharded, local_run, tmp_path):
    uri = s3.upload(sharded, s3.bucket(), "data/short")
    cache = tmp_path / "cache"
    shards = json.loads((sharded / "index.json").read_text())["shards"]
    index = (sharded / "index.json").stat().st_size  # the cache holds it too
    limit = index + 4 * max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in shards)  # about the least streaming takes
    run_train(str(_recipe(tiny_data, tmp_path / "remote", {"path": str(cache), "remote": uri, "cache_limit": str(limit)})))
    _assert_same_run(local_run, tmp_path / "remote")
    kept = [p for p in cache.iterdir() if p.name.startswith("shard.")]
    assert (cache / "index.json").is_file() and all(p.suffix == ".mds" for p in kept)  # decompressed there, zstd gone
    assert len(kept) < len(_first_needed(sharded)) and index + sum(p.stat().st_size for p in kept) <= limit  # cold shards were evicted


def test_a_mixture_with_a_source_in_the_store_equals_the_same_mixture_on_local_shards(s3: S3Store, tiny_data, sharded,
                                                                                     tmp_path):
    uri = s3.upload(tiny_data / "long", s3.bucket(), "data/long")
    local = [{"path": str(sharded), "weight": 3.0}, {"path": str(tiny_data / "long"), "weight": 1.0}]
    remote = [local[0], {"path": str(tmp_path / "cache_long"), "remote": uri, "weight": 1.0}]
    run_train(str(_recipe(tiny_data, tmp_path / "local", {"path": str(tmp_path), "sources": local})))
    run_train(str(_recipe(tiny_data, tmp_path / "remote", {"path": str(tmp_path), "sources": remote})))
    _assert_same_run(tmp_path / "local", tmp_path / "remote")
    assert (tmp_path / "cache_long" / "index.json").is_file()


def _first_needed(folder: Path) -> dict[int, int]:
    """shard -> the first step that reads one of its samples (docs/data.md: one source, epoch 0, PCG64DXSM(seed))."""
    shards = json.loads((folder / "index.json").read_text())["shards"]
    ends = np.cumsum([s["samples"] for s in shards])
    perm = np.random.Generator(np.random.PCG64DXSM(SEED)).permutation(int(ends[-1]))
    first: dict[int, int] = {}
    for pos, sample in enumerate(perm[: STEPS * BATCH]):
        first.setdefault(int(np.searchsorted(ends, sample, side="right")), pos // BATCH + 1)
    return first


def _store_losing_a_later_shard(s3: S3Store, tiny_data, sharded, tmp_path, **sections):
    """The shards in a new bucket, less one first read after the interval checkpoint of step 4 (gone from the store
    before its step), and a recipe on them: (bucket, uri, the shard's name, the step that first needs it, recipe)."""
    bucket = s3.bucket()
    uri = s3.upload(sharded, bucket, "data/short")
    shard, step = min(((s, k) for s, k in _first_needed(sharded).items() if k > 5), key=lambda sk: sk[1])
    name = _shards(sharded)[shard]
    s3.client().delete_object(Bucket=bucket, Key=f"data/short/{name}")
    recipe = _recipe(tiny_data, tmp_path / "run", {"path": str(tmp_path / "cache"), "remote": uri, "download_retry": 2,
                                                   "download_timeout": 10}, **sections)
    return bucket, uri, name, step, recipe


def test_a_shard_the_store_no_longer_serves_ends_the_run_with_its_name_and_a_checkpoint_to_resume(
        s3: S3Store, tiny_data, sharded, local_run, tmp_path):
    bucket, uri, name, step, recipe = _store_losing_a_later_shard(s3, tiny_data, sharded, tmp_path)
    failed = run_train(str(recipe), check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 1 and len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert f"shard {uri}/{name}" in errors[0] and "after 2 download attempt(s)" in errors[0], errors[0]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert f"checkpoint of step {step - 1}: {checkpoints / f'ep0-ba{step - 1}-rank0.pt'}" in errors[0], errors[0]
    assert (checkpoints / "latest-rank0.pt").resolve().name == f"ep0-ba{step - 1}-rank0.pt"
    assert (tmp_path / "run" / "ledger.jsonl").read_text().count("\n") == step - 1  # the checkpoint's steps, no more

    s3.client().upload_file(str(sharded / name), bucket, f"data/short/{name}")  # the store is back
    resumed = run_train(str(recipe))
    assert "resuming from" in resumed.stdout and f"ep0-ba{step - 1}-rank0.pt" in resumed.stdout
    _assert_same_run(local_run, tmp_path / "run")


def test_replaying_an_imported_order_from_the_store_equals_replaying_it_locally(s3: S3Store, tiny_data, order, tmp_path):
    bucket = s3.bucket()
    uri = s3.upload(order, bucket, "orders/tiny")
    common = {"seq_len": REPLAY_WIDTH, "num_workers": 1}
    train = {"max_duration": f"{REPLAY_STEPS}ba"}
    local = tiny_recipe(tiny_data, tmp_path / "local", data={"order": str(order), **common}, train=train)
    cache = tmp_path / "order_cache"
    remote = tiny_recipe(tiny_data, tmp_path / "remote", data={"order": str(cache), "order_remote": uri, **common}, train=train)
    run_train(str(write_recipe(tmp_path / "local.yaml", local)))
    run_train(str(write_recipe(tmp_path / "remote.yaml", remote)))
    wa, wb = _weights(tmp_path / "local"), _weights(tmp_path / "remote")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ledger = (tmp_path / "local" / "ledger.jsonl").read_text()
    assert ledger == (tmp_path / "remote" / "ledger.jsonl").read_text() and ledger.count("\n") == REPLAY_STEPS
    cached = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    assert cached == sorted(p.relative_to(order).as_posix() for p in order.rglob("*") if p.is_file())


def test_an_order_shard_changed_in_the_store_is_refused_by_its_sha256(s3: S3Store, order, tmp_path):
    from ettin_train.data.mds import ShardUnavailable
    from ettin_train.data.order import OrderIndex
    from ettin_train.data.remote import RemoteFolder

    bucket = s3.bucket()
    uri = s3.upload(order, bucket, "orders/tiny")
    shard = next((order / "pretrain").glob("shard.*.mds"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    s3.client().put_object(Bucket=bucket, Key=f"orders/tiny/pretrain/{shard.name}", Body=bytes(data))
    index = OrderIndex(tmp_path / "cache", RemoteFolder(uri, str(tmp_path / "cache"), "data.order_remote"))
    with pytest.raises(ShardUnavailable, match=rf"data.order_remote {uri}: {uri}/pretrain/{shard.name} does not match its sha256"):
        index.rows("pretrain", 1)
    assert not (tmp_path / "cache" / "pretrain" / shard.name).exists()
    assert [p.name for p in (tmp_path / "cache" / "pretrain").iterdir() if p.name.startswith(".")] == []  # no leftovers


# overrides (with {uri}: a bucket holding tiny_data's short and an imported order), what the one error line names
WRONG = {
    "data.remote": (["data.remote={uri}/nothing-here", "data.path={root}/cache"],
                    ["data.remote {uri}/nothing-here", "{uri}/nothing-here/index.json"]),
    "a mixture source's remote": (
        ["data.path={root}", "data.sources=[{{path: cache, remote: '{uri}/shrot'}}]"],
        ["data.sources[0].remote {uri}/shrot", "{uri}/shrot/index.json"]),
    "data.order_remote": (["data.order={root}/cache", "data.order_remote={uri}/no-order", "data.seq_len=32"],
                          ["data.order_remote {uri}/no-order", "{uri}/no-order/order_index.json"]),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_wrong_prefix_in_the_store_is_one_line_naming_the_uri_before_any_work(s3: S3Store, tiny_data, order, tmp_path,
                                                                                case, capsys):
    bucket = s3.bucket()
    uri = s3.upload(tiny_data / "short", bucket, "short").rsplit("/", 1)[0]
    s3.upload(order, bucket, "order")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run"))
    overrides = [o.format(uri=uri, root=tmp_path) for o in WRONG[case][0]]
    expected = [e.format(uri=uri, root=tmp_path) for e in WRONG[case][1]]
    capsys.readouterr()
    assert train_main([str(recipe), *overrides, "--plan"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and all(e in err[0] for e in expected), err
    if case == "data.remote":  # and a start says the same, having written nothing
        start = run_train(str(recipe), *overrides, check=False)
        assert start.returncode == 1 and start.stderr.strip().splitlines()[-1] == err[0], start.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no run folder, no download cache


def test_a_shard_the_store_no_longer_serves_ends_a_two_process_run_naming_it(s3: S3Store, tiny_data, sharded, tmp_path):
    """The failing rank alone knows: it exits 1 with the line (the others wait in the next step), the launcher stops
    the others, and the same command resumes from the last interval checkpoint once the store serves it."""
    bucket, uri, name, _, recipe = _store_losing_a_later_shard(s3, tiny_data, sharded, tmp_path,
                                                               parallel={"timeout_s": 60})
    failed = run_train(str(recipe), launcher=composer_launcher(2), check=False, timeout=400)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode != 0 and len(errors) == 1, failed.stderr[-3000:]
    assert f"shard {uri}/{name}" in errors[0] and "last complete checkpoint" in errors[0], errors[0]
    assert "ep0-ba4-rank0.pt" in errors[0], errors[0]  # the interval checkpoint before the failing step

    s3.client().upload_file(str(sharded / name), bucket, f"data/short/{name}")  # the store is back
    resumed = run_train(str(recipe), launcher=composer_launcher(2), timeout=400)
    assert "resuming from" in resumed.stdout and "ep0-ba4-rank0.pt" in resumed.stdout
    assert (tmp_path / "run" / "ledger.jsonl").read_text().count("\n") == STEPS
