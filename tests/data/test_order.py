"""The published-order importer and reader: exact round trip, rows_sha256, every kind of bad input
rejected with file/row/step named and nothing written, and seeking that touches only the step's shard."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ettin_train.data.order import (
    OrderError,
    OrderIndex,
    rows_sha256,
    validate_and_import,
)
from tests.conftest import ORDER_PAD as PAD
from tests.conftest import ORDER_VOCAB as VOCAB
from tests.conftest import ROOT, write_published


def make_steps(n_steps: int, rng: np.random.Generator, width: int, sizes=(2, 3, 5)) -> dict[int, list[np.ndarray]]:
    """Rows per step (varying batch sizes, as under batch-size warmup), without padding."""
    out = {}
    for step in range(1, n_steps + 1):
        b = sizes[(step - 1) % len(sizes)] if step > 2 else 1  # warmup: tiny first batches
        out[step] = [rng.integers(5, VOCAB, size=int(rng.integers(1, width + 1))).astype(np.int64) for _ in range(b)]
    return out


def published_order(root: Path, layout: dict[str, list[tuple[int, int]]], width: int = 16, seed: int = 0):
    """Folders -> file step ranges; steps are numbered per phase (folder prefix). Returns the rows per
    (phase, step)."""
    rng = np.random.default_rng(seed)
    by_phase: dict[str, dict[int, list[np.ndarray]]] = {}
    phase_of = {"checkpoint": "pretrain", "ext": "ext", "decay": "decay"}
    for folder, ranges in layout.items():
        phase = phase_of[folder.split("_")[0]]
        last = max(b for _, b in ranges)
        steps = by_phase.setdefault(phase, {})
        steps.update({k: v for k, v in make_steps(last, rng, width).items() if k not in steps})
        for a, b in ranges:
            write_published(root / folder / f"steps_{a:06d}_to_{b:06d}.parquet", steps, a, b, width)
    return by_phase


LAYOUT = {
    "checkpoint_000001": [(1, 4), (5, 9)],
    "checkpoint_000002": [(10, 12), (13, 20)],
    "ext_000001": [(1, 3), (4, 7)],
}


def independent_sha(rows: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(b"".join(int(x).to_bytes(4, "little", signed=True) for x in r))
    return h.hexdigest()


def test_import_round_trips_every_step(tmp_path):
    expected = published_order(tmp_path / "order", LAYOUT)
    lines: list[str] = []
    index = validate_and_import(tmp_path / "order", tmp_path / "imported", VOCAB, PAD, progress=lines.append,
                                shard_size_limit=1 << 10)
    assert sorted(index["phases"]) == ["ext", "pretrain"]
    assert any("checkpoint_000002/steps_000013_to_000020.parquet" in line for line in lines)
    order = OrderIndex(tmp_path / "imported")
    assert order.fingerprint == index["fingerprint"]
    assert order.steps("pretrain") == 20 and order.steps("ext") == 7
    for phase, steps in expected.items():
        for step, rows in steps.items():
            got = order.rows(phase, step)
            assert order.batch_size(phase, step) == len(rows) == len(got)
            assert all(np.array_equal(a, b) for a, b in zip(got, rows)), (phase, step)
            assert order.rows_sha256(got) == independent_sha(rows)
            padded = [np.concatenate([r, np.full(16 - len(r), PAD)]) for r in rows]
            assert rows_sha256(padded, pad_id=PAD) == independent_sha(rows)
    # batch sizes vary, and the order spans several shards
    assert len({order.batch_size("pretrain", s) for s in range(1, 21)}) > 1
    for phase, steps in expected.items():  # all of a phase's sizes at once, as the published order has them
        assert order.batch_sizes(phase).tolist() == [len(steps[s]) for s in sorted(steps)]
    assert len(json.loads((tmp_path / "imported" / "pretrain" / "index.json").read_text())["shards"]) > 3


def test_one_phase_only_and_refuses_to_overwrite(tmp_path):
    published_order(tmp_path / "order", LAYOUT)
    validate_and_import(tmp_path / "order", tmp_path / "imported", VOCAB, PAD, phase="ext")
    assert OrderIndex(tmp_path / "imported").phases == ["ext"]
    with pytest.raises(OrderError, match="already exists"):
        validate_and_import(tmp_path / "order", tmp_path / "imported", VOCAB, PAD)


def _rewrite(path: Path, fn) -> None:
    """Rewrites a published file with its rows changed by fn(list of (ids list, step))."""
    t = pq.read_table(path)
    rows = list(zip(t.column("input_ids").to_pylist(), t.column("step").to_pylist()))
    rows = fn(rows)
    table = pa.Table.from_arrays([pa.array([r for r, _ in rows], type=pa.list_(pa.uint16())),
                                  pa.array([s for _, s in rows], type=pa.uint64())], names=["input_ids", "step"])
    pq.write_table(table.replace_schema_metadata(t.schema.metadata), path)


def _left_pad(rows):
    ids, s = rows[3]
    n = ids.index(PAD) if PAD in ids else len(ids)
    rows[3] = ([PAD] + ids[: len(ids) - 1] if n < len(ids) else [PAD] + ids[1:], s)
    return rows


def _oov(rows):
    ids, s = rows[2]
    ids = list(ids)
    ids[0] = VOCAB + 7
    rows[2] = (ids, s)
    return rows


def _drop_step(rows):
    return [(r, s) for r, s in rows if s != 6]  # file steps_000005_to_000009: step 6 missing


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "gap": ("checkpoint_000001/steps_000005_to_000009.parquet", lambda p: _rewrite(p, _drop_step), "step 7", "gaps"),
    "left_pad": ("checkpoint_000002/steps_000013_to_000020.parquet", lambda p: _rewrite(p, _left_pad), "row 3", "right"),
    "oov": ("ext_000001/steps_000004_to_000007.parquet", lambda p: _rewrite(p, _oov), "row 2", "vocab_size"),
    "truncated": ("checkpoint_000002/steps_000010_to_000012.parquet", _truncate, "steps_000010_to_000012", "truncated"),
    "name_range": ("ext_000001/steps_000001_to_000003.parquet",
                   lambda p: p.rename(p.with_name("steps_000001_to_000004.parquet")), "step", "file name"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_order_is_rejected_and_nothing_is_written(tmp_path, kind):
    rel, damage, where, what = BAD[kind]
    published_order(tmp_path / "order", LAYOUT)
    damage(tmp_path / "order" / rel)
    with pytest.raises(OrderError) as err:
        validate_and_import(tmp_path / "order", tmp_path / "imported", VOCAB, PAD)
    msg = str(err.value)
    assert "\n" not in msg and rel.split("/")[0] in msg and where in msg and what in msg, msg
    if kind != "truncated":
        assert err.value.step is not None and err.value.row is not None or kind == "name_range", msg
    assert not (tmp_path / "imported").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["order"]  # no temporary folder left either


def test_gap_names_the_step_and_row(tmp_path):
    published_order(tmp_path / "order", LAYOUT)
    _rewrite(tmp_path / "order" / BAD["gap"][0], _drop_step)
    with pytest.raises(OrderError) as err:
        validate_and_import(tmp_path / "order", tmp_path / "imported", VOCAB, PAD)
    assert err.value.step == 7 and err.value.row == 3  # step 5 has 3 rows (make_steps), step 6 is missing
    assert err.value.file.endswith("steps_000005_to_000009.parquet")


def test_tampered_import_fails_the_fingerprint_check(tmp_path):
    published_order(tmp_path / "order", LAYOUT)
    validate_and_import(tmp_path / "order", tmp_path / "imported", VOCAB, PAD)
    table = tmp_path / "imported" / "ext" / "step_table.npy"
    t = np.load(table)
    t[-1, 1] += 1
    np.save(table, t)
    with pytest.raises(OrderError, match=r"ext/step_table.npy.*fingerprint mismatch"):
        OrderIndex(tmp_path / "imported")


def test_seeking_a_far_step_reads_only_its_shard(tmp_path):
    """2000 steps in 10 files: step 2000 is read correctly, and only the shard(s) holding it are opened."""
    width, n = 8, 2000
    rng = np.random.default_rng(1)
    steps = {s: [rng.integers(5, VOCAB, size=int(rng.integers(1, width + 1))) for _ in range(1 + s % 3)]
             for s in range(1, n + 1)}
    for k in range(10):
        a, b = 200 * k + 1, 200 * (k + 1)
        write_published(tmp_path / "order" / "decay_000001" / f"steps_{a:06d}_to_{b:06d}.parquet", steps, a, b, width)
    validate_and_import(tmp_path / "order", tmp_path / "imported", VOCAB, PAD, shard_size_limit=1 << 12)
    order = OrderIndex(tmp_path / "imported")
    opened: list[int] = []
    real = order._read_range
    order._read_range = lambda phase, shard, lo, hi: (opened.append(shard), real(phase, shard, lo, hi))[1]
    n_shards = len(order._shards["decay"][0])
    assert n_shards > 20
    for step in (1, n, 1000):
        opened.clear()
        got = order.rows("decay", step)
        assert all(np.array_equal(a, b) for a, b in zip(got, steps[step])) and len(got) == len(steps[step])
        assert 1 <= len(opened) <= 2 and len(set(opened)) == len(opened)
    assert order.first_sample("decay", n) + order.batch_size("decay", n) == sum(len(v) for v in steps.values())


def script_main(name: str, *args: str) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "data_tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(list(args))


def test_import_and_show_batch_scripts(tmp_path, capsys):
    expected = published_order(tmp_path / "order", LAYOUT)
    proc = subprocess.run([sys.executable, str(ROOT / "data_tools" / "import_order.py"), str(tmp_path / "order"),
                           "--out", str(tmp_path / "imported"), "--vocab-size", str(VOCAB), "--pad-id", str(PAD)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "steps_000013_to_000020.parquet" in proc.stdout + proc.stderr
    assert script_main("show_batch", "--order", str(tmp_path / "imported"), "--phase", "pretrain", "--step", "7",
                       "--rows", "2") == 0
    out = capsys.readouterr().out
    assert independent_sha(expected["pretrain"][7]) in out
    assert f"batch size {len(expected['pretrain'][7])}" in out
    assert " ".join(map(str, expected["pretrain"][7][0].tolist())) in out
    assert script_main("show_batch", "--order", str(tmp_path / "imported"), "--phase", "pretrain", "--step", "21") == 2
    assert "outside" in capsys.readouterr().err
    # a violation: exit 2 with one line
    _rewrite(tmp_path / "order" / BAD["oov"][0], _oov)
    assert script_main("import_order", str(tmp_path / "order"), "--out", str(tmp_path / "again"),
                       "--vocab-size", str(VOCAB), "--pad-id", str(PAD)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vocab_size" in err and "ext_000001/steps_000004_to_000007.parquet, row 2, step" in err
    assert not (tmp_path / "again").exists()
