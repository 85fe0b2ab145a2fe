from __future__ import annotations

import json

import pytest

from kubeforge.runtime.contract import (
    TERMINATION_MESSAGE_MAX_BYTES,
    ContractError,
    load,
    read_termination_message,
    termination_message,
)
from tests.runtime.conftest import make_contract


def test_round_trip(tmp_path):
    contract = make_contract(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "out")
    path = tmp_path / "c.json"
    path.write_text(contract.to_json())
    assert load(path) == contract


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no contract file"),
        ("{", "not JSON"),
        (json.dumps({"version": "kubeforge.io/contract/v9"}), "this runtime reads kubeforge.io/contract/v1"),
        (json.dumps({"job": {"name": "x"}}), "invalid contract: model: Field required"),
    ],
)
def test_bad_contracts_name_the_problem(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ContractError) as err:
        load(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_termination_message_fits_4_kib():
    summary = {
        "status": "succeeded",
        "uri": "s3://b/p",
        "digest": "sha256:x",
        "metrics": {f"m{i}": i for i in range(2000)},
    }
    text = termination_message(summary)
    assert len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    back = read_termination_message(text)
    assert back["uri"] == "s3://b/p" and back["truncated"] is True
    assert read_termination_message("panic: not json") is None
