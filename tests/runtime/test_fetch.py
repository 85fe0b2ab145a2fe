"""Models and data from hf:// (a local stand-in for the Hub) and s3:// (moto's S3 server); s3:// output."""

from __future__ import annotations

import json

import pytest

from kubeforge.runtime import export, fetch
from kubeforge.runtime.contract import EXIT_USER_ERROR, Location
from tests.harness.fakehub import COMMIT, serve_repo
from tests.runtime.conftest import make_contract
from tests.runtime.test_train import run_inline


def remote(contract, *, model: str | None = None, data: str | None = None, out: str | None = None):
    """The contract with some locations turned into URIs the runtime must fetch (or upload to)."""
    update = {}
    if model:
        update["model"] = Location(uri=model)
    if data:
        update["dataset"] = contract.dataset.model_copy(update={"location": Location(uri=data)})
    if out:
        update["output"] = contract.output.model_copy(update={"location": Location(uri=out)})
    return contract.model_copy(update=update)


def test_model_from_the_hub_with_the_token(tiny_model, task_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with serve_repo("acme/tiny", tiny_model) as (endpoint, seen):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        contract = remote(make_contract(tiny_model, task_data[0], tmp_path / "out", steps=2), model="hf://acme/tiny")
        code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    snapshot = tmp_path / "cache" / "hf" / "models--acme--tiny" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert any("/resolve/" in s and "model.safetensors" in s for s in seen)
    assert all(s.endswith("auth=Bearer hf_secret") for s in seen)
    assert json.loads((tmp_path / "out" / export.MANIFEST).read_text())["baseModel"] == "hf://acme/tiny"


def test_a_missing_hub_repository_is_a_user_error(tiny_model, task_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    with serve_repo("acme/tiny", tiny_model) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        contract = remote(make_contract(tiny_model, task_data[0], tmp_path / "out"), model="hf://acme/nope")
        code, summary = run_inline(contract, tmp_path)
    assert code == EXIT_USER_ERROR
    assert "hf://acme/nope: no such repository on the Hub" in summary["error"]


def test_train_from_s3_and_export_to_s3(s3_env, tiny_model, task_data, tmp_path):
    s3_env.make_bucket("models")
    fetch.upload_s3(tiny_model, "s3://models/base/tiny")
    s3_env.fput_object("models", "data/train.jsonl", str(task_data[0]))
    contract = make_contract(tiny_model, task_data[0], tmp_path / "staging", steps=3)
    contract = remote(contract, model="s3://models/base/tiny", data="s3://models/data/train.jsonl",
                      out="s3://models/tuned/run1")  # fmt: skip
    code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    assert summary["uri"] == "s3://models/tuned/run1"

    back = fetch.download_s3("s3://models/tuned/run1", tmp_path / "back")  # read back from the store
    assert export.verify(back) == []
    assert export.digest(back) == summary["digest"]
    manifest = json.loads((back / export.MANIFEST).read_text())
    assert manifest["baseModel"] == "s3://models/base/tiny"
    assert manifest["dataset"]["uri"] == "s3://models/data/train.jsonl"
    # resumable state (kept in the store under checkpoints/ for a replaced pod) is not part of the artifact
    assert not (back / "checkpoints").exists()
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file() and p.name != export.MANIFEST
    )


def test_missing_s3_locations_are_user_errors(s3_env, tiny_model, task_data, tmp_path):
    s3_env.make_bucket("empty")
    with pytest.raises(fetch.SourceMissing, match=r"s3://empty/model: no objects under this prefix"):
        fetch.local_path(Location(uri="s3://empty/model"))
    contract = remote(make_contract(tiny_model, task_data[0], tmp_path / "out"), model="s3://nobucket/model")
    code, summary = run_inline(contract, tmp_path)
    assert code == EXIT_USER_ERROR
    assert "s3://nobucket/model: no bucket 'nobucket'" in summary["error"]


def test_the_init_container_fetch_downloads_straight_into_its_target(tiny_model, s3_env, tmp_path, monkeypatch):
    """`python -m kubeforge.runtime.fetch URI DEST` (a ModelService's init container): no cache copy."""
    with serve_repo("acme/tiny", tiny_model) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert fetch.main(["hf://acme/tiny", str(tmp_path / "from-hub")]) == 0
    assert (tmp_path / "from-hub" / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    s3_env.make_bucket("serve")
    fetch.upload_s3(tiny_model, "s3://serve/bot")
    assert fetch.main(["s3://serve/bot", str(tmp_path / "from-s3")]) == 0
    assert sorted(p.name for p in (tmp_path / "from-s3").iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    assert not (tmp_path / "cache" / "s3").exists()  # nothing staged twice
    assert fetch.main(["s3://serve/missing", str(tmp_path / "none")]) == 3
