"""End to end: ``cedar-simulate`` (``flwr run .``) with 2 simulated sites and 1 tiny round.

Starts the real local SuperLink, the Ray simulation backend, the ServerApp and
the ClientApps, then checks the run folder. Run with ``pytest -m integration``.
"""

import json
import os
import subprocess
import sys

import pytest

from server.simulate import local_superlinks, stop_local_superlinks

pytestmark = pytest.mark.integration


@pytest.fixture
def no_superlink_left():
    """Whatever happens, no SuperLink started here outlives the test (CI would hang on it)."""
    before = {p.pid for p in local_superlinks()}
    yield
    if not before:
        stop_local_superlinks()
    assert {p.pid for p in local_superlinks()} <= before


def test_flwr_run_two_sites_one_round(tmp_path, no_superlink_left):
    # Prepare: tiny data so the round takes seconds, outputs and caches in tmp
    overrides = [
        "data.num-sites=2", "data.imgsz=128", "train.imgsz=128", "data.train-per-site=8",
        "data.val-per-site=4", "data.test-per-site=4", "data.public-per-site=4", "data.public-train-per-site=4",
        "data.video-frames=8",
        f"data.cache-dir={tmp_path / 'cache'}", f"output-dir={tmp_path / 'outputs'}",
        "federation.num-rounds=1", "train.epochs-per-round=1", "tracking.wandb=off", "run-name=it",
        "model.base-epochs=1", "model.cloud-epochs=1", "model.cloud=yolo11n",  # the base model, the served cloud
    ]
    env = dict(os.environ, WANDB_MODE="disabled")

    # Execute
    proc = subprocess.run([sys.executable, "-m", "server.simulate", *overrides], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)

    # Assert: the run finished and wrote one metrics line per site
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "it"
    assert (run_dir / "DONE").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["site_id"] for r in lines) == ["site-0", "site-1"]
    assert all(r["round"] == 1 and 0.0 <= r["benchmark_map50"] <= 1.0 for r in lines)
    assert len(lines[0]["benchmark_ap50"]) == 8
    # the run's cloud service answered every site (collaborative metrics) and is gone
    assert all(0.0 <= r["collab_recall"] <= 1.0 for r in lines)
    assert "cloud service: stopped" in proc.stdout + proc.stderr
    for site in ("site-0", "site-1"):
        assert (run_dir / "nodes" / site / "model.pt").is_file()
    cfg_text = (run_dir / "config.yaml").read_text()
    assert "num_sites: 2" in cfg_text and "num_rounds: 1" in cfg_text
