"""Every command in a ```bash block of the README and docs/ still parses: its tool exists and its `--help` runs,
every --flag it uses is one the tool's help lists, every recipe it names exists, and a train.py command's dotted
overrides load with its recipe (a placeholder such as RECIPE.yaml stands for a demo recipe). A command of a
tool this test does not know fails, so a new tool gets checked (or listed as an outside tool) when it is documented."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Tools that are not ours: their commands are the user's system's (git, pip, venv, Slurm's sbatch runs our script).
OUTSIDE = {"git", "pip", "python3", "cd", "export", "uv", "nvidia-smi", "ls", "mkdir"}
LAUNCHERS = {"composer", "torchrun"}
PLACEHOLDER_RECIPE = "yamls/demo/encoder/pretrain.yaml"
SCRIPTS = {name: module.split(":")[0] for name, module in
           tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()}


def _blocks(path: Path):
    """(line number, text) of each command in the file's ```bash / ```sh blocks: continuations joined,
    a `for X in a b; do ... done` loop unrolled."""
    lines = path.read_text().splitlines()
    inside, loop, pending = False, None, ""
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside = not inside and line[3:].strip() in ("bash", "sh", "shell")
            continue
        if not inside or not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        text, pending = pending.strip(), ""
        if m := re.fullmatch(r"for (\w+) in (.*); do", text):
            loop = (m.group(1), m.group(2).split())
        elif text == "done":
            loop = None
        elif loop:
            yield from ((n, text.replace(f"${loop[0]}", v)) for v in loop[1])
        else:
            yield n, text


COMMANDS = [(p, n, c) for p in DOCS for n, c in _blocks(p)]


def _tool(words: list[str]) -> tuple[list[str] | None, list[str], str]:
    """(the argv that runs the tool under our Python, its arguments, what it is) of one command's words."""
    while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] in ("bash", "sbatch") or
                     (words[0].startswith("--") and words[0] != "--help")):
        words = words[1:] if not words[0].startswith("--nodes") else words[2:]  # env, `bash`, sbatch's own flags
    name = Path(words[0]).name
    if name in ("python", "python3") and words[0] != "python3" or words[0] == ".venv/bin/python":
        if words[1] == "-m":
            return ["-m", words[2]], words[3:], words[2]
        return [words[1]], words[2:], words[1]
    if name in SCRIPTS:  # ettin-eval: its package's __main__ when the entry is the package's cli
        module = SCRIPTS[name].removesuffix(".cli")
        return ["-m", module], words[1:], name
    if name in LAUNCHERS:  # launcher flags up to the script
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return [words[script]], words[script + 1:], words[script]
    if words[0].endswith(".py"):
        return [words[0]], words[1:], words[0]
    if words[0].endswith((".sh", ".sbatch")):
        return None, words[1:], words[0]
    return None, words[1:], name


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    """`--help` of each tool, run once, forked from a pre-imported process."""
    from tests.train.fork_runner import ForkServer

    server, seen, logs = ForkServer(), {}, tmp_path_factory.mktemp("helps")

    def help_of(argv: list[str]) -> str:
        key = " ".join(argv)
        if key not in seen:
            out = logs / f"{len(seen)}.txt"
            result = server.attempt([*argv, "--help"], out, out)
            text = out.read_text()
            assert result["rc"] == 0, f"{key} --help exited {result['rc']}:\n{text[-2000:]}"
            seen[key] = text
        return seen[key]

    yield help_of
    server.close()


@pytest.mark.parametrize("doc,line,command", COMMANDS, ids=[f"{p.name}:{n}" for p, n, _ in COMMANDS])
def test_documented_command_parses(doc, line, command, helps):
    where = f"{doc.relative_to(ROOT)}:{line}: {command}"
    words = shlex.split(command, comments=True)
    if words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        assert set(words[1:]) <= targets, f"{where}: no such make target"
        return
    argv, args, what = _tool(words)
    if argv is None:
        if what in OUTSIDE or Path(what).name in OUTSIDE:
            return
        assert (ROOT / what).is_file(), f"{where}: {what} is neither a file of the repository nor a known tool"
    else:
        if argv[0] != "-m":
            assert (ROOT / argv[0]).is_file(), f"{where}: {argv[0]} does not exist"
        text = helps(argv)
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{where}: {what} has no {flag} ({what} --help)"
    recipes = [a for a in args if a.endswith(".yaml")]
    for recipe in recipes:
        if not re.search(r"[A-Z]", Path(recipe).stem):  # RECIPE.yaml is a placeholder
            assert (ROOT / recipe).is_file(), f"{where}: {recipe} does not exist"
    if what.endswith("train.py") and recipes:
        from ettin_train.config import load_recipe

        recipe = recipes[0] if (ROOT / recipes[0]).is_file() else PLACEHOLDER_RECIPE
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        load_recipe(str(ROOT / recipe), overrides)  # a RecipeError names the key
