"""How much the operator pays to validate an object on every reconcile.

Side by side in one run, per kind: pydantic structural validation alone, then the
full `check` (structure + every Rule). Reports objects/s and the ratio.

    python bench/validate_throughput.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)]

from kubeforge.api import BY_KIND, check  # noqa: E402
from tests.builders import FINETUNE, QUANTIZE, SERVICE, example  # noqa: E402


def rate(fn, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            fn()
        n += 50
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(f"{'kind':<14}{'structure obj/s':>18}{'full check obj/s':>18}{'ratio':>8}")
    for name in (FINETUNE, QUANTIZE, SERVICE):
        doc = example(name)
        model = BY_KIND[doc["kind"]].model
        structural = rate(lambda d=doc, m=model: m.model_validate(d), args.seconds)
        full = rate(lambda d=doc: check(d), args.seconds)
        print(f"{doc['kind']:<14}{structural:>18,.0f}{full:>18,.0f}{structural / full:>8.2f}")


if __name__ == "__main__":
    main()
