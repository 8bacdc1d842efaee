"""A killed server resumes from its last completed round (issue: graph-guided KD, item 7).

A :class:`server.local_grid.LocalGrid` runs each node's ClientApp handler on the
tiny benchmark; the "kill" is an exception raised while round 2 is in flight,
as when the ServerApp process dies mid-round.
"""

import json

import pytest
import torch
from flwr.app import Message

from common import protocol as P
from common import yolo
from common.config import load_config
from server.federation import run_federation
from server.local_grid import LocalGrid


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
def test_killed_server_resumes_after_its_last_completed_round(overrides, tmp_path):
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

    # Assert: it continued at round 3, from the saved weights, with the same graph history
    assert state["round"] == 2
    first = {m.metadata.dst_node_id: m for m in grid.train_messages if m.content[P.CONFIG][P.SERVER_ROUND] == 3}
    assert sorted(first) == [21, 22]
    for node, site in ((21, "site-0"), (22, "site-1")):
        sent = _weights_of(first[node])
        assert all(torch.equal(sent[k], v) for k, v in saved[site].state_dict().items())
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(rounds) == [1, 1, 2, 2, 3, 3]  # round 1 once, not repeated
    assert (run_dir / "graphs" / "round-002.json").read_text() == graph2
    assert json.loads((run_dir / "state.json").read_text())["round"] == 3
    assert (run_dir / "DONE").is_file()
