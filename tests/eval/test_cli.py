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
from tests.conftest import ROOT, run_train, tiny_recipe, wandb_offline_run, write_recipe

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
    dec = tiny_recipe(tiny_data, root / "dec", "clm", train={"max_duration": "2ba"}, checkpoint={"interval": "1ba"},
                      eval={"sources": [str(tiny_data / "heldout_short")], "interval": "2ba", "batches": 1, "batch_size": 4,
                            "seq_len": 64})
    run_train(str(write_recipe(root / "dec.yaml", dec)))
    mntp = tiny_recipe(tiny_data, root / "mntp", "mntp", train={"max_duration": "1ba"}, checkpoint={"interval": "1ba"},
                       init={"checkpoint": str(root / "dec"), "load": "model"})
    run_train(str(write_recipe(root / "mntp.yaml", mntp)))
    repo = root / "repo"
    for run in ("pre", "ext"):
        assert export_main([str(root / run), "--out", str(repo)]) == 0
    assert export_main([str(root / "dec"), "--out", str(root / "repo_dec")]) == 0
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


def test_without_data_a_run_folder_is_evaluated_on_its_own_eval_sources(runs, tmp_path):
    out = tmp_path / "out"
    assert ettin_eval(runs / "dec", "--out", out) == 0
    assert {(r["tag"], r["data"]) for r in rows_list(out)} == {("step1", "heldout_short"), ("step2", "heldout_short")}


def rows_list(out: Path) -> list[dict]:
    return json.loads((out / "eval.json").read_text())["rows"]


QUESTIONS = [("Return the number of", ["items in the list.", "green ideas sleep."], 0),
             ("Raise ValueError if the", ["purple is a banana.", "value is not found."], 1),
             ("This module provides", ["functions for files.", "the the the the."], 0),
             ("Open the file and", ["sky the of.", "read its lines."], 1)]


METRIC = "  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a cloze task in lm-eval's custom-task format: JSON lines and a task YAML."""
    folder.mkdir()
    with (folder / "mc.jsonl").open("w") as f:
        for q, choices, label in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n" + METRIC.format("acc") + METRIC.format("acc_norm"))
    with (folder / "cloze.jsonl").open("w") as f:
        for q, choices, label in QUESTIONS:
            f.write(json.dumps({"text": q, "word": choices[label]}) + "\n")
    (folder / "tiny_cloze.yaml").write_text(
        f"task: tiny_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{text}}'\ndoc_to_target: ' {{word}}'\n"
        "metric_list:\n" + METRIC.format("acc"))
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{text}}'\ndoc_to_target: ' {{word}}'\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def test_tasks_score_both_halves_on_the_same_items(runs, tiny_data, tmp_path):
    """Every tag of the encoder and of the decoder gets the tasks' metrics (encoder: pseudo-log-likelihood),
    on the same items; the encoder's accuracy is the one worked out from the scorer's reference loop."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ettin_train.checkpoint.tags import checkout_tag
    from ettin_train.eval.pll import encode_pair, score_loop

    tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "out"
    args = ["--tasks", "tiny_mc", "tiny_cloze", "--include-path", tasks, "--out", out]
    assert ettin_eval(runs / "repo", runs / "repo_dec", "--tags", "step4", "ext2", "step2", *args,
                      "--wandb-project", "ettin-test", "--wandb-mode", "offline", "--wandb-group", "ettin-tiny") == 0
    run, keys = wandb_offline_run(out)  # the table and the plot, in the training runs' group
    assert run.run_group == "ettin-tiny" and {"eval/table/_type", "eval/plot/_type"} <= keys
    got = {(r["kind"], r["tag"], r["data"], r["metric"]): r for r in rows_list(out)}
    expect = {(k, t, d, m) for k, t in (("encoder", "step2"), ("encoder", "step4"), ("encoder", "ext2"), ("decoder", "step2"))
              for d, m in (("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("tiny_cloze", "acc"))}
    assert set(got) == expect
    assert {r["items"] for r in got.values()} == {len(QUESTIONS)}
    assert all(0 <= r["score"] <= 1 and r["tokens"] for r in got.values())

    folder = checkout_tag(runs / "repo", "ext2", tmp_path / "ext2")
    model, tok = AutoModelForMaskedLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    right = 0
    for q, choices, label in QUESTIONS:  # lm-eval puts its target_delimiter " " between question and choice
        plls = score_loop(model, [encode_pair(tok, q + " ", c, 512) for c in choices], tok.mask_token_id)
        right += max(range(len(choices)), key=lambda i: plls[i]) == label
    assert got[("encoder", "ext2", "tiny_mc", "acc")]["score"] == pytest.approx(right / len(QUESTIONS))

    image = matplotlib.image.imread(out / "eval.png")
    assert image.shape[1] > 1200  # three panels: tiny_cloze acc, tiny_mc acc, tiny_mc acc_norm
    before = (out / "eval.json").read_text()
    assert ettin_eval(runs / "repo", runs / "repo_dec", "--tags", "step4", "ext2", "step2", *args) == 0
    assert (out / "eval.json").read_text() == before  # nothing new to score


def test_bad_tasks_stop_before_anything_is_written(runs, tmp_path, capsys):
    tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "out"
    assert ettin_eval(runs / "repo_dec", "--tasks", "no_such_task", "--include-path", tasks, "--out", out) == 2
    assert "--tasks no_such_task: no such task in" in capsys.readouterr().err and not out.exists()
    assert ettin_eval(runs / "repo", "--tasks", "tiny_gen", "--include-path", tasks, "--out", out) == 2
    assert "task tiny_gen is generate_until: an encoder cannot generate" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "probe.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n')
    assert ettin_eval(runs / "repo", "--probe", bad, "--out", out) == 2
    assert "probe.jsonl:1: not a JSON object" in capsys.readouterr().err and not out.exists()
