#!/usr/bin/env bash
# The main job on the embedded default, no cluster and no network needed: a tiny model
# is fine-tuned locally with `kubeforge run` (the same planner, contract and runtime a
# cluster job uses), with held-out accuracy before and after, then the plans the same
# kind of job gets on the example clusters. Extra arguments go to the demo
# (--steps N, --method full|lora, --nproc N, --workdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh operator,train,quantize,serve
exec .venv/bin/python -m kubeforge.runtime.demo "$@"
