"""Staged artifacts (export.staging_folder, promote, promote_s3): written beside the destination, promoted only
when asked, the earlier artifact replaced as a whole, or left as it was when the staging output is discarded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from minio import Minio

from kubeforge.runtime import export, fetch


def artifact(folder: Path, seed: int = 0, shards: int = 1) -> Path:
    """A small artifact with ``shards`` weight files and a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    for k in range(shards):
        (folder / f"model-{k + 1:05d}-of-{shards:05d}.safetensors").write_bytes(os.urandom(2048 + seed))
    (folder / "extra").mkdir(exist_ok=True)
    (folder / "extra" / "tokenizer.json").write_text("{}")
    export.write_manifest(folder, {"method": f"seed-{seed}"})
    return folder


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_staging_is_beside_the_output_or_inside_a_mount_point(tmp_path, monkeypatch):
    final = tmp_path / "models" / "bot-fp8"
    assert export.staging_folder(final, "1a2b3c4d") == tmp_path / "models" / "bot-fp8.staging-1a2b3c4d"
    monkeypatch.setattr(export.os.path, "ismount", lambda p: Path(p) == final)
    assert export.staging_folder(final, "1a2b3c4d") == final / ".kubeforge-staging-1a2b3c4d"


def test_promote_to_a_new_place_is_one_rename(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    stage = artifact(export.staging_folder(final, "t"))
    digest = export.digest(stage)
    export.promote(stage, final)
    assert not stage.exists() and export.verify(final) == [] and export.digest(final) == digest


def test_promote_replaces_the_earlier_artifact_as_a_whole(tmp_path):
    final = artifact(tmp_path / "out", seed=1, shards=2)
    stage = artifact(export.staging_folder(final, "t"), seed=2)
    export.promote(stage, final)
    assert export.verify(final) == []  # no shard of the two-shard artifact is left beside the new manifest
    assert "model-00002-of-00002.safetensors" not in files(final)
    assert export.read_manifest(final)["method"] == "seed-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither .staging- nor .replaced- is left


def test_a_discarded_staging_output_leaves_the_earlier_artifact_as_it_was(tmp_path):
    final = artifact(tmp_path / "out", seed=1)
    before = {name: (final / name).read_bytes() for name in files(final)}
    stage = artifact(export.staging_folder(final, "t"), seed=2)
    export.discard(stage)
    export.discard(stage)  # absent: nothing to do
    assert {name: (final / name).read_bytes() for name in files(final)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_mount_point_is_staged_inside_and_promoted_file_by_file(tmp_path, monkeypatch):
    final = artifact(tmp_path / "claim", seed=1, shards=2)
    (final / "other-model").mkdir()
    (final / "other-model" / "w.bin").write_bytes(b"not ours")
    monkeypatch.setattr(export.os.path, "ismount", lambda p: Path(p) == final)
    stage = artifact(export.staging_folder(final, "t"), seed=2)
    assert stage.parent == final
    # while staged, the earlier artifact still verifies: artifact_files skips the staging folder
    assert [p for p in export.verify(final) if not p.startswith("other-model/")] == []
    export.promote(stage, final)
    assert export.read_manifest(final)["method"] == "seed-2" and not stage.exists()
    assert "model-00002-of-00002.safetensors" not in files(final)  # the old manifest's files are removed
    assert (final / "other-model" / "w.bin").read_bytes() == b"not ours"  # what it did not list is not
    assert export.verify(final) == ["other-model/w.bin: not in the manifest"]


def test_the_s3_staging_prefix_is_beside_the_prefix():
    assert export.s3_staging_uri("s3://b/models/bot/", "t1") == "s3://b/models/bot.staging-t1"
    assert export.s3_staging_uri("s3://b", "t1") == "s3://b/.kubeforge-staging-t1"


def keys(client, bucket: str, prefix: str = "") -> set[str]:
    return {o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)}


def test_promote_s3_copies_weights_first_the_manifest_last_and_removes_the_staging_prefix(s3_env, monkeypatch,
                                                                                         tmp_path):  # fmt: skip
    s3_env.make_bucket("stage-ok")
    export.publish(artifact(tmp_path / "v1", seed=1, shards=2), "s3://stage-ok/bot", {})
    copies: list[str] = []
    original = Minio.compose_object

    def recording(self, bucket, key, sources, *args, **kwargs):
        copies.append(key)
        return original(self, bucket, key, sources, *args, **kwargs)

    monkeypatch.setattr(Minio, "compose_object", recording)
    v2 = artifact(tmp_path / "v2", seed=2)
    export.promote_s3(v2, "s3://stage-ok/bot", "t1")
    assert copies[-1] == f"bot/{export.MANIFEST}" and len(copies) == len(files(v2))
    assert keys(s3_env, "stage-ok", "bot.staging-t1") == set()
    back = fetch.download_s3("s3://stage-ok/bot", tmp_path / "back")
    assert export.verify(back) == [] and export.digest(back) == export.digest(v2)


def test_an_s3_upload_that_dies_leaves_the_final_prefix_as_it_was(s3_env, monkeypatch, tmp_path):
    s3_env.make_bucket("stage-dies")
    v1 = artifact(tmp_path / "v1", seed=1)
    export.publish(v1, "s3://stage-dies/bot", {})
    original = Minio.fput_object

    def failing(self, bucket, key, path, *args, **kwargs):
        if key.endswith("tokenizer.json"):
            raise ConnectionError(f"injected: upload of {key} lost")
        return original(self, bucket, key, path, *args, **kwargs)

    monkeypatch.setattr(Minio, "fput_object", failing)
    with pytest.raises(ConnectionError):
        export.promote_s3(artifact(tmp_path / "v2", seed=1), "s3://stage-dies/bot", "t1")  # same sizes
    back = fetch.download_s3("s3://stage-dies/bot", tmp_path / "back")  # publish alone would fail this
    assert export.verify(back) == [] and export.digest(back) == export.digest(v1)
