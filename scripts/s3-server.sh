#!/usr/bin/env bash
# Create (or reuse) .venv-s3: moto's S3 server, for the tests of s3:// download and upload.
# Its own venv because boto3 (which moto needs) and the kubernetes client pin conflicting
# versions of shared packages. The tests start it on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KUBEFORGE_S3_VENV:-.venv-s3}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
stamp="$venv/.installed"
hash="$(sha256sum requirements/s3-server.txt | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    exit 0
fi
echo "==> installing moto's S3 server into $venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements/s3-server.txt
echo "$hash" > "$stamp"
