"""`ettin-eval` over real runs: run folders and an export repository's tags give one table (the same
numbers by either path), a plot, and a second call computes nothing new; bad input stops before writing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from ettin_train.eval.cli import main as eval_main
from ettin_train.export import main as export_main
from tests.conftest import ROOT, run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """An encoder (pretrain 4 steps, extension 2), a decoder (pretrain 2), an MNTP encoder started from the
    decoder (1 step), and the encoder's phases exported to a repository."""
    root = tmp_path_factory.mktemp("eval-runs")
    pre = tiny_recipe(tiny_data, root / "pre", "mlm", train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"})
    run_train(str(write_recipe(root / "pre.yaml", pre)))
    ext = tiny_recipe(tiny_data, root / "ext", "mlm", phase="extension", data={"path": str(tiny_data / "long"), "seq_len": 128},
                      scheduler={"name": "one_minus_sqrt", "warmup": "0ba", "decay": None, "alpha_f": 0.5},
                      train={"max_duration": "2ba"}, checkpoint={"interval": "1ba"}, init={"checkpoint": str(root / "pre")})
    run_train(str(write_recipe(root / "ext.yaml", ext)))
    dec = tiny_recipe(tiny_data, root / "dec", "clm", train={"max_duration": "2ba"}, checkpoint={"interval": "1ba"})
    run_train(str(write_recipe(root / "dec.yaml", dec)))
    mntp = tiny_recipe(tiny_data, root / "mntp", "mntp", train={"max_duration": "1ba"}, checkpoint={"interval": "1ba"},
                       init={"checkpoint": str(root / "dec"), "load": "model"})
    run_train(str(write_recipe(root / "mntp.yaml", mntp)))
    repo = root / "repo"
    for run in ("pre", "ext"):
        assert export_main([str(root / run), "--out", str(repo)]) == 0
    return root


def ettin_eval(*args: str) -> int:
    return eval_main([*map(str, args), "--seq-len", "64", "--batches", "2", "--batch-size", "4"])


def rows(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["kind"], r["tag"]): r for r in json.loads((out / "eval.json").read_text())["rows"]}


def test_run_folders_give_a_table_and_a_plot_and_a_second_call_computes_nothing(runs, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    heldout = tiny_data / "heldout_short"
    assert ettin_eval(runs / "pre", runs / "ext", runs / "dec", "--data", heldout, "--out", out) == 0
    table = rows(out)
    assert sorted(table) == [("decoder", "step1"), ("decoder", "step2"), ("encoder", "ext1"), ("encoder", "ext2"),
                             ("encoder", "step2"), ("encoder", "step4")]
    tokens = [table[("encoder", t)]["tokens"] for t in ("step2", "step4", "ext1", "ext2")]
    assert tokens == sorted(tokens) and len(set(tokens)) == 4  # the extension's clock continues the pre-training's
    phases = json.loads((out / "eval.json").read_text())["phases"]
    assert phases["encoder"]["extension"] == tokens[1]  # the extension starts where step4 ended
    assert all(0 < r["loss"] < 10 and 0 <= r["accuracy"] <= 1 for r in table.values())
    assert all(r["perplexity"] is not None for (kind, _), r in table.items() if kind == "decoder")
    assert table[("encoder", "step4")]["loss"] != table[("encoder", "step2")]["loss"]
    csv_lines = (out / "eval.csv").read_text().splitlines()
    assert csv_lines[0].startswith("kind,objective,tag") and len(csv_lines) == 7
    image = matplotlib.image.imread(out / "eval.png")
    assert image.shape[0] > 200 and image.shape[1] > 600  # three panels: loss, accuracy, perplexity

    before = (out / "eval.json").read_text()
    capsys.readouterr()
    proc = subprocess.run([sys.executable, "-m", "ettin_train.eval", str(runs / "pre"), str(runs / "ext"), str(runs / "dec"),
                           "--data", str(heldout), "--out", str(out), "--seq-len", "64", "--batches", "2", "--batch-size", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "6 checkpoint(s), 6 already in" in proc.stdout and "0 to evaluate" in proc.stdout
    assert (out / "eval.json").read_text() == before


def test_export_tags_give_the_numbers_of_their_checkpoints(runs, tiny_data, tmp_path):
    """The tags are loaded through transformers (from the exported folder, with the tokenizer exported
    with them), the run folders from the raw checkpoints: the same weights must give the same numbers."""
    heldout = ["--data", tiny_data / "heldout_short"]
    assert ettin_eval(runs / "repo", *heldout, "--out", tmp_path / "tags", "--tags", "step*", "ext2") == 0
    # ext2 is a tag of the second folder only: a name must match in some source, not in each
    assert ettin_eval(runs / "pre", runs / "ext", *heldout, "--out", tmp_path / "runs", "--tags", "step*", "ext2") == 0
    tags, ckpts = rows(tmp_path / "tags"), rows(tmp_path / "runs")
    assert sorted(t for _, t in tags) == sorted(t for _, t in ckpts) == ["ext2", "step2", "step4"]
    for key, row in tags.items():
        assert row["tokens"] == ckpts[key]["tokens"]
        assert row["scored_tokens"] == ckpts[key]["scored_tokens"]
        assert row["loss"] == pytest.approx(ckpts[key]["loss"], abs=1e-4)


def test_bad_input_stops_with_one_error_and_writes_nothing(runs, tiny_data, tmp_path, capsys):
    heldout = ["--data", tiny_data / "heldout_short"]
    out = tmp_path / "out"
    assert ettin_eval(runs / "repo", *heldout, "--out", out, "--tags", "step99") == 2
    assert "tag 'step99' does not exist in" in capsys.readouterr().err and not out.exists()
    assert ettin_eval(runs / "pre", "--data", tiny_data / "short", "--out", out) == 2
    assert "is the training source" in capsys.readouterr().err and not out.exists()
    assert ettin_eval(runs / "pre", runs / "mntp", *heldout, "--out", out) == 2
    assert "is a mntp checkpoint" in capsys.readouterr().err and not out.exists()

    assert ettin_eval(runs / "pre", *heldout, "--out", out, "--tags", "step2") == 0
    before = (out / "eval.json").read_text()
    assert ettin_eval(runs / "mntp", *heldout, "--out", out) == 2  # the table's encoder rows are mlm
    assert "is a mntp checkpoint" in capsys.readouterr().err
    assert eval_main([str(runs / "pre"), *map(str, heldout), "--out", str(out), "--seq-len", "64", "--batches", "2",
                      "--batch-size", "4", "--seed", "7"]) == 2
    assert "was made with" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == before
