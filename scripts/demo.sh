#!/usr/bin/env bash
# The main job on the embedded default, no cluster needed.
# Today: validate the example resources and print the CRDs the operator installs.
# (The local fine-tuning demo replaces this when the runtime lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh operator
. .venv/bin/activate
echo "==> kubeforge validate examples/*.yaml"
kubeforge validate examples/*.yaml
echo "==> kubeforge crds (the CustomResourceDefinitions the operator serves)"
kubeforge crds
