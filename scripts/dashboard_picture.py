"""Draw the chart's Grafana dashboard (charts/kubeforge/dashboards/kubeforge.json) from a real run: docs/dashboard.png.

    .venv/bin/python scripts/dashboard_picture.py --ref HEAD [--out PNG] [--workdir /tmp/kubeforge-dashboard]

``--ref REF`` runs the operator, CLI and runtime of that commit (exported read-only with `git archive` into
WORKDIR/src, ahead of the checkout on PYTHONPATH), so unfinished work in the checkout cannot spoil the run;
without it the working tree's code runs. docs/dashboard.png was made with --ref HEAD.

Needs `prometheus` on PATH (Debian: `apt-get install prometheus`; checked with 2.42), the project's .venv with
the operator and train extras plus the test harness' kmock, and matplotlib, either in the running interpreter or
in the one named by $DASHBOARD_PYTHON (default /tmp/venv-dash/bin/python: `python3 -m venv /tmp/venv-dash &&
/tmp/venv-dash/bin/pip install matplotlib`), since .venv's torch pin is not to be disturbed. About 3 minutes on
2 cores; no cluster, no GPU, no network.

What runs, all of it real processes on loopback, nothing invented:

- Prometheus, scraping every 2 s (SCRAPE_SECONDS);
- the operator (`python -m kubeforge.controller`) against the test harness' Kubernetes API emulator
  (tests/harness/emulator.py, kmock), with the nodes of examples/clusters/a10-4x1.yaml and a 2 s resync
  instead of the chart's 10 s, so that a two-minute run shows more than a handful of passes; its metrics
  port is scraped;
- two `kubeforge run` trainings of the demo's tiny random Llama on CPU (kubeforge.runtime.demo): supervised
  full fine-tuning of the fruit-colour task, and DPO with LoRA (examples/dpo); each trainer's progress port
  (found in the contract `kubeforge run` writes) is scraped. For each, the same FineTuneJob, with pvc://
  URIs and the tiny model's architecture, is created in the emulator; the script plays the Job controller
  and kubelet there (tests/harness/cluster.py), as the operator tests do: rank 0's pod points at the local
  trainer's progress port, so the operator reads real progress, and the pods end with the trainer's real
  exit code and termination message.

serve.py's CPU transformers server exports no Prometheus metrics, and vLLM/SGLang cannot run here, so the
serving panels say so. After the run every panel's PromQL is evaluated with query_range through
Prometheus' HTTP API (Grafana's variables replaced as Grafana would: see grafana_variables) and the
dashboard is drawn in the panels' gridPos layout (24 columns). The raw results are kept in
WORKDIR/results.json; `python scripts/dashboard_picture.py draw WORKDIR/results.json --out PNG` redraws.

Only the standard library is imported at module level, so tests/test_dashboard_picture.py can exercise the
layout and the variable substitution without Prometheus, torch or matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "kubeforge" / "dashboards" / "kubeforge.json"
OUT = ROOT / "docs" / "dashboard.png"
GRID_COLUMNS = 24
SCRAPE_SECONDS = 2
NAMESPACE = "team-a"
CLUSTER = "a10-4x1.yaml"
DASH_PYTHON = os.environ.get("DASHBOARD_PYTHON", "/tmp/venv-dash/bin/python")

# ---------------------------------------------------------------- the dashboard, without Prometheus


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, with the panels a collapsed row holds (their gridPos is absolute)."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def grafana_variables(
    dashboard: dict[str, Any], step_seconds: float, scrape_seconds: float = SCRAPE_SECONDS
) -> dict[str, str]:
    """What Grafana puts in place of its variables: $__interval is the query step (never below the data
    source's scrape interval), $__rate_interval = max($__interval + scrape interval, 4 x scrape interval),
    and each dashboard variable its current value (the textbox $namespace: ``.*``)."""
    interval = max(step_seconds, scrape_seconds)
    rate = max(interval + scrape_seconds, 4 * scrape_seconds)
    values = {"__interval": f"{_seconds(interval)}s", "__rate_interval": f"{_seconds(rate)}s"}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":
            continue
        current = (variable.get("current") or {}).get("value")
        values[variable["name"]] = str(current if current not in (None, "") else variable.get("query", ".*"))
    return values


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace ``$name`` and ``${name}`` (longest names first); a variable left over is an error."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name])
        expr = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", lambda _m, v=variables[name]: v, expr)
    if "$" in expr:
        raise ValueError(f"a Grafana variable without a value: {expr}")
    return expr


def layout(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], tuple[float, float, float, float]]]:
    """Each panel with its rectangle (left, bottom, width, height) as fractions of the figure, from its
    gridPos on Grafana's 24-column grid; grid rows are equal units, y grows downwards."""
    every = panels(dashboard)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in every)
    out = []
    for panel in every:
        g = panel["gridPos"]
        out.append((panel, (g["x"] / GRID_COLUMNS, 1 - (g["y"] + g["h"]) / rows, g["w"] / GRID_COLUMNS, g["h"] / rows)))
    return out


def grid_rows(dashboard: dict[str, Any]) -> int:
    return max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels(dashboard))


def legend(fmt: str | None, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: ``{{label}}`` replaced by the series' label (empty when absent)."""
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def no_data_reason(exprs: list[str]) -> str:
    """Why a panel's queries returned nothing in this run, read from the metrics they ask for."""
    text = " ".join(exprs)
    if "vllm:" in text or "sglang:" in text:
        return "no data in this run (needs vLLM/SGLang on a GPU)"
    if "kubeforge_reconcile_errors_total" in text:
        return "no data: no reconcile pass raised in this run\n(the counter has no series until one does)"
    if "kubeforge_train_rewards" in text:
        return "no data: no DPO step reported in this run"
    return "no data in this run"


def unit_format(unit: str | None, value: float) -> str:
    if unit == "percentunit":
        return f"{100 * value:.0f}%"
    if unit == "s":
        return f"{value:.3g} s" if abs(value) < 60 else f"{value / 60:.1f} min"
    if unit == "ops":
        return f"{value:.2g}/s"
    return f"{value:.3g}"


# ---------------------------------------------------------------- Prometheus


def prometheus_config(operator_port: int, targets_file: Path) -> str:
    return json.dumps(
        {  # JSON is YAML
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": f"{SCRAPE_SECONDS}s"},
            "scrape_configs": [
                {"job_name": "kubeforge-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
                {
                    "job_name": "kubeforge-trainers",
                    "metrics_path": "/metrics",
                    "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
                },
            ],
        },
        indent=2,
    )


def http_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    answer = http_json(f"{base}/api/v1/query_range?{query}")
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def evaluate(dashboard: dict[str, Any], base: str, start: float, end: float, step: float) -> dict[str, Any]:
    variables = grafana_variables(dashboard, step)
    result: dict[str, Any] = {"start": start, "end": end, "step": step, "variables": variables, "panels": {}}
    for panel in panels(dashboard):
        targets = []
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables)
            series = query_range(base, expr, start, end, step)
            targets.append({"expr": expr, "legendFormat": target.get("legendFormat"), "series": series})
        result["panels"][str(panel["id"])] = {"title": panel["title"], "targets": targets}
    return result


# ---------------------------------------------------------------- the run


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(probe, what: str, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def prepare_jobs(work: Path, sft_steps: int, dpo_steps: int) -> list[dict[str, Any]]:
    """The two local jobs (folders with model, data and the YAML) and the cluster CRs that mirror them."""
    import yaml

    sys.path.insert(0, str(ROOT / "examples" / "dpo"))
    import prepare as dpo_prepare  # examples/dpo/prepare.py

    from kubeforge.runtime.demo import task, tiny
    from kubeforge.runtime.demo.__main__ import job_yaml

    sft = work / "sft"
    tiny.make_model(sft / "model", task.words())
    task.write(sft / "data")
    sft_doc = job_yaml(sft_steps, "full")
    dpo = work / "dpo"
    dpo_prepare.prepare(dpo)
    dpo_doc = yaml.safe_load((dpo / dpo_prepare.JOB.name).read_text())
    dpo_doc["spec"]["training"]["maxSteps"] = dpo_steps
    jobs = []
    for folder, doc in ((sft, sft_doc), (dpo, dpo_doc)):
        doc["metadata"]["namespace"] = NAMESPACE
        path = folder / "finetunejob.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        jobs.append({"folder": folder, "yaml": path, "name": doc["metadata"]["name"], "cr": cluster_cr(doc, folder)})
    return jobs


def cluster_cr(doc: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The same FineTuneJob as a cluster would hold it: pvc:// URIs, the tiny model's architecture in the spec."""
    import copy

    cr = copy.deepcopy(doc)
    config = json.loads((folder / "model" / "config.json").read_text())
    name = doc["metadata"]["name"]
    spec = cr["spec"]
    spec["model"] = {
        "uri": "pvc://models/tiny-llama",
        "architecture": {
            "numLayers": config["num_hidden_layers"], "hiddenSize": config["hidden_size"],
            "numAttentionHeads": config["num_attention_heads"], "numKeyValueHeads": config["num_key_value_heads"],
            "intermediateSize": config["intermediate_size"], "vocabSize": config["vocab_size"],
            "maxPositionEmbeddings": config["max_position_embeddings"],
        },
    }  # fmt: skip
    spec["dataset"]["uri"] = f"pvc://data/{name}/{Path(spec['dataset']['uri']).name}"
    spec["output"]["uri"] = f"pvc://models/{name}"
    return cr


async def run_all(
    work: Path, sft_steps: int, dpo_steps: int, keep_going: float, ref: str | None, dpo_delay: float
) -> dict[str, Any]:
    import asyncio

    sys.path.insert(0, str(ROOT))
    import kmock

    from tests.harness import cluster
    from tests.harness.emulator import FaithfulEmulator
    from tests.harness.operator import write_kubeconfig

    jobs = prepare_jobs(work, sft_steps, dpo_steps)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # two trainers share a small machine
    if ref:  # the operator, CLI and runtime of a commit, exported read-only (git archive), ahead of the checkout
        src = work / "src"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "operator", "runtime"], check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(src / "operator"), str(src / "runtime")])
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "runtime")])
    operator_port, prom_port = free_port(), free_port()
    targets = work / "trainers.json"
    targets.write_text("[]")
    (work / "prometheus.yml").write_text(prometheus_config(operator_port, targets))
    prom_log = (work / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [shutil.which("prometheus") or "prometheus", f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=prom_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{prom_port}"
    trainers: list[str] = []

    def add_target(port: int) -> None:
        trainers.append(f"127.0.0.1:{port}")
        tmp = targets.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": trainers, "labels": {}}]))
        tmp.replace(targets)  # file_sd reads whole files

    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1):
                    return True
            except OSError:
                if prometheus.poll() is not None:
                    raise RuntimeError(f"prometheus exited; see {work / 'prometheus.log'}") from None
                return False

        wait_until(ready, "Prometheus", 60)
        async with FaithfulEmulator(strict=False) as api, kmock.Server(api) as server:
            api.url = str(server.url).rstrip("/")
            for ns in ("default", NAMESPACE):
                await api.post("/api/v1/namespaces", json={"metadata": {"name": ns}})
            await cluster.add_nodes(api, CLUSTER)
            kubeconfig = write_kubeconfig(work / "kubeconfig", api.url)
            operator_env = {**env, "KUBECONFIG": str(kubeconfig), "KUBEFORGE_RESYNC_SECONDS": str(SCRAPE_SECONDS),
                            "KUBEFORGE_OFFLINE": "1", "KUBEFORGE_METRICS_PORT": str(operator_port)}  # fmt: skip
            operator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kubeforge.controller", cwd=work, env=operator_env,
                stdout=(work / "operator.log").open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip

            def watching() -> bool:  # as tests/harness/operator.py: a watch on each of the three kinds
                if operator.returncode is not None:
                    raise RuntimeError(f"the operator exited; see {work / 'operator.log'}")
                kinds = {r.resource.plural for r in api if r.params.get("watch") == "true" and r.resource is not None
                         and r.resource.group == "kubeforge.io"}  # fmt: skip
                return len(kinds) >= 3

            for _ in range(300):
                if watching():
                    break
                await asyncio.sleep(0.1)
            api.log_limit = 300  # the emulator's cost grows with its request log (see /work/shared/facts.md)
            start = time.time()
            print(f"prometheus {base}, operator metrics :{operator_port}; emulator {api.url}", flush=True)

            async def one(job: dict[str, Any], delay: float) -> int:
                await asyncio.sleep(delay)
                cr = job["cr"]
                resp = await api.post(f"/apis/kubeforge.io/v1alpha1/namespaces/{NAMESPACE}/finetunejobs", json=cr)
                assert resp.status == 201, await resp.text()
                children = await cluster.wait_children(api, NAMESPACE, job["name"], ("Job",), timeout=60)
                await asyncio.sleep(4)  # the gang waits to be scheduled for a moment
                log = (job["folder"] / "kubeforge-run.log").open("w")
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "kubeforge.cli", "run", str(job["yaml"]), "--nproc", "1", "--offline",
                    cwd=job["folder"], stdout=log, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
                contract = job["folder"] / ".kubeforge" / job["name"] / "contract.json"
                for _ in range(600):
                    if contract.exists() or proc.returncode is not None:
                        break
                    await asyncio.sleep(0.1)
                port = json.loads(contract.read_text())["progress"]["port"]
                add_target(port)
                await cluster.start_pods(api, children["Job"], progress_port=port)
                print(f"{job['name']}: training, progress on :{port}", flush=True)
                code = await proc.wait()
                termination = job["folder"] / ".kubeforge" / job["name"] / "termination.json"
                message = termination.read_text() if termination.exists() else ""
                await cluster.finish_pods(api, children["Job"], exit_code=code, message=message)
                if code == 0:
                    await cluster.complete_job(api, children["Job"])
                else:
                    await cluster.fail_job(api, children["Job"], "BackoffLimitExceeded", f"exit code {code}")
                print(f"{job['name']}: exit code {code}", flush=True)
                return code

            codes = await asyncio.gather(one(jobs[0], 2), one(jobs[1], dpo_delay))
            await asyncio.sleep(keep_going)
            end = time.time()
            operator.terminate()
            await operator.wait()
        if any(codes):
            raise RuntimeError(f"a training failed ({codes}); see {work}/*/kubeforge-run.log")
        dashboard = json.loads(DASHBOARD.read_text())
        result = evaluate(dashboard, base, start, end, SCRAPE_SECONDS)
        version = subprocess.run(["prometheus", "--version"], capture_output=True, text=True)
        result["sources"] = {
            "prometheus": version.stdout.split("\n")[0],
            "trainers": [j["name"] for j in jobs],
            "operatorResyncSeconds": SCRAPE_SECONDS,
            "cluster": CLUSTER,
            "ref": (subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True,
                                   text=True).stdout.strip() or ref) if ref else None,
        }  # fmt: skip
        return result
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


# ---------------------------------------------------------------- the picture (matplotlib, imported here only)

BG, PANEL, GRIDC, TEXT, DIM = "#111217", "#181b1f", "#2c3235", "#d8d9da", "#8e8e8e"
COLOURS = ["#73bf69", "#5794f2", "#f2cc0c", "#b877d9", "#ff9830", "#f2495c", "#4fc3c8", "#ff7383", "#8ab8ff", "#c8b06b"]


def draw(result: dict[str, Any], out: Path, dashboard: dict[str, Any]) -> None:
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter

    rows = grid_rows(dashboard)
    header = 3.2  # grid units for the title block
    width = 16.0
    height = width * (rows + header) * 30 / 1600  # Grafana: 24 columns over ~1600 px, 30 px per grid row
    fig = plt.figure(figsize=(width, height), facecolor=BG)
    scale = rows / (rows + header)
    start, end = result["start"], result["end"]
    when = datetime.datetime.fromtimestamp(start, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    src = result.get("sources", {})
    fig.text(0.008, 1 - 0.25 * (1 - scale), dashboard["title"], color=TEXT, fontsize=15, weight="bold", va="center")
    code = f"the operator, CLI and runtime of commit {src['ref']}" if src.get("ref") else "the working tree's code"
    lines = [
        f"Real data, nothing invented: {src.get('prometheus', 'Prometheus')} scraping every "
        f"{_seconds(SCRAPE_SECONDS)} s, {when}, {(end - start) / 60:.1f} min; {code}.",
        f"Trainers: two `kubeforge run` jobs on CPU ({', '.join(src.get('trainers', []))}: the demo's tiny random "
        "Llama, full SFT, and DPO with LoRA). No vLLM or SGLang: they need a GPU.",
        "Operator: `python -m kubeforge.controller` against the test harness' Kubernetes API emulator "
        f"({src.get('cluster', '')} nodes, {src.get('operatorResyncSeconds', '?')} s resync); its rank-0 pods point at "
        "the local trainers. Variables: " + ", ".join(f"${k} = {v}" for k, v in result["variables"].items()) + ".",
    ]
    for i, line in enumerate(lines):
        fig.text(0.008, 1 - (0.5 + 0.14 * i) * (1 - scale), line, color=DIM, fontsize=8, va="center")
    tick = next((t for t in (5, 10, 15, 30, 60, 120, 300, 600) if (end - start) / t <= 5), 1800)
    ticks = [t for t in range(int(start // tick + 1) * tick, int(end) + 1, tick) if t > start + 0.12 * (end - start)]
    colours: dict[str, str] = {}  # one colour per series name across the panels
    pad = 0.004
    for panel, (left, bottom, w, h) in layout(dashboard):
        bottom, h = bottom * scale, h * scale
        if panel["type"] == "row":
            fig.text(left + pad, bottom + h / 2, panel["title"], color=TEXT, fontsize=12, weight="bold", va="center")
            continue
        box = Rectangle((left + pad / 2, bottom + pad / 2), w - pad, h - pad, transform=fig.transFigure,
                        facecolor=PANEL, edgecolor=GRIDC, linewidth=0.8, zorder=-1)  # fmt: skip
        fig.patches.append(box)
        title_h = 0.018
        fig.text(left + 2 * pad, bottom + h - title_h / 1.6, panel["title"], color=TEXT, fontsize=10, weight="bold",
                 va="center")  # fmt: skip
        data = result["panels"].get(str(panel["id"]), {"targets": []})
        unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit")
        series = []
        for target in data["targets"]:
            for s in target["series"]:
                points = [(float(t), float(v)) for t, v in s["values"] if math.isfinite(float(v))]
                if points:
                    series.append((legend(target.get("legendFormat"), s["metric"]), points))
        if not series:
            reason = no_data_reason([t["expr"] for t in data["targets"]])
            fig.text(left + w / 2, bottom + (h - title_h) / 2, reason, color=DIM, fontsize=9, ha="center",
                     va="center", style="italic")  # fmt: skip
            continue
        legend_h = 0.014 * math.ceil(len(series) / max(1, int(w * GRID_COLUMNS / 4)))
        ax = fig.add_axes((left + 0.042, bottom + 0.022 + legend_h, w - 0.042 - 2 * pad, h - title_h - 0.03 - legend_h))
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.grid(True, color=GRIDC, linewidth=0.6)
        ax.tick_params(colors=DIM, labelsize=7, length=0)
        handles, used = [], set()
        for label, points in sorted(series, key=lambda s: s[0]):
            colour = colours.get(label)
            if colour is None or colour in used:  # a new name, or a clash within this panel: the next free colour
                colour = next(c for i in range(len(COLOURS)) if (c := COLOURS[(len(colours) + i) % len(COLOURS)])
                              not in used)  # fmt: skip
                colours.setdefault(label, colour)
            used.add(colour)
            xs = [t for t, _ in points]
            ys = [v for _, v in points]
            (line,) = ax.plot(xs, ys, color=colour, linewidth=1.4, label=label,
                              marker="." if len(points) < 4 else None)  # fmt: skip
            handles.append(line)
        ax.set_xlim(start, end)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _pos: time.strftime("%H:%M:%S", time.gmtime(t))))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, u=unit: unit_format(u, v)))
        lo, hi = ax.get_ylim()
        if lo >= 0 or min(min(v for _, v in p) for _, p in series) >= 0:
            ax.set_ylim(bottom=0, top=max(hi, 1e-9))
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(left + 2 * pad, bottom + pad), frameon=False,
                   ncol=max(1, int(w * GRID_COLUMNS / 4)), fontsize=7, labelcolor=TEXT, handlelength=1.2,
                   borderaxespad=0, columnspacing=1.0)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BG)
    plt.close(fig)


def draw_here_or_there(results: Path, out: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not Path(DASH_PYTHON).exists():
            raise SystemExit(
                f"matplotlib is not importable here and {DASH_PYTHON} does not exist (see the docstring)"
            ) from None
        subprocess.run([DASH_PYTHON, __file__, "draw", str(results), "--out", str(out)], check=True)
        return
    draw(json.loads(results.read_text()), out, json.loads(DASHBOARD.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/dashboard_picture.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "draw"), default="run")
    parser.add_argument("results", nargs="?", type=Path, help="draw: a results.json from an earlier run")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kubeforge-dashboard"))
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--dpo-steps", type=int, default=100)
    parser.add_argument("--dpo-delay", type=float, default=45.0, help="seconds after the SFT job's CR the DPO job's")
    parser.add_argument("--ref", help="run the operator, CLI and runtime of this commit (e.g. HEAD) instead of the "
                        "working tree's, exported with git archive into WORKDIR/src")  # fmt: skip
    parser.add_argument("--tail", type=float, default=12.0, help="seconds to keep scraping after the trainings end")
    args = parser.parse_args(argv)
    if args.command == "draw":
        if args.results is None:
            parser.error("draw needs a results.json")
        draw(json.loads(args.results.read_text()), args.out, json.loads(DASHBOARD.read_text()))
        print(f"{args.out}: {args.out.stat().st_size // 1024} KiB")
        return 0
    if not shutil.which("prometheus"):
        parser.error("prometheus is not on PATH (Debian: apt-get install prometheus)")
    import asyncio

    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result = asyncio.run(run_all(work, args.sft_steps, args.dpo_steps, args.tail, args.ref, args.dpo_delay))
    results = work / "results.json"
    results.write_text(json.dumps(result))
    empty = [
        p["title"] for p in result["panels"].values() if p["targets"] and not any(t["series"] for t in p["targets"])
    ]
    print(f"{results}; panels without data: {', '.join(empty) or 'none'}")
    draw_here_or_there(results, args.out)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
