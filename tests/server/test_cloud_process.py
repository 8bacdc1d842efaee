"""The cloud service as the run's child process (server/cloud_process.py): a REAL ``python -m server.cloud`` on
loopback: start, health, token, restart, stop, a failed start, and that the run stops it when its body raises."""

from __future__ import annotations

import os
import stat

import httpx
import psutil
import pytest

from common.sites import class_names, public_data
from server.cloud_process import CloudProcess, CloudProcessError

pytestmark = pytest.mark.integration

NAMES = ["insulator", "bird_nest", "damper", "bolt", "crack", "rust", "vehicle", "person"]


def _cloud_children() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "server.cloud" in p.cmdline():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from common import yolo

    folder = tmp_path_factory.mktemp("weights")
    return [yolo.save_weights(yolo.build_model("yolo11n", len(NAMES), seed=s, names=NAMES), folder / f"m{s}.pt")
            for s in (0, 1)]


def test_start_health_token_restart_stop(weights, tmp_path):
    service = CloudProcess(weights[0], tmp_path / "store", tmp_path / "svc", args=["--imgsz", "128"])

    # Execute
    with service:
        pid, url, token = service.proc.pid, service.url, service.token
        health = httpx.get(f"{url}/health", timeout=10).json()
        refused = httpx.post(f"{url}/detect", content=b"x", timeout=10,
                             headers={"Authorization": "Bearer wrong", "X-Cedar-Site": "site-0"})
        service.restart(weights[1])
        restarted_pid = service.proc.pid
        again = httpx.get(f"{url}/health", timeout=10).json()

    # Assert: served on loopback, the model's classes; a random owner-only token that the service checks
    assert url.startswith("http://127.0.0.1:") and health["status"] == "ok" and health["classes"] == NAMES
    assert refused.status_code == 401
    assert len(token) >= 40 and (tmp_path / "svc" / "token").read_text().strip() == token
    assert stat.S_IMODE(os.stat(tmp_path / "svc" / "token").st_mode) == 0o600
    # restart: a new process on the same URL (the sites keep theirs), counters reset
    assert restarted_pid != pid and service.url == url and again["served"] == 0
    # stopped: both processes gone, nothing listens
    assert not psutil.pid_exists(pid) and not psutil.pid_exists(restarted_pid) and service.proc is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)
    assert (tmp_path / "store" / "data.yaml").is_file()  # the service's hard-sample store


def test_failed_start_names_the_weights_and_leaves_no_process(tmp_path):
    bad = tmp_path / "not-a-model.pt"
    bad.write_bytes(b"junk")
    service = CloudProcess(bad, tmp_path / "store", tmp_path / "svc")

    with pytest.raises(CloudProcessError, match=r"not-a-model\.pt\) exited with code 2") as err:
        service.start()
    assert "cannot read weights file" in str(err.value)  # the service's own log line
    assert service.proc is None and _cloud_children() == []


class _BrokenGrid:
    """A Flower grid whose first call fails, as a SuperLink that goes away would."""

    def get_node_ids(self):
        raise RuntimeError("grid down")

    def get_nodes(self):
        raise RuntimeError("grid down")

    def send_and_receive(self, messages, *, timeout=None):
        raise RuntimeError("grid down")


def test_run_stops_the_service_when_its_body_raises(weights, tiny_overrides, tmp_path, caplog):
    # Prepare: a run serving a given cloud model (no training), sites from scratch
    from common.config import load_config
    from server.federation import run_federation

    cfg = load_config("quick", {**tiny_overrides, "output-dir": str(tmp_path / "out"), "run-name": "r",
                                "tracking.wandb": "off", "model.edge-init": "scratch",
                                "model.cloud-init": str(weights[0]), "model.cloud": "yolo11n"})
    assert cfg.cloud.serve and class_names(public_data(cfg)) == NAMES

    # Execute
    with caplog.at_level("INFO", logger="server.cloud_process"), pytest.raises(RuntimeError, match="grid down"):
        run_federation(_BrokenGrid(), cfg)

    # Assert: the service had started (the log names its pid) and no service process is left
    started = [r.getMessage() for r in caplog.records if "serving" in r.getMessage()]
    assert len(started) == 1 and "(pid " in started[0]
    pid = int(started[0].split("(pid ")[1].split(")")[0])
    assert not psutil.pid_exists(pid) and _cloud_children() == []
    assert any(r.getMessage() == f"cloud service: stopped (pid {pid})" for r in caplog.records)


def test_run_serves_the_cloud_and_closes_the_loop(tiny_overrides, tmp_path, caplog):
    """Two sites, two rounds on the in-process grid: the sites start from the base model, offload to the run's
    service (their collaborative recall comes back), and round 2's cloud KD is preceded by a fine-tune on the hard
    samples they sent."""
    import torch
    import yaml

    from common import protocol as P
    from common.config import load_config
    from server import models as M
    from server.federation import run_federation
    from server.local_grid import LocalGrid

    # Prepare: the untrained tiny models detect little; a low answer/label threshold makes the service store, and
    # no offload budget (on a 0-mAP validation split every option ties and the budget picks "none")
    overrides = {**tiny_overrides, "output-dir": str(tmp_path / "out"), "run-name": "r", "tracking.wandb": "off",
                 "federation.num-rounds": 2, "federation.wait-for-nodes-s": 0, "kd.cloud-rounds": "[2]",
                 "federation.late-sites": "[]",
                 "model.base-epochs": 1, "model.cloud-epochs": 1, "model.cloud": "yolo11n",
                 "cloud.finetune-epochs": 1, "routing.det-conf": 0.01, "routing.candidate-conf": 0.001,
                 "routing.budget": "off"}
    sent = []
    run_config = {"preset": "quick", "overrides": " ".join(f"{k}={v}" for k, v in overrides.items())}
    grid = LocalGrid(run_config, (1, 2), before_send=lambda m: sent.append(m) if m.content else None)
    cfg = load_config("quick", {**overrides, "kd.cloud-rounds": [2], "federation.late-sites": []})

    # Execute
    with caplog.at_level("INFO"):
        out = run_federation(grid, cfg)

    # Assert: round 1 sent both sites the cached base model, and the service's URL and token
    base = M.cache_root(cfg) / f"yolo11n-{M.Recipe.from_config(cfg, 'yolo11n', 1).key()}" / "model.pt"
    round1 = [m for m in sent if m.content[P.CONFIG][P.SERVER_ROUND] == 1]
    assert len(round1) == 2
    token = (out.run_dir / "cloud" / "token").read_text().strip()
    for m in round1:
        assert m.content[P.CONFIG][P.CLOUD_TOKEN] == token
        assert m.content[P.CONFIG][P.CLOUD_URL].startswith("http://127.0.0.1:")
    w1, w2 = (m.content[P.ARRAYS].to_torch_state_dict() for m in round1)
    cached = torch.load(base, weights_only=True)["state_dict"]
    assert all(torch.equal(w1[k], cached[k]) and torch.equal(w2[k], cached[k]) for k in cached)
    # the sites offloaded to the service (collaborative metrics); what they sent is in its hard-sample store
    rows = [yaml.safe_load(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    # (a site whose request outlives the client's 10 s timeout on a loaded machine reports edge metrics only)
    assert len(rows) == 4 and any(r["collab_recall"] is not None for r in rows if r["round"] == 1)
    stored = len(list((out.run_dir / "cloud" / "hard-samples" / "images").iterdir()))
    assert stored > 0
    # round 2: the cloud fine-tuned on the samples of round 1 before teaching
    tuned = torch.load(out.run_dir / "cloud" / "model-round-002.pt", weights_only=True)["meta"]
    assert tuned["round"] == 2 and 0 < tuned["hard_samples"] <= stored
    assert sorted(p.name for p in (out.run_dir / "cloud").glob("model*.pt")) == ["model-round-002.pt", "model.pt"]
    assert _cloud_children() == []


def test_workers_answer_on_one_port_share_one_store_and_stop_together(weights, tmp_path):
    """``--workers 2``: two worker processes under uvicorn's supervisor answer 24 concurrent offloads (6 clients,
    the edge's own requests); the store they share holds one index line and one labelled image per crop, all
    names distinct; stopping the service stops the workers."""
    import json
    import threading
    import time

    import numpy as np

    from clients.offload import CloudClient, OffloadEntry

    # Prepare: 4 offloads of 3 crops each, on one atlas
    rng = np.random.default_rng(0)
    boxes = np.array([[10, 10, 30, 30], [60, 20, 80, 44], [20, 80, 44, 100]], dtype=np.float64)
    entries = [OffloadEntry.for_keyframe(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), boxes,
                                         np.ones(3, bool), site="site-0", run="w", frame=i, mode="crops",
                                         created=0.0, model="m", edge=[]) for i in range(4)]
    service = CloudProcess(weights[0], tmp_path / "store", tmp_path / "svc", args=["--imgsz", "128", "--workers", "2"])
    answers, failures = [], []

    def client(k: int) -> None:
        cloud = CloudClient(service.url, service.token, f"site-{k}")
        try:
            for entry in entries:
                answers.append(cloud.send(entry))
        except Exception as err:  # noqa: BLE001 - the assertion below names it
            failures.append(repr(err))
        finally:
            cloud.close()

    # Execute
    with service:
        supervisor = psutil.Process(service.proc.pid)
        deadline = time.monotonic() + 120
        while len(supervisor.children(recursive=True)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # two workers (and multiprocessing's resource tracker)
        workers = [p for p in supervisor.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pids = [service.proc.pid, *(p.pid for p in workers)]

    # Assert: every request answered; 6 x 4 x 3 = 72 samples, each indexed once, named once, labelled
    assert not failures and len(answers) == 24 and len(workers) == 2
    index = [json.loads(line) for line in (tmp_path / "store" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 72 and len({e["id"] for e in index}) == 72
    assert all((tmp_path / "store" / e["image"]).is_file() and (tmp_path / "store" / e["label"]).is_file()
               for e in index)
    assert len(list((tmp_path / "store" / "images").iterdir())) == 72
    assert not any(psutil.pid_exists(pid) for pid in pids)
