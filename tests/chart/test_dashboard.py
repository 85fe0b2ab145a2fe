"""The chart's monitoring: the Grafana dashboard, the PodMonitors and the ServiceMonitor's labels.

- the dashboard is JSON whose every PromQL expression parses with a real PromQL parser (promql-parser,
  the Rust `promql-parser` crate's bindings), after Grafana's variables are replaced as Grafana does;
- every metric it reads is one kubeforge exports (read from the code: the trainer's progress.METRICS and
  the DPO objective's metric names, the operator's collectors) or a documented vLLM/SGLang metric;
- the PodMonitors validate against the Prometheus Operator's own CRD schema (tests/assets/crds) and
  select the pods kubeforge creates by the label keys of kubeforge.render.labels.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from kubeforge.controller import metrics as operator_metrics
from kubeforge.render import labels as L
from kubeforge.render import service
from kubeforge.render.engines import SERVING_PORT_NAME
from kubeforge.runtime import progress
from kubeforge.runtime.contract import PROGRESS_PORT_NAME
from tests.chart.charting import CHART, of_kind, render
from tests.harness.crdschema import cel_violations, schema_errors

ROOT = CHART.parents[1]
DASHBOARD = json.loads((CHART / "dashboards" / "kubeforge.json").read_text())
PODMONITOR_CRD = ROOT / "tests" / "assets" / "crds" / "monitoring.coreos.com_podmonitors.yaml"
# What Grafana puts in place of its variables before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$namespace": ".*"}

# Engine metrics the dashboard may read, as their projects document them:
# vLLM: https://docs.vllm.ai/en/v0.32.0/usage/metrics/ ("Production Metrics"; V1 engine names)
VLLM = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
}  # fmt: skip
# SGLang: https://docs.sglang.io/references/production_metrics.html (served with --enable-metrics)
SGLANG = {
    "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
    "sglang:time_to_first_token_seconds", "sglang:inter_token_latency_seconds", "sglang:e2e_request_latency_seconds",
    "sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:gen_throughput",
}  # fmt: skip
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def series(name: str, kind: str) -> set[str]:
    """The series names a metric family of ``kind`` exposes."""
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    if kind == "histogram":
        return {name + suffix for suffix in HISTOGRAM_SERIES}
    return {name}


def dpo_metric_names() -> tuple[str, ...]:
    """dpo.METRICS, read from its source (importing it would import torch)."""
    tree = ast.parse((ROOT / "runtime" / "kubeforge" / "runtime" / "dpo.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["METRICS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("dpo.METRICS not found")


def kubeforge_series() -> set[str]:
    trainer = {s for name, (kind, _, _) in progress.METRICS.items() for s in series(name, kind)}
    trainer |= {progress.objective_metric(name) for name in dpo_metric_names()}
    collectors = [c for c in vars(operator_metrics).values() if isinstance(c, MetricWrapperBase)]
    collectors.append(operator_metrics.OBJECTS_COLLECTOR)
    operator = {s for c in collectors for m in c.describe() for s in series(m.name, m.type)}
    return trainer | operator


def documented_engine_series() -> set[str]:
    return {s for name in VLLM | SGLANG for s in (series(name, "histogram") if name.endswith("_seconds") else {name})}


def panels(dashboard: dict[str, Any] = DASHBOARD) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()
    promql_parser.walk(
        promql_parser.parse(grafana_to_promql(expr)),
        lambda node: names.add(node.name) if isinstance(node, promql_parser.VectorSelector) else None,
    )
    return names


# ---------------------------------------------------------------- the dashboard


def test_the_dashboard_is_json_with_unique_panel_ids_and_one_uid():
    json.dumps(DASHBOARD)  # round-trips
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    assert DASHBOARD["uid"] == "kubeforge" and DASHBOARD["title"]
    for panel in panels():
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_has_the_panels_an_operator_wants():
    titles = {p["title"] for p in panels()}
    assert {"Operator", "Training", "Serving: vLLM", "Serving: SGLang"} <= titles
    assert {"Reconciles per second", "Reconcile errors per second", "Objects by phase", "Loss", "Tokens per second",
            "ETA", "DPO reward margin", "KV-cache usage", "Time to first token (p95)"} <= titles  # fmt: skip


@pytest.mark.parametrize("expr", expressions())
def test_every_expression_parses_as_promql(expr: str):
    assert metric_names(expr), expr  # parses, and reads at least one metric


def test_the_parser_rejects_what_prometheus_rejects():
    for bad in ("sum by (kind) (rate(kubeforge_reconciles_total[5m])", "rate(kubeforge_train_loss)", "x{a=}"):
        with pytest.raises(ValueError):
            promql_parser.parse(bad)


def test_every_metric_the_dashboard_reads_is_exported_or_documented():
    known = kubeforge_series() | documented_engine_series()
    used = {name for expr in expressions() for name in metric_names(expr)}
    assert used - known == set()
    kubeforge = {n for n in used if n.startswith("kubeforge_")}
    assert {"kubeforge_objects", "kubeforge_train_loss", "kubeforge_train_rewards_margins"} <= kubeforge


def test_the_exported_names_come_from_the_code():
    names = kubeforge_series()
    assert "kubeforge_reconcile_duration_seconds_bucket" in names
    assert "kubeforge_train_tokens_total" in names and "kubeforge_train_tokens" not in names
    assert "kubeforge_train_rewards_accuracies" in names


# ---------------------------------------------------------------- the chart's objects

ALL_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitors": {"trainer": {"enabled": True}, "engines": {"enabled": True}, "labels": {"release": "kps"}},
    },
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
}


def podmonitor_schema() -> dict[str, Any]:
    crd = next(d for d in yaml.safe_load_all(PODMONITOR_CRD.read_text()) if d)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def meta_label(key: str) -> str:
    """Prometheus's Kubernetes service discovery name of a pod label."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_monitoring_is_off_by_default():
    docs = render()
    assert not of_kind(docs, "PodMonitor") and not of_kind(docs, "ServiceMonitor")
    assert not [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]])
def test_the_podmonitors_validate_against_the_prometheus_operator_crd(watch: list[str]):
    schema = podmonitor_schema()
    monitors = of_kind(render({**ALL_ON, "watchNamespaces": watch}), "PodMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        assert schema_errors(schema, monitor) == []
        assert cel_violations(schema, monitor) == []
        assert monitor["metadata"]["labels"]["release"] == "kps"
        expected = {"matchNames": watch} if watch else {"any": True}
        assert monitor["spec"]["namespaceSelector"] == expected


def test_the_crd_schema_catches_a_bad_podmonitor():
    (monitor, _) = of_kind(render(ALL_ON), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "keepit"
    assert schema_errors(podmonitor_schema(), monitor)


def test_the_podmonitors_select_kubeforge_pods_by_its_own_label_keys():
    monitors = {m["metadata"]["name"]: m["spec"] for m in of_kind(render(ALL_ON), "PodMonitor")}
    trainer, engines = monitors["kubeforge-trainers"], monitors["kubeforge-engines"]
    ours = {L.MANAGED_BY: L.MANAGED_BY_VALUE}
    assert trainer["selector"]["matchLabels"] == {**ours, L.OWNER_KIND: "FineTuneJob", L.COMPONENT: "trainer"}
    assert engines["selector"]["matchLabels"] == {**ours, L.OWNER_KIND: "ModelService", L.COMPONENT: "engine"}
    (t,) = trainer["podMetricsEndpoints"]
    assert (t["port"], t["path"]) == (PROGRESS_PORT_NAME, progress.METRICS_PATH)
    keep, owner = t["relabelings"]
    assert keep["sourceLabels"] == [meta_label(L.JOB_COMPLETION_INDEX_LABEL)] and keep["regex"] == "0"
    assert owner["sourceLabels"] == [meta_label(L.OWNER_NAME)] and owner["targetLabel"] == progress.LABELS[1]
    (e,) = engines["podMetricsEndpoints"]
    assert (e["port"], e["path"]) == (SERVING_PORT_NAME, "/metrics")
    keep, owner = e["relabelings"]
    assert keep["sourceLabels"] == [meta_label(service.LWS_WORKER_INDEX)]
    assert owner["sourceLabels"] == [meta_label(L.OWNER_NAME)] and owner["targetLabel"] == "modelservice"


def test_the_servicemonitor_carries_the_configured_labels():
    (monitor,) = of_kind(render(ALL_ON), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_dashboard_configmap_ships_the_dashboard_file():
    (cm,) = [d for d in of_kind(render(ALL_ON), "ConfigMap") if d["metadata"]["name"] == "kubeforge-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(cm["data"]["kubeforge.json"]) == DASHBOARD
