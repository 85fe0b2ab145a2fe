#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv, installs pinned deps and
# runs pytest (which also runs ruff and the import contracts, see tests/test_project.py).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh operator,test,train,quantize,serve
scripts/s3-server.sh
exec .venv/bin/python -m pytest "$@"
