"""Everything kubeforge renders, for tests that check a property of all of it: every example on every
example cluster, and the variants the builders make (custom images, engines, init-container fetch,
JobSet, LeaderWorkerSet). Each case is (id, rendered objects)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kubeforge.api import parse
from kubeforge.inventory.pools import Inventory
from kubeforge.planner import plan, resolve
from kubeforge.planner.catalog import lookup as catalog
from kubeforge.planner.serving import plan_serving
from kubeforge.render.finetune import render_finetune
from kubeforge.render.quantize import render_quantize
from kubeforge.render.service import render_service
from tests.builders import DELETE, EXAMPLES, example, finetune, quantize, service, with_spec
from tests.planner.nodes import example_cluster

UID = "0b7c5d0e-9f8a-4c1e-8d7e-5a6b7c8d9e0f"
CLUSTERS = sorted(p.name for p in (EXAMPLES / "clusters").glob("*.yaml"))
FINETUNES = sorted(p.name for p in EXAMPLES.glob("finetunejob-*.yaml"))
QWEN = catalog("Qwen/Qwen3-8B")
Docs = list[dict[str, Any]]


def with_name(doc: dict[str, Any], name: str | None) -> dict[str, Any]:
    if name is not None:
        doc["metadata"]["name"] = name
    doc["metadata"]["uid"] = UID
    return doc


def render_ftj(doc: dict[str, Any], cluster: str = "h100-4x8.yaml", gang: str = "job") -> Docs | None:
    """The children of a FineTuneJob document on an example cluster; None when its plan is infeasible."""
    job = parse(with_name(doc, None))
    result = plan(job.spec, example_cluster(cluster), resolve(job.spec.model))
    return render_finetune(job, result, gang=gang) if result.feasible else None  # type: ignore[arg-type]


def render_qj(doc: dict[str, Any], source_uri: str = "pvc://models/support-bot", data: str | None = None) -> Docs:
    return render_quantize(parse(with_name(doc, None)), source_uri=source_uri, default_data_uri=data)


def render_ms(doc: dict[str, Any], artifact_uri: str, cluster: str | None = "h100-4x8.yaml", *, lws: bool = False,
              max_model_len: int | None = None) -> Docs | None:  # fmt: skip
    """The children of a ModelService serving ``artifact_uri`` (None: a cluster without GPUs)."""
    svc = parse(with_name(doc, None))
    inventory = example_cluster(cluster) if cluster else Inventory((), ())
    result = plan_serving(
        engine=svc.spec.engine,
        inventory=inventory,
        arch=QWEN,
        max_model_len=max_model_len or svc.spec.engine_options.max_model_len,
        utilization=svc.spec.engine_options.gpu_memory_utilization,
        tensor_parallel=svc.spec.tensor_parallel,
        multi_node=lws,
    )
    if not result.feasible:
        return None
    return render_service(svc, result, artifact_uri=artifact_uri, artifact_digest="sha256:abc")


def all_cases(name: str | None = None, *, every_cluster: bool = True) -> Iterator[tuple[str, Docs]]:
    """Every kind and variant, the objects named ``name`` when given (else the examples' names); each
    example on each example cluster too, unless not ``every_cluster``."""

    def named(doc: dict[str, Any]) -> dict[str, Any]:
        return with_name(doc, name)

    for job in FINETUNES:
        for cluster in CLUSTERS if every_cluster else ["h100-4x8.yaml"]:
            docs = render_ftj(named(with_spec(example(job), {"resources.queue": DELETE})), cluster)
            if docs is not None:
                yield f"{job}@{cluster}", docs
    ftj = {"resources.queue": DELETE}
    yield "ftj-jobset", _some(render_ftj(named(finetune(**ftj)), gang="jobset"))
    yield "ftj-queued", _some(render_ftj(named(finetune())))
    yield "ftj-custom-image", _some(render_ftj(named(finetune(**ftj, image="registry.local/my-trainer:1"))))
    yield "ftj-s3", _some(render_ftj(named(finetune(**ftj, output={"uri": "s3://bucket/out"},
                                                    credentials={"s3": {"name": "s3-creds"}}))))  # fmt: skip

    yield "qj-fp8", render_qj(named(quantize()))
    yield "qj-gptq", render_qj(named(quantize(method="w4a16-gptq")), data="pvc://data/train.jsonl")
    yield "qj-custom-image", render_qj(named(quantize(image="registry.local/q:1")))
    yield "qj-s3", render_qj(named(quantize(credentials={"s3": {"name": "s3-creds"}})), "s3://bucket/model")

    pvc, s3, hf = "pvc://models/support-bot-fp8", "s3://bucket/support-bot", "hf://org/model"
    for cluster in CLUSTERS if every_cluster else ["h100-4x8.yaml"]:
        docs = render_ms(named(service()), pvc, cluster)
        if docs is not None:
            yield f"ms@{cluster}", docs
    yield "ms-vllm-s3-fetch", _some(render_ms(named(service(credentials={"s3": {"name": "s3-creds"}})), s3))
    hf_token = {"huggingFace": {"name": "hf", "key": "token"}}
    yield "ms-vllm-hf-fetch", _some(render_ms(named(service(credentials=hf_token)), hf))
    yield "ms-sglang", _some(render_ms(named(service(engine="sglang")), pvc))
    yield "ms-transformers-cpu", _some(render_ms(named(service(engine="auto")), pvc, None))
    yield "ms-transformers-fetch", _some(render_ms(named(service(engine="transformers")), s3, None))
    yield "ms-custom-image", _some(render_ms(named(service(image="registry.local/vllm:1")), s3))
    adapters = [{"name": "a", "uri": "pvc://adapters/a"}, {"name": "b", "uri": "s3://bucket/b"}]
    yield "ms-adapters", _some(render_ms(named(service(adapters=adapters)), pvc))
    yield "ms-lws", _some(render_ms(named(service()), s3, "a10-4x1.yaml", lws=True, max_model_len=32768))


def _some(docs: Docs | None) -> Docs:
    assert docs is not None, "this variant is meant to be feasible"
    return docs


def pod_templates(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in ``docs``."""
    for doc in docs:
        where, spec = f"{doc['kind']}/{doc['metadata']['name']}", doc.get("spec") or {}
        if doc["kind"] in ("Job", "Deployment"):
            yield where, spec["template"]["spec"]
        elif doc["kind"] == "JobSet":
            for rj in spec["replicatedJobs"]:
                yield f"{where}/{rj['name']}", rj["template"]["spec"]["template"]["spec"]
        elif doc["kind"] == "LeaderWorkerSet":
            for role in ("leaderTemplate", "workerTemplate"):
                yield f"{where}/{role}", spec["leaderWorkerTemplate"][role]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", [])]
