#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv, installs pinned deps,
# lints, checks import contracts, runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh operator,test
. .venv/bin/activate
echo "==> ruff"
ruff check .
echo "==> import contracts"
lint-imports
echo "==> pytest"
exec python -m pytest "$@"
