from __future__ import annotations

import pytest

from kubeforge.api.uris import Location, parse_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://Qwen/Qwen3-8B", Location("hf", "Qwen/Qwen3-8B", "")),
        ("hf://gpt2", Location("hf", "gpt2", "")),
        ("pvc://models/support-bot", Location("pvc", "models", "support-bot")),
        ("pvc://data", Location("pvc", "data", "")),
        ("pvc://data//a/b/", Location("pvc", "data", "a/b")),
        ("s3://my-bucket/prefix/x", Location("s3", "my-bucket", "prefix/x")),
        ("./out/model", Location("local", "", "./out/model")),
        ("/abs/path", Location("local", "", "/abs/path")),
    ],
)
def test_parse(uri, expected):
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "non-empty"),
        (" hf://a/b", "surrounding spaces"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("hf://", "Hub repository id"),
        ("hf://a/b/c", "Hub repository id"),
        ("pvc://Models/x", "PersistentVolumeClaim name"),
        ("pvc://models/../etc", "'..'"),
        ("s3://B/x", "bucket name"),
        ("c:thing", "neither a URI"),
    ],
)
def test_bad_uris_say_why(uri, fragment):
    with pytest.raises(ValueError, match=None) as err:
        parse_uri(uri)
    assert fragment in str(err.value)
