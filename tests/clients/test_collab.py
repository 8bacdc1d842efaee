"""clients/collab.py: the one collaboration step, shared by the edge runtime and the ClientApp's metrics."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from clients.collab import CollabSettings, collaborate, detect_keyframe, merge_answer, plan_offload
from clients.offload import CloudAnswer
from common.config import RoutingConfig, load_config
from common.detections import Detections
from common.sites import resolve_site, split_dir


class RegionCloud:
    """Answers each offloaded region with one box of class 2 at its centre, 10x10 px, conf 0.7."""

    def __init__(self):
        self.entries = []

    def send(self, entry) -> CloudAnswer:
        self.entries.append(entry)
        c = [((r[0] + r[2]) / 2, (r[1] + r[3]) / 2) for r in entry.regions]
        return CloudAnswer(Detections([[x - 5, y - 5, x + 5, y + 5] for x, y in c], [0.7] * len(c), [2] * len(c)),
                           rtt_ms=1.0, request_bytes=entry.payload_bytes + 100, model="region-cloud")

    def close(self):
        pass


def test_settings_come_from_the_config_schema():
    routing = RoutingConfig(det_conf=0.3, candidate_conf=0.1, t_conf=0.6, merge="cloud")
    s = CollabSettings.from_config(routing, keep_unanswered=False)
    assert (s.det_conf, s.candidate_conf, s.t_conf, s.merge, s.keep_unanswered) == (0.3, 0.1, 0.6, "cloud", False)
    assert (s.detector_conf, s.answer_conf) == (0.1, 0.3)
    off = CollabSettings(candidate_conf=0.0)
    assert (off.detector_conf, off.answer_conf) == (off.det_conf, 0.0)
    with pytest.raises(ValueError, match=r"candidate_conf must be 0 \(off\) or in \(0, det_conf=0.25\), got 0.5"):
        CollabSettings(candidate_conf=0.5)


def test_one_step_hand_worked():
    """Edge: A [0,0,40,40] 0.9 (confident), B [60,60,66,66] 0.6 (36 px² < 256: small), C [80,10,90,20] 0.1 (a
    candidate, below det_conf 0.25). Offloaded: B and C; the cloud confirms C only ([81,10,91,20], 0.8, IoU
    90/110); fuse: C+C' noisy-or 1 - 0.9 * 0.2 = 0.82, box (0.1 C + 0.8 C') / 0.9; A stays; B stays
    (keep_unanswered)."""
    edge = Detections([[0, 0, 40, 40], [60, 60, 66, 66], [80, 10, 90, 20]], [0.9, 0.6, 0.1], [0, 1, 1])
    image = np.zeros((100, 120, 3), np.uint8)
    s = CollabSettings()

    class Cloud:
        def send(self, entry):
            return CloudAnswer(Detections([[81, 10, 91, 20]], [0.8], [1]), rtt_ms=3.0)

    step = collaborate(image, lambda im: edge, Cloud(), s, site="s", frame=4)

    assert step.keyframe.reasons == [(), ("small",)] and step.keyframe.candidates.conf.tolist() == [0.1]
    assert step.entry.id == "s.eval.000004" and step.entry.offloaded == [False, True, True]
    assert step.merged.conf.tolist() == pytest.approx([0.82, 0.9, 0.6])
    assert step.merged.xyxy[0].tolist() == pytest.approx([80 + 0.8 / 0.9, 10, 90 + 0.8 / 0.9, 20])
    assert step.sent_bytes == step.entry.payload_bytes > 0 and step.rtt_ms == 3.0
    # nothing ambiguous, no candidate: nothing planned, the answer is the edge's
    calm = collaborate(image, lambda im: edge[[0]], Cloud(), s, site="s")
    assert calm.entry is None and calm.cloud is None and calm.merged.to_list() == edge[[0]].to_list()
    # no cloud: planned, not sent, the edge's answer
    alone = collaborate(image, lambda im: edge, None, s, site="s")
    assert alone.entry is not None and alone.cloud is None and alone.sent_bytes == 0
    assert alone.merged.to_list() == edge[[0, 1]].to_list()


@pytest.mark.slow
def test_client_metrics_path_and_runtime_merge_the_same_boxes(tiny_overrides, tiny_benchmark, tmp_path):
    """One test image through the ClientApp's metrics path (LocalSite, its detector and settings) and through
    the edge runtime (python -m clients.edge's EdgeModel from the saved weights, EdgeSettings.from_config):
    the runtime's refined line carries the same merged boxes."""
    from clients.detector import EdgeModel
    from clients.edge import EdgeRuntime, EdgeSettings
    from clients.media import FrameSource
    from clients.site import LocalSite
    from common import yolo
    from tests.test_edge_runtime import _benchmark_frames, _calibrated_model

    # Prepare: a model with spread-out scores, saved as the site's model store would
    cfg = load_config("quick", tiny_overrides)
    site = LocalSite(cfg, resolve_site(cfg, {"partition-id": 0}), tmp_path / "store")
    model = _calibrated_model(_benchmark_frames(tiny_benchmark), imgsz=cfg.train.imgsz)
    weights = yolo.save_weights(model, tmp_path / "model.pt")
    image_path = sorted(split_dir(site.spec.data_yaml, "test").glob("*.png"))[0]
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(image_path, folder / image_path.name)
    cloud = RegionCloud()
    site.cloud_client = lambda: cloud

    # Execute: the ClientApp's path on the first test image ...
    _, _, _, step, answered = next(site._collab_steps(yolo.load_weights(weights)))
    # ... and the runtime on that image alone
    settings = EdgeSettings.from_config(cfg.routing, site=site.spec.site_id, run_id="same", drain_timeout=30)
    edge_model = EdgeModel(weights, imgsz=cfg.train.imgsz, conf=settings.detector_conf, iou=cfg.eval.iou,
                           reload_every=0)
    runtime = EdgeRuntime(edge_model, RegionCloud(), settings, queue_dir=tmp_path / "q", out=tmp_path / "o.jsonl")
    source = FrameSource(folder)
    try:
        runtime.run(source)
    finally:
        source.close()
    lines = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]

    # Assert: the step offloaded (so the merge is not trivial), and both merged the same boxes
    refined = [r for r in lines if r["kind"] == "refined"]
    assert answered and step.entry is not None and len(refined) == 1
    assert len(step.merged) > 0 and len(step.keyframe.detections) + len(step.keyframe.candidates) > 1
    plain = [{k: d[k] for k in ("xyxy", "conf", "cls")} for d in refined[0]["detections"]]
    assert plain == step.merged.to_list()
    assert refined[0]["cloud_detections"] == step.cloud.to_list()


def test_runtime_halves_are_the_step(tmp_path):
    """detect_keyframe + plan_offload + merge_answer (the runtime's asynchronous use) equal collaborate()."""
    edge = Detections([[0, 0, 40, 40], [60, 60, 66, 66], [80, 10, 90, 20]], [0.9, 0.6, 0.1], [0, 1, 1])
    image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8), (5, 5), 0)
    s = CollabSettings(merge="cloud")
    whole = collaborate(image, lambda im: edge, RegionCloud(), s, site="s", frame=1)
    keyframe = detect_keyframe(image, lambda im: edge, s)
    entry = plan_offload(image, keyframe, s, site="s", run="eval", frame=1, created=0.0, model="eval")
    merged, items = merge_answer(entry.edge, RegionCloud().send(entry).detections, s)
    assert merged.to_list() == whole.merged.to_list() and entry.payloads == whole.entry.payloads
    assert [d["source"] for d in items] == ["edge"] * (len(merged) - len(whole.cloud)) + ["cloud"] * len(whole.cloud)
