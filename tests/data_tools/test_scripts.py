"""The data_tools/ contract in SPEC (`python data_tools/NAME.py --help`): each script's help names every option
it accepts and does no work; and `make demo` calls the demo with arguments its parser accepts. (What each script
does is tested next to the module it drives: tests/data/test_tokenize_to_mds.py, tests/data/test_order.py.)"""

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted((ROOT / "data_tools").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_names_every_option_and_writes_nothing(script, tmp_path):
    options = set(re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", script.read_text()))
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script.name}")
    assert options and all(option in proc.stdout for option in options), (options, proc.stdout)
    assert not list(tmp_path.iterdir())  # --help ran nothing


def test_make_demo_runs_the_demo_with_arguments_its_parser_accepts():
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    (command,) = [line.strip() for line in recipe.splitlines() if "data_tools/demo.py" in line]
    args = shlex.split(command.split("data_tools/demo.py", 1)[1])
    spec = importlib.util.spec_from_file_location("demo", ROOT / "data_tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.build_parser().parse_args(args)  # exits 2 on an argument the demo does not take
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["--no-such-option"])
