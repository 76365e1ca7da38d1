"""`ettin-eval SOURCE... --data HELDOUT... --out DIR` (also `python -m ettin_train.eval`): held-out metrics of
every checkpoint of run folders, export repositories (their tags) or Hub repositories (hf://ORG/NAME, their
revisions), into DIR/eval.json, DIR/eval.csv and DIR/eval.png. docs/eval.md describes it.

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
from ettin_train.eval.sources import SourceError, cumulative_tokens, list_points, select
from ettin_train.eval.table import Table, print_table

PROG = "ettin-eval"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description="Held-out loss and accuracy of checkpoints, tags or Hub revisions.")
    p.add_argument("sources", nargs="+", help="run folders, export repositories (ettin-export --out), or hf://ORG/NAME")
    p.add_argument("--data", action="append", required=True, help="held-out MDS folder (repeat for several)")
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
    for folder in args.data:
        if not (Path(folder) / "index.json").is_file():
            raise HeldOutError(f"--data {folder}: {Path(folder) / 'index.json'} does not exist (MDS shards)")
    check_disjoint(args.data, args.train_data + training_folders(args.sources))
    listed = [p for s in args.sources for p in list_points(s, workdir, args.trust_pickles)]
    chosen_tags = select({s: [p.tag for p in listed if p.source == s] for s in args.sources}, args.tags)
    chosen = [p for p in listed if p.tag in chosen_tags[p.source]]
    tokens, starts = cumulative_tokens(listed)
    table = Table(Path(args.out))
    wanted = {"eval": vars(settings), "data": {_name(d): index_digest(d) for d in args.data}}
    if table.settings is not None:
        if table.settings["eval"] != wanted["eval"]:
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
    table.settings = {"eval": wanted["eval"], "data": {**(table.settings or {}).get("data", {}), **wanted["data"]}}
    for kind, phases in starts.items():
        table.phases.setdefault(kind, {}).update(phases)
    return settings, [(p, tokens[id(p)]) for p in chosen], starts, table


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
    table.save()
    table.plot()
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        table = run(args)
    except (SourceError, HeldOutError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print_table(table.out)
    return 0
