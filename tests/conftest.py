"""Shared fixtures and helpers: a tokenizer and MDS shards built on the spot (no download), tiny recipes, runs of
train.py, free ports, and published-format batch orders. Test files import helpers from here only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def no_stale_streaming_memory():
    """streaming keeps shared memory per dataset; a crashed earlier run can leave some behind. Only what no
    live process holds goes: streaming's own clean-up would also unlink the segments of runs in progress (of
    the other pytest-xdist worker, or of another test session on the machine)."""
    from ettin_train.data.streaming_leftovers import clean_streaming_leftovers

    clean_streaming_leftovers()
    yield
    clean_streaming_leftovers()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`tokenizer/` (byte-level BPE, 512 tokens, ModernBERT special tokens) and MDS folders `short`
    (64-token pieces) and `long` (128-token pieces) from standard-library docstrings, and the same of
    the modules that follow as held-out data: `heldout_short`, `heldout_long`."""
    from ettin_train.data.demo_corpus import build_demo_data

    out = tmp_path_factory.mktemp("tiny_data")
    build_demo_data(str(out), max_chars=150_000, vocab_size=512, seq_lens={"short": 64, "long": 128}, heldout_chars=30_000)
    return out


def tiny_recipe(data_dir: Path, run_dir: Path, objective: str = "mlm", **sections) -> dict:
    """A recipe dict for a 2-layer model on `tiny_data`; `sections` are merged in (one level deep)."""
    recipe = {
        "run_name": f"test-{objective}",
        "run_dir": str(run_dir),
        "objective": objective,
        "model": {"size": None, "num_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_heads": 1,
                  "vocab_size": 512, "sliding_window": 16},
        "data": {"path": str(data_dir / "short"), "tokenizer": str(data_dir / "tokenizer"), "seq_len": 64, "num_workers": 0},
        "optimizer": {"lr": 3e-3, "weight_decay": 3e-4},
        "scheduler": {"name": "warmup_stable_decay", "warmup": "3ba", "decay": "4ba"},
        "train": {"global_batch": 8, "max_duration": "12ba"},
        "checkpoint": {"interval": "4ba"},
        "logging": {"console_interval": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def tiny_masked_lm(vocab_size: int = 64):
    """A random transformers ModernBertForMaskedLM of 3 layers (local window 8), ids 0-3 = pad, cls, sep, mask."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=2, local_attention=8, global_attn_every_n_layers=2,
                              pad_token_id=0, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2,
                              mask_token_id=3, max_position_embeddings=64, attn_implementation="sdpa",
                              initializer_range=0.2)
    return ModernBertForMaskedLM(config).eval()


def wandb_offline_run(folder: Path):
    """(the run record, the keys of its history) of the one offline wandb run under `folder`, read from its
    .wandb file as `wandb sync` would send it."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = folder.glob("**/offline-run-*/run-*.wandb")
    store, run, keys = datastore.DataStore(), None, set()
    store.open_for_scan(str(path))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return run, keys


def free_port() -> int:
    """A port no one listens on now: fixed ports collide with other test runs on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForkedComposerLauncher(list):
    """`composer -n N --master_port P`, run by run_train as Composer's own launcher code whose ranks are forked
    from the pre-imported process (tests/train/fork_runner.py): ~8 s of imports saved per rank and launcher."""


def composer_launcher(processes: int = 2, real: bool = False) -> list[str]:
    """Composer's launcher for `processes` local ranks, on a port free now: call it once per launch. `real`:
    the `composer` executable itself, each rank a new Python (for the tests of the launcher itself)."""
    launcher = [str(Path(sys.executable).parent / "composer"), "-n", str(processes), "--master_port", str(free_port())]
    return launcher if real else ForkedComposerLauncher(launcher)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# Scripts run_train forks from one pre-imported process (tests/train/fork_runner.py) instead of starting
# Python, torch and Composer afresh: ~8 s saved per run (and per rank under composer_launcher()). Other
# launchers (torchrun, composer_launcher(real=True)) start their own.
FORKED = {ROOT / "train.py", ROOT / "tests" / "train" / "faults.py"}
_fork_server = None


def _forked(cmd: list[str], env: dict, timeout: int, launcher: list[str] | None) -> subprocess.CompletedProcess:
    global _fork_server
    import atexit
    import tempfile

    from tests.train.fork_runner import ForkServer

    if _fork_server is None or _fork_server.proc.poll() is not None:
        _fork_server = ForkServer(env)
        atexit.register(_fork_server.close)
    with tempfile.TemporaryDirectory(prefix="run_train-") as logs:
        out, err = Path(logs) / "stdout", Path(logs) / "stderr"
        argv = cmd[len(launcher):] if launcher else cmd[1:]
        result = _fork_server.attempt(argv, out, err, kill_after=timeout, cwd=ROOT, env=env,
                                      launcher=launcher[1:] if launcher else None)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    if result["killed"]:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, result["rc"], stdout, stderr)


def run_train(*args: str, launcher: list[str] | None = None, timeout: int = 600, check: bool = True,
              script: Path = ROOT / "train.py") -> subprocess.CompletedProcess:
    """Runs train.py (or another entry `script`) in a process of its own, as a user would: forked from a
    pre-imported one for a single process and for the ranks of composer_launcher(), else under `launcher`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = (launcher or [sys.executable]) + [str(script), *args]
    if (launcher is None or isinstance(launcher, ForkedComposerLauncher)) and Path(script) in FORKED:
        proc = _forked(cmd, env, timeout, launcher)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


# The published batch order's format (data/order.py): the pad id and vocabulary of the tests' orders.
ORDER_PAD, ORDER_VOCAB = 3, 512
REPLAY_WIDTH, REPLAY_STEPS = 32, 8


def write_published(path: Path, steps: dict, first: int, last: int, width: int) -> Path:
    """One file in the published format: list<uint16> input_ids right-padded with ORDER_PAD, uint64 step,
    schema metadata sequence_length. `steps` maps a step to its rows (int arrays without padding)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, step_col = [], []
    for s in range(first, last + 1):
        for r in steps[s]:
            rows.append(np.concatenate([r, np.full(width - len(r), ORDER_PAD)]).astype(np.uint16).tolist())
            step_col.append(s)
    table = pa.Table.from_arrays([pa.array(rows, type=pa.list_(pa.uint16())), pa.array(step_col, type=pa.uint64())],
                                 names=["input_ids", "step"])
    table = table.replace_schema_metadata({b"sequence_length": str(width).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return path


@pytest.fixture(scope="module")
def order(tmp_path_factory) -> Path:
    """A published-format order of one pre-training phase, imported: framed rows, batch sizes 2 and 4 per step."""
    import numpy as np

    from ettin_train.data.order import validate_and_import

    root = tmp_path_factory.mktemp("order")
    rng = np.random.default_rng(7)
    steps = {k: [np.concatenate(([1], rng.integers(5, 512, int(rng.integers(3, REPLAY_WIDTH - 2))), [2]))
                 for _ in range(2 if k % 2 else 4)] for k in range(1, REPLAY_STEPS + 3)}
    write_published(root / "published" / "checkpoint_000001" / "steps_000001_to_000006.parquet", steps, 1, 6, REPLAY_WIDTH)
    write_published(root / "published" / "checkpoint_000001" / "steps_000007_to_000010.parquet", steps, 7, 10, REPLAY_WIDTH)
    validate_and_import(root / "published", root / "imported", vocab_size=ORDER_VOCAB, pad_id=ORDER_PAD)
    return root / "imported"


# The files of make test's slowest tests (2026-12-03), longest first: each runs whole on one worker, so one
# started late would run on alone at the end. test_rank_lost.py stays long (real launcher, timeouts it waits out).
LONGEST_FIRST = ["train/test_four_processes.py", "train/test_rank_lost.py", "data/test_replay.py", "train/test_parallel.py", "train/test_reliability.py",
                 "train/test_run.py"]


def pytest_collection_modifyitems(items):
    """LONGEST_FIRST, then the other files with real training runs (marked slow), then the rest, each group in
    its own order: under `-n 2 --dist loadfile --no-loadscope-reorder` (make test) the longest work starts early
    and the short files fill in around it at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    rank = {ROOT / "tests" / name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path, len(rank)), item.path not in slow_files))


class S3Store:
    """A real S3-protocol server (moto's server mode) in a process of its own on a free port: streaming, Composer
    and boto3 reach it over HTTP through S3_ENDPOINT_URL, as they would reach a private store."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "moto.log", "w")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.env = {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self._buckets = 0
        import time

        for _ in range(300):  # the server imports Flask and moto first: a few seconds on a busy machine
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited {self.proc.returncode}: {(root / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not listen on {self.endpoint}")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def bucket(self) -> str:
        """A new empty bucket, so tests sharing the server never see each other's objects."""
        self._buckets += 1
        name = f"ettin-test-{os.getpid()}-{self._buckets}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file under `folder` as an object under `prefix`; the folder's s3:// URI."""
        client = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Store(tmp_path_factory.mktemp("s3"))
    yield server
    server.close()


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Store:
    """The session's S3 server, with this test's environment (and so every run_train it starts) pointed at it."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return s3_server


def run_ledger(run_dir: Path) -> dict[int, dict]:
    """A run folder's ledger.jsonl, one line per step, by step."""
    import json

    return {x["step"]: x for x in map(json.loads, (run_dir / "ledger.jsonl").read_text().splitlines())}
