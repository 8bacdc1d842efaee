"""The edge detector: letterbox, postprocess (the one NMS of :mod:`common.detections`), PyTorch and ONNX
Runtime predictors, and the site's model hot-swapped when its weights file changes (ONNX re-exported).

An end-to-end model (YOLO26, :func:`common.yolo.is_end2end`) runs its one-to-one branch, which
outputs decided boxes ``(300, 6)``: :func:`postprocess_end2end` only thresholds and maps them,
no NMS. The ONNX predictor knows such an export by its ``end2end`` metadata.

Both predictors share one letterbox and one postprocess, checked against
:func:`common.yolo.predict` in the tests. As in Ultralytics, PyTorch pads a frame
only to a multiple of the stride, a fixed-size ONNX export to the full square, so
on non-square frames the two can differ slightly (identical on square frames).
The ONNX path imports no torch unless it has to re-export the model.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from clients.media import EdgeError
from common.detections import Detections, nms
from common.files import atomic_write

log = logging.getLogger(__name__)


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
    return _to_frame(xyxy[kept], score[kept], cls[kept], lb)


def postprocess_end2end(raw: np.ndarray, lb: Letterbox, conf: float = 0.25) -> Detections:
    """End-to-end head output ``(K, 6)`` (``x1, y1, x2, y2`` in input pixels, score, class) -> frame detections.

    The head has decided the boxes (one per object, best first): rows with score ``> conf``
    are kept and mapped back through the letterbox, as Ultralytics' end-to-end path does.
    """
    keep = raw[:, 4] > conf
    rows = raw[keep].astype(np.float64)
    return _to_frame(rows[:, :4], rows[:, 4], rows[:, 5].round().astype(np.int64), lb)


def _to_frame(xyxy: np.ndarray, score: np.ndarray, cls: np.ndarray, lb: Letterbox) -> Detections:
    """Input-pixel boxes -> frame pixels (``x_frame = (x_in - left) / gain_x``), clipped to the frame."""
    h, w = lb.shape
    xyxy = (xyxy - [lb.left, lb.top, lb.left, lb.top]) / [lb.gain_x, lb.gain_y, lb.gain_x, lb.gain_y]
    xyxy = np.clip(xyxy, 0, [w, h, w, h])
    return Detections(xyxy.reshape(-1, 4), score, cls.astype(np.int64))


class Predictor(Protocol):
    """What the runtime calls: one BGR frame in, frame-pixel detections out."""

    def __call__(self, image: np.ndarray) -> Detections: ...


class TorchPredictor:
    """A detector from :mod:`common.yolo` run with PyTorch (Conv+BN fused, like Ultralytics' predictor).

    ``meta``: the weights file's metadata (``model.cedar_meta``, e.g. the calibrated ``det_conf``)."""

    def __init__(self, model, *, imgsz: int = 320, conf: float = 0.25, iou: float = 0.7, device: str = "cpu",
                 fuse: bool = True):
        import copy

        import torch

        from common.yolo import is_end2end

        self._torch = torch
        model = copy.deepcopy(model).to(device).float().eval()
        self.end2end = is_end2end(model)
        if self.end2end:
            model.end2end = True  # the one-to-one branch (fusing drops the other)
        if fuse:
            model = model.fuse(verbose=False)
        self.meta = dict(getattr(model, "cedar_meta", None) or {})
        self.model, self.imgsz, self.conf, self.iou, self.device = model, imgsz, conf, iou, device
        self.stride = max(int(model.stride.max()), 32)
        self.names = dict(model.names)

    def __call__(self, image: np.ndarray) -> Detections:
        x, lb = letterbox(image, self.imgsz, self.stride, auto=True)
        with self._torch.inference_mode():
            out = self.model(self._torch.from_numpy(x).to(self.device))
        raw = out[0] if isinstance(out, (list, tuple)) else out  # eval: (y, feats); y is (1, 4 + nc, A) or (1, K, 6)
        if self.end2end:
            return postprocess_end2end(raw[0].float().cpu().numpy(), lb, self.conf)
        return postprocess(raw[0].float().cpu().numpy(), lb, self.conf, self.iou)


def onnx_runtime(path: str | Path, threads: int = 0):
    """An ONNX Runtime inference object for ``path`` on the CPU, all graph optimisations on.

    ``threads``: intra-op threads (0: ONNX Runtime's default), one inter-op thread.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """An ONNX export of the detector (:func:`common.yolo.export_onnx`) run with ONNX Runtime; ``meta``: the
    metadata of the weights it is exported from."""

    def __init__(self, path: str | Path, *, imgsz: int = 320, conf: float = 0.25, iou: float = 0.7,
                 threads: int = 0, meta: dict | None = None):
        self.meta = dict(meta or {})
        self.runtime = onnx_runtime(path, threads)
        inp = self.runtime.get_inputs()[0]
        self.input_name = inp.name
        h, w = inp.shape[2:4]
        self.static = isinstance(h, int) and isinstance(w, int)
        self.imgsz = (h, w) if self.static else (imgsz, imgsz)
        meta = self.runtime.get_modelmeta().custom_metadata_map
        self.stride = int(meta.get("stride", 32))
        self.end2end = meta.get("end2end") == "True"  # (1, K, 6) decided boxes, see common.yolo.export_onnx
        try:
            self.names = ast.literal_eval(meta["names"]) if "names" in meta else {}
        except (ValueError, SyntaxError):
            self.names = {}
        self.conf, self.iou = conf, iou

    def __call__(self, image: np.ndarray) -> Detections:
        x, lb = letterbox(image, self.imgsz, self.stride, auto=not self.static)
        raw = self.runtime.run(None, {self.input_name: x})[0]  # (1, 4 + nc, A) or (1, K, 6)
        if self.end2end:
            return postprocess_end2end(raw[0], lb, self.conf)
        return postprocess(raw[0], lb, self.conf, self.iou)


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
    differs from the one recorded next to it in ``<onnx>.json``). An ``onnx`` file
    the runtime did not write (its digest is not the one recorded in ``<onnx>.json``)
    is never overwritten: loading refuses it with :class:`EdgeError`. :attr:`meta` is the running model's
    weights metadata (recorded in ``<onnx>.json`` for an export, so the ONNX path reads it without torch).
    ``conf`` is the detectors' own threshold: the lowest confidence any caller needs.
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

    @property
    def meta(self) -> dict:
        """The running model's weights metadata (``{}`` for a predictor that has none)."""
        return getattr(self.predictor, "meta", None) or {}

    # -- building
    def _default_load(self, path: Path, version: str) -> Predictor:
        if self.onnx is None:
            return TorchPredictor(self._model(path), imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                  device=self.device)
        from common import yolo

        sidecar = self.onnx.with_name(self.onnx.name + ".json")
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            recorded = {}
        if self.onnx.is_file() and recorded.get("onnx") != file_version(self.onnx):
            raise EdgeError(f"--onnx {self.onnx}: the file exists and the edge runtime did not export it (no "
                            f"matching record in {sidecar.name}); it is never overwritten: give a new path, or "
                            f"delete the file to have it exported from --weights")
        if not self.onnx.is_file() or recorded.get("version") != version or recorded.get("imgsz") != self.imgsz \
                or "meta" not in recorded:
            tmp = self.onnx.with_name(f".{self.onnx.stem}.{os.getpid()}.tmp.onnx")
            model = self._model(path)
            yolo.export_onnx(model, tmp, imgsz=self.imgsz)
            os.replace(tmp, self.onnx)
            recorded = {"weights": str(path), "version": version, "imgsz": self.imgsz,
                        "onnx": file_version(self.onnx), "meta": model.cedar_meta}
            atomic_write(sidecar, json.dumps(recorded).encode())
            log.info("exported %s from %s (version %s)", self.onnx, path, version)
        return OnnxPredictor(self.onnx, imgsz=self.imgsz, conf=self.conf, iou=self.iou, meta=recorded["meta"])

    @staticmethod
    def _model(path: Path):
        """The weights file's model, by :func:`common.yolo.load_weights` (which also loads pruned files)."""
        from common import yolo

        try:
            return yolo.load_weights(path)
        except yolo.ModelError as err:
            raise EdgeError(f"--weights {path}: cannot load it: {err}") from None

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
    """A fixed predictor with a fixed version (no file, no reload): for tests and embedding; ``meta`` as
    :attr:`EdgeModel.meta`."""

    def __init__(self, predictor: Predictor, version: str = "static", meta: dict | None = None):
        self.predictor, self.version, self.reloads, self.meta = predictor, version, 0, dict(meta or {})

    def poll(self, now: float | None = None) -> bool:
        return False
