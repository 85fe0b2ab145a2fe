"""`kubectl kubeforge`: kubeforge against a live cluster, as a kubectl plugin.

kubectl runs any executable named ``kubectl-<name>`` on the PATH as ``kubectl <name>``; this
module is installed as ``kubectl-kubeforge`` ([project.scripts] in pyproject.toml).

kubectl kubeforge plan FINETUNE.yaml             plan against the cluster's Node objects (the inventory
                                                 reader and planner of `kubeforge plan --cluster`)
kubectl kubeforge status NAME [-k ftj|qj|msvc]   phase, conditions, plan, progress and artifact
kubectl kubeforge logs NAME [-f] [--tail N]      the log of rank 0 of a FineTuneJob

Connection flags as kubectl's: --kubeconfig, --context, -n/--namespace (default: the context's
namespace, else "default"). The API is reached as the operator reaches it: the kubernetes
client, configured from the kubeconfig (KUBECONFIG, else ~/.kube/config; in-cluster config when
there is none), and controller/kube.py's Kube with its retry policy for every read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kubeforge import cli
from kubeforge.api.kinds import API_VERSION, FINETUNEJOB, KINDS, Kind
from kubeforge.render import labels as L
from kubeforge.render.names import owner_label

KIND_ALIASES: dict[str, Kind] = {
    alias: k for k in KINDS for alias in (k.kind.lower(), k.singular, k.plural, *k.short_names)
}
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
SUMMARY_CONDITIONS = ("Ready", "Reconciling", "Stalled")


class Failure(Exception):
    """A problem to print on one line of stderr, with the exit code to end with."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubectl kubeforge",
        description="kubeforge against the cluster of your kubeconfig: plan, status and logs.",
    )
    parser.add_argument("--version", action="version", version=f"kubectl-kubeforge {cli.package_version()}")
    add_connection_options(parser)
    connection = argparse.ArgumentParser(add_help=False)
    add_connection_options(connection, argparse.SUPPRESS)  # also after the command, not overriding one before
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_plan = sub.add_parser("plan", parents=[connection], help="plan a FineTuneJob against the cluster's nodes")
    p_plan.add_argument("job", type=Path, metavar="FINETUNE.yaml")
    cli.add_plan_options(p_plan)
    p_plan.set_defaults(func=cmd_plan)

    p_status = sub.add_parser("status", parents=[connection], help="phase, conditions, plan, progress, artifact")
    p_status.add_argument("name", metavar="NAME")
    p_status.add_argument(
        "-k", "--kind", default="ftj", type=str.lower, choices=sorted(KIND_ALIASES), metavar="KIND",
        help="ftj (FineTuneJob, the default), qj (QuantizeJob) or msvc (ModelService)",
    )  # fmt: skip
    p_status.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text",
                          help="json, yaml: the object's status as stored")  # fmt: skip
    p_status.set_defaults(func=cmd_status)

    p_logs = sub.add_parser("logs", parents=[connection], help="the log of rank 0 of a FineTuneJob")
    p_logs.add_argument("name", metavar="NAME")
    p_logs.add_argument("-f", "--follow", action="store_true", help="stream the log as it grows")
    p_logs.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
    p_logs.add_argument("-p", "--previous", action="store_true", help="the previous container's log (a restart)")
    p_logs.set_defaults(func=cmd_logs)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Failure as err:
        cli.print_problem(f"error: {err}")
        return err.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


# ---------------------------------------------------------------- the connection


def add_connection_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """kubectl's --kubeconfig, --context, -n and --request-timeout."""
    parser.add_argument("--kubeconfig", metavar="PATH", default=default,
                        help="the kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")  # fmt: skip
    parser.add_argument("--context", metavar="NAME", default=default,
                        help="the kubeconfig context (default: its current one)")  # fmt: skip
    parser.add_argument("-n", "--namespace", metavar="NS", default=default,
                        help="default: the context's namespace, else default")  # fmt: skip
    timeout = 30.0 if default is None else default
    parser.add_argument("--request-timeout", type=float, metavar="SECONDS", default=timeout,
                        help="give up on a request (retries included) after this long (default 30)")  # fmt: skip


def connect(args: argparse.Namespace) -> tuple[Any, str]:
    """(Kube, namespace) from --kubeconfig / --context / -n, as kubectl resolves them."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError as err:
        raise Failure(f"{err}: the plugin needs the kubernetes client (pip install 'kubeforge[operator]')", 2) from err

    from kubeforge.controller.kube import Kube, Policy

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=args.kubeconfig, context=args.context, client_configuration=configuration)
        namespace = context_namespace(args.kubeconfig, args.context)
    except (ConfigException, OSError) as err:
        if args.kubeconfig or args.context:
            raise Failure(f"kubeconfig: {err}", 2) from err
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            raise Failure(f"no kubeconfig and not in a cluster: {err}", 2) from err
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.exists() else "default"
    configuration.retries = False  # one retry policy: Kube's
    timeout = max(1.0, args.request_timeout)
    kube = Kube(client.ApiClient(configuration), policy=Policy(deadline=timeout), timeout=min(timeout, 10.0))
    return kube, args.namespace or namespace


def context_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace a kubeconfig context names, else "default"."""
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


def api_call(what: str, fn: Any) -> Any:
    """Run one API read; an answer the operator's client raises becomes a one-line Failure."""
    from kubeforge.controller.kube import ApiError

    try:
        return fn()
    except ApiError as err:
        raise Failure(f"{what}: {err.status or 'no answer'} {err.reason}: {api_message(err.body)}") from err


def api_message(body: Any) -> str:
    """The message of the API's Status object in ``body``, else the body itself (one line, shortened)."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    message = parsed.get("message") if isinstance(parsed, dict) else None
    return _one_line(message or text)[:300]


# ---------------------------------------------------------------- plan


def cmd_plan(args: argparse.Namespace) -> int:
    """As `kubeforge plan FILE --cluster NODES`, with the Nodes listed from the cluster."""
    from kubeforge.inventory.nodes import NodeError, nodes_in

    job = cli.one_finetunejob(args.job)
    if job is None:
        return 2
    kube, _ = connect(args)
    listing = api_call("list nodes", lambda: kube.get("/api/v1/nodes"))
    try:
        nodes = nodes_in(listing or {"items": []})
    except NodeError as err:
        raise Failure(f"a Node the cluster returned: {err}") from err
    result = cli.plan_finetune(job, args.job, nodes, offline=args.offline)
    if result is None:
        return 2
    return cli.print_plan(result, args.output)


# ---------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    import yaml

    kind = KIND_ALIASES[args.kind]
    kube, namespace = connect(args)
    path = f"/apis/{API_VERSION}/namespaces/{quote(namespace, safe='')}/{kind.plural}/{quote(args.name, safe='')}"
    obj = api_call(f"get {kind.kind} {namespace}/{args.name}", lambda: kube.read(path))
    if obj is None:
        raise Failure(f'{kind.kind} "{args.name}" not found in namespace "{namespace}"')
    status = obj.get("status") or {}
    if args.output == "json":
        print(json.dumps(status, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(status, sort_keys=False), end="")
    else:
        print("\n".join(status_lines(obj)))
    return 0


def status_lines(obj: Mapping[str, Any]) -> list[str]:
    """What `status` prints for a stored FineTuneJob, QuantizeJob or ModelService (pure)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    kind = obj.get("kind") or "?"
    lines = [
        f"{kind} {meta.get('namespace') or 'default'}/{meta.get('name')}",
        f"Phase:       {status.get('phase') or '-'}",
    ]
    conditions = list(status.get("conditions") or [])
    summary = [c for t in SUMMARY_CONDITIONS for c in conditions if c.get("type") == t]
    own = [c for c in conditions if c.get("type") not in SUMMARY_CONDITIONS]
    if conditions:
        lines.append("Conditions:")
        lines += _table([("TYPE", "STATUS", "REASON", "MESSAGE")]
                        + [(str(c.get("type")), str(c.get("status")), str(c.get("reason") or ""),
                            _one_line(c.get("message"))) for c in summary + own], indent="  ")  # fmt: skip
    else:
        lines.append("Conditions:  - (the operator has not written any yet)")
    for label, value in _details(kind, status):
        lines.append(f"{label + ':':<13}{value}")
    return lines


def _details(kind: str, status: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if kind == "FineTuneJob":
        plan = status.get("plan") or {}
        if not plan:
            rows.append(("Plan", "-"))
        elif plan.get("feasible"):
            rows.append(("Plan", _one_line(plan.get("reason"))))
        else:
            rows.append(("Plan", "infeasible: " + _one_line(plan.get("reason"))))
        rows.append(("Progress", progress_text(status.get("progress") or {})))
    elif kind == "QuantizeJob":
        source = (status.get("source") or {}).get("uri")
        rows.append(("Source", source or "-"))
        if "gpus" in status:
            rows.append(("Plan", f"{status['gpus']} GPU" if status["gpus"] else "CPU"))
        stage = (status.get("progress") or {}).get("stage")
        rows.append(("Progress", str(stage) if stage else "-"))
        if status.get("metrics"):
            metrics = sorted(status["metrics"].items())
            rows.append(("Metrics", ", ".join(f"{k} {v:g}" if isinstance(v, int | float) else f"{k} {v}"
                                              for k, v in metrics)))  # fmt: skip
    else:
        if status.get("engine"):
            rows.append(("Plan", f"{status['engine']}, {status.get('gpus', 0)} GPU(s) per replica"))
        else:
            rows.append(("Plan", "-"))
        if "replicas" in status:
            rows.append(("Replicas", f"{status.get('readyReplicas', 0)} of {status['replicas']} ready"))
        if status.get("endpoint"):
            rows.append(("Endpoint", str(status["endpoint"])))
        rows.append(("Serving", artifact_text(status.get("servedArtifact") or {})))
        return rows
    rows.append(("Artifact", artifact_text(status.get("artifact") or {})))
    return rows


def progress_text(progress: Mapping[str, Any]) -> str:
    parts = []
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    if progress.get("percent") is not None:
        parts.append(f"{progress['percent']}%")
    if progress.get("epoch") is not None:
        parts.append(f"epoch {progress['epoch']:g}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4g}")
    if progress.get("tokensPerSecond") is not None:
        parts.append(f"{progress['tokensPerSecond']:.0f} tokens/s")
    if progress.get("etaSeconds") is not None:
        parts.append(f"ETA {_duration(int(progress['etaSeconds']))}")
    text = ", ".join(parts) or "-"
    return text + (f" (at {progress['updatedAt']})" if parts and progress.get("updatedAt") else "")


def artifact_text(artifact: Mapping[str, Any]) -> str:
    if not artifact.get("uri"):
        return "-"
    extra = [str(artifact["digest"])] if artifact.get("digest") else []
    if isinstance(artifact.get("sizeBytes"), int):
        extra.append(f"{artifact['sizeBytes'] / 1024**3:.2f} GiB")
    return str(artifact["uri"]) + (f" ({', '.join(extra)})" if extra else "")


def _duration(seconds: int) -> str:
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())


def _table(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]).rstrip()
            for r in rows]  # fmt: skip


# ---------------------------------------------------------------- logs


def pod_selector(name: str) -> str:
    """The label selector of a FineTuneJob's pods: the owner labels render/labels.py puts on them."""
    return f"{L.OWNER_KIND}={FINETUNEJOB.kind},{L.OWNER_NAME}={owner_label(name)}"


def rank0_pod_of(pods: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    """Rank 0 of FineTuneJob ``name`` among ``pods``: its owner labels, completion index 0 (as the operator
    reads rank 0), the newest where a restarted gang left older ones (pure)."""
    from kubeforge.controller.finetune import rank0_pod

    wanted = {L.OWNER_KIND: FINETUNEJOB.kind, L.OWNER_NAME: owner_label(name)}
    own = [p for p in pods if all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v
                                  for k, v in wanted.items())]  # fmt: skip
    own.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""), reverse=True)
    return rank0_pod(own)


def cmd_logs(args: argparse.Namespace) -> int:
    from kubernetes import client

    from kubeforge.render.finetune import CONTAINER

    kube, namespace = connect(args)
    from kubeforge.controller.retry import call

    what = f"list pods of FineTuneJob {namespace}/{args.name}"
    query = [("labelSelector", pod_selector(args.name))]
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"
    listing = api_call(
        what, lambda: call(lambda: kube.request("GET", path, query=query), policy=kube.policy, what=what)
    )
    pod = rank0_pod_of((listing or {}).get("items") or [], args.name)
    if pod is None:
        raise Failure(f'FineTuneJob "{args.name}" has no rank-0 pod in namespace "{namespace}" (yet)')
    pod_name = pod["metadata"]["name"]
    options: dict[str, Any] = {"container": CONTAINER, "follow": args.follow, "previous": args.previous}
    if args.tail is not None:
        options["tail_lines"] = args.tail
    try:
        response = client.CoreV1Api(kube.api).read_namespaced_pod_log(
            pod_name, namespace, _preload_content=False, **options
        )
    except client.ApiException as err:
        raise Failure(
            f"logs of pod {namespace}/{pod_name}: {err.status} {err.reason}: {api_message(err.body)}"
        ) from err
    try:
        for chunk in response.stream(4096):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
    finally:
        response.release_conn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
