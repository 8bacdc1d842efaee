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

The offload follows a budget: when a site trains its model it also measures, on its validation split, every
offload option of :data:`OFFLOAD_GRID` (:func:`measure_offload`: mode, ``t_conf``, candidates, JPEG quality; upload
bytes per frame, mAP50 and recall of the answer) and stores the measurements with the weights (``offload``);
:meth:`CollabSettings.for_model` then runs the option :func:`common.routing.choose_offload` picks for
``routing.budget``, unless a CLI flag sets the offload.

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
from common.detections import Detections, f1_threshold, score, size_range_ap50
from common.offload import encode_regions, payload_bytes
from common.routing import MERGE_POLICIES, OFFLOAD_MODES, choose_offload, merge, parse_budget, route

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
#: where a model's offload measurements live (:func:`measure_offload`; ``model.cedar_meta``)
META_OFFLOAD = "offload"
#: the settings an offload option sets; where they come from: the configuration, the budget's choice, a flag
OPTION_FIELDS = ("offload", "t_conf", "candidate_conf", "jpeg_quality")
OFFLOAD_SOURCES = ("config", "budget", "flag")
#: the whole keyframe also at this JPEG quality: about a quarter of the bytes of quality 90 on the built-in benchmark
LOW_QUALITY = 25
#: crops with candidates also at this JPEG quality: about half their bytes at quality 90
CROP_QUALITY = 60
#: the offload options a site measures (:func:`measure_offload`), each over the configured settings: the edge
#: alone; crops at three ``t_conf``, with the configured candidates and without, and with the candidates at
#: :data:`CROP_QUALITY`; the whole keyframe when anything is ambiguous and always (the cloud alone), each at the
#: configured JPEG quality and at :data:`LOW_QUALITY`
OFFLOAD_GRID = (
    {"offload": "none"},
    *({"offload": "crops", "t_conf": t, **more} for t in (0.3, 0.5, 0.7)
      for more in ({}, {"candidate_conf": 0.0}, {"jpeg_quality": CROP_QUALITY})),
    *({"offload": mode, **q} for mode in ("frame", "cloud") for q in ({}, {"jpeg_quality": LOW_QUALITY})),
)


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
    budget: str = _R.budget
    offload_source: str = "config"  # OFFLOAD_SOURCES: "flag" keeps the OPTION_FIELDS whatever the budget

    def __post_init__(self) -> None:
        if self.det_conf_source not in CONF_SOURCES:
            raise ValueError(f"det_conf_source must be one of {CONF_SOURCES}, got {self.det_conf_source!r}")
        if not 0 <= self.det_conf <= 1:
            raise ValueError(f"det_conf must be in [0, 1], got {self.det_conf!r}")
        if self.candidate_conf and not 0 < self.candidate_conf < self.det_conf:
            raise ValueError(f"candidate_conf must be 0 (off) or in (0, det_conf={self.det_conf}), "
                             f"got {self.candidate_conf!r}")
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.offload_source not in OFFLOAD_SOURCES:
            raise ValueError(f"offload_source must be one of {OFFLOAD_SOURCES}, got {self.offload_source!r}")
        parse_budget(self.budget)  # a ValueError naming the bad budget
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
        threshold is a flag's or the model has none; then the offload option ``budget`` picks from the model's
        measurements (``meta[META_OFFLOAD]``, :func:`common.routing.choose_offload`), unless the offload is a
        flag's, there is no budget or the model measured none. A threshold at or below ``candidate_conf`` turns
        the candidates off (the answer itself then reaches that low)."""
        meta = meta or {}
        s = self
        calibrated = meta.get(META_CONF)
        if self.det_conf_source != "flag" and calibrated is not None:
            det_conf = float(calibrated)
            s = replace(s, det_conf=det_conf, det_conf_source="model",
                        candidate_conf=s.candidate_conf if s.candidate_conf < det_conf else 0.0)
        budget, measured = parse_budget(s.budget), meta.get(META_OFFLOAD)
        if budget is None or not measured or s.offload_source == "flag":
            return s
        return s.with_option(choose_offload(measured, budget)["settings"], source="budget")

    def with_option(self, option: Mapping[str, Any], source: str = "config"):
        """These settings with an offload option's :data:`OPTION_FIELDS` (other keys are ignored); candidates at
        or above ``det_conf`` are off."""
        fields_ = {k: option[k] for k in OPTION_FIELDS if k in option}
        candidate = fields_.get("candidate_conf", self.candidate_conf)
        fields_["candidate_conf"] = candidate if candidate < self.det_conf else 0.0
        return replace(self, **fields_, offload_source=source)

    def option(self) -> dict[str, Any]:
        """The :data:`OPTION_FIELDS` of these settings."""
        return {k: getattr(self, k) for k in OPTION_FIELDS}


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
    """Step 2: the offload of a keyframe with an ambiguous box or a candidate (``offload`` ``"crops"`` or
    ``"frame"``), of every keyframe (``"cloud"``: all its boxes offloaded), of none (``"none"``); None when nothing
    is offloaded."""
    if s.offload == "none" or (s.offload != "cloud" and not keyframe.offloads):
        return None
    boxes = np.concatenate([keyframe.detections.xyxy, keyframe.candidates.xyxy])
    sent = np.ones(len(boxes), dtype=bool) if s.offload == "cloud" else keyframe.sent
    return OffloadEntry.for_keyframe(
        image, boxes, sent, site=site, run=run, frame=frame, mode=s.offload, created=created, model=model,
        edge=keyframe.items(), pts_s=pts_s, context=s.context, min_size=s.min_crop, quality=s.jpeg_quality,
        atlas=s.atlas)


def merge_answer(edge: Sequence[Mapping], cloud: Detections, s: CollabSettings,
                 offloaded: Sequence[bool] | None = None, mode: str | None = None) -> tuple[Detections, list[dict]]:
    """Step 4: ``merge(edge, cloud, offloaded)`` with the settings' policy; and its items tagged by source.

    ``edge``: the keyframe's items (:meth:`Keyframe.items`, possibly moved by optical flow);
    ``offloaded`` defaults to "has a reason". Candidates are never kept without a cloud box. ``mode``: the
    offload's (default ``s.offload``); ``"cloud"`` answers with the cloud's boxes alone.
    Returns the merged detections and ``[{"xyxy", "conf", "cls", "source": "edge" | "cloud"}]``.
    """
    if (mode or s.offload) == "cloud":  # every edge box offloaded, none kept unanswered: the cloud's answer
        s, offloaded = replace(s, merge="cloud", keep_unanswered=False), [True] * len(edge)
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
    merged, _ = merge_answer(entry.edge, answer.detections, s, entry.offloaded, entry.mode)
    return StepResult(keyframe, entry, answer.detections, merged, edge_ms, answer.rtt_ms)


class _SameAnswer:
    """A cloud client that sends each distinct upload once (the whole keyframe of ``frame`` and ``cloud`` at one
    JPEG quality, crops two options cut alike) and answers a repeat from memory."""

    def __init__(self, client):
        self.client, self.answers = client, {}

    def send(self, entry: OffloadEntry):
        key = (entry.mode == "crops", str(entry.regions), str(entry.atlas), b"".join(entry.payloads))
        if key not in self.answers:
            self.answers[key] = self.client.send(entry)
        return self.answers[key]


def measure_offload(images: Sequence[np.ndarray], gts: Sequence[np.ndarray], found: Sequence[Detections], client,
                    s: CollabSettings, nc: int, *, site: str, grid: Sequence[Mapping[str, Any]] = OFFLOAD_GRID) -> dict:
    """Every offload option of ``grid`` (over the settings ``s``) on a split: what it uploads and what it gives.

    ``found``: the edge detector's boxes on each image, down to the lowest threshold an option uses (they are
    cut per option as :func:`detect_keyframe` does); ``gts``: ``(M, 5)`` pixel rows ``cls, x1, y1, x2, y2``. Each
    image goes through :func:`collaborate` once per option (a distinct upload is sent to ``client`` once).

    Returns :func:`common.routing.choose_offload`'s input: ``{"frame_bytes": mean JPEG bytes of a whole image at
    s.jpeg_quality, "options": [{"settings": {OPTION_FIELDS}, "bytes": mean upload bytes per image, "map50",
    "recall"}]}`` (mAP50 class-aware, recall at IoU 0.5: :func:`common.detections.score`; 0 where undefined).
    The client's errors propagate.
    """
    memo = _SameAnswer(client)
    frame_bytes = [payload_bytes(encode_regions(im, [[0, 0, im.shape[1], im.shape[0]]], quality=s.jpeg_quality))
                   for im in images]
    options = []
    for option in grid:
        so = s.with_option(option)
        steps = [collaborate(im, lambda _, d=d: d, memo, so, site=site, run="budget", frame=i)
                 for i, (im, d) in enumerate(zip(images, found, strict=True))]
        got = score([st.merged for st in steps], gts, nc)
        options.append({"settings": so.option(), "bytes": float(np.mean([st.sent_bytes for st in steps])),
                        **{k: float(np.nan_to_num(got[k])) for k in ("map50", "recall")}})
    return {"frame_bytes": float(np.mean(frame_bytes)), "options": options}
