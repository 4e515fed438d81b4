"""The house holds its shape: import-linter's layering contracts (pyproject.toml), ruff, and mypy on runtime/.

The repository's folders become coft.train, coft.export and coft.runtime only when installed (package-dir), which
import-linter and mypy cannot follow through an editable install: they read a copy laid out as installed."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def installed_layout(root: Path) -> Path:
    """The sources as `pip install .` lays them out: coft/ with train/, export/ and runtime/ inside."""
    package = root / "coft"
    shutil.copytree(ROOT / "coft", package, ignore=shutil.ignore_patterns("__pycache__"))
    for stage in ("train", "export", "runtime"):
        shutil.copytree(ROOT / stage, package / stage, ignore=shutil.ignore_patterns("__pycache__", "static"))
    return root


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache", str(ROOT / "pyproject.toml")], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": str(BIN)}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return installed_layout(tmp_path_factory.mktemp("installed"))


def test_the_layering_holds_and_an_upward_import_breaks_it(layout, tmp_path):
    kept = lint_imports(layout)
    assert kept.returncode == 0, kept.stdout[-3000:]
    assert "Contracts: 5 kept, 0 broken." in kept.stdout

    broken = installed_layout(tmp_path)  # the line reaching into the plant's room, as it must not
    drift = broken / "coft/runtime/line/drift.py"
    drift.write_text(drift.read_text() + "\nfrom coft.runtime.comms import mqtt  # noqa: E402,F401\n")
    result = lint_imports(broken)
    assert result.returncode == 1
    assert "the runtime's rooms, each importing only those below it" in result.stdout and "BROKEN" in result.stdout
    assert "coft.runtime.line.drift -> coft.runtime.comms.mqtt" in result.stdout


def test_ruff_finds_nothing():
    result = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def test_mypy_finds_nothing_in_the_runtime(layout):
    result = subprocess.run([str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental",
                             "-p", "coft.runtime"], cwd=layout, env={"MYPYPATH": str(layout), "PATH": str(BIN)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
