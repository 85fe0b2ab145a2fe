"""scripts/dashboard_picture.py's pure parts on the chart's dashboard, without Prometheus, matplotlib or a network:
the gridPos layout, Grafana's variables replaced so that every expression still parses as PromQL (with the
parser tests/chart/test_dashboard.py uses), the legends and the no-data reasons."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import promql_parser
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("dashboard_picture", ROOT / "scripts" / "dashboard_picture.py")
assert SPEC and SPEC.loader
picture = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(picture)
DASHBOARD = json.loads(picture.DASHBOARD.read_text())


def test_the_script_reads_the_charts_dashboard():
    assert picture.DASHBOARD == ROOT / "charts" / "kubeforge" / "dashboards" / "kubeforge.json"
    assert picture.OUT == ROOT / "docs" / "dashboard.png"


def test_every_panel_gets_a_rectangle_inside_the_figure_and_none_overlap():
    placed = picture.layout(DASHBOARD)
    assert {p["id"] for p, _ in placed} == {p["id"] for p in picture.panels(DASHBOARD)}
    for panel, (left, bottom, width, height) in placed:
        assert width > 0 and height > 0, panel["title"]
        assert left >= 0 and left + width <= 1 + 1e-9, panel["title"]
        assert bottom >= 0 and bottom + height <= 1 + 1e-9, panel["title"]
    for (a, ra), (b, rb) in itertools.combinations(placed, 2):
        overlap_x = min(ra[0] + ra[2], rb[0] + rb[2]) - max(ra[0], rb[0])
        overlap_y = min(ra[1] + ra[3], rb[1] + rb[3]) - max(ra[1], rb[1])
        assert overlap_x <= 1e-9 or overlap_y <= 1e-9, (a["title"], b["title"])


def test_the_layout_follows_the_24_column_grid():
    rows = picture.grid_rows(DASHBOARD)
    for panel, (left, bottom, width, height) in picture.layout(DASHBOARD):
        g = panel["gridPos"]
        assert left * 24 == pytest.approx(g["x"]) and width * 24 == pytest.approx(g["w"])
        assert height * rows == pytest.approx(g["h"])
        assert (1 - bottom - height) * rows == pytest.approx(g["y"])  # y grows downwards


@pytest.mark.parametrize("step", [1, 2, 15, 60])
def test_every_expression_parses_after_substitution(step: float):
    variables = picture.grafana_variables(DASHBOARD, step)
    exprs = [t["expr"] for p in picture.panels(DASHBOARD) for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        promql_parser.parse(picture.substitute(expr, variables))  # raises ValueError on bad PromQL


def test_grafana_variables_are_what_grafana_would_send():
    v = picture.grafana_variables(DASHBOARD, 2, scrape_seconds=2)
    assert v["__rate_interval"] == "8s" and v["__interval"] == "2s"  # max(interval + scrape, 4 x scrape)
    assert picture.grafana_variables(DASHBOARD, 60, scrape_seconds=2)["__rate_interval"] == "62s"
    assert v["namespace"] == ".*" and "datasource" not in v


def test_substitution_handles_both_spellings_and_refuses_leftovers():
    variables = {"namespace": "team-a", "__rate_interval": "8s", "__interval": "2s"}
    assert picture.substitute('x{ns=~"$namespace"}[$__rate_interval]', variables) == 'x{ns=~"team-a"}[8s]'
    assert picture.substitute('x{ns=~"${namespace}"}', variables) == 'x{ns=~"team-a"}'
    with pytest.raises(ValueError):
        picture.substitute('x{a=~"$unknown"}', variables)


def test_legends_and_no_data_reasons():
    assert picture.legend("{{namespace}}/{{job_name}}", {"namespace": "team-a", "job_name": "j"}) == "team-a/j"
    assert picture.legend("{{kind}} {{phase}}", {"kind": "FineTuneJob"}) == "FineTuneJob"
    serving = [p for p in picture.panels(DASHBOARD) if any("vllm:" in t["expr"] for t in p.get("targets", []))]
    assert serving
    for panel in serving:
        assert "vLLM/SGLang" in picture.no_data_reason([t["expr"] for t in panel["targets"]])
    assert "raised" in picture.no_data_reason(["sum(rate(kubeforge_reconcile_errors_total[8s]))"])


def test_the_prometheus_config_scrapes_the_operator_and_the_trainers(tmp_path: Path):
    config = json.loads(picture.prometheus_config(9102, tmp_path / "t.json"))
    assert config["global"]["scrape_interval"] == f"{picture.SCRAPE_SECONDS}s"
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert jobs["kubeforge-operator"]["static_configs"][0]["targets"] == ["127.0.0.1:9102"]
    assert jobs["kubeforge-trainers"]["file_sd_configs"][0]["files"] == [str(tmp_path / "t.json")]


def test_the_picture_in_docs_is_small_enough():
    png = ROOT / "docs" / "dashboard.png"
    if not png.exists():
        pytest.skip("docs/dashboard.png not generated yet")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 400 * 1024
