"""End to end in deployment mode: a real ``flower-superlink``, two ``flower-supernode`` processes on loopback
(insecure), ``flwr run . <connection>``, one round with graph KD on the tiny benchmark.

Unlike the simulation test, the ServerApp runs in a ``flwr-serverapp`` started by the
SuperLink's SuperExec, and each site's ClientApp in a ``flwr-clientapp`` started by its
SuperNode's SuperExec; the sites come from ``--node-config "site-index=<i>"``.
Run with ``pytest -m integration tests/test_deployment.py``. The process helpers live in
``tests/deploy_helpers.py`` (reused by the TLS / SuperNode-authentication test).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests import REPO
from tests.deploy_helpers import Deployment, deploy_env, flwr_run_command, tail

pytestmark = pytest.mark.integration

APP_DIR = REPO  # the Flower app
CONNECTION = "cedar-test"
RUN_TIMEOUT_S = 600  # flwr run --stream (the whole round, 2 CPU cores shared)
DONE_TIMEOUT_S = 300  # after flwr run returned: the ServerApp writing DONE


@pytest.fixture
def deployment(tmp_path):
    """SuperLink + 2 SuperNodes (sites 0 and 1) on free loopback ports; always torn down, nothing left alive."""
    dep = Deployment(tmp_path, deploy_env(tmp_path / "flwr-home"), CONNECTION)
    try:
        dep.start_superlink()
        dep.start_supernodes(range(2))
        yield dep
    finally:
        left = dep.stop()
        assert not left, f"still alive after teardown: {left}\n{dep.logs()}"


def test_deployment_two_supernodes_one_kd_round(deployment, tiny_overrides):
    dep = deployment
    out_dir = dep.tmp / "out"
    overrides = [f"{k}={v}" for k, v in tiny_overrides.items()] + [
        "data.num-sites=2", f"output-dir={out_dir}", "run-name=dep", "tracking.wandb=off",
        "federation.num-rounds=2", "kd.mode=graph", "kd.rho=0.5", "kd.start-round=2",
        "kd.fg-threshold=0.0", "federation.wait-for-nodes-s=60", "federation.late-sites=[]",
        # the paper's global top-rho set by in-strength and no student-side check: after one tiny round both models
        # score ~0, and the default rules would (rightly) pick no teacher; this test is about the transport
        "kd.teacher-scope=global", "kd.teacher-rank=degree", "kd.better-only=false", "kd.student-check=false",
        # the quick preset's base and cloud models train for minutes; one epoch is enough for the transport
        "model.base-epochs=1", "model.cloud-epochs=1", "model.cloud=yolo11n",
    ]
    cmd = flwr_run_command(APP_DIR, CONNECTION, "quick", overrides, stream=True)

    # Execute: submit to the SuperLink and stream the run's logs until it ends
    run_log = dep.tmp / "logs" / "flwr-run.log"
    t0 = time.monotonic()
    with open(run_log, "wb") as fh:
        try:
            rc = subprocess.run(cmd, env=dep.env, cwd=dep.tmp, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = None
    run_dir = out_dir / "dep"
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while not (run_dir / "DONE").is_file() and time.monotonic() < deadline and dep.superlink.alive():
        time.sleep(1.0)
    elapsed = time.monotonic() - t0

    # Assert: the run finished (flwr run exits 0 even when the ServerApp raised, hence DONE)
    assert rc == 0, f"flwr run rc={rc} after {elapsed:.0f}s\n{dep.logs()}"
    assert (run_dir / "DONE").is_file(), f"no {run_dir}/DONE after {elapsed:.0f}s\n{dep.logs()}"
    for proc in dep.procs:
        assert proc.alive(), f"{proc.name} died during the run\n{dep.logs()}"
    assert "Successfully started run" in tail(run_log, 10_000), dep.logs()

    # one metrics line per site and round; in round 2 the teacher's train reply and the student's KD reply
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert sorted((r["round"], r["site_id"]) for r in lines) == [(1, "site-0"), (1, "site-1"), (2, "site-0"),
                                                                 (2, "site-1")], lines
    lines = [r for r in lines if r["round"] == 2]
    kd = [r for r in lines if r["phase"] == "kd"]
    assert len(kd) == 1 and kd[0]["teachers"], f"no KD reply in round 2: {lines}\n{dep.logs()}"
    teacher = next(r for r in lines if r["phase"] != "kd")
    assert set(kd[0]["teachers"]) == {teacher["site_id"]}, lines

    graph = json.loads((run_dir / "graphs" / "round-002.json").read_text())
    assert sorted(n["id"] for n in graph["nodes"]) == ["site-0", "site-1"], graph
    assert graph["teachers"] == [teacher["site_id"]], graph
    for site in ("site-0", "site-1"):
        assert (run_dir / "nodes" / site / "model.pt").is_file()
        # the ClientApp ran in deployment mode: it used the store given in its SuperNode's node-config
        assert (dep.tmp / "stores" / site / "model.pt").is_file(), f"no model store for {site}\n{dep.logs()}"
    # both SuperNodes actually answered messages
    for node in dep.supernodes.values():
        assert "Sent successfully" in tail(node.log, 10_000), node.tail()
