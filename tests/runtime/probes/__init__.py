"""Programs the runtime tests run under torchrun, each on a contract, writing what it measured to a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]


def run(probe: str, contract: Any, work: Path, output: Path, *, nproc: int = 2, timeout: int = 600) -> None:
    """tests.runtime.probes.<probe> on ``contract`` (written to work/contract.json) in a gang of ``nproc`` CPU
    processes, one thread each; the probe writes ``output``. Fails the test with the gang's stderr."""
    config = work / "contract.json"
    config.write_text(contract.to_json())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", f"tests.runtime.probes.{probe}", str(config), str(output)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
