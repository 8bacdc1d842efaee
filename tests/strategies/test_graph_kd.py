"""Tests for strategies.graph_kd: maintenance-driven evaluation, teachers, per-student KD messages.

The paper's section 4.3: top-rho teachers by in-strength teach their student neighbours
with weights renormalised from the one-hop-normalised arc weights. Round r's graph comes
from the profiles round r - 1 measured, and the students distil inside round r's local
training (one message per node). Fake grid, real ``flwr.app.Message`` objects, no torch:
milliseconds.
"""

import json
import logging

import networkx as nx
import numpy as np
import pytest
from flwr.app import Message, MessageType

from common import graph as G
from common import protocol as P
from strategies.graph_kd import GraphKDStrategy
from tests.strategies.test_personalized import FakeGrid, _arrays, _content, _run, server_identity  # noqa: F401

NC = 3
# site k: position (k, 0) km, classes {0, 2}; AP vectors chosen so that the graph is not symmetric
AP = {1: [0.5, float("nan"), 0.25], 2: [0.4, float("nan"), 0.3], 3: [0.1, float("nan"), 0.9]}


def _reply(m: Message, kept: list[int] | None = None) -> Message:
    node = m.metadata.dst_node_id
    content = _content(node, _arrays(float(node)))
    if m.content[P.CONFIG].get(P.TEACHER_IDS):
        content[P.METRICS][P.KD_LOSS] = 0.125
        if kept is not None:  # the student-side check's verdict
            content[P.METRICS][P.TEACHERS_KEPT] = kept
    return Message(content, reply_to=m)


def _kd_msgs(grid: FakeGrid, round_index: int) -> list[Message]:
    """The messages of one round that carry teachers."""
    return [m for m in grid.sent[round_index] if m.content[P.CONFIG].get(P.TEACHER_IDS)]


def _site_of(arrays) -> int:
    """The node a reply's weights came from (``_reply`` sends weights [node])."""
    return int(arrays["w"].numpy()[0])


def _strategy(**kw) -> GraphKDStrategy:
    benchmark = lambda arrays: {"map50": 0.1, "ap50": AP[_site_of(arrays)]}  # noqa: E731
    defaults = dict(num_classes=NC, epochs_per_round=1, benchmark_fn=benchmark, mode="graph", rho=0.34,
                    sigma_s_km=5.0, start_round=1)
    return GraphKDStrategy(**{**defaults, **kw})


def _expected_plan(paper_rule: bool = False):
    """The same graph computed directly with common.graph (an independent path through the math)."""
    profiles = {f"site-{k}": {"position": (float(k), 0.0), "classes": [0, 2], "ap": AP[k]} for k in AP}
    g = G.build_graph(profiles, 5.0)
    degree = G.teacher_degree(g)
    teachers = G.select_teachers(degree if paper_rule else G.accuracy_weighted_degree(g), 0.34)
    return teachers, {s: G.teachers_for(g, s, teachers, better_only=not paper_rule)
                      for s in profiles if s not in teachers}


@pytest.mark.parametrize("paper_rule", [False, True])
def test_teacher_rank_and_better_only_follow_config(paper_rule):
    """Default: teachers by in-strength x benchmark mAP, only more accurate ones teach; paper rule: in-strength."""
    grid = FakeGrid([1, 2, 3], reply=_reply)
    kw = dict(teacher_rank="degree", better_only=False) if paper_rule else {}
    strategy = _strategy(**kw)

    _run(strategy, grid, 2)

    teachers, plan = _expected_plan(paper_rule)
    plan = {s: t for s, t in plan.items() if t}  # a student without a (better) teacher sits out
    assert set(strategy.graph_record["teachers"]) == teachers
    assert strategy.graph_record["teachers_for"].keys() == plan.keys()
    for student, mixing in plan.items():
        assert strategy.graph_record["teachers_for"][student] == pytest.approx(mixing)
    assert strategy.graph_record["teacher_rank"] == ("degree" if paper_rule else "map_degree")
    # here site-3 has the best benchmark mAP (0.5 vs 0.375 and 0.35): by default nobody may teach it
    assert len(grid.sent) == 2 and not _kd_msgs(grid, 0)
    assert len(_kd_msgs(grid, 1)) == (1 if paper_rule else 0)


def test_local_scope_lets_every_site_learn_from_the_sites_ranked_above_it():
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(teacher_scope="local", teacher_rank="degree", better_only=False)

    _run(strategy, grid, 2)

    profiles = {f"site-{k}": {"position": (float(k), 0.0), "classes": [0, 2], "ap": AP[k]} for k in AP}
    g = G.build_graph(profiles, 5.0)
    expected = G.local_plan(g, G.teacher_degree(g))
    assert len(expected) == 2  # two of the three sites have someone ranked above them
    assert strategy.graph_record["teacher_scope"] == "local"
    sent = {f"site-{m.metadata.dst_node_id}": dict(zip(m.content[P.CONFIG][P.TEACHER_IDS],
                                                       m.content[P.CONFIG][P.TEACHER_WEIGHTS]))
            for m in _kd_msgs(grid, 1)}
    for plan in (strategy.graph_record["teachers_for"], sent):
        assert plan.keys() == expected.keys()
        for student, mixing in expected.items():
            assert plan[student] == pytest.approx(mixing)


def test_with_fraction_train_the_graph_spans_every_site_and_only_the_sites_in_turn_are_students():
    """The paper's rule on sites 1-3 gives student site-3 the teachers site-1 and site-2 (common.graph). With
    fraction_train 0.3 one site trains per round after round 1: round 2 site-2 (a teacher: no KD), round 3 site-3,
    which distils from both teachers, though neither trains that round, with their last weights."""
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(teacher_rank="degree", better_only=False, fraction_train=0.3)

    _run(strategy, grid, 3)

    _, expected = _expected_plan(paper_rule=True)
    assert [[m.metadata.dst_node_id for m in sent] for sent in grid.sent] == [[1, 2, 3], [2], [3]]
    assert not _kd_msgs(grid, 1)
    (msg,) = _kd_msgs(grid, 2)
    ids = list(msg.content[P.CONFIG][P.TEACHER_IDS])
    assert dict(zip(ids, msg.content[P.CONFIG][P.TEACHER_WEIGHTS])) == pytest.approx(expected["site-3"])
    assert [msg.content[P.teacher_record(i)]["w"].numpy().tolist() for i in range(2)] == [[1.0], [2.0]]
    assert strategy.graph_record["teachers_for"].keys() == {"site-3"}
    assert sorted(n["id"] for n in strategy.graph_record["nodes"]) == ["site-1", "site-2", "site-3"]


def test_bad_teacher_rank_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'best'"):
        _strategy(teacher_rank="best")


def test_round_sends_each_student_its_teachers_and_weights():
    # Prepare: the paper's rule, so that the one student has teachers
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(teacher_rank="degree", better_only=False, epochs_per_round=4)
    seen = []

    # Execute: round 1 trains and profiles every site; round 2's graph picks teachers from those profiles
    seen = [record.replies for record in _run(strategy, grid, 2)]

    # Assert: ceil(0.34 * 3) = 2 teachers, 1 student; its round-2 train message carries both teachers' weights
    teachers, plan = _expected_plan(paper_rule=True)
    assert len(teachers) == 2 and len(plan) == 1
    (student, mixing), = plan.items()
    assert [m.metadata.message_type for m in grid.sent[1]] == [MessageType.TRAIN] * 3
    kd_msg, = _kd_msgs(grid, 1)
    assert kd_msg.metadata.dst_node_id == int(student[-1])
    cfg = kd_msg.content[P.CONFIG]
    assert cfg[P.TEACHER_IDS] == sorted(mixing)
    assert cfg[P.TEACHER_WEIGHTS] == pytest.approx([mixing[t] for t in sorted(mixing)])
    assert sum(cfg[P.TEACHER_WEIGHTS]) == pytest.approx(1.0)
    # distillation inside the round's own local epochs: no extra training for the students
    assert cfg[P.EPOCHS] == 4 and cfg[P.SERVER_ROUND] == 2
    assert cfg[P.KD_ALPHA] == 0.5 and cfg[P.KD_TEMPERATURE] == 1.0 and cfg[P.KD_STUDENT_CHECK] is True
    assert cfg[P.KD_SELECT] == "teacher-better"  # edge peers: only where they know better (kd.select)
    for i, t in enumerate(sorted(mixing)):  # teacher i's record holds teacher i's round-1 weights
        assert kd_msg.content[P.teacher_record(i)]["w"].numpy().tolist() == [float(t[-1])]
    assert kd_msg.content[P.ARRAYS]["w"].numpy().tolist() == [float(student[-1])]  # its own round-1 model
    # one reply per site per round; the student's is marked as a KD reply
    assert [sorted(r.phase for r in replies) for replies in seen] == [["train"] * 3, ["kd", "train", "train"]]
    kd_reply = next(r for r in seen[1] if r.phase == "kd")
    assert kd_reply.site_id == student
    assert kd_reply.metrics[P.KD_LOSS] == 0.125 and kd_reply.metrics["teachers"] == mixing
    assert set(strategy.graph_record["teachers"]) == teachers


@pytest.mark.parametrize("kept", [[1, 0], [0, 0]])
def test_student_check_verdict_is_recorded(kept):
    """The student reports which proposed teachers it kept; dropping them all makes its round plain training."""
    grid = FakeGrid([1, 2, 3], reply=lambda m: _reply(m, kept))
    seen = []

    seen = [record.replies for record in _run(_strategy(teacher_rank="degree", better_only=False), grid, 2)]

    _, plan = _expected_plan(paper_rule=True)
    (student, mixing), = plan.items()
    reply = next(r for r in seen[1] if r.site_id == student)
    ids = sorted(mixing)
    assert reply.metrics["teachers_proposed"] == mixing
    assert reply.metrics["teachers"] == {t: mixing[t] for t, k in zip(ids, kept) if k}
    assert reply.phase == ("kd" if any(kept) else "train")


def test_teacher_degree_in_graph_record_matches_networkx():
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy()

    _run(strategy, grid, 2)

    profiles = {f"site-{k}": {"position": (float(k), 0.0), "classes": [0, 2], "ap": AP[k]} for k in AP}
    g = G.build_graph(profiles, 5.0)
    reference = nx.DiGraph()
    reference.add_weighted_edges_from((g.nodes[i], g.nodes[j], w) for i, j, w in zip(g.src, g.dst, g.weight))
    in_strength = dict(reference.in_degree(weight="weight"))
    recorded = {n["id"]: n["degree"] for n in strategy.graph_record["nodes"]}
    assert recorded == pytest.approx(in_strength)


def test_mode_none_and_before_start_round_send_no_kd():
    for kw in (dict(mode="none"), dict(start_round=5)):
        grid = FakeGrid([1, 2, 3], reply=_reply)
        _run(_strategy(**kw), grid, 2)
        assert len(grid.sent) == 2 and not _kd_msgs(grid, 0) and not _kd_msgs(grid, 1)


def test_naive_mode_all_distils_every_site_from_every_other_uniformly():
    grid = FakeGrid([1, 2, 3], reply=_reply)

    _run(_strategy(mode="all"), grid, 2)

    kd_msgs = _kd_msgs(grid, 1)
    assert len(kd_msgs) == 3
    for m in kd_msgs:
        cfg = m.content[P.CONFIG]
        me = f"site-{m.metadata.dst_node_id}"
        assert me not in cfg[P.TEACHER_IDS] and len(cfg[P.TEACHER_IDS]) == 2
        assert cfg[P.TEACHER_WEIGHTS] == [0.5, 0.5]


def test_cloud_round_makes_the_cloud_model_every_sites_teacher():
    # Prepare: the cloud model is built once, on the first cloud round
    calls = []

    def cloud_fn(server_round):
        calls.append(server_round)
        return _arrays(99.0), "yolo11s"

    grid = FakeGrid([1, 2], reply=_reply)
    strategy = _strategy(mode="none", cloud_rounds=(2,), cloud_fn=cloud_fn)

    # Execute
    _run(strategy, grid, 2)

    # Assert: round 1 trains only; round 2 sends every site the cloud model as its only teacher
    assert len(grid.sent) == 2 and calls == [2] and not _kd_msgs(grid, 0)
    assert len(_kd_msgs(grid, 1)) == 2
    for m in grid.sent[1]:
        cfg = m.content[P.CONFIG]
        assert cfg[P.TEACHER_IDS] == ["cloud"] and cfg[P.TEACHER_ARCHS] == ["yolo11s"]
        assert cfg[P.TEACHER_WEIGHTS] == [1.0]
        assert m.content[P.teacher_record(0)]["w"].numpy().tolist() == [99.0]
        assert cfg[P.KD_SELECT] == "teacher-fg"  # the cloud's soft labels everywhere (kd.cloud-select)


def test_cloud_round_with_graph_mode_mixes_cloud_and_edge_teachers_half_and_half():
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(teacher_rank="degree", better_only=False, cloud_rounds=(2,),
                         cloud_fn=lambda r: (_arrays(99.0), "yolo11s"))

    _run(strategy, grid, 2)

    teachers, plan = _expected_plan(paper_rule=True)
    (student, mixing), = plan.items()
    for m in grid.sent[1]:
        cfg = m.content[P.CONFIG]
        site = f"site-{m.metadata.dst_node_id}"
        expected = {"cloud": 0.5, **{t: w / 2 for t, w in mixing.items()}} if site == student else {"cloud": 1.0}
        assert dict(zip(cfg[P.TEACHER_IDS], cfg[P.TEACHER_WEIGHTS])) == pytest.approx(expected)
        assert sum(cfg[P.TEACHER_WEIGHTS]) == pytest.approx(1.0)
        assert cfg[P.KD_SELECT] == "teacher-fg"  # the cloud among the teachers: kd.cloud-select for the mixture


def test_unknown_selection_rule_is_named():
    with pytest.raises(ValueError, match="select='teacher-worse'"):
        _strategy(cloud_select="teacher-worse")


def test_cloud_rounds_need_a_cloud_model():
    with pytest.raises(ValueError, match="cloud_fn"):
        _strategy(cloud_rounds=(1,))


def test_only_planned_sites_are_evaluated():
    # Prepare: t_cycle = 10 (periodic turns: site-1 9, site-2 1, site-3 9), so round 2 re-evaluates nobody
    evaluated = []

    def evaluate(arrays):
        evaluated.append(f"site-{_site_of(arrays)}")
        return {"map50": 0.1, "ap50": AP[_site_of(arrays)]}

    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(benchmark_fn=evaluate, t_cycle=10, mode="none")

    # Execute
    _run(strategy, grid, 2)

    # Assert
    assert evaluated == ["site-1", "site-2", "site-3"]
    assert {s: p["round"] for s, p in strategy.profiles.items()} == {"site-1": 1, "site-2": 1, "site-3": 1}


def test_state_dict_round_trip_resumes_the_same_plans():
    grid = FakeGrid([1, 2, 3], reply=_reply)
    a = _strategy(t_cycle=2)
    _run(a, grid, 1)
    b = _strategy(t_cycle=2)

    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through state.json

    assert json.dumps(b.profiles) == json.dumps(a.profiles)  # (NaN AP entries: compared as JSON)
    assert b.sites == a.sites and b.completed_round == 1
    present = {"site-1": 0.2, "site-2": 0.2, "site-3": 0.2}
    assert b.maintenance.plan(2, sorted(present), present) == a.maintenance.plan(2, sorted(present), present)


def test_resumed_strategy_continues_at_the_next_round_under_flowers_start():
    # Prepare: a strategy that completed round 1 (its state and weights), restarted with new node ids
    first = _strategy(teacher_rank="degree", better_only=False)
    _run(first, FakeGrid([1, 2, 3], reply=_reply), 1)
    resumed = _strategy(teacher_rank="degree", better_only=False)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed.arrays = dict(first.arrays)
    grid = FakeGrid([1, 2, 3], reply=_reply)

    # Execute: Flower counts from round 1 again
    rounds = _run(resumed, grid, 2)

    # Assert: round 1 sends nothing; round 2 has the graph from round 1's profiles and each site's own weights
    assert [r.server_round for r in rounds] == [2] and len(grid.sent) == 1
    assert {m.content[P.CONFIG][P.SERVER_ROUND] for m in grid.sent[0]} == {2}
    _, plan = _expected_plan(paper_rule=True)
    assert [f"site-{m.metadata.dst_node_id}" for m in _kd_msgs(grid, 0)] == list(plan)
    assert [m.content[P.ARRAYS]["w"].numpy().tolist() for m in grid.sent[0]] == [[1.0], [2.0], [3.0]]


def test_dropped_student_reply_keeps_the_round_going():
    # Prepare: the student fails in its KD round
    def reply(m):
        if m.content[P.CONFIG].get(P.TEACHER_IDS):
            return None
        return _reply(m)

    grid = FakeGrid([1, 2, 3], reply=reply)
    seen = []

    strategy = _strategy(teacher_rank="degree", better_only=False)
    seen = [(r.server_round, sorted(x.site_id for x in r.replies)) for r in _run(strategy, grid, 2)]

    # Assert: the round goes on without the student's reply; the server keeps its round-1 weights
    _, plan = _expected_plan(paper_rule=True)
    (student, _), = plan.items()
    others = sorted({"site-1", "site-2", "site-3"} - {student})
    assert seen == [(1, ["site-1", "site-2", "site-3"]), (2, others)]
    assert strategy.arrays[student]["w"].numpy().tolist() == [float(student[-1])]


def test_student_check_rejections_are_recorded_and_a_malformed_verdict_drops_the_reply():
    # Prepare: the student keeps the first of its two teachers, then (round 3) sends 3 verdicts for 2
    verdicts = {2: [1, 0], 3: [1, 0, 1]}
    grid = FakeGrid([1, 2, 3], reply=lambda m: _reply(m, verdicts.get(m.content[P.CONFIG][P.SERVER_ROUND])))

    rounds = _run(_strategy(teacher_rank="degree", better_only=False), grid, 3)

    _, plan = _expected_plan(paper_rule=True)
    (student, mixing), = plan.items()
    ids = sorted(mixing)
    reply = next(r for r in rounds[1].replies if r.site_id == student)
    assert reply.metrics["teachers_rejected"] == [ids[1]] and list(reply.metrics["teachers"]) == [ids[0]]
    assert student not in [r.site_id for r in rounds[2].replies]  # dropped, the round went on
    assert len(rounds[2].replies) == 2


def test_fedavg_averages_under_graph_kd():
    """Sites reply weights [10 r + k] (k = node, r = round) with 8 k examples; fedavg is their example-weighted mean:
    round 1: (8*11 + 16*12 + 24*13) / 48 = 12.333..., which every site trains from in round 2."""
    def reply(m):
        node, rnd = m.metadata.dst_node_id, m.content[P.CONFIG][P.SERVER_ROUND]
        content = _content(node, _arrays(10.0 * rnd + node), n=8 * node)
        return Message(content, reply_to=m)

    grid = FakeGrid([1, 2, 3], reply=reply)
    benchmark = lambda arrays: {"map50": 0.1, "ap50": AP[round(float(arrays["w"].numpy()[0])) % 10]}  # noqa: E731
    strategy = _strategy(aggregation="fedavg", teacher_rank="degree", better_only=False, benchmark_fn=benchmark)

    rounds = _run(strategy, grid, 2)

    n = np.array([8.0, 16.0, 24.0])
    for r, record in enumerate(rounds, start=1):
        expected = float(np.average(10.0 * r + np.array([1.0, 2.0, 3.0]), weights=n))
        np.testing.assert_allclose(record.global_arrays["w"].numpy(), [expected], rtol=1e-6)
        np.testing.assert_allclose(record.global_arrays["b"].numpy(), [expected], rtol=1e-6)
    # round 2: every site starts from round 1's average; a student's teachers are the sites' own round-1 models
    assert [m.content[P.ARRAYS]["w"].numpy()[0] for m in grid.sent[1]] == pytest.approx([37 / 3] * 3)
    kd_msg, = _kd_msgs(grid, 1)
    ids = kd_msg.content[P.CONFIG][P.TEACHER_IDS]
    assert [kd_msg.content[P.teacher_record(i)]["w"].numpy().tolist() for i in range(len(ids))] == \
        [[10.0 + int(t[-1])] for t in ids]
    assert rounds[1].graph is not None and rounds[1].graph["teachers_for"]


def test_late_site_is_new_to_the_graph_on_its_join_round_and_not_before(caplog):
    # Prepare: site-3 joins at round 2; t_cycle 5: periodic turns site-1 4, site-2 1, site-3 4 (crc32 % 5)
    evaluated = []

    def benchmark(arrays):
        evaluated.append(_site_of(arrays))
        return {"map50": 0.1, "ap50": AP[_site_of(arrays)]}

    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(join_round={"site-3": 2}, t_cycle=5, benchmark_fn=benchmark)

    # Execute
    with caplog.at_level("INFO", logger="flwr"):
        rounds = _run(strategy, grid, 3)

    # Assert: round 1 without site-3; round 2 evaluates it alone, as new; round 3 nobody
    assert [sorted(m.metadata.dst_node_id for m in sent) for sent in grid.sent] == [[1, 2], [1, 2, 3], [1, 2, 3]]
    assert [{r.site_id: r.evaluated for r in record.replies if r.evaluated} for record in rounds] == [
        {"site-1": ("new",), "site-2": ("new", "periodic")}, {"site-3": ("new",)}, {}]
    assert evaluated == [1, 2, 3]
    assert strategy.profiles["site-3"]["round"] == 2 and strategy.profiles["site-3"]["reasons"] == ["new"]
    assert any("site-3 is NEW" in r.getMessage() and "round 2" in r.getMessage() for r in caplog.records)
    assert sum("site-3 joins at round 2" in r.getMessage() for r in caplog.records) == 1  # round 1 only
    # the graph of round 3 includes it (its profile comes from round 2)
    assert "site-3" in {n["id"] for n in rounds[2].graph["nodes"]}


def test_a_joining_site_gets_its_teachers_in_its_first_round_from_the_starting_weights_profile(caplog):
    """Section 4.3's new-node case: site-3 joins at round 2 from the starting weights (AP of 'node 0'); its
    profile until it is scored is its identity with that AP vector, so round 2's graph already names its teachers."""
    ap = {**AP, 0: [0.05, float("nan"), 0.05]}  # the starting (base) weights: weaker than every trained site
    evaluated = []

    def benchmark(arrays):
        evaluated.append(_site_of(arrays))
        return {"map50": 0.1, "ap50": ap[_site_of(arrays)]}

    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(join_round={"site-3": 2}, benchmark_fn=benchmark, start_round=2, teacher_scope="local",
                         t_cycle=5, new_node_init="base")  # periodic turns as above: round 2 scores only the new site

    with caplog.at_level("INFO", logger="flwr"):
        rounds = _run(strategy, grid, 2, initial=_arrays(0.0))

    # the starting weights are scored once, in round 2 (graph KD starts there), before site-3's own score
    assert evaluated == [1, 2, 0, 3]
    profiles = {"site-1": {"position": (1.0, 0.0), "classes": [0, 2], "ap": AP[1]},
                "site-2": {"position": (2.0, 0.0), "classes": [0, 2], "ap": AP[2]},
                "site-3": {"position": (3.0, 0.0), "classes": [0, 2], "ap": ap[0]}}
    g = G.build_graph(profiles, 5.0)
    expected = G.local_plan(g, G.accuracy_weighted_degree(g, G.teacher_degree(g)), True)
    assert set(expected["site-3"]) == {"site-1", "site-2"}  # both trained sites beat the starting weights
    assert rounds[1].graph["teachers_for"]["site-3"] == pytest.approx(expected["site-3"])
    (kd_msg,) = [m for m in _kd_msgs(grid, 1) if m.metadata.dst_node_id == 3]
    assert dict(zip(kd_msg.content[P.CONFIG][P.TEACHER_IDS], kd_msg.content[P.CONFIG][P.TEACHER_WEIGHTS])) == \
        pytest.approx(expected["site-3"])
    assert kd_msg.content[P.ARRAYS]["w"].numpy().tolist() == [0.0]  # kd.new-node-init=base: the starting weights
    # after its round, its own score replaces the joining profile
    assert strategy.profiles["site-3"]["ap"] == AP[3] and strategy.profiles["site-3"]["reasons"] == ["new"]
    assert any("site-3 join with the starting weights' profile" in r.getMessage() for r in caplog.records)


def test_new_node_init_teacher_starts_a_joining_site_from_its_top_teachers_model(caplog):
    """kd.new-node-init=teacher: the joining site-3's message carries the weights of the teacher the graph weighs
    most for it (computed independently with common.graph), and still names all its teachers; the established
    students keep their own weights."""
    ap = {**AP, 0: [0.05, float("nan"), 0.05]}
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(join_round={"site-3": 2}, start_round=2, teacher_scope="local", t_cycle=5,
                         new_node_init="teacher", benchmark_fn=lambda arrays: {"map50": 0.1, "ap50": ap[_site_of(arrays)]})

    with caplog.at_level("INFO", logger="flwr"):
        _run(strategy, grid, 2, initial=_arrays(0.0))

    profiles = {"site-1": {"position": (1.0, 0.0), "classes": [0, 2], "ap": AP[1]},
                "site-2": {"position": (2.0, 0.0), "classes": [0, 2], "ap": AP[2]},
                "site-3": {"position": (3.0, 0.0), "classes": [0, 2], "ap": ap[0]}}
    g = G.build_graph(profiles, 5.0)
    expected = G.local_plan(g, G.accuracy_weighted_degree(g, G.teacher_degree(g)), True)["site-3"]
    best = max(expected, key=lambda t: (expected[t], t))
    msgs = {m.metadata.dst_node_id: m for m in grid.sent[1]}
    assert msgs[3].content[P.ARRAYS]["w"].numpy().tolist() == [float(best[-1])]  # the teacher's own weights
    assert sorted(msgs[3].content[P.CONFIG][P.TEACHER_IDS]) == sorted(expected)
    assert [msgs[n].content[P.ARRAYS]["w"].numpy().tolist() for n in (1, 2)] == [[1.0], [2.0]]
    assert any(f"site-3 joins from {best}'s model" in r.getMessage() for r in caplog.records)


def test_new_node_init_must_be_base_or_teacher():
    with pytest.raises(ValueError, match="new_node_init='peer'"):
        _strategy(new_node_init="peer")


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_joining_site_teaches_nobody_in_its_first_round(scope):
    """It has no model of its own on the server yet: even when the starting weights score best, it only learns."""
    ap = {**AP, 0: [0.9, float("nan"), 0.9]}
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(join_round={"site-3": 2}, start_round=2, teacher_scope=scope, t_cycle=5, rho=0.5,
                         benchmark_fn=lambda arrays: {"map50": 0.1, "ap50": ap[_site_of(arrays)]},
                         teacher_rank="degree", better_only=False)

    rounds = _run(strategy, grid, 2, initial=_arrays(0.0))

    plan = rounds[1].graph["teachers_for"]
    assert "site-3" not in {t for teachers in plan.values() for t in teachers}
    assert "site-3" not in rounds[1].graph["teachers"] and rounds[1].graph["score"]["site-3"] == 0.0
    assert all(m.content[P.CONFIG][P.TEACHER_IDS] for m in _kd_msgs(grid, 1))  # every student got its teachers
    assert {m.metadata.dst_node_id for m in _kd_msgs(grid, 1)} == {int(s[-1]) for s in plan}


def test_a_joining_site_whose_starting_weights_score_best_still_gets_its_teachers():
    """better_only compares benchmark mAP50; the starting weights were trained on the public data, so their score
    says nothing about the joining site's task: it takes every neighbour ranked above it (its own check decides)."""
    ap = {**AP, 0: [0.9, float("nan"), 0.9]}
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(join_round={"site-3": 2}, start_round=2, teacher_scope="local", t_cycle=5,
                         benchmark_fn=lambda arrays: {"map50": 0.1, "ap50": ap[_site_of(arrays)]})

    rounds = _run(strategy, grid, 2, initial=_arrays(0.0))

    profiles = {f"site-{k}": {"position": (float(k), 0.0), "classes": [0, 2], "ap": ap[k if k < 3 else 0]}
                for k in (1, 2, 3)}
    g = G.build_graph(profiles, 5.0)
    score = {**G.accuracy_weighted_degree(g, G.teacher_degree(g)), "site-3": 0.0}
    assert G.local_plan(g, score, True).get("site-3") is None  # the benchmark rule alone would leave it out
    assert rounds[1].graph["teachers_for"]["site-3"] == pytest.approx(G.local_plan(g, score, False)["site-3"])
    for student, teachers in G.local_plan(g, score, True).items():  # the others keep the benchmark rule
        if teachers:
            assert rounds[1].graph["teachers_for"][student] == pytest.approx(teachers)


def test_graph_is_kept_between_rounds_and_only_changed_rows_are_recomputed():
    # Prepare: t_cycle 10 (periodic turns site-1 9, site-2 1, site-3 9): round 2 evaluates nobody
    grid = FakeGrid([1, 2, 3], reply=_reply)
    strategy = _strategy(t_cycle=10, teacher_rank="degree", better_only=False)

    # Execute
    rounds = _run(strategy, grid, 3)

    # Assert: round 2 builds the graph from round 1's profiles (3 rows); round 3 has nothing new: 0 rows, same graph
    assert [r.graph["rows_computed"] for r in rounds[1:]] == [3, 0]
    assert rounds[2].graph["arcs"] == rounds[1].graph["arcs"]
    _, plan = _expected_plan(paper_rule=True)
    assert rounds[2].graph["teachers_for"].keys() == plan.keys()


def test_a_spoofed_reply_never_becomes_the_sites_profile(caplog):
    # Prepare: node 9 does not say who it is when asked; its reply names site-1 (node 1's) and carries weights
    # whose benchmark AP is site-3's
    def reply(m):
        if m.metadata.dst_node_id == 9:
            return Message(_content(9, _arrays(3.0), site_id="site-1"), reply_to=m)
        return _reply(m)

    grid = FakeGrid([1, 2, 9], reply=reply, silent=[9])
    strategy = _strategy(mode="none")

    # Execute
    with caplog.at_level("INFO", logger="flwr"):
        rounds = _run(strategy, grid, 1)

    # Assert: site-1's profile is node 1's benchmark result; node 9's reply is dropped in one line
    assert [r.site_id for r in rounds[0].replies] == ["site-1", "site-2"]
    assert json.dumps(strategy.profiles["site-1"]["ap"]) == json.dumps(AP[1]) != json.dumps(AP[3])
    assert sorted(strategy.profiles) == ["site-1", "site-2"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        ("aggregate_train: round 1: dropping reply of node 9: site-binding: node 9 claims site-1, which is bound to "
         "node 1 (connected): refused"),
        "aggregate_train: round 1: no valid reply from 1 nodes: 9 (skipped)"]
