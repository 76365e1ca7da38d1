"""Mistakes are one line (issue 21): each of these inputs stops a start and `train.py --plan` alike with one
`error:` line naming the key, file or column, before anything is written (the checks live in
preflight.check_inputs, which both run). Training runs as forked children of tests/train/fork_runner.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ettin_train.cli import main as train_main
from tests.conftest import ROOT, tiny_recipe, write_recipe
from tests.train.fork_runner import Runner

pytestmark = pytest.mark.slow

# No credentials anywhere, and an S3 endpoint that answers nothing: a private bucket as a user without access sees it.
NO_AWS = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true",
          "S3_ENDPOINT_URL": "http://127.0.0.1:9"}


def _shards(folder, columns: dict, rows) -> str:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns=columns) as writer:
        for row in rows:
            writer.write(row)
    return str(folder)


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("input_errors")
    ids = [np.arange(1, 40, dtype=np.uint32) for _ in range(20)]
    _shards(root / "tokens_column", {"tokens": "ndarray:uint32"}, [{"tokens": x} for x in ids])
    _shards(root / "float_ids", {"input_ids": "ndarray:float32"}, [{"input_ids": x.astype(np.float32)} for x in ids])
    (root / "empty").mkdir()
    (root / "empty" / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        for key, value in NO_AWS.items():
            mp.setenv(key, value)
        (root / "logs").mkdir()
        with Runner(root / "logs", tmp_path_factory.mktemp("tmpdir")) as runner:
            yield root, write_recipe(root / "r.yaml", tiny_recipe(tiny_data, root / "run")), runner


# name: (overrides, the error line contains these; "{root}" is the module's folder)
CASES = {
    "column not input_ids": (["data.path={root}/tokens_column"], ["data.path", "tokens_column/index.json", "no column input_ids", "tokens"]),
    "input_ids not integers": (["data.path={root}/float_ids"], ["data.path", "float_ids/index.json", "input_ids", "ndarray:float32"]),
    "no samples": (["data.path={root}/empty"], ["data.path", "empty/index.json", "no samples"]),
    "missing data.path": (["data.path={root}/nowhere"], ["data.path", "nowhere/index.json", "does not exist"]),
    "tokenizer typo": (["data.tokenizer={root}/tokenzer"], ["data.tokenizer", "tokenzer"]),
    "run_dir in a store": (["run_dir=s3://bucket/run"], ["run_dir s3://bucket/run", "checkpoint.remote: s3://bucket/run"]),
    "remote without credentials": (["data.remote=s3://bucket/shards", "data.path={root}/cache"],
                                   ["data.remote s3://bucket/shards", "index.json", "credentials"]),
    "sequence too long": (["data.seq_len=9000"], ["data.seq_len 9000", "8192 positions"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_for_a_start_and_for_plan_and_nothing_is_written(world, case, capsys):
    root, recipe, runner = world
    overrides = [o.format(root=root) for o in CASES[case][0]]
    expected = [e.format(root=root) for e in CASES[case][1]]
    before = sorted(p.name for p in root.iterdir())
    result, log = runner.run(recipe, *overrides)
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert result["rc"] in (1, 2) and len(lines) == 1 and "Traceback" not in log, log
    assert all(e in lines[0] for e in expected), lines[0]

    capsys.readouterr()
    assert train_main([str(recipe), *overrides, "--plan"]) in (1, 2)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(e in err for e in expected), err
    assert sorted(p.name for p in root.iterdir()) == before  # no run folder, no download cache
    assert not (ROOT / "s3:").exists()
