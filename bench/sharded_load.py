"""Peak host memory of loading a 2.15 GB model per process: DDP (whole) vs FSDP2 vs ZeRO-3 loaders.

    .venv/bin/python bench/sharded_load.py [--vocab 8000 --layers 10] [--strategies ddp,fsdp,zero3]

Two processes (torchrun, gloo). Prints, per strategy, the peak RSS each process adds to a
process that only imported the same libraries, as a fraction of the model's bytes
(tests/runtime/probes/load_peak.py). DDP maps the safetensors files and touches pages only
when a weight is used, so its load figure understates what a training step will hold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.runtime.probes import big_model  # noqa: E402
from tests.runtime.test_sharded_loading import peak_share  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--strategies", default="ddp,fsdp,zero3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        size = big_model.make(folder, vocab=args.vocab, layers=args.layers)
        print(f"model: {size / 1e9:.2f} GB (fp32, 4 shards)")
        for strategy in args.strategies.split(","):
            began = time.monotonic()
            (Path(tmp) / strategy).mkdir()
            shares = peak_share(folder, size, Path(tmp) / strategy, strategy)
            print(f"{strategy:6s} peak per process / model bytes: {', '.join(f'{s:.3f}' for s in shares)}"
                  f"  ({time.monotonic() - began:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
