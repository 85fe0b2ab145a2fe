#!/usr/bin/env bash
# Create (or reuse) .venv and install kubeforge with the given extras, pinned by
# requirements/constraints.txt. Usage: scripts/venv.sh EXTRA[,EXTRA...]
# Needs only python3.11 and access to PyPI. Re-running is cheap: it reinstalls only
# when the extras, pyproject.toml or the constraints changed.
#
# torch and DeepSpeed go first, by hand: torch==2.13.0 is the CPU build (an unpinned
# torch pulls GBs of CUDA wheels), and DeepSpeed must build against that torch
# (DS_BUILD_OPS=0, no build isolation; its ops compile on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-operator,test}"
venv="${KUBEFORGE_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
pip_install() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt "$@"; }

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
stamp="$venv/.kubeforge-installed"  # "<hash of pyproject + constraints> <extras installed>"
hash="$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)"
read -r have_hash have_extras < "$stamp" 2>/dev/null || true
missing=""
for extra in ${extras//,/ }; do
    case ",${have_extras:-}," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
done
if [ "${have_hash:-}" = "$hash" ] && [ -z "$missing" ]; then
    exit 0  # everything asked for is installed, at the pinned versions
fi
if [ "${have_hash:-}" = "$hash" ]; then
    extras="$(echo "${have_extras},${extras}" | tr ',' '\n' | sort -u | paste -sd, -)"
fi
echo "==> installing kubeforge[$extras] into $venv (pinned by requirements/constraints.txt)"
case ",$extras," in
    *,test,*|*,train,*|*,quantize,*|*,serve,*)
        pip_install torch wheel setuptools
        DS_BUILD_OPS=0 pip_install --no-build-isolation deepspeed
        ;;
esac
pip_install -e ".[$extras]"
echo "$hash $extras" > "$stamp"
