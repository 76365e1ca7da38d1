"""`ettin-eval SOURCE... --data HELDOUT... --out DIR` (also `python -m ettin_train.eval`): held-out metrics of
every checkpoint of run folders, export repositories (their tags) or Hub repositories (hf://ORG/NAME, their
revisions), into DIR/eval.json, DIR/eval.csv and DIR/eval.png. docs/eval.md describes it. `--tasks` adds
lm-eval tasks (decoders through lm-eval's HFLM, encoders by pseudo-log-likelihood: harness.py), `--probe` a
linear probe of frozen embeddings (probe.py); without `--data`, run folders' own `eval.sources` are the held-out data.

Everything is checked before anything is computed or written: the sources and tags exist, the held-out
data is not training data, the table in DIR (if any) was made with the same settings, and each model kind
keeps one objective. Rows already in the table are not computed again, so a second call only adds what is new.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from ettin_train.eval.data import EvalSettings, HeldOut, HeldOutError, check_disjoint, index_digest, read_rows
from ettin_train.eval.harness import TaskError
from ettin_train.eval.probe import ProbeError
from ettin_train.eval.sources import SourceError, cumulative_tokens, list_points, select
from ettin_train.eval.table import Table, print_table

PROG = "ettin-eval"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description="Held-out loss and accuracy of checkpoints, tags or Hub revisions.")
    p.add_argument("sources", nargs="+", help="run folders, export repositories (ettin-export --out), or hf://ORG/NAME")
    p.add_argument("--data", action="append", help="held-out MDS folder (repeat for several); default: the eval.sources "
                   "of the run folders' recipes")
    p.add_argument("--out", required=True, help="folder of eval.json, eval.csv and eval.png")
    p.add_argument("--tags", nargs="+", help="tags to evaluate: names or patterns (step*, ext*, decay*); default all")
    p.add_argument("--train-data", action="append", default=[],
                   help="training MDS folders the held-out data must not be (run folders' recipe.yaml are read too)")
    p.add_argument("--trust-pickles", action="store_true",
                   help="unpickle run-folder checkpoints whole, also types a Composer checkpoint does not hold (only for files you trust)")
    p.add_argument("--tokenizer", help="tokenizer folder or Hub name; default: the one each checkpoint names")
    d = EvalSettings()
    p.add_argument("--batches", type=int, default=d.batches)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--mask-rate", type=float, default=d.mask_rate, help="MLM/MNTP masking (the same for every tag)")
    p.add_argument("--seed", type=int, default=d.seed, help="fixes the held-out rows and their masks")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    t = p.add_argument_group("downstream tasks (lm-eval; encoders by pseudo-log-likelihood)")
    t.add_argument("--tasks", nargs="+", default=[], help="lm-eval task names (lm-eval ls tasks), or of --include-path")
    t.add_argument("--include-path", help="folder of custom lm-eval task YAMLs")
    t.add_argument("--limit", type=int, help="score the first N items of each task only")
    t.add_argument("--num-fewshot", type=int, help="few-shot examples per item (default: the task's own)")
    t.add_argument("--task-batch-size", type=int, default=16, help="sequences (decoders) or masked rows (encoders) per forward")
    t.add_argument("--probe", action="append", default=[],
                   help="JSON-lines file of {text, label, split: train|test}: a linear probe on mean-pooled embeddings")
    w = p.add_argument_group("wandb (the table and the plot as one run)")
    w.add_argument("--wandb-project", help="log the table and plot to this wandb project")
    w.add_argument("--wandb-group", help="the run's group: the training runs' group puts it beside them (ettin-<size>)")
    w.add_argument("--wandb-name", help="the run's name; default: ettin-eval <out folder name>")
    w.add_argument("--wandb-mode", choices=["auto", "online", "offline"], default="auto",
                   help="auto: online when WANDB_API_KEY is set, else offline")
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def training_folders(sources: list[str]) -> list[str]:
    """The MDS folders the run folders among `sources` trained on (from their recipe.yaml)."""
    from ettin_train.config.schema import DataConfig, DataSource
    from ettin_train.data.permuted import resolve_sources

    out = []
    for s in sources:
        recipe = Path(s) / "recipe.yaml"
        if recipe.is_file():
            data = yaml.safe_load(recipe.read_text())["data"]
            if data.get("order"):
                continue  # an imported order names no MDS folder of its own
            cfg = DataConfig(**{**data, "sources": [DataSource(**x) for x in data.get("sources") or []]})
            try:
                specs = resolve_sources(cfg)
            except ValueError:  # the run's data has moved since: nothing here to compare with
                continue
            out += [os.path.join(x.local, x.split or "") for x in specs]
    return out


def plan(args, workdir: Path) -> tuple[EvalSettings, list, dict, Table]:
    """All checks (tags are extracted into `workdir` when loaded); returns the settings, the points to evaluate with their tokens seen, the phase starts
    and the table. Raises SourceError or HeldOutError (nothing is written)."""
    settings = EvalSettings(args.batches, args.batch_size, args.seq_len, args.mask_rate, args.seed)
    args.sources = [_local(s) for s in args.sources]
    args.data = args.data or [d for s in args.sources for d in _recipe_eval_sources(s)]
    if not (args.data or args.tasks or args.probe):
        raise HeldOutError("nothing to evaluate: give --data (no run folder among the sources has eval.sources), --tasks or --probe")
    for folder in args.data:
        if not (Path(folder) / "index.json").is_file():
            raise HeldOutError(f"--data {folder}: {Path(folder) / 'index.json'} does not exist (MDS shards)")
    check_disjoint(args.data, args.train_data + training_folders(args.sources))
    listed = [p for s in args.sources for p in list_points(s, workdir, args.trust_pickles)]
    chosen_tags = select({s: [p.tag for p in listed if p.source == s] for s in args.sources}, args.tags)
    chosen = [p for p in listed if p.tag in chosen_tags[p.source]]
    tokens, starts = cumulative_tokens(listed)
    table = Table(Path(args.out))
    downstream = check_downstream(args, chosen)
    wanted = {"eval": vars(settings), "data": {_name(d): index_digest(d) for d in args.data}}
    if (args.tasks or args.probe) and table.settings is not None and table.settings.get("tasks", downstream) != downstream:
        raise HeldOutError(f"{table.json}: its tasks were scored with {table.settings['tasks']}, not {downstream}: "
                           "use another --out or the same settings")
    if table.settings is not None and args.data:
        if table.settings.get("eval", wanted["eval"]) != wanted["eval"]:
            raise HeldOutError(f"{table.json} was made with {table.settings['eval']}, not {wanted['eval']}: "
                               "use another --out or the same settings")
        for name, digest in wanted["data"].items():
            if table.settings["data"].get(name, digest) != digest:
                raise HeldOutError(f"{table.json}: held-out source {name} has other shards than when the table was made")
    kinds: dict[str, str] = {}
    for p in chosen:
        known = table.objective_of(p.kind) or kinds.setdefault(p.kind, p.objective)
        if known and p.objective and known != p.objective:
            raise SourceError(f"{p.source} {p.tag} is a {p.objective} checkpoint, but the other {p.kind} checkpoints "
                              f"(of this call or in {table.json}) are {known}: evaluate it into another --out")
        kinds[p.kind] = known
    old = table.settings or {}
    table.settings = {**old, "data": {**old.get("data", {}), **wanted["data"]}}
    if args.data:
        table.settings["eval"] = wanted["eval"]
    if args.tasks or args.probe:
        table.settings["tasks"] = downstream
    for kind, phases in starts.items():
        table.phases.setdefault(kind, {}).update(phases)
    return settings, [(p, tokens[id(p)]) for p in chosen], starts, table


def _local(source: str) -> str:
    """A run folder in an object store (s3://, gs://, hf://datasets/...) as its local copy (stores.py); hf://ORG/NAME
    stays an export repository on the Hub."""
    from ettin_train import stores

    if not stores.is_store(source):
        return source
    try:
        return str(stores.local_copy(source))
    except stores.StoreError as e:
        raise SourceError(str(e)) from None


def _recipe_eval_sources(source: str) -> list[str]:
    """A run folder's own held-out sources: `eval.sources` of its recipe.yaml."""
    recipe = Path(source) / "recipe.yaml"
    if not recipe.is_file():
        return []
    return list((yaml.safe_load(recipe.read_text()).get("eval") or {}).get("sources") or [])


def check_downstream(args, points) -> dict:
    """Checks the tasks and probe files before anything runs (names exist, encoders get no generation task,
    probe files parse); keeps the task manager on `args`. Returns the settings the scores depend on."""
    from ettin_train.eval.probe import read_probe

    args.task_manager = None
    if args.tasks:
        from ettin_train.eval.harness import check_encoder_tasks, task_manager

        args.task_manager = task_manager(args.tasks, args.include_path)
        if any(p.kind == "encoder" for p in points):
            check_encoder_tasks(args.tasks, args.task_manager)
    for path in args.probe:
        read_probe(path)
    return {"limit": args.limit, "num_fewshot": args.num_fewshot}


def probe_name(path: str) -> str:
    return f"probe:{Path(path).stem}"


def _name(folder: str) -> str:
    return Path(folder).resolve().name


def run(args) -> Table:
    with tempfile.TemporaryDirectory(prefix="ettin-eval-") as workdir:
        return _run(args, Path(workdir))


def _run(args, workdir: Path) -> Table:
    from tqdm import tqdm

    import torch

    from ettin_train.eval.metrics import evaluate
    from ettin_train.objectives import SpecialTokens, get_objective

    settings, points, _, table = plan(args, workdir)
    todo = [(p, t) for p, t in points if not all(table.has(p.kind, p.tag, _name(d)) for d in args.data)]
    if args.data:
        print(f"{PROG}: {len(points)} checkpoint(s), {len(points) - len(todo)} already in {table.json}, {len(todo)} to evaluate",
              flush=True)
    rows = {d: read_rows(d, settings) for d in args.data} if todo else {}
    tokenizers: dict[str, SpecialTokens] = {}
    device = torch.device(args.device)
    for p, seen in tqdm(todo, desc=PROG, unit="ckpt", disable=not todo):
        model, objective_name, tokenizer = p.load()
        tokenizer = args.tokenizer or tokenizer
        if tokenizer is None:
            raise SourceError(f"{p.source} {p.tag}: no tokenizer recorded or included: give --tokenizer")
        if not isinstance(tokenizer, str):  # one that came with an exported folder
            special = SpecialTokens.from_tokenizer(tokenizer)
        else:
            if tokenizer not in tokenizers:
                from transformers import AutoTokenizer

                tokenizers[tokenizer] = SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(tokenizer))
            special = tokenizers[tokenizer]
        objective = get_objective(objective_name)
        model = model.to(device)
        for d in args.data:
            if table.has(p.kind, p.tag, _name(d)):
                continue
            held = HeldOut(d, objective, special, settings, rows[d])
            result = evaluate(model, objective, held.batches(), device=device)
            table.add({"kind": p.kind, "objective": objective.name, "tag": p.tag, "phase": p.phase, "step": p.step,
                       "tokens": seen, "data": _name(d), "source": p.source, **result})
        del model
    downstream_all(args, points, table, workdir)
    table.save()
    table.plot()
    return table


def downstream_all(args, points, table: Table, workdir: Path) -> None:
    """The lm-eval tasks and probes of every point not yet in the table, each on the point's transformers folder."""
    from tqdm import tqdm

    wanted = [*args.tasks, *map(probe_name, args.probe)]
    if not wanted:
        return
    todo = [(p, t) for p, t in points if not all(table.has(p.kind, p.tag, w) for w in wanted)]
    print(f"{PROG}: {', '.join(wanted)}: {len(points) - len(todo)} checkpoint(s) already in {table.json}, {len(todo)} to score",
          flush=True)
    for p, seen in tqdm(todo, desc=f"{PROG} tasks", unit="ckpt", disable=not todo):
        if p.hf_folder is None:
            raise SourceError(f"{p.source} {p.tag}: no transformers folder to run tasks on")
        folder = p.hf_folder(Path(tempfile.mkdtemp(prefix=f"{p.tag}-hf-", dir=workdir)))
        base = {"kind": p.kind, "objective": p.objective, "tag": p.tag, "phase": p.phase, "step": p.step,
                "tokens": seen, "source": p.source}
        tasks = [t for t in args.tasks if not table.has(p.kind, p.tag, t)]
        if tasks:
            from ettin_train.eval.harness import run_tasks

            for task, (scores, items) in run_tasks(folder, p.kind == "decoder", tasks, args.task_manager, args.device,
                                                   args.task_batch_size, args.limit, args.num_fewshot).items():
                table.add_scores(base, task, scores, items)
        probes = [f for f in args.probe if not table.has(p.kind, p.tag, probe_name(f))]
        if probes:
            from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

            from ettin_train.eval.probe import probe

            cls = AutoModelForCausalLM if p.kind == "decoder" else AutoModelForMaskedLM
            model, tok = cls.from_pretrained(str(folder)).to(args.device), AutoTokenizer.from_pretrained(str(folder))
            for f in probes:
                result = probe(model, tok, f, seed=args.seed)
                table.add_scores(base, probe_name(f), {"accuracy": result["accuracy"]}, result["items"])


def log_wandb(args, table: Table) -> None:
    """The table (a wandb.Table of every row) and eval.png as one wandb run; its config holds the settings, the
    phase starts, the sources and the resolved recipe of each run folder among them."""
    import wandb

    mode = args.wandb_mode if args.wandb_mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    recipes = {s: yaml.safe_load((Path(s) / "recipe.yaml").read_text()) for s in args.sources if (Path(s) / "recipe.yaml").is_file()}
    run = wandb.init(project=args.wandb_project, group=args.wandb_group, name=args.wandb_name or f"{PROG} {Path(args.out).name}",
                     job_type="eval", mode=mode, dir=str(table.out),
                     config={"settings": table.settings, "phases": table.phases, "sources": args.sources, "recipes": recipes})
    from ettin_train.eval.table import COLUMNS

    logged = {"eval/table": wandb.Table(columns=COLUMNS, data=[[r.get(c) for c in COLUMNS] for r in table.rows])}
    if table.png.exists():
        logged["eval/plot"] = wandb.Image(str(table.png))
    run.log(logged)
    run.finish()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        table = run(args)
    except (SourceError, HeldOutError, TaskError, ProbeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print_table(table.out)
    if args.wandb_project:
        log_wandb(args, table)
    return 0
