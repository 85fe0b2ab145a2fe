"""Make a local DPO run of examples/dpo/finetunejob-dpo.yaml: a tiny model, a preference set, the YAML.

    .venv/bin/python examples/dpo/prepare.py [--workdir dpo-run]
    .venv/bin/kubeforge run dpo-run/finetunejob-dpo.yaml --nproc 2 --offline
    .venv/bin/python examples/dpo/prepare.py --report dpo-run

The model is the demo's tiny random Llama with its word-level tokenizer (kubeforge.runtime.demo.tiny); the
preferences come from the demo's fruit-colour facts (kubeforge.runtime.demo.task): for each question the
right colour is chosen and a wrong colour rejected, in TRL's conversational preference format

    {"prompt": [{"role": "user", "content": "what colour is a lime ?"}],
     "chosen": [{"role": "assistant", "content": "green"}],
     "rejected": [{"role": "assistant", "content": "purple"}]}

``--report`` reads the artifact's manifest and prints the chosen-over-rejected margin (TRL's
rewards/margins: beta x (log-ratio of chosen - log-ratio of rejected) to the starting model) at the start and
end of training, with the reward accuracy, and how many questions in a phrasing never trained on the model
answers with the right colour before and after (greedy, first word).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOB = HERE / "finetunejob-dpo.yaml"
OUTPUT = "out/fruit-colours-dpo"


def preferences(seed: int = 0, wrong_per_question: int = 2) -> list[dict]:
    from kubeforge.runtime.demo import task

    rng = random.Random(seed)
    colours = sorted(set(task.FACTS.values()))
    lines = []
    for fruit, colour in task.FACTS.items():
        for phrase in task.TRAIN_PHRASES:
            for wrong in rng.sample([c for c in colours if c != colour], wrong_per_question):
                lines.append(
                    {
                        "prompt": [{"role": "user", "content": phrase.format(f=fruit)}],
                        "chosen": [{"role": "assistant", "content": colour}],
                        "rejected": [{"role": "assistant", "content": wrong}],
                    }
                )
    rng.shuffle(lines)
    return lines


def prepare(work: Path) -> None:
    from kubeforge.runtime.demo import task, tiny

    if work.exists():
        shutil.rmtree(work)
    tiny.make_model(work / "model", task.words())
    lines = preferences()
    (work / "data").mkdir(parents=True)
    (work / "data" / "preferences.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    held_out = [task.example(f, p) for f in task.FACTS for p in task.HELD_OUT_PHRASES]  # a phrasing never trained on
    (work / "data" / "held-out.jsonl").write_text("".join(json.dumps(line) + "\n" for line in held_out))
    shutil.copy(JOB, work / JOB.name)
    print(f"{work}: model/, data/preferences.jsonl ({len(lines)} pairs), {JOB.name}")
    print(f"next: kubeforge run {work / JOB.name} --nproc 2 --offline")


def report(work: Path) -> int:
    manifest = json.loads((work / OUTPUT / "kubeforge-artifact.json").read_text())
    history = manifest["dpo"]["metrics"]
    margins, accuracies = history["rewards/margins"], history["rewards/accuracies"]
    window = max(1, len(margins) // 10)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    print(f"{len(margins)} steps, beta {manifest['dpo']['beta']}, loss {manifest['dpo']['lossType']}")
    print(f"margin (rewards/margins): step 1 {margins[0]:.4f}, last step {margins[-1]:.4f}")
    print(f"  mean of the first {window} steps {mean(margins[:window]):.4f}, of the last {window} "
          f"{mean(margins[-window:]):.4f}")  # fmt: skip
    print(f"reward accuracy: first {window} steps {mean(accuracies[:window]):.2f}, last {window} "
          f"{mean(accuracies[-window:]):.2f}")  # fmt: skip
    print(f"loss: {manifest['losses'][0]:.4f} -> {manifest['losses'][-1]:.4f}")
    held_out = work / "data" / "held-out.jsonl"
    if held_out.is_file():
        from kubeforge.runtime.demo import task

        before, after = task.accuracy(work / "model", held_out), task.accuracy(work / OUTPUT, held_out)
        print(f"held-out questions answered with the right colour: {before:.0%} before, {after:.0%} after")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("dpo-run"))
    parser.add_argument("--report", type=Path, metavar="WORKDIR", help="print the margins of a finished run")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)
    prepare(args.workdir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
