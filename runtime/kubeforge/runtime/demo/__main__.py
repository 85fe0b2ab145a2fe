"""`python -m kubeforge.runtime.demo [--workdir DIR]`: the README's main job, no cluster, no network.

1. make a tiny Llama-architecture model with random weights and a local tokenizer;
2. write a synthetic task (which colour is each fruit?) with held-out phrasings;
3. measure held-out accuracy, fine-tune with `kubeforge run` (the same path a cluster
   job takes: planner -> contract -> runtime), measure again;
4. quantize the tuned model to FP8 with `kubeforge run quantizejob.yaml` (llm-compressor,
   evaluation gate on held-out perplexity) and measure the task accuracy again;
5. serve it with `kubeforge run modelservice.yaml` (the transformers engine on CPU) and
   ask one question through the official `openai` client;
6. show the plan the same YAML would get on each example cluster (`kubeforge plan`).
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


def quantize_yaml(source: str) -> dict:
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": f"{source}-fp8"},
        "spec": {
            "source": {"fineTuneJobRef": {"name": source}},
            "method": "fp8",
            "evaluation": {"metric": "perplexity", "datasetUri": "./data/held-out.jsonl", "maxDegradation": 0.1},
            "output": {"uri": f"./out/{source}-fp8"},
        },
    }


def service_yaml(source: str) -> dict:
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": source},
        "spec": {"source": {"quantizeJobRef": {"name": f"{source}-fp8"}}, "engine": "auto",
                 "servedModelName": source, "engineOptions": {"maxModelLen": 64}},
    }  # fmt: skip


def ask(work: Path, service_path: Path, question: str) -> str:
    """Start `kubeforge run modelservice.yaml`, ask through the openai client, stop it."""
    import socket
    import time
    import urllib.request

    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (work / "serve-cli.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "kubeforge.cli", "run", str(service_path), "--port", str(port)],
                              cwd=work, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {work / 'serve-cli.log'}") from None
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local")
        print(f"    serving at http://127.0.0.1:{port}/v1; models: {[m.id for m in client.models.list().data]}")
        reply = client.chat.completions.create(
            model="fruit-colours", messages=[{"role": "user", "content": question}], max_tokens=3, temperature=0
        )
        return reply.choices[0].message.content or ""
    finally:
        server.terminate()
        server.wait(timeout=30)


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
    print("==> 4. kubeforge run quantizejob.yaml   (FP8 with llm-compressor; gate: held-out perplexity +10% at most)")
    (work / "quantizejob.yaml").write_text(yaml.safe_dump(quantize_yaml("fruit-colours"), sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "kubeforge.cli", "run", "quantizejob.yaml"], cwd=work)
    if result.returncode != 0:
        print("the quantization failed; see the log above", file=sys.stderr)
        return result.returncode
    quantized = work / "out" / "fruit-colours-fp8"
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    after_fp8 = task.accuracy(quantized, held_out)
    print(f"    {config['quant_method']} ({config['format']}); held-out accuracy after FP8: {after_fp8:.0%} "
          f"(bf16/fp32 tuned: {after:.0%})")  # fmt: skip
    print("==> 5. kubeforge run modelservice.yaml   (transformers engine on CPU), one request via the openai client")
    (work / "modelservice.yaml").write_text(yaml.safe_dump(service_yaml("fruit-colours"), sort_keys=False))
    fruit = "banana"
    question = task.HELD_OUT_PHRASES[0].format(f=fruit)
    answer = ask(work, work / "modelservice.yaml", question)
    print(f"    Q: {question}\n    A: {answer.strip()}   (expected: {task.FACTS[fruit]})")
    print("==> 6. the plan the same kind of job gets on real clusters (Qwen3-8B LoRA example, `kubeforge plan`)")
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
    return 0 if after > before and after_fp8 > before else 1


if __name__ == "__main__":
    sys.exit(main())
