"""The edge runtime's output lines on a fixed clip, compared to a committed golden file.

The clip (16 PNG frames, 96x128: two textured squares moving over a dark textured
scene, then a cut to a bright scene) and the detector are deterministic and need
no trained weights: :class:`GridHead` computes a YOLO-style raw head ``(4 + nc, A)``
from the letterboxed frame with numpy, and the runtime's own letterbox, postprocess
and NMS turn it into detections. The cloud is in-process: it answers every offloaded
region with one box at the region's centre. Timing fields (``time``, ``latency_ms``,
``wall_s``, means of milliseconds) are dropped; floats are rounded to 6 digits; the
worker thread's lines are ordered by frame.

Regenerate (only when the output format changes on purpose)::

    CEDAR_WRITE_GOLDEN=1 python -m pytest -q tests/clients/test_edge_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from clients.detector import StaticModel, letterbox, postprocess
from clients.edge import EdgeRuntime, EdgeSettings
from clients.media import FrameSource
from clients.offload import CloudAnswer
from common.detections import Detections

GOLDEN = Path(__file__).resolve().parent / "golden" / "edge_runtime.jsonl"
TIMING = {"time", "latency_ms", "wall_s", "edge_ms_mean", "cloud_rtt_ms_mean"}
ORDER = {"edge": 0, "refined": 1, "carried": 2, "failed": 3, "summary": 4}


def clip_frames(n: int = 16) -> list[np.ndarray]:
    """Frames 0-9: squares (18 px red, 7 px green) moving 3 and 2 px per frame; 10-15: a bright scene."""
    rng = np.random.default_rng(7)
    dark = cv2.GaussianBlur(rng.integers(0, 70, (96, 128, 3), dtype=np.uint8), (5, 5), 0)
    bright = cv2.GaussianBlur(rng.integers(150, 255, (96, 128, 3), dtype=np.uint8), (5, 5), 0)
    red = np.clip(rng.integers(0, 60, (18, 18, 3)) + [0, 0, 190], 0, 255).astype(np.uint8)
    green = np.clip(rng.integers(0, 60, (7, 7, 3)) + [0, 170, 0], 0, 255).astype(np.uint8)
    frames = []
    for t in range(n):
        frame = (dark if t < 10 else bright).copy()
        x, y = 10 + 3 * t, 20 + t
        frame[y:y + 18, x:x + 18] = red
        gx, gy = 100 - 2 * t, 60
        frame[gy:gy + 7, gx:gx + 7] = green
        frames.append(frame)
    return frames


class GridHead:
    """A fixed detector: one anchor per 4 px cell (16 px wide, 12, 16 or 20 px tall) of the 128x128 input, class score = 3 x (how much the
    window's mean of one colour channel exceeds the other two, less 0.1) (classes 0, 1, 2 = blue, green, red)."""

    imgsz = 128

    def __call__(self, image: np.ndarray) -> Detections:
        x, lb = letterbox(image, self.imgsz)  # (1, 3, 128, 128) RGB in [0, 1]
        rgb = x[0]
        k = 16
        pad = np.pad(rgb, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)), mode="edge")
        integral = pad.cumsum(1).cumsum(2)
        integral = np.pad(integral, ((0, 0), (1, 0), (1, 0)))
        cy, cx = np.meshgrid(np.arange(2, 128, 4), np.arange(2, 128, 4), indexing="ij")
        y0, x0 = cy.ravel(), cx.ravel()
        mean = (integral[:, y0 + k, x0 + k] - integral[:, y0, x0 + k] - integral[:, y0 + k, x0]
                + integral[:, y0, x0]) / (k * k)  # (3, A) channel means R, G, B
        blue, green, red = mean[2] - mean[:2].max(0), mean[1] - mean[[0, 2]].max(0), mean[0] - mean[1:].max(0)
        scores = np.clip((np.stack([blue, green, red]) - 0.1) * 3, 0, 1)  # (nc, A)
        heights = 12 + 4 * (np.arange(len(x0)) % 3)  # 12, 16, 20 px: areas 192, 256, 320
        boxes = np.stack([x0, y0, np.full_like(x0, k), heights]).astype(np.float32)  # cx, cy, w, h
        return postprocess(np.concatenate([boxes, scores]).astype(np.float32), lb, conf=0.05, iou=0.5)


class RegionCloud:
    """Answers each offloaded region with one box of class 2 at its centre, 10x10 px, conf 0.7."""

    def send(self, entry) -> CloudAnswer:
        boxes = [[(r[0] + r[2]) / 2 - 5, (r[1] + r[3]) / 2 - 5, (r[0] + r[2]) / 2 + 5, (r[1] + r[3]) / 2 + 5]
                 for r in entry.regions]
        return CloudAnswer(Detections(boxes, [0.7] * len(boxes), [2] * len(boxes)), rtt_ms=1.0,
                           request_bytes=entry.payload_bytes + 100, model="region-cloud")


def _normal(value):
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def normalised(lines: list[dict]) -> list[dict]:
    lines = sorted(lines, key=lambda r: (ORDER[r["kind"]] == 4, r.get("frame", 0), ORDER[r["kind"]]))
    return [_normal(r) for r in lines]


def run_clip(tmp_path: Path) -> list[dict]:
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(clip_frames()):
        cv2.imwrite(str(folder / f"{i:06d}.png"), frame)
    settings = EdgeSettings(site="site-g", run_id="golden", max_gap=3, det_conf=0.25, candidate_conf=0.05, t_conf=0.5, t_size=250.0,
                            retry_base=0.01, retry_max=0.05, drain_timeout=30)
    out = tmp_path / "out.jsonl"
    runtime = EdgeRuntime(StaticModel(GridHead(), "grid"), RegionCloud(), settings, queue_dir=tmp_path / "queue",
                          out=out)
    source = FrameSource(folder, fps=10, sequence=True)  # video frames: keyframes, tracks, carried answers
    try:
        runtime.run(source)
    finally:
        source.close()
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_edge_runtime_output_equals_the_golden_file(tmp_path):
    # Execute
    lines = normalised(run_clip(tmp_path))
    if os.environ.get("CEDAR_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    # Assert: the clip exercises what the golden file must pin down
    kinds = [r["kind"] for r in golden]
    assert kinds.count("edge") == 16 and kinds.count("refined") >= 3 and kinds.count("carried") >= 3
    assert any(r["kind"] == "edge" and r["candidates"] for r in golden)
    assert any(r["kind"] == "edge" and r["keyframe_reason"] == "cut" for r in golden)
    reasons = {x for r in golden if r["kind"] == "edge" for d in r["detections"] for x in d["reasons"]}
    assert reasons == {"low_conf", "small", "unstable"}
    assert lines == golden
