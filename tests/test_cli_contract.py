"""Every tool is installed the same way and answers --help; bad options are one line and exit 2."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_entry_point_has_a_bin_wrapper_and_back():
    bins = {p.name for p in (ROOT / "bin").glob("disca_*")}
    assert bins == set(SCRIPTS)
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert f"from {module} import {func}" in (ROOT / "bin" / name).read_text()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_is_the_module_docstring(name, capsys):
    module = importlib.import_module(SCRIPTS[name].split(":")[0])
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    first_line = module.__doc__.strip().splitlines()[0]
    assert first_line in out
    assert re.search(r"--o\b", out) or name == "disca_evaluate"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_unknown_option_is_one_line_exit_2(name, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bin" / name), "--no-such-option", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name", ["disca_extract", "disca_cluster", "disca_split_star", "disca_classify3d"]
)
def test_a_missing_input_file_is_the_only_line_on_stderr(name, tmp_path):
    """The one-line error comes alone: no tool starts TensorFlow before it has checked its
    inputs (TensorFlow 2.21 prints start-up lines at import that no setting silences)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bin" / name), "--i", "missing.star", "--o", "Out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"{name}: error: missing.star: ") and "not found" in lines[0]
    assert not any(tmp_path.iterdir())
