"""The `kubeforge` command line.

kubeforge crds [-o DIR]                          print the CRDs (or write one file per CRD into DIR)
kubeforge validate FILE... [-o json]             check YAML files against the API; exit 1 on any problem
kubeforge plan FINETUNE.yaml --cluster NODES     plan a FineTuneJob against a cluster's nodes
kubeforge render FILE [--cluster NODES]          print the manifests the operator would apply for the
                                                 FineTuneJobs, QuantizeJobs and ModelServices in FILE
kubeforge run FILE.yaml                          run FineTuneJobs, QuantizeJobs and a ModelService on
                                                 this machine, in chain order (kubeforge.localrun)
kubeforge --version                              the installed package's version

`kubectl kubeforge` (kubeforge.kubectl_plugin) does plan, status and logs against a live cluster,
with the pieces of this module.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.api.crd import all_crds, file_name, to_yaml
from kubeforge.api.documents import Document, read_documents
from kubeforge.api.finetune import FineTuneJob
from kubeforge.api.kinds import API_VERSION, KINDS
from kubeforge.api.quantize import QuantizeJob
from kubeforge.api.service import ModelService
from kubeforge.api.validation import check

if TYPE_CHECKING:
    from kubeforge.controller.sources import Lookup
    from kubeforge.inventory.nodes import Node
    from kubeforge.planner.plan import Plan

Obj = FineTuneJob | QuantizeJob | ModelService

RENDER_DESCRIPTION = """\
Print, as one YAML stream, the manifests the operator would apply on its first pass over
each FineTuneJob, QuantizeJob and ModelService in FILE (in chain order), from the functions
the operator itself uses: the planner and render_finetune for a FineTuneJob, the
controller's decide_quantize and decide_service for the other two.

A quantizeJobRef or fineTuneJobRef is looked up among the objects in FILE (same namespace).
Without --source-uri, what FILE holds is as just applied: an upstream has not succeeded
yet, so an object that references one renders what the operator applies while it waits:
nothing (its reason goes to stderr, exit 1). With --source-uri, every referenced upstream
counts as Succeeded with that artifact: the objects that others in FILE reference are only
read (a ModelService's serving plan reads the quantization method and the base model
through them), and the others render with that artifact as their source.

Exit 0: everything rendered; 1: some object renders nothing (an infeasible plan, a source
to wait for); 2: bad input."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubeforge")
    except PackageNotFoundError:
        return "unknown (the kubeforge package is not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubeforge", description="Fine-tune, quantize and serve LLMs on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_crds = sub.add_parser("crds", help="print the CustomResourceDefinitions, or write them into a folder")
    p_crds.add_argument("-o", "--output-dir", type=Path, help="write one YAML file per CRD into this folder")
    p_crds.set_defaults(func=cmd_crds)

    p_val = sub.add_parser("validate", help="check FineTuneJob / QuantizeJob / ModelService YAML files")
    p_val.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p_val.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p_val.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object on stdout, {valid, documents, problems}; each problem names its file, "
        "document (1-based), kind, name, field path and message",
    )
    p_val.set_defaults(func=cmd_validate)

    p_plan = sub.add_parser("plan", help="plan a FineTuneJob against a cluster's nodes")
    p_plan.add_argument("job", type=Path, metavar="FINETUNE.yaml")
    p_plan.add_argument("--cluster", type=Path, required=True, metavar="NODES.yaml", help="kubectl get nodes -o yaml")
    add_plan_options(p_plan)
    p_plan.set_defaults(func=cmd_plan)

    p_render = sub.add_parser(
        "render",
        help="print the manifests the operator would apply for FineTuneJobs, QuantizeJobs and ModelServices",
        description=RENDER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_render.add_argument("job", type=Path, metavar="FILE")
    p_render.add_argument(
        "--cluster",
        type=Path,
        metavar="NODES.yaml",
        help="kubectl get nodes -o yaml; needed for FineTuneJobs and ModelServices (their plans read the GPUs)",
    )
    p_render.add_argument(
        "--source-uri",
        metavar="URI",
        help="the artifact of the upstream that a quantizeJobRef or fineTuneJobRef names (its status.artifact.uri "
        "once it has succeeded); without it, an object with such a source renders nothing, as the operator "
        "applies nothing while it waits",
    )
    p_render.add_argument("--source-digest", metavar="DIGEST", help="that artifact's digest (status.artifact.digest)")
    p_render.add_argument(
        "--gang", choices=("job", "jobset"), default=None, help="override spec.resources.gang (auto means job here)"
    )
    p_render.add_argument(
        "--leaderworkerset",
        action="store_true",
        help="the cluster serves LeaderWorkerSet: a ModelService replica may span nodes",
    )
    p_render.add_argument("--uid", default=None, help="the object's uid, for ownerReferences")
    p_render.add_argument("--offline", action="store_true", help="never fetch config.json from the Hub")
    p_render.set_defaults(func=cmd_render)

    p_run = sub.add_parser("run", help="run FineTuneJobs, QuantizeJobs and a ModelService on this machine")
    p_run.add_argument("job", type=Path, metavar="FILE.yaml", help="one or more of the three kinds, run in chain order")
    p_run.add_argument("--port", type=int, default=None, help="local port of a ModelService (default: a free one)")
    p_run.add_argument(
        "--nproc", type=int, default=None, help="processes (GPUs, or CPU workers); default: all GPUs or 1"
    )
    p_run.add_argument("--offline", action="store_true", help="never fetch config.json from the Hub")
    p_run.set_defaults(func=cmd_run)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """-o and --offline of `kubeforge plan` (and `kubectl kubeforge plan`)."""
    parser.add_argument("-o", "--output", choices=("json", "yaml", "table"), default="table")
    parser.add_argument("--offline", action="store_true", help="never fetch config.json from the Hub")


def cmd_crds(args: argparse.Namespace) -> int:
    crds = all_crds()
    if args.output_dir is None:
        sys.stdout.write("---\n".join(to_yaml(c) for c in crds))
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for kind, doc in zip(KINDS, crds, strict=True):
        path = args.output_dir / file_name(kind)
        path.write_text(to_yaml(doc))
        print(f"wrote {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    as_json = args.output == "json"
    documents: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for path in args.files:
        docs, error = read_documents(path)
        if error:
            problems.append({"file": str(path), "document": None, "kind": None, "name": None, "path": "",
                             "message": error})  # fmt: skip
            if not as_json:
                print_problem(f"{path}: {error}")
            continue
        for doc in docs:
            _, found = check(doc.body)
            kind, name = kind_and_name(doc.body)
            at = {"file": str(path), "document": doc.index + 1, "kind": kind, "name": name}
            documents.append({**at, "valid": not found})
            problems += [{**at, "path": p.path, "message": p.message} for p in found]
            if as_json:
                continue
            where = f"{path}{doc.where}{doc.label}"
            for problem in found:
                print_problem(f"{where}: {problem}")
            if not found and not args.quiet:
                print(f"{where}: ok")
    if as_json:
        print(json.dumps({"valid": not problems, "documents": documents, "problems": problems}, indent=2))
    return 1 if problems else 0


def kind_and_name(body: Any) -> tuple[str | None, str | None]:
    """The document's kind and metadata.name where they are strings."""
    if not isinstance(body, Mapping):
        return None, None
    meta = body.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    kind = body.get("kind")
    return (kind if isinstance(kind, str) else None), (name if isinstance(name, str) else None)


# ---------------------------------------------------------------- plan


def read_nodes(path: Path) -> list[Node] | None:
    """The Nodes of a cluster file (kubectl get nodes -o yaml), or None after printing why not."""
    from kubeforge.inventory.nodes import NodeError, nodes_in

    docs, error = read_documents(path)
    if error:
        print_problem(f"{path}: {error}")
        return None
    nodes: list[Node] = []
    for doc in docs:
        try:
            nodes += nodes_in(doc.body)
        except NodeError as err:
            print_problem(f"{path}{doc.where}: {err}")
            return None
    return nodes


def plan_finetune(job: FineTuneJob, job_path: Path, nodes: Sequence[Node], *, offline: bool,
                  where: str = "") -> Plan | None:  # fmt: skip
    """The operator's plan for ``job`` on ``nodes``, or None after printing why there is none."""
    from kubeforge.inventory.pools import pools_from_nodes
    from kubeforge.planner import ArchitectureUnknown, plan, resolve

    try:
        arch = resolve(job.spec.model, local_root=job_path.parent, allow_network=not offline)
    except (ArchitectureUnknown, ValueError) as err:
        print_problem(f"{job_path}{where}: spec.model: {err}")
        return None
    return plan(job.spec, pools_from_nodes(nodes), arch)


def print_plan(result: Plan, output: str) -> int:
    """Print a plan as `kubeforge plan -o OUTPUT` does; 0 when feasible, else 1."""
    import yaml

    from kubeforge.planner.report import table

    if output == "json":
        print(json.dumps(result.to_json(), indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(result.to_json(), sort_keys=False), end="")
    else:
        print(table(result), end="")
    return 0 if result.feasible else 1


def cmd_plan(args: argparse.Namespace) -> int:
    job = one_finetunejob(args.job)
    if job is None:
        return 2
    nodes = read_nodes(args.cluster)
    if nodes is None:
        return 2
    result = plan_finetune(job, args.job, nodes, offline=args.offline)
    if result is None:
        return 2
    return print_plan(result, args.output)


# ---------------------------------------------------------------- render


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    found = _kubeforge_documents(args.job)
    if found is None:
        return 2
    if not found:
        print_problem(f"{args.job}: expected exactly one FineTuneJob, found 0, and no QuantizeJob or ModelService")
        return 2
    upstreams = {ref for _, obj in found for ref in _source_refs(obj)}
    targets = [(doc, obj) for doc, obj in found if args.source_uri is None or _key(obj) not in upstreams]
    nodes: list[Node] = []
    if any(isinstance(obj, FineTuneJob | ModelService) for _, obj in targets):
        if args.cluster is None:
            print_problem(f"{args.job}: --cluster NODES.yaml is needed to plan a FineTuneJob or ModelService "
                          "(kubectl get nodes -o yaml)")  # fmt: skip
            return 2
        read = read_nodes(args.cluster)
        if read is None:
            return 2
        nodes = read
    rendered: list[dict[str, Any]] = []
    code = 0
    for doc, obj in sorted(targets, key=lambda t: RUN_ORDER[t[1].kind]):
        where = f"{args.job}{doc.where}"
        body = copy.deepcopy(dict(doc.body))
        if args.uid:  # as stored: the operator's object has its uid (the contract carries it too)
            body["metadata"] = {**body["metadata"], "uid": args.uid}
        if isinstance(obj, FineTuneJob):
            job, _ = check(body)
            docs, why = _render_finetune(job if isinstance(job, FineTuneJob) else obj, args, nodes, doc.where)
        else:
            lookup = file_lookup([d.body for d, _ in found], _key(obj)[0], args.source_uri, args.source_digest)
            docs, why = _decide(body, obj, lookup, nodes, args)
        if docs is None and why is None:
            return 2  # bad input, already said
        if not docs:
            print_problem(f"{where}{doc.label}: nothing to render{why}")
            code = 1
        rendered += docs or []
    sys.stdout.write("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in rendered))
    return code


def _render_finetune(job: FineTuneJob, args: argparse.Namespace, nodes: list[Node],
                     where: str) -> tuple[list[dict[str, Any]] | None, str | None]:  # fmt: skip
    """render_finetune of the operator's plan; ([], why) when infeasible; (None, None) after a problem."""
    from kubeforge.render.finetune import render_finetune

    result = plan_finetune(job, args.job, nodes, offline=args.offline, where=where)
    if result is None:
        return None, None
    if not result.feasible:
        return [], f", the plan is infeasible: {result.reason}"
    gang = args.gang or ("jobset" if job.spec.resources.gang == "jobset" else "job")
    return render_finetune(job, result, gang=gang), ""


def _decide(body: dict[str, Any], obj: Obj, lookup: Lookup, nodes: list[Node],
            args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    """What the controller's decide function applies on a first pass (no children yet), and why nothing."""
    from kubeforge.controller.conditions import now_rfc3339

    if isinstance(obj, QuantizeJob):
        from kubeforge.controller.quantize import QuantizeObserved, decide_quantize

        decision = decide_quantize(QuantizeObserved(body=body, now=now_rfc3339(), lookup=lookup))
    else:
        from kubeforge.controller.service import ServiceObserved, decide_service, lineage
        from kubeforge.inventory.pools import pools_from_nodes

        source = lineage(body.get("spec") or {}, lookup)
        decision = decide_service(
            ServiceObserved(
                body=body,
                now=now_rfc3339(),
                lookup=lookup,
                inventory=pools_from_nodes(nodes),
                architecture=_architecture_or_none(source.base, args.job.parent, args.offline),
                lineage=source,
                leaderworkerset_available=args.leaderworkerset,
            )
        )
    return decision.apply, "" if decision.apply else _why_nothing(decision.status)


def _architecture_or_none(base: Mapping[str, Any] | None, root: Path, offline: bool) -> Any:
    """As the operator: the base model's architecture where it can be known, else None (planned without it)."""
    from kubeforge.api.finetune import ModelSource
    from kubeforge.planner import ArchitectureUnknown, resolve

    if not base:
        return None
    try:
        return resolve(ModelSource.model_validate(base), local_root=root, allow_network=not offline)
    except (ArchitectureUnknown, ValueError):
        return None


def _why_nothing(status: Mapping[str, Any]) -> str:
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    source = conditions.get("SourceReady") or {}
    if source.get("status") == "False" and source.get("reason") == "WaitingForSource":
        return (f", the operator waits: {source.get('message')}; --source-uri URI renders what it applies "
                "once that has succeeded")  # fmt: skip
    for type_ in ("Stalled", "Reconciling"):
        c = conditions.get(type_) or {}
        if c.get("status") == "True":
            return f" (phase {status.get('phase')}, {c.get('reason')}): {c.get('message')}"
    return f" (phase {status.get('phase')})"


def _key(obj: Obj) -> tuple[str, str, str]:
    return obj.metadata.namespace or "default", obj.kind, obj.metadata.name or ""


def _source_refs(obj: Obj) -> list[tuple[str, str, str]]:
    """(namespace, kind, name) of the upstreams ``obj`` references."""
    if isinstance(obj, FineTuneJob):
        return []
    namespace = obj.metadata.namespace or "default"
    src = obj.spec.source
    refs = [("FineTuneJob", src.fine_tune_job_ref)]
    if isinstance(obj, ModelService):
        refs.append(("QuantizeJob", obj.spec.source.quantize_job_ref))
    return [(namespace, kind, ref.name) for kind, ref in refs if ref is not None]


def file_lookup(bodies: Sequence[Any], namespace: str, source_uri: str | None, digest: str | None) -> Lookup:
    """The controller's Lookup over the objects of a file, in one namespace: each as just applied (no status),
    or, with ``source_uri``, as Succeeded with that artifact (a stand-in where the file does not hold it)."""

    def lookup(kind: str, name: str) -> Mapping[str, Any] | None:
        found = next((b for b in bodies if kind_and_name(b) == (kind, name)
                      and ((b.get("metadata") or {}).get("namespace") or "default") == namespace), None)  # fmt: skip
        if source_uri is None:
            return None if found is None else {k: v for k, v in found.items() if k != "status"}
        obj = dict(found or {"apiVersion": API_VERSION, "kind": kind,
                             "metadata": {"name": name, "namespace": namespace}})  # fmt: skip
        artifact = {"uri": source_uri, **({"digest": digest} if digest else {})}
        obj["status"] = {"phase": "Succeeded", "artifact": artifact}
        return obj

    return lookup


def one_finetunejob(path: Path) -> FineTuneJob | None:
    """The one FineTuneJob in the file at ``path``, or None after printing why not."""
    docs, error = read_documents(path)
    if error:
        print_problem(f"{path}: {error}")
        return None
    jobs = [d for d in docs if isinstance(d.body, dict) and d.body.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        print_problem(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
        return None
    obj, problems = check(jobs[0].body)
    for problem in problems:
        print_problem(f"{path}{jobs[0].where}{jobs[0].label}: {problem}")
    return obj if isinstance(obj, FineTuneJob) and not problems else None


RUN_ORDER = {"FineTuneJob": 0, "QuantizeJob": 1, "ModelService": 2}


def cmd_run(args: argparse.Namespace) -> int:
    """Run every FineTuneJob, QuantizeJob and ModelService in the file, in chain order; serve the last."""
    from kubeforge.localrun import RunError, run, run_quantize, start_service

    objects = _valid_objects(args.job)
    if objects is None:
        return 2
    if args.nproc is not None and args.nproc < 1:
        print_problem("--nproc: must be >= 1")
        return 2
    try:
        for obj in sorted(objects, key=lambda o: RUN_ORDER[o.kind]):
            print(f"==> {obj.kind} {obj.metadata.name}", flush=True)
            if isinstance(obj, FineTuneJob):
                code = run(obj, args.job, nproc=args.nproc, offline=args.offline).code
            elif isinstance(obj, QuantizeJob):
                code = run_quantize(obj, args.job).code
            else:
                import signal

                # a SIGTERM (kill, a supervisor) must stop the engine too, not leave it orphaned
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
                server = start_service(obj, args.job, port=args.port)  # stops what it started if interrupted
                try:
                    print("Ctrl-C stops it. Try: curl " + server.url + "/models", flush=True)
                    server.process.wait()
                finally:
                    server.stop()
                code = 0
            if code:
                return code
        return 0
    except RunError as err:
        print_problem(f"{args.job}: {err}")
        return 2


def _kubeforge_documents(path: Path) -> list[tuple[Document, Obj]] | None:
    """Every FineTuneJob, QuantizeJob and ModelService in the file (other kinds are skipped), or None
    after printing each problem."""
    docs, error = read_documents(path)
    if error:
        print_problem(f"{path}: {error}")
        return None
    found: list[tuple[Document, Obj]] = []
    bad = False
    for doc in docs:
        if kind_and_name(doc.body)[0] not in RUN_ORDER:  # a kind that is a list or a mapping is not hashable
            continue
        obj, problems = check(doc.body)
        for problem in problems:
            print_problem(f"{path}{doc.where}{doc.label}: {problem}")
        bad = bad or bool(problems)
        if isinstance(obj, FineTuneJob | QuantizeJob | ModelService):
            found.append((doc, obj))
    return None if bad else found


def _valid_objects(path: Path) -> list[Obj] | None:
    found = _kubeforge_documents(path)
    if found is None:
        return None
    if not found:
        print_problem(f"{path}: no FineTuneJob, QuantizeJob or ModelService in it")
        return None
    services = [o for _, o in found if isinstance(o, ModelService)]
    if len(services) > 1:
        print_problem(f"{path}: one ModelService per local run (found {len(services)})")
        return None
    return [o for _, o in found]


def print_problem(message: str) -> None:
    """One problem on one line of stderr: a value holding a line break must not split it."""
    print(message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
