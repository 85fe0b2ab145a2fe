"""Quality measures on held-out examples: perplexity over the completions, and exact match.

Both read examples with the same reader as training (messages, alpaca, text), so the
prompt a model is scored on is the prompt it was trained with. Used by the quantizer's
evaluation gate (before vs after) and by the demo.
"""

from __future__ import annotations

import math
from typing import Any

from kubeforge.runtime import data


def perplexity(model: Any, tokenizer: Any, examples: list[data.Example], max_len: int) -> float:
    """exp(mean negative log-likelihood of the completion tokens); lower is better."""
    import torch

    items = data.tokenize(examples, tokenizer, max_len, "evaluation data")
    total, count = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for item in items:
            batch = data.collate([item], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != data.IGNORE).sum())
            if n == 0:
                continue
            total += float(model(**batch).loss) * n
            count += n
    return math.exp(total / max(count, 1))


def exact_match(model: Any, tokenizer: Any, examples: list[data.Example], *, first_word: bool = False) -> float:
    """Share of examples whose greedy completion equals the reference (whitespace-normalised);
    ``first_word`` compares only the first word (short answers from a model that rambles on)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    right = 0
    for ex in examples:
        ids = torch.tensor([data.prompt_ids(tokenizer, ex.prompt)], device=device)
        want = ex.completion.split()
        budget = len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + 1
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        got = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split()
        right += (got[:1] == want[:1]) if first_word else (got == want)
    return right / len(examples) if examples else 0.0
