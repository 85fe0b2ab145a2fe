"""Bad input never crashes or hangs anything, and every rejection names where it is.

Table-driven cases for each crash the fuzz bench (bench/fuzz_inputs.py) found, then
property tests that throw mutated job documents, Node lists and YAML text at the
readers and at the CLI: nothing escapes but the documented errors, and every message
names a field path, or the file and a line.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeforge.api import documents
from kubeforge.api.documents import load_all, read_documents
from kubeforge.api.validation import check
from kubeforge.cli import main
from kubeforge.inventory.nodes import NodeError, nodes_in, parse_node
from kubeforge.inventory.pools import pools_from_nodes
from kubeforge.inventory.quantity import QuantityError, parse_cpu, parse_memory, parse_quantity
from tests.builders import EXAMPLES, FINETUNE, example, finetune
from tests.planner.nodes import CLUSTERS, gfd_node

BOMB = "".join(
    f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
    for p, c in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)
GOOD_JOB = str(EXAMPLES / FINETUNE)
GOOD_CLUSTER = str(CLUSTERS / "h100-4x8.yaml")


def write(tmp_path: Path, name: str, content: str | Any) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: 2\na: 3\n", "found duplicate key 'a' (line 3, column 1)"),
        ("spec:\n  x: {c: 1, c: 2}\n", "found duplicate key 'c' (line 2, column 13)"),
        ("1: x\ntrue: y\n", "found duplicate key True (line 2, column 1)"),  # 1 == True: one dict key
        (BOMB + "x: *i\n", "aliases expand to more than 100000 nodes"),
        ("a: &a [*a]\n", "alias 'a' refers to a collection that holds it"),
        ("a: *nope\n", "found undefined alias 'nope'"),
        ("a: &x 1\nb: &x 2\n", "found duplicate anchor 'x' (line 2, column 4)"),
        ("spec: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 100 levels (line 1, column 106)"),
        ("".join(" " * i + "a:\n" for i in range(3000)), "nested deeper than 100 levels (line 101,"),
        ("a: !!int 0xZZ\n", "'0xZZ' is not an integer (line 1, column 4)"),
        ("a: !!float abc\n", "'abc' is not a number"),
        ("a: 2024-13-45\n", "'2024-13-45' is not a date or time"),
        ("a: " + "1" * 5000 + "\n", "is not an integer (line 1, column 4)"),  # past int()'s digit limit
        ("a: !!python/name:os.system\n", "is not supported here"),
        ("a: !!set {x: null}\n", "is not supported here"),
        ("a: <<\n", "a merge key (<<) must be a key of a mapping"),
        ("a: {<<: 7}\n", "a merge key (<<) takes a mapping or a list of mappings"),
        ("a: [unclosed\n", "line 2"),
    ],
)
def test_yaml_refusals_name_the_line_and_return_fast(tmp_path, text, message):
    start = time.perf_counter()
    docs, error = read_documents(Path(write(tmp_path, "x.yaml", text)))
    assert time.perf_counter() - start < 1.0
    assert docs == [] and error is not None and error.startswith("invalid YAML: ")
    assert message in error and "\n" not in error


def test_yaml_reads_what_the_safe_loader_reads():
    texts = [p.read_text() for p in sorted(EXAMPLES.rglob("*.yaml"))]
    texts += [
        "a: &b {x: 1, y: 2}\nc: &c {x: 3, z: 4}\nd: {<<: [*b, *c], y: 9}\ne: *b\n",
        "a: {<<: {x: 1}, <<: {x: 5}}\n",
        "---\n---\na: [1, 2.5, .inf, null, true, '1', 2024-01-02, !!binary aGk=]\n",
        "'<<': 1\nb: !!str 5\n=: v\n",
    ]
    for text in texts:
        assert load_all(text) == list(yaml.safe_load_all(text)), text
    with pytest.raises(yaml.YAMLError, match="unhashable"):
        load_all("? [complex]\n: 1\n")  # a list as a key: PyYAML refuses it too


def test_yaml_anchors_within_bounds_work():
    docs = load_all("base: &b {gpus: 8}\nitems: [*b, *b, {<<: *b, gpus: 4}]\n")
    assert docs == [{"base": {"gpus": 8}, "items": [{"gpus": 8}, {"gpus": 8}, {"gpus": 4}]}]


def test_yaml_without_libyaml_reads_the_same_and_refuses_the_same():
    script = (
        "import yaml; del yaml.CSafeLoader\n"
        "from kubeforge.api.documents import LIBYAML, load_all\n"
        "assert not LIBYAML\n"
        "assert load_all('a: [1, {b: &x c}, *x]\\n') == [{'a': [1, {'b': 'c'}, 'c']}]\n"
        "for bad in ['a: 1\\na: 2', 'a: ' + '[' * 500, 'a: !!int 0xZZ']:\n"
        "    try: load_all(bad)\n"
        "    except yaml.YAMLError as err: print(type(err).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ComposerError", "ComposerError", "ConstructorError"]


def test_yaml_file_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "MAX_FILE_BYTES", 100)
    _, error = read_documents(Path(write(tmp_path, "big.yaml", "a: " + "x" * 200)))
    assert error is not None and error.startswith("is larger than")


def test_document_label_stays_on_one_line():
    doc = documents.Document({"kind": "FineTuneJob", "metadata": {"name": "a\nb"}}, 0, 1)
    assert doc.label == " (FineTuneJob)"
    assert documents.Document({"kind": ["FineTuneJob"]}, 0, 1).label == ""


# ---------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("text", "value"),
    [("8", 8), ("191500m", 191.5), ("1e9", 1e9), ("1E3", 1000), ("2Ti", 2 * 1024**4), (".5", 0.5), ("5.", 5),
     ("+8", 8), ("-1", -1), (64, 64), (2.5, 2.5), ("0", 0)],
)  # fmt: skip
def test_quantities(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "bad",
    ["abc", "8Gi ", " 8", "8\n", "", ".", "..", "1..2", "1Ki2", "1e3Ki", "0x10", "1_000", "\uff18", "nan", "inf",
     "1e400", "99999999999999999999Ei", 10**30, float("nan"), float("inf"), True, None, [], {"a": 1}],
)  # fmt: skip
def test_bad_quantities_raise_one_error_type(bad):
    with pytest.raises(QuantityError):
        parse_quantity(bad)
    with pytest.raises(ValueError):
        parse_memory(bad)
    with pytest.raises(ValueError):
        parse_cpu(bad)


# ---------------------------------------------------------------- Nodes


def node(**changes: Any) -> dict[str, Any]:
    """A good GFD node with dotted-path changes; a value of DELETE removes the field."""
    doc = gfd_node("n0", "NVIDIA-H100-80GB-HBM3", 8)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = doc
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return doc


DELETE = object()
GPU = "nvidia.com/gpu"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"kind": "List", "items": [node(metadata=7)]}, "items[0].metadata: must be a mapping (got 7)"),
        ({"kind": "List", "items": [node(), 7]}, "items[1]: must be a mapping (a Node) (got 7)"),
        ({"kind": "List", "items": 7}, "items: must be a list of Nodes (got 7)"),
        ({"kind": "Pod"},
         "kind: expected a List of Nodes (kubectl get nodes -o yaml), a NodeList or a Node (got 'Pod')"),
        ({"kind": ["List"]}, "kind: expected a List of Nodes"),
        ("nodes", "expected a List of Nodes (kubectl get nodes -o yaml), a NodeList or a Node, not a string"),
        ([node(kind="Pod")], "[0].kind: must be Node (got 'Pod')"),
        ([node(metadata__name=7)], "[0].metadata.name: must be a string (got 7)"),
        ([node(metadata__labels=[1])], "[0].metadata.labels: must be a mapping (got [1])"),
        ([node(metadata__labels={1: "x"})], "[0].metadata.labels: label keys must be strings (got 1)"),
        ([node(metadata__labels={"nvidia.com/gpu.product": ["H100"]})],
         '[0].metadata.labels["nvidia.com/gpu.product"]: must be a string (got [\'H100\'])'),
        ([node(metadata__labels={"nvidia.com/gpu.count": "abc"})],
         '[0].metadata.labels["nvidia.com/gpu.count"]: must be a whole number from 0 to 1024 (got \'abc\')'),
        ([node(metadata__labels={"nvidia.com/gpu.count": "-8"})], "must be a whole number from 0 to 1024"),
        ([node(metadata__labels={"nvidia.com/gpu.memory": "99999999999"})], "must be a whole number from 0 to"),
        ([node(spec__unschedulable="yes")], "[0].spec.unschedulable: must be true or false (got 'yes')"),
        ([node(spec__taints=7)], "[0].spec.taints: must be a list (got 7)"),
        ([node(spec__taints=[{"key": ["x"]}])], "[0].spec.taints[0].key: must be a string (got ['x'])"),
        ([node(status__conditions=[1])], "[0].status.conditions[0]: must be a mapping (got 1)"),
        ([node(status=7)], "[0].status: must be a mapping (got 7)"),
        ([node(status__allocatable={GPU: "abc"})],
         '[0].status.allocatable["nvidia.com/gpu"]: \'abc\' is not a quantity'),
        ([node(status__allocatable={GPU: "-1"})],
         '[0].status.allocatable["nvidia.com/gpu"]: must be a whole number of GPUs from 0 to 1024 (got \'-1\')'),
        ([node(status__allocatable={GPU: "0.5"})], "must be a whole number of GPUs"),
        ([node(status__allocatable={GPU: 10**9})], "must be a whole number of GPUs"),
        ([node(status__allocatable={GPU: True})], "True is not a quantity"),
        ([node(status__allocatable={"memory": "1e400"})],
         '[0].status.allocatable["memory"]: \'1e400\' is out of range'),
        ([node(status__allocatable={"memory": "8Gi "})], "'8Gi ' is not a quantity"),
        ([node(status__allocatable={"memory": "-8Gi"})], "must not be negative"),
        ([node(status__capacity={"cpu": float("nan")})], '[0].status.capacity["cpu"]: nan is out of range'),
    ],
)  # fmt: skip
def test_bad_nodes_name_the_field(doc, message):
    with pytest.raises(NodeError) as err:
        nodes_in(doc)
    assert message in str(err.value)


def test_zero_allocatable_gpus_contribute_nothing():
    inv = pools_from_nodes(nodes_in([node(status__allocatable={GPU: "0"}), gfd_node("n1", "NVIDIA-L4", 1)]))
    assert [(p.gpu.name, p.total_gpus) for p in inv.pools] == [("L4", 1)]
    assert inv.cpu_only_nodes == 1


def test_numeric_labels_written_as_numbers_are_read():
    (n,) = nodes_in([node(metadata__labels={"nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.count": 2})])
    assert n.labels["nvidia.com/gpu.count"] == "2"


def test_unreadable_api_nodes_are_excluded_not_fatal():
    """The operator reads Nodes from the API: one bad Node must not stop planning on the others."""
    good, bad = gfd_node("good", "NVIDIA-L4", 1), node(status__allocatable={GPU: "abc"})
    inv = pools_from_nodes([good, bad, {"metadata": 7}])
    assert [p.node_names for p in inv.pools] == [("good",)]
    assert inv.excluded[0] == ("n0", 'unreadable: status.allocatable["nvidia.com/gpu"]: '
                                     "'abc' is not a quantity (like 8, 500m, 64Gi or 1e9)")  # fmt: skip
    assert inv.excluded[1] == ("?", "unreadable: metadata: must be a mapping (got 7)")


def test_a_clique_label_without_nvlink_does_not_widen_the_domain():
    nodes = [gfd_node(f"u{i}", "NVIDIA-Unknown", 8, labels={"nvidia.com/gpu.clique": "c"}) for i in range(2)]
    (pool,) = pools_from_nodes(nodes).pools
    assert pool.nvlink_domain == 1  # a ZeroDivisionError in the cost model once


def test_typed_nodes_read_the_example_clusters_like_before():
    for path in sorted(CLUSTERS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert pools_from_nodes(nodes_in(doc)) == pools_from_nodes(doc["items"]), path.name


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    ("job", "cluster", "message"),
    [
        (None, {"kind": "List", "items": [node(metadata=7)]},
         "cluster.yaml: items[0].metadata: must be a mapping (got 7)"),
        (None, {"kind": "List", "items": [node(status__allocatable={GPU: "1e400"})]},
         'cluster.yaml: items[0].status.allocatable["nvidia.com/gpu"]: \'1e400\' is out of range'),
        (None, {"kind": "List", "items": [node(status__allocatable={"memory": "abc"})]}, "'abc' is not a quantity"),
        (None, {"kind": "List", "items": [node(status__allocatable={GPU: "-2"})]}, "must be a whole number of GPUs"),
        (None, {"kind": "List", "items": 7}, "cluster.yaml: items: must be a list of Nodes (got 7)"),
        (None, "kind: List\nitems: []\n---\n- 7\n", "cluster.yaml#2: [0]: must be a mapping (a Node) (got 7)"),
        (None, BOMB + "kind: List\nitems: [*i]\n", "cluster.yaml: invalid YAML: aliases expand to more than"),
        (None, "kind: List\nkind: NodeList\n", "cluster.yaml: invalid YAML: found duplicate key 'kind' (line 2,"),
        (None, "items: " + "[" * 5000 + "]" * 5000, "cluster.yaml: invalid YAML: nested deeper than 100 levels"),
        ({**finetune(), "kind": ["FineTuneJob"]}, None, "job.yaml: expected exactly one FineTuneJob, found 0"),
        (BOMB + yaml.safe_dump(finetune()), None, "job.yaml: invalid YAML: aliases expand to more than"),
        (finetune(**{"training.learningRate": float("inf")}), None, "spec.training.learningRate: must be"),
        (finetune(model={"uri": "a\nb"}), None, "job.yaml: spec.model: the planner does not know a\\nb"),  # one line
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["plan", "render"])
def test_cli_maps_bad_files_to_exit_2_and_one_line(capsys, tmp_path, command, job, cluster, message):
    job_path = GOOD_JOB if job is None else write(tmp_path, "job.yaml", job)
    cluster_path = GOOD_CLUSTER if cluster is None else write(tmp_path, "cluster.yaml", cluster)
    start = time.perf_counter()
    code, out, err = run(capsys, command, job_path, "--cluster", cluster_path, "--offline")
    assert time.perf_counter() - start < 2.0
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({**example(FINETUNE), "kind": ["FineTuneJob"]}, "kind: unknown kind ['FineTuneJob']"),
        ({**example(FINETUNE), "kind": {"a": 1}}, "kind: unknown kind {'a': 1}"),
        ({**example(FINETUNE), "metadata": 7}, "metadata: must be a mapping (got 7)"),
        ("apiVersion: v1\nkind: FineTuneJob\nkind: Pod\n",
         "invalid YAML: found duplicate key 'kind' (line 3, column 1)"),
        (BOMB, "invalid YAML: aliases expand to more than 100000 nodes"),
        ("a: " + "[" * 50_000, "invalid YAML: nested deeper than 100 levels"),
    ],
)  # fmt: skip
def test_validate_reports_bad_documents_without_a_traceback(capsys, tmp_path, content, message):
    path = write(tmp_path, "x.yaml", content)
    code, _, err = run(capsys, "validate", path)
    assert code == 1 and f"{path}" in err and message in err


# ---------------------------------------------------------------- properties

NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["", "abc", "8Gi ", "1e400", "nan", "-1", "0", "0.5", "1Ki2", ".", "NVIDIA-H100-80GB-HBM3", "\x00"]
    ),
    st.text(max_size=12),
)
VALUES = st.recursive(
    NASTY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
JOBS = [example(p.name) for p in sorted(EXAMPLES.glob("*.yaml"))]
CLUSTER_DOCS = [yaml.safe_load(p.read_text()) for p in sorted(CLUSTERS.glob("*.yaml"))]
NAMES_A_FIELD = re.compile(r"^(\S+|[^:\n]+): ")
PROPERTY = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, docs: list[Any]) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(docs)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(doc)))
        if not path:
            doc = draw(VALUES)
            continue
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) or not isinstance(parent, dict):
                parent[path[-1]] = draw(VALUES)
            else:
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            pass
    return doc


@PROPERTY
@given(mutated(JOBS))
def test_property_api_check_names_every_problem(doc):
    _, problems = check(doc)
    for problem in problems:
        assert problem.path or not isinstance(doc, dict) or problem.message.startswith("must be a mapping")


@PROPERTY
@given(mutated(CLUSTER_DOCS))
def test_property_nodes_are_read_or_refused_with_a_path(doc):
    try:
        nodes = nodes_in(doc)
    except NodeError as err:
        assert err.path or "expected a List of Nodes" in err.message
        return
    inv = pools_from_nodes(nodes)
    for pool in inv.pools:
        assert pool.gpus_per_node >= 1 and pool.memory_mib >= 0 and pool.nvlink_domain >= 1
    for raw in doc["items"] if isinstance(doc, dict) and isinstance(doc.get("items"), list) else []:
        parse_node(raw)  # what nodes_in accepted, one by one


@settings(PROPERTY, max_examples=30)
@given(cluster=mutated(CLUSTER_DOCS), job=mutated([example(FINETUNE)]), command=st.sampled_from(["plan", "render"]))
def test_property_cli_exits_0_1_or_2_with_named_problems(tmp_path_factory, cluster, job, command):
    tmp = tmp_path_factory.mktemp("cli")
    files = [write(tmp, "job.yaml", yaml.safe_dump(job)), write(tmp, "cluster.yaml", yaml.safe_dump(cluster))]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([command, files[0], "--cluster", files[1], "--offline"])
    assert code in (0, 1, 2)
    for line in err.getvalue().splitlines():
        file = next(f for f in files if line.startswith(f))
        rest = re.sub(r"^(#\d+)?( \([^)]*\))?: ", "", line[len(file) :])
        assert (
            NAMES_A_FIELD.match(rest)
            or "line " in rest
            or rest.startswith(("expected exactly one FineTuneJob", "nothing to render", "holds no YAML document"))
            or rest.startswith(("must be a mapping (a Kubernetes object)", "expected a List of Nodes"))
        ), line


YAML_NOISE = st.text(alphabet="[]{}:&*!|>-'\"\t\n#%@`,? ab1<", max_size=8)


@settings(PROPERTY, max_examples=150)
@given(
    text=st.sampled_from([p.read_text() for p in sorted(EXAMPLES.rglob("*.yaml"))]),
    where=st.floats(0, 1),
    noise=YAML_NOISE,
    cut=st.integers(0, 20),
)
def test_property_yaml_text_is_read_or_refused_with_a_line(tmp_path_factory, text, where, noise, cut):
    i = int(where * len(text))
    path = Path(write(tmp_path_factory.mktemp("yaml"), "x.yaml", text[:i] + noise + text[i + cut :]))
    docs, error = read_documents(path)
    assert (docs and error is None) or (
        not docs and error is not None and "\n" not in error and ("line " in error or error == "holds no YAML document")
    ), error
