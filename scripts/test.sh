#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv, installs pinned deps and
# runs pytest (which also runs ruff and the import contracts, see tests/test_project.py).
# Extra arguments go to pytest. KUBEFORGE_TEST_WORKERS=2 spreads the test files over 2 pytest-xdist
# workers (each file stays on one worker, so its module fixtures are built once); the default, 0, runs
# everything in this process: on 2 cores the operator tests' waits then never share the CPUs with a
# 2-process training test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh operator,test,train,quantize,serve
scripts/s3-server.sh
exec .venv/bin/python -m pytest -n "${KUBEFORGE_TEST_WORKERS:-0}" --dist loadfile "$@"
