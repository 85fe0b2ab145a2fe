"""`kubeforge validate -o json` (machine-readable problems, the same exit codes) and `kubeforge --version`."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import yaml

from kubeforge.cli import main
from tests.builders import EXAMPLES, finetune


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_valid_files_give_valid_true_and_exit_0(capsys):
    files = sorted(str(p) for p in EXAMPLES.glob("*.yaml"))
    code, out, err = run(capsys, "validate", "-o", "json", *files)
    report = json.loads(out)
    assert (code, err) == (0, "")
    assert report["valid"] is True and report["problems"] == []
    assert [d["file"] for d in report["documents"]] == files
    assert {(d["kind"], d["valid"], d["document"]) for d in report["documents"]} == {
        ("FineTuneJob", True, 1), ("QuantizeJob", True, 1), ("ModelService", True, 1),
    }  # fmt: skip


def test_problems_name_file_document_kind_name_and_field_path(capsys, tmp_path):
    good, bad = finetune(), finetune(**{"lora.rank": 0, "resources.maxGPUs": -2})
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(good) + "---\n" + yaml.safe_dump(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: FineTuneJob\nspec: [\n")
    pod = tmp_path / "pod.yaml"
    pod.write_text("- a list\n")
    missing = tmp_path / "missing.yaml"
    code, out, err = run(capsys, "validate", "-o", "json", str(two), str(broken), str(pod), str(missing))
    assert code == 1 and err == ""  # everything is in the JSON
    report = json.loads(out)
    assert report["valid"] is False
    assert report["documents"] == [
        {"file": str(two), "document": 1, "kind": "FineTuneJob", "name": "support-bot", "valid": True},
        {"file": str(two), "document": 2, "kind": "FineTuneJob", "name": "support-bot", "valid": False},
        {"file": str(pod), "document": 1, "kind": None, "name": None, "valid": False},
    ]
    at = {"file": str(two), "document": 2, "kind": "FineTuneJob", "name": "support-bot"}
    problems = report["problems"]
    assert {**at, "path": "spec.lora.rank", "message": "must be > 0 (got 0)"} in problems
    assert {**at, "path": "spec.resources.maxGPUs", "message": "must be > 0 (got -2)"} in problems
    assert next(p for p in problems if p["file"] == str(broken))["message"].startswith("invalid YAML: ")
    assert {"file": str(pod), "document": 1, "kind": None, "name": None, "path": "",
            "message": "must be a mapping (a Kubernetes object), not a list"} in problems  # fmt: skip
    assert {"file": str(missing), "document": None, "kind": None, "name": None, "path": "",
            "message": "no such file"} in problems  # fmt: skip
    assert set(problems[0]) == {"file", "document", "kind", "name", "path", "message"}


@pytest.mark.parametrize("output", ["text", "json"])
def test_the_exit_codes_are_the_same_in_both_outputs(capsys, tmp_path, output):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(finetune(**{"lora.rank": 0})))
    assert main(["validate", "-o", output, str(EXAMPLES / "finetunejob-qwen3-8b-lora.yaml")]) == 0
    assert main(["validate", "-o", output, str(bad)]) == 1
    with pytest.raises(SystemExit) as usage:
        main(["validate", "-o", output])
    assert usage.value.code == 2


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"kubeforge {version('kubeforge')}\n"


def test_the_kubectl_plugin_says_the_same_version(capsys):
    from kubeforge.kubectl_plugin import main as plugin

    with pytest.raises(SystemExit):
        plugin(["--version"])
    assert capsys.readouterr().out == f"kubectl-kubeforge {version('kubeforge')}\n"
