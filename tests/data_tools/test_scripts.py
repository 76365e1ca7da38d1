"""Every script in data_tools/ answers --help (the contract in SPEC), and `make demo` calls the demo
with arguments it accepts."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted((ROOT / "data_tools").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_make_demo_runs_the_demo_with_valid_arguments():
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    (command,) = [line.strip() for line in recipe.splitlines() if "data_tools/demo.py" in line]
    args = command.split("data_tools/demo.py", 1)[1].split()
    proc = subprocess.run([sys.executable, str(ROOT / "data_tools" / "demo.py"), *args, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
