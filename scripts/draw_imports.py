"""Draws the imports between ettin_train's modules (module-level and inside functions) and checks the layering:

    python scripts/draw_imports.py            # one line per module: what it imports; [composer] marks Composer users
    python scripts/draw_imports.py --check    # exit 1 on an import circle, or on Composer imported outside train/

The trainer package src/ettin_train/train/ is the only one that imports Composer; every other module, preflight
included, must not reach it through its own imports either.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
TRAINER = "ettin_train.train"


def import_graph(src: Path = SRC) -> tuple[dict[str, set[str]], set[str]]:
    """(module -> the ettin_train modules it imports, the modules that import composer themselves)."""
    files = {".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): f
             for f in src.rglob("*.py") if f.relative_to(src).parts[0] == "ettin_train"}
    edges: dict[str, set[str]] = {m: set() for m in files}
    composer: set[str] = set()
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            composer |= {module} if any(n.split(".")[0] == "composer" for n in names) else set()
            edges[module] |= {n for n in names if n in files and n != module}
    return edges, composer


def reaches(module: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in edges[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(edges[module]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [module, dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    return found


def problems(src: Path = SRC) -> list[str]:
    edges, composer = import_graph(src)
    out = [f"import circle: {' -> '.join(c)}" for c in circles(edges)]
    out += [f"{m} imports composer outside {TRAINER}" for m in sorted(composer) if not m.startswith(TRAINER)]
    users = composer | {m for m in edges if reaches(m, edges) & composer}
    out += [f"{m} reaches composer through its imports" for m in sorted(users)
            if not m.startswith(TRAINER) and m != "ettin_train.cli"]  # the CLI imports run() only to train
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw and check ettin_train's imports.")
    parser.add_argument("--check", action="store_true", help="exit 1 on a circle or Composer outside train/")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        print("\n".join(found) or "no import circle; Composer only in ettin_train.train")
        return 1 if found else 0
    edges, composer = import_graph()
    for module in sorted(edges):
        mark = " [composer]" if module in composer else ""
        print(f"{module}{mark}: {', '.join(sorted(edges[module])) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
