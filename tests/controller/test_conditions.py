from __future__ import annotations

from kubeforge.controller.conditions import condition, find, set_condition


def test_append_then_replace_keeps_transition_time_while_status_holds():
    first = condition("Accepted", "True", "SpecValid", "ok", 1, "2026-01-01T00:00:00Z")
    conds = set_condition([], first)
    assert conds == [first]
    same = condition("Accepted", "True", "SpecValid", "still ok", 2, "2026-01-02T00:00:00Z")
    conds = set_condition(conds, same)
    assert conds[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert conds[0]["message"] == "still ok" and conds[0]["observedGeneration"] == 2
    flipped = condition("Accepted", "False", "InvalidSpec", "bad", 3, "2026-01-03T00:00:00Z")
    conds = set_condition(conds, flipped)
    assert conds[0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"


def test_other_conditions_are_kept_in_order():
    a = condition("Accepted", "True", "SpecValid", "", 1, "t1")
    b = condition("Planned", "False", "Infeasible", "", 1, "t1")
    conds = set_condition(set_condition([], a), b)
    conds = set_condition(conds, condition("Accepted", "False", "InvalidSpec", "x", 2, "t2"))
    assert [c["type"] for c in conds] == ["Accepted", "Planned"]
    assert find(conds, "Planned") == b and find(conds, "Running") is None


def test_long_messages_are_cut_to_the_api_limit():
    c = condition("Accepted", "False", "InvalidSpec", "x" * 40000, None, "t")
    assert len(c["message"]) == 32768 and "observedGeneration" not in c
