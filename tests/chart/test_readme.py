"""charts/kubeforge/README.md stays in sync with values.yaml, the values schema and the operator's images."""

from __future__ import annotations

import json
import re

import yaml

from kubeforge.render import images
from tests.chart.values_table import CHART, documented, readme_table, table, undocumented

VALUES = (CHART / "values.yaml").read_text()
README = (CHART / "README.md").read_text()


def test_the_values_table_is_generated_from_values_yaml():
    assert readme_table(README) == table(VALUES), "run `python -m tests.chart.values_table --write`"


def test_every_value_is_documented():
    assert undocumented(VALUES) == []
    docs = documented(VALUES)
    assert all(docs.values()), [k for k, v in docs.items() if not v]


def test_the_table_catches_a_difference():
    changed = VALUES.replace("replicas: 2", "replicas: 3")
    assert table(changed) != table(VALUES)
    dropped = VALUES.replace("# -- Priority class of the operator's pods.\n", "")
    assert undocumented(dropped) == ["priorityClassName"]


def test_the_schema_and_values_yaml_name_the_same_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load(VALUES)
    assert list(schema["properties"]) == list(values)
    for key, prop in schema["properties"].items():
        if "properties" in prop and isinstance(values[key], dict) and prop.get("additionalProperties") is False:
            assert set(values[key]) <= set(prop["properties"]), key


def test_the_images_section_shows_the_operators_defaults():
    section = README.split("\n## Images\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `images\.(\w+)` \| [^|]+ \| (.+) \|$", section, re.M))
    assert set(rows) == set(images.NAMES)
    for name in images.NAMES:
        expected = "the trainer image" if name == "fetcher" else f"`{getattr(images.DEFAULTS, name)}`"
        assert rows[name] == expected, name
