"""What a run checks in its data, and the edges of the published order (issue 23): shards whose record
(ettin_shards.json) names another tokenizer or framing, or whose rows are not uint32, are refused before any
work, by train.py and by train.py --plan; a seq_len longer than the rows is reported. A replayed order with
rows longer than data.seq_len is refused before any work, or cut as the original's loader cuts them and
counted in the ledger; a [PAD] inside a sample is refused naming its shard and sample. data.local_cache puts
streaming's decompressed copies of zstd shards elsewhere than beside the shards."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ORDER_PAD, tiny_recipe, write_published, write_recipe
from tests.train.fork_runner import Runner

pytestmark = pytest.mark.slow
LONG = 40  # tokens of the order's long row; the replays run at seq_len 32


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("data_checks")
    (root / "logs").mkdir()
    with Runner(root / "logs", tmp_path_factory.mktemp("tmpdir")) as runner:
        yield root, runner


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


def _copy(tiny_data: Path, root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(tiny_data / "short", folder)
    return folder


def _plan(recipe_path: Path, capsys, *overrides: str) -> tuple[int, str, str]:
    from ettin_train.cli import main

    capsys.readouterr()
    code = main([str(recipe_path), "--plan", *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def _write_mds(folder: Path, rows: list[np.ndarray], encoding: str, compression: str | None = "zstd") -> Path:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"input_ids": encoding, "id": "str", "len": "int"}, compression=compression) as w:
        for k, r in enumerate(rows):
            w.write({"input_ids": r, "id": f"doc{k}", "len": len(r)})
    return folder


def _rows(n: int, dtype, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate(([1], rng.integers(5, 512, 30), [2])).astype(dtype) for _ in range(n)]


def test_shards_of_another_tokenizer_framing_or_dtype_are_refused_before_work(world, tiny_data, tmp_path, capsys):
    root, runner = world
    from ettin_train.data.demo_corpus import train_tokenizer

    # another tokenizer of the same size and special tokens: trained on other text
    other = tmp_path / "other_tokenizer"
    train_tokenizer([f"completely different words number {k} " * 5 for k in range(300)], 512, str(other))
    reframed = _copy(tiny_data, root, "reframed")
    record = json.loads((reframed / "ettin_shards.json").read_text())
    (reframed / "ettin_shards.json").write_text(json.dumps(record | {"framing": "none"}))
    int64 = _write_mds(root / "int64", _rows(16, np.int64), "ndarray:int64")
    float32 = _write_mds(root / "float32", _rows(16, np.float32), "ndarray")  # dtype kept per sample: read from the first

    cases = {
        "tokenizer": ({"tokenizer": str(other)}, ["data.path", "was tokenized with", str(tiny_data / "tokenizer"),
                                                  f"data.tokenizer {other} has another vocabulary"]),
        "framing": ({"path": str(reframed)}, ["data.path", "ettin_shards.json", "framed 'none'", "[CLS] ... [SEP]"]),
        "int64": ({"path": str(int64)}, ["data.path", f"input_ids of {int64} are int64, not uint32"]),
        "float32": ({"path": str(float32)}, [f"input_ids of {float32} are float32, not uint32"]),
    }
    for name, (data, expected) in cases.items():
        recipe = tiny_recipe(tiny_data, root / f"run_{name}", train={"max_duration": "2ba"})
        recipe["data"] |= data
        path = write_recipe(root / f"{name}.yaml", recipe)
        result, log = runner.run(path)
        errors = _errors(log)
        assert result["rc"] == 1 and len(errors) == 1, log
        assert all(e in errors[0] for e in expected), errors[0]
        assert not (root / f"run_{name}").exists()  # before any work
        code, _, err = _plan(path, capsys)  # --plan makes the same checks
        assert code == 1 and err.strip() == errors[0], err
    # the float32 shards were read in memory: no decompressed copy left beside them
    assert not list(float32.glob("*.mds"))


def test_seq_len_longer_than_the_rows_is_reported_and_shards_without_a_record_train(world, tiny_data, capsys):
    root, runner = world
    recipe = tiny_recipe(tiny_data, root / "longer", train={"max_duration": "2ba"})
    path = write_recipe(root / "longer.yaml", recipe)
    code, out, _ = _plan(path, capsys, "data.seq_len=128")
    assert code == 0 and f"note: data.seq_len 128 is longer than the rows of {tiny_data / 'short'} (written for 64 tokens)" in out
    code, out, _ = _plan(path, capsys)
    assert code == 0 and "note:" not in out

    plain = _copy(tiny_data, root, "no_record")  # as the published shards: no ettin_shards.json
    (plain / "ettin_shards.json").unlink()
    recipe["data"] |= {"path": str(plain)}
    result, log = runner.run(write_recipe(root / "no_record.yaml", recipe))
    assert result["rc"] == 0, log


def _order(root: Path, name: str, pad_id: int) -> tuple[Path, dict]:
    """A hand-built order: 4 steps of 2 rows at width 48; step 2's first row is LONG tokens long, all others <= 24."""
    from ettin_train.data.order import validate_and_import

    rng = np.random.default_rng(11)
    steps = {k: [np.concatenate(([1], rng.integers(5, 512, 20), [2])) for _ in range(2)] for k in range(1, 5)}
    steps[2][0] = np.concatenate(([1], rng.integers(5, 512, LONG - 2), [2]))
    write_published(root / f"{name}_published" / "checkpoint_000001" / "steps_000001_to_000004.parquet", steps, 1, 4, 48)
    validate_and_import(root / f"{name}_published", root / name, vocab_size=512, pad_id=pad_id)
    return root / name, steps


def test_replay_with_rows_longer_than_seq_len_is_refused_or_cut_as_the_original(world, tiny_data):
    root, runner = world
    order, steps = _order(root, "long_order", pad_id=ORDER_PAD)
    recipe = tiny_recipe(tiny_data, root / "replay_long", data={"order": str(order), "seq_len": 32},
                         train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"})
    path = write_recipe(root / "replay_long.yaml", recipe)
    result, log = runner.run(path)
    errors = _errors(log)
    assert result["rc"] == 1 and len(errors) == 1, log
    assert f"has rows of up to {LONG} tokens, longer than data.seq_len 32" in errors[0] and "data.truncate_long_rows" in errors[0]
    assert not (root / "replay_long").exists()  # before any work

    result, log = runner.run(path, "data.truncate_long_rows=true")
    assert result["rc"] == 0, log
    ledger = [json.loads(line) for line in (root / "replay_long" / "ledger.jsonl").read_text().splitlines()]
    assert [x["truncated_rows"] for x in ledger] == [0, 1, 0, 0]

    def digest(rows):  # ledger.rows_sha256: each row's ids as little-endian int32, rows in order
        return hashlib.sha256(b"".join(np.asarray(r).astype("<i4").tobytes() for r in rows)).hexdigest()

    # text_data.py for an encoder: keep 32 tokens; the last is not [SEP], so keep 31 and append [SEP]
    long_row = steps[2][0]
    cut = np.concatenate((long_row[:31], [2]))
    assert ledger[1]["rows_sha256"] == digest([cut, steps[2][1]])
    assert ledger[0]["rows_sha256"] == digest(steps[1])


def test_a_pad_inside_a_sample_is_refused_naming_shard_and_sample(world, tiny_data):
    root, runner = world
    # imported with another pad id than the tokenizer's [PAD] (3): the rows keep their padding inside
    order, _ = _order(root, "pad_order", pad_id=0)  # [UNK]: in no row
    recipe = tiny_recipe(tiny_data, root / "replay_pad", objective="clm", data={"order": str(order), "seq_len": 48},
                         train={"max_duration": "2ba"})
    result, log = runner.run(write_recipe(root / "replay_pad.yaml", recipe))
    errors = _errors(log)
    assert result["rc"] == 1 and len(errors) == 1, log
    assert "shard.00000.mds sample 0 (order" in errors[0] and "step 1 row 0" in errors[0], errors[0]
    assert f"[PAD] id {ORDER_PAD} at position 22 inside the row" in errors[0]

    # own MDS shards with a [PAD] in sample 5 of 16, read by a loader worker
    rows = _rows(16, np.uint32)
    rows[5][10] = ORDER_PAD
    padded = _write_mds(root / "padded", rows, "ndarray:uint32")
    recipe = tiny_recipe(tiny_data, root / "own_pad", objective="clm", train={"global_batch": 16, "max_duration": "1ba"})
    recipe["data"] |= {"path": str(padded), "num_workers": 1}
    result, log = runner.run(write_recipe(root / "own_pad.yaml", recipe))
    errors = _errors(log)
    assert result["rc"] == 1 and len(errors) == 1, log
    assert f"{padded}/shard.00000.mds.zstd sample 5" in errors[0] and f"[PAD] id {ORDER_PAD} at position 10" in errors[0]


def test_local_cache_keeps_decompressed_copies_out_of_the_data_folder(world, tiny_data):
    root, runner = world
    shards = _copy(tiny_data, root, "cached")
    for raw in shards.glob("*.mds"):
        raw.unlink()  # as written: only the .zstd files
    before = sorted(p.name for p in shards.iterdir())
    recipe = tiny_recipe(tiny_data, root / "run_cached", train={"max_duration": "2ba"})
    recipe["data"] |= {"path": str(shards), "local_cache": str(root / "cache")}
    result, log = runner.run(write_recipe(root / "cached.yaml", recipe))
    assert result["rc"] == 0, log
    assert sorted(p.name for p in shards.iterdir()) == before  # the data folder is only read
    assert list((root / "cache").glob("shard.*.mds"))  # the copies are in the cache

    recipe["data"].pop("local_cache")  # without it, streaming decompresses beside the shards
    recipe["run_dir"] = str(root / "run_beside")
    result, log = runner.run(write_recipe(root / "beside.yaml", recipe))
    assert result["rc"] == 0, log
    assert list(shards.glob("shard.*.mds"))
