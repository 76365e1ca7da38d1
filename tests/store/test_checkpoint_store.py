"""Checkpoints in an object store (`checkpoint.remote`), against the tests' real S3 server: uploaded with the marker
last, pruned by keep, resumed from with an empty local disk bit for bit, damaged objects refused or set aside as
locally, and ettin-export reading the store's run folder."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint
from tests.conftest import S3Store, run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

CKPT = "checkpoints/ep0-ba{}-rank0.pt"


def _tensors(tree, prefix=""):
    """Every tensor of a nested checkpoint dict, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in _tensors(sub, f"{prefix}/{key}").items()}


def _assert_bitwise(a: Path, b: Path) -> None:
    """Weights, optimizer moments and the training clock of two checkpoint files are identical."""
    sa, sb = load_checkpoint(a)["state"], load_checkpoint(b)["state"]
    for part in ("model", "optimizers"):
        ta, tb = _tensors(sa[part]), _tensors(sb[part])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), part
    clock = ("epoch", "batch", "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")  # not wall time
    ta, tb = sa["timestamp"]["Timestamp"], sb["timestamp"]["Timestamp"]
    assert [ta[k] for k in clock] == [tb[k] for k in clock]


def _flip_byte(s3: S3Store, bucket: str, key: str, tmp: Path) -> None:
    """A store object damaged after it was written: one byte in its middle flipped, same size."""
    local = tmp / "flip.bin"
    s3.client().download_file(bucket, key, str(local))
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))


def _copy_prefix(s3: S3Store, bucket: str, src: str, dst: str) -> str:
    client = s3.client()
    for key in s3.keys(bucket, f"{src}/"):
        client.copy_object(Bucket=bucket, Key=f"{dst}/{key[len(src) + 1:]}", CopySource={"Bucket": bucket, "Key": key})
    return f"s3://{bucket}/{dst}"


def _requests(s3: S3Store, bucket: str) -> list[str]:
    """The object keys of the PUT/POST requests the server answered, in its log's order."""
    log = Path(s3.log.name).read_text()
    return re.findall(rf'"(?:PUT|POST) /{bucket}/([^ ?]+)(?:\?[^ ]*)? HTTP', log)


@pytest.fixture(scope="module")
def stored(tiny_data, s3_server, tmp_path_factory):
    """One run with checkpoint.remote (keep 2), stopped after step 8 (a preemption); its local run folder deleted
    (another node's empty disk), a checkpoint without marker put into the store ahead of it, and the same command
    run again to step 12. Beside it the same recipe run uninterrupted, locally."""
    root = tmp_path_factory.mktemp("stored")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        bucket = s3_server.bucket()
        remote = f"s3://{bucket}/runs/enc"
        recipe = write_recipe(root / "r.yaml", tiny_recipe(tiny_data, root / "run", checkpoint={"interval": "4ba", "keep": 2,
                                                                                                  "remote": remote}))
        first = run_train(str(recipe), "train.stop_after=8ba")
        after_first = s3_server.keys(bucket)
        shutil.rmtree(root / "run")
        s3_server.client().put_object(Bucket=bucket, Key=f"runs/enc/{CKPT.format(11)}", Body=b"half an upload")
        second = run_train(str(recipe))
        run_train(str(recipe), f"run_dir={root / 'whole'}", "checkpoint.remote=null")
        yield dict(root=root, bucket=bucket, remote=remote, recipe=recipe, first=first, second=second,
                   after_first=after_first, keys=s3_server.keys(bucket), requests=_requests(s3_server, bucket))


def test_each_checkpoint_is_uploaded_with_its_marker_last_and_keep_prunes_the_store(stored):
    prefix = "runs/enc/"
    assert f"{prefix}{CKPT.format(4)}.complete" in stored["after_first"]  # step 4 was in the store before keep pruned it
    marked = {k for k in stored["keys"] if k.endswith(".complete")}
    assert marked == {f"{prefix}{CKPT.format(8)}.complete", f"{prefix}{CKPT.format(12)}.complete"}
    assert f"{prefix}{CKPT.format(4)}" not in stored["keys"]
    assert {f"{prefix}run.json", f"{prefix}ledger.jsonl", f"{prefix}recipes/start-001.yaml"} <= set(stored["keys"])
    requests = stored["requests"]
    for step in (4, 8, 12):
        name = f"{prefix}{CKPT.format(step)}"
        last_part = max(i for i, k in enumerate(requests) if k == name)
        assert last_part < requests.index(f"{name}.complete"), f"marker of step {step} uploaded before its checkpoint"
        assert requests.index(f"{prefix}ledger.jsonl") < requests.index(f"{name}.complete")


def test_an_empty_run_dir_resumes_from_the_stores_newest_complete_checkpoint_bit_for_bit(stored):
    root = stored["root"]
    assert "ep0-ba8-rank0.pt" in stored["second"].stderr + stored["second"].stdout  # not the unmarked step 11
    assert "resuming from" in stored["second"].stdout and "ba11" not in stored["second"].stdout
    _assert_bitwise(root / "run" / CKPT.format(12), root / "whole" / CKPT.format(12))
    # the ledger came back from the store: steps 1-8 of the first start, 9-12 of the second, as uninterrupted
    assert (root / "run" / "ledger.jsonl").read_text() == (root / "whole" / "ledger.jsonl").read_text()
    assert sorted(p.name for p in (root / "run" / "recipes").iterdir()) == ["start-001.yaml", "start-002.yaml"]


def test_a_damaged_newest_store_checkpoint_is_set_aside_and_the_one_before_it_resumed(stored, s3, tmp_path):
    bucket = stored["bucket"]
    remote = _copy_prefix(s3, bucket, "runs/enc", "runs/damaged-newest")
    _flip_byte(s3, bucket, f"runs/damaged-newest/{CKPT.format(12)}", tmp_path)
    out = run_train(str(stored["recipe"]), f"run_dir={tmp_path / 'run'}", f"checkpoint.remote={remote}",
                    "train.max_duration=12ba")
    assert f"{remote}/{CKPT.format(12)} does not match the sha256" in out.stderr
    keys = s3.keys(bucket, "runs/damaged-newest/")
    assert f"runs/damaged-newest/{CKPT.format(12)}.damaged" in keys  # kept for inspection, not deleted
    # resumed from step 8 and trained steps 9-12 again: the same weights as the uninterrupted run
    _assert_bitwise(tmp_path / "run" / CKPT.format(12), stored["root"] / "whole" / CKPT.format(12))


def test_no_complete_checkpoint_left_in_the_store_refuses_the_start_and_changes_nothing(stored, s3, tmp_path):
    bucket = stored["bucket"]
    remote = _copy_prefix(s3, bucket, "runs/enc", "runs/all-damaged")
    for step in (8, 12):
        _flip_byte(s3, bucket, f"runs/all-damaged/{CKPT.format(step)}", tmp_path)
    before = s3.keys(bucket, "runs/all-damaged/")
    out = run_train(str(stored["recipe"]), f"run_dir={tmp_path / 'run'}", f"checkpoint.remote={remote}", check=False)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{remote}/{CKPT.format(12)} is damaged" in errors[0]
    assert s3.keys(bucket, "runs/all-damaged/") == before
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_a_damaged_load_path_in_the_store_is_refused_in_one_line(stored, s3, tmp_path):
    bucket = stored["bucket"]
    remote = _copy_prefix(s3, bucket, "runs/enc", "runs/damaged-load")
    _flip_byte(s3, bucket, f"runs/damaged-load/{CKPT.format(12)}", tmp_path)
    out = run_train(str(stored["recipe"]), f"run_dir={tmp_path / 'run'}", "checkpoint.remote=null",
                    f"checkpoint.load_path={remote}/{CKPT.format(12)}", "train.max_duration=16ba", check=False)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{remote}/{CKPT.format(12)} is damaged" in errors[0], out.stderr[-2000:]
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_a_load_path_naming_a_store_run_folder_continues_from_its_newest_complete_checkpoint(stored, s3, tmp_path):
    out = run_train(str(stored["recipe"]), f"run_dir={tmp_path / 'run'}", "checkpoint.remote=null",
                    f"checkpoint.load_path={stored['remote']}/", "train.max_duration=13ba")
    assert "continuing from" in out.stdout and "ep0-ba12-rank0.pt" in out.stdout  # not the unmarked step 11
    assert load_checkpoint(tmp_path / "run" / CKPT.format(13))["state"]["timestamp"]["Timestamp"]["batch"] == 13


def test_ettin_export_of_the_store_run_folder_gives_the_tags_of_the_local_one(stored, s3, tmp_path, monkeypatch):
    from ettin_train.export import main as export_main

    monkeypatch.setenv("ETTIN_STORE_CACHE", str(tmp_path / "cache"))
    assert export_main([stored["remote"], "--out", str(tmp_path / "from-store")]) == 0
    assert export_main([str(stored["root"] / "run"), "--out", str(tmp_path / "from-disk")]) == 0

    def tags(repo: Path) -> list[str]:
        return sorted(subprocess.run(["git", "-C", str(repo), "tag"], capture_output=True, text=True, check=True).stdout.split())

    assert tags(tmp_path / "from-store") == tags(tmp_path / "from-disk") == ["step12", "step8"]
    assert not list((tmp_path / "cache").rglob("*ba11*"))  # a checkpoint without marker is not downloaded


def test_an_upload_that_keeps_failing_names_the_object(tmp_path, s3):
    from ettin_train import stores

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "run" / CKPT.format(4)
    ckpt.write_bytes(b"x")
    Path(f"{ckpt}.complete").write_text("{}")
    with pytest.raises(stores.StoreError, match=rf"cannot upload to s3://no-such-bucket/r/{CKPT.format(4)} after 3 tries"):
        stores.upload_checkpoint(stores.Store("s3://no-such-bucket/r"), ckpt, tmp_path / "run")


def test_ettin_eval_of_the_store_run_folder_gives_the_numbers_of_the_local_one(stored, s3, tiny_data, tmp_path, monkeypatch):
    import json

    from ettin_train.eval.cli import main as eval_main

    monkeypatch.setenv("ETTIN_STORE_CACHE", str(tmp_path / "cache"))
    numbers = {}
    for name, source in (("store", stored["remote"]), ("disk", stored["root"] / "run")):
        out = tmp_path / name
        assert eval_main([str(source), "--data", str(tiny_data / "heldout_short"), "--out", str(out), "--seq-len", "64",
                          "--batches", "1", "--batch-size", "4"]) == 0
        rows = json.loads((out / "eval.json").read_text())["rows"]
        numbers[name] = {r["tag"]: (r["loss"], r["accuracy"], r["tokens"]) for r in rows}
    assert numbers["store"] == numbers["disk"] and sorted(numbers["disk"]) == ["step12", "step8"]


def test_a_two_process_run_uploads_each_object_once(tiny_data, s3, tmp_path):
    from tests.conftest import composer_launcher

    bucket = s3.bucket()
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run", train={"global_batch": 8, "max_duration": "4ba"},
                                                          checkpoint={"interval": "4ba", "remote": f"s3://{bucket}/two"}))
    run_train(str(recipe), launcher=composer_launcher(2))
    puts = [k for k in _requests(s3, bucket) if k.startswith("two/checkpoints/")]
    # rank 0 writes the (full) checkpoint and uploads it and its marker; rank 1 writes nothing and uploads nothing
    assert sorted(puts) == [f"two/{CKPT.format(4)}", f"two/{CKPT.format(4)}.complete"]


def test_a_finished_run_in_the_store_is_reported_complete_on_an_empty_disk(stored, s3, tmp_path):
    out = run_train(str(stored["recipe"]), f"run_dir={tmp_path / 'run'}")
    assert "already complete: step 12" in out.stdout and "done at step" not in out.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ep*.pt")) == ["ep0-ba12-rank0.pt"]


def test_ettin_export_refuses_a_damaged_store_checkpoint_in_one_line(stored, s3, tmp_path, monkeypatch, capsys):
    from ettin_train.export import main as export_main

    monkeypatch.setenv("ETTIN_STORE_CACHE", str(tmp_path / "cache"))
    remote = _copy_prefix(s3, stored["bucket"], "runs/enc", "runs/damaged-export")
    _flip_byte(s3, stored["bucket"], f"runs/damaged-export/{CKPT.format(12)}", tmp_path)
    capsys.readouterr()
    assert export_main([f"{remote}/{CKPT.format(12)}", "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{remote}/{CKPT.format(12)} is damaged" in err[0]
    assert not (tmp_path / "repo").exists()
