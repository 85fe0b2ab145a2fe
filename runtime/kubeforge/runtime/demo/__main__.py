"""`python -m kubeforge.runtime.demo [--workdir DIR]`: the README's main job, no cluster, no network.

1. make a tiny Llama-architecture model with random weights and a local tokenizer;
2. write a synthetic task (which colour is each fruit?) with held-out phrasings;
3. measure held-out accuracy, fine-tune with `kubeforge run` (the same path a cluster
   job takes: planner -> contract -> runtime), measure again;
4. show the plan the same YAML would get on each example cluster (`kubeforge plan`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kubeforge.runtime.demo import task, tiny

ROOT = Path(__file__).resolve().parents[4]


def job_yaml(steps: int, method: str) -> dict:
    spec = {
        "model": {"uri": "./model"},
        "dataset": {"uri": "./data/train.jsonl", "format": "messages", "maxSeqLength": 64, "packing": True},
        "method": method,
        "training": {"maxSteps": steps, "learningRate": 1.0e-3, "globalBatchSize": 16, "seed": 7},
        "output": {"uri": "./out/fruit-colours", "merge": True},
    }
    if method == "lora":
        spec["lora"] = {"rank": 16, "alpha": 32, "dropout": 0.0}
        spec["training"]["learningRate"] = 3.0e-3
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "fruit-colours"},
        "spec": spec,
    }


def kubeforge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubeforge.cli", *args], cwd=cwd, text=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.runtime.demo")
    parser.add_argument("--workdir", type=Path, default=Path("demo-run"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    print(f"==> 1. a tiny Llama-architecture model with random weights, in {work / 'model'}")
    model = tiny.make_model(work / "model", task.words())
    print(f"==> 2. the task: which colour is each of {len(task.FACTS)} fruits? (held-out phrasing for evaluation)")
    _, held_out = task.write(work / "data")
    before = task.accuracy(model, held_out)
    print(f"    held-out accuracy before fine-tuning: {before:.0%}")
    job_path = work / "finetunejob.yaml"
    job_path.write_text(yaml.safe_dump(job_yaml(args.steps, args.method), sort_keys=False))
    print(
        f"==> 3. kubeforge run {job_path.name} --nproc {args.nproc}   ({args.method} fine-tuning, {args.steps} steps)"
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", "run", str(job_path), "--nproc", str(args.nproc), "--offline"],
        cwd=work,
    )
    if result.returncode != 0:
        print("the fine-tune failed; see the log above", file=sys.stderr)
        return result.returncode
    after = task.accuracy(work / "out" / "fruit-colours", held_out)
    print(f"    held-out accuracy after fine-tuning: {after:.0%} (before: {before:.0%})")
    manifest = json.loads((work / "out" / "fruit-colours" / "kubeforge-artifact.json").read_text())
    print(f"    artifact manifest lists {len(manifest['files'])} files; base model {manifest['baseModel']}")
    print("==> 4. the plan the same kind of job gets on real clusters (Qwen3-8B LoRA example, `kubeforge plan`)")
    example = ROOT / "examples" / "finetunejob-qwen3-8b-lora.yaml"
    for cluster in sorted((ROOT / "examples" / "clusters").glob("*.yaml")):
        out = kubeforge("plan", str(example), "--cluster", str(cluster), "--offline", "-o", "json", cwd=work)
        plan = json.loads(out.stdout) if out.stdout else {"feasible": False, "reason": out.stderr.strip()}
        what = (
            plan["reason"]
            if not plan["feasible"]
            else (
                f"{plan['strategy']} on {plan['totalGPUs']} x {plan['gpuType']}, {plan['precision']}, "
                f"~{plan['estimatedStepSeconds']:.2f} s/step"
            )
        )
        print(f"    {cluster.stem:<22} {what}")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
