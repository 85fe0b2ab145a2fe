"""`kubeforge run FINETUNE.yaml`: the same YAML, planner and in-pod runtime, on this machine.

Plans against the local hardware (GPUs via nvidia-smi, else CPU processes), writes the
runtime contract, launches ``python -m kubeforge.runtime.train`` (under torchrun for
more than one process), shows progress from the runtime's own progress endpoint, and
says where the artifact is. The runtime runs as a subprocess: the control plane never
imports torch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubeforge.api.finetune import FineTuneJob
from kubeforge.api.quantize import QuantizeJob
from kubeforge.api.service import ModelService
from kubeforge.api.uris import parse_uri
from kubeforge.planner import ArchitectureUnknown, resolve
from kubeforge.planner.local import local_gpus, plan_local
from kubeforge.render.contract import finetune_contract, quantize_contract
from kubeforge.runtime.contract import EXIT_USER_ERROR, PROGRESS_PATH, ProgressConfig, read_termination_message


class RunError(ValueError):
    """A problem with the job for a local run (exit 2)."""


@dataclass(frozen=True)
class RunResult:
    code: int
    summary: dict | None
    workdir: Path


def localize(job: FineTuneJob, base: Path) -> FineTuneJob:
    """Local paths become absolute (relative to the YAML's folder); pvc:// cannot work here."""
    doc = job.model_dump(by_alias=True, exclude_none=True)
    for field, where in (("model", "spec.model.uri"), ("dataset", "spec.dataset.uri"), ("output", "spec.output.uri")):
        uri = doc["spec"][field]["uri"]
        loc = parse_uri(uri)
        if loc.scheme == "pvc":
            raise RunError(f"{where}: {uri} is a PersistentVolumeClaim; a local run needs a local path, hf:// or s3://")
        if loc.scheme == "local":
            doc["spec"][field]["uri"] = str((base / loc.path).resolve())
    return FineTuneJob.model_validate(doc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(job: FineTuneJob, yaml_path: Path, *, nproc: int | None, offline: bool, out=None, err=None) -> RunResult:
    out, err = out or sys.stdout, err or sys.stderr  # looked up now, so redirected streams are honoured
    base = yaml_path.resolve().parent
    job = localize(job, base)
    try:
        arch = resolve(job.spec.model, local_root=base, allow_network=not offline)
    except (ArchitectureUnknown, ValueError) as e:
        raise RunError(f"spec.model: {e}") from e
    plan, device = plan_local(job.spec, arch, nproc=nproc)
    if not plan.feasible:
        print(f"INFEASIBLE on this machine: {plan.reason}", file=err)
        return RunResult(1, None, base)
    print(
        f"plan: {plan.reason}; global batch {plan.global_batch_size} = {plan.micro_batch_size} x "
        f"{plan.gradient_accumulation_steps} x {plan.data_parallel}",
        file=out,
    )
    workdir = base / STATE / (job.metadata.name or "job")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    contract = finetune_contract(job, plan, device=device).model_copy(update={"progress": ProgressConfig(port=port)})
    config = workdir / "contract.json"
    config.write_text(contract.to_json())
    processes = plan.total_gpus
    command = [sys.executable, "-m", "kubeforge.runtime.train", "--config", str(config)]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "kubeforge.runtime.train",
            "--config",
            str(config),
        ]
    env = {}
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the caller's own setting wins
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    code, summary = _launch(command, workdir, "train.log", out, err, env=env, watch=lambda p: _watch(p, port, err))
    if code != 0:
        return RunResult(2 if code == EXIT_USER_ERROR else 1, summary, workdir)
    _report(summary or {}, out)
    return RunResult(0, summary, workdir)


def _watch(proc: subprocess.Popen, port: int, err) -> None:
    shown = -1
    tty = err.isatty()
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{PROGRESS_PATH}", timeout=1) as response:
                p = json.loads(response.read().decode())
        except (OSError, ValueError):
            continue
        step, total = p.get("step") or 0, p.get("totalSteps") or 1
        tenth = int(10 * step / total)
        if not tty and tenth == shown:
            continue
        shown = tenth
        bar = "#" * int(30 * step / total) + "." * (30 - int(30 * step / total))
        loss = f"{p['loss']:.3f}" if isinstance(p.get("loss"), int | float) else "-"
        eta = f"{p['etaSeconds']}s left" if p.get("etaSeconds") is not None else ""
        line = f"[{bar}] {step}/{total} loss {loss} {p.get('tokensPerSecond', 0):.0f} tok/s {eta}"
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=err, flush=True)
    if tty:
        print(file=err)


def _report(summary: dict, out) -> None:
    uri = summary.get("uri", "?")
    metrics = summary.get("metrics") or {}
    print(f"artifact: {uri}", file=out)
    print(
        f"  digest {summary.get('digest')}, {summary.get('sizeBytes', 0) / 1e6:.1f} MB; "
        f"loss {metrics.get('first_loss')} -> {metrics.get('train_loss')} in {metrics.get('steps')} steps",
        file=out,
    )
    print("  use it: transformers.AutoModelForCausalLM.from_pretrained(" + repr(uri) + ")", file=out)


# ---------------------------------------------------------------------------------------------- the chain
STATE = ".kubeforge"  # per-job working folders next to the YAML; each keeps the job's termination summary


def local_artifact(base: Path, kind: str, name: str) -> dict | None:
    """The artifact summary a previous local run of ``kind``/``name`` left (None if it has not succeeded)."""
    path = base / STATE / name / "termination.json"
    if not path.exists():
        return None
    summary = read_termination_message(path.read_text())
    return summary if summary and summary.get("status") == "succeeded" else None


def _absolute(uri: str, base: Path) -> str:
    loc = parse_uri(uri)
    if loc.scheme == "pvc":
        raise RunError(f"{uri} is a PersistentVolumeClaim; a local run needs a local path, hf:// or s3://")
    return str((base / loc.path).resolve()) if loc.scheme == "local" else uri


def source_uri(kind: str, name: str | None, uri: str | None, base: Path, where: str) -> str:
    if uri:
        return _absolute(uri, base)
    summary = local_artifact(base, kind, name or "")
    if summary is None:
        raise RunError(f"{where}: {kind} {name} has not succeeded locally yet: `kubeforge run` it first "
                       "(or put it in the same file)")  # fmt: skip
    return str(summary["uri"])


def _launch(command: list[str], workdir: Path, log_name: str, out, err, *, env: dict[str, str] | None = None,
            watch: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, dict | None]:  # fmt: skip
    """Run a runtime entry point with its log in ``workdir``; (exit code, its termination summary)."""
    termination = workdir / "termination.json"
    termination.unlink(missing_ok=True)
    log_path = workdir / log_name
    print(f"running: {' '.join(command[1:4])} ... (log: {log_path})", file=out, flush=True)
    full_env = {**os.environ, **(env or {}), "KUBEFORGE_TERMINATION_LOG": str(termination), "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        if watch is not None:
            watch(proc)
        code = proc.wait()
    summary = read_termination_message(termination.read_text()) if termination.exists() else None
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        reason = (summary or {}).get("error") or f"exit code {code}"
        print(f"FAILED: {reason}\n--- last lines of {log_path} ---\n{tail}", file=err)
    return code, summary


def run_quantize(job: QuantizeJob, yaml_path: Path, *, out=None, err=None) -> RunResult:
    out, err = out or sys.stdout, err or sys.stderr
    base = yaml_path.resolve().parent
    src = job.spec.source
    ref = src.fine_tune_job_ref.name if src.fine_tune_job_ref else None
    uri = source_uri("FineTuneJob", ref, src.uri, base, "spec.source")
    training_data = None
    if ref:  # the FineTuneJob's contract says which data it trained on: the default calibration set
        contract_file = base / STATE / ref / "contract.json"
        if contract_file.exists():
            training_data = json.loads(contract_file.read_text())["dataset"]["location"]["uri"]
    doc = job.model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["output"]["uri"] = _absolute(doc["spec"]["output"]["uri"], base)
    for section in ("calibration", "evaluation"):
        if (doc["spec"].get(section) or {}).get("datasetUri"):
            doc["spec"][section]["datasetUri"] = _absolute(doc["spec"][section]["datasetUri"], base)
    job = QuantizeJob.model_validate(doc)
    device = "cuda" if local_gpus() else "cpu"
    contract = quantize_contract(job, uri, training_data, device=device)
    workdir = base / STATE / (job.metadata.name or "quantize")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "contract.json"
    config.write_text(contract.to_json())
    print(f"quantize: {uri} with {job.spec.method} on {device}", file=out)
    command = [sys.executable, "-m", "kubeforge.runtime.quantize", "--config", str(config)]
    code, summary = _launch(command, workdir, "quantize.log", out, err)
    if code != 0:
        return RunResult(2 if code == EXIT_USER_ERROR else 1, summary, workdir)
    metrics = (summary or {}).get("metrics") or {}
    print(f"artifact: {summary.get('uri')}\n  digest {summary.get('digest')}; metrics {metrics}", file=out)
    return RunResult(0, summary, workdir)


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str  # the OpenAI base URL
    name: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_service(svc: ModelService, yaml_path: Path, *, port: int | None = None, out=None,
                  timeout: float = 300) -> LocalServer:  # fmt: skip
    """Start the engine for ``svc`` on this machine and wait until it is healthy."""
    import shutil

    from kubeforge.render.engines import launch

    out = out or sys.stdout
    base = yaml_path.resolve().parent
    src = svc.spec.source
    if src.quantize_job_ref:
        uri = source_uri("QuantizeJob", src.quantize_job_ref.name, None, base, "spec.source")
    else:
        uri = source_uri("FineTuneJob", src.fine_tune_job_ref.name if src.fine_tune_job_ref else None, src.uri,
                         base, "spec.source")  # fmt: skip
    if parse_uri(uri).scheme in ("s3", "hf"):
        raise RunError(f"spec.source: {uri}: a local ModelService serves a local folder; fetch it first")
    engine = svc.spec.engine
    if engine == "auto":
        engine = "vllm" if (local_gpus() and shutil.which("vllm")) else "transformers"
    if engine in ("vllm", "sglang") and not local_gpus():
        raise RunError(f"spec.engine: {engine} needs a GPU; this machine has none (use engine auto or transformers)")
    if engine == "vllm" and not shutil.which("vllm"):
        raise RunError("spec.engine: vllm is not installed here (pip install vllm), or use engine auto")
    port = port or free_port()
    name = svc.spec.served_model_name or svc.metadata.name or "model"
    opts = svc.spec.engine_options
    adapters = []
    for i, a in enumerate(svc.spec.adapters):
        job = a.fine_tune_job_ref.name if a.fine_tune_job_ref else None
        adapters.append((a.name, source_uri("FineTuneJob", job, a.uri, base, f"spec.adapters[{i}]")))
    spec = launch(engine, model_path=uri, served_name=name, tensor_parallel=1, max_model_len=opts.max_model_len,
                  gpu_memory_utilization=opts.gpu_memory_utilization, prefix_caching=opts.enable_prefix_caching,
                  adapters=adapters)  # fmt: skip
    args = [a if a != "0.0.0.0" else "127.0.0.1" for a in spec.args]
    args[args.index("--port") + 1] = str(port)
    command = [sys.executable, *spec.command[1:]] if spec.command[0] in ("python", "python3") else spec.command
    workdir = base / STATE / (svc.metadata.name or "service")
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / "serve.log").open("w")
    process = subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT)
    server = LocalServer(process, f"http://127.0.0.1:{port}/v1", name)
    try:
        _wait_healthy(server, port, engine, workdir, timeout)
    except BaseException:  # a failed start, Ctrl-C or SIGTERM while waiting: never leave the engine behind
        server.stop()
        raise
    print(f"serving {uri} with {engine} as {name!r} at {server.url} (OpenAI API; log {workdir / 'serve.log'})",
          file=out, flush=True)  # fmt: skip
    return server


def _wait_healthy(server: LocalServer, port: int, engine: str, workdir: Path, timeout: float) -> None:
    from kubeforge.render.engines import HEALTH_PATH

    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RunError(f"the {engine} server exited ({server.process.returncode}); see {workdir / 'serve.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH_PATH}", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RunError(f"the {engine} server did not become healthy in {timeout:.0f} s") from None
            time.sleep(0.5)
