"""The edge runtime: live detection on a video, image folder or camera, with cloud refinement.

Run it on each edge box, next to ``flower-supernode`` (which keeps the site's
model store up to date after every federated round)::

    python -m clients.edge --source video.mp4 --weights /var/lib/cedar/model-store/model.pt \\
        --cloud https://cloud:8443 --token-file cloud.token --cafile cert.pem --site site-0 \\
        --out results.jsonl --video annotated.mp4

Per frame (paper section 4.2):

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
   context around those boxes (:func:`common.routing.offload_plan`), all on one
   JPEG atlas (:func:`common.routing.encode_atlas`; ``--separate-crops``: one
   JPEG each), or the whole keyframe with ``--offload frame``; written to the
   disk queue and handed to a background worker.
5. **Refinement.** When the cloud answers, a ``refined`` line for that frame
   carries ``merge(edge, cloud, offloaded)`` (:func:`common.routing.merge`),
   and a ``carried`` line for each non-keyframe after it carries that answer
   moved there by optical flow (:class:`RefinedCarrier`).

Delivery guarantees (``--queue-dir``, default ``$CEDAR_HOME/edge/<site>/queue``)
    Every offload is written to the queue *before* it is sent (one JSON file per
    offload: metadata, edge detections and the base64 JPEG payloads; written to a
    temporary name, fsynced and renamed). One worker thread sends entries in
    order. Connection errors, timeouts, 408/429/5xx and 401/403 are retried with
    exponential backoff (``--retry-base`` doubling up to ``--retry-max`` s, ±10 %
    jitter) while the edge keeps serving frames. Other 4xx answers (the cloud
    refuses the content) move the entry to ``queue/failed/`` with the error and
    emit a ``failed`` line: kept, never retried in a loop. On success the worker
    (1) appends the offload id to ``queue/delivered.log`` (fsync: the commit
    point), (2) writes the ``refined`` line, (3) deletes the entry. At start-up
    entries whose id is already in ``delivered.log`` are deleted unsent, and an
    id already delivered or queued is never queued again, so the ``refined``
    line of an offload is written at most once; a crash between (1) and (2)
    loses that one line (the id says it was delivered), which is the price of
    never duplicating. A request whose answer is lost in transit (timeout after
    the cloud stored it) is sent again: the cloud's hard-sample store may then
    hold that sample twice, the result file still has one line.
    At the end of the source the runtime waits up to ``--drain-timeout`` s for
    the queue to empty; what is left stays on disk and is sent first by the
    next run on the same ``--queue-dir`` (its ``refined`` lines then appear in
    that run's output, with the original ``run`` and ``frame``). One process
    per queue folder (a lock file enforces it). ``delivered.log`` grows by one
    id (~40 bytes) per offload; delete it only together with the queue entries.

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
    an offload the cloud refused, and a last ``{"kind": "summary", ...}`` line.
    ``time`` is Unix seconds (frame read; answer received), ``pts_s`` the media
    time (frame / fps; seconds since start for a camera). Every detection list
    reads back with :meth:`common.routing.Detections.from_list`. ``model`` is the
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
import ast
import base64
import hashlib
import json
import logging
import os
import random
import secrets
import signal
import ssl
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from common.cloud_api import (CROPS_PATH, DETECT_PATH, FRAME_HEADER, ID_PATTERN, ID_RULE, RUN_PATTERN, SITE_HEADER,
                              encode_crop_meta, frame_tag, offload_id)
from common.detections import Detections, nms
from common.keyframes import IoUTracker, KeyframeSelector
from common.routing import (CANDIDATE_CONF, MERGE_POLICIES, encode_atlas, encode_regions, merge,
                            offload_plan, payload_bytes, route)
from common.files import atomic_write
from common.tokens import TOKEN_ENV, resolve_token

log = logging.getLogger("clients.edge" if __name__ == "__main__" else __name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
QUEUE_FORMAT = 1


class EdgeError(RuntimeError):
    """A source, model file or queue folder is unusable; the message names it."""


# =========================================================================== frames


@dataclass
class Frame:
    """One frame: 0-based ``index``, BGR ``image``, media time ``pts_s`` (None if unknown), Unix ``time``."""

    index: int
    image: np.ndarray
    pts_s: float | None
    time: float


class FrameSource:
    """Frames of a video file, a folder of images (sorted by name) or a camera index.

    ``spec`` is a camera when it is a non-negative integer that is not an
    existing path. ``fps`` (media time of image folders, and of the annotated
    video) defaults to the video's own rate, else 10. ``realtime`` paces a file
    or folder at ``fps`` (frame i is not read before ``i / fps`` s), as a camera would.
    """

    def __init__(self, spec: str | Path, fps: float | None = None, max_frames: int | None = None,
                 realtime: bool = False):
        self.spec, self.max_frames, self.realtime = str(spec), max_frames, realtime
        path = Path(self.spec).expanduser()
        self._cap = None
        self._files: list[Path] = []
        if self.spec.isdigit() and not path.exists():
            self.kind = "camera"
        elif path.is_dir():
            self.kind = "images"
            self._files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise EdgeError(f"--source {self.spec}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        elif path.is_file():
            self.kind = "video"
        else:
            raise EdgeError(f"--source {self.spec}: no such file, folder or camera index")
        native = None
        if self.kind in ("video", "camera"):
            import cv2

            self._cap = cv2.VideoCapture(int(self.spec) if self.kind == "camera" else str(path))
            if not self._cap.isOpened():
                raise EdgeError(f"--source {self.spec}: OpenCV cannot open this {self.kind}")
            native = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0) or None
        self.fps = float(fps) if fps else (native or 10.0)

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        t0 = time.monotonic()
        for index in range(self.max_frames if self.max_frames is not None else sys.maxsize):
            if self.kind == "images":
                if index >= len(self._files):
                    return
                image = cv2.imread(str(self._files[index]), cv2.IMREAD_COLOR)
                if image is None:
                    log.warning("skipping unreadable image %s", self._files[index])
                    continue
            else:
                ok, image = self._cap.read()
                if not ok or image is None:
                    return
            pts = time.monotonic() - t0 if self.kind == "camera" else index / self.fps
            if self.realtime and self.kind != "camera":
                time.sleep(max(0.0, t0 + pts - time.monotonic()))
            yield Frame(index, image, round(pts, 4), time.time())

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


# =========================================================================== detection: letterbox + NMS


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the network input: ``gain`` and padding ``(left, top)`` in input pixels."""

    gain_x: float
    gain_y: float
    left: int
    top: int
    shape: tuple[int, int]  # original (H, W)


def letterbox(image: np.ndarray, imgsz: int | tuple[int, int], stride: int = 32,
              auto: bool = False) -> tuple[np.ndarray, Letterbox]:
    """Ultralytics' ``LetterBox`` (centre padding with grey 114) plus BGR->RGB, CHW, /255.

    ``r = min(H_in / H, W_in / W)``; the frame is resized to ``round(W r) x round(H r)``
    (bilinear) and padded to the input size, or only to a multiple of ``stride``
    when ``auto`` (what Ultralytics does for PyTorch models). Example: a 128x64
    (HxW) frame into 320x320: ``r = 2.5``, resized to 160x320 (WxH), 80 px grey on
    the left and right.

    Returns ``(x, lb)``: ``x`` is ``(1, 3, h, w)`` float32 in [0, 1].
    """
    import cv2

    new_h, new_w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    h, w = image.shape[:2]
    r = min(new_h / h, new_w / w)
    unpad_w, unpad_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = new_w - unpad_w, new_h - unpad_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w, h) != (unpad_w, unpad_h):
        image = cv2.resize(image, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    x = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255.0
    return x, Letterbox(unpad_w / w, unpad_h / h, left, top, (h, w))


def postprocess(raw: np.ndarray, lb: Letterbox, conf: float = 0.25, iou: float = 0.7,
                max_det: int = 300, max_nms: int = 30000) -> Detections:
    """Raw YOLO head output ``(4 + nc, A)`` (``cx, cy, w, h`` in input pixels, class scores) -> frame detections.

    Best class per anchor, kept when its score is ``> conf``; per-class NMS at
    ``iou`` (:func:`common.detections.nms`); at most ``max_det``; boxes mapped back through the letterbox
    (``x_frame = (x_in - left) / gain_x``) and clipped to the frame, as
    Ultralytics' ``non_max_suppression`` + ``scale_boxes`` do.
    """
    scores_all = raw[4:]  # (nc, A)
    cls = scores_all.argmax(0)
    score = scores_all[cls, np.arange(scores_all.shape[1])]
    keep = score > conf
    xywh, score, cls = raw[:4, keep].T.astype(np.float64), score[keep].astype(np.float64), cls[keep]
    if len(score) > max_nms:
        top = np.argsort(-score, kind="stable")[:max_nms]
        xywh, score, cls = xywh[top], score[top], cls[top]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    kept = nms(xyxy, score, iou, classes=cls)[:max_det]
    xyxy, score, cls = xyxy[kept], score[kept], cls[kept]
    h, w = lb.shape
    xyxy = (xyxy - [lb.left, lb.top, lb.left, lb.top]) / [lb.gain_x, lb.gain_y, lb.gain_x, lb.gain_y]
    xyxy = np.clip(xyxy, 0, [w, h, w, h])
    return Detections(xyxy.reshape(-1, 4), score, cls.astype(np.int64))


class Predictor(Protocol):
    """What the runtime calls: one BGR frame in, frame-pixel detections out."""

    def __call__(self, image: np.ndarray) -> Detections: ...


class TorchPredictor:
    """A detector from :mod:`common.yolo` run with PyTorch (Conv+BN fused, like Ultralytics' predictor)."""

    def __init__(self, model, *, imgsz: int = 320, conf: float = 0.25, iou: float = 0.7, device: str = "cpu",
                 fuse: bool = True):
        import copy

        import torch

        self._torch = torch
        model = copy.deepcopy(model).to(device).float().eval()
        if fuse:
            model = model.fuse(verbose=False)
        self.model, self.imgsz, self.conf, self.iou, self.device = model, imgsz, conf, iou, device
        self.stride = max(int(model.stride.max()), 32)
        self.names = dict(model.names)

    def __call__(self, image: np.ndarray) -> Detections:
        x, lb = letterbox(image, self.imgsz, self.stride, auto=True)
        with self._torch.inference_mode():
            out = self.model(self._torch.from_numpy(x).to(self.device))
        raw = out[0] if isinstance(out, (list, tuple)) else out  # eval: (y, feats); y is (1, 4 + nc, A)
        return postprocess(raw[0].float().cpu().numpy(), lb, self.conf, self.iou)


class OnnxPredictor:
    """An ONNX export of the detector (:func:`common.yolo.export_onnx`) run with ONNX Runtime."""

    def __init__(self, path: str | Path, *, imgsz: int = 320, conf: float = 0.25, iou: float = 0.7,
                 threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        h, w = inp.shape[2:4]
        self.static = isinstance(h, int) and isinstance(w, int)
        self.imgsz = (h, w) if self.static else (imgsz, imgsz)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.stride = int(meta.get("stride", 32))
        try:
            self.names = ast.literal_eval(meta["names"]) if "names" in meta else {}
        except (ValueError, SyntaxError):
            self.names = {}
        self.conf, self.iou = conf, iou

    def __call__(self, image: np.ndarray) -> Detections:
        x, lb = letterbox(image, self.imgsz, self.stride, auto=not self.static)
        raw = self.session.run(None, {self.input_name: x})[0]  # (1, 4 + nc, A)
        return postprocess(raw[0], lb, self.conf, self.iou)


# =========================================================================== the site's model, hot-swapped


def file_version(path: str | Path) -> str:
    """First 12 hex digits of the SHA-256 of a file (the model version in every JSON line)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class EdgeModel:
    """The site's current detector, rebuilt when the weights file changes (see the module docstring).

    ``load(weights_path, version) -> Predictor`` builds a detector; the default
    builds a :class:`TorchPredictor`, or an :class:`OnnxPredictor` when ``onnx``
    is given (exporting ``onnx`` from the weights whenever the weights' version
    differs from the one recorded next to it in ``<onnx>.json``).
    """

    def __init__(self, weights: str | Path, *, onnx: str | Path | None = None, imgsz: int = 320,
                 conf: float = 0.25, iou: float = 0.7, device: str = "cpu", reload_every: float = 2.0,
                 background: bool = True, load: Callable[[Path, str], Predictor] | None = None):
        self.weights = Path(weights).expanduser()
        self.onnx = Path(onnx).expanduser() if onnx else None
        self.imgsz, self.conf, self.iou, self.device = imgsz, conf, iou, device
        self.reload_every, self.background = float(reload_every), background
        self._load = load or self._default_load
        if not self.weights.is_file():
            raise EdgeError(f"--weights {self.weights}: no such file (the site's model store writes model.pt)")
        if self.onnx is not None:  # exports cut short by an earlier exit
            for stale in self.onnx.parent.glob(f".{self.onnx.stem}.*.tmp.onnx"):
                stale.unlink(missing_ok=True)
        self._stat = _stat_key(self.weights)
        self.version = file_version(self.weights)
        t0 = time.perf_counter()
        self.predictor = self._load(self.weights, self.version)
        log.info("edge model %s from %s (%s) in %.2fs", self.version, self.weights,
                 "onnx" if self.onnx else "torch", time.perf_counter() - t0)
        self.reloads = 0
        self._next_check = time.monotonic() + self.reload_every
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._ready: tuple[Predictor, str, float] | None = None

    # -- building
    def _default_load(self, path: Path, version: str) -> Predictor:
        from common import yolo

        if self.onnx is None:
            return TorchPredictor(yolo.load_weights(path), imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                  device=self.device)
        sidecar = self.onnx.with_name(self.onnx.name + ".json")
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            recorded = {}
        if not self.onnx.is_file() or recorded.get("version") != version or recorded.get("imgsz") != self.imgsz:
            tmp = self.onnx.with_name(f".{self.onnx.stem}.{os.getpid()}.tmp.onnx")
            yolo.export_onnx(yolo.load_weights(path), tmp, imgsz=self.imgsz)
            os.replace(tmp, self.onnx)
            atomic_write(sidecar, json.dumps({"weights": str(path), "version": version,
                                               "imgsz": self.imgsz}).encode())
            log.info("exported %s from %s (version %s)", self.onnx, path, version)
        return OnnxPredictor(self.onnx, imgsz=self.imgsz, conf=self.conf, iou=self.iou)

    def _build(self, version: str) -> None:
        t0 = time.perf_counter()
        try:
            predictor = self._load(self.weights, version)
        except Exception as err:  # a bad file must not stop the edge: keep the running model
            log.warning("reload of %s (version %s) failed, keeping model %s: %s", self.weights, version,
                        self.version, err)
            return
        with self._lock:
            self._ready = (predictor, version, time.perf_counter() - t0)

    # -- polling (main thread, between frames)
    def poll(self, now: float | None = None) -> bool:
        """Swap in a model that finished loading; every ``reload_every`` s look at the file. True if swapped."""
        swapped = self._swap()
        now = time.monotonic() if now is None else now
        if self.reload_every <= 0 or now < self._next_check or (self._loader and self._loader.is_alive()):
            return swapped
        self._next_check = now + self.reload_every
        key = _stat_key(self.weights)
        if key is None or key == self._stat:
            return swapped
        self._stat = key
        try:
            version = file_version(self.weights)
        except OSError as err:
            log.warning("cannot read %s: %s", self.weights, err)
            return swapped
        if version == self.version:
            return swapped  # touched, same content
        log.info("weights changed: %s -> %s, loading", self.version, version)
        if self.background:
            self._loader = threading.Thread(target=self._build, args=(version,), name="cedar-reload", daemon=True)
            self._loader.start()
            return swapped
        self._build(version)
        return self._swap() or swapped

    def _swap(self) -> bool:
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None:
            return False
        old = self.version
        self.predictor, self.version, seconds = ready
        self.reloads += 1
        log.info("hot-swapped edge model %s -> %s (loaded in %.2fs, reload %d)", old, self.version, seconds,
                 self.reloads)
        return True

    def wait_reload(self, timeout: float = 60.0) -> bool:
        """Wait for a background load to finish and swap it in (for tests and shutdown)."""
        if self._loader is not None:
            self._loader.join(timeout)
        return self._swap()


class StaticModel:
    """A fixed predictor with a fixed version (no file, no reload): for tests and embedding."""

    def __init__(self, predictor: Predictor, version: str = "static"):
        self.predictor, self.version, self.reloads = predictor, version, 0

    def poll(self, now: float | None = None) -> bool:
        return False


# =========================================================================== the cloud client


class CloudUnavailable(Exception):
    """The cloud could not answer now (connection, timeout, 408/429/5xx, auth): retry later."""


class CloudRejected(Exception):
    """The cloud refused this offload for good (4xx on its content): do not retry."""


@dataclass
class CloudAnswer:
    detections: Detections  # frame pixels
    rtt_ms: float
    request_bytes: int = 0
    model: str | None = None


@dataclass
class OffloadEntry:
    """One queued offload (the JSON file in the queue folder, see :class:`DiskQueue`)."""

    id: str
    site: str
    run: str
    frame: int
    mode: str  # "crops" | "frame"
    created: float  # Unix time of the edge line
    model: str  # edge model version
    pts_s: float | None
    image_shape: list[int]
    regions: list[list[int]]
    edge: list[dict]  # all edge detections of the keyframe (Detections.to_list + reasons)
    offloaded: list[bool]
    payloads: list[bytes]  # JPEG per region, in order; or one JPEG, the atlas of all regions
    atlas: list[list[int]] | None = None  # with an atlas: each region's top-left corner (ax, ay) on it
    path: Path | None = None

    @property
    def tag(self) -> str:
        """``X-Cedar-Frame``: ``<run>.<frame:06d>``."""
        return frame_tag(self.run, self.frame)

    @property
    def payload_bytes(self) -> int:
        return payload_bytes(self.payloads)

    @classmethod
    def for_keyframe(cls, image: np.ndarray, boxes: Any, offloaded: Any, *, site: str, run: str, frame: int,
                     mode: str, created: float, model: str, edge: list[dict], pts_s: float | None = None,
                     context: float = 0.5, min_size: int = 32, quality: int = 90,
                     atlas: bool = True) -> "OffloadEntry":
        """The offload of one keyframe: crops around the ``offloaded`` boxes (or the whole frame), as JPEG.

        ``atlas``: the crops go on one image (:func:`common.routing.encode_atlas`), else one JPEG each.
        """
        plan = offload_plan(boxes, offloaded, image.shape, mode=mode, context=context, min_size=min_size)
        corners = None
        if mode == "crops" and atlas and not plan.empty:
            payload, placed = encode_atlas(image, plan.regions, quality=quality)
            payloads, corners = [payload], placed.tolist()
        else:
            payloads = encode_regions(image, plan.regions, quality=quality)
        return cls(id=offload_id(site, run, frame), site=site, run=run, frame=frame, mode=mode, created=created,
                   model=model, pts_s=pts_s, image_shape=list(image.shape[:2]), regions=plan.regions.tolist(),
                   edge=edge, offloaded=np.asarray(offloaded, dtype=bool).tolist(), payloads=payloads,
                   atlas=corners)

    def to_json(self) -> dict:
        return {"format": QUEUE_FORMAT, "id": self.id, "site": self.site, "run": self.run, "frame": self.frame,
                "mode": self.mode, "created": self.created, "model": self.model, "pts_s": self.pts_s,
                "image_shape": self.image_shape, "regions": self.regions, "edge": self.edge,
                "offloaded": self.offloaded, "atlas": self.atlas,
                "payloads": [base64.b64encode(p).decode("ascii") for p in self.payloads]}

    @classmethod
    def from_json(cls, data: dict, path: Path | None = None) -> "OffloadEntry":
        if data.get("format") != QUEUE_FORMAT:
            raise ValueError(f"unknown queue entry format {data.get('format')!r}")
        return cls(id=data["id"], site=data["site"], run=data["run"], frame=int(data["frame"]), mode=data["mode"],
                   created=float(data["created"]), model=data["model"], pts_s=data.get("pts_s"),
                   image_shape=list(data["image_shape"]), regions=[list(r) for r in data["regions"]],
                   edge=list(data["edge"]), offloaded=[bool(b) for b in data["offloaded"]],
                   payloads=[base64.b64decode(p) for p in data["payloads"]], path=path,
                   atlas=[list(c) for c in data["atlas"]] if data.get("atlas") is not None else None)


class CloudClient:
    """HTTP(S) client of the cloud detection service (:mod:`server.cloud`)."""

    def __init__(self, url: str, token: str, site: str, *, cafile: str | None = None, timeout: float = 10.0):
        import httpx

        if not token:
            raise EdgeError("a bearer token is required: --token, --token-file or $" + TOKEN_ENV)
        self._httpx = httpx
        verify: Any = ssl.create_default_context(cafile=cafile) if cafile else True
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, verify=verify, timeout=timeout,
                                   headers={"Authorization": f"Bearer {token}", SITE_HEADER: site})

    def send(self, entry: OffloadEntry) -> CloudAnswer:
        httpx = self._httpx
        headers = {FRAME_HEADER: entry.tag}
        t0 = time.perf_counter()
        try:
            if entry.mode == "frame":
                r = self.client.post(DETECT_PATH, content=entry.payloads[0],
                                     headers={**headers, "Content-Type": "image/jpeg"})
            else:
                if entry.atlas is not None:
                    parts = [("atlas", ("atlas.jpg", entry.payloads[0], "image/jpeg"))]
                else:
                    parts = [("crop", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(entry.payloads)]
                meta = encode_crop_meta(entry.regions, entry.atlas)
                files = [("meta", (None, meta, "application/json")), *parts]
                r = self.client.post(CROPS_PATH, files=files, headers=headers)
        except httpx.TransportError as err:  # refused, reset, DNS, TLS, timeouts
            raise CloudUnavailable(f"{type(err).__name__}: {err}") from None
        rtt_ms = (time.perf_counter() - t0) * 1000
        if r.status_code in (401, 403, 408, 429) or r.status_code >= 500:
            raise CloudUnavailable(f"HTTP {r.status_code}: {_detail(r)}")
        if r.status_code != 200:
            raise CloudRejected(f"HTTP {r.status_code}: {_detail(r)}")
        try:
            body = r.json()
            dets = Detections.from_list(body["detections"])
        except (ValueError, KeyError, TypeError) as err:
            raise CloudRejected(f"unreadable answer: {err}") from None
        return CloudAnswer(dets, rtt_ms, int(r.request.headers.get("content-length", 0)), body.get("model"))

    def close(self) -> None:
        self.client.close()


def _detail(response) -> str:
    try:
        return str(response.json().get("detail"))[:200]
    except ValueError:
        return response.text[:200]


# =========================================================================== the disk queue


class DiskQueue:
    """Pending offloads, one JSON file each, in order; ``delivered.log`` lists delivered ids.

    Layout: ``<dir>/<seq:020d>-<id>.json`` (``seq`` = enqueue time in ns, so
    older runs' entries sort first), ``<dir>/delivered.log`` (one id per line),
    ``<dir>/failed/`` (entries the cloud refused, with ``.error`` files),
    ``<dir>/.lock`` (held while a runtime uses the folder).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.failed_dir = self.root / "failed"
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.root / ".lock", "a+")
        try:
            import fcntl

            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except OSError:
            self._lock_fh.close()
            raise EdgeError(f"--queue-dir {self.root} is in use by another edge runtime") from None
        self.delivered_log = self.root / "delivered.log"
        self.delivered: set[str] = set()
        if self.delivered_log.is_file():
            self.delivered = {ln.strip() for ln in self.delivered_log.read_text().splitlines() if ln.strip()}
        self._last_seq = 0
        for stale in self.root.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        self.queued: set[str] = set()
        self.recovered = 0
        for path in self.paths():
            entry_id = self.id_of(path)
            if entry_id in self.delivered:  # crashed after the commit, before the delete
                log.info("queue: %s was already delivered; removing it", entry_id)
                path.unlink(missing_ok=True)
            else:
                self.queued.add(entry_id)
                self.recovered += 1
        if self.recovered:
            log.info("queue: %d offload(s) left by an earlier run in %s will be sent first", self.recovered,
                     self.root)

    @staticmethod
    def id_of(path: Path) -> str:
        return path.stem.split("-", 1)[1]

    def paths(self) -> list[Path]:
        """Pending entry files, oldest first."""
        return sorted(p for p in self.root.glob("*.json") if not p.name.startswith(".") and "-" in p.stem)

    def __len__(self) -> int:
        return len(self.paths())

    def put(self, entry: OffloadEntry) -> Path | None:
        """Write ``entry`` durably; None (and nothing written) if its id was already queued or delivered."""
        if entry.id in self.delivered or entry.id in self.queued:
            log.warning("queue: offload %s was already %s; not queued again", entry.id,
                        "delivered" if entry.id in self.delivered else "queued")
            return None
        seq = max(time.time_ns(), self._last_seq + 1)
        self._last_seq = seq
        path = self.root / f"{seq:020d}-{entry.id}.json"
        atomic_write(path, json.dumps(entry.to_json(), separators=(",", ":")).encode())
        self.queued.add(entry.id)
        entry.path = path
        return path

    def load(self, path: Path) -> OffloadEntry:
        return OffloadEntry.from_json(json.loads(path.read_bytes()), path)

    def commit(self, entry_id: str) -> None:
        """Mark delivered (the commit point): append the id to ``delivered.log`` and fsync."""
        with open(self.delivered_log, "a", encoding="utf-8") as fh:
            fh.write(entry_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.delivered.add(entry_id)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.queued.discard(self.id_of(path))

    def fail(self, path: Path, error: str) -> None:
        """Move a refused entry to ``failed/`` with its error next to it."""
        target = self.failed_dir / path.name
        atomic_write(target.with_suffix(".error"), error.encode())
        os.replace(path, target)
        self.queued.discard(self.id_of(path))

    def close(self) -> None:
        if not self._lock_fh.closed:
            self._lock_fh.close()


# =========================================================================== the background offloader


class Offloader:
    """One worker thread sending queued offloads in order, with backoff (see the module docstring).

    ``on_delivered(entry, answer, attempts)`` and ``on_failed(entry, error)``
    run on the worker thread, after the commit.
    """

    def __init__(self, queue: DiskQueue, client, *, on_delivered: Callable, on_failed: Callable,
                 retry_base: float = 0.5, retry_max: float = 30.0):
        self.queue, self.client = queue, client
        self.on_delivered, self.on_failed = on_delivered, on_failed
        self.retry_base, self.retry_max = retry_base, retry_max
        self._pending: deque[Path] = deque(queue.paths())
        self._cv = threading.Condition()
        self._stop = False
        self._abandoned = False
        self._tries: dict[str, int] = {}  # send attempts of the head entry, by id
        self.attempts = 0
        self.failures = 0
        self.online: bool | None = None
        self._thread = threading.Thread(target=self._loop, name="cedar-offload", daemon=True)
        self._thread.start()

    def submit(self, entry: OffloadEntry) -> bool:
        """Queue durably (main thread) and wake the worker; False if the id was seen before."""
        path = self.queue.put(entry)
        if path is None:
            return False
        with self._cv:
            self._pending.append(path)
            self._cv.notify_all()
        return True

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def drain(self, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Wait up to ``timeout`` s (or until ``cancelled()``) for the queue to empty; True if it did."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cv:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or cancelled():
                    return False
                self._cv.wait(min(left, 0.5))
        return True

    def stop(self, join_timeout: float = 30.0) -> None:
        """Stop the worker after its current request; a request still running after ``join_timeout``
        is abandoned (its entry stays queued, its answer is not used)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(join_timeout)
        if self._thread.is_alive():
            with self._cv:
                self._abandoned = True
            log.warning("offload worker still busy after %.0fs; its entry stays queued", join_timeout)

    def _wait(self, seconds: float) -> None:
        with self._cv:
            if not self._stop:
                self._cv.wait(seconds)

    def _loop(self) -> None:
        delay = 0.0
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                path = self._pending[0]
            try:
                entry = self.queue.load(path)
            except (OSError, ValueError, KeyError) as err:
                log.error("queue: unreadable entry %s (%s); moved to failed/", path.name, err)
                self._finish(path, None, lambda err=err: self.queue.fail(path, f"unreadable entry: {err}"))
                continue
            self.attempts += 1
            tries = self._tries[entry.id] = self._tries.get(entry.id, 0) + 1
            try:
                try:
                    answer = self.client.send(entry)
                except (CloudUnavailable, CloudRejected):
                    raise
                except Exception as err:  # a client bug must not kill the worker: keep the entry, retry
                    log.exception("offload %s: unexpected error while sending", entry.id)
                    raise CloudUnavailable(f"{type(err).__name__}: {err}") from None
            except CloudUnavailable as err:
                self.failures += 1
                delay = min(self.retry_max, self.retry_base if delay == 0 else delay * 2)
                if self.online is not False:
                    log.warning("cloud unavailable (%s); %d offload(s) queued, retrying with backoff", err,
                                self.pending())
                else:
                    log.info("cloud still unavailable (%s); next try in %.1fs", err, delay)
                self.online = False
                self._wait(delay * random.uniform(0.9, 1.1))
                continue
            except CloudRejected as err:
                log.error("cloud refused offload %s: %s; kept in %s", entry.id, err, self.queue.failed_dir)

                def reject(entry=entry, err=err):
                    self.queue.fail(path, str(err))
                    self.on_failed(entry, str(err))

                self._finish(path, entry.id, reject)
                continue
            if self.online is False:
                log.info("cloud reachable again; %d offload(s) to send", self.pending())
            self.online, delay = True, 0.0
            with self._cv:
                if self._abandoned:
                    return  # the runtime has closed its output: leave the entry queued
            try:
                self.queue.commit(entry.id)  # the commit point: from here on it is delivered
            except OSError as err:  # e.g. a full disk: not delivered as far as we know; send again later
                log.error("queue: cannot record delivery of %s (%s); will send it again", entry.id, err)
                self._wait(self.retry_max)
                continue

            def deliver(entry=entry, answer=answer, tries=tries):
                self.on_delivered(entry, answer, tries)
                self.queue.remove(path)

            self._finish(path, entry.id, deliver)

    def _finish(self, path: Path, entry_id: str | None, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:  # never let one entry kill the worker
            log.exception("offload worker: handling %s failed", path.name)
        self._tries.pop(entry_id, None)
        with self._cv:
            if self._pending and self._pending[0] == path:
                self._pending.popleft()
            self._cv.notify_all()


# =========================================================================== output


class JsonlWriter:
    """Thread-safe JSON-lines output, one flushed line per record."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            if self._fh.closed:
                log.error("output closed; dropping a %s line for frame %s", record.get("kind"), record.get("frame"))
                return
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


class VideoAnnotator:
    """``--video``: every frame with edge boxes and, when already available, its keyframe's refined boxes."""

    GREEN, ORANGE, MAGENTA = (0, 200, 0), (0, 140, 255), (255, 0, 255)

    def __init__(self, path: str | Path, fps: float):
        self.path, self.fps = Path(path).expanduser(), fps
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None

    def write(self, image: np.ndarray, edge: Detections, offloaded: np.ndarray, refined: Detections | None,
              label: str) -> None:
        import cv2

        if self._writer is None:
            h, w = image.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                raise EdgeError(f"--video {self.path}: OpenCV cannot write it")
        canvas = image.copy()
        for box, off in zip(edge.xyxy, offloaded):
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), self.ORANGE if off else self.GREEN, 1)
        if refined is not None:
            for box in refined.xyxy:
                x1, y1, x2, y2 = (int(round(v)) for v in box)
                cv2.rectangle(canvas, (x1 - 1, y1 - 1), (x2 + 1, y2 + 1), self.MAGENTA, 1)
        cv2.putText(canvas, label, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1, cv2.LINE_AA)
        self._writer.write(canvas)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


# =========================================================================== the runtime


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


@dataclass
class EdgeSettings:
    """Routing, keyframe and offload settings (plain values; the CLI fills them)."""

    site: str = "site-0"
    run_id: str | None = None
    t_conf: float = 0.5
    t_size: float = 256.0
    n_frames: int = 5
    beta: float = 1.5
    warmup: int = 3
    cut_threshold: float = 0.25
    # a keyframe at least every max_gap frames (None: off, the paper's rule alone): bounds how long carried answers
    # go stale when the motion rule misses a change, e.g. small objects appearing (collaboration.md: 3 = 0.3 s at
    # 10 fps; scale it with the camera's frame rate)
    max_gap: int | None = 3
    track_iou: float = 0.3
    offload: str = "crops"  # or "frame" (common.config.RoutingConfig.offload)
    context: float = 0.5
    min_crop: int = 32
    jpeg_quality: int = 90
    atlas: bool = True  # crops on one image per keyframe (--separate-crops: one JPEG each)
    merge_iou: float = 0.5
    keep_unanswered: bool = True  # offloaded edge boxes no cloud box overlaps stay (common.routing.merge)
    merge: str = "fuse"  # "fuse" edge and cloud boxes or the "cloud" wins overlaps (common.routing.merge)
    # edge boxes below this confidence are *candidates* (0: none): not in the edge's answer, offloaded with the
    # ambiguous ones, in the refined answer only where a cloud box confirms them (--candidate-conf)
    answer_conf: float = 0.0
    drain_timeout: float = 30.0
    retry_base: float = 0.5
    retry_max: float = 30.0
    upscale: str | None = None  # A+ super-resolution model (.npz) applied to every frame first
    propagate: bool = True  # move reused boxes on non-keyframes by optical flow (flow_shift)

    def __post_init__(self) -> None:
        if not ID_PATTERN.fullmatch(self.site):
            raise EdgeError(f"--site {self.site!r} must match {ID_RULE}")
        if self.run_id is None:
            self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)
        if not RUN_PATTERN.fullmatch(self.run_id):
            raise EdgeError(f"--run-id {self.run_id!r} must match [A-Za-z0-9_-]{{1,40}} (no dots)")
        if self.offload not in ("crops", "frame"):
            raise EdgeError(f"--offload must be 'crops' or 'frame', got {self.offload!r}")


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
        self.writer = JsonlWriter(out, append=append)
        self.video = VideoAnnotator(video, fps) if video else None
        self.selector = KeyframeSelector(beta=settings.beta, warmup=settings.warmup,
                                         cut_threshold=settings.cut_threshold, max_gap=settings.max_gap)
        self.tracker = IoUTracker(iou_threshold=settings.track_iou, max_age=max(0, settings.n_frames - 1),
                                  history=settings.n_frames)
        self.summary = Summary(model=model.version)
        self._stats_lock = threading.Lock()
        self.carrier = RefinedCarrier(move=settings.propagate)
        self._last: tuple | None = None  # (keyframe index, dets, reasons, offload mask, track ids, model version)
        self._flow: tuple | None = None  # (previous gray frame, boxes there) while propagating
        self._candidates: list[dict] = []  # the last keyframe's candidates (EdgeSettings.answer_conf)
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
        is_key, reason = self.selector.update_with_reason(frame.image)
        if self._last is None:
            is_key, reason = True, reason or "first"
        edge_ms = None
        offload = None
        if is_key:
            if reason == "cut":
                self.tracker.reset()
            t1 = time.perf_counter()
            dets = self.model.predictor(frame.image)
            edge_ms = (time.perf_counter() - t1) * 1000
            candidates = dets.select(dets.conf < s.answer_conf)
            dets = dets.select(dets.conf >= s.answer_conf)
            track_ids = self.tracker.update(dets.xyxy, dets.cls)
            routing = route(dets, self.tracker.histories(track_ids), t_conf=s.t_conf, t_size=s.t_size,
                            n_frames=s.n_frames)
            mask = routing.offload_mask
            self._last = (frame.index, dets, routing.reasons, mask, track_ids.tolist(), self.model.version)
            self._candidates = [{**d, "track": -1, "reasons": ["candidate"]} for d in candidates.to_list()]
            with self._stats_lock:
                self.summary.keyframes += 1
                self.summary.detections += len(dets)
                self.summary.edge_ms.append(edge_ms)
        source, dets, reasons, mask, track_ids, version = self._last  # non-keyframes reuse the keyframe's
        import cv2

        gray = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY) if frame.image.ndim == 3 else frame.image
        if s.propagate:
            boxes = dets.xyxy if is_key else flow_shift(self._flow[0], gray, self._flow[1])
            self._flow = (gray, boxes)
            if not is_key:
                h, w = gray.shape
                boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
                dets = Detections(boxes, dets.conf, dets.cls)
        det_list = [{**d, "track": int(t), "reasons": list(r)}
                    for d, t, r in zip(dets.to_list(), track_ids, reasons)]
        entry = None
        candidates = self._candidates if is_key else []
        if is_key and (mask.any() or candidates):
            sent = np.concatenate([mask, np.ones(len(candidates), dtype=bool)])
            boxes = np.concatenate([dets.xyxy, Detections.from_list(candidates).xyxy]) if candidates else dets.xyxy
            entry = OffloadEntry.for_keyframe(
                frame.image, boxes, sent, site=s.site, run=s.run_id, frame=frame.index, mode=s.offload,
                created=frame.time, model=version, edge=det_list + candidates, pts_s=frame.pts_s, context=s.context,
                min_size=s.min_crop, quality=s.jpeg_quality, atlas=s.atlas)
            offload = {"id": entry.id, "mode": s.offload, "regions": entry.regions, "detections": int(mask.sum()),
                       "candidates": len(candidates), "bytes": entry.payload_bytes}
        record = {"kind": "edge", "site": s.site, "run": s.run_id, "frame": frame.index,
                  "time": round(frame.time, 3), "pts_s": frame.pts_s, "keyframe": bool(is_key),
                  "keyframe_reason": reason if is_key else None, "source_frame": source,
                  "model": version, "detections": det_list, "candidates": candidates, "offload": offload,
                  "latency_ms": {"edge": _round(edge_ms), "total": _round((time.perf_counter() - t0) * 1000)}}
        if upscale_ms is not None:
            record["latency_ms"]["upscale"] = _round(upscale_ms)
        self.writer.write(record)  # the edge result is out before anything is sent
        submitted = False
        if entry is not None:
            self._edge_sent_at[entry.id] = time.time()
            submitted = self.offloader.submit(entry)
            if not submitted:
                self._edge_sent_at.pop(entry.id, None)
            else:
                with self._stats_lock:
                    self.summary.offloaded_frames += 1
                    self.summary.offloaded_detections += int(mask.sum())
                    self.summary.bytes_queued += entry.payload_bytes
        now = self._write_carried(self.carrier.frame(frame.index, frame.pts_s, gray, is_key, submitted))
        if self.video is not None:
            self.video.write(frame.image, dets, mask, now.get(frame.index),
                             f"{frame.index}{' K' if is_key else ''} {version[:6]}")
        with self._stats_lock:
            self.summary.frames += 1
        return record

    def _merged(self, edge: list[dict], cloud: Detections, offloaded: Sequence[bool]) -> tuple[Detections, list]:
        """``merge(edge, cloud, offloaded)`` with the runtime's policy; and its items tagged by source."""
        keep = [self.s.keep_unanswered and "candidate" not in d.get("reasons", ()) for d in edge]
        merged = merge(Detections.from_list(edge), cloud, np.array(offloaded, dtype=bool), iou=self.s.merge_iou,
                       keep_unanswered=np.array(keep, dtype=bool), resolve=self.s.merge)
        n_edge = len(merged) - len(cloud)
        return merged, [{**d, "source": "edge" if i < n_edge else "cloud"} for i, d in enumerate(merged.to_list())]

    def _write_carried(self, results: list) -> dict[int, Detections]:
        """One ``carried`` line per :class:`RefinedCarrier` result; the merged answers by frame."""
        merged_by_frame = {}
        for index, pts_s, key, meta, edge, cloud in results:
            merged, items = self._merged(edge, cloud, meta["offloaded"])
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
        _, items = self._merged(entry.edge, answer.detections, entry.offloaded)
        now = time.time()
        sent_at = self._edge_sent_at.pop(entry.id, None)
        recovered = entry.run != self.s.run_id or sent_at is None
        self.writer.write({
            "kind": "refined", "site": entry.site, "run": entry.run, "frame": entry.frame, "offload_id": entry.id,
            "time": round(now, 3), "pts_s": entry.pts_s, "keyframe": True, "model": entry.model, "mode": entry.mode,
            "detections": items, "cloud_detections": answer.detections.to_list(),
            "latency_ms": {"cloud_rtt": _round(answer.rtt_ms),
                           "since_edge": _round((now - sent_at) * 1000 if sent_at else None)},
            "bytes_sent": entry.payload_bytes, "request_bytes": answer.request_bytes, "attempts": attempts,
            "cloud_model": answer.model, "recovered": recovered})
        if entry.run == self.s.run_id:
            self.carrier.answered(entry.frame, {"id": entry.id, "model": entry.model, "offloaded": entry.offloaded},
                                  entry.edge, answer.detections)
        with self._stats_lock:
            self.summary.refined += 1
            self.summary.recovered += int(recovered)
            self.summary.bytes_sent += entry.payload_bytes
            self.summary.request_bytes += answer.request_bytes
            self.summary.rtt_ms.append(answer.rtt_ms)

    def _failed(self, entry: OffloadEntry, error: str) -> None:
        self.writer.write({"kind": "failed", "site": entry.site, "run": entry.run, "frame": entry.frame,
                           "offload_id": entry.id, "time": round(time.time(), 3), "error": error})
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
    p.add_argument("--offload", choices=("crops", "frame"), default=EdgeSettings.offload,
                   help="send crops around the ambiguous boxes and the candidates, or the whole keyframe")
    p.add_argument("--t-conf", type=float, default=EdgeSettings.t_conf, help="T_conf: lower confidence is ambiguous")
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
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--conf", type=float, default=0.25, help="edge detector confidence threshold (NMS)")
    p.add_argument("--candidate-conf", type=float, default=CANDIDATE_CONF,
                   help="also detect down to this confidence: boxes below --conf are candidates, offloaded and kept "
                        "only where the cloud confirms them (0: off)")
    p.add_argument("--iou", type=float, default=0.7, help="edge detector NMS IoU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--context", type=float, default=EdgeSettings.context,
                   help="crop margin, fraction of the box per side")
    p.add_argument("--min-crop", type=int, default=EdgeSettings.min_crop, help="minimum crop side in px")
    p.add_argument("--jpeg-quality", type=int, default=EdgeSettings.jpeg_quality)
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
    if not 0 <= args.t_conf <= 1 or args.t_size < 0 or args.n_frames < 1 or args.beta <= 0 or args.imgsz < 32 \
            or not 0 <= args.conf <= 1 or not 0 < args.iou <= 1 or args.drain_timeout < 0 or args.retry_base <= 0 \
            or args.retry_max < args.retry_base or args.timeout <= 0 or args.max_gap < 0 \
            or (args.candidate_conf and not 0 < args.candidate_conf < args.conf):
        parser.error("need 0 <= --t-conf <= 1, --t-size >= 0, --n-frames >= 1, --beta > 0, --imgsz >= 32, "
                     "0 <= --conf <= 1, 0 < --iou <= 1, --drain-timeout >= 0, 0 < --retry-base <= --retry-max, "
                     "--timeout > 0, --max-gap >= 0 (0: off), --candidate-conf 0 (off) or in (0, --conf)")
    try:
        settings = EdgeSettings(
            site=args.site, run_id=args.run_id, t_conf=args.t_conf, t_size=args.t_size, n_frames=args.n_frames,
            beta=args.beta, warmup=args.warmup, cut_threshold=args.cut_threshold, max_gap=args.max_gap or None,
            offload=args.offload, context=args.context, min_crop=args.min_crop, jpeg_quality=args.jpeg_quality,
            atlas=args.atlas, merge_iou=args.merge_iou, keep_unanswered=args.keep_unanswered, merge=args.merge,
            answer_conf=args.conf if args.candidate_conf else 0.0, drain_timeout=args.drain_timeout,
            retry_base=args.retry_base, retry_max=args.retry_max, upscale=args.upscale, propagate=args.propagate)
        queue_dir = Path(args.queue_dir).expanduser() if args.queue_dir else \
            Path(os.environ.get("CEDAR_HOME", "~/.cache/cedar")).expanduser() / "edge" / args.site / "queue"
        source = FrameSource(args.source, fps=args.fps, max_frames=args.max_frames, realtime=args.realtime)
        model = EdgeModel(args.weights, onnx=args.onnx, imgsz=args.imgsz, iou=args.iou,
                          conf=args.candidate_conf or args.conf,
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
    print(f"cedar edge runtime: site {settings.site}, run {settings.run_id}, {source.kind} {args.source}, "
          f"model {model.version}, cloud {args.cloud}, queue {queue_dir}"
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
