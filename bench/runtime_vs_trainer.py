"""Tokens/s and peak memory: kubeforge's runtime against a plain transformers Trainer.

Same tiny random Llama, same tokenized (and packed) data, same method, batch, learning
rate and number of steps; each run in its own process (so peak RSS is its own), both in
one invocation, alternating, several repeats. Reports the median tokens/s of each, the
ratio, and peak resident memory.

    python bench/runtime_vs_trainer.py [--method lora|full] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)]

MICRO, ACCUM, SEQ, LR = 8, 2, 64, 3e-3


def ours(model: Path, data: Path, out: Path, method: str, steps: int) -> dict:
    from kubeforge.runtime import export, train
    from tests.runtime.conftest import make_contract

    contract = make_contract(model, data, out, method=method, steps=steps, micro=MICRO, accumulation=ACCUM, lr=LR)
    config = out.parent / "contract.json"
    config.write_text(contract.to_json())
    start = time.perf_counter()
    code = train.main(["--config", str(config), "--termination-log", str(out.parent / "term.json")])
    assert code == 0
    manifest = json.loads((out / export.MANIFEST).read_text())
    return {"tokens_per_second": manifest["metrics"]["tokens_per_second"], "wall": time.perf_counter() - start}


def trainer(model: Path, data: Path, out: Path, method: str, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from kubeforge.runtime import data as kdata

    tokenizer = AutoTokenizer.from_pretrained(model)
    items = kdata.pack(kdata.tokenize(kdata.read_examples(data, "messages", tokenizer), tokenizer, SEQ, str(data)),
                       SEQ, tokenizer.pad_token_id)  # fmt: skip
    llm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    llm.config.use_cache = False  # packed rows: transformers finds example boundaries only without a KV cache
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        llm = get_peft_model(llm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))  # fmt: skip
    tokens = {"n": 0}

    class Count(TrainerCallback):
        pass

    def collate(batch):
        out = kdata.collate(batch, tokenizer.pad_token_id)
        tokens["n"] += kdata.batch_tokens(out)
        return out

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=int(0.03 * steps), max_grad_norm=1.0,
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    start = time.perf_counter()
    Trainer(model=llm, args=args, train_dataset=items, data_collator=collate, callbacks=[Count()]).train()
    seconds = time.perf_counter() - start
    return {"tokens_per_second": round(tokens["n"] / seconds, 1), "wall": seconds}


def child(which: str, model: Path, data: Path, out: Path, method: str, steps: int) -> None:
    result = (ours if which == "kubeforge" else trainer)(model, data, out, method, steps)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, model, data = args.child
        child(which, Path(model), Path(data), Path(tempfile.mkdtemp()) / "out", args.method, args.steps)
        return
    from kubeforge.runtime.demo import task, tiny

    work = Path(tempfile.mkdtemp(prefix="kf-bench-"))
    model = tiny.make_model(work / "tiny", task.words())
    train_data, _ = task.write(work / "data")
    runs: dict[str, list[dict]] = {"kubeforge": [], "trainer": []}
    for _ in range(args.repeats):
        for which in runs:
            cmd = [sys.executable, __file__, "--method", args.method, "--steps", str(args.steps),
                   "--child", which, str(model), str(train_data)]  # fmt: skip
            text = subprocess.run(cmd, capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "2",
                                  "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}).stdout  # fmt: skip
            runs[which].append(json.loads(text.split("RESULT ", 1)[1]))
    print(f"tiny Llama, {args.method}, {args.steps} steps, micro-batch {MICRO} x accumulation {ACCUM}, "
          f"seq {SEQ}, 1 CPU process, {args.repeats} repeats (median)")  # fmt: skip
    medians = {}
    for which, results in runs.items():
        tps = statistics.median(r["tokens_per_second"] for r in results)
        rss = statistics.median(r["peak_rss_mib"] for r in results)
        medians[which] = tps
        print(f"  {which:10s} {tps:10.0f} tokens/s   peak RSS {rss:6.0f} MiB   runs: "
              + ", ".join(f"{r['tokens_per_second']:.0f}" for r in results))  # fmt: skip
    print(f"  ratio kubeforge / Trainer: {medians['kubeforge'] / medians['trainer']:.2f}")


if __name__ == "__main__":
    main()
