#!/usr/bin/env bash
# Create (or reuse) .venv and install kubeforge with the given extras, pinned by
# requirements/constraints.txt. Usage: scripts/venv.sh EXTRA[,EXTRA...]
# Needs only python3.11 and access to PyPI. Re-running is cheap: it reinstalls only
# when the extras, pyproject.toml or the constraints changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-operator,test}"
venv="${KUBEFORGE_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
stamp="$venv/.kubeforge-installed"
want="$extras $(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing kubeforge[$extras] into $venv (pinned by requirements/constraints.txt)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c requirements/constraints.txt -e ".[$extras]"
    echo "$want" > "$stamp"
fi
