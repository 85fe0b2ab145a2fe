"""KUBEFORGE_LOG_FORMAT=json: the runtime's and the operator's log lines parse as JSON, one object per line."""

from __future__ import annotations

import json
import logging

import pytest

from kubeforge.runtime import logs
from kubeforge.runtime.contract import ENV_LOG_FORMAT


@pytest.fixture
def bare_root():
    """A root logger without handlers (basicConfig's precondition), as in a fresh process; restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def strip() -> None:  # inside the test: pytest adds its capture handlers after fixtures are set up
        root.handlers[:] = []

    yield strip
    root.handlers[:] = handlers
    root.setLevel(level)


def test_runtime_lines_are_json_objects(capsys, bare_root):
    bare_root()
    logs.configure(logging.INFO, "%(message)s", rank=3, env={ENV_LOG_FORMAT: "json"})
    log = logging.getLogger("kubeforge.train")
    log.info("step %d/%d loss %.4f", 5, 30, 2.5)
    try:
        raise ValueError("bad row")
    except ValueError:
        log.exception('data: "quoted" and ünïcode')
    lines = capsys.readouterr().err.strip().splitlines()
    first = json.loads(lines[0])
    assert first["message"] == "step 5/30 loss 2.5000" and first["level"] == "INFO"
    assert first["logger"] == "kubeforge.train" and first["rank"] == 3 and first["time"].endswith("+00:00")
    second = json.loads("\n".join(lines[1:]))  # one object, the traceback inside it
    assert second["message"] == 'data: "quoted" and ünïcode' and "ValueError: bad row" in second["exception"]
    assert len(lines) == 2  # json.dumps escapes the traceback's newlines: still one line


@pytest.mark.parametrize("value", ["", "text", "yaml"])
def test_text_unless_json_is_asked_for(capsys, bare_root, value):
    bare_root()
    logs.configure(logging.INFO, "plain %(message)s", env={ENV_LOG_FORMAT: value})
    logging.getLogger("kubeforge").info("hello")
    assert capsys.readouterr().err == "plain hello\n"


def test_the_operator_logs_json_through_kopf(monkeypatch, capsys, bare_root):
    import kubeforge.controller.__main__ as operator_main

    ran = []
    monkeypatch.setattr(operator_main.asyncio, "run", lambda coro: ran.append(coro.close()) or 0)
    monkeypatch.setenv(ENV_LOG_FORMAT, "json")
    assert operator_main.main([]) == 0 and ran
    capsys.readouterr()
    logging.getLogger("kopf.objects").info("reconciled", extra={"k8s_ref": {"namespace": "team-a", "name": "bot"}})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "reconciled" and line["object"] == {"namespace": "team-a", "name": "bot"}
    assert operator_main.main(["--log-format", "text"]) == 0
    logging.getLogger("kopf.objects").info("plain again", extra={"k8s_ref": {"namespace": "team-a", "name": "bot"}})
    out = capsys.readouterr().err.strip().splitlines()[-1]
    assert out.endswith("plain again") and not out.startswith("{")


def test_the_charts_log_format_reaches_the_operator():
    from tests.chart.charting import operator_container, render

    assert "--log-format=text" in operator_container(render())["args"]
    assert "--log-format=json" in operator_container(render({"logFormat": "json"}))["args"]


def test_the_values_schema_refuses_an_unknown_log_format():
    import helm_python as helm

    from tests.chart.charting import CHART

    with pytest.raises(Exception, match="logFormat"):
        helm.Chart.load(str(CHART)).validate_schema({"logFormat": "yaml"})
