"""The edge runtime's input and output: frames from a video, folder or camera; JSON lines; the annotated video."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from common.detections import Detections

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class EdgeError(RuntimeError):
    """A source, model file or queue folder is unusable; the message names it."""


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
    :attr:`photos`: the source is a set of independent photos, an image folder unless ``sequence``
    declares it the frames of a video (videos and cameras are always sequences).
    """

    def __init__(self, spec: str | Path, fps: float | None = None, max_frames: int | None = None,
                 realtime: bool = False, sequence: bool = False):
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
        self.photos = self.kind == "images" and not sequence

    @property
    def length(self) -> int | None:
        """How many frames the folder or video holds (a video's container count); None for a camera or unknown."""
        if self.kind == "images":
            return len(self._files)
        if self.kind == "video":
            import cv2

            return int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        return None

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


class JsonlWriter:
    """Thread-safe JSON-lines output, one flushed line per record."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict, sync: bool = False) -> bool:
        """Append one line (``sync``: and fsync it, for lines that commit something); False if closed."""
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            if self._fh.closed:
                log.error("output closed; dropping a %s line for frame %s", record.get("kind"), record.get("frame"))
                return False
            self._fh.write(line + "\n")
            self._fh.flush()
            if sync:
                os.fsync(self._fh.fileno())
        return True

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
            self._size = (w, h)
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
        if canvas.shape[:2] != self._size[::-1]:  # photos of another size: scaled to the video's
            canvas = cv2.resize(canvas, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(canvas)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
