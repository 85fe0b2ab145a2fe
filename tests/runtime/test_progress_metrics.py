"""Rank 0's /metrics: served next to the progress JSON, read back with prometheus_client's own parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeforge.runtime import progress as P
from kubeforge.runtime.contract import PROGRESS_PATH, JobIdentity

JOB = JobIdentity(name="support-bot", namespace="team-a")
LABELS = {"namespace": "team-a", "job_name": "support-bot"}


@pytest.fixture
def tracker() -> Iterator[tuple[P.Progress, str]]:
    progress = P.Progress(total_steps=100, start_step=10)
    server = P.serve(progress, 0, PROGRESS_PATH, job=JOB)  # port 0: any free port
    assert server is not None
    yield progress, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def scrape(base: str) -> dict[str, tuple[str, dict[str, str], float]]:
    """{sample name: (family type, labels, value)} of one scrape."""
    content_type, text = get(base + P.METRICS_PATH)
    assert content_type.startswith("text/plain")
    return {s.name: (f.type, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples}


def test_before_the_first_step_only_what_is_known_is_exported(tracker):
    _, base = tracker
    samples = scrape(base)
    assert samples["kubeforge_train_step"] == ("gauge", LABELS, 10.0)
    assert samples["kubeforge_train_total_steps"] == ("gauge", LABELS, 100.0)
    assert samples["kubeforge_train_tokens_total"] == ("counter", LABELS, 0.0)
    assert "kubeforge_train_loss" not in samples and "kubeforge_train_eta_seconds" not in samples


def test_the_metrics_follow_the_steps_and_agree_with_the_json(tracker):
    progress, base = tracker
    progress.update(11, 2.5, 4096, 0.11)
    progress.update(12, 2.25, 4096, 0.12)
    samples = scrape(base)
    _, snapshot = get(base + PROGRESS_PATH)
    snap = json.loads(snapshot)
    assert samples["kubeforge_train_step"][2] == snap["step"] == 12
    assert samples["kubeforge_train_loss"] == ("gauge", LABELS, 2.25)
    assert samples["kubeforge_train_epoch"][2] == pytest.approx(0.12)
    assert samples["kubeforge_train_tokens_total"] == ("counter", LABELS, 8192.0)
    assert samples["kubeforge_train_tokens_per_second"][2] > 0
    assert samples["kubeforge_train_eta_seconds"][2] >= 0
    assert not any(name.startswith("kubeforge_train_rewards") for name in samples)  # sft: no DPO metrics
    assert {n.removesuffix("_total") for n in samples if not n.endswith("_created")} == set(P.METRICS)


def test_dpo_metrics_are_exported_when_a_step_reports_them(tracker):
    progress, base = tracker
    dpo = {"rewards/margins": 0.75, "rewards/accuracies": 0.8, "logps/chosen": -12.5}
    progress.update(11, 0.6, 1024, 0.1, dpo)
    samples = scrape(base)
    assert samples["kubeforge_train_rewards_margins"] == ("gauge", LABELS, 0.75)
    assert samples["kubeforge_train_rewards_accuracies"] == ("gauge", LABELS, 0.8)
    assert samples["kubeforge_train_logps_chosen"] == ("gauge", LABELS, -12.5)
    assert P.objective_metric("rewards/margins") == "kubeforge_train_rewards_margins"


def test_other_paths_are_not_found(tracker):
    _, base = tracker
    with pytest.raises(urllib.error.HTTPError) as err:
        get(base + "/nothing")
    assert err.value.code == 404
