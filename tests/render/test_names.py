"""Any valid object name works: children's names and owner labels are valid where Kubernetes puts them,
and two owners never share a child or a label, however long or alike their names."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeforge.render import labels as L
from kubeforge.render.finetune import names, rank0_address
from kubeforge.render.names import JOB_NAME_MAX, child_name, digest, owner_label
from kubeforge.render.quantize import quantize_names
from kubeforge.render.service import service_names
from tests.builders import DELETE, finetune, quantize, service
from tests.harness.manifests import validate_manifest
from tests.render.rendering import all_cases, containers, pod_templates

DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

PREFIX = "support-bot-" + "x" * 51  # 63 characters, itself a valid name
assert len(PREFIX) == 63
LONGEST = ("a" * 70 + "." + "b" * 70 + "." + "c" * 70 + "-" + "d" * 40)[:253]
ODD = ["7b-chat", "7b.chat", "model.v2", "a", "x" * 63, "x" * 64, PREFIX + "-longer", LONGEST, "1" * 253]

object_names = st.from_regex(DNS_1123_SUBDOMAIN, fullmatch=True).filter(lambda n: len(n) <= 253)


def all_children_names(name: str) -> dict[str, str]:
    return {**{f"ftj-{k}": v for k, v in names(name).items()},
            **{f"qj-{k}": v for k, v in quantize_names(name).items()},
            **{f"ms-{k}": v for k, v in service_names(name).items()}}  # fmt: skip


def assert_valid_names(name: str) -> None:
    children = all_children_names(name)
    for key in ("ftj-service", "ftj-jobset", "ms-service"):
        assert DNS_1035_LABEL.fullmatch(children[key]) and len(children[key]) <= 63, (key, children[key])
    for key, child in children.items():
        assert DNS_1123_LABEL.fullmatch(child) and len(child) <= 63, (key, child)
    for key in ("ftj-job", "qj-job"):
        assert len(children[key]) <= JOB_NAME_MAX  # pod hostname <job>-<index> stays a DNS label
    for gang in ("job", "jobset"):
        host = rank0_address(name, gang).split(".")[0]  # type: ignore[arg-type]
        assert DNS_1123_LABEL.fullmatch(host) and len(host) <= 63
    label = owner_label(name)
    assert LABEL_VALUE.fullmatch(label) and len(label) <= 63


@pytest.mark.parametrize("name", ODD)
def test_odd_names_give_valid_children_and_labels(name):
    assert DNS_1123_SUBDOMAIN.fullmatch(name) and len(name) <= 253
    assert_valid_names(name)


@given(object_names)
def test_every_object_name_gives_valid_children_and_labels(name):
    assert_valid_names(name)


def test_short_valid_names_are_used_unchanged():
    assert names("support-bot") == {"configmap": "support-bot-contract", "service": "support-bot-rdzv",
                                    "job": "support-bot", "jobset": "support-bot"}  # fmt: skip
    assert service_names("support-bot") == {"deployment": "support-bot-engine", "service": "support-bot"}
    assert quantize_names("q") == {"configmap": "q-qcontract", "job": "q-quantize"}
    assert owner_label("support-bot") == "support-bot" and owner_label(PREFIX) == PREFIX


def test_names_sharing_a_63_character_prefix_share_no_child_and_no_label():
    """The issue's case: a job named with the 63-character prefix of another's name must not adopt its children."""
    longer = [PREFIX + "-a", PREFIX + "-b", PREFIX + "x" * 190]
    everyone = [PREFIX, *longer]
    labels = [owner_label(n) for n in everyone]
    assert len(set(labels)) == len(everyone)
    for key in all_children_names(PREFIX):
        children = [all_children_names(n)[key] for n in everyone]
        assert len(set(children)) == len(everyone), key
    # readable: the prefix is kept, and all children of one owner carry the same hash
    hashed = all_children_names(longer[0])
    assert hashed["ftj-job"].startswith("support-bot-x")
    assert all(digest(longer[0]) in v for v in hashed.values())
    assert owner_label(longer[0]).startswith("support-bot-x") and "_" in owner_label(longer[0])


@given(object_names, object_names)
def test_different_names_never_share_a_label(a, b):
    if a != b:
        assert owner_label(a) != owner_label(b)


def test_a_name_spelled_like_a_hashed_label_is_not_that_label():
    """Hashed labels contain "_", which no object name can: a short name never equals a long one's label."""
    label = owner_label(PREFIX + "-a")
    assert not DNS_1123_SUBDOMAIN.fullmatch(label)


def test_dots_and_leading_digits_are_not_collapsed():
    assert child_name("model.v2", "rdzv") != child_name("model-v2", "rdzv")
    assert child_name("model-v2", "rdzv") == "model-v2-rdzv"
    assert child_name("7b-chat", letter_first=True).startswith("kf-7b-chat-")
    assert child_name("7b-chat") == "7b-chat"  # a Job or ConfigMap may start with a digit


def rendered_all_kinds(name: str) -> list[tuple[str, list[dict[str, Any]]]]:
    return list(all_cases(name, every_cluster=False))


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "JobSet":  # not in the official schema: its replicated Job template is a batch/v1 JobSpec
        for rj in doc["spec"]["replicatedJobs"]:
            validate_manifest({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, **rj["template"]})
    elif doc["kind"] == "LeaderWorkerSet":  # nor is this: its templates are pod templates
        for _, pod in pod_templates([doc]):
            validate_manifest({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod})
    else:
        validate_manifest(doc)


@pytest.mark.parametrize("name", [LONGEST, "7b.chat", PREFIX + "-a"])
def test_long_and_odd_names_render_valid_manifests_for_every_kind(name):
    cases = rendered_all_kinds(name)
    assert {d["kind"] for _, docs in cases for d in docs} >= {"Job", "JobSet", "Deployment", "LeaderWorkerSet"}
    for case, docs in cases:
        for doc in docs:
            if name == LONGEST:  # the schema does not check names (the asserts below do): once is enough
                validate(doc)
            meta = doc["metadata"]
            kind = meta["labels"][L.OWNER_KIND]
            assert meta["labels"][L.OWNER_NAME] == owner_label(name)
            assert all(LABEL_VALUE.fullmatch(v) and len(v) <= 63 for v in meta["labels"].values()), case
            pattern = DNS_1035_LABEL if doc["kind"] in ("Service", "JobSet") else DNS_1123_LABEL
            assert pattern.fullmatch(meta["name"]) and len(meta["name"]) <= 63, (case, meta["name"])
            assert (meta.get("ownerReferences") or [{}])[0].get("name") == name  # the full name, for the GC
            if doc["kind"] == "Service":
                selector = doc["spec"]["selector"]
                assert selector[L.OWNER_NAME] == owner_label(name) and selector[L.OWNER_KIND] == kind
        for _, pod in pod_templates(docs):
            for volume in pod["volumes"]:
                assert DNS_1123_LABEL.fullmatch(volume["name"]) and len(volume["name"]) <= 63
            for c in containers(pod):
                mounted = {m["name"] for m in c.get("volumeMounts", [])}
                assert mounted <= {v["name"] for v in pod["volumes"]}
            if "subdomain" in pod:
                assert DNS_1123_LABEL.fullmatch(pod["subdomain"])


def test_claims_with_dots_get_distinct_valid_volume_names():
    from kubeforge.render.mounts import ClaimMount

    a, b = ClaimMount("models.v2", read_only=True), ClaimMount("models-v2", read_only=True)
    assert a.volume_name != b.volume_name and b.volume_name == "pvc-models-v2"
    assert DNS_1123_LABEL.fullmatch(a.volume_name)
    assert DNS_1123_LABEL.fullmatch(ClaimMount("m" * 253, read_only=False).volume_name)


def test_builders_examples_keep_their_names():
    """Nothing changes for the names that always worked."""
    for doc, expected in ((finetune(**{"resources.queue": DELETE}), "support-bot"), (quantize(), "support-bot-fp8"),
                          (service(), "support-bot")):  # fmt: skip
        assert owner_label(doc["metadata"]["name"]) == expected
