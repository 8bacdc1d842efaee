"""The edge runtime (clients/edge.py).

Three layers:

- the runtime in-process on a synthetic 6-frame video with a scripted edge
  detector and a fake cloud client (the only mocks): JSON-line schema, edge
  lines out before the cloud is even allowed to answer, refined = ``merge()``,
  retries, the disk queue across runs, refusals, and model hot-swap with real
  weights files;
- the ONNX Runtime predictor against the PyTorch predictor and against
  :func:`common.yolo.predict` on a benchmark frame;
- ``python -m clients.edge`` as a real process against the real cloud service
  (``-m integration``): cloud up, and cloud down then back.

An untrained YOLO11n scores every anchor alike (~0.0016), which makes NMS a
coin toss; :func:`_calibrated_model` gives it data-driven BatchNorm statistics
and a random class layer, so scores spread out (about 10 boxes per frame at
conf 0.25, some above 0.5) and the comparisons are well defined.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from clients.carry import RefinedCarrier, flow_shift
from clients.detector import (
    EdgeModel,
    StaticModel,
    TorchPredictor,
    file_version,
    letterbox,
    postprocess,
    postprocess_end2end,
)
from clients.edge import EdgeRuntime, EdgeSettings
from clients.media import EdgeError, Frame, FrameSource
from clients.offload import CloudAnswer, CloudRejected, CloudUnavailable, DiskQueue, OffloadEntry
from common.detections import Detections
from common.routing import merge
from tests import REPO
from tests.deploy_helpers import free_port, stop_tree, tail

TOKEN = "edge-test-token"
NAMES = ["insulator", "bird_nest", "damper", "bolt", "crack", "rust", "vehicle", "person"]
EDGE_KEYS = {"kind", "site", "run", "frame", "time", "pts_s", "keyframe", "keyframe_reason", "source_frame", "model",
             "detections", "candidates", "offload", "latency_ms"}
REFINED_KEYS = {"kind", "site", "run", "frame", "offload_id", "time", "pts_s", "keyframe", "model", "mode",
                "detections", "cloud_detections", "latency_ms", "bytes_sent", "request_bytes", "attempts",
                "cloud_model", "recovered"}


# =========================================================================== helpers


def _synthetic_frames() -> list[np.ndarray]:
    """6 frames 96x128: a dark textured scene (frames 0-3), then a bright one (4-5): a scene cut at 4."""
    rng = np.random.default_rng(0)
    dark = cv2.GaussianBlur(rng.integers(0, 80, (96, 128, 3), dtype=np.uint8), (7, 7), 0)
    bright = cv2.GaussianBlur(rng.integers(170, 255, (96, 128, 3), dtype=np.uint8), (7, 7), 0)
    return [dark] * 4 + [bright] * 2


def _write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


@pytest.fixture
def video(tmp_path) -> Path:
    return _write_video(tmp_path / "synthetic.mp4", _synthetic_frames())


# the scripted edge detector: a confident 40x40 box (stable track) and a low-confidence 6x6 box
EDGE = Detections([[10, 10, 50, 50], [70, 40, 76, 46]], [0.9, 0.3], [0, 1])


def _cloud_for(entry: OffloadEntry) -> Detections:
    """The fake cloud's answer: the small object re-detected (class 1, 0.8); on frame 0 also a box that
    overlaps the confident edge box (IoU 1560/1640 ≈ 0.95, class 2) and so replaces it in the merge."""
    small = Detections([[70.5, 40.2, 76.5, 46.1]], [0.8], [1])
    if entry.frame == 0:
        return Detections.concat([small, Detections([[11, 10, 51, 50]], [0.95], [2])])
    return small


class FakeCloud:
    """``send(entry)``: optionally waits for ``release``, fails the first ``fail_first`` calls, refuses the
    frames in ``reject``, else answers :func:`_cloud_for`. Records every call."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False, release: threading.Event | None = None,
                 reject: tuple[int, ...] = ()):
        self.fail_first, self.always_fail, self.release, self.reject = fail_first, always_fail, release, reject
        self.calls: list[str] = []
        self.entries: list[OffloadEntry] = []
        self.released_in_time: list[bool] = []

    def send(self, entry: OffloadEntry) -> CloudAnswer:
        self.calls.append(entry.id)
        if self.release is not None:
            self.released_in_time.append(self.release.wait(20))
        if self.always_fail or len(self.calls) <= self.fail_first:
            raise CloudUnavailable("connection refused (fake)")
        if entry.frame in self.reject:
            raise CloudRejected("HTTP 413: too big (fake)")
        self.entries.append(entry)
        return CloudAnswer(_cloud_for(entry), rtt_ms=5.0, request_bytes=entry.payload_bytes + 300, model="fake")


def _frames_of(path: Path, done: threading.Event | None = None):
    """The video's frames; sets ``done`` only once the runtime asks for a frame after the last one."""
    source = FrameSource(path)
    try:
        yield from source
    finally:
        source.close()
    if done is not None:
        done.set()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _settings(**kw) -> EdgeSettings:
    # boxes on non-keyframes stay as detected (flow propagation has its own test); crops offloaded and the cloud's
    # box winning overlaps (hand-checked regions and sources below; whole frames and fuse have their own tests)
    base = dict(site="site-7", run_id="runA", max_gap=2, retry_base=0.01, retry_max=0.05, drain_timeout=20,
                propagate=False, offload="crops", merge="cloud")
    return EdgeSettings(**{**base, **kw})


def _run(tmp_path: Path, frames, cloud, name: str = "out", **kw) -> tuple[list[dict], EdgeRuntime]:
    runtime = EdgeRuntime(StaticModel(lambda image: EDGE, "v-fake"), cloud, _settings(**kw),
                          queue_dir=tmp_path / "queue", out=tmp_path / f"{name}.jsonl")
    runtime.run(frames)
    return _lines(tmp_path / f"{name}.jsonl"), runtime


def _plain(items: list[dict]) -> list[dict]:
    return [{k: d[k] for k in ("xyxy", "conf", "cls")} for d in items]


def _calibrated_model(frames: list[np.ndarray], seed: int = 0, imgsz: int = 128, arch: str = "yolo11n"):
    """``arch`` with BatchNorm statistics from ``frames`` and random class layers (std 0.1, bias -3)."""
    import torch

    from common import yolo

    model = yolo.build_model(arch, len(NAMES), seed=seed, names=NAMES)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics
    model.train()
    batch = torch.from_numpy(np.concatenate([letterbox(f, imgsz)[0] for f in frames]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(batch)
        head = model.model[-1]
        for seq in [*head.cv3, *(head.one2one_cv3 if yolo.is_end2end(model) else [])]:
            seq[-1].weight.normal_(0, 0.1, generator=generator)
            seq[-1].bias.fill_(-3.0)
    return model.eval()


def _benchmark_frames(tiny_benchmark, site: int = 0) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(tiny_benchmark.video_dir(site) / "video.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


# =========================================================================== pure pieces


def _moving_square(n: int = 7, step: tuple[int, int] = (3, 2)) -> tuple[list[np.ndarray], list[list[float]]]:
    """Frames of a textured 12 px square on a smooth background, moving ``step`` px per frame; its boxes."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    background = cv2.GaussianBlur(rng.integers(90, 130, (96, 128, 3), dtype=np.uint8), (9, 9), 0)
    frames, boxes = [], []
    for t in range(n):
        x, y = 20 + step[0] * t, 20 + step[1] * t
        frame = background.copy()
        frame[y:y + 12, x:x + 12] = texture
        frames.append(frame)
        boxes.append([float(x), float(y), float(x + 12), float(y + 12)])
    return frames, boxes


def test_flow_shift_follows_a_moving_texture():
    """A square moved (3, 2) px: its box moves by (3, 2) within 0.25 px, keeps its size; no boxes -> none."""
    frames, boxes = _moving_square(2)
    prev, cur = (cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames)

    moved = flow_shift(prev, cur, np.array([boxes[0]]))

    np.testing.assert_allclose(moved, [boxes[1]], atol=0.25)
    assert flow_shift(prev, cur, np.zeros((0, 4))).shape == (0, 4)


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def test_refined_carrier_moves_each_answer_box_by_its_own_flow():
    """Keyframe 0 offloaded; its answer arrives after frame 2: frames 1, 2 come out with frame 3, then frame 4 at
    once. The cloud's box on the square (moving (3, 2) px per frame) follows it; the edge's box on the still
    background stays. Keyframe 5 (not offloaded) ends the window: nothing for frame 6, nor for a late answer."""
    frames, boxes = _moving_square(7)
    edge = [{"xyxy": [60.0, 60.0, 80.0, 80.0], "conf": 0.3, "cls": 2, "track": 1, "reasons": ["low_conf"]}]
    cloud = Detections([boxes[0]], [0.8], [1])
    carrier = RefinedCarrier()
    keys = {0: True, 5: False}  # keyframe -> offloaded

    out = {}
    for t, frame in enumerate(frames):
        if t == 3:
            carrier.answered(0, {"id": "x"}, edge, cloud)
        got = carrier.frame(t, t / 10, _gray(frame), t in keys, keys.get(t, False))
        out[t] = [r[0] for r in got]
        for index, pts_s, key, meta, moved_edge, moved_cloud in got:
            assert (key, meta, pts_s) == (0, {"id": "x"}, index / 10)
            np.testing.assert_allclose(moved_cloud.xyxy, [boxes[index]], atol=0.5)
            np.testing.assert_allclose(moved_edge[0]["xyxy"], edge[0]["xyxy"], atol=0.5)
            assert {k: v for k, v in moved_edge[0].items() if k != "xyxy"} == {k: v for k, v in edge[0].items()
                                                                            if k != "xyxy"}
            assert moved_cloud.conf.tolist() == [0.8] and moved_cloud.cls.tolist() == [1]
    carrier.answered(5, {"id": "y"}, edge, cloud)

    assert out == {0: [], 1: [], 2: [], 3: [1, 2, 3], 4: [4], 5: [], 6: []}
    assert carrier.flush() == [] and edge[0]["xyxy"] == [60.0, 60.0, 80.0, 80.0]


def test_refined_carrier_keeps_boxes_still_without_flow_and_drops_frames_past_its_memory_cap():
    frames, boxes = _moving_square(4)
    grays = [_gray(f) for f in frames]
    cloud = Detections([boxes[0]], [0.8], [1])
    still = RefinedCarrier(move=False)
    for t, gray in enumerate(grays):
        still.frame(t, None, gray, t == 0, True)
    still.answered(0, {}, [], cloud)
    assert [(r[0], r[5].xyxy.tolist()) for r in still.flush()] == [(t, [boxes[0]]) for t in (1, 2, 3)]

    capped = RefinedCarrier(max_bytes=int(2.5 * grays[0].nbytes))  # keyframe + 1 frame fit, a third does not
    for t, gray in enumerate(grays):
        capped.frame(t, None, gray, t == 0, True)
    capped.answered(0, {}, [], cloud)
    assert capped.flush() == []


def test_propagate_moves_reused_boxes_on_non_keyframes(tmp_path):
    """max_gap 3: frames 1, 2, 4, 5 reuse a keyframe's box; with --propagate they follow the square."""
    frames, boxes = _moving_square(6)
    by_frame = {f.tobytes(): b for f, b in zip(frames, boxes)}  # the scripted detector finds the square exactly
    model = StaticModel(lambda image: Detections([by_frame[image.tobytes()]], [0.9], [0]), "v-square")
    out = {}
    for flow in (False, True):
        runtime = EdgeRuntime(model, FakeCloud(), _settings(max_gap=3, propagate=flow, beta=100.0),
                              queue_dir=tmp_path / f"q{flow}", out=tmp_path / f"{flow}.jsonl")
        runtime.run(iter([Frame(i, f, i / 10, float(i)) for i, f in enumerate(frames)]))
        out[flow] = [ln for ln in _lines(tmp_path / f"{flow}.jsonl") if ln["kind"] == "edge"]

    assert [ln["keyframe"] for ln in out[True]] == [True, False, False, True, False, False]
    for t, (plain, moved) in enumerate(zip(out[False], out[True])):
        np.testing.assert_allclose(moved["detections"][0]["xyxy"], boxes[t], atol=0.5)
        np.testing.assert_allclose(plain["detections"][0]["xyxy"], boxes[t - t % 3], atol=1e-4)


class _SquareCloud(FakeCloud):
    """Answers each keyframe with the moving square's true box there (class 3, 0.8)."""

    def __init__(self, boxes: list[list[float]], release: threading.Event | None = None):
        super().__init__(release=release)
        self.boxes = boxes

    def send(self, entry: OffloadEntry) -> CloudAnswer:
        if self.release is not None:
            self.released_in_time.append(self.release.wait(20))
        return CloudAnswer(Detections([self.boxes[entry.frame]], [0.8], [3]), rtt_ms=5.0, request_bytes=1, model="f")


@pytest.mark.parametrize("late", [False, True], ids=["answers-at-once", "answers-after-the-last-frame"])
def test_carried_lines_follow_the_object_on_the_frames_after_each_keyframe(tmp_path, late):
    """max_gap 3, the square moving (3, 2) px per frame: the edge sees it at 0.3 (offloaded), the cloud answers
    its box (which replaces the edge's in the merge). Frames 1, 2, 4, 5 each get one carried line whose box is
    on the square there, whether the answers come at once or only after the last frame."""
    frames, boxes = _moving_square(6)
    done = threading.Event() if late else None
    cloud = _SquareCloud(boxes, release=done)
    by_frame = {f.tobytes(): b for f, b in zip(frames, boxes)}
    runtime = EdgeRuntime(StaticModel(lambda image: Detections([by_frame[image.tobytes()]], [0.3], [3]), "v-sq"), cloud,
                          _settings(max_gap=3, propagate=True, beta=100.0), queue_dir=tmp_path / "q",
                          out=tmp_path / "out.jsonl")
    source = [Frame(i, f, i / 10, float(i)) for i, f in enumerate(frames)]

    def frames_then_release():
        yield from source
        if done is not None:
            done.set()

    runtime.run(frames_then_release())
    lines = _lines(tmp_path / "out.jsonl")
    carried = {ln["frame"]: ln for ln in lines if ln["kind"] == "carried"}

    assert sorted(carried) == [1, 2, 4, 5] and lines[-1]["carried"] == 4
    for t, ln in carried.items():
        assert ln["source_frame"] == t - t % 3 and [d["source"] for d in ln["detections"]] == ["cloud"]
        np.testing.assert_allclose(ln["detections"][0]["xyxy"], boxes[t], atol=0.5)
        np.testing.assert_allclose(ln["cloud_detections"][0]["xyxy"], boxes[t], atol=0.5)
    position = {(ln["kind"], ln.get("frame")): i for i, ln in enumerate(lines)}
    assert all(position[("carried", t)] > position[("edge", t)] for t in carried)
    if late:  # nothing could be carried before the end: every carried line comes after every edge line
        assert cloud.released_in_time == [True, True]
        assert min(position[("carried", t)] for t in carried) > max(position[("edge", t)] for t in range(6))


def test_letterbox_hand_checked():
    # 64x128 (HxW) into 320: r = min(320/64, 320/128) = 2.5 -> 320x160 (WxH), 80 px grey above and below
    image = np.full((64, 128, 3), 200, np.uint8)
    x, lb = letterbox(image, 320)
    assert x.shape == (1, 3, 320, 320) and x.dtype == np.float32
    assert (lb.gain_x, lb.gain_y, lb.left, lb.top) == (2.5, 2.5, 0, 80)
    assert np.allclose(x[0, :, 0, 0], 114 / 255) and np.allclose(x[0, :, 160, 160], 200 / 255)
    # auto: pad only to a multiple of 32 -> 320x160 input
    x, lb = letterbox(image, 320, stride=32, auto=True)
    assert x.shape == (1, 3, 160, 320) and lb.top == 0
    # BGR -> RGB
    x, _ = letterbox(np.array([[[255, 0, 0]]], np.uint8), 32)
    assert x[0, :, 16, 16].tolist() == [0.0, 0.0, 1.0]


def test_postprocess_maps_back_through_the_letterbox():
    # anchors (cx, cy, w, h; 2 class scores) on a 320 input from a 64x128 frame (gain 2.5, top 80)
    raw = np.array([[100, 100, 101], [120, 120, 200], [50, 50, 10], [40, 40, 10],   # 2 overlapping + 1 apart
                    [0.9, 0.8, 0.1], [0.1, 0.1, 0.6]], np.float32)
    dets = postprocess(raw, letterbox(np.zeros((64, 128, 3), np.uint8), 320)[1], conf=0.25, iou=0.7)
    # anchor 0: [75, 100, 125, 140] -> x/2.5, (y - 80)/2.5 -> [30, 8, 50, 24]; anchor 1 suppressed (IoU > 0.7);
    # anchor 2: class 1 at 0.6: [96, 195, 106, 205] -> [38.4, 46, 42.4, 50]
    assert np.allclose(dets.xyxy, [[30, 8, 50, 24], [38.4, 46, 42.4, 50]])
    assert np.allclose(dets.conf, [0.9, 0.6]) and dets.cls.tolist() == [0, 1]


def test_postprocess_end2end_keeps_the_heads_boxes_without_nms():
    # decided boxes (x1, y1, x2, y2, score, class) on a 320 input from a 64x128 frame (gain 2.5, top 80)
    raw = np.array([[75, 100, 125, 140, 0.9, 0], [76, 100, 125, 140, 0.8, 0],  # overlapping: both kept
                    [96, 195, 106, 205, 0.6, 1], [0, 0, 10, 10, 0.2, 1], [300, 270, 330, 330, 0.5, 0]], np.float32)
    dets = postprocess_end2end(raw, letterbox(np.zeros((64, 128, 3), np.uint8), 320)[1], conf=0.25)
    # x / 2.5, (y - 80) / 2.5, clipped to 128 x 64: row 3 is under conf; row 4 -> [120, 76, 132, 100] -> clipped
    assert np.allclose(dets.xyxy, [[30, 8, 50, 24], [30.4, 8, 50, 24], [38.4, 46, 42.4, 50], [120, 64, 128, 64]])
    assert np.allclose(dets.conf, [0.9, 0.8, 0.6, 0.5]) and dets.cls.tolist() == [0, 0, 1, 0]


def test_frame_source_reads_videos_and_folders_and_names_bad_sources(tmp_path, video):
    frames = list(FrameSource(video))
    assert [f.index for f in frames] == list(range(6)) and frames[0].image.shape == (96, 128, 3)
    assert [f.pts_s for f in frames[:3]] == [0.0, 0.1, 0.2]  # 10 fps
    folder = tmp_path / "images"
    folder.mkdir()
    for i, frame in enumerate(_synthetic_frames()[:3]):
        cv2.imwrite(str(folder / f"{2 - i:03d}.png"), frame)
    listed = list(FrameSource(folder, fps=5))
    assert len(listed) == 3 and listed[1].pts_s == 0.2
    assert np.array_equal(listed[0].image, _synthetic_frames()[2])  # sorted by name: 000.png first
    assert len(list(FrameSource(video, max_frames=2))) == 2
    with pytest.raises(EdgeError, match="no such file"):
        FrameSource(tmp_path / "missing.mp4")
    with pytest.raises(EdgeError, match="--site"):
        EdgeSettings(site="a b")


# =========================================================================== the runtime, fake cloud


def test_edge_lines_first_then_refined_lines_equal_merge(tmp_path, video):
    # Prepare: the cloud may not answer before the runtime has read past the last frame
    done = threading.Event()
    cloud = FakeCloud(release=done)
    # Execute
    lines, runtime = _run(tmp_path, _frames_of(video, done), cloud)
    # Assert: every edge line precedes every refined line (output never waited for the cloud)
    kinds = [ln["kind"] for ln in lines]
    assert kinds[:6] == ["edge"] * 6 and kinds[-1] == "summary"
    assert Counter(kinds) == {"edge": 6, "refined": 3, "carried": 3, "summary": 1}
    assert cloud.released_in_time == [True] * 3
    edge = [ln for ln in lines if ln["kind"] == "edge"]
    for ln in edge:
        assert set(ln) == EDGE_KEYS, set(ln) ^ EDGE_KEYS
        assert ln["site"] == "site-7" and ln["run"] == "runA" and ln["model"] == "v-fake"
    # keyframes: first, gap (max_gap=2), cut (the bright scene); others reuse the last keyframe's result
    assert [ln["keyframe"] for ln in edge] == [True, False, True, False, True, False]
    assert [ln["keyframe_reason"] for ln in edge] == ["first", None, "gap", None, "cut", None]
    assert [ln["source_frame"] for ln in edge] == [0, 0, 2, 2, 4, 4]
    assert [ln["pts_s"] for ln in edge] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    for ln in edge:
        assert _plain(ln["detections"]) == EDGE.to_list()
        # the 40x40 box at 0.9 is confident; the 6x6 box at 0.3 is low-confidence and small (36 px² < 256)
        assert [d["reasons"] for d in ln["detections"]] == [[], ["low_conf", "small"]]
        assert ln["latency_ms"]["total"] >= 0
    key = [ln for ln in edge if ln["keyframe"]]
    assert [ln["offload"]["id"] for ln in key] == ["site-7.runA.000000", "site-7.runA.000002", "site-7.runA.000004"]
    for ln in key:
        # the small box [70, 40, 76, 46] with 50 % context is [67, 37, 79, 49], grown to 32x32 -> [57, 27, 89, 59]
        assert ln["offload"]["regions"] == [[57, 27, 89, 59]] and ln["offload"]["detections"] == 1
        assert ln["offload"]["bytes"] > 0 and ln["latency_ms"]["edge"] is not None
    assert all(ln["offload"] is None and ln["latency_ms"]["edge"] is None for ln in edge if not ln["keyframe"])
    # what was sent: one 32x32 JPEG crop per keyframe, tagged <run>.<frame>
    assert [e.tag for e in cloud.entries] == ["runA.000000", "runA.000002", "runA.000004"]
    crop = cv2.imdecode(np.frombuffer(cloud.entries[0].payloads[0], np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape == (32, 32, 3)
    # refined = merge(edge, cloud, offloaded): frame 0 -> the cloud's two boxes (its box replaces the edge one);
    # frames 2, 4 -> the confident edge box, then the cloud's small box
    refined = {ln["frame"]: ln for ln in lines if ln["kind"] == "refined"}
    assert sorted(refined) == [0, 2, 4]
    for frame, ln in refined.items():
        assert set(ln) == REFINED_KEYS, set(ln) ^ REFINED_KEYS
        edge_line = edge[frame]
        expected = merge(Detections.from_list(edge_line["detections"]), Detections.from_list(ln["cloud_detections"]),
                         [bool(d["reasons"]) for d in edge_line["detections"]],
                         keep_unanswered=EdgeSettings.keep_unanswered)
        assert _plain(ln["detections"]) == expected.to_list()
        assert ln["offload_id"] == edge_line["offload"]["id"] and ln["attempts"] == 1 and not ln["recovered"]
        assert ln["bytes_sent"] == edge_line["offload"]["bytes"] and ln["latency_ms"]["cloud_rtt"] == 5.0
        assert ln["latency_ms"]["since_edge"] >= 0 and ln["cloud_model"] == "fake"
    assert [(d["cls"], d["source"]) for d in refined[0]["detections"]] == [(1, "cloud"), (2, "cloud")]
    assert [(d["xyxy"], d["source"]) for d in refined[2]["detections"]] == [
        ([10.0, 10.0, 50.0, 50.0], "edge"), ([70.5, 40.2, 76.5, 46.1], "cloud")]
    # each non-keyframe gets its keyframe's refined answer, unmoved here (propagate off), the same merge
    carried = {ln["frame"]: ln for ln in lines if ln["kind"] == "carried"}
    assert sorted(carried) == [1, 3, 5]
    for frame, ln in carried.items():
        src = refined[frame - 1]
        assert (ln["source_frame"], ln["offload_id"]) == (frame - 1, src["offload_id"])
        assert ln["pts_s"] == edge[frame]["pts_s"]
        assert ln["detections"] == src["detections"] and ln["cloud_detections"] == src["cloud_detections"]
        assert ln["edge_detections"] == edge[frame - 1]["detections"]
    summary = lines[-1]
    assert (summary["frames"], summary["keyframes"], summary["offloaded_frames"], summary["offloaded_detections"],
            summary["refined"], summary["carried"], summary["queue_left"], summary["failed"]) == \
        (6, 3, 3, 3, 3, 3, 0, 0)
    assert summary["bytes_sent"] == summary["bytes_queued"] == sum(ln["offload"]["bytes"] for ln in key)
    # the queue is empty; the delivered ids are on disk
    assert list((tmp_path / "queue").glob("*.json")) == []
    assert (tmp_path / "queue" / "delivered.log").read_text().split() == [ln["offload"]["id"] for ln in key]


@pytest.mark.parametrize("sequence", [False, True])
def test_a_photo_folder_answers_every_image_from_itself_and_sequence_keeps_the_video_rules(tmp_path, sequence):
    """The 6 synthetic frames as a folder. Photos (the default): 6 keyframes ("photo"), each offloaded and refined
    from its own boxes, no track ids, no "unstable", no carried line. ``sequence``: the video rules (keyframes
    first, gap, cut with max_gap=2; carried lines on frames 1, 3, 5), as on the video file."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, frame in enumerate(_synthetic_frames()):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    source = FrameSource(folder, sequence=sequence)
    assert source.photos is not sequence
    lines, _ = _run(tmp_path, source, FakeCloud(), photos=source.photos)
    edge = [ln for ln in lines if ln["kind"] == "edge"]
    refined = {ln["frame"]: ln for ln in lines if ln["kind"] == "refined"}
    carried = [ln["frame"] for ln in lines if ln["kind"] == "carried"]
    if sequence:
        assert [ln["keyframe_reason"] for ln in edge] == ["first", None, "gap", None, "cut", None]
        assert sorted(refined) == [0, 2, 4] and carried == [1, 3, 5]
        assert {d["track"] for ln in edge for d in ln["detections"]} != {-1}
        return
    assert [(ln["keyframe"], ln["keyframe_reason"], ln["source_frame"]) for ln in edge] == [
        (True, "photo", i) for i in range(6)]
    assert carried == [] and sorted(refined) == list(range(6)) and lines[-1]["carried"] == 0
    assert lines[-1]["keyframes"] == 6 and lines[-1]["refined"] == 6
    for ln in edge:  # no tracks across images: every box untracked, nothing "unstable"
        assert [(d["track"], d["reasons"]) for d in ln["detections"]] == [(-1, []), (-1, ["low_conf", "small"])]
        assert ln["offload"]["id"] == f"site-7.runA.{ln['frame']:06d}"
    for frame, ln in refined.items():  # each image's answer: its own edge boxes merged with its own cloud answer
        expected = merge(EDGE, Detections.from_list(ln["cloud_detections"]), [False, True],
                         keep_unanswered=EdgeSettings.keep_unanswered, resolve="cloud")
        assert _plain(ln["detections"]) == expected.to_list()


def test_frame_mode_sends_the_whole_keyframe_and_fuse_merges_it(tmp_path, video):
    """Whole keyframes, merge fuse (the default), unanswered edge boxes kept (the default): each refined line =
    common.routing.merge(..., resolve="fuse")."""
    assert (EdgeSettings.offload, EdgeSettings.merge, EdgeSettings.keep_unanswered) == ("crops", "fuse", True)
    cloud = FakeCloud()
    lines, _ = _run(tmp_path, _frames_of(video), cloud, offload="frame", merge=EdgeSettings.merge)
    key = [ln for ln in lines if ln["kind"] == "edge" and ln["keyframe"]]
    assert all(ln["offload"]["regions"] == [[0, 0, 128, 96]] for ln in key)
    image = cv2.imdecode(np.frombuffer(cloud.entries[0].payloads[0], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (96, 128, 3) and cloud.entries[0].mode == "frame"
    refined = [ln for ln in lines if ln["kind"] == "refined"]
    assert len(refined) == 3
    by_frame = {k["frame"]: k["detections"] for k in key}
    differs = []
    for ln in refined:
        edge, answer = Detections.from_list(by_frame[ln["frame"]]), Detections.from_list(ln["cloud_detections"])
        reasons = [bool(d["reasons"]) for d in by_frame[ln["frame"]]]
        expected = merge(edge, answer, reasons, keep_unanswered=True, resolve="fuse")
        assert _plain(ln["detections"]) == expected.to_list()
        differs.append(expected.to_list() != merge(edge, answer, reasons, keep_unanswered=True).to_list())
    assert any(differs)  # the fake cloud's boxes overlap edge boxes: fusing is not the cloud winning


class _SilentCloud(FakeCloud):
    """Answers every offload with no detections."""

    def send(self, entry: OffloadEntry) -> CloudAnswer:
        self.entries.append(entry)
        return CloudAnswer(Detections.empty(), rtt_ms=5.0, request_bytes=entry.payload_bytes, model="fake")


def test_candidates_are_offloaded_and_kept_only_where_the_cloud_confirms_them(tmp_path, video):
    """det_conf 0.5 (candidates on): the edge's 0.3 box is a candidate, not part of its answer, but sent
    (crop [57,27,89,59]).
    The fake cloud re-detects it ([70.5,40.2,76.5,46.1] 0.8, IoU 31.9/39.5 ≈ 0.81): fused, noisy-or
    1 - 0.7·0.2 = 0.86, before the confident edge box 0.9 (frame 2). A silent cloud: the candidate is gone."""
    lines, _ = _run(tmp_path, _frames_of(video), FakeCloud(), det_conf=0.5, candidate_conf=0.05, merge="fuse")
    edge = [ln for ln in lines if ln["kind"] == "edge" and ln["keyframe"]]
    for ln in edge:
        assert [d["conf"] for d in ln["detections"]] == pytest.approx([0.9])
        assert [(d["xyxy"], d["reasons"], d["track"]) for d in ln["candidates"]] == [
            ([70.0, 40.0, 76.0, 46.0], ["candidate"], -1)]
        assert ln["offload"]["regions"] == [[57, 27, 89, 59]]
        assert (ln["offload"]["detections"], ln["offload"]["candidates"]) == (0, 1)
    refined = {ln["frame"]: ln for ln in lines if ln["kind"] == "refined"}
    assert sorted(refined) == [0, 2, 4]
    assert [d["conf"] for d in refined[2]["detections"]] == pytest.approx([0.86, 0.9])

    silent, _ = _run(tmp_path / "silent", _frames_of(video), _SilentCloud(), det_conf=0.5, candidate_conf=0.05,
                     merge="fuse")
    for ln in silent:
        if ln["kind"] == "refined":
            assert [d["conf"] for d in ln["detections"]] == pytest.approx([0.9])


def test_retries_with_backoff_while_the_cloud_is_down(tmp_path, video):
    cloud = FakeCloud(fail_first=4)  # the first offload fails 4 times, then everything goes through
    lines, runtime = _run(tmp_path, _frames_of(video), cloud)
    refined = [ln for ln in lines if ln["kind"] == "refined"]
    assert [ln["frame"] for ln in refined] == [0, 2, 4]  # in order
    assert [ln["attempts"] for ln in refined] == [5, 1, 1]
    assert cloud.calls[:5] == ["site-7.runA.000000"] * 5
    assert runtime.summary.queue_left == 0 and runtime.offloader.failures == 4


def test_cloud_down_nothing_lost_next_run_delivers_each_offload_once(tmp_path, video):
    # Prepare / Execute: run A with the cloud down, draining only 0.3 s
    lines_a, runtime_a = _run(tmp_path, _frames_of(video), FakeCloud(always_fail=True), "a", drain_timeout=0.3)
    # Assert: every edge line is out, the 3 offloads wait on disk with their payloads
    assert Counter(ln["kind"] for ln in lines_a) == {"edge": 6, "summary": 1}
    ids_a = [ln["offload"]["id"] for ln in lines_a if ln["kind"] == "edge" and ln["keyframe"]]
    queued = sorted((tmp_path / "queue").glob("*.json"))
    assert [DiskQueue.id_of(p) for p in queued] == ids_a and lines_a[-1]["queue_left"] == 3
    entry = OffloadEntry.from_json(json.loads(queued[0].read_text()))
    assert entry.regions == [[57, 27, 89, 59]] and entry.edge[0]["conf"] == 0.9 and len(entry.payloads) == 1
    backup = queued[0].read_bytes()
    # Execute: run B (new run id, the cloud back after 2 more failures) on the same queue folder
    cloud_b = FakeCloud(fail_first=2)
    lines_b, _ = _run(tmp_path, _frames_of(video), cloud_b, "b", run_id="runB")
    # Assert: A's offloads first and once each, then B's; nothing left
    refined = [ln for ln in lines_b if ln["kind"] == "refined"]
    ids_b = [ln["offload"]["id"] for ln in lines_b if ln["kind"] == "edge" and ln["keyframe"]]
    assert [ln["offload_id"] for ln in refined] == ids_a + ids_b
    assert [ln["recovered"] for ln in refined] == [True] * 3 + [False] * 3
    assert all(ln["run"] == "runA" for ln in refined[:3])
    assert list((tmp_path / "queue").glob("*.json")) == []
    assert lines_b[-1]["recovered"] == 3 and lines_b[-1]["refined"] == 6
    # Execute: a crash after the commit but before the delete leaves a delivered entry behind
    queued[0].write_bytes(backup)
    cloud_c = FakeCloud()
    lines_c, _ = _run(tmp_path, iter(()), cloud_c, "c", run_id="runC")
    # Assert: it is dropped unsent, no second refined line
    assert cloud_c.calls == [] and not queued[0].exists()
    assert [ln["kind"] for ln in lines_c] == ["summary"]


def test_a_crash_between_the_refined_line_and_the_commit_neither_loses_nor_repeats_it(tmp_path, video, monkeypatch):
    # Prepare: run A's worker dies after writing keyframe 2's refined line, before its id reaches delivered.log
    real_commit = DiskQueue.commit

    def commit(queue, entry_id):
        if entry_id == "site-7.runA.000002":
            raise OSError("killed here (fake)")
        real_commit(queue, entry_id)

    monkeypatch.setattr(DiskQueue, "commit", commit)
    lines_a, _ = _run(tmp_path, _frames_of(video), FakeCloud(), "a")
    monkeypatch.setattr(DiskQueue, "commit", real_commit)
    assert [ln["offload_id"] for ln in lines_a if ln["kind"] == "refined"] == [
        "site-7.runA.000000", "site-7.runA.000002", "site-7.runA.000004"]
    assert [DiskQueue.id_of(p) for p in (tmp_path / "queue").glob("*.json")] == ["site-7.runA.000002"]
    # Execute: run B on the same queue folder, another output file
    cloud_b = FakeCloud()
    lines_b, _ = _run(tmp_path, iter(()), cloud_b, "b", run_id="runB")
    # Assert: the entry is committed from A's output, unsent; no second refined line; each id once in the log
    assert cloud_b.calls == [] and [ln["kind"] for ln in lines_b] == ["summary"]
    assert list((tmp_path / "queue").glob("*.json")) == []
    assert sorted((tmp_path / "queue" / "delivered.log").read_text().split()) == [
        "site-7.runA.000000", "site-7.runA.000002", "site-7.runA.000004"]
    assert (tmp_path / "queue" / "outputs.log").read_text().split() == [
        str((tmp_path / "a.jsonl").resolve()), str((tmp_path / "b.jsonl").resolve())]


def test_reconcile_ignores_a_cut_line_and_outputs_that_are_gone(tmp_path):
    queue = DiskQueue(tmp_path / "q")
    for frame in (0, 1):
        queue.put(OffloadEntry(id=f"s.r.{frame:06d}", site="s", run="r", frame=frame, mode="crops", created=0.0,
                               model="m", pts_s=None, image_shape=[8, 8, 3], regions=[], edge=[], offloaded=[],
                               payloads=[]))
    queue.close()
    queue = DiskQueue(tmp_path / "q")  # a restart: both entries are left by an earlier run
    out = tmp_path / "a.jsonl"
    out.write_text(json.dumps({"kind": "refined", "offload_id": "s.r.000000"}) + "\n"
                   + '{"kind": "refined", "offload_id": "s.r.0000')  # the line of frame 1, cut by a crash
    (tmp_path / "q" / "outputs.log").write_text(f"{tmp_path / 'gone.jsonl'}\n{out}\n")
    assert queue.reconcile(tmp_path / "b.jsonl") == 1
    assert queue.queued == {"s.r.000001"} and queue.delivered == {"s.r.000000"} and queue.recovered == 1


def test_a_refused_offload_is_kept_in_failed_and_reported_once(tmp_path, video):
    lines, _ = _run(tmp_path, _frames_of(video), FakeCloud(reject=(2,)))
    # frame 3's keyframe (2) was refused: no carried line for it either
    assert Counter(ln["kind"] for ln in lines) == {"edge": 6, "refined": 2, "carried": 2, "failed": 1, "summary": 1}
    assert [ln["frame"] for ln in lines if ln["kind"] == "carried"] == [1, 5]
    failed = next(ln for ln in lines if ln["kind"] == "failed")
    assert failed["offload_id"] == "site-7.runA.000002" and "413" in failed["error"]
    kept = list((tmp_path / "queue" / "failed").glob("*.json"))
    assert [DiskQueue.id_of(p) for p in kept] == ["site-7.runA.000002"]
    assert "413" in kept[0].with_suffix(".error").read_text()
    assert list((tmp_path / "queue").glob("*.json")) == [] and lines[-1]["failed"] == 1


def test_queue_folder_is_single_user(tmp_path):
    first = DiskQueue(tmp_path / "q")
    with pytest.raises(EdgeError, match="in use"):
        DiskQueue(tmp_path / "q")
    first.close()
    DiskQueue(tmp_path / "q").close()


# =========================================================================== model hot-swap (real weights)


@pytest.fixture(scope="module")
def weights_pair(tmp_path_factory):
    """Two YOLO11n weight files that differ in one bias (a "federated round" apart)."""
    import torch

    from common import yolo

    folder = tmp_path_factory.mktemp("edge-weights")
    model = yolo.build_model("yolo11n", len(NAMES), names=NAMES)
    first = yolo.save_weights(model, folder / "w0.pt")
    with torch.no_grad():
        model.model[-1].cv3[0][-1].bias.add_(0.5)
    return [first, yolo.save_weights(model, folder / "w1.pt")]


def test_an_onnx_file_the_runtime_did_not_write_is_never_overwritten(tmp_path, weights_pair):
    # Prepare: a foreign file at --onnx, then one with a record next to it that names another digest
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"a pruned export from elsewhere")
    # Execute / Assert: refused before any export, the file untouched
    with pytest.raises(EdgeError, match="the edge runtime did not export it .* never overwritten"):
        EdgeModel(weights_pair[0], onnx=onnx_path, imgsz=128, reload_every=0)
    Path(f"{onnx_path}.json").write_text(json.dumps({"version": "x", "imgsz": 128, "onnx": "0123456789ab"}))
    with pytest.raises(EdgeError, match="model.onnx.json"):
        EdgeModel(weights_pair[0], onnx=onnx_path, imgsz=128, reload_every=0)
    assert onnx_path.read_bytes() == b"a pruned export from elsewhere"
    # a weights file that does not load: the error names the file and says why
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EdgeError, match=r"--weights .*bad\.pt: cannot load it: cannot read weights file"):
        EdgeModel(bad, imgsz=128, reload_every=0)


def test_reload_picks_up_new_weights_in_the_background(tmp_path, weights_pair, record_property):
    import shutil

    # Prepare: the site's model store holds weights A
    store = tmp_path / "store" / "model.pt"
    store.parent.mkdir()
    shutil.copy(weights_pair[0], store)
    model = EdgeModel(store, imgsz=64, reload_every=1.0)
    version_a, predictor_a = model.version, model.predictor
    assert version_a == file_version(weights_pair[0]) and len(version_a) == 12
    # touched, same content: no reload
    os.utime(store, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not model.poll(now=time.monotonic() + 2) and model.wait_reload() is False
    # a broken file (not written atomically) is ignored; the running model stays
    store.write_bytes(b"not a weights file")
    model.poll(now=time.monotonic() + 4)
    assert not model.wait_reload() and model.version == version_a
    # ... and so is a real one cut short, which at start is an error naming the file
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights_pair[1].read_bytes()[:weights_pair[1].stat().st_size // 2])
    with pytest.raises(EdgeError, match=re.escape(f"--weights {truncated}: cannot load it: cannot read weights file")):
        EdgeModel(truncated, imgsz=64, reload_every=0)
    shutil.copy(truncated, store)
    model.poll(now=time.monotonic() + 4.5)
    assert not model.wait_reload() and model.version == version_a
    record_property("chaos", {"fault": "a truncated model.pt in a site's model store (edge runtime)",
                              "happened": "refused at start with an error naming the file; a running runtime "
                                          "keeps its model, then swaps in the next whole file", "lost": None})
    # Execute: a federated round replaces the file atomically (as save_weights does)
    tmp = store.with_suffix(".tmp")
    shutil.copy(weights_pair[1], tmp)
    os.replace(tmp, store)
    assert not model.poll(now=time.monotonic() + 1e-3 - 10)  # not yet time to look
    model.poll(now=time.monotonic() + 6)  # starts the background load; frames go on meanwhile
    swapped = model.wait_reload(60)
    # Assert
    assert swapped and model.version == file_version(weights_pair[1]) != version_a
    assert model.predictor is not predictor_a and model.reloads == 1
    frame = _synthetic_frames()[0]
    assert isinstance(model.predictor(frame), Detections)


def test_runtime_lines_carry_the_new_model_version_after_a_swap(tmp_path, weights_pair, video):
    import shutil

    # the loading itself is covered above; here a loader that records what it was asked to load
    store = tmp_path / "model.pt"
    shutil.copy(weights_pair[0], store)
    loaded = []
    model = EdgeModel(store, reload_every=1e-6, background=False,
                      load=lambda path, version: loaded.append(version) or (lambda image: EDGE))

    def frames():
        for frame in FrameSource(video):
            if frame.index == 3:  # a new round lands between frames 2 and 3
                tmp = store.with_suffix(".tmp")
                shutil.copy(weights_pair[1], tmp)
                os.replace(tmp, store)
            yield frame

    runtime = EdgeRuntime(model, FakeCloud(), _settings(max_gap=1), queue_dir=tmp_path / "q",
                          out=tmp_path / "out.jsonl")
    summary = runtime.run(frames())
    lines = _lines(tmp_path / "out.jsonl")
    versions = [ln["model"] for ln in lines if ln["kind"] == "edge"]
    va, vb = file_version(weights_pair[0]), file_version(weights_pair[1])
    assert versions == [va] * 3 + [vb] * 3 and loaded == [va, vb]
    assert summary.reloads == 1 and lines[-1]["model"] == vb
    # the offloads and their refined lines name the model that made the edge detections
    assert {ln["frame"]: ln["model"] for ln in lines if ln["kind"] == "refined"} == {
        0: va, 1: va, 2: va, 3: vb, 4: vb, 5: vb}


def test_the_runtime_answers_from_the_models_calibrated_threshold_and_a_flag_overrides_it(tmp_path, capsys,
                                                                                         monkeypatch):
    """A weights file saved with ``det_conf=0.42`` (what LocalSite.train_round stores): the CLI without --conf
    answers from 0.42 ("model"); with --conf 0.3 from 0.3 ("flag"); a file without it from routing.det_conf
    ("config"). A scripted detector (boxes at 0.9, 0.4, 0.2, 0.03) shows the split: 0.4 is an answer box at 0.3
    and a candidate at 0.42; a hot-swapped model brings its own threshold."""
    from clients import edge as edge_module
    from clients.edge import main
    from common import yolo

    monkeypatch.delenv("CEDAR_CLOUD_TOKEN", raising=False)
    model = yolo.build_model("yolo11n", len(NAMES), names=NAMES)
    calibrated = yolo.save_weights(model, tmp_path / "cal.pt", round=3, det_conf=0.42)
    plain = yolo.save_weights(model, tmp_path / "plain.pt", round=3)
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), _synthetic_frames()[0])
    boxes = Detections([[0, 0, 40, 40], [50, 10, 80, 40], [10, 50, 40, 80], [90, 50, 120, 80]],
                       [0.9, 0.4, 0.2, 0.03], [0, 1, 2, 3])
    floors = []

    class Scripted(TorchPredictor):  # the real loader (metadata and all), a scripted answer
        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            floors.append(kw["conf"])

        def __call__(self, image):
            return boxes.select(boxes.conf > self.conf)

    monkeypatch.setattr(edge_module.EdgeModel, "_default_load",
                        lambda self, path, version: Scripted(self._model(path), imgsz=64, conf=self.conf))

    def run(weights, *extra):
        out = tmp_path / f"{weights.stem}{''.join(extra)}.jsonl"
        code = main(["--source", str(folder), "--weights", str(weights), "--cloud", "http://127.0.0.1:9",
                     "--token", "t", "--out", str(out), "--queue-dir", str(tmp_path / f"q{len(floors)}"),
                     "--drain-timeout", "0", "--reload-every", "0", "--run-id", "cal", *extra])
        assert code == 0
        lines = _lines(out)
        return lines[0], lines[-1]

    edge, summary = run(calibrated)
    assert (summary["det_conf"], summary["det_conf_source"]) == (0.42, "model")
    assert [d["conf"] for d in edge["detections"]] == [0.9] and [d["conf"] for d in edge["candidates"]] == [0.4, 0.2]
    assert "answers from 0.42, model" in capsys.readouterr().out
    edge, summary = run(calibrated, "--conf", "0.3")
    assert (summary["det_conf"], summary["det_conf_source"]) == (0.3, "flag")
    assert [d["conf"] for d in edge["detections"]] == [0.9, 0.4] and [d["conf"] for d in edge["candidates"]] == [0.2]
    edge, summary = run(plain)
    assert (summary["det_conf"], summary["det_conf_source"]) == (EdgeSettings.det_conf, "config")
    # the detector reaches down to the candidates (0.05) whether or not --conf is given
    assert floors == [0.05, 0.05, 0.05]
    # a hot-swapped model's own threshold: the runtime follows the model, not the first one
    model_a = StaticModel(lambda image: boxes, "a", meta={"det_conf": 0.42})
    runtime = EdgeRuntime(model_a, FakeCloud(), _settings(photos=True), queue_dir=tmp_path / "qs",
                          out=tmp_path / "swap.jsonl")
    first = runtime.process(Frame(0, _synthetic_frames()[0], 0.0, 0.0))
    model_a.version, model_a.meta = "b", {"det_conf": 0.15}
    second = runtime.process(Frame(1, _synthetic_frames()[0], 0.1, 0.1))
    runtime.close(drain=False)
    assert [d["conf"] for d in first["detections"]] == [0.9]
    assert [d["conf"] for d in second["detections"]] == [0.9, 0.4, 0.2]
    assert (runtime.summary.det_conf, runtime.summary.det_conf_source) == (0.15, "model")


# =========================================================================== ONNX Runtime vs PyTorch


def _match(a: Detections, b: Detections, conf: float, margin: float = 2e-3) -> int:
    """Every detection of ``a`` clearly above ``conf`` has a twin in ``b``: same class, box within 1 px,
    confidence within 1e-3. Returns how many were matched."""
    n = 0
    for box, score, k in zip(a.xyxy, a.conf, a.cls):
        if score <= conf + margin:
            continue  # may sit on either side of the threshold in the other runtime
        twin = (b.cls == k) & (np.abs(b.xyxy - box).max(axis=1) <= 1.0) & (np.abs(b.conf - score) <= 1e-3)
        assert twin.any(), f"no twin for {box.tolist()} conf {score:.4f} class {k}"
        n += 1
    return n


def test_onnx_predictor_matches_torch_and_ultralytics(tmp_path, tiny_benchmark):
    from clients.detector import OnnxPredictor, TorchPredictor
    from common import yolo

    # Prepare: a calibrated YOLO11n in a model store; EdgeModel exports it (common.yolo.export_onnx) for ORT
    frames = _benchmark_frames(tiny_benchmark)
    model = _calibrated_model(frames)
    weights = yolo.save_weights(model, tmp_path / "store" / "model.pt", det_conf=0.3)
    conf, onnx_path = 0.25, tmp_path / "edge.onnx"
    edge_model = EdgeModel(weights, onnx=onnx_path, imgsz=128, conf=conf, iou=0.7, reload_every=0)
    ort_p = edge_model.predictor
    torch_p = TorchPredictor(model, imgsz=128, conf=conf, iou=0.7)
    frame, wide = frames[0], frames[0][20:100]  # 128x128, and 80x128 (letterboxed with padding)
    # Execute
    t, o = torch_p(frame), ort_p(frame)
    # one image per call: Ultralytics pads a batch of mixed shapes to squares, a single image minimally
    ref = [yolo.predict(model, [image], imgsz=128, conf=conf, iou=0.7)[0] for image in (frame, wide)]
    ref = [Detections(r["xyxy"], r["conf"], r["cls"]) for r in ref]
    # Assert: ORT == torch == Ultralytics within 1 px / 1e-3, in both directions
    assert isinstance(ort_p, OnnxPredictor) and ort_p.imgsz == (128, 128)
    assert len(t) >= 5 and len(t) == len(o) == len(ref[0])
    assert _match(o, t, conf) >= 5 and _match(t, o, conf) >= 5
    assert _match(t, ref[0], conf) >= 5 and _match(ref[0], o, conf) >= 5
    assert (t.conf > 0.5).any() and (t.conf < 0.5).any()  # some confident, some ambiguous
    wide_t = torch_p(wide)
    assert len(wide_t) == len(ref[1]) and _match(wide_t, ref[1], conf) == _match(ref[1], wide_t, conf) > 0
    assert ort_p.names == {i: n for i, n in enumerate(NAMES)}
    # the export records the weights' version; an up-to-date export is reused, not redone
    assert json.loads(Path(f"{onnx_path}.json").read_text())["version"] == edge_model.version
    stamp = onnx_path.stat().st_mtime_ns
    again = EdgeModel(weights, onnx=onnx_path, imgsz=128, reload_every=0)
    assert again.version == edge_model.version
    assert onnx_path.stat().st_mtime_ns == stamp
    # the weights' metadata (the calibrated threshold) comes with the export's record, read without torch
    assert edge_model.meta == again.meta == {"det_conf": 0.3}


def test_the_runtime_serves_a_yolo26n_onnx_export_without_nms_on_the_test_video(tmp_path, tiny_benchmark):
    from clients.detector import OnnxPredictor
    from common import yolo

    # Prepare: a calibrated YOLO26n in a model store; EdgeModel exports its one-to-one head for ORT
    frames = _benchmark_frames(tiny_benchmark)
    model = _calibrated_model(frames, arch="yolo26n")
    weights = yolo.save_weights(model, tmp_path / "store" / "model.pt")
    edge_model = EdgeModel(weights, onnx=tmp_path / "edge.onnx", imgsz=128, conf=0.25, reload_every=0)
    runtime = EdgeRuntime(edge_model, FakeCloud(), _settings(max_gap=3), queue_dir=tmp_path / "q",
                          out=tmp_path / "out.jsonl")

    # Execute
    summary = runtime.run(FrameSource(tiny_benchmark.video_dir(0) / "video.mp4"))
    ort_p, torch_p = edge_model.predictor, TorchPredictor(model, imgsz=128, conf=0.25)
    ref = yolo.predict(model, [frames[0]], imgsz=128, conf=0.25)[0]

    # Assert: the export outputs decided boxes, the predictor knows it, and ORT == torch == Ultralytics (nms=False)
    assert isinstance(ort_p, OnnxPredictor) and ort_p.end2end and torch_p.end2end
    assert [o.shape for o in ort_p.runtime.get_outputs()] == [[1, 300, 6]]
    o, t = ort_p(frames[0]), torch_p(frames[0])
    assert len(t) >= 3 and len(o) == len(t) == len(ref["conf"])
    sure = int((t.conf > 0.25 + 2e-3).sum())  # _match skips boxes that may sit on either side of conf
    assert _match(o, t, 0.25) == _match(t, Detections(ref["xyxy"], ref["conf"], ref["cls"]), 0.25) == sure >= 3
    edge = [ln for ln in _lines(tmp_path / "out.jsonl") if ln["kind"] == "edge"]
    assert summary.frames == len(frames) == len(edge) == 12
    assert {ln["model"] for ln in edge} == {file_version(weights)}
    assert sum(len(ln["detections"]) for ln in edge) > 0


def test_cli_refuses_bad_arguments_before_loading_anything(tmp_path, capsys, monkeypatch):
    from clients.edge import main

    monkeypatch.delenv("CEDAR_CLOUD_TOKEN", raising=False)

    common = ["--weights", str(tmp_path / "model.pt"), "--cloud", "http://127.0.0.1:9", "--out",
              str(tmp_path / "o.jsonl"), "--queue-dir", str(tmp_path / "q")]
    assert main(["--source", str(tmp_path / "missing.mp4"), "--token", "t", *common]) == 2
    with pytest.raises(SystemExit) as err:
        main(["--source", "0", *common])  # no token anywhere
    assert err.value.code == 2 and "bearer token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--source", "0", "--token", "t", "--t-conf", "1.5", *common])


def test_cli_defaults_are_edge_settings_and_a_negative_max_gap_is_refused(tmp_path, capsys):
    from dataclasses import fields

    from clients.edge import _parser, main

    required = ["--source", "0", "--weights", "w.pt", "--cloud", "http://127.0.0.1:9", "--out", "o.jsonl"]
    args = vars(_parser().parse_args(required))
    shared = {f.name for f in fields(EdgeSettings)} & set(args)
    assert {"t_conf", "beta", "max_gap", "cut_threshold", "merge", "keep_unanswered", "propagate", "det_conf",
            "candidate_conf", "context", "min_crop", "jpeg_quality", "merge_iou"} <= shared
    # --conf has no default of its own: the model's calibrated threshold, else EdgeSettings.det_conf
    assert args["det_conf"] is None and args["sequence"] is False
    args["det_conf"] = EdgeSettings.det_conf
    # nor the offload's: the budget's choice (--budget), else EdgeSettings'; any of them given replaces the budget
    from clients.collab import OPTION_FIELDS

    assert all(args[k] is None for k in OPTION_FIELDS) and args["budget"] == EdgeSettings.budget == "frame:0.25"
    args.update({k: getattr(EdgeSettings, k) for k in OPTION_FIELDS})
    assert {k: args[k] for k in shared} == {k: getattr(EdgeSettings, k) for k in shared}
    # and EdgeSettings' defaults are the config schema's (one name, one default per threshold)
    from common.config import RoutingConfig

    routing = {f.name for f in fields(RoutingConfig)} & shared
    assert {"det_conf", "candidate_conf", "t_conf", "t_size", "n_frames", "offload", "merge"} <= routing
    assert {k: args[k] for k in routing} == {k: getattr(RoutingConfig(), k) for k in routing}
    with pytest.raises(SystemExit):
        main([*required, "--token", "t", "--max-gap", "-1"])
    assert "--max-gap >= 0 (0: off)" in capsys.readouterr().err


@pytest.mark.parametrize("max_gap, keys", [(EdgeSettings.max_gap, [0, 3, 6, 9, 12, 15, 18, 21, 24]), (None, [0])])
def test_still_video_gets_a_gap_keyframe_every_max_gap_frames(tmp_path, max_gap, keys):
    """The runtime's default max_gap (3, not in the paper) refreshes a still scene every 3 frames; with None
    (the paper's rule alone) a still video has only its first keyframe (common.keyframes, "Still video")."""
    assert EdgeSettings.max_gap == 3
    still = [Frame(i, np.full((64, 64, 3), 90, np.uint8), i / 10, float(i)) for i in range(25)]
    lines, _ = _run(tmp_path, still, FakeCloud(), max_gap=max_gap)
    edge = [ln for ln in lines if ln["kind"] == "edge"]
    assert [ln["frame"] for ln in edge if ln["keyframe"]] == keys
    assert [ln["keyframe_reason"] for ln in edge if ln["keyframe"]] == ["first"] + ["gap"] * (len(keys) - 1)


# =========================================================================== the real processes (integration)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_benchmark):
    """``cloud.pt``: untrained YOLO11n (the service runs at --conf 0.001); ``edge.pt``: calibrated YOLO11n."""
    from common import yolo

    folder = tmp_path_factory.mktemp("edge-int")
    cloud = yolo.save_weights(yolo.build_model("yolo11n", len(NAMES), names=NAMES), folder / "cloud.pt")
    edge = yolo.save_weights(_calibrated_model(_benchmark_frames(tiny_benchmark)), folder / "edge.pt")
    return {"cloud": cloud, "edge": edge}


def _start_cloud(tmp: Path, weights: Path, port: int) -> tuple[subprocess.Popen, Path]:
    log_path = tmp / f"cloud-{port}.log"
    args = [sys.executable, "-m", "server.cloud", "--weights", str(weights), "--host", "127.0.0.1", "--port",
            str(port), "--token", TOKEN, "--store", str(tmp / "store"), "--imgsz", "128", "--conf", "0.001"]
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"cloud service exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    _stop(proc)
    pytest.fail(f"cloud service not healthy after 120s:\n{tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    stop_tree(proc, timeout=15)
    assert proc.poll() is not None


def _start_edge(tmp: Path, name: str, weights: Path, video: Path, port: int,
                *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``python -m clients.edge`` on the queue folder ``tmp/queue``: (process, output file, log file)."""
    out, log_path = tmp / f"{name}.jsonl", tmp / f"{name}.log"
    args = [sys.executable, "-m", "clients.edge", "--source", str(video), "--weights", str(weights),
            "--cloud", f"http://127.0.0.1:{port}", "--token", TOKEN, "--site", "site-0", "--out", str(out),
            "--queue-dir", str(tmp / "queue"), "--imgsz", "128", "--conf", "0.25", "--run-id", name,
            "--retry-base", "0.2", "--retry-max", "1", "--timeout", "30", *extra]
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, out, log_path


def _edge(tmp: Path, name: str, weights: Path, video: Path, port: int, *extra: str, timeout: float = 300) -> Path:
    """Run ``python -m clients.edge`` to completion; returns its output file."""
    proc, out, log_path = _start_edge(tmp, name, weights, video, port, *extra)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _stop(proc)
    assert rc == 0, tail(log_path)
    assert "cedar edge runtime summary" in log_path.read_text()
    return out


def _store_counts(store: Path) -> Counter:
    """Hard samples per offload id (``<site>.<X-Cedar-Frame>``) in the service's index."""
    index = store / "index.jsonl"
    entries = [json.loads(line) for line in index.read_text().splitlines()] if index.exists() else []
    return Counter(f"{e['site']}.{e['frame']}" for e in entries)


def _check_refined(lines: list[dict], edge_lines: dict[str, dict]) -> None:
    for ln in lines:
        if ln["kind"] != "refined":
            continue
        edge = edge_lines[ln["offload_id"]]
        key = edge["detections"] + edge["candidates"]  # the CLI's default --candidate-conf 0.05 adds candidates
        keep = [EdgeSettings.keep_unanswered and "candidate" not in d["reasons"] for d in key]
        expected = merge(Detections.from_list(key), Detections.from_list(ln["cloud_detections"]),
                         [bool(d["reasons"]) for d in key], keep_unanswered=keep, resolve=EdgeSettings.merge)
        assert _plain(ln["detections"]) == expected.to_list()


@pytest.mark.integration
def test_real_cloud_up_every_offload_refined_once(tmp_path, weights, tiny_benchmark):
    # Prepare
    video = tiny_benchmark.video_dir(0) / "video.mp4"
    n_frames = json.loads((tiny_benchmark.video_dir(0) / "meta.json").read_text())["frames"]
    port = free_port()
    cloud, cloud_log = _start_cloud(tmp_path, weights["cloud"], port)
    try:
        # Execute
        out = _edge(tmp_path, "up", weights["edge"], video, port, "--video", str(tmp_path / "annotated.mp4"),
                    "--drain-timeout", "120", "--max-gap", "3")
        # Assert
        lines = _lines(out)
        edge = [ln for ln in lines if ln["kind"] == "edge"]
        assert [ln["frame"] for ln in edge] == list(range(n_frames))
        offloads = {ln["offload"]["id"]: ln for ln in edge if ln["offload"]}
        assert len(offloads) >= 2, [ln["detections"] for ln in edge if ln["keyframe"]]
        refined = Counter(ln["offload_id"] for ln in lines if ln["kind"] == "refined")
        assert refined == Counter(set(offloads))  # each offload exactly once
        _check_refined(lines, offloads)
        assert _store_counts(tmp_path / "store") == {i: len(ln["offload"]["regions"]) for i, ln in offloads.items()}
        # the crops went on one JPEG atlas per keyframe; the service stored each crop cut from it, as PNG
        assert {p.suffix for p in (tmp_path / "store" / "images").iterdir()} == {".png"}
        assert list((tmp_path / "queue").glob("*.json")) == []
        summary = lines[-1]
        assert summary["kind"] == "summary" and summary["queue_left"] == 0 and summary["refined"] == len(offloads)
        assert summary["bytes_sent"] > 0 and summary["cloud_rtt_ms_mean"] > 0
        cap = cv2.VideoCapture(str(tmp_path / "annotated.mp4"))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == n_frames
        cap.release()
        assert cloud.poll() is None, tail(cloud_log)
    finally:
        _stop(cloud)


@pytest.mark.integration
def test_real_cloud_down_then_back_nothing_lost_nothing_duplicated(tmp_path, weights, tiny_benchmark):
    # Prepare: a port where nothing listens yet
    video = tiny_benchmark.video_dir(0) / "video.mp4"
    n_frames = json.loads((tiny_benchmark.video_dir(0) / "meta.json").read_text())["frames"]
    port = free_port()
    # Execute: run A while the cloud is down (connection refused), 1 s of draining; it queues crops one JPEG
    # each (--separate-crops), run B whole frames: a queue written one way is delivered by a runtime set another
    out_a = _edge(tmp_path, "down", weights["edge"], video, port, "--separate-crops", "--drain-timeout", "1",
                  "--max-gap", "3")
    # Assert: all edge lines, every offload on disk
    lines_a = _lines(out_a)
    assert [ln["frame"] for ln in lines_a if ln["kind"] == "edge"] == list(range(n_frames))
    offloads_a = {ln["offload"]["id"]: ln for ln in lines_a if ln["kind"] == "edge" and ln["offload"]}
    assert len(offloads_a) >= 2 and not [ln for ln in lines_a if ln["kind"] == "refined"]
    assert sorted(DiskQueue.id_of(p) for p in (tmp_path / "queue").glob("*.json")) == sorted(offloads_a)
    assert lines_a[-1]["queue_left"] == len(offloads_a)
    queued = [json.loads(p.read_text()) for p in (tmp_path / "queue").glob("*.json")]
    assert all(q["atlas"] is None and len(q["payloads"]) == len(q["regions"]) for q in queued)
    # Execute: the cloud comes back; run B on the same queue folder
    cloud, cloud_log = _start_cloud(tmp_path, weights["cloud"], port)
    try:
        out_b = _edge(tmp_path, "back", weights["edge"], video, port, "--offload", "frame", "--drain-timeout",
                      "120", "--max-gap", "3")
        assert cloud.poll() is None, tail(cloud_log)
    finally:
        _stop(cloud)
    # Assert: every offload of both runs refined exactly once, stored once by the cloud, queue empty
    lines_b = _lines(out_b)
    offloads_b = {ln["offload"]["id"]: ln for ln in lines_b if ln["kind"] == "edge" and ln["offload"]}
    all_offloads = {**offloads_a, **offloads_b}
    assert len(all_offloads) == len(offloads_a) + len(offloads_b)
    refined = Counter(ln["offload_id"] for ln in lines_a + lines_b if ln["kind"] == "refined")
    assert refined == Counter(set(all_offloads))
    recovered = [ln["offload_id"] for ln in lines_b if ln["kind"] == "refined" and ln["recovered"]]
    assert recovered == sorted(offloads_a)  # A's first, in order
    _check_refined(lines_b, all_offloads)
    # one sample per crop of A, one per frame of B
    assert _store_counts(tmp_path / "store") == {**{i: len(ln["offload"]["regions"]) for i, ln in offloads_a.items()},
                                                 **Counter(set(offloads_b))}
    assert list((tmp_path / "queue").glob("*.json")) == []
    assert lines_b[-1]["queue_left"] == 0 and lines_b[-1]["recovered"] == len(offloads_a)


def test_a_bad_budget_is_refused_naming_it():
    from clients.media import EdgeError

    with pytest.raises(EdgeError, match="budget 'frame:-1': expected"):
        EdgeSettings(budget="frame:-1")
