"""User strings reach containers as written: Kubernetes' $(VAR) expansion never reads them.

Kubernetes expands ``$(VAR)`` in a container's command, args and env values from the container's
environment (which holds the S3 and Hub Secrets): a URI holding ``$(AWS_SECRET_ACCESS_KEY)``
would be fetched, and logged, under the Secret's value. expand() below is Kubernetes' own
algorithm (third_party/forked/golang/expansion/expand.go), run pessimistically: every variable
is taken to be defined, as an ``envFrom`` Secret can define any name.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeforge.render.objects import literal
from tests.builders import DELETE, finetune, quantize, service
from tests.render.rendering import containers, pod_templates, render_ftj, render_ms, render_qj

SECRET = "\x00expanded:{}\x00"
# kubeforge's own references, meant to be expanded
OURS = {"JOB_COMPLETION_INDEX", "LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX"}


def expand(text: str, mapping: Callable[[str], str]) -> str:
    """Kubernetes' expansion of $(VAR) references, with $$ as an escaped $."""
    out, checkpoint, cursor = [], 0, 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                read, is_var, advance = "$", False, 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                read, is_var, advance = (rest[1:close], True, close + 1) if close > 0 else ("$(", False, 1)
            else:
                read, is_var, advance = "$" + rest[0], False, 1
            out.append(mapping(read) if is_var else read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def everything_defined(name: str) -> str:
    return SECRET.format(name)


def test_expand_is_kubernetes_expansion():
    env = {"A": "x"}.get

    def mapping(name: str) -> str:
        return env(name) or f"$({name})"

    assert expand("$(A)/$(B)", mapping) == "x/$(B)"
    assert expand("$$(A)", mapping) == "$(A)"
    assert expand("$$$(A)", mapping) == "$x"  # why escaping only "$(" is not enough
    assert expand("a$b$", mapping) == "a$b$" and expand("$(A", mapping) == "$(A" and expand("$$", mapping) == "$"


@given(st.text(alphabet=st.sampled_from("$()AB_x/ "), max_size=30))
def test_literal_survives_expansion(text):
    assert expand(literal(text), everything_defined) == text


HOSTILE = ["$(AWS_SECRET_ACCESS_KEY)", "$$(HF_TOKEN)", "$$$(AWS_ACCESS_KEY_ID)", "$(", "a$b"]


def hostile_cases():
    for h in HOSTILE:
        ftj = {
            "resources.queue": DELETE,
            "dataset.uri": f"s3://data/{h}.jsonl",
            "output": {"uri": f"s3://bucket/{h}"},
            "credentials.s3": {"name": "s3-creds"},
            "lora.targetModules": [f"q_proj{h}"],
        }
        yield f"ftj {h}", render_ftj(finetune(**ftj)), []  # its URIs reach its pods in the contract ConfigMap only
        yield f"qj {h}", render_qj(quantize(output={"uri": f"s3://out/{h}"}, credentials={"s3": {"name": "s3"}}),
                                   f"s3://bucket/{h}"), []  # fmt: skip
        s3, pvc = f"s3://bucket/{h}", f"pvc://models/{h}"
        creds = {"s3": {"name": "s3-creds"}, "huggingFace": {"name": "hf", "key": "token"}}
        adapters = [{"name": "a", "uri": f"pvc://adapters/{h}"}, {"name": "b", "uri": f"s3://bucket/b{h}"}]
        yield f"ms-fetch {h}", render_ms(service(credentials=creds, servedModelName=f"bot{h}"), s3), [s3, f"bot{h}"]
        yield (
            f"ms-pvc {h}",
            render_ms(service(adapters=adapters), pvc),
            [f"/mnt/pvc/models/{h}"],
        )  # adapter URIs reach the pods in a ConfigMap
        yield f"ms-sglang {h}", render_ms(service(engine="sglang", servedModelName=f"bot{h}"), pvc), [f"bot{h}"]
        yield f"ms-cpu {h}", render_ms(service(engine="transformers", servedModelName=f"bot{h}"), s3, None), [s3]
        lws = render_ms(service(credentials=creds, servedModelName=f"bot{h}"), s3, "a10-4x1.yaml", lws=True,
                        max_model_len=32768)  # fmt: skip
        yield f"ms-lws {h}", lws, [s3, f"bot{h}"]


CASES = list(hostile_cases())


@pytest.mark.parametrize(("case", "docs", "verbatim"), CASES, ids=[c for c, _, _ in CASES])
def test_no_user_string_is_expanded_by_kubernetes(case, docs, verbatim):
    assert docs is not None
    seen: list[str] = []
    for where, pod in pod_templates(docs):
        for c in containers(pod):
            strings = [*c.get("command", []), *c.get("args", [])]
            strings += [e["value"] for e in c.get("env", []) if "value" in e]
            for s in strings:
                expanded = expand(s, everything_defined)
                leaked = [name for name in OURS if SECRET.format(name) in expanded]
                rest = expanded
                for name in leaked:
                    rest = rest.replace(SECRET.format(name), "")
                assert "\x00expanded:" not in rest, f"{case}: {where}/{c['name']}: {s!r} expands to {expanded!r}"
                if c.get("command", [])[-1:] == ["-c"] and s is c["args"][0]:
                    seen += shlex.split(rest)  # what the shell passes on
                else:
                    seen.append(rest)
    for text in verbatim:
        assert any(text in s for s in seen), f"{case}: {text!r} does not reach the container as written"
