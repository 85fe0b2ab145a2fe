"""Checkpoints of s3:// outputs in the output store (moto's S3 server): complete only once marked, found
again by a fresh pod, pruned; and the trainer killed mid-run resumes in a fresh working directory."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubeforge.runtime import checkpoint, checkpoint_store, export, fetch
from tests.runtime.conftest import make_contract

MARKER = checkpoint_store.MARKER


def written(root: Path, step: int, *, rank: int = 0, tmp: bool = False, main: bool = True) -> Path:
    """A checkpoint directory as an engine leaves it: shard files per rank, rank 0's state.json and rng.pt."""
    folder = root / f"step-{step:08d}{'.tmp' if tmp else ''}"
    (folder / "sharded").mkdir(parents=True, exist_ok=True)
    (folder / "sharded" / f"__{rank}_0.distcp").write_bytes(os.urandom(3000 + step + rank))
    if main:
        (folder / "sharded" / ".metadata").write_bytes(os.urandom(200))
        (folder / "rng.pt").write_bytes(os.urandom(500))
        (folder / "state.json").write_text(json.dumps({"step": step, "losses": [1.0] * step}))
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_in_store(client, bucket: str, prefix: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
        name, _, path = obj.object_name[len(prefix) :].partition("/")
        found.setdefault(name, set()).add(path)
    return found


def test_where_checkpoints_live():
    assert checkpoint_store.remote_uri("s3://models/tuned/run1") == "s3://models/tuned/run1/checkpoints"
    assert checkpoint_store.remote_uri("s3://models/tuned/run1/") == "s3://models/tuned/run1/checkpoints"
    assert checkpoint_store.remote_uri("s3://models") == "s3://models/checkpoints"
    assert checkpoint_store.remote_uri("pvc://models/run1") is None
    assert checkpoint_store.remote_uri("/data/out") is None


def test_push_restore_and_prune(s3_env, tmp_path):
    s3_env.make_bucket("ckpts")
    uri = "s3://ckpts/run/checkpoints"
    pod = tmp_path / "pod" / "checkpoints"
    for step in (2, 4, 6):
        checkpoint_store.push(written(pod, step), uri, complete_marker=True)
    checkpoint_store.push(written(pod, 8), uri)  # uploaded, never marked: a pod killed before the marker
    assert checkpoint_store.latest_remote(uri).step == 6
    assert [c.step for c in checkpoint_store.complete_checkpoints(uri)] == [2, 4, 6]

    fresh = tmp_path / "fresh" / "checkpoints"  # a replaced pod: an empty volume
    found = checkpoint_store.restore(fresh, uri)
    assert found == fresh / "step-00000006"
    assert tree(found) == tree(pod / "step-00000006")  # byte for byte, and no marker among the files
    assert checkpoint.latest(fresh) == found
    assert sorted(p.name for p in fresh.iterdir()) == ["step-00000006"]  # no .tmp left behind
    assert checkpoint_store.restore(fresh, uri) == found  # again: nothing to do

    assert checkpoint_store.prune_remote(uri, keep=2) == ["step-00000002"]
    left = steps_in_store(s3_env, "ckpts", "run/checkpoints/")
    assert sorted(left) == ["step-00000004", "step-00000006", "step-00000008"]  # the unmarked newer one stays
    assert MARKER in left["step-00000006"] and MARKER not in left["step-00000008"]
    checkpoint_store.push(pod / "step-00000008", uri, complete_marker=True)
    assert checkpoint_store.prune_remote(uri, keep=1) == ["step-00000004", "step-00000006"]
    assert sorted(steps_in_store(s3_env, "ckpts", "run/checkpoints/")) == ["step-00000008"]


def test_a_newer_local_checkpoint_wins_on_one_node_and_is_dropped_on_several(s3_env, tmp_path):
    s3_env.make_bucket("ck-local")
    uri = "s3://ck-local/run/checkpoints"
    pod = tmp_path / "pod"
    checkpoint_store.push(written(pod, 3), uri, complete_marker=True)
    written(pod, 6)  # written here, its upload never finished (the container restarted, the volume stayed)
    assert checkpoint_store.restore(pod, uri) == pod / "step-00000006"
    assert checkpoint_store.restore(pod, uri, trust_local=False) == pod / "step-00000003"
    assert checkpoint.latest(pod) == pod / "step-00000003"  # what every node will now resume from


def test_each_node_pushes_its_own_ranks_and_rank_0_marks_it_complete(s3_env, tmp_path):
    """Two nodes, each with only its own ranks' files (node 1's stay in step-N.tmp: only rank 0 renames)."""
    s3_env.make_bucket("ck-nodes")
    uri = "s3://ck-nodes/run/checkpoints"
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    written(node0, 5, rank=0)
    written(node1, 5, rank=1, tmp=True, main=False)
    checkpoint_store.push(node1 / "step-00000005", uri)  # finds step-00000005.tmp
    checkpoint_store.push(node0 / "step-00000005", uri)
    assert checkpoint_store.latest_remote(uri) is None  # not until rank 0 marks it, after the barrier
    marker = checkpoint_store.mark_complete(uri, 5)
    assert [f["path"] for f in marker["files"]] == [
        "rng.pt", "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "state.json"
    ]  # fmt: skip
    whole = {**tree(node0 / "step-00000005"), **tree(node1 / "step-00000005.tmp")}
    # the gang is replaced: node 0's pod kept its volume, node 1's is new; both end up with every file
    assert checkpoint_store.restore(node0, uri, trust_local=False) == node0 / "step-00000005"
    assert tree(node0 / "step-00000005") == whole
    new1 = tmp_path / "node1-new"
    assert checkpoint_store.restore(new1, uri, trust_local=False) == new1 / "step-00000005"
    assert tree(new1 / "step-00000005") == whole

    # a re-written step does not count until marked again
    checkpoint_store.push(node0 / "step-00000005", uri)
    assert checkpoint_store.latest_remote(uri) is None
    with pytest.raises(RuntimeError, match=r"state\.json was not uploaded"):
        checkpoint_store.mark_complete(uri, 9)


def test_a_damaged_checkpoint_is_passed_over(s3_env, tmp_path):
    s3_env.make_bucket("ck-damaged")
    uri = "s3://ck-damaged/run/checkpoints"
    pod = tmp_path / "pod"
    checkpoint_store.push(written(pod, 1), uri, complete_marker=True)
    checkpoint_store.push(written(pod, 2), uri, complete_marker=True)
    s3_env.put_object("ck-damaged", "run/checkpoints/step-00000002/rng.pt", io.BytesIO(b"short"), 5)
    assert checkpoint_store.latest_remote(uri).step == 1
    s3_env.remove_object("ck-damaged", "run/checkpoints/step-00000001/state.json")
    assert checkpoint_store.latest_remote(uri) is None
    assert checkpoint_store.restore(tmp_path / "fresh", uri) is None


def test_a_missing_output_bucket_is_a_user_error_before_training(s3_env, tmp_path):
    with pytest.raises(fetch.SourceMissing, match=r"s3://no-such-bucket/run/checkpoints: no bucket"):
        checkpoint_store.restore(tmp_path / "pod", "s3://no-such-bucket/run/checkpoints")


def test_a_killed_run_resumes_from_the_store_in_a_fresh_pod(s3_env, tiny_model, task_data, tmp_path):
    from kubeforge.runtime.contract import Location
    from tests.runtime.test_train import run_inline  # here: the trainer is being rewritten

    s3_env.make_bucket("ck-e2e")
    out_uri = "s3://ck-e2e/tuned/bot"
    store = checkpoint_store.remote_uri(out_uri)
    first, second = tmp_path / "pod1", tmp_path / "pod2"
    first.mkdir()
    second.mkdir()

    def contract(pod: Path, steps: int):
        made = make_contract(tiny_model, task_data[0], pod / "scratch" / "output", steps=steps, every=2)
        return made.model_copy(update={"output": made.output.model_copy(update={"location": Location(uri=out_uri)})})

    config = first / "contract.json"
    config.write_text(contract(first, 40).to_json())
    env = dict(os.environ, KUBEFORGE_CACHE_DIR=str(first / "cache"), OMP_NUM_THREADS="1",
               KUBEFORGE_TERMINATION_LOG=str(first / "termination.json"))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "kubeforge.runtime.train", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            found = checkpoint_store.latest_remote(store)
            if found is not None and found.step >= 4:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # the pod is gone, and its volume with it
        proc.wait(timeout=30)
    last = checkpoint_store.latest_remote(store)
    assert last is not None, "no complete checkpoint reached the store"
    assert last.step < 40, "the run finished before it could be killed"

    second_cache = second / "cache"
    os.environ["KUBEFORGE_CACHE_DIR"] = str(second_cache)  # s3_env's monkeypatch restores it
    code, summary = run_inline(contract(second, last.step + 4), second)
    assert code == 0, summary
    assert summary["metrics"]["resumed_from_step"] == last.step
    back = fetch.download_s3(out_uri, tmp_path / "back")
    assert export.verify(back) == []
    assert len(json.loads((back / export.MANIFEST).read_text())["losses"]) == last.step + 4


def test_a_sharded_gang_resumes_from_the_store_in_a_fresh_pod(s3_env, tiny_model, task_data, tmp_path):
    """FSDP2 with 2 processes: every rank's shard files reach the store, and a fresh pod resumes from them."""
    from kubeforge.runtime.contract import Location
    from tests.runtime.test_train import losses, run_torchrun  # here: the trainer is being rewritten

    s3_env.make_bucket("ck-fsdp")

    def contract(pod: Path, steps: int):
        made = make_contract(tiny_model, task_data[0], pod / "scratch" / "output", method="full", steps=steps,
                             lr=1e-3, micro=4, accumulation=1, world=2, strategy="fsdp", every=3,
                             scheduler="constant")  # fmt: skip
        location = Location(uri="s3://ck-fsdp/full")
        return made.model_copy(update={"output": made.output.model_copy(update={"location": location})})

    for name, steps in (("pod1", 3), ("pod2", 6)):  # the second in a fresh working directory and cache
        pod = tmp_path / name
        pod.mkdir()
        os.environ["KUBEFORGE_CACHE_DIR"] = str(pod / "cache")  # s3_env's monkeypatch restores it
        logs: list[str] = []
        code, summary = run_torchrun(contract(pod, steps), pod, 2, logs)
        assert code == 0, logs
    assert summary["metrics"]["resumed_from_step"] == 3
    assert "resuming from" in logs[0] and "at step 3" in logs[0]
    last = checkpoint_store.latest_remote("s3://ck-fsdp/full/checkpoints")
    assert last is not None and last.step == 6
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "state.json"} <= set(last.files)
    back = fetch.download_s3("s3://ck-fsdp/full", tmp_path / "back")
    assert export.verify(back) == [] and len(losses(back)) == 6
