"""Recipes: inheritance, overrides, and one clear line (key, file, nearest valid key) for every mistake."""

from __future__ import annotations

import pytest
import yaml

from ettin_train.config import RecipeError, load_recipe
from tests.conftest import ROOT, run_train

BASE = {
    "objective": "mlm",
    "model": {"size": "17m", "rope_theta_global": 10000.0},
    "data": {"path": "shards", "tokenizer": "tok"},
    "optimizer": {"lr": 3e-3},
    "train": {"max_duration": "1000ba"},
    "checkpoint": {"interval": "100ba"},
}


@pytest.fixture
def recipe_files(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    child = {"base": "base.yaml", "run_name": "r", "run_dir": "runs/r", "model": {"rope_theta_global": 160000.0}}
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(child))
    return tmp_path


def test_child_overrides_base_and_command_line_overrides_both(recipe_files):
    recipe, sources = load_recipe(recipe_files / "child.yaml", ["optimizer.lr=1e-3", "data.seq_len=512"])
    assert recipe.model.rope_theta_global == 160000.0  # child wins over base
    assert recipe.model.size == "17m" and recipe.model.hidden_size == 256  # inherited, preset filled in
    assert recipe.optimizer.lr == 1e-3 and recipe.data.seq_len == 512
    assert sources["model.rope_theta_global"].endswith("child.yaml")
    assert sources["model.size"].endswith("base.yaml")
    assert sources["optimizer.lr"] == "the command line"
    assert recipe.model.causal is False  # follows the objective


def test_objective_sets_attention_direction(recipe_files):
    recipe, _ = load_recipe(recipe_files / "child.yaml", ["objective=clm"])
    assert recipe.model.causal is True


def _error(recipe_files, *overrides, name="child.yaml") -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_files / name, list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_key_on_command_line_names_nearest_key(recipe_files):
    msg = _error(recipe_files, "model.hiden_size=3")
    assert "'model.hiden_size'" in msg and "command line" in msg and "did you mean 'model.hidden_size'" in msg


def test_unknown_key_in_file_names_the_file(recipe_files):
    (recipe_files / "typo.yaml").write_text(yaml.safe_dump({"base": "child.yaml", "optimiser": {"lr": 1.0}}))
    msg = _error(recipe_files, name="typo.yaml")
    assert "'optimiser'" in msg and "typo.yaml" in msg and "did you mean 'optimizer'" in msg


def test_wrong_type_names_key_and_expected_type(recipe_files):
    msg = _error(recipe_files, "train.global_batch=many")
    assert "'train.global_batch'" in msg and "must be an integer" in msg and "'many'" in msg
    msg = _error(recipe_files, "checkpoint.autoresume=3")
    assert "'checkpoint.autoresume'" in msg and "true or false" in msg


def test_choice_suggests_nearest_value(recipe_files):
    msg = _error(recipe_files, "phase=extention")
    assert "'phase'" in msg and "did you mean 'extension'" in msg
    msg = _error(recipe_files, "objective=mllm")
    assert "'objective'" in msg and "did you mean 'mlm'" in msg


def test_missing_required_value(recipe_files):
    no_path = {k: v for k, v in BASE.items() if k != "data"} | {"data": {"tokenizer": "tok"}, "run_name": "r", "run_dir": "d"}
    (recipe_files / "nodata.yaml").write_text(yaml.safe_dump(no_path))
    msg = _error(recipe_files, name="nodata.yaml")
    assert "missing value for required key 'data.path'" in msg and "nodata.yaml" in msg


def test_bad_duration_and_mixed_units(recipe_files):
    assert "'train.max_duration'" in _error(recipe_files, "train.max_duration=10 epochs")
    msg = _error(recipe_files, "scheduler.warmup=100tok")
    assert "'scheduler.warmup'" in msg and "one unit" in msg


def test_unknown_size_names_key_and_choices(recipe_files):
    msg = _error(recipe_files, "model.size=17M")
    assert "model.size" in msg and "17m" in msg and "command line" in msg


def test_invalid_yaml_names_file_and_line(recipe_files):
    (recipe_files / "broken.yaml").write_text("run_name: r\nmodel: [unclosed\n")
    msg = _error(recipe_files, name="broken.yaml")
    assert "broken.yaml" in msg and "line" in msg


def test_missing_base_and_cycles(recipe_files):
    (recipe_files / "orphan.yaml").write_text(yaml.safe_dump({"base": "nowhere.yaml"}))
    assert "nowhere.yaml" in _error(recipe_files, name="orphan.yaml")
    (recipe_files / "a.yaml").write_text(yaml.safe_dump({"base": "b.yaml"}))
    (recipe_files / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml"}))
    assert "cycle" in _error(recipe_files, name="a.yaml")


def test_causal_is_not_a_recipe_key(recipe_files):
    assert "unknown key 'model.causal'" in _error(recipe_files, "model.causal=true")


def test_train_py_exits_2_with_one_line_and_no_traceback():
    proc = run_train("yamls/demo/encoder/pretrain.yaml", "model.hiden_size=3", "--plan", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "model.hiden_size" in lines[0] and "model.hidden_size" in lines[0]


def test_every_demo_recipe_loads():
    for path in sorted((ROOT / "yamls").rglob("*.yaml")):
        if "phases" in path.parts or path.name == "base.yaml":
            continue
        load_recipe(path)


def test_an_unknown_key_without_a_near_one_lists_each_valid_key_once(recipe_files):
    line = _error(recipe_files, "train.zzzzzzzzqq=1")
    listed = line.partition("valid keys here: ")[2].split(", ")
    assert "train.max_duration" in listed and len(listed) == len(set(listed)), line


def test_evaluation_masks_at_the_originals_rate(recipe_files):
    """The original runs trained their encoders at 30% masking but evaluated at 15% (eval_loader's
    mlm_probability in every Ettin encoder YAML): in-loop eval and ettin-eval default to that."""
    from ettin_train.eval.cli import parse_args

    recipe, _ = load_recipe(recipe_files / "child.yaml", [])
    assert recipe.eval.mask_rate == 0.15
    assert parse_args(["run", "--data", "d", "--out", "o"]).mask_rate == 0.15
