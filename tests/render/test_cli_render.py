"""`kubeforge render`: every example job on every example cluster, QuantizeJobs, ModelServices and chains:
valid Kubernetes (1.33, strict), or a clear refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubeforge.api import parse
from kubeforge.cli import main
from kubeforge.render.quantize import render_quantize
from tests.builders import EXAMPLES, FINETUNE, QUANTIZE, SERVICE, example, quantize, service
from tests.harness.manifests import validate_manifest

CLUSTERS = sorted((EXAMPLES / "clusters").glob("*.yaml"))
JOBS = sorted(EXAMPLES.glob("finetunejob-*.yaml"))


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda p: p.stem)
@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_render_every_example(capsys, job, cluster):
    code = main(
        ["render", str(job), "--cluster", str(cluster), "--offline", "--uid", "0f0f0f0f-0000-4000-8000-000000000000"]
    )
    out, err = capsys.readouterr()
    if code == 1:
        assert "nothing to render, the plan is infeasible" in err and out == ""
        return
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    for doc in docs:
        validate_manifest(doc)


def test_render_jobset(capsys):
    job, cluster = EXAMPLES / "finetunejob-qwen3-8b-lora.yaml", EXAMPLES / "clusters" / "h100-4x8.yaml"
    assert main(["render", str(job), "--cluster", str(cluster), "--offline", "--gang", "jobset"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "JobSet"]
    assert "ownerReferences" not in docs[0]["metadata"]  # no --uid: nothing to own by


# ---------------------------------------------------------------- QuantizeJobs and ModelServices

CLUSTER = str(EXAMPLES / "clusters" / "h100-4x8.yaml")
UID = "0f0f0f0f-0000-4000-8000-000000000000"


def render(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["render", *argv])
    out, err = capsys.readouterr()
    return code, [d for d in yaml.safe_load_all(out) if d], err


def write(tmp_path: Path, name: str, *docs: dict) -> str:
    path = tmp_path / name
    path.write_text("---\n".join(yaml.safe_dump(d) for d in docs))
    return str(path)


@pytest.mark.parametrize("method", ["fp8", "w4a16-gptq", "w8a8-int8"])
def test_a_quantizejob_renders_what_render_quantize_gives(capsys, tmp_path, method):
    doc = quantize(method=method)
    code, docs, err = render(
        capsys, write(tmp_path, "qj.yaml", doc), "--source-uri", "pvc://models/support-bot", "--uid", UID
    )  # fmt: skip  (no --cluster: a QuantizeJob needs none)
    assert code == 0, err
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    doc["metadata"]["uid"] = UID  # as the operator reads it
    assert docs == render_quantize(parse(doc), source_uri="pvc://models/support-bot")
    assert docs[1]["metadata"]["ownerReferences"][0]["uid"] == UID
    for d in docs:
        validate_manifest(d)


def test_a_quantizejob_waiting_for_its_finetunejob_renders_nothing(capsys):
    code, docs, err = render(capsys, str(EXAMPLES / QUANTIZE))
    assert code == 1 and docs == []
    assert err == (f"{EXAMPLES / QUANTIZE} (QuantizeJob/support-bot-fp8): nothing to render, the operator waits: "
                   "FineTuneJob support-bot does not exist (yet); --source-uri URI renders what it applies once that "
                   "has succeeded\n")  # fmt: skip


def test_a_quantizejob_of_a_uri_needs_no_source_option(capsys, tmp_path):
    doc = quantize(source={"uri": "s3://bucket/model"}, credentials={"s3": {"name": "s3-creds"}})
    code, docs, err = render(capsys, write(tmp_path, "qj.yaml", doc))
    assert code == 0, err
    assert docs == render_quantize(parse(doc), source_uri="s3://bucket/model")


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda p: p.stem)
def test_a_modelservice_on_every_example_cluster(capsys, cluster):
    artifact = ("--source-uri", "pvc://models/support-bot-fp8", "--source-digest", "sha256:abc")
    code, docs, err = render(capsys, str(EXAMPLES / SERVICE), "--cluster", str(cluster), "--offline", *artifact)
    if code == 1:
        assert "nothing to render" in err and docs == []
        return
    assert code == 0, err
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    annotations = docs[0]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"kubeforge.io/artifact-uri": "pvc://models/support-bot-fp8",
                           "kubeforge.io/artifact-digest": "sha256:abc"}  # fmt: skip
    for d in docs:
        validate_manifest(d)


def test_a_modelservice_across_nodes_is_a_leaderworkerset_where_the_cluster_serves_it(capsys, tmp_path):
    doc = service(source={"uri": "hf://Qwen/Qwen3-8B"}, engineOptions={"maxModelLen": 32768})
    path, a10 = write(tmp_path, "msvc.yaml", doc), str(EXAMPLES / "clusters" / "a10-4x1.yaml")
    code, docs, err = render(capsys, path, "--cluster", a10, "--offline", "--leaderworkerset")
    assert code == 0, err
    assert [d["kind"] for d in docs] == ["LeaderWorkerSet", "Service"]
    code, docs, err = render(capsys, path, "--cluster", a10, "--offline")
    assert code == 1 and docs == [] and "do not fit one node" in err and "LeaderWorkerSet" in err


def test_a_modelservice_needs_the_cluster(capsys):
    code, docs, err = render(capsys, str(EXAMPLES / SERVICE), "--source-uri", "pvc://models/support-bot-fp8")
    assert code == 2 and docs == [] and "--cluster NODES.yaml is needed" in err


def test_a_chain_renders_its_first_pass_or_with_an_artifact_its_last_object(capsys, tmp_path):
    chain = write(tmp_path, "chain.yaml", example(FINETUNE), example(QUANTIZE), example(SERVICE))
    code, docs, err = render(capsys, chain, "--cluster", CLUSTER, "--offline")
    assert code == 1  # the operator applies the FineTuneJob's children; the other two wait for their sources
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert err.splitlines() == [
        f"{chain}#2 (QuantizeJob/support-bot-fp8): nothing to render, the operator waits: waiting for FineTuneJob "
        "support-bot to succeed (phase Pending); --source-uri URI renders what it applies once that has succeeded",
        f"{chain}#3 (ModelService/support-bot): nothing to render, the operator waits: waiting for QuantizeJob "
        "support-bot-fp8 to succeed (phase Pending); --source-uri URI renders what it applies once that has "
        "succeeded",
    ]
    # with the artifact, the upstreams are read (method, base model), not rendered: only the service is
    code, docs, err = render(capsys, chain, "--cluster", CLUSTER, "--offline", "--source-uri", "pvc://models/q")
    assert code == 0, err
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    assert docs[0]["metadata"]["annotations"] == {"kubeforge.io/artifact-uri": "pvc://models/q"}


def test_a_file_without_any_of_the_three_kinds(capsys, tmp_path):
    path = write(tmp_path, "pod.yaml", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
    code, docs, err = render(capsys, path, "--cluster", CLUSTER)
    assert code == 2 and docs == [] and err.startswith(f"{path}: expected exactly one FineTuneJob, found 0")


def test_a_finetunejob_renders_what_the_operators_first_pass_applies(capsys):
    from kubeforge.controller.finetune import Observed, decide
    from kubeforge.planner import resolve
    from tests.planner.nodes import example_cluster

    code, docs, err = render(capsys, str(EXAMPLES / FINETUNE), "--cluster", CLUSTER, "--offline", "--uid", UID)
    assert code == 0, err
    body = {**example(FINETUNE)}
    body["metadata"] = {**body["metadata"], "uid": UID}
    decision = decide(Observed(body=body, inventory=example_cluster("h100-4x8.yaml"), now="2026-01-01T00:00:00Z",
                               architecture=resolve(parse(body).spec.model)))  # fmt: skip
    assert docs == decision.apply
    assert f'"uid": "{UID}"' in docs[0]["data"]["contract.json"]  # the contract names its job's uid
