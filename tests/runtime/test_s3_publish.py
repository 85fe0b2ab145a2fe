"""Artifacts in S3 (moto's server): weights first and the manifest last, and every download of a folder
with a manifest checks each file against it before it succeeds."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from minio import Minio

from kubeforge.runtime import export, fetch


def artifact(folder: Path, seed: int = 0) -> Path:
    """A small artifact: names on both sides of the manifest's in sorted order, and a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "model.safetensors").write_bytes(os.urandom(4096 + seed))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "extra").mkdir(exist_ok=True)
    (folder / "extra" / "adapter.bin").write_bytes(os.urandom(100))
    export.write_manifest(folder, {"method": "lora"})
    return folder


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def keys(client, bucket: str, prefix: str) -> set[str]:
    return {o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)}


@pytest.fixture()
def uploads(monkeypatch):
    """Record every object key uploaded; fail the upload of a key that ends with ``fail_on``."""
    seen: list[str] = []
    state = {"fail_on": None}
    original = Minio.fput_object

    def recording(self, bucket, key, path, *args, **kwargs):
        if state["fail_on"] and key.endswith(state["fail_on"]):
            raise ConnectionError(f"injected: upload of {key} lost")
        seen.append(key)
        return original(self, bucket, key, path, *args, **kwargs)

    monkeypatch.setattr(Minio, "fput_object", recording)
    return seen, state


def test_publish_uploads_the_manifest_last(s3_env, uploads, tmp_path):
    seen, _ = uploads
    s3_env.make_bucket("pub-order")
    out = artifact(tmp_path / "out")
    summary = export.publish(out, "s3://pub-order/bot/v1", {"train_loss": 0.5})
    assert seen[-1] == f"bot/v1/{export.MANIFEST}"
    assert sorted(seen[:-1]) == sorted(f"bot/v1/{p.relative_to(out).as_posix()}" for p in export.artifact_files(out))
    assert "bot/v1/model.safetensors" in seen[:-1]  # sorts after the manifest's name, uploaded before it
    assert summary["digest"] == export.digest(out)
    back = fetch.download_s3("s3://pub-order/bot/v1", tmp_path / "back")
    assert export.verify(back) == [] and export.digest(back) == summary["digest"]


def test_upload_s3_puts_a_manifest_last_whatever_order_it_is_given(s3_env, uploads, tmp_path):
    seen, _ = uploads
    s3_env.make_bucket("pub-any")
    out = artifact(tmp_path / "out")
    fetch.upload_s3(out, "s3://pub-any/a")  # every file, the default order
    assert seen[-1] == f"a/{export.MANIFEST}" and len(seen) == 5
    seen.clear()
    fetch.upload_s3(out, "s3://pub-any/b", [out / export.MANIFEST, out / "tokenizer.json", out / "config.json"])
    assert seen == ["b/tokenizer.json", "b/config.json", f"b/{export.MANIFEST}"]


def test_a_first_publish_that_dies_midway_leaves_no_manifest(s3_env, uploads, tmp_path):
    _, state = uploads
    s3_env.make_bucket("pub-dies")
    out = artifact(tmp_path / "out")
    state["fail_on"] = "tokenizer.json"  # the last weight file in order: the others are up already
    with pytest.raises(ConnectionError):
        export.publish(out, "s3://pub-dies/bot", {})
    written = keys(s3_env, "pub-dies", "bot/")
    assert "bot/model.safetensors" in written
    assert f"bot/{export.MANIFEST}" not in written


def test_a_republish_that_dies_midway_fails_every_download(s3_env, uploads, tmp_path):
    _, state = uploads
    s3_env.make_bucket("pub-again")
    export.publish(artifact(tmp_path / "v1"), "s3://pub-again/bot", {})
    v2 = artifact(tmp_path / "v2", seed=0)  # same sizes, other bytes: only the digests tell them apart
    state["fail_on"] = export.MANIFEST
    with pytest.raises(ConnectionError):
        export.publish(v2, "s3://pub-again/bot", {})  # new weights are up, the old manifest still names v1's
    with pytest.raises(fetch.ArtifactIntegrityError, match=r"s3://pub-again/bot: \S+ does not match the sha256"):
        fetch.download_s3("s3://pub-again/bot", tmp_path / "back")
    assert export.read_manifest(tmp_path / "back") is None  # nothing there looks like a verified artifact
    state["fail_on"] = None
    export.publish(v2, "s3://pub-again/bot", {})  # the retry completes it
    back = fetch.download_s3("s3://pub-again/bot", tmp_path / "back")
    assert export.verify(back) == [] and export.digest(back) == export.digest(v2)


def test_a_tampered_object_fails_the_download_naming_the_file(s3_env, tmp_path):
    s3_env.make_bucket("pub-tamper")
    out = artifact(tmp_path / "out")
    export.publish(out, "s3://pub-tamper/bot", {})
    data = (out / "model.safetensors").read_bytes()
    altered = bytes([data[0] ^ 1]) + data[1:]  # same size
    s3_env.put_object("pub-tamper", "bot/model.safetensors", io.BytesIO(altered), len(altered))
    with pytest.raises(fetch.ArtifactIntegrityError) as err:
        fetch.download_s3("s3://pub-tamper/bot", tmp_path / "back")
    assert str(err.value).startswith("s3://pub-tamper/bot: model.safetensors does not match the sha256")
    assert isinstance(err.value, fetch.SourceMissing)  # a user error for the entry points: no retry loop
    assert not (tmp_path / "back" / "model.safetensors").exists()
    assert export.read_manifest(tmp_path / "back") is None
    # the init container's fetch reports it and fails
    assert fetch.main(["s3://pub-tamper/bot", str(tmp_path / "init")]) == 3

    s3_env.put_object("pub-tamper", "bot/model.safetensors", io.BytesIO(data[:-1]), len(data) - 1)  # truncated
    with pytest.raises(fetch.ArtifactIntegrityError, match=r"bot: model.safetensors has 4095 bytes in the store"):
        fetch.download_s3("s3://pub-tamper/bot", tmp_path / "back2")
    s3_env.remove_object("pub-tamper", "bot/extra/adapter.bin")
    with pytest.raises(fetch.ArtifactIntegrityError, match=r"bot: extra/adapter.bin is listed in .* but missing"):
        fetch.download_s3("s3://pub-tamper/bot", tmp_path / "back3")


def test_a_download_fetches_what_the_manifest_lists_and_nothing_else(s3_env, tmp_path):
    s3_env.make_bucket("pub-only")
    out = artifact(tmp_path / "out")
    export.publish(out, "s3://pub-only/run1", {})
    for key in ("run1/checkpoints/step-00000002/state.json", "run1/leftover.bin", "run10/other.bin"):
        s3_env.put_object("pub-only", key, io.BytesIO(b"x"), 1)
    back = fetch.download_s3("s3://pub-only/run1", tmp_path / "back")
    assert export.verify(back) == []
    assert files(back) == sorted(
        [export.MANIFEST, "config.json", "extra/adapter.bin", "model.safetensors", "tokenizer.json"]
    )


def test_a_folder_without_a_manifest_is_downloaded_whole_and_a_prefix_is_a_folder(s3_env, tmp_path):
    s3_env.make_bucket("pub-plain")
    for key in ("base/config.json", "base/sub/w.bin", "base2/not-mine.bin", "file.jsonl"):
        s3_env.put_object("pub-plain", key, io.BytesIO(key.encode()), len(key))
    back = fetch.download_s3("s3://pub-plain/base", tmp_path / "back")
    assert files(back) == ["config.json", "sub/w.bin"]
    assert (back / "sub" / "w.bin").read_bytes() == b"base/sub/w.bin"
    one = fetch.download_s3("s3://pub-plain/file.jsonl", tmp_path / "one.jsonl")
    assert one.read_bytes() == b"file.jsonl"
