"""Preference data (format ``preference``, objective dpo): JSON lines of prompt, chosen and rejected.

Two layouts per line, TRL's "standard" and "conversational" preference formats:

    {"prompt": "What colour is a lime ?", "chosen": "green", "rejected": "red"}
    {"prompt": [{"role": "user", "content": "What colour is a lime ?"}],
     "chosen": [{"role": "assistant", "content": "green"}], "rejected": "red"}

A standard prompt is used as written; a conversational prompt (system/user/assistant turns, the
last one not the assistant's) goes through the tokenizer's chat template with the generation
prompt, like the messages format of data.py. A response is a string, or (conversational prompts
only) a list of the assistant's message(s): then its text is what the chat template adds for them
after the generation prompt (TRL's way, its end of turn included), or the content of a single
message where the template does not render the prompt as the start of the conversation.

Each side of a pair is laid out as data.py lays out an SFT example: BOS, the prompt's tokens
(label -100, not learned), the response's tokens, then EOS (learned), except after a chat
template's rendering, which ends the turn itself (as TRL adds EOS to standard responses only).
Bad lines fail fast with the file and line (data.DataError), and so does a side longer than
maxSeqLength.

Packing does not apply: DPO compares the log-probability of two whole responses to one prompt, so
each pair stays two rows of its own (chosen and rejected), padded to the longest row of its micro-
batch; ``dataset.packing`` is ignored for this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeforge.runtime import data
from kubeforge.runtime.data import IGNORE, DataError, Tokenized, _lines, files, prompt_ids, render_chat

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str  # rendered: what both responses continue (not learned)
    chosen: str
    rejected: str
    source: str  # "FILE line N", for errors
    eos: tuple[bool, bool] = (True, True)  # whether EOS follows each response (a template's turn ends by itself)


@dataclass(frozen=True)
class Pair:
    """One preference pair, tokenized: ``index`` is its place in the dataset (its reference log-probs')."""

    index: int
    chosen: Tokenized
    rejected: Tokenized


def read(path: Path, tokenizer: Any) -> list[PreferenceExample]:
    out: list[PreferenceExample] = []
    for file in files(path):
        for number, line in _lines(file):
            where = f"{file} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            out.append(_example(record, where, tokenizer))
    if not out:
        raise DataError(f"{path}: the dataset is empty")
    return out


def _example(record: dict, where: str, tokenizer: Any) -> PreferenceExample:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DataError(
            f"{where}: format preference needs fields prompt, chosen and rejected (missing {', '.join(missing)})"
        )
    prompt = record["prompt"]
    if isinstance(prompt, str):
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str):
                raise DataError(f"{where}: with a string prompt, {key} must be a string too")
        return PreferenceExample(prompt, record["chosen"], record["rejected"], where)
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: prompt must be a string or a non-empty list of messages")
    _check_messages(prompt, "prompt", where, _ROLES)
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt's last message must not be the assistant's (the responses follow it)")
    rendered = render_chat(prompt, tokenizer, add_generation_prompt=True)
    (chosen, eos_c), (rejected, eos_r) = (
        _response(prompt, rendered, record[key], key, where, tokenizer) for key in ("chosen", "rejected")
    )
    return PreferenceExample(rendered, chosen, rejected, where, (eos_c, eos_r))


def _check_messages(messages: list, field: str, where: str, roles: tuple[str, ...]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise DataError(f"{where}: {field}[{i}] needs role {' or '.join(roles)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{i}] needs a string 'content'")


def _response(prompt: list, rendered: str, value: Any, key: str, where: str, tokenizer: Any) -> tuple[str, bool]:
    """(the response's text, whether EOS must follow it)."""
    if isinstance(value, str):
        return value, True
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key} must be a string or a non-empty list of the assistant's messages")
    _check_messages(value, key, where, ("assistant",))
    full = render_chat([*prompt, *value], tokenizer, add_generation_prompt=False)
    if full.startswith(rendered):
        return full[len(rendered) :], False  # as TRL: the template's end of turn ends the response
    if len(value) == 1:
        return value[0]["content"], True
    raise DataError(f"{where}: {key}: the chat template does not render the prompt as the start of the conversation")


def tokenize(examples: list[PreferenceExample], tokenizer: Any, max_len: int) -> list[Pair]:
    """Both sides of every pair as data.tokenize lays out an example."""
    eos = tokenizer.eos_token_id
    out = []
    for index, ex in enumerate(examples):
        prefix = prompt_ids(tokenizer, ex.prompt)  # BOS + prompt
        sides = []
        for name, text, add_eos in (("chosen", ex.chosen, ex.eos[0]), ("rejected", ex.rejected, ex.eos[1])):
            response = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if add_eos and eos is not None and response[-1:] != [eos]:
                response = [*response, eos]
            ids = prefix + response
            if len(ids) > max_len:
                raise DataError(
                    f"{ex.source}: the {name} side is {len(ids)} tokens, more than maxSeqLength {max_len} "
                    "(raise spec.dataset.maxSeqLength or shorten the pair)"
                )
            if not response:
                raise DataError(f"{ex.source}: the {name} response has no tokens")
            sides.append(Tokenized(ids, [IGNORE] * len(prefix) + response))
        out.append(Pair(index, sides[0], sides[1]))
    return out


def read_pairs(path: Path, tokenizer: Any, max_len: int) -> list[Pair]:
    return tokenize(read(path, tokenizer), tokenizer, max_len)


def collate(pairs: list[Pair], pad_id: int, reference: Any | None = None) -> dict[str, Any]:
    """One micro-batch of n pairs as 2n rows, the n chosen first, then the n rejected (TRL's layout), right-
    padded: input_ids, attention_mask (1 on tokens), labels (-100 off the responses), and with ``reference``
    (the (N, 2) reference log-probs of every pair) ``ref_logps``: each row's reference log-prob."""
    import torch

    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if reference is not None:
        index = torch.tensor([p.index for p in pairs], dtype=torch.long)
        batch["ref_logps"] = torch.cat([reference[index, 0], reference[index, 1]]).float()
    return batch


def digest(path: Path) -> str:
    return data.digest(path)
