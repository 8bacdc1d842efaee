"""Keyframe selection and short object tracks across keyframes (paper section 4.2).

The paper extracts keyframes from a video ``V = {f_t}`` by the inter-frame
difference method::

    Δf_t = || f_t - f_{t-1} ||_2                      (inter-frame difference)
    f_t is a keyframe  <=>  Δf_t > β · median({Δf_i}_{i=1..t}),  β ∈ {1.5, 2}

and groups keyframes into temporal windows ``W_j = {k_1, ..., k_m}`` over which
object trajectories are built (here the tracks' hit/miss history over the last
keyframes, see Tracks below). The paper leaves several things open; the
choices made here are:

Scale of Δf_t
    Each frame is converted to grayscale (ITU-R BT.601 weights on BGR, the
    weights OpenCV's ``BGR2GRAY`` uses), area-averaged down to ``size``
    (64×64 by default), scaled to [0, 1] by /255 (:func:`preprocess_frame`), and
    the L2 norm of the difference is divided by ``sqrt(number of pixels)``:
    ``Δ = ||g(f_t) − g(f_{t−1})||_2 / sqrt(h·w)``. So Δf_t is the RMS grey-level
    change in [0, 1]: independent of the camera resolution and of ``size``,
    which keeps β and the absolute cut threshold meaningful across cameras.
    Black → white everywhere gives Δ = 1; only the left half turning from 0 to
    255 gives ``sqrt(0.5)``; a uniform change from grey 10 to 27 gives 17/255. (β multiplies a median, so it is scale free anyway; the cut
    threshold is not.)

Sampling large frames
    A frame more than ``oversample`` (default 4) times the copy's size along an
    axis is first sampled on a regular grid of ``oversample · n_out`` points
    (the centre of each of that many equal spans; :func:`sample_grid`), and only
    the samples are converted to grey and averaged, ``oversample × oversample``
    samples per output pixel. A 1080p frame becomes 256×256 samples: Δf_t keeps
    its scale (an RMS grey-level change in [0, 1]) at a fraction of the cost
    (``benchmarks/results/scale.md`` measures both). Frames up to ``oversample``
    times the copy (256×256 for 64×64) are averaged over every pixel, exactly;
    ``oversample=0`` does that for every frame.

Resizing without OpenCV
    The area-averaging resize is implemented in numpy as two small weight
    matrices (``out = R_y @ img @ R_x^T``), which is what OpenCV's
    ``INTER_AREA`` computes for downscaling (a test checks it when cv2 is
    installed). This keeps the module free of optional imports and gives the
    same Δf_t (up to float rounding) whether or not OpenCV is installed. Gray
    and resize run in float32.

Is Δf_t itself in the median?
    Yes, literally as in the paper: the median runs over Δf_1..Δf_t. With a
    history of a few values this damps the rule (with only one earlier value
    and β ≥ 2 no frame could ever pass), which is one reason for the warm-up
    below; after warm-up the current value moves the median by at most half a
    rank, so the literal reading and the "history only" reading agree to
    within that. ``history`` optionally bounds the median to the last
    ``history`` differences (for long live streams); ``None`` (default) keeps
    all of them, as the paper writes.

Warm-up
    During the first ``warmup`` differences (0-based frames 1..warmup) the median is
    not trusted: no frame becomes a keyframe by the motion rule, only by the
    scene-cut rule. The first frame is always a keyframe.

Scene cuts
    A difference at or above ``cut_threshold`` (absolute, RMS in [0, 1];
    default 0.25, i.e. an RMS change of ~64 grey levels on the 64×64 copy) is
    always a keyframe, also during warm-up. The default is a judgement call,
    not a measured value: small pans and moving objects change far less than
    a quarter of the grey range on a downscaled frame, while two unrelated
    scenes usually differ by more; tune it per camera if needed. Optionally ``cut_ratio`` also
    declares a cut when Δf_t > cut_ratio · median (off by default).

Maximum gap (not in the paper)
    ``max_gap`` (default ``None`` = off, as in the paper) forces a keyframe when
    ``max_gap`` frames have passed since the last one, reason ``"gap"``. On a
    static camera whose difference series is flat, the paper's rule alone
    would never look again. The edge runtime (``clients.edge``) sets 3 by
    default: on the built-in benchmark's videos the motion rule alone missed
    small objects appearing in a calm scene for up to 45 frames.

Still video
    A history of zeros gives a median of 0, and then any sensor flicker would
    exceed β·0. The median is therefore floored at ``min_delta`` (default 1e-3,
    i.e. ~0.26 grey levels RMS): a frame is a motion keyframe only if
    ``Δf_t > β · max(median, min_delta)``. Still frames (Δ = 0) are never
    keyframes after the first one.

Tracks
    :class:`IoUTracker` associates boxes between consecutive keyframes greedily
    by IoU, per class, and keeps for every track a hit/miss history over the
    last ``history`` keyframes since the track started. That history is what
    :func:`common.routing.ambiguity_reasons` reads for the "unstable" rule
    (paper 4.2 (c)).

No flwr, ultralytics, wandb or torch here: numpy and the standard library only.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from common.detections import as_boxes, box_iou

logger = logging.getLogger(__name__)

__all__ = [
    "GRAY_WEIGHTS_BGR",
    "to_gray",
    "area_resize",
    "sample_grid",
    "preprocess_frame",
    "KeyframeSelector",
    "box_iou",
    "Track",
    "IoUTracker",
]

#: BT.601 luma weights in BGR order (OpenCV's ``COLOR_BGR2GRAY``).
GRAY_WEIGHTS_BGR = np.array([0.114, 0.587, 0.299], dtype=np.float64)
_GRAY_WEIGHTS_BGR32 = GRAY_WEIGHTS_BGR.astype(np.float32)

REASON_FIRST = "first"
REASON_CUT = "cut"
REASON_MOTION = "motion"
REASON_GAP = "gap"


# --------------------------------------------------------------------------- #
# Frame preprocessing and the inter-frame difference
# --------------------------------------------------------------------------- #
def _check_frame(frame: Any) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must have dtype uint8, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise ValueError(f"frame must be HxW or HxWx3 (BGR), got shape {frame.shape}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame is empty: shape {frame.shape}")
    return frame


def _check_size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be a pair (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def to_gray(frame: np.ndarray) -> np.ndarray:
    """Grayscale copy of a uint8 frame as float64 grey levels in [0, 255].

    ``gray = 0.114·B + 0.587·G + 0.299·R`` (BT.601, BGR channel order as
    OpenCV delivers frames); an HxW frame is returned as float unchanged.

    Parameters
    ----------
    frame : np.ndarray
        ``(H, W)`` or ``(H, W, 3)`` uint8, BGR.

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32 (float32 halves the cost on HD frames; the rounding,
        ~1e-5 grey levels, is far below one grey level).

    Examples
    --------
    A pure red pixel (B, G, R) = (0, 0, 255) has grey level 0.299·255 = 76.245:

    >>> float(to_gray(np.array([[[0, 0, 255]]], dtype=np.uint8))[0, 0])  # doctest: +ELLIPSIS
    76.24...
    """
    frame = _check_frame(frame)
    if frame.ndim == 2:
        return frame.astype(np.float32)
    w = _GRAY_WEIGHTS_BGR32
    # per-channel sum: uint8 * float32 scalar stays float32, no (H, W, 3) float copy
    return frame[:, :, 0] * w[0] + frame[:, :, 1] * w[1] + frame[:, :, 2] * w[2]


@lru_cache(maxsize=64)
def _area_matrix(n_in: int, n_out: int, dtype: str = "float64") -> np.ndarray:
    """(n_out, n_in) weights: output pixel i averages input span [i·s, (i+1)·s), s = n_in/n_out."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1, dtype=np.float64) * scale  # output pixel borders in input coords
    lo, hi = edges[:-1, None], edges[1:, None]  # (n_out, 1)
    j = np.arange(n_in, dtype=np.float64)[None, :]  # (1, n_in)
    overlap = np.clip(np.minimum(hi, j + 1.0) - np.maximum(lo, j), 0.0, None)  # (n_out, n_in)
    weights = (overlap / scale).astype(dtype)
    weights.setflags(write=False)
    return weights


def area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaging resize of a 2-D float image (numpy twin of ``cv2.INTER_AREA``).

    Output pixel ``(i, j)`` is the area-weighted mean of the input pixels that
    the output pixel's footprint ``[i·s_y, (i+1)·s_y) × [j·s_x, (j+1)·s_x)``
    covers, ``s = n_in / n_out``; computed as ``R_y @ image @ R_x^T``, or as the
    mean over whole blocks when ``s`` is an integer on both axes.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` float.
    size : tuple of int
        ``(height, width)`` of the output.

    Returns
    -------
    np.ndarray
        ``(height, width)``; float32 for float32 input, float64 otherwise.

    Examples
    --------
    Halving ``[[0, 2], [4, 6]]`` to 1×1 gives the mean 3; resizing
    ``[[0, 3, 6]]`` (width 3) to width 2 gives ``[(0 + 3/2)/1.5, (3/2 + 6)/1.5]``
    = ``[1, 5]``.

    >>> area_resize(np.array([[0.0, 3.0, 6.0]]), (1, 2))
    array([[1., 5.]])
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    h, w = _check_size(size)
    dtype = np.float32 if image.dtype == np.float32 else np.float64
    if image.shape == (h, w):
        return image.astype(dtype, copy=True)
    if image.shape[0] % h == 0 and image.shape[1] % w == 0:  # whole blocks: their mean, no matrix product
        fy, fx = image.shape[0] // h, image.shape[1] // w
        return image.astype(dtype, copy=False).reshape(h, fy, w, fx).mean(axis=(1, 3), dtype=dtype)
    ry = _area_matrix(image.shape[0], h, np.dtype(dtype).name)  # (h, H)
    rx = _area_matrix(image.shape[1], w, np.dtype(dtype).name)  # (w, W)
    return ry @ image.astype(dtype, copy=False) @ rx.T  # (h, H)@(H, W)@(W, w) -> (h, w)


@lru_cache(maxsize=64)
def sample_grid(n_in: int, n_out: int, oversample: int = 4) -> np.ndarray | None:
    """Rows (or columns) to sample from an axis of ``n_in`` pixels resized to ``n_out``; None: use every pixel.

    ``oversample · n_out`` points, the centres of as many equal spans:
    ``floor((i + 0.5) · n_in / (oversample · n_out))``. None when ``oversample`` is 0 or
    the axis has no more than ``oversample · n_out`` pixels.

    Examples
    --------
    480 rows to 1 with ``oversample = 2``: spans of 240 -> rows 120 and 360; 1080 rows to 64: 256 rows.
    """
    n = oversample * n_out
    if not oversample or n_in <= n:
        return None
    grid = ((np.arange(n) + 0.5) * (n_in / n)).astype(np.intp)
    grid.setflags(write=False)
    return grid


def preprocess_frame(frame: np.ndarray, size: tuple[int, int] = (64, 64), oversample: int = 4) -> np.ndarray:
    """The small grayscale copy that Δf_t is computed on: strided samples, gray, area-resized, /255.

    Parameters
    ----------
    frame : np.ndarray
        ``(H, W)`` or ``(H, W, 3)`` uint8 (BGR).
    size : tuple of int
        ``(height, width)`` of the copy, default 64×64.
    oversample : int
        Samples per output pixel and axis for large frames (see :func:`sample_grid`); 0: every pixel.

    Returns
    -------
    np.ndarray
        ``size`` float64 with values in [0, 1].

    Examples
    --------
    A 2×2 frame ``[[0, 255], [255, 255]]`` resized to 1×1 is ``(0+3·255)/4/255 = 0.75``.
    """
    h, w = _check_size(size)
    if int(oversample) != oversample or oversample < 0:
        raise ValueError(f"oversample must be an integer >= 0, got {oversample!r}")
    rows, cols = sample_grid(frame.shape[0], h, oversample), sample_grid(frame.shape[1], w, oversample)
    if rows is not None:
        frame = frame.take(rows, axis=0)
    if cols is not None:
        frame = frame.take(cols, axis=1)
    # Gray and resize are both linear, so gray-then-resize equals resize-then-gray;
    # gray first is cheaper (one channel to resize).
    return area_resize(to_gray(frame), (h, w)).astype(np.float64) / 255.0


def _small_difference(a: np.ndarray, b: np.ndarray) -> float:
    """RMS difference of two preprocessed copies: ||a - b||_2 / sqrt(a.size)."""
    return float(np.linalg.norm(b - a) / np.sqrt(a.size))


# --------------------------------------------------------------------------- #
# Keyframe selection
# --------------------------------------------------------------------------- #
class KeyframeSelector:
    """Streaming keyframe selector: ``Δf_t > β · median(Δf_1..t)`` (paper 4.2).

    Rules, checked in this order for frame t (t = 0 is the first frame):

    1. ``t = 0`` → key, reason ``"first"``.
    2. ``Δf_t ≥ cut_threshold`` (or ``Δf_t > cut_ratio · m`` when ``cut_ratio``
       is set) → key, reason ``"cut"`` (also during warm-up).
    3. ``t > warmup`` and ``Δf_t > β · max(m, min_delta)`` → key, reason
       ``"motion"`` (during warm-up the median is not trusted).
    4. ``max_gap`` set and ``t − (last keyframe) ≥ max_gap`` → key, reason ``"gap"``.

    where ``m = median(Δf_1, ..., Δf_t)`` includes the current difference (as
    in the paper), over all differences or the last ``history`` of them. Every
    difference, cut or not, enters the history (the median is robust to the
    rare cut).

    Parameters
    ----------
    beta : float
        β, the paper's 1.5 or 2. Must be > 0.
    warmup : int
        Number of initial differences during which only cuts are keyframes.
    cut_threshold : float
        Absolute Δ (RMS in [0, 1]) at or above which a frame is a scene cut.
    cut_ratio : float or None
        Also a cut when ``Δf_t > cut_ratio · m``; ``None`` disables it.
    min_delta : float
        Floor under the median so still video does not make flicker key.
    size : tuple of int
        ``(height, width)`` of the downscaled copies (see :func:`preprocess_frame`).
    oversample : int
        Strided sampling of large frames (see :func:`preprocess_frame`); 0: every pixel.
    history : int or None
        Median over the last ``history`` differences; ``None`` = all (paper).
    max_gap : int or None
        Force a keyframe after this many frames without one; ``None`` = never.

    Attributes
    ----------
    last_delta : float or None
        Δf_t of the last frame (``None`` for the first frame).
    last_threshold : float or None
        ``β · max(m, min_delta)`` used for the last frame.

    Examples
    --------
    Uniform frames with grey levels 0, 10, 20, 30, 40, 50, 67: the differences
    are 10/255 five times, then 17/255. For the last frame the median of
    ``[10, 10, 10, 10, 10, 17]/255`` is 10/255; 17 > 1.5·10 = 15 → key at
    β = 1.5, but 17 < 2·10 = 20 → not key at β = 2.
    """

    def __init__(
        self,
        beta: float = 1.5,
        warmup: int = 3,
        cut_threshold: float = 0.25,
        cut_ratio: float | None = None,
        min_delta: float = 1e-3,
        size: tuple[int, int] = (64, 64),
        history: int | None = None,
        max_gap: int | None = None,
        oversample: int = 4,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        if not cut_threshold > 0:
            raise ValueError(f"cut_threshold must be > 0, got {cut_threshold!r}")
        if cut_ratio is not None and not cut_ratio > beta:
            raise ValueError(f"cut_ratio must be None or > beta ({beta}), got {cut_ratio!r}")
        if not min_delta > 0:
            raise ValueError(f"min_delta must be > 0, got {min_delta!r}")
        if history is not None and (int(history) != history or history < 1):
            raise ValueError(f"history must be None or an integer >= 1, got {history!r}")
        self.beta = float(beta)
        self.warmup = int(warmup)
        self.cut_threshold = float(cut_threshold)
        self.cut_ratio = None if cut_ratio is None else float(cut_ratio)
        self.min_delta = float(min_delta)
        self.size = _check_size(size)
        if int(oversample) != oversample or oversample < 0:
            raise ValueError(f"oversample must be an integer >= 0, got {oversample!r}")
        self.oversample = int(oversample)
        if max_gap is not None and (int(max_gap) != max_gap or max_gap < 1):
            raise ValueError(f"max_gap must be None or an integer >= 1, got {max_gap!r}")
        self.history = None if history is None else int(history)
        self.max_gap = None if max_gap is None else int(max_gap)
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next frame is a "first" keyframe again."""
        self._prev: np.ndarray | None = None
        self._deltas: deque[float] = deque(maxlen=self.history)
        self.frame_index = -1  # index of the last frame seen
        self.last_key_index = -1  # index of the last keyframe
        self.last_delta: float | None = None
        self.last_threshold: float | None = None

    def update_with_reason(self, frame: np.ndarray) -> tuple[bool, str | None]:
        """Feed the next frame; return ``(is_key, reason)``.

        ``reason`` is ``"first"``, ``"cut"``, ``"motion"``, ``"gap"`` or ``None`` (not key).
        """
        small = preprocess_frame(_check_frame(frame), self.size, self.oversample)
        self.frame_index += 1
        prev, self._prev = self._prev, small
        if prev is None:
            self.last_delta = None
            self.last_threshold = None
            return self._decide(REASON_FIRST)

        delta = _small_difference(prev, small)
        self._deltas.append(delta)
        median = float(np.median(self._deltas))  # includes Δf_t, as in the paper
        threshold = self.beta * max(median, self.min_delta)
        self.last_delta = delta
        self.last_threshold = threshold

        n_seen = self.frame_index  # number of differences seen so far, t
        if delta >= self.cut_threshold or (
            self.cut_ratio is not None and delta > self.cut_ratio * max(median, self.min_delta)
        ):
            return self._decide(REASON_CUT)
        if n_seen > self.warmup and delta > threshold:
            return self._decide(REASON_MOTION)
        if self.max_gap is not None and self.frame_index - self.last_key_index >= self.max_gap:
            return self._decide(REASON_GAP)
        return self._decide(None)

    def _decide(self, reason: str | None) -> tuple[bool, str | None]:
        if reason is not None:
            self.last_key_index = self.frame_index
            logger.debug(
                "keyframe %d: %s (delta=%s, threshold=%s)",
                self.frame_index,
                reason,
                self.last_delta,
                self.last_threshold,
            )
        return reason is not None, reason

    def update(self, frame: np.ndarray) -> bool:
        """Feed the next frame; return whether it is a keyframe."""
        return self.update_with_reason(frame)[0]


# --------------------------------------------------------------------------- #
# IoU and short tracks
# --------------------------------------------------------------------------- #
@dataclass
class Track:
    """One short object track across keyframes.

    ``history`` holds one bool per keyframe since the track started (True = the
    object was detected on that keyframe), at most the tracker's ``history``
    entries, oldest first; it always starts with a hit.
    """

    track_id: int
    cls: int
    box: np.ndarray
    history: deque = field(default_factory=deque)
    misses: int = 0  # consecutive misses, for max_age
    hits: int = 0  # total hits since the track started

    @property
    def pattern(self) -> tuple[bool, ...]:
        return tuple(self.history)


class IoUTracker:
    """Greedy per-class IoU association of detections across keyframes.

    On each keyframe: for every class, all (track, detection) pairs with
    ``IoU(track's last box, detection) ≥ iou_threshold`` are matched greedily by
    descending IoU (ties: lower track id, then lower detection index). Matched
    tracks record a hit and take the new box; unmatched detections start new
    tracks; unmatched tracks record a miss and are deleted after more than
    ``max_age`` consecutive misses.

    Parameters
    ----------
    iou_threshold : float
        Minimum IoU to continue a track, in (0, 1].
    max_age : int
        Consecutive missed keyframes a track survives (default 4, so a track
        can show the hit-miss-miss-miss-hit pattern inside a 5-keyframe window).
    history : int
        Length of the per-track hit/miss history (default 5 = paper's N).

    Examples
    --------
    Keyframe 1: box ``[0, 0, 10, 10]`` → new track 0. Keyframe 2: nothing →
    track 0 history ``(True, False)``. Keyframe 3: ``[1, 0, 11, 10]``
    (IoU = 90/110 ≈ 0.82) → track 0 again, history ``(True, False, True)``.
    """

    def __init__(self, iou_threshold: float = 0.3, max_age: int = 4, history: int = 5) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
        if int(max_age) != max_age or max_age < 0:
            raise ValueError(f"max_age must be an integer >= 0, got {max_age!r}")
        if int(history) != history or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        self.iou_threshold = float(iou_threshold)
        self.max_age = int(max_age)
        self.history = int(history)
        self.tracks: dict[int, Track] = {}
        self._next_id = 0

    def reset(self) -> None:
        self.tracks.clear()
        self._next_id = 0

    def update(self, boxes: Any, classes: Any) -> np.ndarray:
        """Associate one keyframe's detections; return their track ids.

        Parameters
        ----------
        boxes : array_like
            ``(N, 4)`` xyxy boxes of this keyframe.
        classes : array_like
            ``(N,)`` integer class ids.

        Returns
        -------
        np.ndarray
            ``(N,)`` int64 track id per detection.
        """
        boxes = as_boxes(boxes, "boxes")
        classes = np.asarray(classes).reshape(-1)
        if classes.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"classes has {classes.shape[0]} entries but boxes has {boxes.shape[0]}"
            )
        classes = classes.astype(np.int64)
        ids = np.full(boxes.shape[0], -1, dtype=np.int64)
        matched_tracks: set[int] = set()

        for c in np.unique(classes):
            det_idx = np.flatnonzero(classes == c)
            track_ids = sorted(t.track_id for t in self.tracks.values() if t.cls == c)
            if not track_ids:
                continue
            track_boxes = np.stack([self.tracks[t].box for t in track_ids])
            iou = box_iou(track_boxes, boxes[det_idx])  # (T, D)
            ti, di = np.nonzero(iou >= self.iou_threshold)
            # descending IoU; stable sort keeps (track, detection) order for ties
            order = np.argsort(-iou[ti, di], kind="stable")
            used_t: set[int] = set()
            used_d: set[int] = set()
            most = min(len(track_ids), len(det_idx))
            for t, d in zip(ti[order].tolist(), di[order].tolist()):
                if t in used_t or d in used_d:
                    continue
                used_t.add(t)
                used_d.add(d)
                ids[det_idx[d]] = track_ids[t]
                if len(used_t) == most:  # one side is used up: no pair is left
                    break

        for i in range(boxes.shape[0]):
            if ids[i] >= 0:
                track = self.tracks[int(ids[i])]
                track.box = boxes[i].copy()
                track.history.append(True)
                track.misses = 0
                track.hits += 1
                matched_tracks.add(track.track_id)
            else:
                tid = self._next_id
                self._next_id += 1
                self.tracks[tid] = Track(
                    track_id=tid,
                    cls=int(classes[i]),
                    box=boxes[i].copy(),
                    history=deque([True], maxlen=self.history),
                    hits=1,
                )
                matched_tracks.add(tid)
                ids[i] = tid

        for tid in list(self.tracks):
            if tid in matched_tracks:
                continue
            track = self.tracks[tid]
            track.history.append(False)
            track.misses += 1
            if track.misses > self.max_age:
                del self.tracks[tid]
        return ids

    def pattern(self, track_id: int) -> tuple[bool, ...]:
        """Hit/miss history of a live track, oldest first (``()`` if unknown)."""
        track = self.tracks.get(int(track_id))
        return () if track is None else track.pattern

    def histories(self, track_ids: Sequence[int]) -> list[tuple[bool, ...]]:
        """Hit/miss histories for a list of track ids (as returned by :meth:`update`)."""
        return [self.pattern(t) for t in np.asarray(track_ids).reshape(-1)]
