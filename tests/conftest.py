"""Shared fixtures: a tokenizer and MDS shards built on the spot (no download), and tiny recipes."""

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
    """streaming keeps shared memory per dataset; a crashed earlier run can leave some behind."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`tokenizer/` (byte-level BPE, 512 tokens, ModernBERT special tokens) and MDS folders `short`
    (64-token pieces) and `long` (128-token pieces) from standard-library docstrings."""
    from ettin_train.data.demo_corpus import build_demo_data

    out = tmp_path_factory.mktemp("tiny_data")
    build_demo_data(str(out), max_chars=150_000, vocab_size=512, seq_lens={"short": 64, "long": 128})
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


def free_port() -> int:
    """A port no one listens on now: fixed ports collide with other test runs on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_train(*args: str, launcher: list[str] | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Runs train.py in a fresh process, as a user would."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc
