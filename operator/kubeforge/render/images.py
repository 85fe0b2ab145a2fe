"""Container images kubeforge runs: pinned defaults, overridable from the operator's environment.

Each image is a registry, a repository, and a tag or a digest (a digest wins: ``repo@sha256:...``).
The defaults are pinned here; the operator's settings (the chart's ``images`` and ``imageRegistry``
values, passed as environment variables, see ``from_env``) override them field by field, and the
renderers look the resolved references up with ``configured()`` at render time. The fetcher (the
init container that downloads s3:// and hf:// artifacts) is the trainer's image unless set itself.
A global registry (a mirror) replaces the registry of every image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

REGISTRY = "ghcr.io"
VERSION = "0.1.0"

TRAINER_UID = 1000  # the trainer image's non-root user

# Serving engines, pinned: their flags in render/engines.py were written against these versions'
# documented arguments (vLLM: `vllm serve --help` / docs.vllm.ai "Engine Arguments"; SGLang:
# `python -m sglang.launch_server --help` / docs.sglang.io "Server Arguments").
VLLM_VERSION = "0.33.0"
SGLANG_VERSION = "0.5.23"

ENV_PREFIX = "KUBEFORGE_IMAGE_"
ENV_REGISTRY = f"{ENV_PREFIX}REGISTRY"  # the global registry (a mirror) for every image
FIELDS = ("registry", "repository", "tag", "digest")  # KUBEFORGE_IMAGE_<NAME>_<FIELD>, e.g. ..._TRAINER_DIGEST

_REGISTRY_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*$")  # a host[:port], optionally a path
_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"  # the OCI distribution spec's path component
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_PATTERNS = {"registry": _REGISTRY_RE, "repository": _REPOSITORY_RE, "tag": _TAG_RE, "digest": _DIGEST_RE}


@dataclass(frozen=True)
class ImageRef:
    registry: str  # empty: Docker Hub
    repository: str
    tag: str = ""
    digest: str = ""  # wins over the tag

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}" if self.registry else self.repository
        if self.digest:
            return f"{name}@{self.digest}"
        return f"{name}:{self.tag}" if self.tag else name


@dataclass(frozen=True)
class Images:
    """The resolved reference of every image kubeforge renders."""

    trainer: str  # CUDA + torch + transformers/peft + DeepSpeed + megatron-core
    quantizer: str  # torch + llm-compressor + compressed-tensors + the runtime
    server: str  # torch + transformers + aiohttp: python -m kubeforge.runtime.serve
    fetcher: str  # the init container that downloads s3:// and hf:// artifacts (has the runtime)
    vllm: str
    sglang: str


NAMES = tuple(f.name for f in fields(Images))

DEFAULT_REFS: dict[str, ImageRef] = {
    "trainer": ImageRef(REGISTRY, "kubeforge/trainer", VERSION),
    "quantizer": ImageRef(REGISTRY, "kubeforge/quantizer", VERSION),
    "server": ImageRef(REGISTRY, "kubeforge/server", VERSION),
    "vllm": ImageRef("", "vllm/vllm-openai", f"v{VLLM_VERSION}"),
    "sglang": ImageRef("", "lmsysorg/sglang", f"v{SGLANG_VERSION}"),
}  # the fetcher follows the trainer


def resolve(overrides: Mapping[str, Mapping[str, str]] | None = None, registry: str = "") -> Images:
    """Every image from the defaults, ``overrides`` ({name: {field: value}}; empty values keep the
    default) and a global ``registry`` that replaces every image's. An image that sets its own tag or
    digest takes both from its settings (so a tag set here is not hidden by a digest it inherits)."""
    overrides = overrides or {}
    unknown = set(overrides) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown image(s) {sorted(unknown)}; known: {list(NAMES)}")
    refs: dict[str, ImageRef] = {}
    for name in NAMES:  # the trainer comes before the fetcher that defaults to it
        base = refs["trainer"] if name == "fetcher" else DEFAULT_REFS[name]
        given = {k: v for k, v in (overrides.get(name) or {}).items() if v}
        bad = set(given) - set(FIELDS)
        if bad:
            raise ValueError(f"image {name}: unknown field(s) {sorted(bad)}; known: {list(FIELDS)}")
        if "tag" in given or "digest" in given:
            base = replace(base, tag="", digest="")
        refs[name] = _checked(name, replace(base, **given))
    if registry:
        refs = {name: _checked(name, replace(ref, registry=registry)) for name, ref in refs.items()}
    return Images(**{name: str(ref) for name, ref in refs.items()})


def from_env(env: Mapping[str, str]) -> Images:
    """The operator's image settings: ``KUBEFORGE_IMAGE_REGISTRY`` (a mirror for every image) and
    ``KUBEFORGE_IMAGE_<NAME>_<FIELD>`` (NAME: TRAINER, QUANTIZER, SERVER, FETCHER, VLLM, SGLANG;
    FIELD: REGISTRY, REPOSITORY, TAG, DIGEST). Raises ValueError naming a bad or unknown variable."""
    overrides: dict[str, dict[str, str]] = {}
    known = {f"{ENV_PREFIX}{n.upper()}_{f.upper()}": (n, f) for n in NAMES for f in FIELDS}
    known[ENV_REGISTRY] = ("", "registry")
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        if key not in known:
            names, fields_ = "|".join(n.upper() for n in NAMES), "|".join(f.upper() for f in FIELDS)
            raise ValueError(f"unknown image setting {key}; known: {ENV_REGISTRY}, {ENV_PREFIX}<{names}>_<{fields_}>")
        name, field = known[key]
        value = value.strip()
        if value and not _PATTERNS[field].match(value):
            raise ValueError(f"{key}={value!r} is not a valid image {field}")
        if name:
            overrides.setdefault(name, {})[field] = value
    return resolve(overrides, registry=env.get(ENV_REGISTRY, "").strip())


def _checked(name: str, ref: ImageRef) -> ImageRef:
    for field in FIELDS:
        value = getattr(ref, field)
        if value and not _PATTERNS[field].match(value):
            raise ValueError(f"image {name}: {field} {value!r} is not a valid image {field}")
    return ref


DEFAULTS = resolve()  # by name below; what a configured operator renders is configured()
TRAINER_IMAGE = DEFAULTS.trainer
QUANTIZER_IMAGE = DEFAULTS.quantizer
SERVER_IMAGE = DEFAULTS.server
FETCHER_IMAGE = DEFAULTS.fetcher
VLLM_IMAGE = DEFAULTS.vllm
SGLANG_IMAGE = DEFAULTS.sglang

_configured = DEFAULTS


def configured() -> Images:
    """The images the renderers use: the defaults unless the operator configured others at startup."""
    return _configured


def configure(images: Images) -> Images:
    """Set the images the renderers use (the operator does, once, from its environment); returns the
    previous setting, for tests to restore."""
    global _configured
    previous, _configured = _configured, images
    return previous
