"""The cloud's hard-sample store: every uploaded frame or crop with the cloud's labels, as a YOLO dataset.

Layout and write order: see :mod:`server.cloud` ("Hard-sample store").
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.detections import Detections
from common.files import atomic_write

SUFFIX = {"jpeg": ".jpg", "png": ".png"}


class StoreError(RuntimeError):
    """The hard-sample store folder is unusable (e.g. made for other classes)."""


def yolo_label_lines(dets: Detections, width: int, height: int) -> list[str]:
    """``cls cx cy w h`` normalised to a ``width`` x ``height`` image (boxes clipped; empty ones dropped).

    Example: ``[10, 20, 30, 60]`` class 3 on 100x200 -> ``"3 0.200000 0.200000 0.200000 0.200000"``.
    """
    lines = []
    for (x1, y1, x2, y2), k in zip(dets.xyxy, dets.cls):
        x1, x2 = np.clip([x1, x2], 0, width)
        y1, y2 = np.clip([y1, y2], 0, height)
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            continue
        lines.append(f"{int(k)} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                     f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return lines


class HardSampleStore:
    """Uploaded samples with the cloud's labels, as a YOLO dataset (see the module docstring)."""

    def __init__(self, root: str | Path, names: Sequence[str]):
        import yaml

        self.root = Path(root).expanduser().resolve()
        self.names = list(names)
        self.images, self.labels, self.index = self.root / "images", self.root / "labels", self.root / "index.jsonl"
        self.images.mkdir(parents=True, exist_ok=True)
        self.labels.mkdir(parents=True, exist_ok=True)
        data_yaml = self.root / "data.yaml"
        if data_yaml.is_file():
            old = yaml.safe_load(data_yaml.read_text()) or {}
            old_names = old.get("names")
            old_names = [old_names[k] for k in sorted(old_names)] if isinstance(old_names, dict) else old_names
            if old_names and [str(n) for n in old_names] != self.names:
                raise StoreError(f"{self.root} holds samples labelled for classes {old_names}, "
                                 f"not this model's {self.names}; use another --store")
        spec = {"path": str(self.root), "train": "images", "val": "images", "nc": len(self.names),
                "names": dict(enumerate(self.names))}
        atomic_write(data_yaml, yaml.safe_dump(spec, sort_keys=False).encode())
        self.lock = threading.Lock()
        self.count = sum(1 for _ in self.index.open("rb")) if self.index.is_file() else 0
        existing = [int(m[1]) for p in self.images.iterdir() if (m := re.search(r"-(\d+)\.\w+$", p.name))]
        self._seq = itertools.count(max([self.count, *existing]) + 1)

    def add(self, *, site: str, frame: str | None, kind: str, data: bytes, fmt: str, image_hw: tuple[int, int],
            dets: Detections, origin: tuple[float, float] | None = None, scale: Any = None) -> str:
        """Store one sample (``dets`` in the pixels of this image) and return its id."""
        height, width = image_hw
        lines = yolo_label_lines(dets, width, height)
        frame_part = frame or f"t{time.time_ns() // 1_000_000}"
        with self.lock:
            sample_id = f"{site}-{frame_part}-{next(self._seq):06d}"
            while any(self.images.glob(f"{sample_id}.*")):  # a stray file from another writer
                sample_id = f"{site}-{frame_part}-{next(self._seq):06d}"
            # label before image: an image must never be seen without its labels (it would be a negative)
            atomic_write(self.labels / f"{sample_id}.txt", "".join(f"{ln}\n" for ln in lines).encode())
            atomic_write(self.images / f"{sample_id}{SUFFIX[fmt]}", data)
            entry = {"id": sample_id, "site": site, "frame": frame, "time": round(time.time(), 3), "kind": kind,
                     "origin": list(origin) if origin is not None else None, "scale": scale,
                     "width": width, "height": height, "detections": len(lines),
                     "image": f"images/{sample_id}{SUFFIX[fmt]}", "label": f"labels/{sample_id}.txt"}
            with self.index.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.count += 1
        return sample_id
