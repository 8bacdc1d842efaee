"""Tests for strategies.personalized: per-node messages, reply validation, fedavg, waiting for nodes.

A fake grid and real ``flwr.app.Message`` replies, driven by Flower's own ``Strategy.start``;
no SuperLink, no torch: milliseconds.
"""

import logging
import re
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from common import protocol as P
from strategies.personalized import PersonalizedStrategy, RoundRecord, wait_for_nodes

NC = 3


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages take run/node/task ids from the process identity a ServerApp would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 42)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture
def flwr_log(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


def _arrays(*values: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, np.float32)), "b": Array(np.asarray([values[0]], np.float32))})


def _content(node_id: int, arrays: ArrayRecord, n: int = 8, ap=(0.5, -1.0, 0.25), drop: str = "",
             site_id: str = "") -> RecordDict:
    records = {
        P.ARRAYS: arrays,
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 1.5, P.TRAIN_SECONDS: 2.0, P.VAL_MAP50: 0.3,
                                 P.TEST_MAP50: 0.4, P.TEST_MAP50_95: 0.2, P.TEST_AP50: list(ap)}),
        P.SITE: ConfigRecord({P.SITE_ID: site_id or f"site-{node_id}", P.POSITION_KM: [float(node_id), 0.0],
                              P.CLASSES: [0, 2]}),
    }
    return RecordDict({k: v for k, v in records.items() if k != drop})


class FakeGrid:
    """``get_node_ids`` and ``send_and_receive``; ``reply(msg)`` returns a reply or None (no reply).

    ``query`` messages (who are you?) are answered with site ``site-<node id>`` (or ``claims[node id]``) by
    every node except those in ``silent``; ``self.sent`` records the other messages, one list per call that
    sends any.
    """

    def __init__(self, node_ids, reply=None, silent=(), claims=None):
        self.node_ids = list(node_ids)
        self.reply = reply
        self.silent = set(silent)
        self.claims = dict(claims or {})
        self.sent: list[list[Message]] = []
        self.queries: list[Message] = []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:  # e.g. the evaluate stage: nothing is sent
            return []
        if all(m.metadata.message_type == MessageType.QUERY for m in messages):
            self.queries += messages
            return [Message(RecordDict({P.SITE: self.site_record(m.metadata.dst_node_id)}), reply_to=m)
                    for m in messages if m.metadata.dst_node_id not in self.silent]
        self.sent.append(messages)
        return [r for r in (self.reply(m) for m in messages) if r is not None]

    def site_record(self, node_id: int) -> ConfigRecord:
        return _content(node_id, _arrays(0.0), site_id=self.claims.get(node_id, ""))[P.SITE]


def _strategy(benchmark_fn=None, **kw) -> PersonalizedStrategy:
    benchmark_fn = benchmark_fn or (lambda arrays: {"map50": 0.1 * float(arrays["b"].numpy()[0])})
    return PersonalizedStrategy(num_classes=NC, epochs_per_round=2, benchmark_fn=benchmark_fn, **kw)


def _run(strategy, grid, num_rounds: int, initial: ArrayRecord | None = None) -> list[RoundRecord]:
    """Flower's own ``Strategy.start`` over the fake grid; returns each round's record."""
    rounds = []
    strategy.on_round_end = rounds.append
    strategy.start(grid, initial or ArrayRecord(), num_rounds=num_rounds)
    return rounds


def _weights(msg: Message) -> list[float]:
    return msg.content[P.ARRAYS]["w"].numpy().tolist()


# --- configure_train ------------------------------------------------------------------------


def test_configure_train_round_one_without_weights():
    strategy = _strategy(train_config={"lr0": 0.01})

    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({"extra": 1}), FakeGrid([9, 4])))

    assert [m.metadata.dst_node_id for m in messages] == [4, 9]
    for m in messages:
        assert m.metadata.message_type == MessageType.TRAIN
        assert dict(m.content[P.CONFIG]) == {"lr0": 0.01, "extra": 1, P.SERVER_ROUND: 1, P.EPOCHS: 2}
        assert P.ARRAYS not in m.content


def test_configure_train_sends_initial_weights_to_nodes_without_their_own():
    strategy = _strategy()

    messages = list(strategy.configure_train(1, _arrays(1.0, 2.0), ConfigRecord(), FakeGrid([1, 2])))

    assert [_weights(m) for m in messages] == [[1.0, 2.0], [1.0, 2.0]]


def test_each_node_gets_its_own_weights_after_round_one():
    # Prepare: node k returns weights [10k + round]; node 5 never replies
    grid = FakeGrid([3, 5, 1], reply=lambda m: None if m.metadata.dst_node_id == 5 else Message(
        _content(m.metadata.dst_node_id, _arrays(10.0 * m.metadata.dst_node_id + m.content[P.CONFIG][P.SERVER_ROUND])),
        reply_to=m), silent=[5])
    strategy = _strategy(expected_nodes=3, wait_for_nodes_s=0)

    # Execute
    rounds = _run(strategy, grid, num_rounds=2)
    seen = [(r.server_round, [x.node_id for x in r.replies]) for r in rounds]

    # Assert
    round2 = {m.metadata.dst_node_id: m for m in grid.sent[1]}
    assert _weights(round2[1]) == [11.0] and _weights(round2[3]) == [31.0]
    assert P.ARRAYS not in round2[5].content  # nothing known for node 5
    assert [m.content[P.CONFIG][P.SERVER_ROUND] for m in grid.sent[1]] == [2, 2, 2]
    assert seen == [(1, [1, 3]), (2, [1, 3])]
    assert {k: v["w"].numpy().tolist() for k, v in strategy.arrays.items()} == {"site-1": [12.0], "site-3": [32.0]}
    assert strategy.sites["site-3"] == {P.SITE_ID: "site-3", P.POSITION_KM: [3.0, 0.0], P.CLASSES: [0, 2]}
    assert strategy.site_of == {1: "site-1", 3: "site-3"}  # asked once, before round 1
    assert sorted(q.metadata.dst_node_id for q in grid.queries) == [1, 3, 5, 5]  # 5 is asked again in round 2


# --- aggregate_train: bad replies -----------------------------------------------------------


def test_bad_replies_are_dropped_and_logged(flwr_log):
    # Prepare: 1 and 6 are fine; 2 failed, 3 sent no metrics, 4 sent 2 APs for 3 classes,
    # 5's weights make evaluate_fn raise; 7 does not reply at all
    def reply(m):
        node = m.metadata.dst_node_id
        if node == 2:
            return Message(Error(code=0, reason="out of memory"), reply_to=m)
        if node == 7:
            return None
        content = _content(node, _arrays(float(node)), drop=P.METRICS if node == 3 else "",
                           ap=(0.5, 0.5) if node == 4 else (0.5, -1.0, 0.25))
        return Message(content, reply_to=m)

    def benchmark_fn(arrays):
        if arrays["w"].numpy()[0] == 5.0:
            raise ValueError("weights do not fit the model")
        return {"map50": 0.5}

    grid = FakeGrid(range(1, 8), reply, silent=[7])
    strategy = _strategy(benchmark_fn)

    # Execute
    rounds = _run(strategy, grid, num_rounds=1)

    # Assert: the valid ones are kept, with their parsed metrics and benchmark result; 5 is kept unscored
    replies = rounds[0].replies
    assert [r.node_id for r in replies] == [1, 5, 6]
    assert sorted(strategy.arrays) == ["site-1", "site-5", "site-6"]
    assert [r.benchmark for r in replies] == [{"map50": 0.5}, {}, {"map50": 0.5}]
    assert replies[2].metrics[P.NUM_EXAMPLES] == 8.0
    warnings = [r.getMessage() for r in flwr_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert any("node 2" in w and "out of memory" in w for w in warnings)
    assert any("node 3" in w and f"'{P.METRICS}'" in w for w in warnings)
    assert any("node 4" in w and f"'{P.TEST_AP50}'" in w for w in warnings)
    assert any("site-5" in w and "weights do not fit the model" in w for w in warnings)
    assert any("no valid reply from 4 nodes: 2, 3, 4, 7" in w for w in warnings)
    assert any("3 valid replies" in r.getMessage() for r in flwr_log.records)


def test_missing_site_record_is_dropped(flwr_log):
    strategy = _strategy()
    msg = next(iter(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([4]))))

    strategy.aggregate_train(1, [Message(_content(4, _arrays(1.0), drop=P.SITE), reply_to=msg)])

    assert strategy.last_round.replies == [] and strategy.arrays == {}
    assert any(f"no '{P.SITE}' record" in r.getMessage() for r in flwr_log.records)


def test_personalised_aggregation_returns_no_global_model():
    strategy = _strategy()
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))

    arrays, metrics = strategy.aggregate_train(1, [Message(_content(1, _arrays(1.0), n=8), reply_to=msgs[0]),
                                                   Message(_content(2, _arrays(3.0), n=24), reply_to=msgs[1])])

    assert arrays is None
    # example-weighted means of equal values: the values themselves
    assert dict(metrics) == pytest.approx({P.TRAIN_LOSS: 1.5, P.VAL_MAP50: 0.3, P.TEST_MAP50: 0.4})
    assert strategy.arrays["site-1"]["w"].numpy().tolist() == [1.0]
    assert strategy.arrays["site-2"]["w"].numpy().tolist() == [3.0]


# --- fedavg ---------------------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean():
    # Prepare: n = 10 and 30 examples; mean = (10 a + 30 b) / 40, e.g. (10*1 + 30*3) / 40 = 2.5
    a = np.array([1.0, -2.0, 4.0], np.float32)
    b = np.array([3.0, 6.0, 0.0], np.float32)
    strategy = _strategy(aggregation="fedavg")
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    replies = [Message(_content(1, _arrays(*a), n=10), reply_to=msgs[0]),
               Message(_content(2, _arrays(*b), n=30), reply_to=msgs[1])]

    # Execute
    merged, _ = strategy.aggregate_train(1, replies)

    # Assert
    expected = (10 * a.astype(np.float64) + 30 * b) / 40
    np.testing.assert_allclose(merged["w"].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(merged["w"].numpy(), [2.5, 4.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(merged["b"].numpy(), [2.5], rtol=1e-6)
    assert strategy.last_round.global_arrays is merged
    # every node continues from the global model Flower passes back in
    nxt = list(strategy.configure_train(2, merged, ConfigRecord(), FakeGrid([1, 2])))
    assert [_weights(m) for m in nxt] == [[2.5, 4.0, 1.0]] * 2


def test_fedavg_ignores_dropped_replies():
    strategy = _strategy(aggregation="fedavg")
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    replies = [Message(_content(1, _arrays(1.0), n=10), reply_to=msgs[0]),
               Message(_content(2, _arrays(100.0), n=30, ap=(0.5,)), reply_to=msgs[1])]

    merged, _ = strategy.aggregate_train(1, replies)

    assert merged["w"].numpy().tolist() == [1.0]


def test_fedavg_without_valid_replies_returns_nothing():
    strategy = _strategy(aggregation="fedavg")

    assert strategy.aggregate_train(1, []) == (None, None)


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="median"):
        _strategy(aggregation="median")


def test_evaluation_hooks_report_the_server_side_benchmark():
    # Prepare: benchmark mAP50 = 0.1 * b, b = node id: 0.1 and 0.3
    grid = FakeGrid([1, 3], reply=lambda m: Message(_content(m.metadata.dst_node_id,
                                                             _arrays(float(m.metadata.dst_node_id))), reply_to=m))
    strategy = _strategy()

    result = strategy.start(grid, ArrayRecord(), num_rounds=1)

    assert list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)) == []
    assert dict(result.evaluate_metrics_clientapp[1]) == pytest.approx({"benchmark-map50": 0.2, "benchmark-sites": 2})
    assert strategy.aggregate_evaluate(2, []) is None  # no round 2 yet


def test_late_site_gets_no_message_before_its_join_round():
    grid = FakeGrid([1, 2, 3], reply=lambda m: Message(_content(m.metadata.dst_node_id, _arrays(1.0)), reply_to=m))
    strategy = _strategy(join_round={"site-3": 2})

    rounds = _run(strategy, grid, num_rounds=2)

    assert [sorted(m.metadata.dst_node_id for m in sent) for sent in grid.sent] == [[1, 2], [1, 2, 3]]
    assert [[r.site_id for r in record.replies] for record in rounds] == [["site-1", "site-2"],
                                                                          ["site-1", "site-2", "site-3"]]


def test_fraction_train_trains_the_sites_in_turn_and_a_joining_site_at_once():
    """fraction 0.4 of sites 1-5: round 1 trains all five (none has a model yet); then k = ceil(0.4 * 5) = 2 sites
    a round from position (r - 1) * 2 of the sorted sites, wrapping: round 2 sites 3 and 4, round 3 sites 5 and 1,
    and site-6, joining in round 3 without a model, trains at once. Each site's own weights go back to it."""
    grid = FakeGrid(range(1, 7), reply=lambda m: Message(_content(m.metadata.dst_node_id,
                                                                  _arrays(float(m.metadata.dst_node_id))), reply_to=m))
    strategy = _strategy(join_round={"site-6": 3}, fraction_train=0.4)

    rounds = _run(strategy, grid, num_rounds=3)

    assert [sorted(m.metadata.dst_node_id for m in sent) for sent in grid.sent] == [[1, 2, 3, 4, 5], [3, 4],
                                                                                    [1, 5, 6]]
    assert [_weights(m) for m in grid.sent[2][:2]] == [[1.0], [5.0]] and P.ARRAYS not in grid.sent[2][2].content
    assert [sorted(r.site_id for r in record.replies) for record in rounds][1:] == [["site-3", "site-4"],
                                                                                    ["site-1", "site-5", "site-6"]]


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_fraction_train_outside_0_1_is_an_error_naming_it(fraction):
    with pytest.raises(ValueError, match=f"fraction_train={fraction}"):
        _strategy(fraction_train=fraction)


def test_rounds_completed_before_a_resume_send_nothing():
    grid = FakeGrid([1, 2], reply=lambda m: Message(_content(m.metadata.dst_node_id, _arrays(1.0)), reply_to=m))
    strategy = _strategy()
    strategy.completed_round = 2

    rounds = _run(strategy, grid, num_rounds=3)

    assert [r.server_round for r in rounds] == [3]
    assert [[m.content[P.CONFIG][P.SERVER_ROUND] for m in sent] for sent in grid.sent] == [[3, 3]]
    assert grid.queries and all(q.metadata.dst_node_id in (1, 2) for q in grid.queries)


# --- waiting for nodes ----------------------------------------------------------------------


class ArrivingGrid:
    """Nodes register one by one: the i-th call sees ``schedule[min(i, len - 1)]``."""

    def __init__(self, schedule):
        self.schedule, self.calls = schedule, 0

    def get_node_ids(self):
        ids = self.schedule[min(self.calls, len(self.schedule) - 1)]
        self.calls += 1
        return ids


def test_wait_for_nodes_returns_when_enough_appear(flwr_log):
    grid = ArrivingGrid([[], [5], [5, 2], [5, 2, 9], [5, 2, 9, 1]])

    nodes = wait_for_nodes(grid, expected=3, timeout_s=10.0, poll_s=0.001)

    assert nodes == [2, 5, 9]
    assert grid.calls == 4
    assert any("3 nodes connected" in r.getMessage() for r in flwr_log.records)


def test_wait_for_nodes_does_not_wait_when_all_are_there():
    grid = ArrivingGrid([[1, 2]])

    t0 = time.monotonic()
    nodes = wait_for_nodes(grid, expected=2, timeout_s=10.0, poll_s=5.0)

    assert nodes == [1, 2] and grid.calls == 1
    assert time.monotonic() - t0 < 1.0


def test_wait_for_nodes_gives_up_after_the_timeout(flwr_log):
    grid = ArrivingGrid([[7]])

    t0 = time.monotonic()
    nodes = wait_for_nodes(grid, expected=3, timeout_s=0.2, poll_s=0.01)
    elapsed = time.monotonic() - t0

    assert nodes == [7]
    assert 0.2 <= elapsed < 2.0
    assert any(r.levelno == logging.WARNING and "only 1 of 3" in r.getMessage() for r in flwr_log.records)


# --- registered locations (flwr supernode register --location "lat,lon") ------------------


def test_registered_location_replaces_the_reported_position():
    """Node 2 registered at 0.009 degrees north of node 1: 0.009 * pi / 180 * 6371.0088 km = 1.000756 km."""
    from types import SimpleNamespace

    grid = FakeGrid([1, 2], reply=lambda m: Message(_content(m.metadata.dst_node_id, _arrays(1.0)), reply_to=m))
    grid.get_nodes = lambda: [SimpleNamespace(node_id=1, location="48.0,11.0"),
                              SimpleNamespace(node_id=2, location="48.009,11.0")]
    strategy = _strategy()

    _run(strategy, grid, num_rounds=1)

    assert strategy.sites["site-1"][P.POSITION_KM] == [0.0, 0.0]
    assert strategy.sites["site-2"][P.POSITION_KM] == pytest.approx([0.0, 1.000756], abs=1e-6)
    assert strategy.last_round.replies[1].site[P.POSITION_KM] == pytest.approx([0.0, 1.000756], abs=1e-6)


def test_a_gallery_travels_with_the_reply_and_a_bad_one_costs_only_the_pictures(flwr_log):
    strategy = _strategy()
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    good, bad = _content(1, _arrays(1.0)), _content(2, _arrays(2.0))
    good[P.GALLERY] = ConfigRecord(P.encode_gallery([{"gt": None}], [b"png"]))
    bad[P.GALLERY] = ConfigRecord({P.GALLERY_ITEMS: "not json", P.GALLERY_IMAGES: [b"png"]})

    strategy.aggregate_train(1, [Message(good, reply_to=msgs[0]), Message(bad, reply_to=msgs[1])])

    replies = {r.site_id: r for r in strategy.last_round.replies}
    assert replies["site-1"].gallery == [{"gt": None, "image": b"png"}]
    assert replies["site-2"].gallery is None and sorted(strategy.arrays) == ["site-1", "site-2"]
    assert any("node 2: ignoring its gallery" in r.getMessage() and "is not JSON" in r.getMessage()
               for r in flwr_log.records)


# --- site identity: a site id is bound to the first node that presents it --------------------


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _data(arrays: ArrayRecord) -> dict[str, bytes]:
    """The weights' serialised bytes, for byte-for-byte comparisons."""
    return {name: array.data for name, array in arrays.items()}


def _round_reply(grid: FakeGrid):
    """Node k replies as its claimed site (default site-k) with weights [10 k + round]."""
    def reply(m: Message) -> Message:
        node = m.metadata.dst_node_id
        weights = _arrays(10.0 * node + m.content[P.CONFIG][P.SERVER_ROUND])
        return Message(_content(node, weights, site_id=grid.claims.get(node, "")), reply_to=m)
    return reply


def test_a_node_claiming_a_bound_site_is_refused_and_gets_no_train_message(flwr_log):
    # Prepare: nodes 1 and 2 in round 1; node 9 connects before round 2 and says it is site-1, node 1 still connected
    grid = FakeGrid([1, 2], claims={9: "site-1"})
    grid.reply = _round_reply(grid)
    saved = []
    strategy = _strategy(on_bind=saved.append)
    rounds = []
    strategy.on_round_end = lambda record: (rounds.append(record), grid.node_ids.append(9))

    # Execute
    strategy.start(grid, ArrayRecord(), num_rounds=2)

    # Assert: node 9 is asked, refused in one line naming the site and both nodes, and sent nothing
    assert [q.metadata.dst_node_id for q in grid.queries] == [1, 2, 9]
    assert [sorted(m.metadata.dst_node_id for m in sent) for sent in grid.sent] == [[1, 2], [1, 2]]
    assert _warnings(flwr_log) == [("identify: site-binding: node 9 claims site-1, which is bound to node 1 "
                                    "(connected): refused")]
    assert strategy.node_of == {"site-1": 1, "site-2": 2} and strategy.refused == {9: "site-1"}
    assert saved == [{"site-1": 1, "site-2": 2}]  # persisted once, when bound
    assert [[r.node_id for r in record.replies] for record in rounds] == [[1, 2], [1, 2]]
    assert strategy.arrays["site-1"]["w"].numpy().tolist() == [12.0]  # node 1's round 2


def test_a_reply_for_another_nodes_site_is_dropped_and_that_site_keeps_its_model(flwr_log):
    # Prepare: round 1: node 1 is site-1, node 2 is site-2; node 9 never says who it is
    strategy = _strategy()
    grid = FakeGrid([1, 2, 9], silent=[9])
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    strategy.aggregate_train(1, [Message(_content(1, _arrays(1.0)), reply_to=msgs[1]),
                                 Message(_content(2, _arrays(2.0)), reply_to=msgs[2])])
    before, identity = _data(strategy.arrays["site-1"]), dict(strategy.sites["site-1"])
    flwr_log.clear()

    # Execute: round 2: node 9 and node 2 both reply as site-1 (other weights, another position); node 1 is silent
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid)}
    strategy.aggregate_train(2, [Message(_content(9, _arrays(666.0), site_id="site-1"), reply_to=msgs[9]),
                                 Message(_content(2, _arrays(777.0), site_id="site-1"), reply_to=msgs[2])])

    # Assert: site-1's weights byte for byte, its identity and the bindings are as before; no reply counts
    assert _data(strategy.arrays["site-1"]) == before
    assert strategy.arrays["site-2"]["w"].numpy().tolist() == [2.0]
    assert strategy.sites["site-1"] == identity == {P.SITE_ID: "site-1", P.POSITION_KM: [1.0, 0.0], P.CLASSES: [0, 2]}
    assert strategy.last_round.replies == []
    assert strategy.node_of == {"site-1": 1, "site-2": 2}
    assert _warnings(flwr_log) == [
        ("aggregate_train: round 2: dropping reply of node 9: site-binding: node 9 claims site-1, which is bound to "
         "node 1 (connected): refused"),
        ("aggregate_train: round 2: dropping reply of node 2: site-binding: node 2 claims site-1 but is bound to "
         "site-2: refused"),
        "aggregate_train: round 2: no valid reply from 3 nodes: 1, 2, 9 (skipped)"]


@pytest.mark.parametrize("mode", ["connected", "strict"])
def test_a_site_moves_to_a_new_node_once_its_node_is_gone_and_never_when_strict(mode, flwr_log):
    # Prepare: round 1 nodes 1 and 2; before round 2 node 1 is gone and node 5 (a SuperNode restarted without
    # authentication: a new node id) says it is site-1
    grid = FakeGrid([1, 2], claims={5: "site-1"})
    grid.reply = _round_reply(grid)
    strategy = _strategy(site_binding=mode)
    rounds = []

    def round_end(record):
        rounds.append(record)
        grid.node_ids = [2, 5]

    strategy.on_round_end = round_end

    # Execute
    strategy.start(grid, ArrayRecord(), num_rounds=2)

    # Assert
    round2 = {m.metadata.dst_node_id: m for m in grid.sent[1]}
    messages = [r.getMessage() for r in flwr_log.records]
    if mode == "connected":  # site-1 and its own weights follow it to node 5
        assert sorted(round2) == [2, 5] and _weights(round2[5]) == [11.0]
        assert strategy.node_of == {"site-1": 5, "site-2": 2} and strategy.site_of == {2: "site-2", 5: "site-1"}
        assert strategy.arrays["site-1"]["w"].numpy().tolist() == [52.0]
        assert "site-binding: site-1 moves from node 1 (no longer connected) to node 5" in messages
        assert _warnings(flwr_log) == []
    else:  # strict: only node 1 speaks for site-1
        assert sorted(round2) == [2]
        assert strategy.node_of == {"site-1": 1, "site-2": 2}
        assert strategy.arrays["site-1"]["w"].numpy().tolist() == [11.0]
        assert _warnings(flwr_log) == [("identify: site-binding: node 5 claims site-1, which is bound to node 1 "
                                        "(not connected, site-binding strict): refused")]


def test_bindings_are_restored_and_the_operator_releases_a_site(flwr_log):
    # Prepare: a resumed run's bindings; the operator releases site-2 (and names a site that is not bound)
    saved = []
    strategy = _strategy(site_binding="strict", on_bind=saved.append)

    # Execute 1
    strategy.load_bindings({"site-1": 1, "site-2": 2}, release=["site-2", "site-7"])

    # Assert 1: each release is one WARNING line, and the new bindings are persisted at once
    assert strategy.node_of == {"site-1": 1} and strategy.site_of == {1: "site-1"}
    assert saved == [{"site-1": 1}]
    assert _warnings(flwr_log) == [
        "site-binding: site-2 released from node 2 by the operator: the next node that claims it is bound to it",
        "site-binding: site-7 is not bound: nothing to release"]

    # Execute 2: node 5 claims the released site-2, node 6 claims site-1 (bound to node 1, which is gone: strict)
    strategy.identify(FakeGrid([5, 6], claims={5: "site-2", 6: "site-1"}))

    # Assert 2
    assert strategy.node_of == {"site-1": 1, "site-2": 5} and saved[-1] == {"site-1": 1, "site-2": 5}
    assert strategy.refused == {6: "site-1"}


def test_unknown_site_binding_is_named():
    with pytest.raises(ValueError, match="site_binding='loose'"):
        _strategy(site_binding="loose")


# --- message-level faults: each reply is logged and skipped, the round goes on -------------------


def _lying_shape(m: Message) -> RecordDict:
    """'w' says it is (2,) but its bytes hold 3 values."""
    real = Array(np.asarray([1.0, 2.0, 3.0], np.float32))
    arrays = ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype=real.stype, data=real.data),
                          "b": Array(np.asarray([1.0], np.float32))})
    return _content(2, arrays)


def _node_unavailable(m: Message) -> Message:
    """What the SuperLink answers for a node that missed its heartbeats (flwr.server.superlink.linkstate.utils):
    an error reply from the SuperLink's own node id to the message sent to the node."""
    m.metadata.__dict__["_message_id"] = f"train-{m.metadata.dst_node_id}"  # as the grid sets it on push
    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=m)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return reply


FAULTS = {  # reply of node 2 in round 2 -> the one WARNING line that drops it (a regular expression)
    "node unavailable (the SuperLink's reply)": (_node_unavailable, re.escape("node 2 failed: Error: Node Unavailable")),
    # what a SuperNode sends when the ClientApp raises (flwr.supernode.runtime.run_clientapp)
    "ClientApp raises in train": (
        lambda m: Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="<class 'RuntimeError'>:<'CUDA oom'>"),
        re.escape("node 2 failed: <class 'RuntimeError'>:<'CUDA oom'>")),
    "NaN weights": (lambda m: _content(2, _arrays(2.0, float("nan"))),
                    re.escape("arrays: 'w' has 1 values that are not finite (NaN or inf)")),
    "inf in a buffer": (lambda m: _content(2, ArrayRecord({"w": Array(np.zeros(2, np.float32)),
                                                           "b": Array(np.asarray([np.inf], np.float32))})),
                        re.escape("arrays: 'b' has 1 values that are not finite (NaN or inf)")),
    "wrong shape": (lambda m: _content(2, _arrays(2.0, 0.5, 0.5)),
                    re.escape("arrays: 'w' is (3,) float32, the model's (2,) float32")),
    "shape metadata that lies": (_lying_shape, re.escape("arrays: 'w' is (3,) float32, the model's (2,) float32")),
    "wrong dtype": (lambda m: _content(2, ArrayRecord({"w": Array(np.zeros(2)), "b": Array(np.zeros(1, np.float32))})),
                    re.escape("arrays: 'w' is (2,) float64, the model's (2,) float32")),
    "missing tensor": (lambda m: _content(2, ArrayRecord({"w": Array(np.zeros(2, np.float32))})),
                       re.escape("arrays: do not fit the model: missing ['b'], unexpected []")),
    "bytes that do not decode": (
        lambda m: _content(2, ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                                                      data=b"garbage"), "b": Array(np.zeros(1, np.float32))})),
        "arrays: 'w' does not decode: .+"),
    "another site's id": (lambda m: _content(2, _arrays(2.0, 0.5), site_id="site-3"),
                          re.escape("site-binding: node 2 claims site-3 but is bound to site-2: refused")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_reply_is_dropped_and_its_site_keeps_its_state(fault, flwr_log, record_property):
    # Prepare: 3 nodes, 3 rounds, the server's model has w (2,) and b (1,) float32; node k replies with
    # w = [10 k + round, 0.5], except node 2 in round 2, whose reply has the fault
    make_bad, expected = FAULTS[fault]

    def reply(m):
        node, rnd = m.metadata.dst_node_id, m.content[P.CONFIG][P.SERVER_ROUND]
        if (node, rnd) == (2, 2):
            bad = make_bad(m)
            return bad if isinstance(bad, Message) else Message(bad, reply_to=m)
        return Message(_content(node, _arrays(10.0 * node + rnd, 0.5)), reply_to=m)

    scored = []
    strategy = _strategy(benchmark_fn=lambda arrays: scored.append(arrays["w"].numpy()[0]) or {"map50": 0.5},
                         template=_arrays(0.0, 0.0))
    grid = FakeGrid([1, 2, 3], reply)
    snapshots = []
    strategy.on_round_end = lambda record: snapshots.append((record, _data(strategy.arrays["site-2"]),
                                                             dict(strategy.sites["site-2"])))

    # Execute
    strategy.start(grid, ArrayRecord(), num_rounds=3)

    warnings = _warnings(flwr_log)
    good = sum(len(record.replies) for record, _, _ in snapshots)
    record_property("chaos", {"fault": f"a reply: {fault} (fake nodes)", "happened": f"logged: {warnings[0]}; "
                              "the round went on, site-2 kept its round-1 weights and identity",
                              "lost": 8 - good, "of": "8 good replies"})

    # Assert: round 2 goes on with sites 1 and 3; site-2's weights (byte for byte) and identity stay as in round 1,
    # and round 3 sends node 2 its round-1 weights
    assert [[r.site_id for r in record.replies] for record, _, _ in snapshots] == [
        ["site-1", "site-2", "site-3"], ["site-1", "site-3"], ["site-1", "site-2", "site-3"]]
    assert snapshots[1][1] == snapshots[0][1] and snapshots[1][2] == snapshots[0][2]
    assert _weights(grid.sent[2][1]) == [21.0, 0.5]
    assert scored == [11.0, 21.0, 31.0, 12.0, 32.0, 13.0, 23.0, 33.0]  # the faulty reply is never scored
    assert len(warnings) == 2
    assert re.fullmatch(f"aggregate_train: round 2: dropping reply of node 2: {expected}", warnings[0]), warnings[0]
    assert warnings[1] == "aggregate_train: round 2: no valid reply from 1 nodes: 2 (skipped)"
