"""One collaboration step on a keyframe: detect -> route -> offload plan -> cloud -> merge (paper section 4.2).

Every user of the cloud-edge collaboration runs this step: the edge runtime
(:class:`clients.edge.EdgeRuntime`, which sends the offload through its disk queue
and merges when the answer arrives), the ClientApp's collaboration metrics
(:meth:`clients.site.LocalSite.collab_round`) and the collaboration benchmark.

1. :func:`detect_keyframe`: the edge detector on the image, down to
   ``candidate_conf``; boxes from ``det_conf`` on are the edge's answer, the ones
   below (from ``candidate_conf`` on) are *candidates* (offloaded, kept only where the cloud confirms them);
   each answer box gets its ambiguity reasons (:func:`common.routing.route`:
   ``low_conf``, ``small``, ``unstable`` with a tracker).
2. :func:`plan_offload`: crops with context around the ambiguous boxes and the
   candidates (or the whole keyframe), JPEG-encoded: an :class:`OffloadEntry`.
3. The cloud answers the entry (``client.send(entry)``, :class:`clients.offload.CloudClient`).
4. :func:`merge_answer`: ``common.routing.merge`` of the edge's boxes and candidates
   with the cloud's, offloaded unanswered answer boxes kept with ``keep_unanswered``,
   candidates never kept unconfirmed.

:func:`collaborate` chains the four synchronously for one image.

The answer threshold follows the model: when a site trains its model it calibrates ``det_conf`` on its own
validation split (:func:`calibrate_conf`: the F1-optimal confidence, clipped to :data:`CONF_RANGE`) and stores
it in the weights file's metadata (``det_conf``, :func:`common.yolo.save_weights`);
:meth:`CollabSettings.for_model` answers with it unless a CLI flag sets the threshold.

Returned dicts (:meth:`StepResult.boxes`, :func:`gallery`) are plain lists:
``{"xyxy": [[x1, y1, x2, y2], ...], "conf": [...], "cls": [...]}`` in image pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clients.offload import OffloadEntry
from common.config import RoutingConfig
from common.detections import Detections, f1_threshold, size_range_ap50
from common.routing import MERGE_POLICIES, merge, route

#: the reason a candidate (a box below ``det_conf``) is offloaded
CANDIDATE = "candidate"
_R = RoutingConfig
#: a calibrated answer threshold is clipped to this range: below it the answer drowns in false alarms, above it
#: a well-ranked model answers only its surest boxes
CONF_RANGE = (0.05, 0.5)
#: where a model's calibrated threshold lives: its weights file's metadata (``model.cedar_meta``)
META_CONF = "det_conf"
#: where ``det_conf`` comes from: the configuration (``routing.det_conf``), the model's calibration, a flag
CONF_SOURCES = ("config", "model", "flag")


@dataclass
class CollabSettings:
    """Thresholds and choices of the step; defaults and meaning: :class:`common.config.RoutingConfig`."""

    det_conf: float = _R.det_conf
    candidate_conf: float = _R.candidate_conf
    t_conf: float = _R.t_conf
    t_size: float = _R.t_size
    n_frames: int = _R.n_frames
    offload: str = _R.offload
    context: float = _R.context
    min_crop: int = _R.min_crop
    jpeg_quality: int = _R.jpeg_quality
    atlas: bool = _R.atlas
    merge_iou: float = _R.merge_iou
    keep_unanswered: bool = _R.keep_unanswered
    merge: str = _R.merge
    det_conf_source: str = "config"  # CONF_SOURCES: "flag" keeps det_conf whatever the model's calibration

    def __post_init__(self) -> None:
        if self.det_conf_source not in CONF_SOURCES:
            raise ValueError(f"det_conf_source must be one of {CONF_SOURCES}, got {self.det_conf_source!r}")
        if not 0 <= self.det_conf <= 1:
            raise ValueError(f"det_conf must be in [0, 1], got {self.det_conf!r}")
        if self.candidate_conf and not 0 < self.candidate_conf < self.det_conf:
            raise ValueError(f"candidate_conf must be 0 (off) or in (0, det_conf={self.det_conf}), "
                             f"got {self.candidate_conf!r}")
        if self.offload not in ("crops", "frame"):
            raise ValueError(f"offload must be 'crops' or 'frame', got {self.offload!r}")
        if self.merge not in MERGE_POLICIES:
            raise ValueError(f"merge must be one of {MERGE_POLICIES}, got {self.merge!r}")

    @classmethod
    def from_config(cls, routing: RoutingConfig, **overrides: Any):
        """The settings of ``routing`` (a :class:`common.config.RoutingConfig`), plus ``overrides``."""
        names = {f.name for f in fields(RoutingConfig)}
        return cls(**{**{f.name: getattr(routing, f.name) for f in fields(cls) if f.name in names}, **overrides})

    @property
    def detector_conf(self) -> float:
        """The detector's own threshold: ``candidate_conf`` when candidates are on, else ``det_conf``."""
        return self.candidate_conf or self.det_conf

    def for_model(self, meta: Mapping[str, Any] | None):
        """The settings a model answers with: its calibrated ``det_conf`` (``meta[META_CONF]``), unless this
        threshold is a flag's or the model has none. A calibrated threshold at or below ``candidate_conf`` turns
        the candidates off (the answer itself then reaches that low)."""
        calibrated = (meta or {}).get(META_CONF)
        if self.det_conf_source == "flag" or calibrated is None:
            return self
        det_conf = float(calibrated)
        return replace(self, det_conf=det_conf, det_conf_source="model",
                       candidate_conf=self.candidate_conf if self.candidate_conf < det_conf else 0.0)


def calibrate_conf(dets: Sequence[Detections], gts: Sequence[np.ndarray], nc: int) -> dict | None:
    """A model's answer threshold from its detections on a validation split (per image; detected down to at most
    ``CONF_RANGE[0]``) and the ground truth (``(M, 5)`` pixel rows ``cls, x1, y1, x2, y2``).

    The F1-optimal confidence (:func:`common.detections.f1_threshold`; class-aware matches at IoU 0.5 as in
    mAP50, micro F1 over all classes) clipped to :data:`CONF_RANGE`. Returns ``{"det_conf", "f1", "precision",
    "recall"}`` (the last three at the unclipped optimum), or None when no detection matches an object.
    """
    pooled = size_range_ap50([{"xyxy": d.xyxy, "conf": d.conf, "cls": d.cls} for d in dets], gts, nc, small_px=None)
    best = f1_threshold(pooled["conf"], pooled["tp"], pooled["n_gt"])
    if best is None:
        return None
    conf = best.pop("conf")
    return {META_CONF: float(np.clip(conf, *CONF_RANGE)), **best}


@dataclass(eq=False)
class Keyframe:
    """The edge's side of one keyframe (:func:`detect_keyframe`)."""

    detections: Detections  # the edge's answer: conf >= det_conf
    candidates: Detections  # candidate_conf <= conf < det_conf (none with candidates off)
    reasons: list[tuple[str, ...]]  # per answer box; () = confident
    offload_mask: np.ndarray  # (len(detections),) bool: ambiguous
    track_ids: np.ndarray  # (len(detections),) int64; -1 without a tracker
    _items: list[dict] | None = field(default=None, init=False, repr=False)

    def items(self) -> list[dict]:
        """The answer boxes (with ``track`` and ``reasons``), then the candidates (track -1, reasons ``candidate``).

        Built once per keyframe (the edge line and the offload share it): read it, do not change it."""
        if self._items is None:
            self._items = [{**d, "track": t, "reasons": list(r)}
                           for d, t, r in zip(self.detections.to_list(), np.asarray(self.track_ids).tolist(), self.reasons)]
            self._items += [{**d, "track": -1, "reasons": [CANDIDATE]} for d in self.candidates.to_list()]
        return self._items

    def candidate_items(self) -> list[dict]:
        return self.items()[len(self.detections):]

    @property
    def sent(self) -> np.ndarray:
        """``(len(items()),)`` bool: what is offloaded (the ambiguous answer boxes and every candidate)."""
        return np.concatenate([self.offload_mask, np.ones(len(self.candidates), dtype=bool)])

    @property
    def offloads(self) -> bool:
        return bool(self.sent.any())


def detect_keyframe(image: np.ndarray, predictor: Callable[[np.ndarray], Detections], s: CollabSettings,
                    tracker=None) -> Keyframe:
    """Step 1: detect, split off the candidates, track (``tracker``: :class:`common.keyframes.IoUTracker`), route.

    The detector may run lower than ``s.detector_conf``: what it finds below the candidates is dropped.
    Without a tracker (still images) no box is ``unstable``.
    """
    found = predictor(image)
    dets = found.select(found.conf >= s.det_conf)
    candidates = found.select((found.conf < s.det_conf) & (found.conf >= s.candidate_conf) if s.candidate_conf
                              else np.zeros(len(found), dtype=bool))
    if tracker is not None:
        track_ids = np.asarray(tracker.update(dets.xyxy, dets.cls), dtype=np.int64)
        histories = tracker.histories(track_ids)
    else:
        track_ids, histories = np.full(len(dets), -1, dtype=np.int64), None
    routing = route(dets, histories, t_conf=s.t_conf, t_size=s.t_size, n_frames=s.n_frames)
    return Keyframe(dets, candidates, routing.reasons, routing.offload_mask, track_ids)


def plan_offload(image: np.ndarray, keyframe: Keyframe, s: CollabSettings, *, site: str, run: str, frame: int,
                 created: float, model: str, pts_s: float | None = None) -> OffloadEntry | None:
    """Step 2: the offload of a keyframe with an ambiguous box or a candidate; None when nothing is offloaded."""
    if not keyframe.offloads:
        return None
    boxes = np.concatenate([keyframe.detections.xyxy, keyframe.candidates.xyxy])
    return OffloadEntry.for_keyframe(
        image, boxes, keyframe.sent, site=site, run=run, frame=frame, mode=s.offload, created=created, model=model,
        edge=keyframe.items(), pts_s=pts_s, context=s.context, min_size=s.min_crop, quality=s.jpeg_quality,
        atlas=s.atlas)


def merge_answer(edge: Sequence[Mapping], cloud: Detections, s: CollabSettings,
                 offloaded: Sequence[bool] | None = None) -> tuple[Detections, list[dict]]:
    """Step 4: ``merge(edge, cloud, offloaded)`` with the settings' policy; and its items tagged by source.

    ``edge``: the keyframe's items (:meth:`Keyframe.items`, possibly moved by optical flow);
    ``offloaded`` defaults to "has a reason". Candidates are never kept without a cloud box.
    Returns the merged detections and ``[{"xyxy", "conf", "cls", "source": "edge" | "cloud"}]``.
    """
    if offloaded is None:
        offloaded = [bool(d.get("reasons")) for d in edge]
    keep = [s.keep_unanswered and CANDIDATE not in d.get("reasons", ()) for d in edge]
    merged = merge(Detections.from_list(edge), cloud, np.array(offloaded, dtype=bool), iou=s.merge_iou,
                   keep_unanswered=np.array(keep, dtype=bool), resolve=s.merge)
    n_edge = len(merged) - len(cloud)
    return merged, [{**d, "source": "edge" if i < n_edge else "cloud"} for i, d in enumerate(merged.to_list())]


def boxes(dets: Detections | None) -> dict[str, list] | None:
    """``{"xyxy": [[x1, y1, x2, y2], ...], "conf": [...], "cls": [...]}`` (plain lists), None for None."""
    if dets is None:
        return None
    return {"xyxy": dets.xyxy.tolist(), "conf": dets.conf.tolist(), "cls": dets.cls.tolist()}


@dataclass(eq=False)
class StepResult:
    """One image through :func:`collaborate`."""

    keyframe: Keyframe
    entry: OffloadEntry | None  # None: nothing offloaded
    cloud: Detections | None  # the cloud's answer (frame pixels); None when nothing was sent
    merged: Detections  # the final answer: the edge's alone when nothing was offloaded
    edge_ms: float
    rtt_ms: float = 0.0

    @property
    def sent_bytes(self) -> int:
        """The JPEG payload sent to the cloud (0 when nothing was sent)."""
        return self.entry.payload_bytes if self.entry is not None and self.cloud is not None else 0

    def boxes(self) -> dict[str, dict[str, list] | None]:
        """``{"edge", "cloud", "merged"}``, each :func:`boxes` (``cloud`` None when nothing was sent)."""
        return {"edge": boxes(self.keyframe.detections), "cloud": boxes(self.cloud), "merged": boxes(self.merged)}


def collaborate(image: np.ndarray, predictor: Callable[[np.ndarray], Detections], client, s: CollabSettings, *,
                site: str, run: str = "eval", frame: int = 0, model: str = "eval", tracker=None) -> StepResult:
    """The whole step on one image, synchronously: detect, route, plan, ``client.send`` (if anything is
    offloaded), merge. The client's errors (``CloudUnavailable``, ``CloudRejected``) propagate.

    ``client=None``: no cloud; the offload is planned (``entry``, its bytes) but not sent, and the answer is
    the edge's alone."""
    t0 = time.perf_counter()
    keyframe = detect_keyframe(image, predictor, s, tracker)
    edge_ms = (time.perf_counter() - t0) * 1000
    entry = plan_offload(image, keyframe, s, site=site, run=run, frame=frame, created=time.time(), model=model)
    if entry is None or client is None:
        return StepResult(keyframe, entry, None, keyframe.detections, edge_ms)
    answer = client.send(entry)
    merged, _ = merge_answer(entry.edge, answer.detections, s, entry.offloaded)
    return StepResult(keyframe, entry, answer.detections, merged, edge_ms, answer.rtt_ms)
