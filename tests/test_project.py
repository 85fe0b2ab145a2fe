"""The project's shape: layout, packaging, lint and import contracts (run as part of the tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: install the 'test' extra (scripts/venv.sh operator,test)")
    return found


def test_ruff_is_clean():
    result = subprocess.run([tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold():
    result = subprocess.run([tool("lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_kubeforge_is_a_namespace_package_over_two_roots():
    import kubeforge

    assert getattr(kubeforge, "__file__", None) is None  # PEP 420: no __init__.py anywhere
    roots = {Path(p).resolve() for p in kubeforge.__path__}
    assert roots == {(ROOT / "operator" / "kubeforge").resolve(), (ROOT / "runtime" / "kubeforge").resolve()}
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "runtime" / "__init__.py").exists()


def test_the_standard_library_operator_module_is_not_shadowed():
    result = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and not result.stdout.strip().startswith(str(ROOT)), result.stdout


def test_extras_per_component():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]
    assert {"operator", "train", "quantize", "megatron", "serve", "test"} <= set(extras)
    assert meta["project"]["scripts"]["kubeforge"] == "kubeforge.cli:main"


def test_every_dependency_is_pinned_in_the_constraints():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {
        line.split("==")[0].strip().lower().replace("_", "-")
        for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    wanted = list(meta["project"]["dependencies"])
    for deps in meta["project"]["optional-dependencies"].values():
        wanted += deps
    names = {
        d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-") for d in wanted
    }
    assert names <= pinned, f"not pinned in requirements/constraints.txt: {sorted(names - pinned)}"
    assert "torch==2.13.0" in (ROOT / "requirements" / "constraints.txt").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in readme and "scripts/test.sh" in ci
    assert "scripts/demo.sh" in readme


@pytest.mark.parametrize("folder", ["crds", "charts", "images", "examples", "tests", "e2e", "bench"])
def test_layout_folders_exist(folder):
    assert (ROOT / folder).is_dir() and any((ROOT / folder).iterdir())


def test_the_operator_image_entrypoint_starts():
    """images/operator/Dockerfile runs `python -m kubeforge.controller`; its CLI must load."""
    result = subprocess.run(
        [sys.executable, "-m", "kubeforge.controller", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--namespace" in result.stdout and "--liveness" in result.stdout
    assert 'ENTRYPOINT ["python", "-m", "kubeforge.controller"]' in (ROOT / "images/operator/Dockerfile").read_text()
