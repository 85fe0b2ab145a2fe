"""Images from the chart's values to the pods the operator renders.

The chart's values become the operator Deployment's KUBEFORGE_IMAGE_* variables; the operator's
settings (kubeforge.render.images.from_env, as `python -m kubeforge.controller` calls it) turn them
into the images the renderers use. Each test here reads the variables out of the rendered
Deployment, configures the renderers with them and renders a FineTuneJob, a QuantizeJob and
ModelServices of every engine, with and without the fetching init container.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from kubeforge.render import images
from tests.builders import DELETE, finetune, quantize, service
from tests.chart.charting import CHART, operator_container, operator_env, render
from tests.harness.manifests import validate_manifest
from tests.harness.operator import ROOT
from tests.render.rendering import containers, pod_templates, render_ftj, render_ms, render_qj

DIGEST = {name: f"sha256:{str(i) * 64}" for i, name in enumerate(images.NAMES, start=1)}
MIRROR = "mirror.example.com:5000"


@pytest.fixture()
def configured() -> Iterator[None]:
    """Restore the renderers' images after a test configured them."""
    previous = images.configured()
    yield
    images.configure(previous)


def rendered_images() -> dict[str, str]:
    """{role: image} over a FineTuneJob, a QuantizeJob and ModelServices of every engine."""
    no_queue = {"resources.queue": DELETE}
    s3 = "s3://bucket/support-bot"
    cases: dict[str, list[dict[str, Any]] | None] = {
        "trainer": render_ftj(finetune(**no_queue)),
        "quantizer": render_qj(quantize()),
        "vllm": render_ms(service(engine="vllm"), "pvc://models/m"),
        "sglang": render_ms(service(engine="sglang"), "pvc://models/m"),
        "server": render_ms(service(engine="transformers"), "pvc://models/m", None),
        "fetcher": render_ms(service(engine="vllm"), s3),
    }
    found: dict[str, str] = {}
    for role, docs in cases.items():
        assert docs is not None, role
        for doc in docs:
            if doc["kind"] in ("Job", "Deployment"):
                validate_manifest(doc)
        (pod,) = [pod for _, pod in pod_templates(docs)]
        if role == "fetcher":
            (init,) = pod["initContainers"]
            found[role] = init["image"]
        else:
            found[role] = pod["containers"][0]["image"]
            assert all(c["image"] == found[role] for c in containers(pod) if c not in pod.get("initContainers", []))
    return found


def operator_settings(values: dict[str, Any]) -> images.Images:
    """What the operator deployed with ``values`` configures its renderers with."""
    return images.from_env(operator_env(render(values)))


def test_defaults_pass_no_image_settings_and_render_the_pinned_images(configured):
    env = operator_env(render())
    assert not [k for k in env if k.startswith(images.ENV_PREFIX)]
    images.configure(images.from_env(env))
    assert rendered_images() == {name: getattr(images.DEFAULTS, name) for name in images.NAMES}
    assert images.DEFAULTS.fetcher == images.DEFAULTS.trainer
    assert images.DEFAULTS.vllm == f"vllm/vllm-openai:v{images.VLLM_VERSION}"


def test_tags_and_repositories_from_values_reach_every_rendered_pod(configured):
    values = {"images": {
        "trainer": {"registry": "registry.local", "repository": "ml/trainer", "tag": "2.0"},
        "quantizer": {"tag": "q-1"},
        "server": {"repository": "kubeforge/server-cpu"},
        "vllm": {"registry": "docker.io", "tag": "v0.34.0"},
        "sglang": {"repository": "lmsysorg/sglang-rocm", "tag": "v0.5.24"},
    }}  # fmt: skip
    images.configure(operator_settings(values))
    assert rendered_images() == {
        "trainer": "registry.local/ml/trainer:2.0",
        "quantizer": "ghcr.io/kubeforge/quantizer:q-1",  # the default registry and repository
        "server": f"ghcr.io/kubeforge/server-cpu:{images.VERSION}",  # the default tag
        "fetcher": "registry.local/ml/trainer:2.0",  # follows the trainer
        "vllm": "docker.io/vllm/vllm-openai:v0.34.0",
        "sglang": "lmsysorg/sglang-rocm:v0.5.24",
    }


def test_digests_win_over_tags_and_a_mirror_rewrites_every_registry(configured):
    values = {
        "imageRegistry": MIRROR,
        "image": {"digest": DIGEST["trainer"], "tag": "ignored"},
        "images": {
            name: {"digest": DIGEST[name], "tag": "ignored", "registry": "elsewhere.io"} for name in images.NAMES
        },
    }
    docs = render(values)
    assert operator_container(docs)["image"] == f"{MIRROR}/kubeforge/operator@{DIGEST['trainer']}"
    images.configure(images.from_env(operator_env(docs)))
    repositories = {"trainer": "kubeforge/trainer", "quantizer": "kubeforge/quantizer",
                    "server": "kubeforge/server", "fetcher": "kubeforge/trainer", "vllm": "vllm/vllm-openai",
                    "sglang": "lmsysorg/sglang"}  # fmt: skip
    assert rendered_images() == {name: f"{MIRROR}/{repositories[name]}@{DIGEST[name]}" for name in images.NAMES}


def test_a_mirror_alone_keeps_every_repository_and_tag(configured):
    images.configure(operator_settings({"imageRegistry": MIRROR}))
    v = images.VERSION
    assert rendered_images() == {
        "trainer": f"{MIRROR}/kubeforge/trainer:{v}",
        "quantizer": f"{MIRROR}/kubeforge/quantizer:{v}",
        "server": f"{MIRROR}/kubeforge/server:{v}",
        "fetcher": f"{MIRROR}/kubeforge/trainer:{v}",
        "vllm": f"{MIRROR}/vllm/vllm-openai:v{images.VLLM_VERSION}",
        "sglang": f"{MIRROR}/lmsysorg/sglang:v{images.SGLANG_VERSION}",
    }


def test_the_fetcher_follows_the_trainer_until_set_and_then_keeps_its_own_version():
    trainer = {"digest": DIGEST["trainer"]}
    assert images.resolve({"trainer": trainer}).fetcher == f"ghcr.io/kubeforge/trainer@{DIGEST['trainer']}"
    # a tag of its own is not hidden by the trainer's digest
    assert images.resolve({"trainer": trainer, "fetcher": {"tag": "f"}}).fetcher == "ghcr.io/kubeforge/trainer:f"
    fetcher = images.resolve({"fetcher": {"repository": "kubeforge/fetch"}}).fetcher
    assert fetcher == f"ghcr.io/kubeforge/fetch:{images.VERSION}"


def test_a_spec_image_still_wins_over_the_configured_ones(configured):
    images.configure(images.resolve(registry=MIRROR))
    docs = render_ftj(finetune(**{"resources.queue": DELETE}, image="registry.local/my-trainer:1"))
    assert docs is not None
    (pod,) = [pod for _, pod in pod_templates(docs)]
    assert pod["containers"][0]["image"] == "registry.local/my-trainer:1"
    assert "HOME" in {e["name"] for e in pod["containers"][0]["env"]}  # not ours: a writable home
    # the configured transformers server is ours: no foreign-image environment
    docs = render_ms(service(engine="transformers"), "pvc://models/m", None)
    assert docs is not None
    (pod,) = [pod for _, pod in pod_templates(docs)]
    assert pod["containers"][0]["image"] == f"{MIRROR}/kubeforge/server:{images.VERSION}"
    assert "HOME" not in {e["name"] for e in pod["containers"][0]["env"]}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KUBEFORGE_IMAGE_TRAINER_DIGEST": "sha256:short"}, "KUBEFORGE_IMAGE_TRAINER_DIGEST='sha256:short'"),
        ({"KUBEFORGE_IMAGE_VLLM_TAG": "no spaces"}, "KUBEFORGE_IMAGE_VLLM_TAG='no spaces' is not a valid image tag"),
        ({"KUBEFORGE_IMAGE_SERVER_REPOSITORY": "Upper/Case"}, "KUBEFORGE_IMAGE_SERVER_REPOSITORY="),
        ({"KUBEFORGE_IMAGE_REGISTRY": "bad registry"}, "KUBEFORGE_IMAGE_REGISTRY='bad registry'"),
        ({"KUBEFORGE_IMAGE_TRAINR_TAG": "1"}, "unknown image setting KUBEFORGE_IMAGE_TRAINR_TAG"),
    ],
)
def test_bad_settings_are_refused_by_name(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        images.from_env(env)
    with pytest.raises(ValueError, match="image trainer: tag"):
        images.resolve({"trainer": {"tag": "-bad"}})
    with pytest.raises(ValueError, match="unknown image"):
        images.resolve({"trainr": {"tag": "1"}})


def test_the_values_schema_refuses_what_the_operator_would():
    chart = helm.Chart.load(str(CHART))
    for bad in ({"images": {"trainer": {"digest": "sha256:short"}}}, {"images": {"vllm": {"tag": "a b"}}},
                {"images": {"trainr": {}}}, {"imageRegistry": "bad registry"},
                {"image": {"digest": "md5:1"}}):  # fmt: skip
        with pytest.raises(Exception, match="image"):
            chart.validate_schema(bad)


def test_the_operator_stops_at_start_on_a_bad_image_setting():
    env = dict(os.environ, KUBEFORGE_IMAGE_TRAINER_DIGEST="sha256:short")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "runtime")])
    result = subprocess.run([sys.executable, "-m", "kubeforge.controller"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2
    assert "KUBEFORGE_IMAGE_TRAINER_DIGEST='sha256:short' is not a valid image digest" in result.stderr
