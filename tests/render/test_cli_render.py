"""`kubeforge render` for every example job on every example cluster: valid Kubernetes, or a clear refusal."""

from __future__ import annotations

import pytest
import yaml

from kubeforge.cli import main
from tests.builders import EXAMPLES
from tests.harness.manifests import validate_manifest

CLUSTERS = sorted((EXAMPLES / "clusters").glob("*.yaml"))
JOBS = sorted(EXAMPLES.glob("finetunejob-*.yaml"))


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda p: p.stem)
@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_render_every_example(capsys, job, cluster):
    code = main(
        ["render", str(job), "--cluster", str(cluster), "--offline", "--uid", "0f0f0f0f-0000-4000-8000-000000000000"]
    )
    out, err = capsys.readouterr()
    if code == 1:
        assert "nothing to render, the plan is infeasible" in err and out == ""
        return
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    for doc in docs:
        validate_manifest(doc)


def test_render_jobset(capsys):
    job, cluster = EXAMPLES / "finetunejob-qwen3-8b-lora.yaml", EXAMPLES / "clusters" / "h100-4x8.yaml"
    assert main(["render", str(job), "--cluster", str(cluster), "--offline", "--gang", "jobset"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "JobSet"]
    assert "ownerReferences" not in docs[0]["metadata"]  # no --uid: nothing to own by
