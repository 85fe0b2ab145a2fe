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
from dataclasses import dataclass
from pathlib import Path

from kubeforge.api.finetune import FineTuneJob
from kubeforge.api.uris import parse_uri
from kubeforge.planner import ArchitectureUnknown, resolve
from kubeforge.planner.local import plan_local
from kubeforge.render.contract import finetune_contract
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
    workdir = base / ".kubeforge" / (job.metadata.name or "job")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    contract = finetune_contract(job, plan, device=device).model_copy(update={"progress": ProgressConfig(port=port)})
    config = workdir / "contract.json"
    config.write_text(contract.to_json())
    termination = workdir / "termination.json"
    termination.unlink(missing_ok=True)
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
    env = dict(os.environ, KUBEFORGE_TERMINATION_LOG=str(termination), PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    log_path = workdir / "train.log"
    print(f"training: {' '.join(command[1:4])} ... (log: {log_path})", file=out)
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _watch(proc, port, err)
    summary = read_termination_message(termination.read_text()) if termination.exists() else None
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        reason = (summary or {}).get("error") or f"exit code {proc.returncode}"
        print(f"FAILED: {reason}\n--- last lines of {log_path} ---\n{tail}", file=err)
        return RunResult(2 if proc.returncode == EXIT_USER_ERROR else 1, summary, workdir)
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
