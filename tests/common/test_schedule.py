"""Tests for common.schedule: graph maintenance of paper section 4.3, Figure 4."""

import json
import zlib

import pytest

from common.schedule import GraphMaintenance, Plan, periodic_turn


def _run(maintenance, rounds):
    """Feed {round: {node: local mAP or None}} (None: present without a report); return {round: Plan}."""
    plans = {}
    for rnd, reports in rounds.items():
        local = {n: v for n, v in reports.items() if v is not None}
        plans[rnd] = maintenance.plan(rnd, list(reports), local)
    return plans


def test_first_round_evaluates_everyone():
    """Paper 4.3 Fig. 4 (b): on round 1 every node is new; b's periodic turn (crc32 % 5 = 1) is round 1 too."""
    # Prepare: crc32(b"a") % 5 = 2, crc32(b"b") % 5 = 1
    m = GraphMaintenance(t_cycle=5, delta_down=0.05, patience=2)
    # Execute
    plan = m.plan(1, ["a", "b"], {"a": 0.5, "b": 0.4})
    # Assert
    assert plan.reasons == {"a": ("new",), "b": ("new", "periodic")}
    assert plan.evaluate == {"a", "b"} and plan.dropped == frozenset()


def test_periodic_turn_is_crc32_modulo_t_cycle():
    """The periodic share's hash, hand-computed: crc32(b"a") = 3904355907, crc32(b"b") = 1908338681."""
    assert [periodic_turn("a", t) for t in (1, 3, 4, 100)] == [0, 0, 3, 7]
    assert [periodic_turn("b", t) for t in (1, 3, 4, 100)] == [0, 2, 1, 81]
    assert periodic_turn(7, 5) == zlib.crc32(b"7") % 5


def test_periodic_recalculation_is_spread_over_t_cycle_rounds():
    """Paper 4.3 Fig. 4 (a), spread: t_cycle = 3 -> a on rounds 3, 6 (turn 0), b on rounds 2, 5, 8 (turn 2)."""
    # Prepare: stable nodes, stable local mAP
    m = GraphMaintenance(t_cycle=3, delta_down=0.05, patience=2)
    # Execute
    plans = _run(m, {r: {"a": 0.5, "b": 0.5} for r in range(1, 9)})
    # Assert
    assert {r: p.reasons for r, p in plans.items() if r > 1} == {
        2: {"b": ("periodic",)}, 3: {"a": ("periodic",)}, 4: {}, 5: {"b": ("periodic",)}, 6: {"a": ("periodic",)},
        7: {}, 8: {"b": ("periodic",)}}


def test_periodic_share_refreshes_every_node_once_per_cycle_in_even_parts():
    """400 nodes, t_cycle 4: rounds 5-8 refresh each node exactly once, about a quarter per round."""
    nodes = [f"site-{k}" for k in range(400)]
    m = GraphMaintenance(t_cycle=4, delta_down=0.0, patience=1)
    plans = _run(m, {r: dict.fromkeys(nodes) for r in range(1, 9)})
    refreshed = [n for r in (5, 6, 7, 8) for n in plans[r].reasons]
    assert sorted(refreshed) == sorted(nodes)
    assert all(70 <= len(plans[r].reasons) <= 130 for r in (5, 6, 7, 8))
    every = _run(GraphMaintenance(t_cycle=1, delta_down=0.0, patience=1), {r: {"a": 0.5} for r in (1, 2, 3)})
    assert [p.reasons for p in every.values()] == [{"a": ("new", "periodic")}, {"a": ("periodic",)},
                                                   {"a": ("periodic",)}]


def test_new_node_is_evaluated_at_once_alone():
    """Paper 4.3 Fig. 4 (b) new-node trigger: a node never seen before is evaluated and inserted immediately."""
    # Prepare
    m = GraphMaintenance(t_cycle=10, delta_down=0.05, patience=2)
    m.plan(1, ["a", "b"], {})
    # Execute
    plan = m.plan(2, ["a", "b", "c"], {"c": 0.3})
    # Assert
    assert plan.reasons == {"c": ("new",)}


def test_degradation_uses_only_earlier_rounds_in_the_mean():
    """Paper 4.3 Fig. 4 (b) degradation: the current mAP is compared with the mean of the *earlier* ones."""
    # Prepare: patience 1, delta 0.05. Round 2: 0.5 < mean(0.6) - 0.05 = 0.55 -> degraded.
    # (Were round 2 in its own mean: mean(0.6, 0.5) - 0.05 = 0.5, and 0.5 < 0.5 would be False.)
    m = GraphMaintenance(t_cycle=100, delta_down=0.05, patience=1)
    # Execute
    plans = _run(m, {1: {"a": 0.6, "b": 0.6}, 2: {"a": 0.5, "b": 0.6}})
    # Assert: only a, only for degradation
    assert plans[2].reasons == {"a": ("degraded",)}


def test_degradation_needs_patience_and_resets_after_a_trigger():
    """Paper 4.3 Fig. 4 (b): below mean - delta_down for `patience` consecutive rounds; the streak restarts after."""
    # Prepare: patience 2, delta 0.05, a reports 0.8, 0.8, 0.5, 0.5, 0.5, 0.5
    # r3: 0.5 < 0.8 - 0.05             -> streak 1
    # r4: 0.5 < 2.1/3 - 0.05 = 0.65    -> streak 2 -> trigger, reset to 0
    # r5: 0.5 < 2.6/4 - 0.05 = 0.60    -> streak 1 (without the reset it would trigger again)
    # r6: 0.5 < 3.1/5 - 0.05 = 0.57    -> streak 2 -> trigger
    m = GraphMaintenance(t_cycle=100, delta_down=0.05, patience=2)
    values = [0.8, 0.8, 0.5, 0.5, 0.5, 0.5]
    # Execute
    plans = _run(m, {r: {"a": v} for r, v in enumerate(values, start=1)})
    # Assert
    assert [r for r, p in plans.items() if "degraded" in p.reasons.get("a", ())] == [4, 6]


def test_recovery_breaks_the_streak():
    """Paper 4.3 Fig. 4 (b) "consecutive": one good round resets the count."""
    # 0.8, 0.8, 0.5 (streak 1), 0.8 (streak 0), 0.5: 0.5 < 2.9/4 - 0.05 = 0.675 -> streak 1 only
    m = GraphMaintenance(t_cycle=100, delta_down=0.05, patience=2)
    plans = _run(m, {r: {"a": v} for r, v in enumerate([0.8, 0.8, 0.5, 0.8, 0.5], start=1)})
    assert all("degraded" not in p.reasons.get("a", ()) for p in plans.values())


def test_missing_report_keeps_the_streak():
    """Paper 4.3 Fig. 4 (b): a round without a local mAP neither counts nor breaks the streak."""
    # 0.8, 0.8, 0.5 (streak 1), no report, 0.5: 0.5 < 2.1/3 - 0.05 = 0.65 -> streak 2 -> trigger at round 5
    m = GraphMaintenance(t_cycle=100, delta_down=0.05, patience=2)
    plans = _run(m, {1: {"a": 0.8}, 2: {"a": 0.8}, 3: {"a": 0.5}, 4: {"a": None}, 5: {"a": 0.5}})
    assert plans[4].reasons == {}
    assert plans[5].reasons == {"a": ("degraded",)}


def test_periodic_and_degraded_in_the_same_round():
    """Paper 4.3 Fig. 4 (a)+(b): the GraphMaintenance docstring example; both reasons are reported."""
    # t_cycle 3, a's turn is 0 (rounds 3, 6); local mAP 0.6, 0.6, 0.5 (streak 1), 0.5 < 1.7/3 - 0.05 (streak 2:
    # degraded, reset), 0.4 < 0.55 - 0.05 (streak 1), 0.4 < 2.6/5 - 0.05 = 0.47 (streak 2)
    m = GraphMaintenance(t_cycle=3, delta_down=0.05, patience=2)
    plans = _run(m, {r: {"a": v} for r, v in enumerate([0.6, 0.6, 0.5, 0.5, 0.4, 0.4], start=1)})
    assert [p.reasons for p in plans.values()] == [
        {"a": ("new",)}, {}, {"a": ("periodic",)}, {"a": ("degraded",)}, {}, {"a": ("periodic", "degraded")}]


def test_leaving_node_is_dropped_and_returning_node_is_reevaluated():
    """Paper 4.3 Fig. 4 dynamic membership: absent nodes leave the graph; a returning one is re-evaluated."""
    # Prepare
    m = GraphMaintenance(t_cycle=100, delta_down=0.05, patience=2)
    m.plan(1, ["a", "b"], {"a": 0.5, "b": 0.7})
    # Execute
    left = m.plan(2, ["a"], {"a": 0.5})
    away = m.plan(3, ["a"], {"a": 0.5})
    back = m.plan(4, ["a", "b"], {"a": 0.5, "b": 0.7})
    # Assert: dropped once, history remembered (2 reports for b: rounds 1 and 4)
    assert left.dropped == {"b"} and left.evaluate == frozenset()
    assert away.dropped == frozenset() and away.evaluate == frozenset()
    assert back.reasons == {"b": ("returned",)}
    b_state = next(r for r in m.state_dict()["nodes"] if r["id"] == "b")
    assert b_state["map_count"] == 2 and b_state["active"]


def test_an_idle_node_is_neither_dropped_nor_evaluated_and_trains_on_without_being_returned():
    """A node left out of a sampled round (idle) stays in the graph: not dropped, not scored (its model has not
    changed), even on its periodic turn; when it trains again it is not "returned"."""
    m = GraphMaintenance(t_cycle=1, delta_down=0.05, patience=2)  # t_cycle 1: every node's turn is every round
    m.plan(1, ["a", "b"], {"a": 0.5, "b": 0.7})

    idle = m.plan(2, ["a"], {"a": 0.5}, idle_nodes=["b"])
    again = m.plan(3, ["b"], {"b": 0.7}, idle_nodes=["a"])

    assert idle.dropped == frozenset() and idle.reasons == {"a": ("periodic",)}
    assert again.dropped == frozenset() and again.reasons == {"b": ("periodic",)}


def test_state_dict_round_trip_resumes_identically():
    """Paper 4.3 Fig. 4 as a continuous process: a server killed after round 3 resumes with the same plans."""
    # Prepare: node b joins late, a degrades; values chosen so that several triggers fire
    rounds = {
        1: {"a": 0.8, "b": None},
        2: {"a": 0.8, "b": 0.6},
        3: {"a": 0.5, "c": 0.4},
        4: {"a": 0.5, "b": 0.6, "c": 0.4},
        5: {"a": 0.5, "b": 0.6},
        6: {"a": 0.4, "b": 0.6, "c": 0.4},
    }
    reference = _run(GraphMaintenance(t_cycle=4, delta_down=0.05, patience=2), rounds)
    first = GraphMaintenance(t_cycle=4, delta_down=0.05, patience=2)
    _run(first, {r: rounds[r] for r in (1, 2, 3)})
    # Execute: through JSON, as a server would save it
    resumed = GraphMaintenance.from_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = _run(resumed, {r: rounds[r] for r in (4, 5, 6)})
    # Assert
    assert rest == {r: reference[r] for r in (4, 5, 6)}
    assert resumed.state_dict() == json.loads(json.dumps(resumed.state_dict()))
    assert reference[4] == Plan(4, {"a": ("degraded",), "b": ("returned",)}, dropped=frozenset())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t_cycle": 0}, "t_cycle.*0"),
        ({"t_cycle": 1.5}, "t_cycle.*1.5"),
        ({"delta_down": -0.1}, "delta_down.*-0.1"),
        ({"patience": 0}, "patience.*0"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, message):
    """Paper 4.3 Fig. 4 parameters (T_cycle, delta_down, patience) are validated, naming the value."""
    with pytest.raises(ValueError, match=message):
        GraphMaintenance(**{"t_cycle": 3, "delta_down": 0.05, "patience": 2, **kwargs})


def test_plan_rejects_bad_calls():
    """Paper 4.3 Fig. 4: rounds must advance; local mAP must be finite and for present nodes."""
    m = GraphMaintenance(t_cycle=3, delta_down=0.05, patience=2)
    m.plan(2, ["a"], {"a": 0.5})
    with pytest.raises(ValueError, match="got 2 after 2"):
        m.plan(2, ["a"], {})
    with pytest.raises(ValueError, match="'z'"):
        m.plan(3, ["a"], {"z": 0.5})
    with pytest.raises(ValueError, match="nan"):
        m.plan(3, ["a"], {"a": float("nan")})
