"""The `kubeforge` command line.

kubeforge crds [-o DIR]          print the CRDs (or write one file per CRD into DIR)
kubeforge validate FILE...       check YAML files against the API; exit 1 on any problem
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kubeforge.api.crd import all_crds, file_name, to_yaml
from kubeforge.api.documents import read_documents
from kubeforge.api.kinds import KINDS
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
            print(f"{path}: {error}", file=sys.stderr)
            failed = True
            continue
        for doc in docs:
            _, problems = check(doc.body)
            where = f"{path}{doc.where}"
            label = doc.label
            if problems:
                failed = True
                for problem in problems:
                    print(f"{where}{label}: {problem}", file=sys.stderr)
            elif not args.quiet:
                print(f"{where}{label}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
