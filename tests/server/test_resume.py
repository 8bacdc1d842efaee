"""A killed server resumes from its last completed round (issue: graph-guided KD, item 7); the site bindings
survive it; a damaged run folder stops it with an error naming the file.

A :class:`server.local_grid.LocalGrid` runs each node's ClientApp handler on the
tiny benchmark; the "kill" is an exception raised while round 2 is in flight,
as when the ServerApp process dies mid-round.
"""

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from common import protocol as P
from common import yolo
from common.config import load_config
from server.federation import BenchmarkEvaluator, ResumeError, RoundWriter, run_federation
from server.local_grid import LocalGrid
from server.outputs import RunOutputs
from server.tracking import Tracker
from strategies.graph_kd import GraphKDStrategy
from tests.strategies.test_personalized import FakeGrid, _round_reply, server_identity  # noqa: F401


class Killed(Exception):
    pass


def _grid(overrides: dict, node_ids, kill_in_round=None) -> LocalGrid:
    """A local grid whose server "dies" when it sends a train message of ``kill_in_round``."""
    def before_send(msg):
        if msg.metadata.message_type != "query":
            if msg.content[P.CONFIG][P.SERVER_ROUND] == kill_in_round:
                raise Killed(f"server killed in round {kill_in_round}")
            grid.train_messages.append(msg)

    run_config = {"preset": "quick", "overrides": " ".join(f"{k}={v}" for k, v in overrides.items())}
    grid = LocalGrid(run_config, node_ids, before_send)
    grid.train_messages = []
    return grid


@pytest.fixture
def overrides(tiny_overrides, tmp_path):
    return {**tiny_overrides, "output-dir": str(tmp_path / "out"), "run-name": "r", "tracking.wandb": "off",
            "federation.num-rounds": 3, "federation.wait-for-nodes-s": 0, "kd.mode": "graph", "kd.rho": 0.5,
            "kd.start-round": 1, "kd.fg-threshold": 0.0, "kd.cloud-rounds": [], "federation.late-sites": [],
            "model.edge-init": "scratch", "cloud.serve": False}


def _weights_of(msg: Message) -> dict:
    return msg.content[P.ARRAYS].to_torch_state_dict()


@pytest.mark.slow
def test_killed_server_resumes_after_its_last_completed_round(overrides, tmp_path, record_property):
    cfg = load_config("quick", overrides)
    run_dir = tmp_path / "out" / "r"

    # Execute 1: the server dies while round 3 is in flight (round 2 had a graph and distillation)
    with pytest.raises(Killed):
        run_federation(_grid(overrides, (11, 12), kill_in_round=3), cfg)
    state = json.loads((run_dir / "state.json").read_text())
    saved = {s: yolo.load_weights(run_dir / "nodes" / s / "model.pt") for s in ("site-0", "site-1")}
    graph2 = (run_dir / "graphs" / "round-002.json").read_text()

    # Execute 2: a new server (new node ids, as after a restart) with resume on
    grid = _grid(overrides, (21, 22))
    run_federation(grid, load_config("quick", {**overrides, "federation.resume": True}))

    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record_property("chaos", {
        "fault": "the ServerApp killed mid-round (an exception while round 3 is sent; LocalGrid, no processes)",
        "happened": f"resumed with new node ids after round {state['round']}, round 3 from the saved weights, "
                    f"the graph history kept; metrics rounds {sorted(rounds)}",
        "lost": sum((Counter({1: 2, 2: 2, 3: 2}) - Counter(rounds)).values()), "of": "6 site-rounds"})

    # Assert: it continued at round 3, from the saved weights, with the same graph history
    assert state["round"] == 2
    first = {m.metadata.dst_node_id: m for m in grid.train_messages if m.content[P.CONFIG][P.SERVER_ROUND] == 3}
    assert sorted(first) == [21, 22]
    for node, site in ((21, "site-0"), (22, "site-1")):
        sent = _weights_of(first[node])
        assert all(torch.equal(sent[k], v) for k, v in saved[site].state_dict().items())
    assert sorted(rounds) == [1, 1, 2, 2, 3, 3]  # round 1 once, not repeated
    assert (run_dir / "graphs" / "round-002.json").read_text() == graph2
    assert json.loads((run_dir / "state.json").read_text())["round"] == 3
    assert (run_dir / "DONE").is_file()


# --- site bindings and a damaged run folder (fake nodes, no training: milliseconds) ----------------


class NpzEvaluator:
    """A benchmark_fn whose class-0 AP50 is w[0] / 100 (whose weights made a profile); saves and loads the
    weights as .npz bytes (no torch)."""

    def __call__(self, arrays):
        return {"map50": 0.5, "ap50": [float(arrays["w"].numpy()[0]) / 100, 0.5, 0.5], "seconds": 0.0}

    def save(self, arrays, path, **meta):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            np.savez(fh, **{k: a.numpy() for k, a in arrays.items()})

    def load(self, path):
        with np.load(path) as data:
            return ArrayRecord({k: Array(data[k]) for k in data.files})


def _server(tmp_path, **kw):
    """A GraphKDStrategy (no KD) with its RoundWriter on ``tmp_path/r``, wired as run_federation wires them."""
    cfg = load_config("quick", {"output-dir": str(tmp_path), "run-name": "r", "tracking.wandb": "off"})
    evaluator = NpzEvaluator()
    strategy = GraphKDStrategy(num_classes=3, epochs_per_round=1, benchmark_fn=evaluator, mode="none", **kw)
    writer = RoundWriter(RunOutputs.create(cfg), Tracker("off", "cedar", tmp_path / "r", {}, "r"), evaluator,
                         strategy, cfg.kd)
    strategy.on_round_end, strategy.on_bind = writer, writer.write_bindings
    return strategy, writer


def test_bindings_survive_a_resume_a_spoofer_is_refused_and_the_real_node_is_recognised(tmp_path, caplog):
    # Prepare: round 1 with nodes 1 (site-1) and 2 (site-2); the server is stopped
    caplog.set_level("INFO", logger="flwr")
    first, writer = _server(tmp_path, site_binding="strict")
    grid = FakeGrid([1, 2])
    grid.reply = _round_reply(grid)
    first.start(grid, ArrayRecord(), num_rounds=1)
    run_dir = tmp_path / "r"
    bindings = (run_dir / "bindings.json").read_text()
    model_pt = run_dir / "nodes" / "site-1" / "model.pt"
    site1 = (model_pt.read_bytes(), first.sites["site-1"])

    # Execute: the resumed server; in round 2 node 1 is down and node 9 says it is site-1; node 1 is back in round 3
    strategy, writer = _server(tmp_path, site_binding="strict")
    strategy.load_bindings(writer.read_bindings())
    initial = writer.resume()
    grid = FakeGrid([2, 9], claims={9: "site-1"})
    grid.reply = _round_reply(grid)
    after = []

    def round_end(record):
        writer(record)
        after.append((model_pt.read_bytes(), strategy.sites["site-1"], strategy.profiles.get("site-1")))
        grid.node_ids.append(1)

    strategy.on_round_end = round_end
    caplog.clear()
    strategy.start(grid, initial, num_rounds=3)

    # Assert: round 2 leaves site-1's model file (byte for byte), identity and metrics alone, and node 9 gets
    # nothing; site-1's profile is dropped while it is absent, as for any absent site, and is node 1's again in round 3
    assert after[0][:2] == site1 and site1[1][P.POSITION_KM] == [1.0, 0.0]
    assert after[0][2] is None and after[1][2]["ap"][0] == pytest.approx(0.13)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["site_id"], r["node_id"]) for r in rows] == [
        (1, "site-1", 1), (1, "site-2", 2), (2, "site-2", 2), (3, "site-1", 1), (3, "site-2", 2)]
    assert json.loads(bindings) == {"site-1": 1, "site-2": 2}
    assert (run_dir / "bindings.json").read_text() == bindings
    assert [sorted(m.metadata.dst_node_id for m in sent) for sent in grid.sent] == [[2], [1, 2]]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        ("identify: site-binding: node 9 claims site-1, which is bound to node 1 (not connected, site-binding "
         "strict): refused"),
        "identify: site-binding: node 9 claims site-1, which is bound to node 1 (connected): refused"]  # round 3
    # round 3: node 1 is recognised by its node id (not asked again) and gets site-1's saved weights
    assert sorted(q.metadata.dst_node_id for q in grid.queries) == [9, 9]
    round3 = {m.metadata.dst_node_id: m for m in grid.sent[1]}
    assert round3[1].content[P.ARRAYS]["w"].numpy().tolist() == [11.0]
    assert NpzEvaluator().load(run_dir / "nodes" / "site-1" / "model.pt")["w"].numpy().tolist() == [13.0]
    assert after[1][0] != site1[0]  # written in round 3
    assert first.profiles["site-1"]["ap"][0] == pytest.approx(0.11)


def _cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_truncated_state_or_bindings_file_stops_the_resume_naming_it(tmp_path, record_property):
    # Prepare: a completed round 1, then both files cut in half
    strategy, writer = _server(tmp_path)
    grid = FakeGrid([1, 2])
    grid.reply = _round_reply(grid)
    strategy.start(grid, ArrayRecord(), num_rounds=1)
    _cut(writer.state_path)
    _cut(writer.bindings_path)
    state = writer.state_path.read_bytes()

    # Execute / Assert: a clear error naming the file; nothing is written
    record_property("chaos", {"fault": "a truncated state.json or bindings.json in the run folder",
                              "happened": "the resume stops at once with an error naming the file; nothing is "
                                          "written", "lost": None})
    resumed, writer = _server(tmp_path)
    with pytest.raises(ResumeError, match=rf"{writer.state_path}: cannot resume from it \(JSONDecodeError: .*"
                                          r"restore it, or start a new run"):
        writer.resume()
    with pytest.raises(ResumeError, match=rf"{writer.bindings_path}: cannot resume from it \(.*\); restore it, or "
                                          "delete it"):
        writer.read_bindings()
    assert writer.state_path.read_bytes() == state and resumed.completed_round == 0
    # a state.json that parses but lacks what a resume needs is named the same way
    writer.state_path.write_text('{"round": 1}')
    with pytest.raises(ResumeError, match=rf"{writer.state_path}: cannot resume from it \(KeyError: 'strategy'\)"):
        writer.resume()


def test_a_truncated_model_file_stops_the_resume_naming_it(tmp_path, record_property):
    # Prepare: a real weights file of site-0 (as the server saves it), cut in half, and a state.json that needs it
    cfg = load_config("quick", {"output-dir": str(tmp_path), "run-name": "r", "tracking.wandb": "off"})
    evaluator = BenchmarkEvaluator(cfg, tmp_path / "unused.yaml", ["a", "b", "c"])
    strategy = GraphKDStrategy(num_classes=3, epochs_per_round=1, mode="none", template=evaluator.template)
    writer = RoundWriter(RunOutputs.create(cfg), Tracker("off", "cedar", tmp_path / "r", {}, "r"), evaluator,
                         strategy, cfg.kd)
    path = writer.out.node_weights_path("site-0")
    evaluator.save(evaluator.template, path, round=1, site="site-0")
    assert evaluator.load(path).keys() == evaluator.template.keys()  # whole, it loads
    _cut(path)
    writer.state_path.write_text(json.dumps({"round": 1, "strategy": strategy.state_dict(), "sites": ["site-0"]}))

    # Execute / Assert
    record_property("chaos", {"fault": "a truncated model.pt of a site in the run folder",
                              "happened": "the resume stops at once with an error naming the file; no model is "
                                          "loaded", "lost": None})
    with pytest.raises(ResumeError, match=rf"cannot resume: cannot read weights file {path}: .*; restore the file"):
        writer.resume()
    assert strategy.arrays == {}
