"""clients/collab.py: the one collaboration step, shared by the edge runtime and the ClientApp's metrics."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import cv2
import numpy as np
import pytest

from clients.collab import (
    CONF_RANGE,
    OFFLOAD_GRID,
    CollabSettings,
    calibrate_conf,
    collaborate,
    detect_keyframe,
    measure_offload,
    merge_answer,
    plan_offload,
)
from clients.offload import CloudAnswer
from common.config import RoutingConfig, load_config
from common.detections import Detections, f1_threshold
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
    assert s.detector_conf == 0.1 and s.det_conf_source == "config"
    off = CollabSettings(candidate_conf=0.0)
    assert off.detector_conf == off.det_conf
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
    from tests.clients.test_edge import _benchmark_frames, _calibrated_model

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


def test_f1_threshold_hand_worked():
    """The docstring's example, ties keep the highest threshold, and no match gives None."""
    assert f1_threshold([0.3, 0.9, 0.5, 0.8, 0.6], [0, 1, 1, 1, 0], 4) == {
        "conf": 0.5, "f1": 0.75, "precision": 0.75, "recall": 0.75}
    # from 0.7 on: 2·1/(1+2) = 0.667; from 0.4 on: 2·2/(3+2) = 0.8 (0.4 twice: a threshold keeps both)
    assert f1_threshold([0.7, 0.4, 0.4], [1, 0, 1], 2)["conf"] == 0.4
    # 2 objects; from 0.9 on: 2/(1+2) = 2/3, 0.8: 2/4, 0.7: 2/5, 0.6: 4/(4+2) = 2/3: a tie, the higher one wins
    assert f1_threshold([0.9, 0.8, 0.7, 0.6], [1, 0, 0, 1], 2) == pytest.approx(
        {"conf": 0.9, "f1": 2 / 3, "precision": 1.0, "recall": 0.5})
    assert f1_threshold([0.5], [0], 2) is None and f1_threshold([], [], 0) is None


def test_calibrated_threshold_of_a_tiny_validation_set_is_the_f1_optimum_by_hand():
    """Two images, three objects (class 0 twice, class 1 once); detections by confidence:
    0.9 on object a (TP), 0.7 a false alarm, 0.45 on object b but class 1 while b is class 0 (class-aware: FP),
    0.4 on object c (TP), 0.3 on object b with its class (TP), 0.02 below the clip (never a candidate here).
    F1 = 2m/(k+3): from 0.9: 2/4 = 0.5; 0.7: 2/5 = 0.4; 0.45: 2/6 = 0.333; 0.4: 4/7 = 0.571; 0.3: 6/8 = 0.75 ->
    det_conf 0.3 (inside CONF_RANGE), precision 3/5, recall 1."""
    gts = [np.array([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]], float), np.array([[1, 50, 50, 60, 60]], float)]
    dets = [Detections([[0, 0, 10, 10], [70, 70, 80, 80], [20, 20, 30, 30], [20, 21, 30, 31]],
                       [0.9, 0.7, 0.45, 0.3], [0, 0, 1, 0]),
            Detections([[50, 50, 60, 61], [0, 0, 5, 5]], [0.4, 0.02], [1, 1])]
    assert calibrate_conf(dets, gts, nc=2) == pytest.approx({"det_conf": 0.3, "f1": 0.75, "precision": 0.6,
                                                              "recall": 1.0})
    # a lone confident true box: the optimum 0.9 is clipped to the range's top
    assert calibrate_conf([dets[0][[0]], Detections()], gts, nc=2)["det_conf"] == CONF_RANGE[1]
    assert calibrate_conf([Detections(), Detections()], gts, nc=2) is None


def test_for_model_takes_the_calibrated_threshold_unless_a_flag_set_one():
    s = CollabSettings(det_conf=0.25, candidate_conf=0.05)
    assert s.for_model({}) is s and s.for_model({"round": 2}) is s
    low = s.for_model({"det_conf": 0.12})
    assert (low.det_conf, low.candidate_conf, low.det_conf_source) == (0.12, 0.05, "model")
    # at or below the candidates' threshold the answer reaches that low itself: candidates off
    lower = s.for_model({"det_conf": 0.05})
    assert (lower.det_conf, lower.candidate_conf, lower.detector_conf) == (0.05, 0.0, 0.05)
    flag = CollabSettings(det_conf=0.3, det_conf_source="flag")
    assert flag.for_model({"det_conf": 0.12}).det_conf == 0.3
    with pytest.raises(ValueError, match="det_conf_source must be one of .*got 'user'"):
        CollabSettings(det_conf_source="user")
    # detect_keyframe splits at the model's threshold: 0.2 is an answer box at 0.12, a candidate at 0.25
    edge = Detections([[0, 0, 40, 40], [50, 50, 60, 60], [70, 70, 80, 80]], [0.9, 0.2, 0.03], [0, 0, 0])
    image = np.zeros((100, 100, 3), np.uint8)
    assert detect_keyframe(image, lambda im: edge, low).detections.conf.tolist() == [0.9, 0.2]
    assert detect_keyframe(image, lambda im: edge, s).candidates.conf.tolist() == [0.2]
    assert len(detect_keyframe(image, lambda im: edge, lower).candidates) == 0


# --------------------------------------------------------------------------- offloading chosen by a budget
MEASURED = {"frame_bytes": 10000.0, "options": [
    {"settings": {"offload": "none", "t_conf": 0.5, "candidate_conf": 0.05, "jpeg_quality": 90}, "bytes": 0.0,
     "map50": 0.30, "recall": 0.40},
    {"settings": {"offload": "crops", "t_conf": 0.7, "candidate_conf": 0.0, "jpeg_quality": 90}, "bytes": 2000.0,
     "map50": 0.35, "recall": 0.50},
    {"settings": {"offload": "cloud", "t_conf": 0.5, "candidate_conf": 0.05, "jpeg_quality": 25}, "bytes": 10000.0,
     "map50": 0.60, "recall": 0.80}]}


def test_for_model_runs_the_offload_the_budget_picks_unless_a_flag_set_it():
    """A quarter of a keyframe (2 500 B) buys the crops at t_conf 0.7 without candidates; a whole keyframe buys
    the cloud alone (better here) at JPEG quality 25; a flag or no budget keeps the configured offload."""
    s = CollabSettings(det_conf=0.25, candidate_conf=0.05, budget="frame:0.25")
    meta = {"det_conf": 0.2, "offload": MEASURED}
    crops = s.for_model(meta)
    assert (crops.offload, crops.t_conf, crops.candidate_conf, crops.det_conf) == ("crops", 0.7, 0.0, 0.2)
    assert crops.offload_source == "budget" and crops.detector_conf == 0.2
    whole = replace(s, budget="frame:1").for_model(meta)
    assert (whole.offload, whole.jpeg_quality, whole.candidate_conf, whole.offload_source) == ("cloud", 25, 0.05,
                                                                                                "budget")
    flagged = replace(s, offload="frame", offload_source="flag").for_model(meta)
    assert (flagged.offload, flagged.t_conf, flagged.offload_source) == ("frame", 0.5, "flag")
    unbudgeted = replace(s, budget="").for_model(meta)
    assert (unbudgeted.offload, unbudgeted.offload_source, unbudgeted.det_conf) == ("crops", "config", 0.2)
    assert s.for_model({"det_conf": 0.2}).offload_source == "config"  # a model that measured nothing
    # a flagged answer threshold at or below the option's candidates turns them off
    low = CollabSettings(det_conf=0.04, candidate_conf=0.0, det_conf_source="flag", budget="frame:1")
    assert low.for_model(meta).candidate_conf == 0.0
    with pytest.raises(ValueError, match="budget 'bytes=1': expected"):
        CollabSettings(budget="bytes=1")
    with pytest.raises(ValueError, match="offload must be one of .*got 'tiles'"):
        CollabSettings(offload="tiles")


def test_cloud_mode_sends_every_keyframe_whole_and_answers_with_the_cloud_alone_none_sends_nothing():
    edge = Detections([[0, 0, 40, 40], [80, 10, 90, 20]], [0.9, 0.1], [0, 1])
    image = np.zeros((100, 120, 3), np.uint8)
    answer = Detections([[1, 0, 41, 40], [50, 50, 60, 60]], [0.3, 0.8], [2, 1])

    class Cloud:
        def __init__(self):
            self.modes = []

        def send(self, entry):
            self.modes.append(entry.mode)
            return CloudAnswer(answer, rtt_ms=1.0)

    cloud = Cloud()
    step = collaborate(image, lambda im: edge, cloud, CollabSettings(offload="cloud"), site="s")
    assert step.entry.regions == [[0, 0, 120, 100]] and step.entry.offloaded == [True, True]
    assert step.merged.to_list() == answer.to_list()  # not fused with the edge's confident box
    # also a keyframe where the edge finds nothing
    empty = collaborate(image, lambda im: Detections(), cloud, CollabSettings(offload="cloud"), site="s")
    assert empty.merged.to_list() == answer.to_list() and cloud.modes == ["cloud", "cloud"]
    # the runtime's later merge of a queued cloud entry, whatever its own settings' mode
    assert merge_answer(step.entry.edge, answer, CollabSettings(), step.entry.offloaded, "cloud")[0].to_list() == \
        answer.to_list()
    alone = collaborate(image, lambda im: edge, cloud, CollabSettings(offload="none"), site="s")
    assert alone.entry is None and alone.merged.to_list() == edge[[0]].to_list() and len(cloud.modes) == 2


def test_measure_offload_hand_worked():
    """One image, objects A [0,0,40,40] class 0 and B [80,10,90,20] class 1; the edge finds A alone at 0.9
    (confident, 1600 px²: nothing ambiguous, no candidate). A cloud that finds A and B on the whole frame, nothing
    on crops. Edge, crops and frame (nothing ambiguous): nothing sent, recall 1/2, mAP50 (1 + 0) / 2; frame at
    t_conf 1 (A ambiguous) and the cloud alone: the whole frame, recall 1, mAP50 1, sent to the cloud once.
    (A perfect ranking's AP is 0.995 under Ultralytics' 101-point interpolation, so "1" reads 0.995.)"""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (100, 120, 3), dtype=np.uint8), (5, 5), 0)
    gt = np.array([[0, 0, 0, 40, 40], [1, 80, 10, 90, 20]], float)
    found = Detections([[0, 0, 40, 40]], [0.9], [0])
    truth = Detections(gt[:, 1:], [0.8, 0.8], [0, 1])

    class Cloud:
        calls = 0

        def send(self, entry):
            Cloud.calls += 1
            return CloudAnswer(truth if entry.mode != "crops" else Detections(), rtt_ms=1.0)

    grid = [{"offload": "none"}, {"offload": "crops"}, {"offload": "frame"}, {"offload": "frame", "t_conf": 1.0},
            {"offload": "cloud"}]
    measured = measure_offload([image], [gt], [found], Cloud(), CollabSettings(), nc=2, site="s", grid=grid)

    frame_bytes = len(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
    assert measured["frame_bytes"] == frame_bytes and Cloud.calls == 1
    got = [(o["settings"]["offload"], o["settings"]["t_conf"], o["bytes"], o["map50"], o["recall"])
           for o in measured["options"]]
    ap1 = 0.995
    assert got == [("none", 0.5, 0, ap1 / 2, 0.5), ("crops", 0.5, 0, ap1 / 2, 0.5), ("frame", 0.5, 0, ap1 / 2, 0.5),
                   ("frame", 1.0, frame_bytes, ap1, 1.0), ("cloud", 0.5, frame_bytes, ap1, 1.0)]
    assert measured["options"][0]["settings"] == {"offload": "none", "t_conf": 0.5, "candidate_conf": 0.05,
                                                  "jpeg_quality": 90}
    # what the runtime then runs: a quarter of the frame buys nothing better than the edge; a whole frame the cloud
    s = CollabSettings(budget="frame:0.25")
    assert s.for_model({"offload": measured}).offload == "none"
    assert replace(s, budget="frame:1").for_model({"offload": measured}).option() == {
        "offload": "frame", "t_conf": 1.0, "candidate_conf": 0.05, "jpeg_quality": 90}


def test_the_grid_has_every_mode():
    assert {o["offload"] for o in OFFLOAD_GRID} == {"none", "crops", "frame", "cloud"}
    assert all(CollabSettings().with_option(o).offload == o["offload"] for o in OFFLOAD_GRID)
