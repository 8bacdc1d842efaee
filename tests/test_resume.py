"""A killed server resumes from its last completed round (issue: graph-guided KD, item 7).

An in-process grid runs each node's ClientApp function (``clients.app``) on the
tiny benchmark; the "kill" is an exception raised while round 2 is in flight,
as when the ServerApp process dies mid-round.
"""

import json

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from clients import app as client_app
from common import protocol as P
from common import yolo
from common.config import load_config
from server.federation import run_federation


class Killed(Exception):
    pass


class InProcessGrid:
    """Delivers each message to the ClientApp handler of its node, in this process."""

    def __init__(self, cfg_overrides: dict, node_ids=(11, 12), kill_in_round=None):
        self.node_ids = list(node_ids)
        self.run_config = {"preset": "quick", "overrides": " ".join(f"{k}={v}" for k, v in cfg_overrides.items())}
        self.kill_in_round = kill_in_round
        self.train_messages: list[Message] = []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": self.node_ids.index(node)},
                          state=RecordDict(), run_config=self.run_config)
            if m.metadata.message_type == "query":
                reply = client_app.query(m, ctx)
            else:
                if m.content[P.CONFIG][P.SERVER_ROUND] == self.kill_in_round:
                    raise Killed(f"server killed in round {self.kill_in_round}")
                self.train_messages.append(m)
                reply = client_app.train(m, ctx)
            replies.append(reply)
        return replies


@pytest.fixture
def overrides(tiny_overrides, tmp_path):
    return {**tiny_overrides, "output-dir": str(tmp_path / "out"), "run-name": "r", "tracking.wandb": "off",
            "federation.num-rounds": 3, "federation.wait-for-nodes-s": 0, "kd.mode": "graph", "kd.rho": 0.5,
            "kd.start-round": 1, "kd.epochs": 1, "kd.fg-threshold": 0.0}


def _weights_of(msg: Message) -> dict:
    return msg.content[P.ARRAYS].to_torch_state_dict()


@pytest.mark.slow
def test_killed_server_resumes_after_its_last_completed_round(overrides, monkeypatch, tmp_path):
    monkeypatch.setattr("flwr.supercore.task_identity.TaskIdentity._run_id", 1)
    monkeypatch.setattr("flwr.supercore.task_identity.TaskIdentity._task_id", 1)
    monkeypatch.setattr("flwr.supercore.task_identity.TaskIdentity._node_id", 0)
    cfg = load_config("quick", overrides)
    run_dir = tmp_path / "out" / "r"

    # Execute 1: the server dies while round 2 is in flight
    with pytest.raises(Killed):
        run_federation(InProcessGrid(overrides, kill_in_round=2), cfg)
    state = json.loads((run_dir / "state.json").read_text())
    saved = {s: yolo.load_weights(run_dir / "nodes" / s / "model.pt") for s in ("site-0", "site-1")}
    graph1 = (run_dir / "graphs" / "round-001.json").read_text()

    # Execute 2: a new server (new node ids, as after a restart) with resume on
    grid = InProcessGrid(overrides, node_ids=(21, 22))
    run_federation(grid, load_config("quick", {**overrides, "federation.resume": True}))

    # Assert: it continued at round 2, from the saved weights, with the same graph history
    assert state["round"] == 1
    first = {m.metadata.dst_node_id: m for m in grid.train_messages if m.content[P.CONFIG][P.SERVER_ROUND] == 2
             and P.TEACHER_IDS not in m.content[P.CONFIG]}
    assert sorted(first) == [21, 22]
    for node, site in ((21, "site-0"), (22, "site-1")):
        sent = _weights_of(first[node])
        assert all(torch.equal(sent[k], v) for k, v in saved[site].state_dict().items())
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(rounds) == [1, 1, 2, 2, 3, 3]  # round 1 once, not repeated
    assert (run_dir / "graphs" / "round-001.json").read_text() == graph1
    assert json.loads((run_dir / "state.json").read_text())["round"] == 3
    assert (run_dir / "DONE").is_file()
