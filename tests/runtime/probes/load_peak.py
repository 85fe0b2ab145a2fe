"""Peak resident memory of loading a model with an engine's loader, per process.

    python -m tests.runtime.probes.load_peak CONTRACT.json OUT_DIR   (under torchrun)

After the imports and the process group (what any process of the gang holds anyway; for DeepSpeed
also deepspeed.init_distributed, whose workspace does not depend on the model), the
kernel's peak-RSS counter is reset (/proc/self/clear_refs) and the RSS read: the baseline of
a process that only imported the same libraries. Then the strategy's loader builds the model
(ddp: every weight; fsdp: meta build + this rank's rows; zero3: zero.Init + this rank's
range), without the optimizer, and the peak (VmHWM) is read. Writes OUT_DIR/rank<N>.json:
{"baseline": bytes, "peak": bytes, "attributable": peak - baseline}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(argv: list[str]) -> int:
    import torch.distributed as td
    import transformers  # noqa: F401

    from kubeforge.runtime.contract import STRATEGIES
    from kubeforge.runtime.engines import common, fsdp, loading, zero
    from tests.runtime.probes import gang

    contract, setup = gang.join(argv[0])
    out, dist, device = Path(argv[1]), setup.dist, setup.device
    facts = STRATEGIES[contract.parallel.strategy]
    if facts.engine == "deepspeed":  # imported and its communication set up before the baseline, like the
        import deepspeed  # process group: DeepSpeed's CPU shared-memory collectives keep a fixed workspace

        deepspeed.init_distributed(dist_backend="gloo")  # (112 MB here, whatever the model's size)
    common.return_freed_memory()  # as train.run does
    td.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status("VmRSS")
    if facts.engine == "fsdp":
        model, _ = fsdp.build_sharded_model(setup)
    elif facts.engine == "deepspeed" and facts.zero_stage == 3:
        model = zero.build_partitioned_model(setup, zero.deepspeed_config(contract, 2048))
    else:
        model = loading.load_whole(contract, setup.model_dir, device)
    peak = _status("VmHWM")
    held = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    result = {"baseline": baseline, "peak": peak, "attributable": peak - baseline, "local_elements": held}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    gang.leave()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
