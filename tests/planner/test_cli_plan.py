"""`kubeforge plan`: every example job on every example cluster, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubeforge.cli import main
from tests.builders import EXAMPLES, finetune

CLUSTERS = sorted((EXAMPLES / "clusters").glob("*.yaml"))
JOBS = sorted(EXAMPLES.glob("finetunejob-*.yaml"))
KEYS = {
    "feasible", "reason", "alternatives", "gpuType", "nodes", "gpusPerNode", "totalGPUs", "strategy", "zeroStage",
    "offload", "tensorParallel", "pipelineParallel", "dataParallel", "sequenceParallel", "precision",
    "microBatchSize", "gradientAccumulationSteps", "gradientCheckpointing", "attention", "memoryPerGPU",
    "estimatedStepSeconds", "estimatedGPUHours", "reasons",
}  # fmt: skip
MEMORY_KEYS = {"weights", "gradients", "optimizer", "gathered", "activations", "overhead", "total", "available"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda p: p.stem)
@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_every_example_job_on_every_example_cluster(capsys, job, cluster):
    code, out, err = run(capsys, "plan", str(job), "--cluster", str(cluster), "--offline", "-o", "json")
    assert err == ""
    plan = json.loads(out)
    assert code == (0 if plan["feasible"] else 1)
    assert plan["reason"] and plan["reasons"]
    if plan["feasible"]:
        assert set(plan) >= KEYS
        assert set(plan["memoryPerGPU"]) == MEMORY_KEYS
        mem = plan["memoryPerGPU"]
        parts = ("weights", "gradients", "optimizer", "gathered", "activations", "overhead")
        assert mem["total"] == sum(mem[k] for k in parts)
        assert mem["total"] <= mem["available"]
        assert plan["totalGPUs"] == plan["nodes"] * plan["gpusPerNode"]
        assert (
            plan["microBatchSize"] * plan["gradientAccumulationSteps"] * plan["dataParallel"]
            == (yaml.safe_load(job.read_text())["spec"]["training"]["globalBatchSize"])
        )


def test_table_and_yaml_outputs(capsys):
    job, cluster = str(EXAMPLES / "finetunejob-qwen3-8b-lora.yaml"), str(EXAMPLES / "clusters" / "h100-4x8.yaml")
    code, out, _ = run(capsys, "plan", job, "--cluster", cluster, "--offline")
    assert code == 0 and out.startswith("PLAN: ") and "Memory per GPU (GiB):" in out and "Why:" in out
    code, out, _ = run(capsys, "plan", job, "--cluster", cluster, "--offline", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["feasible"] is True


def test_infeasible_prints_the_plan_and_exits_1(capsys):
    job, cluster = str(EXAMPLES / "finetunejob-llama-70b-full.yaml"), str(EXAMPLES / "clusters" / "a10-4x1.yaml")
    code, out, _ = run(capsys, "plan", job, "--cluster", cluster, "--offline")
    assert code == 1 and out.startswith("INFEASIBLE: full fine-tuning of a 70.55B-parameter model")


def write(tmp_path: Path, name: str, doc) -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


CLUSTER = str(EXAMPLES / "clusters" / "h100-4x8.yaml")


@pytest.mark.parametrize(
    ("job", "cluster", "message"),
    [
        (finetune(**{"lora.rank": 0}), CLUSTER, "spec.lora.rank: must be > 0"),
        (finetune(model={"uri": "pvc://models/mystery"}), CLUSTER, "set spec.model.architecture"),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}, CLUSTER, "expected exactly one FineTuneJob"),
        (finetune(), "missing.yaml", "missing.yaml: no such file"),
        (finetune(), {"kind": "Pod", "metadata": {"name": "p"}}, "expected a List of Nodes"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(capsys, tmp_path, job, cluster, message):
    job_path = write(tmp_path, "job.yaml", job)
    cluster_path = (
        cluster
        if isinstance(cluster, str) and cluster.endswith("h100-4x8.yaml")
        else (str(tmp_path / cluster) if isinstance(cluster, str) else write(tmp_path, "nodes.yaml", cluster))
    )
    code, out, err = run(capsys, "plan", job_path, "--cluster", cluster_path, "--offline")
    assert code == 2 and out == ""
    assert message in err


def test_plan_runs_as_a_command_without_a_traceback(tmp_path):
    bad = write(tmp_path, "bad.yaml", "kind: FineTuneJob\nspec: [")
    result = subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", "plan", bad, "--cluster", CLUSTER],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "invalid YAML" in result.stderr and "Traceback" not in result.stderr
