"""`kubeforge run`: the same YAML, planner and runtime, on this machine."""

from __future__ import annotations

import json

import pytest
import yaml

from kubeforge.api import parse
from kubeforge.cli import main
from kubeforge.localrun import RunError, localize
from kubeforge.planner.architecture import resolve
from kubeforge.planner.local import plan_cpu
from kubeforge.runtime import export
from kubeforge.runtime.demo import task
from kubeforge.runtime.demo.__main__ import job_yaml


@pytest.fixture()
def project(tmp_path, tiny_model, task_data):
    (tmp_path / "model").symlink_to(tiny_model)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(task_data[0].read_text())
    return tmp_path


def test_run_fine_tunes_and_the_model_learns(project, task_data, capsys):
    job = project / "job.yaml"
    job.write_text(yaml.safe_dump(job_yaml(60, "full")))
    assert main(["run", str(job), "--offline"]) == 0
    out = capsys.readouterr().out
    assert "plan: DDP over 1 CPU process(es), fp32" in out and "artifact: " in out
    artifact = project / "out" / "fruit-colours"
    assert export.verify(artifact) == []
    contract = json.loads((project / ".kubeforge" / "fruit-colours" / "contract.json").read_text())
    assert contract["compute"]["device"] == "cpu" and contract["model"]["local_path"] == str(
        (project / "model").resolve()
    )
    assert task.accuracy(artifact, task_data[1]) > task.accuracy(project / "model", task_data[1])


@pytest.mark.parametrize(("strategy", "name"), [("fsdp", "FSDP"), ("zero3", "ZeRO-3")])
def test_run_honours_an_explicit_strategy_on_cpu(project, capsys, strategy, name):
    doc = job_yaml(4, "full")
    doc["spec"]["parallelism"] = {"strategy": strategy}
    job = project / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main(["run", str(job), "--offline", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert f"plan: {name} over 2 CPU process(es), fp32" in out
    contract = json.loads((project / ".kubeforge" / "fruit-colours" / "contract.json").read_text())
    assert contract["parallel"]["strategy"] == strategy and contract["parallel"]["gpus_per_node"] == 2
    assert export.verify(project / "out" / "fruit-colours") == []


def test_pvc_locations_cannot_run_locally(tmp_path, capsys):
    doc = job_yaml(10, "full")
    doc["spec"]["dataset"]["uri"] = "pvc://data/train.jsonl"
    with pytest.raises(RunError, match=r"spec.dataset.uri: pvc://data/train.jsonl is a PersistentVolumeClaim"):
        localize(parse(doc), tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["run", str(path), "--offline"]) == 2
    assert "PersistentVolumeClaim" in capsys.readouterr().err


def test_cpu_plans(tiny_model):
    doc = job_yaml(10, "full")
    doc["spec"]["model"]["uri"] = str(tiny_model)
    spec = parse(doc).spec
    arch = resolve(spec.model)
    plan = plan_cpu(spec, arch, nproc=2, host_memory_bytes=8 * 1024**3)
    assert plan.feasible and plan.precision == "fp32" and plan.total_gpus == 2
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * 2 == 16
    assert not plan_cpu(spec, arch, nproc=3, host_memory_bytes=8 * 1024**3).feasible  # 16 does not split over 3
    assert not plan_cpu(spec, arch, nproc=1, host_memory_bytes=1024).feasible  # no memory
    for strategy in ("zero3-offload", "megatron"):
        refused = plan_cpu(parse({**doc, "spec": {**doc["spec"], "parallelism": {"strategy": strategy}}}).spec, arch,
                           nproc=2, host_memory_bytes=8 * 1024**3)  # fmt: skip
        assert not refused.feasible and f"strategy {strategy} needs GPUs" in refused.reason
    qlora = parse({**doc, "spec": {**doc["spec"], "method": "qlora"}}).spec
    qplan = plan_cpu(qlora, arch, nproc=1, host_memory_bytes=8 * 1024**3)
    assert qplan.feasible and qplan.method == "qlora" and any("NF4" in r for r in qplan.reasons)


def test_the_chain_runs_locally_from_one_file(project, capsys):
    pytest.importorskip("llmcompressor")
    openai = pytest.importorskip("openai")
    from kubeforge.localrun import start_service
    from kubeforge.runtime.demo.__main__ import quantize_yaml, service_yaml

    chain = project / "chain.yaml"
    docs = [service_yaml("fruit-colours"), quantize_yaml("fruit-colours"), job_yaml(10, "full")]  # any order
    docs[1]["spec"]["evaluation"]["datasetUri"] = "./data/train.jsonl"
    chain.write_text(yaml.safe_dump_all(docs[1:]))
    assert main(["run", str(chain), "--offline"]) == 0
    out = capsys.readouterr().out
    assert out.index("==> FineTuneJob fruit-colours") < out.index("==> QuantizeJob fruit-colours-fp8")
    quantized = project / "out" / "fruit-colours-fp8"
    assert export.verify(quantized) == []
    manifest = json.loads((quantized / export.MANIFEST).read_text())
    assert manifest["source"]["uri"] == str(project / "out" / "fruit-colours")
    assert manifest["baseModel"] == str((project / "model").resolve())  # traced through the tuned artifact

    server = start_service(parse(docs[0]), chain)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="local", max_retries=0)
        reply = client.chat.completions.create(model="fruit-colours", messages=[{"role": "user", "content": "kiwi"}],
                                               max_tokens=2)  # fmt: skip
        assert reply.choices[0].message.role == "assistant"
    finally:
        server.stop()

    # the CLI serves in the foreground; stopping it (SIGTERM) stops the engine with it
    import subprocess
    import sys
    import time
    import urllib.request

    from kubeforge.localrun import free_port

    (project / "svc.yaml").write_text(yaml.safe_dump(docs[0]))
    port = free_port()
    cli = subprocess.Popen([sys.executable, "-m", "kubeforge.cli", "run", str(project / "svc.yaml"), "--port",
                            str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def healthy() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return True
        except OSError:
            return False

    deadline = time.monotonic() + 120
    while not healthy():
        assert cli.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    cli.terminate()
    assert cli.wait(timeout=60) == 143
    assert not healthy()


def test_a_quantizejob_whose_finetunejob_never_ran_locally_is_refused(project, capsys):
    from kubeforge.runtime.demo.__main__ import quantize_yaml

    path = project / "qj.yaml"
    path.write_text(yaml.safe_dump(quantize_yaml("never-ran")))
    assert main(["run", str(path)]) == 2
    assert "FineTuneJob never-ran has not succeeded locally yet" in capsys.readouterr().err
