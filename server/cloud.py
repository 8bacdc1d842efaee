"""The cloud detection service: the cloud model behind HTTP, and the hard-sample store.

Run it on the cloud host (next to ``flower-superlink``)::

    python -m server.cloud --weights outputs/<run>/cloud/model.pt --host 0.0.0.0 --port 8443 \\
        --token-file cloud.token --certfile cert.pem --keyfile key.pem --store hard-samples

It serves any detector saved by :func:`common.yolo.save_weights` (YOLO11s,
YOLO11s-PyraFAN, ...; the file names its architecture and classes, ``--arch``
overrides the architecture). The model is loaded once; requests are decoded
and detected one at a time on a single worker thread, so the event loop keeps
answering (``/health`` stays fast) while a large image is being detected.
``--workers N`` runs N such processes on one port under uvicorn's supervisor, each
with its own model (N times the memory); the arguments are checked and the model
and store opened once before any worker starts. They share the hard-sample store
(see below); ``/health``'s ``served`` and ``stored`` are the answering worker's.

Options: ``--token T`` | ``--token-file F`` | ``$CEDAR_CLOUD_TOKEN`` (one is
required), ``--certfile/--keyfile`` (TLS), ``--imgsz 320 --conf C`` (default: the weights file's calibrated threshold, else 0.15) ``--label-conf 0.25 --iou 0.7
--crop-zoom 2 --device cpu``, limits ``--max-body-mb 8 --max-pixels 4096x4096 --max-crops 64
--read-timeout 60 --max-concurrency 32`` (per worker), the store's ``--store-max-mb`` (no bound by default;
every worker's samples count) and ``--retry-after 30``, ``--workers 1``.

API
---
``GET /health`` (no auth)
    ``{"status": "ok", "model": arch, "classes": [names], "served": n, "stored": m, "imgsz": s,
    "crop_zoom": z, "label_conf": c}``;
    ``served`` counts answered detection requests since start, ``stored`` the samples in the store.

``POST /detect``: one frame
    Body: the raw image bytes with ``Content-Type: image/jpeg`` or ``image/png``,
    or ``multipart/form-data`` with one file part named ``image``. Answer::

        {"site": "site-0", "frame": "17", "width": W, "height": H, "model": arch,
         "detections": [{"xyxy": [x1, y1, x2, y2], "conf": c, "cls": k}, ...],   # frame pixels
         "sample": "site-0-17-000042", "seconds": t}

``POST /detect/crops``: regions of one frame
    Body: ``multipart/form-data`` with a part ``meta`` (JSON) and one file part
    ``crop`` per crop (JPEG or PNG), in the order of ``meta["crops"]``::

        meta = {"crops": [{"x0": 100, "y0": 50}, {"x0": 300, "y0": 0, "scale": 2.0}]}

    ``(x0, y0)`` is the crop's top-left corner in the frame (pixels, >= 0);
    ``scale`` (default 1; a number or ``[sx, sy]``) is the factor the crop was
    resized by before sending (sent size = crop size * scale).

    Or all crops on *one* image (what the edge runtime sends, see
    :func:`common.offload.encode_atlas`: one JPEG header per keyframe instead of
    one per crop): a single file part ``atlas`` instead of the ``crop`` parts,
    and each meta item also names its cell, ``{"x0", "y0", "ax", "ay", "width",
    "height"}`` (whole pixels; the crop is ``atlas[ay:ay+height, ax:ax+width]``).
    Stored samples are then the crops cut from the decoded atlas, as PNG. Answer::

        {"site", "frame", "model", "seconds",
         "crops": [{"x0", "y0", "scale", "width", "height", "sample",
                    "detections": [...]}],          # each crop's detections, in FRAME pixels
         "detections": [...]}                      # all crops merged (per-class NMS at --iou)

    With httpx::

        files = [("meta", (None, json.dumps(meta), "application/json"))]
        files += [("crop", (f"{i}.jpg", jpeg_bytes, "image/jpeg")) for i, jpeg_bytes in enumerate(crops)]
        r = httpx.post(url + "/detect/crops", files=files, headers={
            "Authorization": f"Bearer {token}", "X-Cedar-Site": "site-0", "X-Cedar-Frame": "17"})
        dets = Detections.from_list(r.json()["detections"])

Headers: ``Authorization: Bearer <token>`` (every endpoint but ``/health``;
compared in constant time), ``X-Cedar-Site`` (required, ``[A-Za-z0-9_.-]{1,64}``),
``X-Cedar-Frame`` (optional, same pattern), ``X-Cedar-Keep`` (optional: ``1``, the default, lets the
upload become a hard sample; ``0`` asks for the answer only, as a site does when it scores its own
validation or test split, so that no evaluation image ever trains the cloud).

Errors are JSON ``{"detail": "<message naming the bad value>"}``: 400 bad or
missing header, undecodable image ("cannot decode image: ...") or malformed
multipart body; 401 missing or wrong token; 408 body not received within
``--read-timeout``; 413 body over ``--max-body-mb`` (checked on
``Content-Length`` *and* while the body streams in, so an unlimited body is
never buffered), image over ``--max-pixels`` (read from the PNG/JPEG header
*before* decoding: a 40000x40000 PNG "bomb" is refused without allocating),
or more than ``--max-crops`` crops; 415 a content type other than JPEG/PNG
(or multipart where allowed); 422 bad crop metadata (naming the field, e.g.
``meta.crops[1].x0``; the ``meta`` part is bounded before decoding: 256 KiB, nesting 8 deep,
coordinates <= 1,000,000, scales in [0.001, 1000]); 503 with ``Retry-After: <--retry-after>``
when the hard-sample store is over ``--store-max-mb`` or a write to it fails (a full or
read-only disk): nothing of that request is stored, and the edge sends it again later.
A bad request never stops the service.

Hard-sample store (``--store DIR``)
    Every accepted frame or crop is kept with the cloud's labels, in YOLO
    format, as the hard-sample set that cloud-to-edge KD trains the cloud
    model on (``cloud.store``, see :mod:`server.models`)::

        DIR/images/<site>-<frame>-<n>.<png|jpg>   the bytes exactly as uploaded (no re-encoding)
        DIR/labels/<site>-<frame>-<n>.txt         "cls cx cy w h", normalised to that image
        DIR/index.jsonl                           one JSON line per sample: id, site, frame, time,
                                                  kind (frame|crop), origin, scale, size, n detections
        DIR/data.yaml                             path/train/val/nc/names (no download key)

    ``<frame>`` is ``X-Cedar-Frame`` or, without it, ``t<unix ms>``; ``<n>`` is
    a store-wide sequence number, and a name is claimed by creating its label
    file exclusively, so names never collide, even between processes. Files
    are written to a temporary name and renamed (label first, then image, then
    the request's index lines in one appending write under a file lock: an
    image never appears without its labels, and a line is never interleaved).
    ``DIR/.bytes`` holds the store's size in bytes, updated under the same lock,
    which ``--store-max-mb`` is checked against.

TLS: give ``--certfile`` and ``--keyfile`` (PEM); clients then use ``https://``
and verify against that certificate (or its CA).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from common.cloud_api import (
    CROPS_PATH,
    DETECT_PATH,
    FRAME_HEADER,
    KEEP_HEADER,
    SITE_HEADER,
    RequestError,
    check_ids,
    check_keep,
    parse_crop_meta,
    show,
)
from common.config import EvalConfig, RoutingConfig, TrainConfig
from common.detections import Detections, nms
from common.offload import shelf_pack, to_frame_coords
from common.tokens import TOKEN_ENV, resolve_token
from server.cloud_http import (
    IMAGE_TYPES,
    PART_TYPES,
    cut_atlas,
    decode_image,
    media_type,
    parse_max_pixels,
    parse_multipart,
    read_body,
)
from server.hard_samples import HardSampleStore, Sample, StoreError, StoreUnavailable

log = logging.getLogger("server.cloud" if __name__ == "__main__" else __name__)

#: ``detect(images) -> detections per image``: BGR uint8 arrays in, image-pixel boxes out.
DetectFn = Callable[[list[np.ndarray]], list[Detections]]
_R = RoutingConfig  # the service's thresholds: routing.cloud_conf, label_conf, crop_zoom


# --------------------------------------------------------------------------- detections


def crops_to_frame(per_crop: Sequence[Detections], metas: Sequence[dict]) -> list[Detections]:
    """Each crop's detections (crop pixels) in frame pixels, via :func:`common.offload.to_frame_coords`.

    Example: a crop at origin ``(100, 50)``, scale 1, with a box ``[10, 10, 20, 20]``
    -> ``[110, 60, 120, 70]``; sent at 2x, ``[20, 20, 40, 40]`` maps to the same box.
    """
    return [to_frame_coords(d, (m["x0"], m["y0"]), m["scale"]) for d, m in zip(per_crop, metas)]


def detect_packed(detect: Callable[[list[np.ndarray]], list[Detections]], images: Sequence[np.ndarray],
                  tile: int, zoom: float = 1.0) -> list[Detections]:
    """Detect crops at a chosen scale: pasted onto gray tiles the model's input size, not blown up.

    A detector letterboxes each input to its input size, so a 40 px crop sent alone is
    enlarged 8x and its small objects become large ones the model never saw. Here each
    crop is resized by ``zoom`` (bicubic; 1 = its own scale) and the crops are packed
    (:func:`common.offload.shelf_pack`, 2 px apart) onto ``tile``-sized canvases filled with the letterbox gray
    (114); the tiles are detected in one batch; each detection goes to the crop that
    holds its centre and is mapped back to that crop's own pixels (divided by ``zoom``),
    clipped to it. A crop larger than a tile is detected alone, letterboxed.

    ``zoom`` > 1 spends cloud compute (zoom² the pixels) instead of upload bytes on
    small objects. With the standard preset's cloud (benchmarks/results/collaboration.md,
    4 sites, crops with the edge's candidates), the crop collaboration's mean mAP50 went
    0.396 (1x) -> 0.433 (2x) with the fused merge and 0.260 -> 0.375 with the paper's;
    whole frames at a larger input size got worse instead (site 0: validator mAP50
    0.497 at 320 px, 0.403 at 640).
    """
    import cv2

    if not zoom > 0:
        raise ValueError(f"zoom must be > 0, got {zoom!r}")
    sizes = [im.shape[:2] for im in images]
    if zoom != 1:
        images = [cv2.resize(im, (max(1, round(im.shape[1] * zoom)), max(1, round(im.shape[0] * zoom))),
                             interpolation=cv2.INTER_CUBIC) for im in images]
    placements = shelf_pack([(im.shape[1], im.shape[0]) for im in images], tile, tile, gap=2)
    n_tiles = 1 + max((p[0] for p in placements if p is not None), default=-1)
    tiles = [np.full((tile, tile, 3), 114, np.uint8) for _ in range(n_tiles)]
    for image, place in zip(images, placements):
        if place is not None:
            t, x, y = place
            h, w = image.shape[:2]
            tiles[t][y:y + h, x:x + w] = image if image.ndim == 3 else image[..., None]
    alone = [i for i, p in enumerate(placements) if p is None]
    answers = detect(tiles + [images[i] for i in alone])
    out = [Detections.empty() for _ in images]
    for i, dets in zip(alone, answers[n_tiles:]):
        out[i] = dets
    for i, (image, place) in enumerate(zip(images, placements)):
        if place is None:
            continue
        t, x, y = place
        h, w = image.shape[:2]
        dets = answers[t]
        cx, cy = (dets.xyxy[:, 0] + dets.xyxy[:, 2]) / 2, (dets.xyxy[:, 1] + dets.xyxy[:, 3]) / 2
        inside = (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)
        mine = dets.select(inside)
        out[i] = Detections(mine.xyxy - np.array([x, y, x, y], np.float32), mine.conf, mine.cls)
    return [Detections(np.clip(d.xyxy / np.float32(zoom), 0, [w, h, w, h]).astype(np.float32), d.conf, d.cls)
            for d, (h, w) in zip(out, sizes)]


class YoloDetector:
    """The cloud model, loaded once; ``__call__`` detects a batch under a lock (one at a time)."""

    def __init__(self, model, *, imgsz: int = 320, conf: float = 0.25, iou: float = 0.7, device: str = "cpu"):
        from common import yolo

        self.model, self.imgsz, self.conf, self.iou, self.device = model, imgsz, conf, iou, device
        self.predictor = yolo.Predictor(model, imgsz=imgsz, conf=conf, iou=iou, device=device)
        self.lock = threading.Lock()

    @classmethod
    def from_file(cls, weights: str | Path, arch: str | None = None, conf: float | None = None,
                  **kwargs) -> "YoloDetector":
        """``conf`` None: the threshold calibrated into the weights file (``det_conf`` in its metadata,
        :func:`server.models.calibrate`), else ``routing.cloud_conf``."""
        from common import yolo

        model = yolo.load_weights(weights, arch=arch).eval()
        if conf is None:
            conf = float(model.cedar_meta.get("det_conf", _R.cloud_conf))
        return cls(model, conf=conf, **kwargs)

    @property
    def arch(self) -> str:
        return str(getattr(self.model, "cedar_arch", None) or "unknown")

    @property
    def names(self) -> list[str]:
        return [str(self.model.names[k]) for k in sorted(self.model.names)]

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        with self.lock:
            raw = self.predictor(images)
        return [Detections(r["xyxy"], r["conf"], r["cls"]) for r in raw]


# --------------------------------------------------------------------------- the service


@dataclass
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_crops: int = 64
    read_timeout_s: float = 60.0
    retry_after_s: int = 30  # the Retry-After of a 503 (the hard-sample store is full or unwritable)


class CloudService:
    """Everything behind the endpoints, buildable in a test with any ``detect`` function."""

    def __init__(self, detect: DetectFn, *, arch: str, names: Sequence[str], token: str,
                 store: HardSampleStore | None, limits: Limits | None = None, iou: float = 0.7,
                 imgsz: int | None = None, crop_zoom: float = _R.crop_zoom, label_conf: float = _R.label_conf):
        if not token:
            raise ValueError("the cloud service needs a non-empty bearer token")
        self.detect, self.arch, self.names, self.store = detect, arch, list(names), store
        self.limits, self.iou, self.imgsz, self.crop_zoom = limits or Limits(), iou, imgsz, float(crop_zoom)
        self.label_conf = float(label_conf)
        self._token = token.encode()
        self.served = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cedar-detect")

    # -- request checks
    def authorize(self, header: str | None) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'", challenge)
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise RequestError(401, "malformed Authorization header: expected 'Bearer <token>'", challenge)
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise RequestError(401, "invalid bearer token", challenge)

    # -- work (runs on the single worker thread)
    def _unavailable(self, err: StoreUnavailable) -> RequestError:
        """A 503 with Retry-After: the edge keeps the offload queued and sends it again then."""
        log.error("hard-sample store: %s", err)
        return RequestError(503, f"{err}; retry after {self.limits.retry_after_s} s",
                            {"Retry-After": str(self.limits.retry_after_s)})

    def _check_room(self, incoming: int) -> None:
        """Refuse before detecting when the store is already too full for ``incoming`` bytes."""
        if self.store is not None:
            try:
                self.store.check_room(incoming)
            except StoreUnavailable as err:
                raise self._unavailable(err) from None

    def _store(self, samples: list[Sample], keep: bool = True) -> list[str | None]:
        """Store the samples (labels: detections from ``label_conf`` on); all or none, else a 503. Nothing with
        ``keep`` False (the client asked for an answer only: :data:`common.cloud_api.KEEP_HEADER` 0)."""
        if self.store is None or not keep:
            return [None] * len(samples)
        for s in samples:
            s.dets = s.dets.select(s.dets.conf >= self.label_conf)
        try:
            return self.store.add(samples)
        except StoreUnavailable as err:
            raise self._unavailable(err) from None

    def detect_frame(self, data: bytes, site: str, frame: str | None, keep: bool = True) -> dict:
        t0 = time.perf_counter()
        if keep:
            self._check_room(len(data))
        fmt, image = decode_image(data, self.limits.max_pixels)
        dets = self.detect([image])[0]
        (sample,) = self._store([Sample(site, frame, "frame", data, fmt, image.shape[:2], dets)], keep)
        self.served += 1
        seconds = time.perf_counter() - t0
        log.info("detect: site=%s frame=%s %dx%d -> %d detections in %.3fs", site, frame, image.shape[1],
                 image.shape[0], len(dets), seconds)
        return {"site": site, "frame": frame, "width": int(image.shape[1]), "height": int(image.shape[0]),
                "model": self.arch, "detections": dets.to_list(), "sample": sample, "seconds": round(seconds, 4)}

    def detect_crops(self, crops: list[bytes], metas: list[dict], site: str, frame: str | None,
                     keep: bool = True) -> dict:
        """Crops sent as one image part each."""
        t0 = time.perf_counter()
        if keep:
            self._check_room(sum(map(len, crops)))
        samples = []
        for i, data in enumerate(crops):
            try:
                fmt, image = decode_image(data, self.limits.max_pixels)
            except RequestError as err:
                raise RequestError(err.status, f"crop {i}: {err.detail}") from None
            samples.append((fmt, image, data))
        return self._crops(samples, metas, site, frame, t0, keep)

    def detect_atlas(self, atlas: bytes, metas: list[dict], site: str, frame: str | None,
                     keep: bool = True) -> dict:
        """Crops sent on one atlas image (``common.offload.encode_atlas``); each is stored as a lossless PNG."""
        import cv2

        t0 = time.perf_counter()
        if keep:
            self._check_room(len(atlas))
        try:
            _, image = decode_image(atlas, self.limits.max_pixels)
        except RequestError as err:
            raise RequestError(err.status, f"atlas: {err.detail}") from None
        samples = [("png", crop, cv2.imencode(".png", crop)[1].tobytes() if self.store and keep else b"")
                   for crop in cut_atlas(image, metas)]
        return self._crops(samples, metas, site, frame, t0, keep)

    def _crops(self, samples: list[tuple[str, np.ndarray, bytes]], metas: list[dict], site: str,
               frame: str | None, t0: float, keep: bool = True) -> dict:
        images = [image for _, image, _ in samples]
        # with the model's input size known, crops are packed onto tiles at crop_zoom; else detected one by one
        per_crop = detect_packed(self.detect, images, self.imgsz, self.crop_zoom) if self.imgsz else self.detect(images)
        in_frame = crops_to_frame(per_crop, metas)
        stored = self._store([Sample(site, frame, "crop", data, fmt, image.shape[:2], dets, (m["x0"], m["y0"]),
                                     m["scale"]) for (fmt, image, data), m, dets in zip(samples, metas, per_crop)],
                             keep)
        out = [{**meta, "width": int(image.shape[1]), "height": int(image.shape[0]), "sample": sample,
                "detections": framed.to_list()}
               for (_, image, _), meta, framed, sample in zip(samples, metas, in_frame, stored)]
        merged = Detections.concat(in_frame)
        merged = merged[np.sort(nms(merged.xyxy, merged.conf, self.iou, classes=merged.cls))]
        self.served += 1
        seconds = time.perf_counter() - t0
        log.info("detect/crops: site=%s frame=%s %d crops -> %d detections in %.3fs", site, frame, len(samples),
                 len(merged), seconds)
        return {"site": site, "frame": frame, "model": self.arch, "crops": out, "detections": merged.to_list(),
                "seconds": round(seconds, 4)}

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def health(self) -> dict:
        return {"status": "ok", "model": self.arch, "classes": self.names, "served": self.served,
                "stored": self.store.count if self.store else 0, "imgsz": self.imgsz, "crop_zoom": self.crop_zoom,
                "label_conf": self.label_conf}


def create_app(service: CloudService):
    """The FastAPI app over ``service``."""
    app = FastAPI(title="cedar cloud detection service", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        log.warning("%s %s -> %d: %s", request.method, request.url.path, err.status, err.detail)
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}"}, status_code=500)

    def checked(request: Request) -> tuple[str, str | None, bool, str, Message]:
        service.authorize(request.headers.get("authorization"))
        site, frame = check_ids(request.headers.get(SITE_HEADER), request.headers.get(FRAME_HEADER))
        keep = check_keep(request.headers.get(KEEP_HEADER))
        kind, parsed = media_type(request.headers.get("content-type"))
        return site, frame, keep, kind, parsed

    @app.get("/health")
    async def health():
        return service.health()

    @app.post(DETECT_PATH)
    async def detect(request: Request):
        site, frame, keep, kind, parsed = checked(request)
        if kind not in IMAGE_TYPES and kind != "multipart/form-data":
            raise RequestError(415, f"unsupported Content-Type {show(request.headers.get('content-type'))}: "
                                    f"send image/jpeg, image/png or multipart/form-data")
        body = await read_body(request, service.limits.max_body_bytes, service.limits.read_timeout_s)
        if kind == "multipart/form-data":
            parts = parse_multipart(body, parsed.get_param("boundary"), max_parts=2)
            images = [p for p in parts if p.name == "image"]
            if len(images) != 1:
                raise RequestError(422, f"multipart body must have exactly one part named 'image', got parts "
                                        f"{show([p.name for p in parts])}")
            if images[0].content_type not in PART_TYPES:
                raise RequestError(415, f"unsupported image part type {show(images[0].content_type)}: "
                                        f"send image/jpeg or image/png")
            body = images[0].data
        return await service.run(service.detect_frame, body, site, frame, keep)

    @app.post(CROPS_PATH)
    async def detect_crops(request: Request):
        site, frame, keep, kind, parsed = checked(request)
        if kind != "multipart/form-data":
            raise RequestError(415, f"unsupported Content-Type {show(request.headers.get('content-type'))}: "
                                    f"send multipart/form-data with a 'meta' part and 'crop' parts (or an 'atlas')")
        body = await read_body(request, service.limits.max_body_bytes, service.limits.read_timeout_s)
        parts = parse_multipart(body, parsed.get_param("boundary"), max_parts=service.limits.max_crops + 1,
                                limit_name=f" (meta + at most {service.limits.max_crops} crops, --max-crops)")
        metas = [p for p in parts if p.name == "meta"]
        crops = [p for p in parts if p.name == "crop"]
        atlases = [p for p in parts if p.name == "atlas"]
        other = [p.name for p in parts if p.name not in ("meta", "crop", "atlas")]
        if len(metas) != 1:
            raise RequestError(422, f"the body needs exactly one 'meta' part, got {len(metas)}")
        if other:
            raise RequestError(422, f"unexpected part(s) {show(other)}: only 'meta' and 'crop' (or one 'atlas')")
        if atlases and (crops or len(atlases) > 1):
            raise RequestError(422, f"send either 'crop' parts or one 'atlas' part, got {len(crops)} 'crop' and "
                                    f"{len(atlases)} 'atlas' parts")
        if not crops and not atlases:
            raise RequestError(422, "no 'crop' or 'atlas' parts in the body")
        for i, p in enumerate(crops or atlases):
            if p.content_type not in PART_TYPES:
                raise RequestError(415, f"{'crop ' + str(i) if crops else 'atlas'}: unsupported type "
                                        f"{show(p.content_type)}: send image/jpeg or image/png")
        if crops:
            meta = parse_crop_meta(metas[0].data, len(crops))
            return await service.run(service.detect_crops, [p.data for p in crops], meta, site, frame, keep)
        meta = parse_crop_meta(metas[0].data, None)
        if len(meta) > service.limits.max_crops:
            raise RequestError(413, f"the atlas names {len(meta)} crops; the limit is {service.limits.max_crops} "
                                    f"(--max-crops)")
        return await service.run(service.detect_atlas, atlases[0].data, meta, site, frame, keep)

    return app


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.cloud", description="cedar cloud detection service")
    p.add_argument("--weights", required=True, help="a weights file written by common.yolo.save_weights")
    p.add_argument("--arch", default=None, help="architecture (default: the one named in the weights file)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help=f"bearer token (visible in ps; prefer --token-file or ${TOKEN_ENV})")
    auth.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--certfile", help="TLS certificate (PEM); with --keyfile serves HTTPS")
    p.add_argument("--keyfile", help="TLS private key (PEM)")
    p.add_argument("--store", required=True, help="hard-sample store folder")
    p.add_argument("--store-max-mb", type=float, default=None,
                   help="bound on the store's size; past it, requests get 503 with Retry-After (default: none)")
    p.add_argument("--retry-after", type=int, default=Limits.retry_after_s,
                   help="seconds a 503 (store full or unwritable) tells the client to wait")
    p.add_argument("--imgsz", type=int, default=TrainConfig.imgsz, help="detector input size (train.imgsz)")
    p.add_argument("--conf", type=float, default=None,
                   help="answer with detections from this confidence on (default: the threshold calibrated into the "
                        f"weights file, else {_R.cloud_conf})")
    p.add_argument("--label-conf", type=float, default=_R.label_conf,
                   help="the hard-sample store's labels: only detections from this confidence on")
    p.add_argument("--iou", type=float, default=EvalConfig.iou, help="NMS IoU (eval.iou)")
    p.add_argument("--crop-zoom", type=float, default=_R.crop_zoom,
                   help="crops are detected resized by this factor (cloud compute for small objects, no upload bytes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-body-mb", type=float, default=8.0)
    p.add_argument("--max-pixels", default="4096x4096", help="WIDTHxHEIGHT (their product is the limit) or a count")
    p.add_argument("--max-crops", type=int, default=64)
    p.add_argument("--read-timeout", type=float, default=60.0, help="seconds to receive a request body")
    p.add_argument("--max-concurrency", type=int, default=32,
                   help="open connections/requests beyond this get 503 (bounds memory: each may buffer a body)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (uvicorn's supervisor), each with its own model, on one port")
    p.add_argument("--log-level", default="info")
    return p


#: with ``--workers N``: the argument list each worker process builds its service from (the token goes in
#: ``$CEDAR_CLOUD_TOKEN``)
ARGV_ENV = "CEDAR_CLOUD_ARGV"


def _checked_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, str]:
    """The parsed arguments and the token; a bad value stops with the parser's error naming it."""
    args = parser.parse_args(argv)
    try:
        token = resolve_token(args.token, args.token_file)
    except ValueError as err:
        parser.error(str(err))
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("TLS needs both --certfile and --keyfile")
    try:
        args.max_pixels = parse_max_pixels(args.max_pixels)
    except ValueError as err:
        parser.error(str(err))
    if args.max_body_mb <= 0 or args.max_crops < 1 or args.imgsz < 32 or not 0 <= (args.conf or 0) <= 1 \
            or not 0 <= args.label_conf <= 1 or not 0 < args.iou <= 1 or args.read_timeout <= 0 \
            or args.max_concurrency < 1 or args.retry_after < 0 or (args.store_max_mb or 1) <= 0 \
            or not 0 < args.crop_zoom <= 8 or args.workers < 1:
        parser.error("need --max-body-mb > 0, --max-crops >= 1, --imgsz >= 32, 0 <= --conf <= 1, "
                     "0 <= --label-conf <= 1, "
                     "0 < --iou <= 1, --read-timeout > 0, --max-concurrency >= 1, --retry-after >= 0, "
                     "--store-max-mb > 0, 0 < --crop-zoom <= 8, --workers >= 1")
    return args, token


def _service(args: argparse.Namespace, token: str) -> CloudService:
    """The model, the store and the service the arguments name (raises ModelError, StoreError, OSError)."""
    detector = YoloDetector.from_file(args.weights, args.arch, imgsz=args.imgsz, conf=args.conf, iou=args.iou,
                                      device=args.device)
    store = HardSampleStore(args.store, detector.names, max_bytes=None if args.store_max_mb is None
                            else int(args.store_max_mb * 1024 * 1024))
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_crops=args.max_crops, read_timeout_s=args.read_timeout, retry_after_s=args.retry_after)
    return CloudService(detector, arch=detector.arch, names=detector.names, token=token, store=store,
                        limits=limits, iou=args.iou, imgsz=args.imgsz, crop_zoom=args.crop_zoom,
                        label_conf=args.label_conf)


def worker_app():
    """The app of one worker process under ``--workers N`` (uvicorn's factory): its own model and service,
    built from the arguments in ``$CEDAR_CLOUD_ARGV``."""
    import json
    import os

    args, token = _checked_args(_parser(), json.loads(os.environ[ARGV_ENV]))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(_service(args, token))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, token = _checked_args(parser, argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from common.yolo import ModelError

    try:  # with --workers too: a bad model or store stops here, before any worker starts
        service = _service(args, token)
    except (ModelError, StoreError, OSError) as err:
        log.error("%s", err)
        return 2

    import uvicorn

    scheme = "https" if args.certfile else "http"
    print(f"cedar cloud service: {service.arch} ({len(service.names)} classes, answers from conf "
          f"{service.detect.conf:.3f}) on {scheme}://{args.host}:"
          f"{args.port}, store {service.store.root}"
          + (f", {args.workers} worker processes" if args.workers > 1 else ""), flush=True)
    options = {"host": args.host, "port": args.port, "ssl_certfile": args.certfile, "ssl_keyfile": args.keyfile,
               "log_level": args.log_level.lower(), "timeout_keep_alive": 30,
               "limit_concurrency": args.max_concurrency}
    if args.workers == 1:
        uvicorn.run(create_app(service), **options)
        service.executor.shutdown(wait=False, cancel_futures=True)
        return 0
    import json
    import os

    service.executor.shutdown(wait=False)
    del service  # the supervisor serves nothing: each worker loads its own model
    os.environ[ARGV_ENV] = json.dumps(list(sys.argv[1:] if argv is None else argv))
    os.environ[TOKEN_ENV] = token
    uvicorn.run(f"{__name__ if __name__ != '__main__' else 'server.cloud'}:worker_app", factory=True,
                workers=args.workers, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
