"""Reading, tokenizing and packing data; bad data fails fast with the file and line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from kubeforge.runtime import data


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_messages_use_the_chat_template_and_learn_only_the_answer(tmp_path, tokenizer):
    path = write(
        tmp_path,
        [{"messages": [{"role": "user", "content": "apple colour ?"}, {"role": "assistant", "content": "red"}]}],
    )
    (ex,) = data.read_examples(path, "messages", tokenizer)
    assert ex.prompt == "user : apple colour ? </s> assistant : " and ex.completion == "red"
    (item,) = data.tokenize([ex], tokenizer, 64, str(path))
    learned = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label != data.IGNORE]
    assert tokenizer.decode(learned) == "red </s>"


def test_alpaca_and_text(tmp_path, tokenizer):
    alpaca = write(tmp_path, [{"instruction": "colour of apple", "input": "", "output": "red"}], "a.jsonl")
    (ex,) = data.read_examples(alpaca, "alpaca")
    assert "### Instruction:" in ex.prompt and ex.completion == "red"
    text = write(tmp_path, [{"text": "apple red"}], "t.jsonl")
    (ex,) = data.read_examples(text, "text")
    assert ex.prompt == "" and ex.completion == "apple red"


def test_packing_fills_sequences_without_splitting_examples(tokenizer):
    items = [
        data.Tokenized([1, 2, 3], [1, 2, 3]),
        data.Tokenized([4, 5], [4, 5]),
        data.Tokenized([6, 7, 8, 9], [6, 7, 8, 9]),
    ]
    packed = data.pack(items, 5, 0)
    assert [p.input_ids for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert [p.examples for p in packed] == [(3, 2), (4,)]


def test_collate_restarts_positions_per_example_and_never_learns_across_a_boundary():
    """The layout of tests/runtime/test_packing.py's model checks: no attention_mask (transformers then
    derives the examples from position_ids), right padding whose positions continue the last example."""
    rows = [data.Tokenized([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], (3, 2)), data.Tokenized([6, 7, 8], [-100, 7, 8])]
    batch = data.collate(rows, 0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, -100, -100]]
    assert data.batch_tokens(batch) == 8

    flat = data.collate(rows, 0, flatten=True)  # one row, no padding (flash-attention's varlen layout)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert flat["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8]]
    assert data.batch_tokens(flat) == 8
    # a plain dict (a preference batch, a batch moved to a device): the mask's ones, else every position
    moved = dict(batch)
    assert data.batch_tokens(moved) == 10
    assert data.batch_tokens({**moved, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])}) == 5
    with pytest.raises(ValueError, match="cannot hold examples"):
        data.collate([data.Tokenized([1, 2, 3], [1, 2, 3], (2, 2))], 0)


@pytest.mark.parametrize(
    ("rows", "fmt", "message"),
    [
        ([], "messages", "the dataset is empty"),
        (['{"messages": [', '{"text": "x"}'], "text", "line 1: not JSON"),
        ([{"text": "ok"}, {"txt": "typo"}], "text", "line 2: format text needs string field(s) text"),
        ([{"instruction": "x"}], "alpaca", "line 1: format alpaca needs string field(s) output"),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "messages",
            "line 1: the last message must be the assistant's",
        ),
        (
            [{"messages": [{"role": "robot", "content": "hi"}]}],
            "messages",
            "messages[0] needs role system, user or assistant",
        ),
        ([["a", "b"]], "text", "line 1: expected a JSON object"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}], "preference", "not supported by this runtime version"),
    ],
)
def test_bad_data_names_the_file_and_line(tmp_path, tokenizer, rows, fmt, message):
    path = write(tmp_path, rows)
    with pytest.raises(data.DataError) as err:
        data.read_examples(path, fmt, tokenizer)
    assert message in str(err.value) and str(path) in str(err.value)


def test_too_long_and_model_limits(tmp_path, tokenizer):
    path = write(tmp_path, [{"text": "apple red"}, {"text": " ".join(["apple"] * 100)}])
    examples = data.read_examples(path, "text")
    with pytest.raises(data.DataError, match="line 2: 102 tokens, more than maxSeqLength 64"):
        data.tokenize(examples, tokenizer, 64, str(path))
    with pytest.raises(data.DataError, match="longer than the model's 512 positions"):
        data.check_model_length(4096, 512)


def test_missing_dataset(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_examples(tmp_path / "nope.jsonl", "text")
