"""Training data: JSON lines in the formats messages, alpaca and text, tokenized and packed.

Bad data fails fast, before any GPU time, with the file and line: an empty dataset, a line
that is not JSON or lacks the format's fields, a sequence longer than the model can take.
Loss is computed on what the model should learn to produce: the assistant's turns
(messages), the output (alpaca), everything (text); prompt tokens get label -100.

Packed examples do not see each other (``pack``, ``collate``): each example's position ids restart
at 0, the batch carries no 2-D attention mask, and transformers derives the example boundaries from
the position ids (a block-diagonal causal mask for sdpa and eager, flash-attention's varlen kernel
when the micro-batch is flattened into one row); the first token of each example is never a target.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE = -100


class DataError(ValueError):
    """A user error in the dataset: the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str  # not learned
    completion: str  # learned
    line: int


def files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json") and p.is_file())
        if not found:
            raise DataError(f"{path}: no .jsonl files in the dataset folder")
        return found
    if not path.exists():
        raise DataError(f"{path}: the dataset does not exist")
    return [path]


def read_examples(path: Path, fmt: str, tokenizer: Any = None) -> list[Example]:
    out: list[Example] = []
    for file in files(path):
        for number, line in _lines(file):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file} line {number}: not JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(record, dict):
                raise DataError(f"{file} line {number}: expected a JSON object, got {type(record).__name__}")
            out.append(_example(record, fmt, f"{file} line {number}", number, tokenizer))
    if not out:
        raise DataError(f"{path}: the dataset is empty")
    return out


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _need(record: dict, keys: tuple[str, ...], where: str, fmt: str) -> None:
    missing = [k for k in keys if not isinstance(record.get(k), str)]
    if missing:
        raise DataError(f"{where}: format {fmt} needs string field(s) {', '.join(missing)}")


def _example(record: dict, fmt: str, where: str, number: int, tokenizer: Any) -> Example:
    if fmt == "text":
        _need(record, ("text",), where, fmt)
        return Example("", record["text"], number)
    if fmt == "alpaca":
        _need(record, ("instruction", "output"), where, fmt)
        context = record.get("input") or ""
        prompt = f"### Instruction:\n{record['instruction']}\n"
        if context:
            prompt += f"\n### Input:\n{context}\n"
        prompt += "\n### Response:\n"
        return Example(prompt, record["output"], number)
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: format messages needs a non-empty list 'messages'")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}] needs role system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string 'content'")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (what the model learns)")
        prompt = render_chat(messages[:-1], tokenizer, add_generation_prompt=True)
        return Example(prompt, messages[-1]["content"], number)
    if fmt == "preference":
        raise DataError(f"{where}: format preference (objective dpo) is not supported by this runtime version")
    raise DataError(f"{where}: unknown format {fmt!r}")


def render_chat(messages: list[dict], tokenizer: Any, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template where it has one, else a plain role-prefixed layout."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's token ids exactly as ``tokenize`` lays them out in training: BOS, then the prompt."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + (tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])


@dataclass(frozen=True)
class Tokenized:
    """One training sequence: a single example, or several packed ones (``lengths``, in order)."""

    input_ids: list[int]
    labels: list[int]
    lengths: tuple[int, ...] = ()  # the packed examples' token counts; () means one example

    @property
    def examples(self) -> tuple[int, ...]:
        """The token count of each example in this sequence."""
        return self.lengths or (len(self.input_ids),)


def tokenize(examples: list[Example], tokenizer: Any, max_len: int, source: str) -> list[Tokenized]:
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        if eos is not None:
            completion = [*completion, eos]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = bos + prompt + completion
        if len(ids) > max_len:
            raise DataError(
                f"{source} line {ex.line}: {len(ids)} tokens, more than maxSeqLength {max_len} "
                "(raise spec.dataset.maxSeqLength or shorten the example)"
            )
        labels = [IGNORE] * (len(bos) + len(prompt)) + completion
        out.append(Tokenized(ids, labels))
    return out


def check_model_length(max_len: int, model_max: int | None) -> None:
    if model_max and max_len > model_max:
        raise DataError(f"maxSeqLength {max_len} is longer than the model's {model_max} positions")


def pack(items: list[Tokenized], max_len: int, pad_id: int) -> list[Tokenized]:
    """Greedy packing: consecutive examples share a sequence up to max_len (never split); each
    sequence records its examples' lengths, from which ``collate`` keeps them apart."""
    out: list[Tokenized] = []
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for item in items:
        if ids and len(ids) + len(item.input_ids) > max_len:
            out.append(Tokenized(ids, labels, tuple(lengths)))
            ids, labels, lengths = [], [], []
        ids = ids + item.input_ids
        labels = labels + item.labels
        lengths = lengths + list(item.examples)
    if ids:
        out.append(Tokenized(ids, labels, tuple(lengths)))
    return out


class Batch(dict):
    """What ``collate`` returns: the model's keyword arguments (``module(**batch)``: input_ids, labels,
    position_ids) and, as an attribute rather than a key (it is no model argument), ``tokens``: the
    real, non-padding tokens (``batch_tokens``)."""

    tokens: int


def collate(batch: list[Tokenized], pad_id: int, *, flatten: bool = False) -> Batch:
    """A micro-batch for a transformers causal LM, packed examples kept apart (see the module docstring).

    - ``position_ids`` restart at 0 at each example; there is no ``attention_mask`` key, because
      transformers derives the example boundaries from the position ids only when it gets no 2-D mask
      (masking_utils._preprocess_mask_arguments -> find_packed_sequence_indices: a block-diagonal causal
      mask for sdpa and eager). That detection is also skipped when the model runs with a KV cache:
      train with ``use_cache=False`` (config.use_cache is True by default for most causal LMs).
    - ``labels``: the first token of every example is -100. transformers shifts the labels itself, so the
      label at an example's first token is what the previous token (the end of another example) would
      learn to predict; alone, that label is dropped by the shift, so this changes nothing for one example.
    - rows (``flatten=False``, for sdpa and eager): one row per sequence, right-padded with ``pad_id``,
      label -100; the padding's position ids continue the row's last example, so a row that holds one
      example is a plain causal row (sdpa keeps its is_causal fast path), and causality alone keeps the
      trailing padding out of every real token's view.
    - one row (``flatten=True``, for flash_attention_2): the sequences end to end in a single row, no
      padding. transformers' flash-attention path reads packed sequences from position ids only when the
      batch has one row (modeling_flash_attention_utils._is_packed_sequence), then calls the varlen
      kernel with cu_seqlens at each position id 0 (prepare_fa_kwargs_from_position_ids); given several
      rows it runs the plain causal kernel over each row, across example boundaries.
    """
    import torch

    rows = []
    for item in batch:
        lengths = item.examples
        if sum(lengths) != len(item.input_ids) or len(item.labels) != len(item.input_ids) or min(lengths) < 1:
            raise ValueError(f"a sequence of {len(item.input_ids)} tokens cannot hold examples of {lengths} tokens")
        labels = list(item.labels)
        start = 0
        for n in lengths:
            labels[start] = IGNORE  # nothing within its own example precedes it
            start += n
        positions = [p for n in lengths for p in range(n)]
        rows.append((item.input_ids, labels, positions))
    if flatten:
        rows = [tuple([v for row in rows for v in row[k]] for k in range(3))]
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels, row_positions) in enumerate(rows):
        n = len(row_ids)
        ids[i, :n] = torch.tensor(row_ids)
        labels[i, :n] = torch.tensor(row_labels)
        positions[i, :n] = torch.tensor(row_positions)
        positions[i, n:] = torch.arange(row_positions[-1] + 1, row_positions[-1] + 1 + width - n)
    out = Batch(input_ids=ids, labels=labels, position_ids=positions)
    out.tokens = sum(len(row_ids) for row_ids, _, _ in rows)
    return out


def batch_tokens(batch: dict[str, Any]) -> int:
    """The real (non-padding) tokens of a collated micro-batch: ``collate``'s count, else (a plain dict,
    e.g. a preference batch) the ones of its 2-D attention mask, else every position."""
    tokens = getattr(batch, "tokens", None)
    if tokens is not None:
        return int(tokens)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for file in files(path):
        h.update(file.name.encode())
        h.update(file.read_bytes())
    return "sha256:" + h.hexdigest()
