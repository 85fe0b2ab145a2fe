"""Peak CUDA memory against the planner's memory model, and tokens/s and MFU, on one GPU.

    python bench/gpu/run.py --out report.json [--cases NAME,NAME|default|all] [--dry-run]

For every case (cases.CASES: 0.5B-8B Llama-shaped models, full / LoRA / QLoRA, bf16 / fp8,
sequence length 2048) it builds the runtime's engine exactly as train.run does, in a process of
its own (worker.py), runs warm-up and timed steps on synthetic token ids, and records
torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps next to
planner.memory.estimate for the same layout (ratios measured/predicted), tokens/s, and MFU =
tokens/s x FLOPs/token (planner.cost.flops_per_token) / the GPU's dense peak (the inventory's
catalog, by torch.cuda.get_device_name). The 1B model runs full fine-tuning in bf16 and in fp8:
the report gives their speed ratio next to the planner's.

Models are written locally first (models.py; ~26 GB of bf16 for all four sizes, under --models).
A case that fails (OOM, a missing package, a timeout) is recorded with its error and the rest
go on; the report is rewritten after every case, so a killed run keeps what it measured. Cases
the planner predicts not to fit the GPU are skipped unless --force.

--dry-run needs no GPU and no model files: it lists the cases, builds each contract, runs
engines.check on it (as if a GPU were present) and prints the planner's predictions for --gpu.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (str(HERE), str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from kubeforge.runtime.contract import CUDA_ALLOC_CONF  # noqa: E402  (after the path set-up above)

GIB = 1024**3
PACKAGES = ("torch", "transformers", "torchao", "peft", "bitsandbytes", "deepspeed", "accelerate", "safetensors")
FP8_PAIR = ("1b-full-ddp-bf16", "1b-full-ddp-fp8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import cases

    names = "\n".join(
        f"  {c.name:<28} {'(optional) ' if c.optional else ''}micro-batch {c.micro_batch}" for c in cases.CASES
    )
    p = argparse.ArgumentParser(
        prog="bench/gpu/run.py",
        description=__doc__.split("\n\n")[0],
        epilog=f"cases:\n{names}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="the JSON report to write")
    p.add_argument("--cases", default="default", help="comma-separated case names, 'default' or 'all'")
    p.add_argument("--dry-run", action="store_true", help="cases, contracts and predictions only; no GPU needed")
    p.add_argument(
        "--models",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kubeforge-bench-models",
        help="where the generated model folders go (reused when complete; default: %(default)s)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case (default %(default)s)")
    p.add_argument("--gpu", default=None, help="GPU for the predictions (default: the one found; dry run: H200)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, overriding the catalog's")
    p.add_argument("--force", action="store_true", help="also run cases predicted not to fit the GPU")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the machine


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def probe_gpu(work: Path, timeout: float) -> dict[str, Any]:
    """The GPU as a child process sees it (the parent never touches CUDA: no context held during the cases)."""
    path = work / "probe.json"
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "worker.py"), "--probe", str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"cuda_available": False, "error": f"the GPU probe took over {timeout:.0f} s"}
    if not path.is_file():
        return {"cuda_available": False, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(path.read_text())


def gpu_facts(name: str, memory_mib: int | None = None):
    from kubeforge.inventory.gpus import lookup_gpu, unknown_gpu

    facts = lookup_gpu(name, memory_mib)
    return facts or unknown_gpu(name, memory_mib or 0, None)


def peak_flops(facts, precision: str, override_tflops: float | None) -> float:
    """Dense peak FLOP/s for the precision (fp8 plans: the fp8 peak); --peak-tflops scales the catalog's."""
    bf16 = override_tflops or facts.bf16_tflops
    if precision == "fp8":
        ratio = facts.fp8_tflops / facts.bf16_tflops if facts.bf16_tflops else 0.0
        return bf16 * ratio * 1e12
    return bf16 * 1e12


# ---------------------------------------------------------------- one case


def run_case(case, model_dir: Path, vocab: int, work: Path, args, host_bytes: int) -> dict[str, Any]:
    import cases as cases_mod

    case_dir = work / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    contract = cases_mod.contract(case, model_dir, case_dir, args.warmup + args.steps, vocab, host_bytes)
    spec = {
        "contract": json.loads(contract.to_json()),
        "model_dir": str(model_dir),
        "vocab_size": vocab,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    spec_path, result_path, log_path = case_dir / "spec.json", case_dir / "result.json", case_dir / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker.py"), str(spec_path), str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout ends it and its children
            # the allocator setting train.main gives every training process (contract.CUDA_ALLOC_CONF), unless set
            env={"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF, **os.environ, "PYTHONUNBUFFERED": "1"},
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
    result: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["returncode"] = rc
    result["log"] = str(log_path)
    if timed_out:
        result.update(ok=False, error_type="timeout", error=f"no result within {args.timeout:.0f} s")
    elif not result.get("ok"):
        result["ok"] = False
        if "error" not in result:  # died without writing its error (a signal, a segfault, the OOM killer)
            result["error_type"] = "crashed"
            result["error"] = f"exit status {rc} at stage {result.get('stage', 'start')}"
        result["log_tail"] = _tail(log_path)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def compare(predicted: dict[str, Any], measured: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """Ratios measured / predicted, and MFU."""
    mem = predicted["memory"]
    out: dict[str, Any] = {}
    for key in ("peak_allocated", "peak_reserved", "device_peak"):
        if measured.get(key):
            out[f"{key}_over_predicted_total"] = round(measured[key] / mem["total"], 3)
    if measured.get("allocated_between_steps") and mem["model_states"]:
        out["between_steps_over_predicted_states"] = round(measured["allocated_between_steps"] / mem["model_states"], 3)
    if measured.get("peak_allocated"):
        # what the step itself adds on top of the states, against the predicted activations
        transient = measured["peak_allocated"] - measured.get("allocated_between_steps", 0)
        out["step_transient_bytes"] = transient
        if mem["activations"]:
            out["step_transient_over_predicted_activations"] = round(transient / mem["activations"], 3)
    tps = measured.get("tokens_per_second")
    if tps:
        out["tokens_per_second_over_predicted"] = round(tps / predicted["tokens_per_second"], 3)
        out["mfu"] = round(tps * predicted["model_flops_per_token"] / peaks["precision"], 4)
        out["mfu_bf16_peak"] = round(tps * predicted["model_flops_per_token"] / peaks["bf16"], 4)
        out["hfu_planner_flops"] = round(tps * predicted["flops_per_token"] / peaks["precision"], 4)
    return out


# ---------------------------------------------------------------- the report


def table(rows: list[dict[str, Any]]) -> str:
    head = ("case", "status", "pred GiB", "alloc GiB", "resv GiB", "dev GiB", "a/p", "r/p", "d/p", "tok/s", "MFU",
            "step s")  # fmt: skip
    lines = [head]
    for r in rows:
        m, c, p = r.get("measured") or {}, r.get("comparison") or {}, r["predicted"]["memory"]

        def gib(v):
            return f"{v / GIB:.1f}" if v else "-"

        def num(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        lines.append(
            (
                r["case"],
                r["status"] if r["status"] != "failed" else f"failed:{m.get('error_type', '?')}",
                gib(p["total"]),
                gib(m.get("peak_allocated") or m.get("peak_allocated_at_failure")),
                gib(m.get("peak_reserved") or m.get("peak_reserved_at_failure")),
                gib(m.get("device_peak")),
                num(c.get("peak_allocated_over_predicted_total"), ".2f"),
                num(c.get("peak_reserved_over_predicted_total"), ".2f"),
                num(c.get("device_peak_over_predicted_total"), ".2f"),
                num(m.get("tokens_per_second") or r["predicted"]["tokens_per_second"], ",.0f")
                + ("" if m.get("tokens_per_second") else "*"),
                num(c.get("mfu"), ".1%"),
                num(m.get("step_seconds_median") or r["predicted"]["step_seconds"], ".3f")
                + ("" if m.get("step_seconds_median") else "*"),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = [
        "  ".join(
            str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    return "\n".join(text)


def fp8_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    by = {r["case"]: r for r in rows}
    if not all(n in by for n in FP8_PAIR):
        return None
    bf16, fp8 = by[FP8_PAIR[0]], by[FP8_PAIR[1]]
    out: dict[str, Any] = {
        "cases": list(FP8_PAIR),
        "predicted_speedup": round(fp8["predicted"]["tokens_per_second"] / bf16["predicted"]["tokens_per_second"], 3),
    }
    a, b = (bf16.get("measured") or {}).get("tokens_per_second"), (fp8.get("measured") or {}).get("tokens_per_second")
    if a and b:
        out.update(bf16_tokens_per_second=a, fp8_tokens_per_second=b, measured_speedup=round(b / a, 3))
        pa, pb = bf16["measured"].get("peak_allocated"), fp8["measured"].get("peak_allocated")
        if pa and pb:
            out["fp8_over_bf16_peak_allocated"] = round(pb / pa, 3)
    return out


def write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import cases as cases_mod
    import models

    selected = cases_mod.select(args.cases)
    report: dict[str, Any] = {
        "kind": "kubeforge-bench-gpu/v1",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "dry_run": args.dry_run,
        "settings": {
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "timeout_seconds": args.timeout,
            "seq_len": cases_mod.SEQ_LEN,
            "lora": {"rank": cases_mod.LORA_RANK, "alpha": cases_mod.LORA_ALPHA, "dropout": cases_mod.LORA_DROPOUT},
            "models": str(args.models),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF),
        },
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "versions": versions()},
        "cases": [],
    }
    dry = Path(tempfile.gettempdir()) / "kubeforge-bench-gpu-dry-run"  # contracts name it; nothing is written
    work = dry if args.dry_run else Path(tempfile.mkdtemp(prefix="kubeforge-bench-gpu-"))
    report["settings"]["work_dir"] = str(work)

    gpu_name, memory_mib = args.gpu, None
    if not args.dry_run:
        probe = probe_gpu(work, timeout=300)
        report["machine"]["gpu"] = probe
        if not probe.get("cuda_available"):
            report["error"] = "no CUDA GPU visible: " + str(probe.get("error", "torch.cuda.is_available() is False"))
            write(args.out, report)
            print(report["error"], file=sys.stderr)
            return 2
        gpu_name = gpu_name or probe["name"]
        memory_mib = probe["total_memory"] // 2**20
    facts = gpu_facts(gpu_name or "H200", memory_mib)
    capacity = memory_mib * 2**20 if memory_mib else facts.memory_mib * 2**20
    peaks = {p: peak_flops(facts, p, args.peak_tflops) for p in ("bf16", "fp8")}
    report["machine"]["gpu_facts"] = {
        "catalog_name": facts.name,
        "known": facts.known,
        "bf16_tflops": peaks["bf16"] / 1e12,
        "fp8_tflops": peaks["fp8"] / 1e12,
        "memory_bytes": capacity,
    }
    if not facts.known and not args.peak_tflops:
        print(f"warning: {gpu_name!r} is not in the GPU catalog; MFU uses a guessed peak (pass --peak-tflops)")

    from kubeforge.runtime import engines

    host = engines.available_host_memory() or 0
    report["machine"]["host_memory_available"] = host
    print(f"{'dry run: ' if args.dry_run else ''}{len(selected)} case(s) on {facts.name} "
          f"({capacity / GIB:.0f} GiB, {peaks['bf16'] / 1e12:.0f} bf16 TFLOP/s); report -> {args.out}")  # fmt: skip

    rows = report["cases"]
    failed = 0
    for case in selected:
        config = models.config_dict(case.model)
        model_dir = args.models / f"llama-{case.model}"
        row: dict[str, Any] = {"case": case.name, "config": case.config(), "status": "pending"}
        rows.append(row)
        if not args.dry_run:
            print(f"[{case.name}] model {case.model} ...", flush=True)
            try:
                model_dir, made = models.make(case.model, args.models)
            except Exception as err:  # a full disk, a missing package: this case cannot run
                row.update(status="failed", measured={"ok": False, "error_type": type(err).__name__,
                                                      "error": str(err)[:2000]})  # fmt: skip
                row["predicted"] = cases_mod.predict(case, config, facts)
                failed += 1
                write(args.out, report)
                continue
            report.setdefault("models", {})[case.model] = {"path": str(model_dir), **made}
            config = json.loads((model_dir / "config.json").read_text())
        predicted = cases_mod.predict(case, config, facts)
        row["predicted"] = predicted
        host_bytes = predicted["memory"]["host_per_node"]
        contract = cases_mod.contract(
            case, model_dir, work / case.name, args.warmup + args.steps, int(config["vocab_size"]), host_bytes
        )
        try:
            engines.check(contract, cuda=True, host_memory_bytes=host or None)
            row["check"] = "ok"
        except Exception as err:
            row["check"] = str(err)
        if args.dry_run:
            row["status"] = "dry-run"
            continue
        if predicted["memory"]["total"] > capacity and not args.force:
            row["status"] = "skipped"
            row["reason"] = (
                f"predicted {predicted['memory']['total'] / GIB:.1f} GiB > the GPU's {capacity / GIB:.1f} GiB"
                " (--force runs it)"
            )
            print(f"[{case.name}] skipped: {row['reason']}", flush=True)
            write(args.out, report)
            continue
        print(f"[{case.name}] running ...", flush=True)
        measured = run_case(case, model_dir, int(config["vocab_size"]), work, args, host_bytes)
        row["measured"] = measured
        row["status"] = "ok" if measured.get("ok") else "failed"
        failed += row["status"] == "failed"
        if measured.get("ok") or measured.get("peak_allocated_at_failure"):
            case_peaks = {"bf16": peaks["bf16"], "precision": peaks[case.precision]}
            row["comparison"] = compare(predicted, measured, case_peaks)
        status = "ok" if measured.get("ok") else f"failed ({measured.get('error_type')}): {measured.get('error')}"
        print(f"[{case.name}] {status} in {measured.get('wall_seconds')} s", flush=True)
        report["fp8_vs_bf16"] = fp8_summary(rows)
        write(args.out, report)

    report["fp8_vs_bf16"] = fp8_summary(rows)
    write(args.out, report)
    print()
    print(table(rows))
    if args.dry_run:
        print("\n* predicted (dry run: nothing measured). engines.check on each contract:")
        for r in rows:
            print(f"  {r['case']:<28} {r['check']}")
    fp8 = report["fp8_vs_bf16"]
    if fp8:
        measured = f", measured {fp8['measured_speedup']:.2f}x" if "measured_speedup" in fp8 else ""
        print(f"\nfp8 / bf16 tokens/s on the 1B model: predicted {fp8['predicted_speedup']:.2f}x{measured}")
    print(f"\nreport: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
