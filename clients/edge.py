"""The edge runtime: live detection on a video, image folder or camera, with cloud refinement.

Run it on each edge box, next to ``flower-supernode`` (which keeps the site's
model store up to date after every federated round)::

    python -m clients.edge --source video.mp4 --weights /var/lib/cedar/model-store/model.pt \\
        --cloud https://cloud:8443 --token-file cloud.token --cafile cert.pem --site site-0 \\
        --out results.jsonl --video annotated.mp4

Per frame of a video, camera or image sequence (paper section 4.2):

1. **Keyframes.** :class:`common.keyframes.KeyframeSelector` (``--beta``) decides
   whether the frame is a keyframe. Only keyframes are detected. A non-keyframe
   gets an ``edge`` line that *reuses the last keyframe's edge detections*
   (``"keyframe": false``, ``"source_frame": k``); it is never offloaded. Those
   boxes follow the objects (``--no-propagate``: they stay put): :func:`flow_shift`
   moves each by the median sparse optical flow (pyramidal Lucas-Kanade) of five
   points inside it, frame to frame (well under a millisecond, against tens for a
   detection).
2. **Edge detection** on the keyframe with the site's current model: PyTorch
   (``--weights``) or ONNX Runtime (``--onnx``, exported from ``--weights``
   when missing or stale). Both share one letterbox and one NMS written here,
   checked against :func:`common.yolo.predict` in the tests. As in Ultralytics,
   PyTorch pads a frame only to a multiple of the stride, a fixed-size ONNX
   export to the full square, so on non-square frames the two can differ
   slightly (identical on square frames).
3. **Tracks and routing.** :class:`common.keyframes.IoUTracker` associates boxes
   across keyframes (reset at a scene cut); :func:`common.routing.route` marks a
   detection ambiguous when ``conf < --t-conf``, area ``< --t-size`` px², or its
   track was intermittent over the last ``--n-frames`` keyframes.
4. **Output at once.** The ``edge`` JSON line is written and flushed before
   anything is sent. A keyframe with an ambiguous detection or a candidate
   (a box between ``--candidate-conf`` and ``--conf``) is offloaded: crops with
   context around those boxes (:func:`common.offload.offload_plan`), all on one
   JPEG atlas (:func:`common.offload.encode_atlas`; ``--separate-crops``: one
   JPEG each), or the whole keyframe with ``--offload frame``; written to the
   disk queue (before the ``edge`` line that names it, so a crash never leaves
   a line naming an offload that is not on disk) and handed to a background worker.
5. **Refinement.** When the cloud answers, a ``refined`` line for that frame
   carries ``merge(edge, cloud, offloaded)`` (:func:`common.routing.merge`),
   and a ``carried`` line for each non-keyframe after it carries that answer
   moved there by optical flow (:class:`RefinedCarrier`).

Photo folders
    A folder of images is a set of independent photos (a survey, the paper's DET setting): every image is a
    keyframe (``"keyframe_reason": "photo"``) answered from that image alone: no tracks (so no ``unstable``
    box), no optical flow, no ``carried`` lines. ``--sequence`` declares a folder to be the frames of a video
    (keyframes, tracks, carried answers as above); videos and cameras are always sequences.

Answer threshold
    The edge's answer starts at ``det_conf``: by default the model's own, calibrated when the site trained it
    (the F1-optimal confidence on its validation split, :func:`clients.collab.calibrate_conf`, stored in the
    weights file's metadata), else ``routing.det_conf``; ``--conf`` overrides both. A hot-swapped model brings
    its own threshold. The summary line records ``det_conf`` and ``det_conf_source`` (``model``, ``config``
    or ``flag``) of the model it names.

Offload budget
    What a keyframe sends (``--offload``: nothing, crops, the whole keyframe when anything is ambiguous, or the
    whole keyframe always with the cloud's answer alone) and its thresholds (``--t-conf``, ``--candidate-conf``,
    ``--jpeg-quality``) are by default the option ``--budget`` (``routing.budget``) picks from the model's own
    measurements (:func:`clients.collab.measure_offload`, stored in the weights file's metadata each round;
    :func:`common.routing.choose_offload`); any of those four flags replaces the budget's choice, and a model
    without measurements runs the configured ones. The summary line records ``offload`` and ``offload_source``
    (``budget``, ``config`` or ``flag``).

Delivery guarantees (``--queue-dir``, default ``$CEDAR_HOME/edge/<site>/queue``)
    Every offload is written to the queue *before* it is sent and before its
    edge line (one JSON file per offload: metadata, edge detections and the
    base64 JPEG payloads; written to a temporary name, fsynced and renamed), so
    no edge line names an offload that a crash could lose. One worker thread
    sends entries in order. Connection errors, timeouts, 408/429/5xx and
    401/403 are retried with exponential backoff (``--retry-base`` doubling up
    to ``--retry-max`` s, ±10 % jitter; a ``Retry-After`` wins) while the edge
    keeps serving frames. Other 4xx answers (the cloud refuses the content)
    move the entry to ``queue/failed/`` with the error and emit a ``failed``
    line: kept, never retried in a loop. On success the worker (1) writes the
    ``refined`` line and fsyncs the output (the commit point), (2) appends the
    offload id to ``queue/delivered.log``, (3) deletes the entry. At start-up
    entries whose id is in ``delivered.log`` are deleted unsent, and entries
    whose ``refined`` line is already in an output this queue has served
    (``queue/outputs.log`` lists them) are committed unsent: a crash between
    (1) and (2) neither loses nor repeats the line. An id already delivered or
    queued is never queued again, so each offload gets exactly one ``refined``
    line as long as earlier outputs stay where they were written. A request
    whose answer is lost in transit (timeout after the cloud stored it) is sent
    again: the cloud's hard-sample store may then hold that sample twice, the
    result files still have one line.
    At the end of the source the runtime waits up to ``--drain-timeout`` s for
    the queue to empty; what is left stays on disk and is sent first by the
    next run on the same ``--queue-dir`` (its ``refined`` lines then appear in
    that run's output, with the original ``run`` and ``frame``). One process
    per queue folder (a lock file enforces it). ``delivered.log`` grows by one
    id (~40 bytes) per offload, ``outputs.log`` by one path per run; delete
    them only together with the queue entries.

Offload ids
    ``<site>.<run>.<frame:06d>``; ``run`` (``--run-id``, default a UTC time stamp
    plus random hex) keeps ids unique across runs, since frame numbers restart at 0.
    The cloud sees ``X-Cedar-Site: <site>`` and ``X-Cedar-Frame: <run>.<frame:06d>``,
    so each hard sample in its store names its offload.

Continuous learning (``--reload-every``)
    Between frames, every ``--reload-every`` s, the weights file is ``stat``-ed;
    when its (mtime, size, inode) changed and its SHA-256 differs from the
    running model's, a new detector is built on a background thread (for
    ``--onnx`` this includes the re-export) and swapped in before a later frame:
    frames are never held up by a reload. A file that fails to load is logged
    and ignored until it changes again. Every line carries ``"model"``: the first
    12 hex digits of the SHA-256 of the weights file the detections came from.

Output (``--out``, JSON lines; ``--append`` to keep an existing file)
    ``{"kind": "edge", "site", "run", "frame", "time", "pts_s", "keyframe",
    "keyframe_reason", "source_frame", "model", "detections": [{"xyxy", "conf",
    "cls", "track", "reasons"}], "offload": null | {"id", "mode", "regions",
    "detections", "bytes"}, "latency_ms": {"edge", "total"}}``: one per frame,
    in frame order. ``reasons`` per detection is a subset of ``["low_conf",
    "small", "unstable"]`` (empty = confident); ``latency_ms.edge`` is the
    detector call (null on non-keyframes), ``total`` frame in -> line out;
    ``offload.bytes`` the JPEG payload queued for the cloud.

    ``{"kind": "refined", "site", "run", "frame", "offload_id", "time", "pts_s",
    "keyframe": true, "model", "mode", "detections": [{"xyxy", "conf", "cls",
    "source": "edge"|"cloud"}], "cloud_detections": [...], "latency_ms":
    {"cloud_rtt", "since_edge"}, "bytes_sent", "request_bytes", "attempts",
    "cloud_model", "recovered"}``: one per delivered offload, after that frame's
    ``edge`` line; ``detections`` is ``merge(edge, cloud, offloaded)``;
    ``bytes_sent`` the JPEG payload, ``request_bytes`` the whole HTTP body;
    ``recovered`` marks offloads queued by an earlier run.

    ``{"kind": "carried", "site", "run", "frame", "source_frame", "offload_id",
    "time", "pts_s", "model", "detections", "edge_detections",
    "cloud_detections"}``: the refined answer of keyframe ``source_frame`` on a
    later non-keyframe ``frame`` (:class:`RefinedCarrier`): the keyframe's edge
    boxes and candidates (``edge_detections``) and the cloud's boxes, each moved
    by its own optical flow (``--no-propagate``: unmoved), merged again
    (``detections``). One per non-keyframe of an offloaded keyframe of this run,
    written as soon as that keyframe's answer is in (so possibly long after the
    frame's ``edge`` line); none for frames whose keyframe's answer never came
    or that waited past a 64 MiB cap on the kept grayscale frames.

    ``{"kind": "failed", "offload_id", "error", ...}`` instead of ``refined`` for
    an offload the cloud refused, and a last ``{"kind": "summary", ...}`` line (its counts, ``model``,
    ``det_conf`` and ``det_conf_source``).
    ``time`` is Unix seconds (frame read; answer received), ``pts_s`` the media
    time (frame / fps; seconds since start for a camera). Every detection list
    reads back with :meth:`common.detections.Detections.from_list`. ``model`` is the
    version of the model that made the edge detections.

Annotated video (``--video``)
    Edge boxes (green: confident, orange: offloaded) and, once the frame's
    keyframe has been refined *before the frame is written*, its ``carried``
    boxes (magenta). Refinement is asynchronous, so a keyframe itself is drawn
    with edge boxes only; the frames after it show the refined boxes as soon as
    they have arrived. The JSON lines are the complete record.

Super-resolution (``--upscale MODEL.npz``)
    Every frame is first upscaled by an A+ model (:mod:`common.superres`, trained
    with ``python -m common.superres train``) and the runtime then works on the
    upscaled frame only: keyframe selection, detection, the crops or frame sent
    to the cloud, the annotated video. All coordinates (``xyxy``, ``regions``,
    the cloud's boxes) are therefore in *upscaled-frame* pixels (divide by the
    model's scale for the camera's pixels); edge lines gain
    ``latency_ms.upscale``, and ``latency_ms.total`` includes it. Meant for
    low-resolution cameras whose small objects are a few pixels across; set
    ``--imgsz`` to at least the upscaled size, or the detector's letterbox
    shrinks the frame again.

Signals: Ctrl-C (SIGINT) ends the source and drains as at the end of a video
(a second Ctrl-C stops draining); SIGTERM ends the source without draining (the
queue is on disk). The ``common/`` boundary holds: Ultralytics is reached only
through :mod:`common.yolo`, and the ONNX path imports no torch unless it has to
re-export the model.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from clients.carry import RefinedCarrier, flow_shift
from clients.collab import (CONF_RANGE, OPTION_FIELDS, CollabSettings, Keyframe, detect_keyframe, merge_answer,
                            plan_offload)
from clients.detector import EdgeModel
from clients.media import EdgeError, Frame, FrameSource, JsonlWriter, VideoAnnotator
from clients.offload import CloudAnswer, CloudClient, DiskQueue, Offloader, OffloadEntry
from common.cloud_api import ID_PATTERN, ID_RULE, RUN_PATTERN
from common.config import EvalConfig, TrainConfig
from common.detections import Detections
from common.keyframes import IoUTracker, KeyframeSelector
from common.routing import MERGE_POLICIES, OFFLOAD_MODES
from common.tokens import TOKEN_ENV, resolve_token
from common.ultralytics_env import CEDAR_HOME

log = logging.getLogger("clients.edge" if __name__ == "__main__" else __name__)


@dataclass
class EdgeSettings(CollabSettings):
    """The collaboration step's settings (:class:`clients.collab.CollabSettings`) plus the runtime's own:
    site and run ids, photos or a sequence, keyframes, tracking, queue and retries, super-resolution, flow
    propagation."""

    site: str = "site-0"
    run_id: str | None = None
    beta: float = 1.5
    warmup: int = 3
    cut_threshold: float = 0.25
    # a keyframe at least every max_gap frames (None: off, the paper's rule alone): bounds how long carried answers
    # go stale when the motion rule misses a change, e.g. small objects appearing (collaboration.md: 3 = 0.3 s at
    # 10 fps; scale it with the camera's frame rate)
    max_gap: int | None = 3
    track_iou: float = 0.3
    drain_timeout: float = 30.0
    retry_base: float = 0.5
    retry_max: float = 30.0
    upscale: str | None = None  # A+ super-resolution model (.npz) applied to every frame first
    propagate: bool = True  # move reused boxes on non-keyframes by optical flow (flow_shift)
    photos: bool = False  # every frame an independent photo: all keyframes, no tracks, no flow, no carried lines

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:
            raise EdgeError(str(err)) from None
        if not ID_PATTERN.fullmatch(self.site):
            raise EdgeError(f"--site {self.site!r} must match {ID_RULE}")
        if self.run_id is None:
            self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)
        if not RUN_PATTERN.fullmatch(self.run_id):
            raise EdgeError(f"--run-id {self.run_id!r} must match [A-Za-z0-9_-]{{1,40}} (no dots)")


@dataclass
class Summary:
    frames: int = 0
    keyframes: int = 0
    detections: int = 0
    offloaded_detections: int = 0
    offloaded_frames: int = 0
    bytes_queued: int = 0
    bytes_sent: int = 0
    request_bytes: int = 0
    refined: int = 0
    carried: int = 0
    recovered: int = 0
    failed: int = 0
    queue_left: int = 0
    reloads: int = 0
    model: str = ""
    det_conf: float | None = None  # the answer threshold of `model`, and where it comes from
    det_conf_source: str = ""
    offload: dict = field(default_factory=dict)  # the offload of `model` (CollabSettings.option), and its source
    offload_source: str = ""
    edge_ms: list = field(default_factory=list, repr=False)
    rtt_ms: list = field(default_factory=list, repr=False)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("edge_ms", "rtt_ms")}
        d["edge_ms_mean"] = round(float(np.mean(self.edge_ms)), 2) if self.edge_ms else None
        d["cloud_rtt_ms_mean"] = round(float(np.mean(self.rtt_ms)), 2) if self.rtt_ms else None
        d["wall_s"] = round(self.wall_s, 3)
        return d

    def table(self) -> str:
        d = self.to_dict()
        rows = [("frames", d["frames"]), ("keyframes", d["keyframes"]), ("edge detections", d["detections"]),
                ("offloaded detections", d["offloaded_detections"]),
                ("offloaded frames", d["offloaded_frames"]), ("bytes queued", d["bytes_queued"]),
                ("bytes sent", d["bytes_sent"]), ("refined delivered", d["refined"]),
                ("  carried to later frames", d["carried"]),
                ("  of them from earlier runs", d["recovered"]), ("refused by the cloud", d["failed"]),
                ("queue left", d["queue_left"]), ("model reloads", d["reloads"]), ("model", d["model"]),
                ("answer threshold", f"{d['det_conf']} ({d['det_conf_source']})"),
                ("offload", f"{d['offload']} ({d['offload_source']})"),
                ("edge ms (mean)", d["edge_ms_mean"]), ("cloud rtt ms (mean)", d["cloud_rtt_ms_mean"]),
                ("wall s", d["wall_s"])]
        return "\n".join(f"  {k:<28} {v}" for k, v in rows)


def _round(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(float(v), nd)


class EdgeRuntime:
    """Keyframes -> edge detection -> tracks -> routing -> output now, offload in the background.

    Parameters
    ----------
    model : EdgeModel or StaticModel
        ``.predictor`` (frame -> :class:`Detections`), ``.version``, ``.poll()``.
    client : object
        ``.send(OffloadEntry) -> CloudAnswer``, raising :class:`CloudUnavailable` or
        :class:`CloudRejected` (:class:`CloudClient`, or a fake in tests).
    queue_dir, out : paths of the disk queue folder and the JSON-lines output.
    """

    def __init__(self, model, client, settings: EdgeSettings, *, queue_dir: str | Path, out: str | Path,
                 video: str | Path | None = None, fps: float = 10.0, append: bool = False):
        self.model, self.client, self.s = model, client, settings
        self.upscaler = None
        if settings.upscale:  # before the queue lock: a bad model file stops the start cleanly
            from common.superres import load_model

            self.upscaler = load_model(settings.upscale)
        self.queue = DiskQueue(queue_dir)
        self.queue.reconcile(out)  # before the output is opened: "w" would erase an earlier run's lines
        self.writer = JsonlWriter(out, append=append)
        self.video = VideoAnnotator(video, fps) if video else None
        self.selector = KeyframeSelector(beta=settings.beta, warmup=settings.warmup,
                                         cut_threshold=settings.cut_threshold, max_gap=settings.max_gap)
        self.tracker = IoUTracker(iou_threshold=settings.track_iou, max_age=max(0, settings.n_frames - 1),
                                  history=settings.n_frames)
        self.summary = Summary(model=model.version)
        self._stats_lock = threading.Lock()
        self.carrier = RefinedCarrier(move=settings.propagate)
        self._last: tuple | None = None  # (keyframe index, clients.collab.Keyframe, model version)
        self._answer: tuple | None = None  # (model version, the settings it answers with)
        self._flow: tuple | None = None  # (previous gray frame, boxes there) while propagating
        self._edge_sent_at: dict[str, float] = {}
        self.stop_requested = False
        self.drain_requested = True
        self._closed = False
        self._t0 = time.perf_counter()
        self.offloader = Offloader(self.queue, client, on_delivered=self._delivered, on_failed=self._failed,
                                   retry_base=settings.retry_base, retry_max=settings.retry_max)

    # -- one frame (main thread)
    def process(self, frame: Frame) -> dict:
        t0 = time.perf_counter()
        s = self.s
        upscale_ms = None
        if self.upscaler is not None:  # everything below sees (and reports in) the upscaled frame
            frame = Frame(frame.index, self.upscaler.upscale(frame.image), frame.pts_s, frame.time)
            upscale_ms = (time.perf_counter() - t0) * 1000
        is_key, reason = (True, "photo") if s.photos else self.selector.update_with_reason(frame.image)
        if self._last is None:
            is_key, reason = True, reason or "first"
        edge_ms = None
        offload = None
        if is_key:
            if reason == "cut":
                self.tracker.reset()
            t1 = time.perf_counter()
            keyframe = detect_keyframe(frame.image, self.model.predictor, self._answer_settings(),
                                       None if s.photos else self.tracker)
            edge_ms = (time.perf_counter() - t1) * 1000
            self._last = (frame.index, keyframe, self.model.version)
            with self._stats_lock:
                self.summary.keyframes += 1
                self.summary.detections += len(keyframe.detections)
                self.summary.edge_ms.append(edge_ms)
        source, keyframe, version = self._last  # non-keyframes reuse the keyframe's
        dets, mask = keyframe.detections, keyframe.offload_mask
        import cv2

        gray = None if s.photos else \
            cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY) if frame.image.ndim == 3 else frame.image
        if s.propagate and not s.photos:
            boxes = dets.xyxy if is_key else flow_shift(self._flow[0], gray, self._flow[1])
            self._flow = (gray, boxes)
            if not is_key:
                h, w = gray.shape
                boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
                dets = Detections(boxes, dets.conf, dets.cls)
        if is_key:
            items = keyframe.items()
            det_list, candidates = items[:len(dets)], items[len(dets):]
        else:  # the keyframe's answer boxes, moved
            det_list, candidates = Keyframe(dets, Detections(), keyframe.reasons, mask, keyframe.track_ids).items(), []
        entry = plan_offload(frame.image, keyframe, self._answer_settings(), site=s.site, run=s.run_id,
                             frame=frame.index, created=frame.time, model=version, pts_s=frame.pts_s) if is_key else None
        if entry is not None:
            offload = {"id": entry.id, "mode": entry.mode, "regions": entry.regions, "detections": int(mask.sum()),
                       "candidates": len(candidates), "bytes": entry.payload_bytes}
        record = {"kind": "edge", "site": s.site, "run": s.run_id, "frame": frame.index,
                  "time": round(frame.time, 3), "pts_s": frame.pts_s, "keyframe": bool(is_key),
                  "keyframe_reason": reason if is_key else None, "source_frame": source,
                  "model": version, "detections": det_list, "candidates": candidates, "offload": offload,
                  "latency_ms": {"edge": _round(edge_ms), "total": _round((time.perf_counter() - t0) * 1000)}}
        if upscale_ms is not None:
            record["latency_ms"]["upscale"] = _round(upscale_ms)
        submitted = False
        if entry is None:
            self.writer.write(record)
        else:  # the edge result is out before anything is sent, and after the offload is on disk
            self._edge_sent_at[entry.id] = time.time()
            submitted = self.offloader.submit(entry, announce=lambda: self.writer.write(record))
            if not submitted:
                self._edge_sent_at.pop(entry.id, None)
            else:
                with self._stats_lock:
                    self.summary.offloaded_frames += 1
                    self.summary.offloaded_detections += int(mask.sum())
                    self.summary.bytes_queued += entry.payload_bytes
        now = {} if s.photos else \
            self._write_carried(self.carrier.frame(frame.index, frame.pts_s, gray, is_key, submitted))
        if self.video is not None:
            self.video.write(frame.image, dets, mask, now.get(frame.index),
                             f"{frame.index}{' K' if is_key else ''} {version[:6]}")
        with self._stats_lock:
            self.summary.frames += 1
        return record

    def _answer_settings(self) -> CollabSettings:
        """The settings the running model answers and offloads with: its calibrated ``det_conf`` and the offload
        its measurements and the budget pick, unless flags set them (:meth:`clients.collab.CollabSettings.for_model`);
        the summary records them."""
        version = self.model.version
        if self._answer is None or self._answer[0] != version:
            answer = self.s.for_model(getattr(self.model, "meta", None))
            self._answer = (version, answer)
            with self._stats_lock:
                self.summary.det_conf, self.summary.det_conf_source = answer.det_conf, answer.det_conf_source
                self.summary.offload, self.summary.offload_source = answer.option(), answer.offload_source
            log.info("model %s answers from confidence %.3g (%s), offloads %s (%s)", version, answer.det_conf,
                     answer.det_conf_source, answer.option(), answer.offload_source)
        return self._answer[1]

    def _write_carried(self, results: list) -> dict[int, Detections]:
        """One ``carried`` line per :class:`RefinedCarrier` result; the merged answers by frame."""
        merged_by_frame = {}
        for index, pts_s, key, meta, edge, cloud in results:
            merged, items = merge_answer(edge, cloud, self.s, meta["offloaded"], meta["mode"])
            merged_by_frame[index] = merged
            self.writer.write({"kind": "carried", "site": self.s.site, "run": self.s.run_id, "frame": index,
                               "source_frame": key, "offload_id": meta["id"], "time": round(time.time(), 3),
                               "pts_s": pts_s, "model": meta["model"], "detections": items,
                               "edge_detections": edge, "cloud_detections": cloud.to_list()})
        with self._stats_lock:
            self.summary.carried += len(results)
        return merged_by_frame

    # -- worker callbacks
    def _delivered(self, entry: OffloadEntry, answer: CloudAnswer, attempts: int) -> None:
        _, items = merge_answer(entry.edge, answer.detections, self.s, entry.offloaded, entry.mode)
        now = time.time()
        sent_at = self._edge_sent_at.pop(entry.id, None)
        recovered = entry.run != self.s.run_id or sent_at is None
        written = self.writer.write({
            "kind": "refined", "site": entry.site, "run": entry.run, "frame": entry.frame, "offload_id": entry.id,
            "time": round(now, 3), "pts_s": entry.pts_s, "keyframe": True, "model": entry.model, "mode": entry.mode,
            "detections": items, "cloud_detections": answer.detections.to_list(),
            "latency_ms": {"cloud_rtt": _round(answer.rtt_ms),
                           "since_edge": _round((now - sent_at) * 1000 if sent_at else None)},
            "bytes_sent": entry.payload_bytes, "request_bytes": answer.request_bytes, "attempts": attempts,
            "cloud_model": answer.model, "recovered": recovered}, sync=True)
        if not written:  # not committed: the entry stays queued for the next run
            raise EdgeError(f"offload {entry.id}: the output is closed; its answer is sent again by the next run")
        if entry.run == self.s.run_id and not self.s.photos:
            self.carrier.answered(entry.frame, {"id": entry.id, "model": entry.model, "offloaded": entry.offloaded,
                                                "mode": entry.mode},
                                  entry.edge, answer.detections)
        with self._stats_lock:
            self.summary.refined += 1
            self.summary.recovered += int(recovered)
            self.summary.bytes_sent += entry.payload_bytes
            self.summary.request_bytes += answer.request_bytes
            self.summary.rtt_ms.append(answer.rtt_ms)

    def _failed(self, entry: OffloadEntry, error: str) -> None:
        self.writer.write({"kind": "failed", "site": entry.site, "run": entry.run, "frame": entry.frame,
                           "offload_id": entry.id, "time": round(time.time(), 3), "error": error}, sync=True)
        with self._stats_lock:
            self.summary.failed += 1

    # -- the loop
    def run(self, frames: Iterable[Frame]) -> Summary:
        """Process every frame, then drain the queue for up to ``drain_timeout`` s and close."""
        self._t0 = time.perf_counter()
        try:
            for frame in frames:
                if self.model.poll():
                    self.summary.reloads = self.model.reloads
                    self.summary.model = self.model.version
                self.process(frame)
                if self.stop_requested:
                    log.info("stop requested after frame %d", frame.index)
                    break
        finally:
            self.close(drain=self.drain_requested)
        return self.summary

    def close(self, drain: bool = True) -> None:
        """Drain (unless ``drain`` is False), stop the worker, write the summary line, close everything."""
        if self._closed:
            return
        self._closed = True
        if drain and self.s.drain_timeout > 0 and self.offloader.pending():
            log.info("draining %d offload(s), up to %.0fs", self.offloader.pending(), self.s.drain_timeout)
            self.offloader.drain(self.s.drain_timeout, cancelled=lambda: not self.drain_requested)
        self.offloader.stop(join_timeout=30.0)
        self._write_carried(self.carrier.flush())
        self.summary.queue_left = len(self.queue)
        self.summary.reloads = getattr(self.model, "reloads", 0)
        self.summary.model = self.model.version
        self._answer_settings()  # the summary's threshold is its model's
        self.summary.wall_s = time.perf_counter() - self._t0
        if self.summary.queue_left:
            log.warning("%d offload(s) left in %s; the next run sends them", self.summary.queue_left,
                        self.queue.root)
        self.writer.write({"kind": "summary", "site": self.s.site, "run": self.s.run_id,
                           "time": round(time.time(), 3), **self.summary.to_dict()})
        self.writer.close()
        if self.video is not None:
            self.video.close()
        self.queue.close()


# =========================================================================== CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.edge", description="cedar edge runtime",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, help="video file, folder of images, or camera index")
    p.add_argument("--sequence", action="store_true",
                   help="the image folder is the frames of a video (keyframes, tracks, carried answers); default: "
                        "independent photos, each answered from itself alone")
    p.add_argument("--weights", required=True, help="the site's model store file (<store>/model.pt)")
    p.add_argument("--onnx", help="run with ONNX Runtime from this file (exported from --weights when stale)")
    p.add_argument("--cloud", required=True, help="cloud service URL, e.g. https://cloud:8443")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help=f"bearer token (visible in ps; prefer --token-file or ${TOKEN_ENV})")
    auth.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--cafile", help="CA/certificate (PEM) to verify the cloud's TLS certificate")
    p.add_argument("--site", default=EdgeSettings.site, help="this site's id (X-Cedar-Site)")
    p.add_argument("--out", required=True, help="JSON-lines results")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument("--video", help="annotated video to write (mp4)")
    p.add_argument("--budget", default=EdgeSettings.budget,
                   help="what the site may upload: 'bytes:N' per frame, 'frame:F' (a share of the whole keyframe's "
                        "bytes), 'recall:R' (the cheapest option reaching recall R), '' (off); picks the offload "
                        "and its thresholds from the model's measurements (common.routing.choose_offload)")
    p.add_argument("--offload", choices=OFFLOAD_MODES,
                   help="send nothing, crops around the ambiguous boxes and the candidates, the whole keyframe when "
                        "anything is ambiguous, or the whole keyframe always (the cloud's answer alone); this, "
                        "--t-conf, --candidate-conf or --jpeg-quality replaces the budget's choice (default: the "
                        f"budget's, else {EdgeSettings.offload})")
    p.add_argument("--t-conf", type=float,
                   help=f"T_conf: lower confidence is ambiguous (default: the budget's, else {EdgeSettings.t_conf})")
    p.add_argument("--t-size", type=float, default=EdgeSettings.t_size,
                   help="T_size in px²: smaller boxes are ambiguous")
    p.add_argument("--n-frames", type=int, default=EdgeSettings.n_frames, help="N keyframes for the 'unstable' rule")
    p.add_argument("--beta", type=float, default=EdgeSettings.beta, help="keyframe threshold: beta * median difference")
    p.add_argument("--warmup", type=int, default=EdgeSettings.warmup, help="differences before the motion rule applies")
    p.add_argument("--cut-threshold", type=float, default=EdgeSettings.cut_threshold,
                   help="RMS difference that is a scene cut")
    p.add_argument("--max-gap", type=int, default=EdgeSettings.max_gap,
                   help="force a keyframe after this many frames since the last one (0: off, the paper's rule)")
    p.add_argument("--propagate", action=argparse.BooleanOptionalAction, default=EdgeSettings.propagate,
                   help="on non-keyframes, move the reused boxes by optical flow (default; --no-propagate repeats "
                        "the keyframe's boxes as they are)")
    p.add_argument("--upscale", metavar="MODEL.npz",
                   help="super-resolve every frame with this A+ model first (common.superres); "
                        "boxes are then in upscaled-frame pixels")
    p.add_argument("--imgsz", type=int, default=TrainConfig.imgsz, help="detector input size (train.imgsz)")
    p.add_argument("--conf", "--det-conf", dest="det_conf", type=float,
                   help="the edge's answer: its detections from this confidence on (default: the model's "
                        f"calibrated threshold, else routing.det_conf {EdgeSettings.det_conf})")
    p.add_argument("--candidate-conf", type=float,
                   help="also detect down to this confidence: boxes below --conf are candidates, offloaded and kept "
                        f"only where the cloud confirms them (0: off; default: the budget's, else "
                        f"{EdgeSettings.candidate_conf})")
    p.add_argument("--iou", type=float, default=EvalConfig.iou, help="edge detector NMS IoU (eval.iou)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--context", type=float, default=EdgeSettings.context,
                   help="crop margin, fraction of the box per side")
    p.add_argument("--min-crop", type=int, default=EdgeSettings.min_crop, help="minimum crop side in px")
    p.add_argument("--jpeg-quality", type=int,
                   help=f"of what is sent (default: the budget's, else {EdgeSettings.jpeg_quality})")
    p.add_argument("--separate-crops", dest="atlas", action="store_false",
                   help="send each crop as its own JPEG (default: all crops of a keyframe on one atlas image, "
                        "one JPEG header instead of one per crop)")
    p.add_argument("--merge-iou", type=float, default=EdgeSettings.merge_iou)
    p.add_argument("--keep-unanswered", action=argparse.BooleanOptionalAction, default=EdgeSettings.keep_unanswered,
                   help="keep offloaded edge detections that no cloud detection overlaps (--no-keep-unanswered: "
                        "the paper's merge, the cloud's answer alone)")
    p.add_argument("--merge", choices=MERGE_POLICIES, default=EdgeSettings.merge,
                   help="edge and cloud boxes that overlap: the two fuse (default; confidence-weighted box, noisy-or "
                        "confidence) or the cloud's replaces the edge's (the paper's; common.routing.merge)")
    p.add_argument("--queue-dir", help="disk queue (default $CEDAR_HOME/edge/<site>/queue)")
    p.add_argument("--drain-timeout", type=float, default=EdgeSettings.drain_timeout,
                   help="seconds to wait for the queue at the end")
    p.add_argument("--retry-base", type=float, default=EdgeSettings.retry_base,
                   help="first retry delay (s), doubled per failure")
    p.add_argument("--retry-max", type=float, default=EdgeSettings.retry_max, help="longest retry delay (s)")
    p.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout per request (s)")
    p.add_argument("--reload-every", type=float, default=2.0, help="seconds between weight-file checks (0: off)")
    p.add_argument("--run-id", help="id of this run in offload ids (default: UTC time + random)")
    p.add_argument("--fps", type=float, help="frame rate for image folders and the video (default: source's or 10)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--realtime", action="store_true", help="pace a file or folder at --fps, like a camera")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is too much
    try:
        token = resolve_token(args.token, args.token_file)
    except ValueError as err:
        parser.error(str(err))
    fixed_conf = args.det_conf is not None
    if not fixed_conf:
        args.det_conf = EdgeSettings.det_conf
    fixed_offload = any(getattr(args, k) is not None for k in OPTION_FIELDS)
    for k in OPTION_FIELDS:
        if getattr(args, k) is None:
            setattr(args, k, getattr(EdgeSettings, k))
    if not 0 <= args.t_conf <= 1 or args.t_size < 0 or args.n_frames < 1 or args.beta <= 0 or args.imgsz < 32 \
            or not 0 <= args.det_conf <= 1 or not 0 < args.iou <= 1 or args.drain_timeout < 0 or args.retry_base <= 0 \
            or args.retry_max < args.retry_base or args.timeout <= 0 or args.max_gap < 0 \
            or (args.candidate_conf and not 0 < args.candidate_conf < args.det_conf):
        parser.error("need 0 <= --t-conf <= 1, --t-size >= 0, --n-frames >= 1, --beta > 0, --imgsz >= 32, "
                     "0 <= --conf <= 1, 0 < --iou <= 1, --drain-timeout >= 0, 0 < --retry-base <= --retry-max, "
                     "--timeout > 0, --max-gap >= 0 (0: off), --candidate-conf 0 (off) or in (0, --conf)")
    try:
        source = FrameSource(args.source, fps=args.fps, max_frames=args.max_frames, realtime=args.realtime,
                             sequence=args.sequence)
        settings = EdgeSettings(
            site=args.site, run_id=args.run_id, t_conf=args.t_conf, t_size=args.t_size, n_frames=args.n_frames,
            beta=args.beta, warmup=args.warmup, cut_threshold=args.cut_threshold, max_gap=args.max_gap or None,
            offload=args.offload, context=args.context, min_crop=args.min_crop, jpeg_quality=args.jpeg_quality,
            atlas=args.atlas, merge_iou=args.merge_iou, keep_unanswered=args.keep_unanswered, merge=args.merge,
            det_conf=args.det_conf, candidate_conf=args.candidate_conf, drain_timeout=args.drain_timeout,
            retry_base=args.retry_base, retry_max=args.retry_max, upscale=args.upscale, propagate=args.propagate,
            photos=source.photos, det_conf_source="flag" if fixed_conf else "config", budget=args.budget,
            offload_source="flag" if fixed_offload else "config")
        queue_dir = Path(args.queue_dir).expanduser() if args.queue_dir else \
            CEDAR_HOME / "edge" / args.site / "queue"
        # without --conf the detector reaches down to any calibrated threshold; the step cuts the answer there
        detector_conf = settings.detector_conf if fixed_conf else min(settings.detector_conf, CONF_RANGE[0])
        model = EdgeModel(args.weights, onnx=args.onnx, imgsz=args.imgsz, iou=args.iou, conf=detector_conf,
                          device=args.device, reload_every=args.reload_every)
        client = CloudClient(args.cloud, token, args.site, cafile=args.cafile, timeout=args.timeout)
        runtime = EdgeRuntime(model, client, settings, queue_dir=queue_dir, out=args.out, video=args.video,
                              fps=source.fps, append=args.append)
    except (EdgeError, OSError, ValueError) as err:
        log.error("%s", err)
        return 2

    def on_signal(signum, _frame):
        if signum == signal.SIGTERM or runtime.stop_requested:  # SIGTERM or a second Ctrl-C: no draining
            runtime.drain_requested = False
        runtime.stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    answer = settings.for_model(model.meta)
    print(f"cedar edge runtime: site {settings.site}, run {settings.run_id}, "
          f"{'photos' if source.photos else source.kind} {args.source}, model {model.version} "
          f"(answers from {answer.det_conf:.3g}, {answer.det_conf_source}; offloads {answer.option()}, "
          f"{answer.offload_source}), cloud {args.cloud}, queue {queue_dir}"
          + (f", upscale x{runtime.upscaler.scale} ({args.upscale})" if runtime.upscaler else ""), flush=True)
    try:
        summary = runtime.run(source)
    finally:
        source.close()
        client.close()
    print("cedar edge runtime summary:\n" + summary.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
