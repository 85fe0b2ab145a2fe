"""`kubeforge validate` and `kubeforge crds`, run as a user runs them (a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubeforge.api.crd import all_crds, to_yaml
from tests.builders import EXAMPLES, FINETUNE, finetune

ROOT = Path(__file__).resolve().parents[1]


def kubeforge(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def write(tmp_path: Path, name: str, content: str | dict) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_examples_passes():
    files = sorted(str(p) for p in EXAMPLES.glob("*.yaml"))
    assert len(files) >= 3
    result = kubeforge("validate", *files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(files)


def test_validate_names_file_document_and_field(tmp_path):
    bad = finetune(**{"lora.rank": 0, "method": "full"})
    path = write(tmp_path, "bad.yaml", bad)
    result = kubeforge("validate", str(path), str(EXAMPLES / FINETUNE))
    assert result.returncode == 1
    assert f"{path} (FineTuneJob/support-bot): spec.lora.rank: must be > 0 (got 0)" in result.stderr
    assert "finetunejob-qwen3-8b-lora.yaml (FineTuneJob/support-bot): ok" in result.stdout
    assert_no_traceback(result)


def test_validate_multi_document_file_says_which_document(tmp_path):
    good = finetune()
    bad = finetune(**{"resources.maxGPUs": -2})
    path = write(tmp_path, "two.yaml", yaml.safe_dump(good) + "---\n" + yaml.safe_dump(bad))
    result = kubeforge("validate", str(path))
    assert result.returncode == 1
    assert f"{path}#2 (FineTuneJob/support-bot): spec.resources.maxGPUs: must be > 0 (got -2)" in result.stderr
    assert f"{path}#1 (FineTuneJob/support-bot): ok" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: FineTuneJob\nspec: {model: [unclosed\n", "invalid YAML: "),
        ("", "holds no YAML document"),
        ("- just\n- a list\n", "must be a mapping (a Kubernetes object), not a list"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "kind: unknown kind 'Pod'"),
    ],
)
def test_validate_bad_files_get_a_message_not_a_traceback(tmp_path, content, message):
    path = write(tmp_path, "x.yaml", content)
    result = kubeforge("validate", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr and message in result.stderr
    assert_no_traceback(result)


def test_validate_yaml_error_gives_the_line(tmp_path):
    path = write(tmp_path, "x.yaml", "apiVersion: kubeforge.io/v1alpha1\nkind: FineTuneJob\nspec:\n  model: {uri: [\n")
    result = kubeforge("validate", str(path))
    assert "line 5" in result.stderr or "line 4" in result.stderr, result.stderr


def test_validate_missing_file(tmp_path):
    result = kubeforge("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert f"{tmp_path / 'nope.yaml'}: no such file" in result.stderr
    assert_no_traceback(result)


def test_validate_without_files_is_a_usage_error():
    result = kubeforge("validate")
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_crds_prints_what_is_committed():
    result = kubeforge("crds")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "---\n".join(to_yaml(c) for c in all_crds())
    committed = "---\n".join((ROOT / "crds" / f"{c['metadata']['name']}.yaml").read_text() for c in all_crds())
    assert result.stdout == committed


def test_crds_writes_a_folder(tmp_path):
    result = kubeforge("crds", "-o", str(tmp_path / "out"))
    assert result.returncode == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    for name in written:
        assert (tmp_path / "out" / name).read_text() == (ROOT / "crds" / name).read_text()


def test_help_lists_the_commands():
    result = kubeforge("--help")
    commands = result.stdout
    assert "validate" in commands and "crds" in commands
