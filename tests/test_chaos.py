"""Chaos in a real deployment on loopback: a SuperLink, SuperNodes and ``flwr run`` (``tests/deploy_helpers.py``),
each fault injected by SIGKILL or by a broken model store, on the tiny benchmark.

- a SuperNode killed mid-round: the round completes with the other site, and the restarted node rejoins;
- the SuperLink killed and restarted on its ``--database``: the run resumes from its last completed round;
- a ClientApp that raises in train: its reply is logged and skipped, the round goes on.

Flower 1.41 keeps a SIGKILLed SuperNode "online" until it misses its heartbeats: the SuperNode announces a
30 s interval (``flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL``, no CLI flag, the SuperLink accepts 10 to
1800 s) and the SuperLink waits ``HEARTBEAT_PATIENCE`` (2) intervals, so a round with a dead node ends up to
60 s after the kill, when the SuperLink answers for the node with a ``NODE_UNAVAILABLE`` error reply.

Each test records what happened with ``record_property("chaos", ...)``; ``python -m benchmarks.chaos`` runs
them with the other chaos tests and writes the table. Run with ``pytest -m integration tests/test_chaos.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import flwr
import psutil
import pytest

from tests import REPO
from tests.deploy_helpers import (
    Deployment,
    deploy_env,
    flwr_cli,
    flwr_run_command,
    kill_tree,
    list_supernodes,
    start_process,
    tail,
    tree,
)

pytestmark = pytest.mark.integration

ROUND_TIMEOUT_S = 600  # one tiny round on 2 shared cores, with a dead node's 60 s included


@pytest.fixture
def dep(tmp_path):
    """A deployment that the test fills; everything it started is stopped, also when the test fails."""
    deployment = Deployment(tmp_path, deploy_env(tmp_path / "flwr-home"))
    try:
        yield deployment
    finally:
        left = deployment.stop()
        assert not left, f"still alive after teardown: {left}\n{deployment.logs()}"


def _submit(dep: Deployment, tiny_overrides: dict, rounds: int, *extra: str):
    """``flwr run --stream`` of a tiny run ``out/r`` (no KD, no cloud, models from scratch), in the background."""
    overrides = [f"{k}={v}" for k, v in tiny_overrides.items()] + [
        "data.num-sites=2", f"output-dir={dep.tmp / 'out'}", "run-name=r", "tracking.wandb=off",
        f"federation.num-rounds={rounds}", "kd.mode=none", "kd.cloud-rounds=[]", "federation.late-sites=[]",
        "model.edge-init=scratch", "cloud.serve=false", "federation.wait-for-nodes-s=120", *extra]
    proc = start_process("flwr-run", flwr_run_command(REPO, dep.connection, "quick", overrides), dep.env,
                         dep.tmp / "logs", cwd=dep.tmp)
    dep.procs.append(proc)
    return proc


def _wait(dep: Deployment, done: Callable[[], bool], what: str, timeout: float = ROUND_TIMEOUT_S) -> float:
    """Poll ``done`` until it holds; the seconds it took (a failure names ``what`` and shows the logs)."""
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"no {what} after {timeout:.0f}s\n{dep.logs()}")
        time.sleep(0.5)
    return time.monotonic() - t0


def _state_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def _rows(run_dir: Path) -> list[tuple[int, str]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sorted((r["round"], r["site_id"]) for r in map(json.loads, lines))


def _count(proc, text: str) -> int:
    return tail(proc.log, 100_000).count(text)


def _node_id(proc) -> int:
    found = re.findall(r"SuperNode ID: (\d+)", tail(proc.log, 100_000))
    assert found, proc.tail()
    return int(found[-1])


def _warnings(dep: Deployment) -> list[str]:
    text = tail(dep.tmp / "logs" / "flwr-run.log", 100_000)
    return [line.split("WARNING", 1)[1].lstrip(" \x1b[0m:") for line in text.splitlines() if "WARNING" in line
            and "--insecure" not in line]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_supernode_killed_mid_round_the_round_completes_and_the_node_rejoins(dep, tiny_overrides, tiny_benchmark,
                                                                              record_property):
    from common import yolo
    from common.sites import class_names

    # Prepare: sites 0 and 1, 2 rounds; site-1's box has run before: its model store holds a model
    store = dep.tmp / "stores" / "site-1" / "model.pt"
    names = class_names(tiny_benchmark.site_data(1))
    yolo.save_weights(yolo.build_model("yolo11n", len(names), names=names), store)
    before = _sha(store)
    dep.start_superlink()
    dep.start_supernodes(range(2))
    _submit(dep, tiny_overrides, rounds=2)
    run_dir, node = dep.tmp / "out" / "r", dep.supernodes[1]
    # site-1's ClientApps: round 1's query, then round 1's train
    _wait(dep, lambda: _count(node, "Start `flwr-clientapp` process") >= 2, "round-1 train ClientApp of site-1")

    # Execute: 3 s into that ClientApp, site-1's SuperNode, SuperExec and ClientApp get SIGKILL at once; the
    # node restarts at once on the same model store (with a new node id: insecure SuperNodes get one per start)
    time.sleep(3.0)
    old_id = _node_id(node)
    killed = kill_tree(node)
    after_kill = _sha(store)
    t_kill = time.monotonic()
    new = dep.start_supernodes([1], name="supernode-{}-restarted")[0]
    round1_s = _wait(dep, lambda: _state_round(run_dir) >= 1, "round 1 after the kill")
    _wait(dep, lambda: (run_dir / "DONE").is_file(), "the end of the run")
    total_s = time.monotonic() - t_kill
    new_id, rows = _node_id(new), _rows(run_dir)
    expected = [(1, "site-0"), (2, "site-0"), (2, "site-1")]
    record_property("chaos", {
        "fault": "a SuperNode killed mid-round (SIGKILL to SuperNode, SuperExec and ClientApp)",
        "happened": f"round 1 completed with site-0 {round1_s:.0f} s after the kill (Flower's node-unavailable "
                    f"reply, logged and skipped); the restarted node (new id) took site-1 over and trained it in "
                    f"round 2 into its intact store; the run ended {total_s:.0f} s after the kill",
        "lost": len(set(expected) - set(rows)), "of": f"{len(expected)} site-rounds of the live nodes"})

    # Assert: round 1 went on with site-0 alone; site-1 came back in round 2 on its new node
    assert len(killed) >= 3 and not node.alive(), killed  # SuperNode, SuperExec, ClientApp
    assert after_kill == before  # the kill left the store as it was
    assert rows == expected, dep.logs()
    warnings = _warnings(dep)
    dropped = [w for w in warnings if w.startswith(f"aggregate_train: round 1: dropping reply of node {old_id}: "
                                                   f"node {old_id} failed: Error: Node Unavailable")]
    assert len(dropped) == 1, warnings
    assert json.loads((run_dir / "bindings.json").read_text())["site-1"] == new_id != old_id
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site_id"]): r["node_id"] for r in metrics}[(2, "site-1")] == new_id
    assert _sha(store) != before and yolo.load_weights(store).cedar_meta["round"] == 2  # rewritten, whole


def test_a_clientapp_that_raises_in_train_is_logged_and_skipped(dep, tiny_overrides, record_property):
    # Prepare: site-1's model store is a regular file, so its ClientApp raises when it saves the trained model
    # (after training: the whole round's work is done, then lost); its query (identity) does not touch the store
    broken = dep.tmp / "stores" / "site-1"
    broken.parent.mkdir(parents=True)
    broken.write_text("not a folder")
    dep.start_superlink()
    dep.start_supernodes([0])
    dep.start_supernodes([1], **{"model-store": str(broken)})

    # Execute
    _submit(dep, tiny_overrides, rounds=1)
    run_dir = dep.tmp / "out" / "r"
    seconds = _wait(dep, lambda: (run_dir / "DONE").is_file(), "the end of the run")
    rows = _rows(run_dir)
    warnings = _warnings(dep)
    record_property("chaos", {
        "fault": "a ClientApp that raises in train (its model store is a file)",
        "happened": f"site-1's error reply (FileExistsError) was logged and skipped, the round went on with "
                    f"site-0; run done in {seconds:.0f} s",
        "lost": len({(1, "site-0")} - set(rows)), "of": "1 site-round of the healthy site"})

    # Assert: the round went on with site-0; site-1 has no metrics row, no model in the run folder
    assert rows == [(1, "site-0")], dep.logs()
    node = _node_id(dep.supernodes[1])
    dropped = [w for w in warnings if w.startswith(f"aggregate_train: round 1: dropping reply of node {node}: "
                                                   f"node {node} failed: <class 'FileExistsError'>")]
    assert len(dropped) == 1, warnings
    assert (run_dir / "nodes" / "site-0" / "model.pt").is_file()
    assert not (run_dir / "nodes" / "site-1").exists()
    assert broken.read_text() == "not a folder"


def test_the_superlink_killed_and_restarted_on_its_database_the_run_resumes(dep, tiny_overrides, record_property):
    # Prepare: the SuperLink keeps its state in a database file; sites 0 and 1, 2 rounds
    db = dep.tmp / "superlink.db"
    link = dep.start_superlink("--database", str(db))
    dep.start_supernodes(range(2))
    _submit(dep, tiny_overrides, rounds=2)
    run_dir = dep.tmp / "out" / "r"
    _wait(dep, lambda: _state_round(run_dir) >= 1, "round 1")
    round1 = (run_dir / "metrics.jsonl").read_text()
    node_ids = {i: _node_id(n) for i, n in dep.supernodes.items()}
    serverapps = [p for p in tree(link) if p.name() == "flwr-serverapp"]
    assert len(serverapps) == 1, dep.logs()

    # Execute: SIGKILL to the SuperLink process alone (its SuperExec and the ServerApp are left to themselves),
    # then at once a new SuperLink on the same port and database, as a supervisor restarts it
    kill_tree(link, descendants=False)
    dep.start_superlink("--database", str(db), port=link.port, name="superlink-restarted")
    t_restart = time.monotonic()
    _wait(dep, lambda: sorted(int(n["node-id"]) for n in list_supernodes(dep.connection, dep.env)
                              if n["status"] == "online") == sorted(node_ids.values()),
          "both SuperNodes online again", timeout=120)
    online_s = time.monotonic() - t_restart
    _, alive = psutil.wait_procs(serverapps, timeout=180)
    serverapp_exited = not alive
    res = flwr_cli(["ls", dep.connection, "--format", "json"], dep.env, dep.tmp / "logs")
    (killed_run,) = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
    status = f"{killed_run['status']} ({killed_run['status-details']})"
    # ... and the same run submitted again with federation.resume=true
    _submit(dep, tiny_overrides, 2, "federation.resume=true")
    _wait(dep, lambda: (run_dir / "DONE").is_file(), "the end of the resumed run")
    rows = _rows(run_dir)
    expected = [(1, "site-0"), (1, "site-1"), (2, "site-0"), (2, "site-1")]
    record_property("chaos", {
        "fault": "the SuperLink killed (SIGKILL) and restarted on its --database",
        "happened": f"the ServerApp {'exited on its own' if serverapp_exited else 'did not exit'}; the restarted "
                    f"SuperLink marked the run {status}: Flower {flwr.__version__} does not continue a run across a SuperLink "
                    f"restart. Both SuperNodes were back online with their node ids {online_s:.0f} s after the restart; "
                    f"the run resubmitted with federation.resume=true continued after round 1 (not repeated)",
        "lost": len(set(expected) - set(rows)), "of": f"{len(expected)} site-rounds"})

    # Assert: round 1 kept as written, round 2 run once; the bindings are the same node ids
    assert serverapp_exited, alive
    assert rows == expected, dep.logs()
    assert (run_dir / "metrics.jsonl").read_text().startswith(round1)
    assert json.loads((run_dir / "bindings.json").read_text()) == {f"site-{i}": n for i, n in node_ids.items()}
    assert _state_round(run_dir) == 2
    assert killed_run["status"] == "finished:failed", killed_run
