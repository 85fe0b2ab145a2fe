"""The Argo CD health checks (charts/kubeforge/argocd/*.lua), run in a real Lua 5.1 runtime, and kstatus' rules.

The statuses are the ones the operator's decide functions write for every phase of every kind
(tests/controller/scenarios.py). The Lua runs the way Argo CD runs it: gopher-lua is Lua 5.1, the
object is the global ``obj``, the script's return value is the health, and only the base and table
libraries are open (resource.customizations.useOpenLibs is off by default), so a script that
reaches for ``string`` or a string method fails here as it would there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from lupa import lua51

from kubeforge.api.kinds import GROUP, KINDS
from tests.controller.scenarios import scenarios

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeforge"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
SCENARIOS = scenarios()

H, P, D, S = "Healthy", "Progressing", "Degraded", "Suspended"
# (kind, scenario) -> Argo CD health; kstatus follows from it (EXPECTED_KSTATUS)
HEALTH = {
    ("FineTuneJob", "infeasible"): D,
    ("FineTuneJob", "architecture-unknown"): D,
    ("FineTuneJob", "invalid-spec"): D,
    ("FineTuneJob", "creating"): P,
    ("FineTuneJob", "queued"): S,
    ("FineTuneJob", "pods-pending"): P,
    ("FineTuneJob", "running"): P,
    ("FineTuneJob", "immutable-field-changed"): D,
    ("FineTuneJob", "succeeded"): H,
    ("FineTuneJob", "succeeded-without-artifact"): D,
    ("FineTuneJob", "failed"): D,
    ("QuantizeJob", "waiting-for-source"): P,
    ("QuantizeJob", "source-failed"): D,
    ("QuantizeJob", "invalid-spec"): D,
    ("QuantizeJob", "creating"): P,
    ("QuantizeJob", "pod-pending"): P,
    ("QuantizeJob", "running"): P,
    ("QuantizeJob", "succeeded"): H,
    ("QuantizeJob", "succeeded-without-artifact"): D,
    ("QuantizeJob", "failed"): D,
    ("ModelService", "waiting-for-source"): P,
    ("ModelService", "source-failed"): D,
    ("ModelService", "invalid-spec"): D,
    ("ModelService", "infeasible"): D,
    ("ModelService", "deploying"): P,
    ("ModelService", "no-replica-ready"): P,
    ("ModelService", "ready"): H,
    ("ModelService", "applying-new-artifact"): P,
    ("ModelService", "rolling-out"): P,
    ("ModelService", "waiting-for-new-source"): P,
    ("ModelService", "serving-but-source-failed"): D,
    ("ModelService", "serving-but-infeasible"): D,
}
EXPECTED_KSTATUS = {H: "Current", P: "InProgress", S: "InProgress", D: "Failed"}


def script(kind: str) -> str:
    return (CHART / "argocd" / f"health-{kind.lower()}.lua").read_text()


def _to_lua(runtime: Any, value: Any) -> Any:
    """JSON as gopher-lua decodes it for Argo CD: objects and arrays become tables (arrays 1-based), null nil."""
    if isinstance(value, Mapping):
        table = runtime.table()
        for k, v in value.items():
            if v is not None:
                table[k] = _to_lua(runtime, v)
        return table
    if isinstance(value, list | tuple):
        return runtime.table(*[_to_lua(runtime, v) for v in value])
    return value


def argo_health(kind: str, obj: Mapping[str, Any]) -> dict[str, str]:
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    assert runtime.lua_version == (5, 1)
    # Argo CD opens only the base, package and table libraries (and a safe os.time/os.date):
    # no string library, so strings have no methods either.
    runtime.execute(
        'debug.setmetatable("", nil); '
        "string, io, debug, math, coroutine, os, load, loadstring, dofile, loadfile, require = nil"
    )
    runtime.globals().obj = _to_lua(runtime, obj)
    result = runtime.execute(script(kind))
    assert result is not None and lua51.lua_type(result) == "table", f"{kind}: the script must return a table"
    hs = dict(result.items())
    assert set(hs) <= {"status", "message"} and hs["status"] in ARGO_STATUSES, hs
    return {"status": hs["status"], "message": hs.get("message", "")}


def kstatus(obj: Mapping[str, Any], ready_fallback: bool = True) -> str:
    """sigs.k8s.io/cli-utils/pkg/kstatus status.Compute for a custom resource (no type-specific rules).

    Deletion -> Terminating; metadata.generation != status.observedGeneration -> InProgress; the
    first of Reconciling=True (InProgress) and Stalled=True (Failed); else Current. With
    ``ready_fallback`` (fluxcd's fork and later releases) a Ready condition decides last: True is
    Current, anything else InProgress.
    """
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress"
    for c in status.get("conditions") or []:
        if c.get("type") == "Reconciling" and c.get("status") == "True":
            return "InProgress"
        if c.get("type") == "Stalled" and c.get("status") == "True":
            return "Failed"
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready_fallback and ready is not None:
        return "Current" if ready.get("status") == "True" else "InProgress"
    return "Current"


def test_every_scenario_has_an_expected_health():
    assert set(HEALTH) == set(SCENARIOS)


@pytest.mark.parametrize("key", list(HEALTH), ids="/".join)
def test_argo_health_of_what_the_operator_writes(key):
    kind, _ = key
    obj = SCENARIOS[key]
    hs = argo_health(kind, obj)
    assert hs["status"] == HEALTH[key], hs
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    if hs["status"] == H:
        assert hs["message"].startswith(ready["reason"])
    else:  # names why: the abnormal condition's reason, as the Ready column does
        assert hs["message"].startswith(ready["reason"] if ready["status"] == "False" else "")
        assert hs["message"]


@pytest.mark.parametrize("key", list(HEALTH), ids="/".join)
def test_kstatus_agrees_with_argo(key):
    obj = SCENARIOS[key]
    assert kstatus(obj) == EXPECTED_KSTATUS[HEALTH[key]]
    # Ready=False always comes with Reconciling or Stalled, so kstatus without the Ready fallback agrees
    assert kstatus(obj, ready_fallback=False) == kstatus(obj)


@pytest.mark.parametrize("key", list(HEALTH), ids="/".join)
def test_a_generation_not_yet_observed_is_progressing(key):
    kind, _ = key
    obj = copy.deepcopy(SCENARIOS[key])
    obj["metadata"]["generation"] += 1  # the user changed the spec; the operator has not acted on it
    assert argo_health(kind, obj)["status"] == P
    assert kstatus(obj) == "InProgress"


def test_a_failed_job_is_degraded_never_healthy():
    failed = [key for key, obj in SCENARIOS.items() if obj["status"]["phase"] == "Failed"]
    assert {k for k, _ in failed} == {k.kind for k in KINDS}
    for key in failed:
        assert argo_health(key[0], SCENARIOS[key])["status"] == D
        assert kstatus(SCENARIOS[key]) == "Failed"
    assert kstatus(SCENARIOS["FineTuneJob", "succeeded"]) == "Current"
    assert kstatus(SCENARIOS["QuantizeJob", "succeeded"]) == "Current"


@pytest.mark.parametrize("kind", [k.kind for k in KINDS])
def test_no_status_yet_and_no_generation(kind):
    obj = {"apiVersion": f"{GROUP}/v1alpha1", "kind": kind, "metadata": {"name": "x", "generation": 1}}
    assert argo_health(kind, obj) == {"status": P, "message": "NoStatus: waiting for the kubeforge operator"}
    emulated = copy.deepcopy(SCENARIOS[kind, "invalid-spec"])  # an API server that sets no generation
    del emulated["metadata"]["generation"]
    emulated["status"]["observedGeneration"] = None
    assert argo_health(kind, emulated)["status"] == D


@pytest.mark.parametrize(
    ("kind", "phase", "health"),
    [
        ("FineTuneJob", "Succeeded", H),
        ("FineTuneJob", "Failed", D),
        ("FineTuneJob", "Running", P),
        ("QuantizeJob", "Succeeded", H),
        ("QuantizeJob", "Failed", D),
        ("QuantizeJob", "Waiting", P),
        ("ModelService", "Ready", H),
        ("ModelService", "Failed", D),
        ("ModelService", "Deploying", P),
    ],
)
def test_a_status_from_before_the_ready_condition_falls_back_on_the_phase(kind, phase, health):
    obj = {"kind": kind, "metadata": {"generation": 2}, "status": {"phase": phase, "observedGeneration": 2}}
    assert argo_health(kind, obj) == {"status": health, "message": phase}


def test_the_scripts_use_only_what_argo_cd_opens():
    obj = SCENARIOS["FineTuneJob", "failed"]
    for kind in (k.kind for k in KINDS):
        assert "string." not in script(kind) and ":format" not in script(kind)
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    runtime.execute('debug.setmetatable("", nil); string = nil')
    with pytest.raises(lua51.LuaError):  # the sandbox above does bite
        runtime.execute('return ("x"):upper()')
    assert argo_health("FineTuneJob", obj)["status"] == D


def test_one_script_per_kind_and_the_readme_says_where_each_goes():
    readme = (CHART / "README.md").read_text()
    assert sorted(p.name for p in (CHART / "argocd").glob("*.lua")) == sorted(
        f"health-{k.kind.lower()}.lua" for k in KINDS
    )
    for kind in KINDS:
        assert f"resource.customizations.health.{GROUP}_{kind.kind}" in readme
        assert f"argocd/health-{kind.kind.lower()}.lua" in readme
    helmignore = (CHART / ".helmignore").read_text() if (CHART / ".helmignore").exists() else ""
    assert "argocd" not in helmignore and "*.lua" not in helmignore  # packaged with the chart
