"""Own data without an order (data/permuted.py): one global permutation per epoch, mixtures by weight,
the same global batches on 1 and 2 processes and across a resume, and a resume that reads no earlier batch."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from ettin_train.config.loading import RecipeError, load_recipe
from ettin_train.config.schema import DataConfig, DataSource
from ettin_train.data.mds import frame
from ettin_train.data.order import rows_sha256
from ettin_train.data.permuted import (
    Mixture,
    PermutedBatches,
    apportion,
    resolve_sources,
)
from ettin_train.data.replay import mask_key
from ettin_train.objectives import SpecialTokens
from tests.conftest import composer_launcher, run_train, tiny_recipe, write_recipe

SEED, B = 21, 8


def test_mixture_proportions_follow_the_weights_at_every_step():
    weights = [0.7, 0.2, 0.1]
    mixture = Mixture(weights, B)
    taken = [[] for _ in weights]  # positions of each source's stream, in the order the steps take them
    for step in range(1, 3001):
        rows = mixture.rows(step)
        assert len(rows) == B
        for source, position in rows:
            taken[source].append(position)
        n = step * B
        for i, w in enumerate(weights):
            assert abs(len(taken[i]) - n * w) < 2, f"step {step}: source {i} has {len(taken[i])} of {n} samples"
    # each source's stream is read in order, without a gap or a repeat
    assert all(t == list(range(len(t))) for t in taken)
    assert [len(t) for t in taken] == [16800, 4800, 2400]
    # the apportionment of one house size is the same computed alone (so a resume needs no history)
    assert apportion([Fraction(7, 10), Fraction(2, 10), Fraction(1, 10)], 24000) == [16800, 4800, 2400]
    assert Mixture([3.0, 1.0], 8).rows(5) == Mixture([0.75, 0.25], 8).rows(5)  # weights need not sum to 1


def _tokens(tiny_data: Path) -> SpecialTokens:
    from transformers import AutoTokenizer

    return SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer")))


def _raw(dataset, index: int) -> np.ndarray:
    """A sample's stored ids, read past FramedMDSDataset's framing (the test frames them itself)."""
    from streaming import StreamingDataset

    return StreamingDataset.get_item(dataset, index)["input_ids"]


@pytest.fixture
def mixed(tiny_data, tmp_path):
    """Batches of a two-source mixture: `short` (weight 3) and `long` (weight 1) through a remote copy."""
    from streaming.base.util import clean_stale_shared_memory

    data = DataConfig(path=str(tiny_data), tokenizer="", sources=[
        DataSource(path="short", weight=3.0), DataSource(path=str(tmp_path / "cache"), remote=str(tiny_data / "long"), weight=1.0)])
    batches = PermutedBatches(resolve_sources(data), seed=SEED, global_batch=B, rank=0, world=1, phase="decay", seq_len=64,
                              tokens=_tokens(tiny_data), force_sep=True, collate=lambda samples: {"samples": samples})
    yield batches
    del batches
    clean_stale_shared_memory()


def test_resume_at_step_500000_reads_only_that_steps_samples(mixed, tiny_data):
    reads = []
    for i, dataset in enumerate(mixed.datasets):
        real = dataset.get_item
        dataset.get_item = lambda index, real=real, i=i: reads.append((i, index)) or real(index)

    step = 500_000
    state = mixed.state_dict((step - 1) * B, True)
    assert state["steps_done"] == step - 1
    mixed.load_state_dict(state)
    batch = next(iter(mixed))
    assert len(reads) == B  # nothing of steps 1 .. 499,999 was read
    rows = Mixture([3.0, 1.0], B).rows(step)
    # only the permutations of the epochs this step is in were drawn (a source's positions increase in a step)
    assert {s: epoch for s, (epoch, _) in mixed._perms.items()} == {s: p // mixed.sizes[s] for s, p in rows}

    # the rows are the documented ones: source i's epoch e is PCG64DXSM([seed, e, i]); the masks' keys are the step's
    tokens = _tokens(tiny_data)
    for row, ((source, position), sample) in enumerate(zip(rows, batch["samples"])):
        epoch, offset = divmod(position, mixed.sizes[source])
        index = np.random.Generator(np.random.PCG64DXSM([SEED, epoch, source])).permutation(mixed.sizes[source])[offset]
        assert reads[row] == (source, index)
        np.testing.assert_array_equal(sample["input_ids"], frame(_raw(mixed.datasets[source], index), 64, tokens, True))
        assert sample["key"] == mask_key("decay", step, row)
    assert batch["step"].tolist() == [step] * B

    other = mixed.state_dict(B, True)
    other["stream"]["global_batch"] = 16
    with pytest.raises(ValueError, match="differs from this recipe's in global_batch"):
        mixed.load_state_dict(other)


def test_one_source_is_the_originals_permutation_across_an_epoch_end(tiny_data):
    from streaming.base.util import clean_stale_shared_memory

    tokens = _tokens(tiny_data)
    batches = PermutedBatches(resolve_sources(DataConfig(path=str(tiny_data / "short"), tokenizer="")), seed=SEED,
                              global_batch=B, rank=0, world=1, phase="pretrain", seq_len=64, tokens=tokens, force_sep=True,
                              collate=lambda samples: {"samples": samples})
    try:
        n = batches.sizes[0]
        assert n % B, "the fixture should end its epoch inside a step"
        perms = [np.random.Generator(np.random.PCG64DXSM(SEED + e)).permutation(n) for e in (0, 1)]
        stream = np.concatenate(perms)  # epoch 1 follows epoch 0 without dropping a sample
        for step in (1, 2, n // B + 1, n // B + 2):
            got = [s["input_ids"] for s in batches.batch(step)["samples"]]
            want = [frame(_raw(batches.datasets[0], i), 64, tokens, True) for i in stream[(step - 1) * B : step * B]]
            assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == B, f"step {step}"
    finally:
        del batches
        clean_stale_shared_memory()


def test_sources_are_checked_with_their_key(tiny_data, tmp_path):
    data = DataConfig(path=str(tiny_data), tokenizer="", sources=[DataSource(path="short"), DataSource(path="nowhere")])
    with pytest.raises(ValueError, match=r"^data.sources\[1\].path: .*nowhere/index.json does not exist"):
        resolve_sources(data)
    data.sources[1] = DataSource(path=str(tiny_data / "short"), weight=2.0)
    with pytest.raises(ValueError, match=r"^data.sources\[1\].path: .* is also the folder of data.sources\[0\]"):
        resolve_sources(data)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run"))
    with pytest.raises(RecipeError, match=r"key 'data.sources\[1\].weight' \(set on the command line\) must be positive"):
        load_recipe(recipe, ["data.sources=[{path: short, weight: 0.5}, {path: long, weight: -1}]"])
    with pytest.raises(RecipeError, match=r"unknown key 'data.sources\[0\].wieght'.*did you mean 'data.sources\[0\].weight'"):
        load_recipe(recipe, ["data.sources=[{path: short, wieght: 0.5}]"])


def _ledger(run_dir: Path) -> list[dict]:
    """What each step trained on. Without `loss`: 2 processes average two half-batch means, which differs from
    one process's whole-batch mean when the halves hold different numbers of tokens (docs/launching.md)."""
    lines = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "loss"} for line in lines]


@pytest.mark.slow
def test_one_and_two_processes_stopped_and_resumed_train_on_the_same_mixed_batches(tiny_data, tmp_path):
    def recipe(name: str) -> Path:
        sources = [{"path": "short", "weight": 3.0}, {"path": str(tmp_path / name / "cache"), "remote": str(tiny_data / "long")}]
        r = tiny_recipe(tiny_data, tmp_path / name, data={"path": str(tiny_data), "sources": sources, "num_workers": 2},
                        train={"max_duration": "8ba"}, checkpoint={"interval": "4ba"})
        return write_recipe(tmp_path / f"{name}.yaml", r)

    run_train(str(recipe("one")))
    one = _ledger(tmp_path / "one")
    assert [line["step"] for line in one] == [line["data_step"] for line in one] == list(range(1, 9))

    run_train(str(recipe("two")), "train.stop_after=3ba", launcher=composer_launcher())
    resumed = run_train(str(recipe("two")), launcher=composer_launcher())
    assert "resuming from" in resumed.stdout
    assert _ledger(tmp_path / "two") == one  # same rows, same masks, every step once

    # and they are the documented rows: 3:1 by Sainte-Lague, each source in its own permutation
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    tokens = _tokens(tiny_data)
    readers = [StreamingDataset(local=str(tiny_data / name), shuffle=False, batch_size=1) for name in ("short", "long")]
    try:
        perms = [np.random.Generator(np.random.PCG64DXSM([SEED, 0, i])).permutation(r.num_samples) for i, r in enumerate(readers)]
        for line in one:
            rows = [frame(readers[s][int(perms[s][p])]["input_ids"], 64, tokens, True) for s, p in Mixture([3.0, 1.0], B).rows(line["step"])]
            assert line["rows_sha256"] == rows_sha256(rows), f"step {line['step']}"
    finally:
        del readers
        clean_stale_shared_memory()


@pytest.mark.slow
def test_a_global_batch_the_ranks_cannot_share_is_refused_before_the_run(tiny_data, tmp_path):
    r = write_recipe(tmp_path / "odd.yaml", tiny_recipe(tiny_data, tmp_path / "odd", train={"global_batch": 7}))
    proc = run_train(str(r), launcher=composer_launcher(), check=False)
    assert proc.returncode != 0
    assert "error: train.global_batch 7 is not divisible by the world size 2" in proc.stderr
    assert not (tmp_path / "odd").exists()
