"""Ambiguity routing between the edge and the cloud (paper section 4.2 (a)-(c)).

The edge model detects on keyframes; a detection is *ambiguous*, and is sent to
the cloud model for re-detection, when it meets one or more of:

(a) ``low_conf``  confidence < ``t_conf`` (paper: e.g. 0.5);
(b) ``small``     box area < ``t_size`` px²;
(c) ``unstable``  its track was detected intermittently over the last
                  ``n_frames`` keyframes (paper: N = 5).

The final result merges the confident, unambiguous edge detections with the
cloud's detections for what was offloaded. Choices where the paper is unclear:

``t_size``
    The paper gives no value. ``routing.t_size`` is 256 px² (16×16), the upper bound of the
    "tiny" class in small-object benchmarks (AI-TOD: < 16×16), which matches
    the built-in benchmark's object sizes. COCO's "small" (< 32²) would send
    almost every VisDrone object to the cloud. Areas are in the pixel units of
    the boxes passed in (frame pixels); scale boxes first if the detector ran on
    a resized frame. Comparisons are strict: confidence exactly ``t_conf`` and
    area exactly ``t_size`` are *not* ambiguous.

"Intermittently detected" (c)
    A track's history is one bool per keyframe since the track started (see
    :class:`common.keyframes.IoUTracker`). The track is unstable when the last
    ``n_frames`` entries of that history contain at least one hit *and* at
    least one miss (a seen-missed pattern). Since the history starts with the
    first hit and a detection being routed is a hit on the current keyframe,
    this means: "missed at least once in the last ``n_frames`` keyframes". A
    new track (history ``(True,)``) is not unstable; "roughly the same spatial
    position" is the tracker's IoU association.

Merge
    Result = edge detections that were not offloaded, minus those that overlap
    any cloud detection with IoU ≥ ``iou``, plus all cloud detections. The
    overlap test is class-agnostic by default: the cloud re-detected that
    region and its label wins; a same-class-only rule would keep a duplicate
    edge box exactly when the cloud corrects the class. An offloaded edge
    detection that the cloud does not confirm is dropped (the cloud's answer
    for that region is authoritative, this is what cuts false positives).

Offloading chosen by a budget
    How much to offload pays off differently where the edge is about as good as the cloud (crops around what
    the edge finds ambiguous, fused with its answer, beat both) and where the cloud is far stronger (only the
    whole keyframe lets the cloud see what the edge missed). A site measures, on its validation split, every
    offload option (mode and thresholds: :data:`clients.collab.OFFLOAD_GRID`) with its upload bytes per frame,
    mAP50 and recall; :func:`choose_offload` picks one from a stated :class:`Budget` (``routing.budget``).

Crop regions, atlases and frame coordinates of what is offloaded: :mod:`common.offload`.
Detections come from :mod:`common.detections`. No flwr, ultralytics, wandb, torch or OpenCV here.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from common.detections import Detections, as_boxes, box_area, box_iou

logger = logging.getLogger(__name__)

__all__ = [
    "REASONS",
    "is_unstable",
    "ambiguity_reasons",
    "ambiguous_mask",
    "Routing",
    "route",
    "merge",
    "reason_counts",
    "OFFLOAD_MODES",
    "Budget",
    "parse_budget",
    "choose_offload",
]

REASON_LOW_CONF = "low_conf"
REASON_SMALL = "small"
REASON_UNSTABLE = "unstable"
#: Reason names, in the order they are reported.
REASONS = (REASON_LOW_CONF, REASON_SMALL, REASON_UNSTABLE)


# --------------------------------------------------------------------------- #
# Ambiguity (paper 4.2 (a)-(c))
# --------------------------------------------------------------------------- #
def _check_n_frames(n_frames: int) -> int:
    if int(n_frames) != n_frames or n_frames < 1:
        raise ValueError(f"n_frames must be an integer >= 1, got {n_frames!r}")
    return int(n_frames)


def is_unstable(history: Sequence[bool] | None, n_frames: int = 5) -> bool:
    """Whether a track was detected intermittently over the last ``n_frames`` keyframes.

    ``window = history[-n_frames:]``; unstable ⇔ ``any(window) and not all(window)``
    (at least one hit and at least one miss).

    Parameters
    ----------
    history : sequence of bool or None
        One entry per keyframe since the track started, oldest first, True = hit.
        ``None`` or empty means "no temporal information" → False.
    n_frames : int
        N, the window length in keyframes (paper: 5).

    Examples
    --------
    ``(T, F, T)`` → True; ``(T, T, T, T, T)`` → False; ``(T, F, T, T, T, T, T)``
    with N = 5 → window ``(T, T, T, T, T)`` → False (the miss is too old).
    """
    n_frames = _check_n_frames(n_frames)
    if not history:
        return False
    window = [bool(h) for h in list(history)[-n_frames:]]
    return any(window) and not all(window)


def ambiguity_reasons(
    boxes: Any,
    scores: Any,
    track_histories: Sequence[Sequence[bool] | None] | None,
    *,
    t_conf: float,
    t_size: float,
    n_frames: int,
) -> list[tuple[str, ...]]:
    """Why each detection is ambiguous (paper 4.2 (a)-(c)); ``()`` = confident.

    For detection i with box area ``A_i = (x2-x1)(y2-y1)``, confidence ``s_i``
    and track history ``h_i``, the reasons are, in this order:
    ``"low_conf"`` if ``s_i < t_conf``; ``"small"`` if ``A_i < t_size``;
    ``"unstable"`` if :func:`is_unstable` ``(h_i, n_frames)``.

    Parameters
    ----------
    boxes : array_like
        ``(N, 4)`` xyxy in frame pixels.
    scores : array_like
        ``(N,)`` confidences.
    track_histories : sequence or None
        ``N`` hit/miss histories (see :class:`common.keyframes.IoUTracker`), or
        None when there is no tracking (then no detection is "unstable").
    t_conf : float
        T_conf in [0, 1] (paper: 0.5).
    t_size : float
        T_size in px² (default 256 = 16×16).
    n_frames : int
        N in keyframes (paper: 5).

    Returns
    -------
    list of tuple of str
        One tuple per detection.

    Examples
    --------
    Boxes ``[0,0,20,20]`` (400 px²), ``[0,0,10,10]`` (100 px²) with scores 0.9
    and 0.4, histories ``(T,T)`` and ``(T,F,T)``: → ``[(), ("low_conf",
    "small", "unstable")]``.
    """
    if not 0.0 <= t_conf <= 1.0:
        raise ValueError(f"t_conf must be in [0, 1], got {t_conf!r}")
    if not t_size >= 0:
        raise ValueError(f"t_size must be >= 0 px², got {t_size!r}")
    n_frames = _check_n_frames(n_frames)
    xyxy = as_boxes(boxes)
    conf = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = xyxy.shape[0]
    if conf.shape[0] != n:
        raise ValueError(f"scores has {conf.shape[0]} entries for {n} boxes")
    if track_histories is not None and len(track_histories) != n:
        raise ValueError(f"track_histories has {len(track_histories)} entries for {n} detections")
    low = conf < t_conf
    small = box_area(xyxy) < t_size
    out: list[tuple[str, ...]] = []
    for i in range(n):
        reasons = []
        if low[i]:
            reasons.append(REASON_LOW_CONF)
        if small[i]:
            reasons.append(REASON_SMALL)
        if track_histories is not None and is_unstable(track_histories[i], n_frames):
            reasons.append(REASON_UNSTABLE)
        out.append(tuple(reasons))
    return out


def ambiguous_mask(reasons: Sequence[tuple[str, ...]]) -> np.ndarray:
    """``(N,)`` bool: True where a detection has at least one reason."""
    return np.array([len(r) > 0 for r in reasons], dtype=bool)


@dataclass(eq=False)
class Routing:
    """Result of :func:`route`: the split and the per-detection reasons."""

    confident: Detections
    offloaded: Detections
    offload_mask: np.ndarray  # (N,) bool over the input detections
    reasons: list[tuple[str, ...]]


def route(
    detections: Detections,
    track_histories: Sequence[Sequence[bool] | None] | None,
    *,
    t_conf: float,
    t_size: float,
    n_frames: int,
) -> Routing:
    """Split edge detections into confident ones and ones to offload.

    ``offload_mask[i] = len(ambiguity_reasons(...)[i]) > 0``; ``confident`` and
    ``offloaded`` keep the input order.

    Examples
    --------
    Scores ``[0.9, 0.3]`` on two 20×20 boxes, no tracks → mask ``[False, True]``,
    reasons ``[(), ("low_conf",)]``.
    """
    reasons = ambiguity_reasons(detections.xyxy, detections.conf, track_histories, t_conf=t_conf, t_size=t_size,
                                n_frames=n_frames)
    mask = ambiguous_mask(reasons).reshape(len(detections))
    return Routing(detections.select(~mask), detections.select(mask), mask, reasons)


# --------------------------------------------------------------------------- #
# Merge
# --------------------------------------------------------------------------- #
MERGE_POLICIES = ("cloud", "fuse")


def merge(
    edge: Detections,
    cloud: Detections,
    offloaded_mask: Any = None,
    iou: float = 0.5,
    class_agnostic: bool = True,
    keep_unanswered: Any = False,
    resolve: str = "cloud",
) -> Detections:
    """Final detections: kept edge detections plus the cloud's, overlaps resolved by ``resolve``.

    ``kept = {e ∈ edge : not offloaded(e) and max_c IoU(e, c) < iou}`` (over
    cloud detections c of any class, or of e's class when ``class_agnostic``
    is False); result = ``kept`` followed by all of ``cloud``.

    With ``keep_unanswered`` an offloaded edge detection that no cloud box
    overlaps stays too, at its own confidence: the cloud's silence is then not
    taken as a "no" (right when the cloud misses small objects the edge finds;
    costs precision when the edge's doubtful boxes are mostly false). A
    ``(len(edge),)`` bool array instead decides per detection.

    ``resolve="fuse"`` treats edge and cloud as two detectors of one ensemble
    instead of trusting the cloud outright (right when the cloud is not the
    better model on this site's data). Edge and cloud boxes are paired one to
    one, greedily by descending IoU (ties: lower edge index, then lower cloud
    index), pairs with IoU >= ``iou`` (and, unless ``class_agnostic``, the same
    class). Each pair becomes one detection: box = confidence-weighted mean of
    the two boxes, class = the more confident side's (edge on a tie),
    confidence = noisy-or ``1 - (1 - c_e)(1 - c_c)`` (both saw it: surer than
    either alone). Unpaired cloud boxes stay; an unpaired edge box stays unless
    it was offloaded (then only with ``keep_unanswered``). Order: fused pairs
    (edge order), unpaired edge, unpaired cloud.

    Parameters
    ----------
    edge : Detections
        The edge model's detections (all of them).
    cloud : Detections
        The cloud's detections, already in frame coordinates
        (see :func:`to_frame_coords`); may be empty.
    offloaded_mask : array_like or None
        ``(len(edge),)`` bool, True for edge detections sent to the cloud; they
        are replaced by the cloud's answer. None = nothing was offloaded.
    iou : float
        Overlap in (0, 1] at which an edge detection is a duplicate of a cloud one.
    class_agnostic : bool
        Compare against cloud boxes of any class (default) or the same class only.

    Examples
    --------
    Edge: A ``[0,0,10,10]`` (kept), B ``[20,20,30,30]`` (offloaded), C
    ``[50,50,60,60]`` (kept); cloud: ``[20,20,30,30]`` and ``[1,0,11,10]``
    (IoU with A = 90/110 ≈ 0.82 ≥ 0.5). Result: C, then the two cloud boxes.
    With ``keep_unanswered`` the same: B overlaps a cloud box. Had the cloud
    answered only ``[1,0,11,10]``, B would stay: B, C, then that cloud box.

    Fused: edge ``[0,0,10,10]`` conf 0.4 cls 1, cloud ``[2,0,12,10]`` conf 0.6
    cls 2 (IoU 80/120 ≈ 0.67): one box ``[1.2,0,11.2,10]`` (0.4·0 + 0.6·2 = 1.2),
    cls 2, conf 1 − 0.6·0.4 = 0.76.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou!r}")
    if resolve not in MERGE_POLICIES:
        raise ValueError(f"resolve must be one of {MERGE_POLICIES}, got {resolve!r}")
    if offloaded_mask is None:
        offloaded = np.zeros(len(edge), dtype=bool)
    else:
        offloaded = np.asarray(offloaded_mask, dtype=bool).reshape(-1)
        if offloaded.shape[0] != len(edge):
            raise ValueError(
                f"offloaded_mask has {offloaded.shape[0]} entries for {len(edge)} edge detections"
            )
    keep_flags = np.asarray(keep_unanswered, dtype=bool).reshape(-1)
    if np.ndim(keep_unanswered) == 0:
        keep_flags = np.full(len(edge), bool(keep_unanswered))
    elif keep_flags.shape[0] != len(edge):
        raise ValueError(f"keep_unanswered has {keep_flags.shape[0]} entries for {len(edge)} edge detections")
    keep = ~offloaded | keep_flags
    overlap = np.zeros((len(edge), len(cloud)))
    if len(edge) and len(cloud):
        overlap = box_iou(edge.xyxy, cloud.xyxy)  # (E, C)
        if not class_agnostic:
            overlap = np.where(edge.cls[:, None] == cloud.cls[None, :], overlap, 0.0)
    if resolve == "cloud":
        keep &= ~(overlap >= iou).any(axis=1)
        return Detections.concat([edge.select(keep), cloud])
    pairs = []
    free_e, free_c = np.ones(len(edge), dtype=bool), np.ones(len(cloud), dtype=bool)
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        e, c = divmod(int(flat), len(cloud))
        if overlap[e, c] < iou:
            break
        if free_e[e] and free_c[c]:
            pairs.append((e, c))
            free_e[e] = free_c[c] = False
    pairs = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    pe, pc = edge[pairs[:, 0]], cloud[pairs[:, 1]]
    w = (pe.conf / np.maximum(pe.conf + pc.conf, 1e-12))[:, None]
    fused = Detections(w * pe.xyxy + (1 - w) * pc.xyxy, 1.0 - (1.0 - pe.conf) * (1.0 - pc.conf),
                       np.where(pc.conf > pe.conf, pc.cls, pe.cls))
    return Detections.concat([fused, edge.select(free_e & keep), cloud.select(free_c)])


def reason_counts(reasons: Iterable[tuple[str, ...]]) -> dict[str, int]:
    """How often each reason occurs (a detection with two reasons counts in both).

    Examples
    --------
    ``[(), ("low_conf",), ("low_conf", "small")]`` →
    ``{"low_conf": 2, "small": 1, "unstable": 0}``.
    """
    counts = Counter(r for rs in reasons for r in rs)
    unknown = set(counts) - set(REASONS)
    if unknown:
        raise ValueError(f"unknown ambiguity reasons: {sorted(unknown)}")
    return {r: counts.get(r, 0) for r in REASONS}


# --------------------------------------------------------------------------- #
# Offloading chosen by a budget
# --------------------------------------------------------------------------- #
#: what a keyframe sends: nothing (the edge alone), crops around the ambiguous boxes and the candidates, the whole
#: keyframe when anything is ambiguous (merged with the edge's answer), the whole keyframe always (the cloud alone)
OFFLOAD_MODES = ("none", "crops", "frame", "cloud")
#: ``kind:value`` forms of a budget, and what the value means
BUDGET_KINDS = {"bytes": "upload bytes per frame, X >= 0",
                "frame": "upload bytes per frame as a share of the whole keyframe's JPEG, X >= 0",
                "recall": "the recall to reach at the fewest bytes, 0 < X <= 1"}
BUDGET_FORMS = "'' (none), " + ", ".join(f"'{k}:X' ({v})" for k, v in BUDGET_KINDS.items())


@dataclass(frozen=True)
class Budget:
    """What a site may spend on offloading: ``kind`` one of :data:`BUDGET_KINDS`, ``value`` its amount."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def parse_budget(text: str) -> Budget | None:
    """``routing.budget`` as a :class:`Budget`; ``""`` (or ``"off"``) → None: no budget, the configured routing.

    Examples
    --------
    ``"bytes:4000"`` → ``Budget("bytes", 4000.0)``; ``"frame:0.25"`` → ``Budget("frame", 0.25)``;
    ``"recall:1.5"`` → ValueError naming ``'recall:1.5'``.
    """
    text = str(text).strip()
    if text in ("", "off"):
        return None
    kind, sep, value = text.partition(":")
    try:
        amount = float(value) if sep else math.nan
    except ValueError:
        amount = math.nan
    ok = kind in BUDGET_KINDS and math.isfinite(amount) and (0 < amount <= 1 if kind == "recall" else amount >= 0)
    if not ok:
        raise ValueError(f"budget {text!r}: expected {BUDGET_FORMS}")
    return Budget(kind, amount)


def choose_offload(measured: Mapping[str, Any], budget: Budget) -> dict:
    """The offload option a budget picks from a site's measurements.

    ``measured = {"frame_bytes": B, "options": [{"settings": {...}, "bytes": b, "map50": m, "recall": r}, ...]}``:
    per option the upload bytes per frame ``b``, the mAP50 ``m`` and recall ``r`` of the answer it gives, on
    the site's validation split; ``B`` the whole keyframe's JPEG bytes per frame there.

    - ``bytes:N`` / ``frame:F``: the cap is ``N`` bytes, or ``F · B``. Of the options with ``b <= cap``, the
      highest ``m`` (ties: fewer bytes, then the earlier option); when none fits, the one with the fewest bytes.
    - ``recall:R``: of the options with ``r >= R``, the fewest bytes (ties: higher ``m``, then the earlier);
      when none reaches ``R``, the highest recall (ties: fewer bytes).

    Returns the chosen option (one of ``measured["options"]``).

    Examples
    --------
    ``B = 10000``; options edge ``(b 0, m 0.30, r 0.40)``, crops ``(2000, 0.35, 0.50)``, frame
    ``(10000, 0.50, 0.70)``. ``frame:0.25`` (cap 2500) → crops; ``frame:1`` → frame; ``bytes:100`` → edge;
    ``recall:0.45`` → crops; ``recall:0.9`` → frame (the highest recall).
    """
    options = list(measured.get("options") or ())
    if not options:
        raise ValueError("choose_offload: no measured options")
    order = range(len(options))
    if budget.kind == "recall":
        reach = [i for i in order if options[i]["recall"] >= budget.value]
        if reach:
            best = min(reach, key=lambda i: (options[i]["bytes"], -options[i]["map50"], i))
        else:
            best = min(order, key=lambda i: (-options[i]["recall"], options[i]["bytes"], i))
        return options[best]
    cap = budget.value if budget.kind == "bytes" else budget.value * float(measured["frame_bytes"])
    fits = [i for i in order if options[i]["bytes"] <= cap]
    if not fits:
        return options[min(order, key=lambda i: (options[i]["bytes"], i))]
    return options[min(fits, key=lambda i: (-options[i]["map50"], options[i]["bytes"], i))]
