"""Run the operator: ``python -m kubeforge.controller [--namespace NS ...]``."""

from __future__ import annotations

import argparse
import asyncio
import sys

import kopf

import kubeforge.controller.handlers  # noqa: F401  (registers the handlers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.controller")
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch only these (repeatable)")
    parser.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    kopf.configure(verbose=args.verbose)  # kopf's own log format, with [namespace/name] prefixes
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
