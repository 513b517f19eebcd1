"""Packaging: every third-party import is declared, the core stays light, a GPU box's own torch satisfies the
ranges, and the README's own-torch recipe installs no torch."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["harness", "data", "stage1_tokenizer", "stage2_prior", "pipelines"]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(names: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in names]
    return {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in reqs}


CORE = requirements(PROJECT["dependencies"])
EXTRAS = {k: requirements([r for r in v if not r.startswith("tokgen[")])
          for k, v in PROJECT["optional-dependencies"].items()}
DECLARED = set(CORE) | {name for extra in EXTRAS.values() for name in extra}


def third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files importing it} over the library packages, outside the standard library."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, set()).add(str(file.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    dists = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in third_party_imports().items():
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
        if not names & DECLARED:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_the_heavy_packages_are_extras_not_core():
    assert {"scikit-learn", "scikit-image"} <= set(EXTRAS["demo"])
    assert {"torchcodec", "av"} <= set(EXTRAS["video"]) and "tensorboard" in EXTRAS["tensorboard"]
    assert not {"scikit-learn", "scikit-image", "torchcodec", "av", "tensorboard"} & set(CORE)


@pytest.mark.parametrize("versions", [
    {"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0"},  # the GPU box's image
    {"torch": "2.13.0", "torchvision": "0.28.0", "torchaudio": "2.11.0"},  # this project's CPU machines
])
def test_a_machines_own_torch_satisfies_the_ranges(versions):
    for name, version in versions.items():
        assert CORE[name].specifier.contains(Version(version)), f"{name} {version} vs {CORE[name]}"
        assert not any(s.operator in ("==", "===", "<", "<=", "~=") for s in CORE[name].specifier), \
            f"{name} is capped or pinned ({CORE[name]}): a GPU box's torch would be replaced"


def make_dry_run(*overrides: str) -> str:
    out = subprocess.run(["make", "-n", "-B", "install", "VENV=/nonexistent/venv", *overrides], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_the_readme_recipe_for_an_own_torch_installs_no_torch():
    readme = (ROOT / "README.md").read_text()
    recipe = "make test VENV_FLAGS=--system-site-packages TORCH_PACKAGES="
    assert recipe in readme
    commands = make_dry_run("VENV_FLAGS=--system-site-packages", "TORCH_PACKAGES=")
    assert "python3 -m venv --system-site-packages /nonexistent/venv" in commands
    assert "torch==" not in commands and "torchvision" not in commands
    assert "torch==2.13.0" in make_dry_run()  # the default installs the project's own torch
