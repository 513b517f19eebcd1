"""The house's layers, as `make test` checks them with import-linter (contracts in pyproject.toml): each package
imports only from the layers below it (pipelines > stage2_prior > stage1_tokenizer > data > harness), and no
package's modules import each other in a cycle. The contracts pass on the tree, and fail when a module of any
lower layer imports from above it, or when two modules of data/ import each other."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "data", "stage1_tokenizer", "stage2_prior", "pipelines")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, not the installed tree
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(tree: Path, module: str, statement: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{statement}  # a violation planted by the test\n")


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_contracts_hold_and_fail_when_broken(tree):
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout
    upward = {"harness/schedule.py": "import data.codes", "data/codes.py": "import stage1_tokenizer.modules",
              "stage1_tokenizer/modules.py": "import stage2_prior.causal_conv",
              "stage2_prior/causal_conv.py": "import pipelines.arithmetic"}
    for module, statement in upward.items():
        add_import(tree, module, statement)
    done = lint(tree)
    assert done.returncode != 0 and "layers" in done.stdout and "BROKEN" in done.stdout
    for module in upward:  # every planted upward import is named
        assert module[:-3].replace("/", ".") in done.stdout, module


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_a_cycle_inside_data_breaks_the_acyclic_contract(tree):
    add_import(tree, "data/common.py", "import data.images")  # data.images imports data.common
    done = lint(tree)
    assert done.returncode != 0 and "no import cycles" in done.stdout and "BROKEN" in done.stdout
