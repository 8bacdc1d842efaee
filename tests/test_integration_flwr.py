"""End to end: ``cedar-simulate`` (``flwr run .``) with 2 simulated sites and 2 tiny rounds.

Starts the real local SuperLink, the Ray simulation backend, the ServerApp and
the ClientApps, then checks the run folder. The quick preset's defaults run: graph
KD, the last site joining at round 2, and here a cloud-to-edge round 2 (the
KDRequest and the teacher's weights cross the real wire). Run with ``pytest -m integration``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

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


def _tiny_run(tmp_path, *models: str) -> subprocess.CompletedProcess:
    """``cedar-simulate`` on tiny data (a round takes seconds), outputs and caches in tmp, the cloud teaching in
    round 2; ``models``: ``model.*`` overrides."""
    overrides = [
        "data.num-sites=2", "data.imgsz=128", "train.imgsz=128", "data.train-per-site=8",
        "data.val-per-site=4", "data.test-per-site=4", "data.public-per-site=4", "data.public-train-per-site=4",
        "data.video-frames=8",
        f"data.cache-dir={tmp_path / 'cache'}", f"output-dir={tmp_path / 'outputs'}",
        "federation.num-rounds=2", "train.epochs-per-round=1", "tracking.wandb=off", "run-name=it",
        "kd.cloud-rounds=[2]", "model.base-epochs=1", "model.cloud-epochs=1", *models,
    ]
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "server.simulate", *overrides], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)


def test_flwr_run_two_sites_two_rounds_late_site_and_cloud_teacher(tmp_path, no_superlink_left):
    # Execute
    proc = _tiny_run(tmp_path, "model.cloud=yolo11n")

    # Assert: round 1 without the late site-1; round 2 with both, site-1 evaluated as new, the cloud teaching
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "it"
    assert (run_dir / "DONE").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["site_id"]) for r in lines) == [(1, "site-0"), (2, "site-0"), (2, "site-1")]
    evaluated = {(r["round"], r["site_id"]): r["evaluated"] for r in lines}
    assert evaluated[(1, "site-0")] == ["new", "periodic"] and evaluated[(2, "site-1")] == ["new", "periodic"]
    assert all(0.0 <= r["benchmark_map50"] <= 1.0 for r in lines)
    assert len(lines[0]["benchmark_ap50"]) == 8
    # site-0 continues its model with the cloud's soft labels; the newcomer site-1 too, into the base model
    assert {r["site_id"]: r["teachers_proposed"] for r in lines if r["round"] == 2} == {"site-0": {"cloud": 1.0},
                                                                                       "site-1": {"cloud": 1.0}}
    # the run's cloud service answered the sites (collaborative metrics) and is gone
    assert any(r["collab_recall"] is not None for r in lines)
    assert "cloud service: stopped" in proc.stdout + proc.stderr
    for site in ("site-0", "site-1"):
        assert (run_dir / "nodes" / site / "model.pt").is_file()
    assert json.loads((run_dir / "state.json").read_text())["round"] == 2
    # the report: every site's gallery from the last round's replies, its pictures inlined
    for site in ("site-0", "site-1"):
        gallery = json.loads((run_dir / "gallery" / f"{site}.json").read_text())
        assert 1 <= len(gallery) <= 3 and all((run_dir / item["image"]).is_file() for item in gallery)
    page = (run_dir / "report.html").read_text()
    assert "site-1" in page and "data:image/png;base64," in page
    cfg_text = (run_dir / "config.yaml").read_text()
    assert "num_sites: 2" in cfg_text and "num_rounds: 2" in cfg_text


@pytest.mark.slow
def test_cedar_simulate_with_a_yolo26n_edge_and_a_yolo26s_cloud(tmp_path, no_superlink_left):
    """The README demo's cycle on YOLO26: NMS-free models at the edge and in the cloud service, the cloud
    teaching every site in round 2 (box distillation without DFL)."""
    proc = _tiny_run(tmp_path, "model.edge=yolo26n", "model.cloud=yolo26s")

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "it"
    assert (run_dir / "DONE").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["site_id"]) for r in lines) == [(1, "site-0"), (2, "site-0"), (2, "site-1")]
    assert {r["site_id"]: r["teachers_proposed"] for r in lines if r["round"] == 2} == {"site-0": {"cloud": 1.0},
                                                                                       "site-1": {"cloud": 1.0}}
    assert all(0.0 <= r["benchmark_map50"] <= 1.0 for r in lines)
    assert any(r["collab_recall"] is not None for r in lines)  # the yolo26s cloud service answered
    assert "cloud service: stopped" in proc.stdout + proc.stderr
    cfg_text = (run_dir / "config.yaml").read_text()
    assert "edge: yolo26n" in cfg_text and "cloud: yolo26s" in cfg_text
    for site in ("site-0", "site-1"):
        assert torch.load(run_dir / "nodes" / site / "model.pt", weights_only=True)["arch"] == "yolo26n"
