"""`python train.py RECIPE.yaml [dotted.key=value ...] [--plan [--json]] [--plot lr.png]`."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from ettin_train.config import RecipeError, load_recipe, recipe_to_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="Train an Ettin model from a YAML recipe.")
    parser.add_argument("recipe", help="recipe YAML, e.g. yamls/demo/encoder/pretrain.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_duration=100ba")
    parser.add_argument("--plan", action="store_true", help="print what the recipe will do, then exit")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON object")
    parser.add_argument("--plot", metavar="PNG", help="draw the learning rate and batch size against tokens for this recipe "
                        "and the earlier phases it starts from into PNG, then exit")
    args = parser.parse_intermixed_args(argv)
    try:
        recipe, _ = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        from ettin_train.plot import plot_schedule

        series = plot_schedule(args.recipe, args.plot, args.overrides)
        phases = " -> ".join(s["recipe"] for s in series)
        print(f"wrote {args.plot}: {phases}", file=sys.stderr if args.json else sys.stdout)
    from ettin_train.checkpoint.run_folder import finished_run
    from ettin_train.checkpoint.run_identity import RunFolderError, check_run_folder
    from ettin_train.checkpoint.safe_load import UnsafeCheckpointError
    from ettin_train.preflight import PreflightError, check_inputs

    notes: list[str] = []
    try:
        check_run_folder(recipe)  # another run's folder is refused, finished or not, before anything is written
        done = finished_run(recipe)  # a finished run run again (a requeue): say so, do not build the trainer
        if args.plan and not done:
            notes = check_inputs(recipe)  # what a start checks before it writes anything (run() checks it again)
    except (PreflightError, RunFolderError, UnsafeCheckpointError) as e:  # one line, nothing written
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.plan:
        from ettin_train.plan import format_plan, make_plan

        plan = make_plan(recipe) | {"complete": done and {"step": done.step, "tokens": done.tokens,
                                                            "checkpoint": str(done.checkpoint)}, "data_notes": notes}
        if args.json:
            print(json.dumps(plan))
        else:
            print(format_plan(plan) + "".join(f"\nnote: {n}" for n in notes) + (f"\n\n{done.line()}" if done else ""))
            print("\nresolved recipe:\n" + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        return 0
    if args.plot:
        return 0
    if done:
        print(done.line())
        return 0
    from ettin_train.train.run import run

    try:
        run(recipe)
    except UnsafeCheckpointError as e:  # what Composer itself downloads (a remote load_path) is checked only there
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
