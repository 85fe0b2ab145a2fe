"""A ModelService's autoscaler: a KEDA ScaledObject where KEDA is installed, else an autoscaling/v2
HorizontalPodAutoscaler (pure).

The metric is the engine's own, scraped by Prometheus from each engine pod's /metrics (vLLM serves it on
its API port; SGLang with --enable-metrics, which render/service.py adds):

    target                       vLLM (0.33)                       SGLang (0.5)
    waitingRequestsPerReplica    vllm:num_requests_waiting         sglang:num_queue_reqs            gauge
    kvCacheUsage                 vllm:kv_cache_usage_perc          sglang:token_usage               gauge, 0..1
    timeToFirstTokenSeconds      vllm:time_to_first_token_seconds  sglang:time_to_first_token_seconds histogram

(vllm:gpu_cache_usage_perc is the V0 name of the KV-cache gauge; V1 deprecated it for kv_cache_usage_perc.)

KEDA: one prometheus trigger whose PromQL selects the ModelService's pods by namespace and pod name (the
labels every Prometheus Kubernetes scrape config, and the prometheus-operator's PodMonitor, attach):

    gauge:     sum(<metric>{namespace="ns", pod=~"<pods>"}) or vector(0)      metricType AverageValue
               (the HPA KEDA creates divides by the replica count: the per-replica mean against the target)
    histogram: histogram_quantile(0.9, sum by (le) (rate(<metric>_bucket{...}[2m]))) > 0 or vector(0)
               metricType Value (desired = ceil(replicas x p90 / target)); NaN without traffic reads as 0

HorizontalPodAutoscaler: a Pods metric, the per-pod value averaged over the pods (target AverageValue),
under the name the Prometheus adapter serves with the rules of ``prometheus_adapter_rules()``
(documented in docs/modelservice-autoscaling-and-routing.md, which a test keeps equal to them):
``vllm:num_requests_waiting`` becomes ``vllm_num_requests_waiting``, a histogram ``<name>_p90``.

Both scale the workload (Deployment or LeaderWorkerSet) directly; the operator leaves its replica count
alone meanwhile (see controller/service.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from kubeforge.api.service import Autoscaling

KEDA_API = "keda.sh/v1alpha1"
HPA_API = "autoscaling/v2"
DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"  # the prometheus-operator's Service
WINDOW = "2m"
QUANTILE = 0.9


@dataclass(frozen=True)
class EngineMetric:
    series: str  # as the engine exports it
    type: Literal["gauge", "histogram"]

    @property
    def adapter_name(self) -> str:
        """The name the Prometheus adapter serves it under (custom.metrics.k8s.io), per prometheus_adapter_rules()."""
        name = self.series.replace(":", "_", 1)
        return f"{name}_p{round(QUANTILE * 100)}" if self.type == "histogram" else name


METRICS: dict[str, dict[str, EngineMetric]] = {
    "vllm": {
        "waitingRequestsPerReplica": EngineMetric("vllm:num_requests_waiting", "gauge"),
        "kvCacheUsage": EngineMetric("vllm:kv_cache_usage_perc", "gauge"),
        "timeToFirstTokenSeconds": EngineMetric("vllm:time_to_first_token_seconds", "histogram"),
    },
    "sglang": {
        "waitingRequestsPerReplica": EngineMetric("sglang:num_queue_reqs", "gauge"),
        "kvCacheUsage": EngineMetric("sglang:token_usage", "gauge"),
        "timeToFirstTokenSeconds": EngineMetric("sglang:time_to_first_token_seconds", "histogram"),
    },
}


def supports(engine: str) -> bool:
    """Whether the engine exports the metrics an autoscaler needs (kubeforge's transformers server does not)."""
    return engine in METRICS


def target(autoscaling: Autoscaling) -> tuple[str, float]:
    """(the target's field name, its value): exactly one is set (a Rule of ScalingTarget)."""
    for name, info in type(autoscaling.target).model_fields.items():
        value = getattr(autoscaling.target, name)
        if value is not None:
            return info.alias or name, float(value)
    raise ValueError("autoscaling.target sets no metric")


def pod_pattern(workload_kind: str, workload: str) -> str:
    """A PromQL regex (fully anchored) for the names of the pods that serve: a Deployment's are
    <deployment>-<template hash>-<suffix>; a LeaderWorkerSet's leaders <lws>-<group>, its workers
    <lws>-<group>-<index> (they run no HTTP server and export nothing). Names are DNS labels: no
    regex metacharacters to escape, and no other workload's pods match (an extra '-' never fits)."""
    if workload_kind == "LeaderWorkerSet":
        return f"{workload}-[0-9]+"
    return f"{workload}-[a-z0-9]+-[a-z0-9]+"


def promql(metric: EngineMetric, namespace: str, pods: str) -> str:
    selector = f'namespace="{namespace}",pod=~"{pods}"'
    if metric.type == "histogram":
        return (f"histogram_quantile({QUANTILE}, sum by (le) (rate({metric.series}_bucket{{{selector}}}[{WINDOW}])))"
                " > 0 or vector(0)")  # fmt: skip
    return f"sum({metric.series}{{{selector}}}) or vector(0)"


def quantity(value: float) -> str:
    """``value`` as a Kubernetes quantity in the canonical form the API server stores (so that what is
    applied reads back equal): milli-units when fractional (0.8 -> 800m), else the largest decimal
    suffix that keeps an integer (10000 -> 10k)."""
    milli = int(Decimal(str(value)).scaleb(3).to_integral_value())
    if milli % 1000:
        return f"{milli}m"
    whole, suffix = milli // 1000, ""
    for next_suffix in ("k", "M", "G", "T"):
        if whole == 0 or whole % 1000:
            break
        whole, suffix = whole // 1000, next_suffix
    return f"{whole}{suffix}"


def threshold(value: float) -> str:
    """A KEDA threshold: a decimal string (KEDA parses it as a float)."""
    return format(Decimal(str(value)).normalize(), "f")


def scale_target(workload: dict[str, Any]) -> dict[str, str]:
    return {"apiVersion": workload["apiVersion"], "kind": workload["kind"], "name": workload["metadata"]["name"]}


def scaled_object(autoscaling: Autoscaling, engine: str, workload: dict[str, Any], metadata: dict[str, Any]) -> dict:
    """``metadata``: name, namespace, labels and ownerReferences (render/objects.meta)."""
    field, value = target(autoscaling)
    metric = METRICS[engine][field]
    namespace = workload["metadata"]["namespace"]
    obj: dict[str, Any] = {"apiVersion": KEDA_API, "kind": "ScaledObject", "metadata": metadata}
    obj["spec"] = {
        "scaleTargetRef": scale_target(workload),
        "minReplicaCount": autoscaling.min_replicas,
        "maxReplicaCount": autoscaling.max_replicas,
        "triggers": [{
            "type": "prometheus",
            "metricType": "Value" if metric.type == "histogram" else "AverageValue",
            "metadata": {
                "serverAddress": autoscaling.prometheus_address or DEFAULT_PROMETHEUS,
                "query": promql(metric, namespace, pod_pattern(workload["kind"], workload["metadata"]["name"])),
                "threshold": threshold(value),
            },
        }],
    }  # fmt: skip
    return obj


def horizontal_pod_autoscaler(autoscaling: Autoscaling, engine: str, workload: dict[str, Any],
                              metadata: dict[str, Any]) -> dict:  # fmt: skip
    field, value = target(autoscaling)
    metric = METRICS[engine][field]
    obj: dict[str, Any] = {"apiVersion": HPA_API, "kind": "HorizontalPodAutoscaler", "metadata": metadata}
    obj["spec"] = {
        "scaleTargetRef": scale_target(workload),
        "minReplicas": autoscaling.min_replicas,
        "maxReplicas": autoscaling.max_replicas,
        "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric.adapter_name},
                                              "target": {"type": "AverageValue", "averageValue": quantity(value)}}}],
    }  # fmt: skip
    return obj


def prometheus_adapter_rules() -> dict[str, Any]:
    """The prometheus-adapter rules (its `rules.custom` Helm value) that serve every engine metric above,
    per pod, under EngineMetric.adapter_name: the HorizontalPodAutoscaler path needs them installed."""
    metrics = [m for by_target in METRICS.values() for m in by_target.values()]
    gauges = "|".join(m.series for m in metrics if m.type == "gauge")
    histograms = "|".join(m.series for m in metrics if m.type == "histogram")

    def resources() -> dict[str, Any]:  # the series' namespace and pod labels name the pod the value is of
        return {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}

    p = round(QUANTILE * 100)
    rate = f"rate(<<.Series>>{{<<.LabelMatchers>>}}[{WINDOW}])"
    quantile = f"histogram_quantile({QUANTILE}, sum({rate}) by (le, <<.GroupBy>>))"
    return {
        "custom": [
            {
                "seriesQuery": f'{{__name__=~"^({gauges})$",namespace!="",pod!=""}}',
                "resources": resources(),
                "name": {"matches": "^(vllm|sglang):(.*)$", "as": "${1}_${2}"},
                "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
            },
            {
                "seriesQuery": f'{{__name__=~"^({histograms})_bucket$",namespace!="",pod!=""}}',
                "resources": resources(),
                "name": {"matches": "^(vllm|sglang):(.*)_bucket$", "as": f"${{1}}_${{2}}_p{p}"},
                "metricsQuery": quantile,
            },
        ]
    }
