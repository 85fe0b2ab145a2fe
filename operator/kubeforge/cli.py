"""The `kubeforge` command line.

kubeforge crds [-o DIR]                          print the CRDs (or write one file per CRD into DIR)
kubeforge validate FILE...                       check YAML files against the API; exit 1 on any problem
kubeforge plan FINETUNE.yaml --cluster NODES     plan a FineTuneJob against a cluster's nodes
kubeforge render FINETUNE.yaml --cluster NODES   print the manifests the operator would apply for it
kubeforge run FILE.yaml                          run FineTuneJobs, QuantizeJobs and a ModelService on
                                                 this machine, in chain order (kubeforge.localrun)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kubeforge.api.crd import all_crds, file_name, to_yaml
from kubeforge.api.documents import read_documents
from kubeforge.api.finetune import FineTuneJob
from kubeforge.api.kinds import KINDS
from kubeforge.api.quantize import QuantizeJob
from kubeforge.api.service import ModelService
from kubeforge.api.validation import check


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubeforge", description="Fine-tune, quantize and serve LLMs on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_crds = sub.add_parser("crds", help="print the CustomResourceDefinitions, or write them into a folder")
    p_crds.add_argument("-o", "--output-dir", type=Path, help="write one YAML file per CRD into this folder")
    p_crds.set_defaults(func=cmd_crds)

    p_val = sub.add_parser("validate", help="check FineTuneJob / QuantizeJob / ModelService YAML files")
    p_val.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p_val.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p_val.set_defaults(func=cmd_validate)

    p_plan = sub.add_parser("plan", help="plan a FineTuneJob against a cluster's nodes")
    p_plan.add_argument("job", type=Path, metavar="FINETUNE.yaml")
    p_plan.add_argument("--cluster", type=Path, required=True, metavar="NODES.yaml", help="kubectl get nodes -o yaml")
    p_plan.add_argument("-o", "--output", choices=("json", "yaml", "table"), default="table")
    p_plan.add_argument("--offline", action="store_true", help="never fetch config.json from the Hub")
    p_plan.set_defaults(func=cmd_plan)

    p_render = sub.add_parser("render", help="print the manifests the operator would apply for a FineTuneJob")
    p_render.add_argument("job", type=Path, metavar="FINETUNE.yaml")
    p_render.add_argument("--cluster", type=Path, required=True, metavar="NODES.yaml", help="kubectl get nodes -o yaml")
    p_render.add_argument(
        "--gang", choices=("job", "jobset"), default=None, help="override spec.resources.gang (auto means job here)"
    )
    p_render.add_argument("--uid", default=None, help="the FineTuneJob's uid, for ownerReferences")
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
    failed = False
    for path in args.files:
        docs, error = read_documents(path)
        if error:
            _problem(f"{path}: {error}")
            failed = True
            continue
        for doc in docs:
            _, problems = check(doc.body)
            where = f"{path}{doc.where}"
            label = doc.label
            if problems:
                failed = True
                for problem in problems:
                    _problem(f"{where}{label}: {problem}")
            elif not args.quiet:
                print(f"{where}{label}: ok")
    return 1 if failed else 0


def _plan_for(args: argparse.Namespace):
    """(job, plan) from the JOB and --cluster arguments, or None after printing why not."""
    from kubeforge.inventory.nodes import NodeError, nodes_in
    from kubeforge.inventory.pools import pools_from_nodes
    from kubeforge.planner import ArchitectureUnknown, plan, resolve

    job = _one_finetunejob(args.job)
    if job is None:
        return None
    docs, error = read_documents(args.cluster)
    if error:
        _problem(f"{args.cluster}: {error}")
        return None
    nodes = []
    for doc in docs:
        try:
            nodes += nodes_in(doc.body)
        except NodeError as err:
            _problem(f"{args.cluster}{doc.where}: {err}")
            return None
    try:
        arch = resolve(job.spec.model, local_root=args.job.parent, allow_network=not args.offline)
    except (ArchitectureUnknown, ValueError) as err:
        _problem(f"{args.job}: spec.model: {err}")
        return None
    return job, plan(job.spec, pools_from_nodes(nodes), arch)


def cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from kubeforge.planner.report import table

    planned = _plan_for(args)
    if planned is None:
        return 2
    _, result = planned
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(result.to_json(), sort_keys=False), end="")
    else:
        print(table(result), end="")
    return 0 if result.feasible else 1


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from kubeforge.render.finetune import render_finetune

    planned = _plan_for(args)
    if planned is None:
        return 2
    job, result = planned
    if not result.feasible:
        _problem(f"{args.job}: nothing to render, the plan is infeasible: {result.reason}")
        return 1
    gang = args.gang or ("jobset" if job.spec.resources.gang == "jobset" else "job")
    docs = render_finetune(job, result, gang=gang, uid=args.uid)
    sys.stdout.write("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return 0


def _one_finetunejob(path: Path) -> FineTuneJob | None:
    docs, error = read_documents(path)
    if error:
        _problem(f"{path}: {error}")
        return None
    jobs = [d for d in docs if isinstance(d.body, dict) and d.body.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        _problem(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
        return None
    obj, problems = check(jobs[0].body)
    for problem in problems:
        _problem(f"{path}{jobs[0].where}{jobs[0].label}: {problem}")
    return obj if isinstance(obj, FineTuneJob) and not problems else None


RUN_ORDER = {"FineTuneJob": 0, "QuantizeJob": 1, "ModelService": 2}


def cmd_run(args: argparse.Namespace) -> int:
    """Run every FineTuneJob, QuantizeJob and ModelService in the file, in chain order; serve the last."""
    from kubeforge.localrun import RunError, run, run_quantize, start_service

    objects = _valid_objects(args.job)
    if objects is None:
        return 2
    if args.nproc is not None and args.nproc < 1:
        _problem("--nproc: must be >= 1")
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
        _problem(f"{args.job}: {err}")
        return 2


def _valid_objects(path: Path) -> list[FineTuneJob | QuantizeJob | ModelService] | None:
    docs, error = read_documents(path)
    if error:
        _problem(f"{path}: {error}")
        return None
    found, bad = [], False
    for doc in docs:
        if not isinstance(doc.body, dict) or doc.body.get("kind") not in RUN_ORDER:
            continue
        obj, problems = check(doc.body)
        for problem in problems:
            _problem(f"{path}{doc.where}{doc.label}: {problem}")
        bad = bad or bool(problems)
        found.append(obj)
    if not found:
        _problem(f"{path}: no FineTuneJob, QuantizeJob or ModelService in it")
        return None
    services = [o for o in found if isinstance(o, ModelService)]
    if len(services) > 1:
        _problem(f"{path}: one ModelService per local run (found {len(services)})")
        return None
    return None if bad else found


def _problem(message: str) -> None:
    """One problem on one line of stderr: a value holding a line break must not split it."""
    print(message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
