"""A task a tiny model can learn on two CPU cores in a few minutes: which colour is each fruit?

Facts (fruit -> colour) are stated with several phrasings; the model is trained on some
phrasings and evaluated on a phrasing it never saw, so accuracy measures what it learned
about the facts, not the sentence it memorised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FACTS = {
    "apple": "red", "banana": "yellow", "lime": "green", "grape": "purple", "orange": "orange",
    "cherry": "red", "lemon": "yellow", "kiwi": "green", "plum": "purple", "mango": "orange",
    "strawberry": "red", "pear": "green", "blueberry": "blue", "coconut": "brown", "date": "brown",
    "tomato": "red", "pineapple": "yellow", "fig": "purple", "apricot": "orange", "avocado": "green",
}  # fmt: skip
TRAIN_PHRASES = ["what colour is a {f} ?", "tell me the colour of the {f} .", "{f} colour ?"]
HELD_OUT_PHRASES = ["which colour does the {f} have ?"]


def words() -> set[str]:
    out = set(FACTS) | set(FACTS.values())
    for phrase in TRAIN_PHRASES + HELD_OUT_PHRASES:
        out |= set(phrase.replace("{f}", "").split())
    return out


def example(fruit: str, phrase: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": phrase.format(f=fruit)},
            {"role": "assistant", "content": FACTS[fruit]},
        ]
    }


def write(folder: Path, repeats: int = 4, seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = [example(f, p) for f in FACTS for p in TRAIN_PHRASES] * repeats
    rng.shuffle(train)
    held_out = [example(f, p) for f in FACTS for p in HELD_OUT_PHRASES]
    train_path, eval_path = folder / "train.jsonl", folder / "held-out.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return train_path, eval_path


def accuracy(model_dir: Path, examples_path: Path) -> float:
    """Share of held-out questions answered with the right colour (greedy, first word)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubeforge.runtime import data, evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return evaluate.exact_match(
        model, tokenizer, data.read_examples(examples_path, "messages", tokenizer), first_word=True
    )
