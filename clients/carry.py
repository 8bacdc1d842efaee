"""Boxes carried to the frames after a keyframe by sparse optical flow, and refined answers with them."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from common.detections import Detections

log = logging.getLogger(__name__)


def flow_shift(prev: np.ndarray, cur: np.ndarray, boxes: np.ndarray, win: int = 9) -> np.ndarray:
    """``boxes`` (xyxy in ``prev``) moved to ``cur`` by sparse optical flow.

    Five points per box (its centre and the centres of its quarters) are tracked
    with pyramidal Lucas-Kanade (``cv2.calcOpticalFlowPyrLK``, ``win`` px window,
    2 pyramid levels) on the grayscale frames; each box moves by the median
    displacement of its points that were found. A box with no point found stays
    where it was. Sizes are kept.

    Examples
    --------
    A textured 12 px square moved 3 px right and 2 px down between the frames:
    its box ``[20, 20, 32, 32]`` becomes about ``[23, 22, 35, 34]``.
    """
    import cv2

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not len(boxes):
        return boxes.copy()
    x0, y0, x1, y1 = boxes.T
    cx, cy, qw, qh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
    offsets = np.array([[0, 0], [-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=np.float32)
    pts = np.stack([cx[:, None] + offsets[None, :, 0] * qw[:, None],
                    cy[:, None] + offsets[None, :, 1] * qh[:, None]], -1).reshape(-1, 1, 2)
    new, status, _ = cv2.calcOpticalFlowPyrLK(prev, cur, pts, None, winSize=(win, win), maxLevel=2,
                                              criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
    moved = (new - pts).reshape(len(boxes), 5, 2)
    found = status.reshape(len(boxes), 5).astype(bool)
    out = boxes.copy()
    for i in range(len(boxes)):
        if found[i].any():
            dx, dy = np.median(moved[i][found[i]], axis=0)
            out[i] += [dx, dy, dx, dy]
    return out


class RefinedCarrier:
    """Keyframes' refined answers moved onto the frames after them (the ``carried`` lines).

    A non-keyframe reuses its keyframe's edge boxes at once; the keyframe's refined
    answer comes later. So that every frame also gets a refined answer, the runtime
    hands the carrier each frame's grayscale image (:meth:`frame`) and each delivered
    answer of this run (:meth:`answered`, worker thread). The frames after an
    offloaded keyframe are kept until its answer arrives; then the answer's boxes
    (the keyframe's edge boxes and candidates, and the cloud's boxes, each set kept
    apart so the caller can merge them again) are moved frame to frame by
    :func:`flow_shift` (``move=False``: they stay put) through the kept frames, and
    from then on through every new frame, up to the next keyframe. Moving each box
    by its own flow matters for the cloud's boxes: they are often objects the edge
    missed, so no edge box moves with them.

    At most ``max_bytes`` of grayscale frames are kept (a dead cloud must not fill the
    memory): past that the oldest waiting keyframe's frames are dropped, and those
    frames keep only their edge answer. A change of frame size ends a window.

    :meth:`frame` and :meth:`flush` return ``(frame, pts_s, keyframe, meta, edge,
    cloud)`` per frame that got its keyframe's answer: ``edge`` the moved list of
    detection dicts, ``cloud`` moved :class:`Detections`, ``meta`` what
    :meth:`answered` was given.
    """

    def __init__(self, move: bool = True, max_bytes: int = 64 << 20):
        self.move, self.max_bytes = move, max_bytes
        self._lock = threading.Lock()
        self._arrived: dict[int, tuple] = {}  # keyframe -> (meta, edge list, cloud), from the worker
        self._waiting: dict[int, list[tuple[int, float | None, np.ndarray]]] = {}  # keyframe -> its frames so far
        self._open: int | None = None  # the latest keyframe, when it was offloaded
        self._live: tuple | None = None  # (keyframe, meta, edge, cloud, gray, boxes) once the open one is answered
        self._bytes = 0

    def answered(self, keyframe: int, meta: Any, edge: list[dict], cloud: Detections) -> None:
        with self._lock:
            self._arrived[keyframe] = (meta, edge, cloud)

    def frame(self, index: int, pts_s: float | None, gray: np.ndarray, is_key: bool, offloaded: bool) -> list:
        out = self.flush()
        if self._live is not None and (is_key or self._live[4].shape != gray.shape):
            self._live = None
        if is_key or (self._open in self._waiting and self._waiting[self._open][-1][2].shape != gray.shape):
            self._open = index if is_key and offloaded else None
            if self._open is not None:
                self._waiting[index] = [(index, pts_s, gray)]
                self._bytes += gray.nbytes
        elif self._open in self._waiting:
            self._waiting[self._open].append((index, pts_s, gray))
            self._bytes += gray.nbytes
        elif self._live is not None:
            *answer, prev, boxes = self._live
            boxes = self._shift(prev, gray, boxes)
            self._live = (*answer, gray, boxes)
            out.append(self._result(index, pts_s, *answer, boxes))
        while self._bytes > self.max_bytes and self._waiting:
            dropped = self._waiting.pop(next(iter(self._waiting)))
            self._bytes -= sum(g.nbytes for _, _, g in dropped)
            log.debug("carrier: dropped the %d frame(s) after keyframe %d (memory cap)", len(dropped), dropped[0][0])
        return out

    def flush(self) -> list:
        """The frames whose keyframe's answer has arrived since the last call (kept frames only)."""
        with self._lock:
            arrived, self._arrived = self._arrived, {}
        out = []
        for key, (meta, edge, cloud) in sorted(arrived.items()):
            frames = self._waiting.pop(key, None)
            if frames is None:  # dropped, or an offload of an earlier run
                continue
            self._bytes -= sum(g.nbytes for _, _, g in frames)
            boxes = np.concatenate([Detections.from_list(edge).xyxy, cloud.xyxy]).reshape(-1, 4)
            prev = frames[0][2]
            for index, pts_s, gray in frames[1:]:
                boxes = self._shift(prev, gray, boxes)
                prev = gray
                out.append(self._result(index, pts_s, key, meta, edge, cloud, boxes))
            if key == self._open:
                self._live = (key, meta, edge, cloud, prev, boxes)
        return out

    def _shift(self, prev: np.ndarray, gray: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if not self.move:
            return boxes
        h, w = gray.shape[:2]
        return np.clip(flow_shift(prev, gray, boxes), 0, [w, h, w, h]).astype(np.float32)

    @staticmethod
    def _result(index, pts_s, key, meta, edge, cloud, boxes) -> tuple:
        n = len(edge)
        moved = [{**d, "xyxy": [round(float(v), 2) for v in b]} for d, b in zip(edge, boxes[:n])]
        return index, pts_s, key, meta, moved, Detections(boxes[n:], cloud.conf, cloud.cls)
