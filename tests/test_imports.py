"""The package's layering (scripts/draw_imports.py): no import circle, and Composer only in ettin_train.train."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_no_import_circle_and_composer_only_in_the_trainer_package():
    proc = subprocess.run([sys.executable, "scripts/draw_imports.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    # and nothing Composer-free loads it at run time either: preflight, checkpoints, export
    code = ("import sys, ettin_train.preflight, ettin_train.checkpoint.phase_start, ettin_train.checkpoint.run_folder, "
            "ettin_train.export, ettin_train.live_export, ettin_train.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'composer'))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_the_check_finds_a_planted_circle_and_a_stray_composer_import(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from draw_imports import problems
    finally:
        sys.path.pop(0)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "ettin_train", src / "ettin_train")
    schedules = src / "ettin_train" / "schedules.py"
    schedules.write_text(schedules.read_text() + "\nfrom ettin_train.plan import make_plan  # noqa\n")  # plan imports schedules
    preflight = src / "ettin_train" / "preflight.py"
    preflight.write_text(preflight.read_text() + "\nfrom ettin_train.train.module import composer_time  # noqa\n")
    found = problems(src)
    assert any(p.startswith("import circle:") and "ettin_train.plan" in p and "ettin_train.schedules" in p for p in found), found
    assert "ettin_train.preflight reaches composer through its imports" in found
