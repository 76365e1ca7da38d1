"""Downstream tasks of lm-evaluation-harness (PyPI `lm-eval`, the `eval` extra) for both halves of a pair.

A decoder tag runs through lm-eval's own `HFLM` on the tag's transformers folder. An encoder tag runs through
`MaskedLM`, an lm-eval model whose log-likelihood of a continuation is its pseudo-log-likelihood (pll.py).
Both go through `lm_eval.simple_evaluate` with the same task objects, so they answer the same items
(doc_to_text, doc_to_choice, doc_to_target of the task's YAML, the same few-shot examples and `--limit`) and
get the same metrics (acc, acc_norm, ...). Tasks whose answers are generated (`generate_until`) have no
encoder score and are refused for encoders before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ettin_train.eval.pll import encode_pair, score

SCORED_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")  # what a masked LM can score


class TaskError(ValueError):
    """A task that cannot be run (one line)."""


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError("--tasks needs lm-eval: pip install 'ettin-train[eval]' (make setup installs it)") from None
    import lm_eval

    return lm_eval


def task_manager(names: list[str], include_path: str | None = None):
    """lm-eval's TaskManager that knows every name; tasks all found in `include_path` are loaded without
    indexing lm-eval's own task folders (seconds instead of most of a minute)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise TaskError(f"--include-path {include_path}: no such folder")
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = f"lm-eval {lm_eval.__version__}'s tasks" + (f" or {include_path}" if include_path else "")
        raise TaskError(f"--tasks {', '.join(missing)}: no such task in {where} (lm-eval ls tasks lists them)")
    return manager


def output_types(names: list[str], manager) -> dict[str, str]:
    """Each task's (a group's: each of its subtasks') output_type, read from its loaded config."""
    return {name: task.OUTPUT_TYPE for name, task in manager.load(names)["tasks"].items()}


def check_encoder_tasks(names: list[str], manager) -> None:
    for task, kind in output_types(names, manager).items():
        if kind not in SCORED_TYPES:
            raise TaskError(f"task {task} is {kind}: an encoder cannot generate its answers (only {', '.join(SCORED_TYPES)} tasks)")


def _masked_lm_class():
    from lm_eval.api.model import LM

    class MaskedLM(LM):
        """An lm-eval model for a transformers masked LM: log-likelihood = pseudo-log-likelihood."""

        def __init__(self, model, tokenizer, batch_size: int = 64):
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
            self.max_len = min(getattr(model.config, "max_position_embeddings", 512), tokenizer.model_max_length)

        def _score(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
            items = [encode_pair(self.tokenizer, c, x, self.max_len) for c, x in pairs]
            return score(self.model, items, self.tokenizer.mask_token_id, self.tokenizer.pad_token_id, self.batch_size)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._score([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [s for s, _ in self._score([("", r.args[0]) for r in requests])]

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise TaskError("an encoder cannot generate: generate_until tasks have no encoder score")

    return MaskedLM


def run_tasks(folder: Path, causal: bool, names: list[str], manager, device: str = "cpu", batch_size: int = 16,
              limit: int | None = None, num_fewshot: int | None = None) -> dict[str, tuple[dict[str, float], int | None]]:
    """task -> (metric -> value, items scored) for the transformers folder `folder` (a decoder if `causal`, else
    a masked LM)."""
    lm_eval = _lm_eval()
    if causal:
        from lm_eval.models.huggingface import HFLM

        # add_bos_token: the decoders train on sequences that start with [CLS] (as the Ettin evaluation docs run lm-eval)
        lm = HFLM(pretrained=str(folder), backend="causal", device=device, batch_size=batch_size, dtype="float32",
                  add_bos_token=True)
    else:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        model = AutoModelForMaskedLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
        lm = _masked_lm_class()(model.to(device), AutoTokenizer.from_pretrained(str(folder)), batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  bootstrap_iters=0, log_samples=False)
    items = {task: n.get("effective", n.get("original")) if isinstance(n, dict) else n for task, n in out.get("n-samples", {}).items()}
    return {task: (metrics(values), items.get(task, values.get("sample_len"))) for task, values in out["results"].items()}


def metrics(values: dict) -> dict[str, float]:
    """lm-eval's `acc,none` / `acc_norm,none` (metric,filter) as `acc`, `acc_norm`; stderrs and names dropped."""
    found = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        found[metric if filt == "none" else f"{metric}:{filt}"] = float(value)
    return found


def write_choice_task(folder: str | Path, name: str, items: list[tuple[str, list[str], int]]) -> Path:
    """A multiple-choice task in lm-eval's custom-task format in `folder` (for `--include-path`): NAME.jsonl, one
    item a line ({question, choices, label}), and NAME.yaml naming it (acc and acc_norm). Returns the YAML."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n" for q, c, label in items))
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in ("acc", "acc_norm"))
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
                         "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                         f"doc_to_choice: '{{{{choices}}}}'\ndoc_to_target: '{{{{label}}}}'\nmetric_list:\n{metrics}")
    return yaml_path
