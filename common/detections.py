"""Detections of one image, and the geometry and scoring every part of cedar shares.

- :class:`Detections`: boxes, confidences and classes as parallel numpy arrays,
  JSON-friendly (:meth:`Detections.to_list` / :meth:`Detections.from_list`);
- :func:`box_iou`: pairwise IoU of xyxy boxes;
- :func:`nms`: the one greedy non-maximum suppression (``torchvision.ops.nms``'s rule:
  a box goes when its IoU with a kept, higher-scoring box is ``> iou``; ties in score
  keep input order), per class when given classes;
- YOLO label files: :func:`label_path` (where Ultralytics looks for an image's labels),
  :func:`read_yolo_labels` (normalised rows), :func:`labels_to_pixels`,
  :func:`image_labels` (an image's labels in its pixels);
- scoring against ground truth: :func:`matched_gt` (greedy matching, recall),
  :func:`compute_ap` and :func:`size_range_ap50` (Ultralytics' 101-point AP50, with an
  optional small-object range), :func:`score` (mAP50, recall, FNR, precision-1 point),
  :func:`f1_threshold` (the confidence threshold of best F1).

Ground truth everywhere is ``(M, 5)`` float rows ``cls, x1, y1, x2, y2`` in pixels.
Pure: numpy only (no torch, flwr, ultralytics, wandb), so the pure core can use it.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Detections", "as_boxes", "box_area", "box_iou", "nms", "label_path", "read_yolo_labels",
           "labels_to_pixels", "yolo_label_lines", "image_labels", "matched_gt", "compute_ap", "size_range_ap50", "precision_one", "score",
           "f1_threshold"]


def as_boxes(boxes: Any, name: str = "boxes") -> np.ndarray:
    """``(N, 4)`` float64 xyxy boxes; empty input gives ``(0, 4)``; another shape raises ValueError naming ``name``."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) xyxy, got {arr.shape}")
    return arr


def box_area(xyxy: np.ndarray) -> np.ndarray:
    """``(N,)`` areas ``(x2 - x1)·(y2 - y1)`` (0 for inverted boxes)."""
    w = np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None)
    h = np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None)
    return w * h  # (N,)


@dataclass(eq=False)
class Detections:
    """Detections of one image as parallel numpy arrays.

    Attributes
    ----------
    xyxy : np.ndarray
        ``(N, 4)`` float64 boxes ``x1, y1, x2, y2`` in pixels.
    conf : np.ndarray
        ``(N,)`` float64 confidences in [0, 1].
    cls : np.ndarray
        ``(N,)`` int64 class ids.

    Examples
    --------
    >>> d = Detections([[0, 0, 10, 20]], [0.9], [3])
    >>> len(d), d.to_list()
    (1, [{'xyxy': [0.0, 0.0, 10.0, 20.0], 'conf': 0.9, 'cls': 3}])
    """

    xyxy: Any = field(default_factory=lambda: np.zeros((0, 4)))
    conf: Any = field(default_factory=lambda: np.zeros(0))
    cls: Any = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float64)
        if xyxy.size == 0:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ValueError(f"xyxy must have shape (N, 4), got {xyxy.shape}")
        conf = np.asarray(self.conf, dtype=np.float64).reshape(-1)
        cls_f = np.asarray(self.cls).reshape(-1)
        if conf.shape[0] != xyxy.shape[0] or cls_f.shape[0] != xyxy.shape[0]:
            raise ValueError(
                f"xyxy, conf and cls must have the same length, got "
                f"{xyxy.shape[0]}, {conf.shape[0]}, {cls_f.shape[0]}"
            )
        if cls_f.size and not np.all(np.asarray(cls_f, dtype=np.float64) % 1 == 0):
            raise ValueError(f"cls must be integers, got {cls_f.tolist()}")
        self.xyxy = xyxy
        self.conf = conf
        self.cls = cls_f.astype(np.int64)

    @classmethod
    def empty(cls) -> "Detections":
        return cls()

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __getitem__(self, index: Any) -> "Detections":
        """Index, slice, integer array or boolean mask → a new Detections."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(self.xyxy[index], self.conf[index], self.cls[index])

    def select(self, mask: Any) -> "Detections":
        """Detections where ``mask`` (``(N,)`` bool) is True."""
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.shape[0] != len(self):
            raise ValueError(f"mask has {mask.shape[0]} entries for {len(self)} detections")
        return self[mask]

    @classmethod
    def concat(cls, parts: Iterable["Detections"]) -> "Detections":
        parts = list(parts)
        if not parts:
            return cls()
        return cls(
            np.concatenate([p.xyxy for p in parts]),
            np.concatenate([p.conf for p in parts]),
            np.concatenate([p.cls for p in parts]),
        )

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-friendly ``[{"xyxy": [x1, y1, x2, y2], "conf": c, "cls": k}, ...]``."""
        return [{"xyxy": box, "conf": c, "cls": k}
                for box, c, k in zip(self.xyxy.tolist(), self.conf.tolist(), self.cls.tolist())]

    @classmethod
    def from_list(cls, items: Sequence[Mapping[str, Any]]) -> "Detections":
        """Inverse of :meth:`to_list`; a bad item raises ValueError naming its index."""
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ValueError(f"detections must be a list of objects, got {type(items).__name__}")
        boxes, confs, classes = [], [], []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ValueError(f"detection {i} must be an object, got {type(item).__name__}")
            for key in ("xyxy", "conf", "cls"):
                if key not in item:
                    raise ValueError(f"detection {i} lacks key {key!r}")
            try:
                box = [float(v) for v in item["xyxy"]]
                conf = float(item["conf"])
                k = item["cls"]
                if isinstance(k, bool) or float(k) != int(k):
                    raise TypeError
                k = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"detection {i} has a non-numeric value: {dict(item)!r}") from None
            if len(box) != 4 or not np.all(np.isfinite(box)) or not np.isfinite(conf):
                raise ValueError(f"detection {i} has a bad box or confidence: {dict(item)!r}")
            boxes.append(box)
            confs.append(conf)
            classes.append(k)
        return cls(np.array(boxes).reshape(-1, 4), confs, classes)


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of two sets of xyxy boxes.

    ``IoU(a_i, b_j) = |a_i ∩ b_j| / (|a_i| + |b_j| − |a_i ∩ b_j|)``; 0 where
    the union is 0 (two degenerate boxes).

    Parameters
    ----------
    a : array_like
        ``(N, 4)`` boxes ``x1, y1, x2, y2``.
    b : array_like
        ``(M, 4)`` boxes.

    Returns
    -------
    np.ndarray
        ``(N, M)`` float64.

    Examples
    --------
    ``[0, 0, 2, 2]`` and ``[1, 1, 3, 3]``: intersection 1, union 4 + 4 − 1 = 7,
    IoU = 1/7 ≈ 0.1429.
    """
    a = as_boxes(a, "a")
    b = as_boxes(b, "b")
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def nms(boxes: Any, scores: Any, iou: float, classes: Any = None) -> np.ndarray:
    """Greedy NMS: indices kept, by descending score (``torchvision.ops.nms`` / ``batched_nms``).

    A box is dropped when its IoU with a kept, higher-scoring box is ``> iou`` (an IoU of
    exactly ``iou`` keeps both); equal scores keep input order. With ``classes`` boxes of
    different classes never suppress each other.

    Examples
    --------
    ``[0,0,10,10]`` (0.9), ``[1,0,11,10]`` (0.8, IoU 90/110 ≈ 0.82), ``[20,20,30,30]`` (0.7)
    at ``iou=0.7`` -> ``[0, 2]``; with classes ``[0, 1, 0]`` -> ``[0, 1, 2]``.
    """
    boxes = as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} entries for {boxes.shape[0]} boxes")
    order = np.argsort(-scores, kind="stable")
    ranked = boxes[order]
    lo, hi = _suppressing_pairs(ranked, None if classes is None else np.asarray(classes).reshape(-1)[order], iou)
    # greedy in score order: box r is kept unless a kept box ranked before it suppresses it. The rule is
    # triangular, so iterating it from "keep all" settles rank by rank on its one fixed point (in as many
    # rounds as the longest chain of suppressions, usually a handful)
    keep = np.ones(len(order), dtype=bool)
    while True:
        kept = np.ones(len(order), dtype=bool)
        kept[hi[keep[lo]]] = False
        if np.array_equal(kept, keep):
            return order[keep].astype(np.int64)
        keep = kept


#: the most box pairs :func:`_suppressing_pairs` holds at once (a few hundred MB of work arrays)
_PAIR_CHUNK = 1 << 22


def _suppressing_pairs(boxes: np.ndarray, classes: np.ndarray | None, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``: the index pairs ``lo < hi`` of ``boxes`` (same class, when ``classes`` is given) whose IoU
    is ``> iou``.

    Only pairs that can pass are measured: a sweep over the boxes sorted by class, then ``x1``, pairs each box
    with the later ones of its class that start left of ``x2 - iou · width`` (an IoU is at most the shared width
    over either box's width; the bound keeps a margin of 1e-9 of the coordinates for rounding), in chunks of at
    most :data:`_PAIR_CHUNK`. The IoU is :func:`box_iou`'s arithmetic, operation for operation, so every
    decision is the same to the last bit.
    """
    n = len(boxes)
    x1, x2 = boxes[:, 0], boxes[:, 2]
    group = np.zeros(n, dtype=np.int64) if classes is None else np.unique(classes, return_inverse=True)[1]
    order = np.lexsort((x1, group))  # by class, then x1
    reach = x2 - iou * np.clip(x2 - x1, 0, None) + 1e-9 * (np.abs(x1) + np.abs(x2) + 1.0)
    end = np.empty(n, dtype=np.int64)  # per sorted box: first later box of its class starting at or past reach
    bounds = np.searchsorted(group[order], np.arange(group.max() + 2 if n else 1))
    for lo, hi in itertools.pairwise(bounds):
        end[lo:hi] = lo + np.searchsorted(x1[order[lo:hi]], reach[order[lo:hi]], side="left")
    first = np.arange(1, n + 1)
    count = np.clip(end - first, 0, None)
    area = np.clip(x2 - x1, 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    out_lo, out_hi = [], []
    total = np.cumsum(count)
    start = 0
    while start < n:
        stop = max(int(np.searchsorted(total, (total[start - 1] if start else 0) + _PAIR_CHUNK, side="right")),
                   start + 1)
        c = count[start:stop]
        p = np.repeat(np.arange(start, stop), c)
        q = np.repeat(first[start:stop], c) + np.arange(len(p)) - np.repeat(np.cumsum(c) - c, c)
        a, b = np.minimum(order[p], order[q]), np.maximum(order[p], order[q])
        w = np.clip(np.minimum(x2[a], x2[b]) - np.maximum(x1[a], x1[b]), 0.0, None)
        h = np.clip(np.minimum(boxes[a, 3], boxes[b, 3]) - np.maximum(boxes[a, 1], boxes[b, 1]), 0.0, None)
        inter = w * h
        union = area[a] + area[b] - inter
        overlap = np.zeros_like(inter)
        np.divide(inter, union, out=overlap, where=union > 0)
        out_lo.append(a[overlap > iou])
        out_hi.append(b[overlap > iou])
        start = stop
    return (np.concatenate(out_lo), np.concatenate(out_hi)) if out_lo else (np.zeros(0, np.int64),) * 2


def label_path(image: str | Path) -> Path:
    """Where Ultralytics looks for an image's labels (last ``/images/`` -> ``/labels/``, ``.txt``)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1))).with_suffix(".txt")


def read_yolo_labels(path: str | Path) -> np.ndarray:
    """``(M, 5)`` rows ``cls, cx, cy, w, h`` (normalised) of a YOLO label file; none when it is missing or empty.

    Extra columns (segments, keypoints) are ignored; a line with fewer than five numbers
    raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return np.zeros((0, 5))
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append([float(v) for v in line.split()[:5]])
        except ValueError:
            rows.append([])
        if len(rows[-1]) != 5:
            raise ValueError(f"{path}:{n}: a label line is 'cls cx cy w h', got {line.strip()!r}")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def labels_to_pixels(rows: Any, width: float, height: float) -> np.ndarray:
    """Normalised ``cls, cx, cy, w, h`` rows -> ``cls, x1, y1, x2, y2`` in pixels of a ``width`` x ``height`` image.

    Example: ``[3, 0.5, 0.25, 0.2, 0.1]`` on 100x200 -> ``[3, 40, 40, 60, 60]``.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    cx, cy, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return np.column_stack([rows[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def yolo_label_lines(xyxy: Any, cls: Any, width: float, height: float) -> list[str]:
    """YOLO label lines ``cls cx cy w h``, normalised to a ``width`` x ``height`` image, 6 decimals.

    Boxes are clipped to the image first; one with no area left is dropped. The inverse of
    :func:`labels_to_pixels` up to the clipping and the rounding.

    Example: ``[10, 20, 30, 60]`` class 3 on 100x200 -> ``"3 0.200000 0.200000 0.200000 0.200000"``.
    """
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got width={width!r}, height={height!r}")
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(cls).reshape(-1)
    if len(classes) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(classes)} classes")
    x1, x2 = np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 2], 0, width)
    y1, y2 = np.clip(boxes[:, 1], 0, height), np.clip(boxes[:, 3], 0, height)
    return [f"{int(k)} {(a + c) / 2 / width:.6f} {(b + d) / 2 / height:.6f} {(c - a) / width:.6f} "
            f"{(d - b) / height:.6f}" for k, a, b, c, d in zip(classes, x1, y1, x2, y2) if c > a and d > b]


def image_labels(image: str | Path, width: float, height: float, labels: str | Path | None = None) -> np.ndarray:
    """The ground truth of an image (``labels``, default :func:`label_path`) as pixel rows ``cls, x1, y1, x2, y2``."""
    return labels_to_pixels(read_yolo_labels(labels or label_path(image)), width, height)


def matched_gt(pred_xyxy: Any, pred_conf: Any, gt_xyxy: Any, iou: float = 0.5) -> np.ndarray:
    """Which ground-truth boxes a set of detections finds (greedy, highest confidence first).

    Detection i (in descending confidence) takes the unmatched ground-truth box j with the
    highest IoU, if that IoU is >= ``iou``; class labels are ignored (recall of objects).
    Recall = ``matched.mean()``, false-negative rate = 1 - recall.

    Examples
    --------
    GT ``[0,0,10,10]`` and ``[20,20,30,30]``; detections ``[0,0,10,9]`` (IoU 0.9) and
    ``[50,50,60,60]`` (IoU 0) -> ``[True, False]``: recall 0.5, FNR 0.5.
    """
    gt = np.asarray(gt_xyxy, dtype=float).reshape(-1, 4)
    pred = np.asarray(pred_xyxy, dtype=float).reshape(-1, 4)
    matched = np.zeros(len(gt), dtype=bool)
    if not len(gt) or not len(pred):
        return matched
    ious = box_iou(pred, gt)  # (P, G)
    for i in np.argsort(-np.asarray(pred_conf, dtype=float), kind="stable"):
        candidates = np.where(matched, -1.0, ious[i])
        j = int(np.argmax(candidates))
        if candidates[j] >= iou:
            matched[j] = True
    return matched


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Ultralytics' ``compute_ap``: 101-point interpolated area under the precision envelope.

    A perfect ranking (recall 1 at precision 1) gives 0.995, as in Ultralytics.
    """
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    y = np.interp(x, mrec, mpre)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))  # trapezoid


def _is_small(xyxy: np.ndarray, small_px: float) -> np.ndarray:
    """Both sides < ``small_px``."""
    return np.maximum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]) < small_px


def size_range_ap50(
    preds: list[dict[str, np.ndarray]],
    gts: list[np.ndarray],
    nc: int,
    small_px: float | None = 16,
    iou_thr: float = 0.5,
) -> dict:
    """Per-class AP50 on small objects with COCO-style ignores (see the module docstring).

    Parameters
    ----------
    preds : per image ``{"xyxy": (N, 4), "conf": (N,), "cls": (N,)}`` in pixels.
    gts : per image ``(M, 5)`` rows ``cls, x0, y0, x1, y1`` in pixels.
    small_px : size limit; ``None`` evaluates every object (no ignores).

    Returns
    -------
    dict
        ``map50`` (NaN without any object in range), ``ap50`` per class (NaN for a class
        without objects in range), ``n_gt`` objects in range, and every counted
        detection's ``conf`` and ``tp`` (1.0 / 0.0), pooled over classes.

    Examples
    --------
    Class 0, a 10 px and a 40 px object; detections: conf 0.95 on the 40 px one, 0.9 on
    the 10 px one, 0.7 an 8 px false alarm, 0.6 a 30 px false alarm. Small range: the
    0.95 and 0.6 ones are ignored, then TP, FP -> AP 0.995. Deleting the large label
    instead would count the 0.95 one as FP first: AP 0.5.
    """
    tps = [[] for _ in range(nc)]
    confs = [[] for _ in range(nc)]
    n_pos = np.zeros(nc, dtype=int)
    for pred, gt in zip(preds, gts, strict=True):
        gt = np.asarray(gt, dtype=np.float64).reshape(-1, 5)
        for c in range(nc):
            g = gt[gt[:, 0] == c, 1:]
            in_range = _is_small(g, small_px) if small_px is not None else np.ones(len(g), bool)
            n_pos[c] += int(in_range.sum())
            keep = pred["cls"] == c
            if not keep.any():
                continue
            d, conf = pred["xyxy"][keep].astype(np.float64), pred["conf"][keep]
            order = np.argsort(-conf, kind="stable")
            d, conf = d[order], conf[order]
            iou = box_iou(d, g) if len(g) else np.zeros((len(d), 0))
            d_small = _is_small(d, small_px) if small_px is not None else np.ones(len(d), bool)
            matched = np.zeros(len(g), bool)
            for j in range(len(d)):
                cand = np.where(in_range & ~matched & (iou[j] >= iou_thr))[0]
                if len(cand):
                    matched[cand[np.argmax(iou[j, cand])]] = True
                    tps[c].append(1.0)
                elif np.any(~in_range & (iou[j] >= iou_thr)) or not d_small[j]:
                    continue  # on an ignored (large) object, or itself out of range: neither TP nor FP
                else:
                    tps[c].append(0.0)
                confs[c].append(float(conf[j]))
    ap50 = []
    for c in range(nc):
        if n_pos[c] == 0:
            ap50.append(float("nan"))
            continue
        order = np.argsort(-np.asarray(confs[c]), kind="stable")
        tp = np.asarray(tps[c])[order]
        if len(tp) == 0:
            ap50.append(0.0)
            continue
        tpc = np.cumsum(tp)
        ap50.append(compute_ap(tpc / n_pos[c], tpc / np.arange(1, len(tp) + 1)))
    present = [v for v in ap50 if not math.isnan(v)]
    return {"map50": float(np.mean(present)) if present else float("nan"), "ap50": ap50,
            "n_gt": int(n_pos.sum()), "conf": [v for c in confs for v in c], "tp": [v for c in tps for v in c]}


def score(dets: Sequence[Detections], gts: Sequence[np.ndarray], nc: int, small_px: float | None = None) -> dict:
    """mAP50 (class-aware, :func:`size_range_ap50`), recall and FNR at IoU 0.5 (class-aware :func:`matched_gt`).

    ``dets`` and ``gts`` are per image (``gts``: ``(M, 5)`` pixel rows ``cls, x1, y1, x2, y2``).
    Returns ``map50``, ``map50_small`` (objects with both sides < ``small_px``; NaN when
    ``small_px`` is None), ``recall``, ``fnr = 1 - recall`` (NaN without ground truth),
    ``n_gt`` and :func:`precision_one`'s ``conf_p1`` and ``recall_p1``.
    """
    preds = [{"xyxy": d.xyxy, "conf": d.conf, "cls": d.cls} for d in dets]
    found = []
    for d, gt in zip(dets, gts, strict=True):
        gt = np.asarray(gt, dtype=np.float64).reshape(-1, 5)
        for c in np.unique(gt[:, 0]).astype(int):
            mine, theirs = d.cls == c, gt[:, 0] == c
            found.extend(matched_gt(d.xyxy[mine], d.conf[mine], gt[theirs, 1:]))
    recall = float(np.mean(found)) if found else float("nan")
    every = size_range_ap50(preds, gts, nc, small_px=None)
    small = size_range_ap50(preds, gts, nc, small_px=small_px)["map50"] if small_px is not None else float("nan")
    return {"map50": every["map50"], "map50_small": small, "recall": recall, "fnr": 1.0 - recall,
            "n_gt": int(sum(len(g) for g in gts)), **precision_one(every["conf"], every["tp"], every["n_gt"])}


def precision_one(conf: list[float], tp: list[float], n_gt: int) -> dict:
    """Paper Tables 3-4: the confidence from which on precision is 1.0, and the recall there.

    Detections sorted by confidence; above the highest-scoring false positive every
    detection is correct: ``conf_p1`` is that false positive's confidence (precision is
    1.0 for thresholds above it; lower is better), ``recall_p1`` the recall above it.
    No false positive at all: ``conf_p1`` = 0. The first detection false: ``conf_p1`` =
    its confidence and ``recall_p1`` = 0.

    Examples
    --------
    conf [0.9, 0.8, 0.6, 0.5], tp [1, 1, 0, 1], 4 objects -> conf_p1 0.6, recall_p1 0.5.
    """
    order = np.argsort(-np.asarray(conf, dtype=float), kind="stable")
    flags = np.asarray(tp, dtype=float)[order]
    false = np.where(flags == 0)[0]
    k = int(false[0]) if len(false) else len(flags)
    return {"conf_p1": float(np.asarray(conf, dtype=float)[order][k]) if len(false) else 0.0,
            "recall_p1": float(flags[:k].sum() / n_gt) if n_gt else float("nan")}




def f1_threshold(conf: Sequence[float], tp: Sequence[float], n_gt: int) -> dict | None:
    """The answer threshold of best F1: keep detections with ``conf >= t``.

    ``conf`` and ``tp`` (1.0 / 0.0) are every detection's confidence and match flag (e.g. :func:`size_range_ap50`'s
    pooled ``conf`` and ``tp``: class-aware matches at IoU 0.5, pooled over classes, so the F1 is micro-averaged);
    ``n_gt`` counts the ground-truth objects. Greedy matching goes by descending confidence, so the flags of the
    detections above any threshold do not depend on those below it. Each detection's confidence is a candidate
    ``t``: with ``k`` detections and ``m`` matches from ``t`` on, ``F1 = 2m / (k + n_gt)``; ties keep the highest
    ``t`` (fewer boxes for the same F1). Returns ``{"conf", "f1", "precision", "recall"}``, or None when no
    detection is a match (no threshold has F1 > 0) or there is no object.

    Examples
    --------
    conf [0.9, 0.8, 0.6, 0.5, 0.3], tp [1, 1, 0, 1, 0], 4 objects: from 0.9 on F1 = 2/(1+4) = 0.4, from 0.8 on
    4/6 = 0.667, 0.6: 4/7 = 0.571, 0.5: 6/8 = 0.75, 0.3: 6/9 = 0.667 -> conf 0.5, F1 0.75, precision 3/4,
    recall 3/4.
    """
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    flags = np.asarray(tp, dtype=np.float64).reshape(-1)
    if conf.shape != flags.shape:
        raise ValueError(f"conf has {conf.size} entries, tp {flags.size}")
    if n_gt <= 0 or not flags.any():
        return None
    order = np.argsort(-conf, kind="stable")
    conf, flags = conf[order], flags[order]
    last = np.r_[conf[1:] != conf[:-1], True]  # the last of each run of equal confidences: a threshold keeps all
    k = np.arange(1, len(conf) + 1)[last]
    m = np.cumsum(flags)[last]
    f1 = 2 * m / (k + n_gt)
    best = int(np.argmax(f1))  # the first maximum: the highest threshold
    return {"conf": float(conf[last][best]), "f1": float(f1[best]), "precision": float(m[best] / k[best]),
            "recall": float(m[best] / n_gt)}
