"""The cloud's hard-sample store: every uploaded frame or crop with the cloud's labels, as a YOLO dataset.

Layout and write order: see :mod:`server.cloud` ("Hard-sample store").
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from common.detections import Detections, yolo_label_lines
from common.files import atomic_write

SUFFIX = {"jpeg": ".jpg", "png": ".png"}


class StoreError(RuntimeError):
    """The hard-sample store folder is unusable (e.g. made for other classes)."""


class StoreUnavailable(RuntimeError):
    """The store cannot take samples now: over its size bound, or the disk refused a write (full, read-only)."""


@dataclass
class Sample:
    """One sample to store: the bytes as they will be kept and ``dets`` in the pixels of that image."""

    site: str
    frame: str | None
    kind: str  # "frame" | "crop"
    data: bytes
    fmt: str  # "png" | "jpeg"
    image_hw: tuple[int, int]
    dets: Detections
    origin: tuple[float, float] | None = None
    scale: Any = None


class HardSampleStore:
    """Uploaded samples with the cloud's labels, as a YOLO dataset (see :mod:`server.cloud`).

    ``max_bytes``: the bound on the bytes this store holds (images, labels, index); a batch that
    would pass it raises :class:`StoreUnavailable`. Several processes may write one store: a
    sample's name is claimed by creating its label file exclusively, and each batch's index
    lines go in one ``O_APPEND`` write under an exclusive ``flock``, which also adds the batch's
    bytes to the store-wide count in ``.bytes`` (so the bound holds for all writers together;
    writers that check at the same moment may each add one batch past it).
    """

    def __init__(self, root: str | Path, names: Sequence[str], max_bytes: int | None = None):
        import yaml

        self.root = Path(root).expanduser().resolve()
        self.names = list(names)
        self.max_bytes = max_bytes
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
        self.usage = self.root / ".bytes"  # the store-wide byte count, written under the index lock
        with self._index_lock():
            files = [*self.images.iterdir(), *self.labels.iterdir(), self.index]
            self.bytes = sum(p.stat().st_size for p in files if p.is_file())
            self._set_shared_bytes(self.bytes)
        existing = [int(m[1]) for p in self.images.iterdir() if (m := re.search(r"-(\d+)\.\w+$", p.name))]
        self._seq = itertools.count(max([self.count, *existing]) + 1)

    def _shared_bytes(self) -> int:
        """The bytes every writer has stored (``.bytes``); this process's count if it cannot be read."""
        try:
            return int(self.usage.read_text())
        except (OSError, ValueError):
            return self.bytes

    def _set_shared_bytes(self, value: int) -> None:
        """Replace ``.bytes`` (under the index lock; renamed into place, not fsynced: the count is the bound's
        aid, the index is the record)."""
        tmp = self.usage.with_name(f".bytes.{os.getpid()}.{threading.get_ident()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(str(value))
            os.replace(tmp, self.usage)

    def check_room(self, incoming: int) -> None:
        """Raise :class:`StoreUnavailable` if ``incoming`` more bytes would pass ``max_bytes``."""
        if self.max_bytes is not None and self._shared_bytes() + incoming > self.max_bytes:
            raise StoreUnavailable(f"the hard-sample store holds {self._shared_bytes()} bytes; {incoming} more would pass "
                                   f"its bound of {self.max_bytes} bytes (--store-max-mb)")

    def _claim(self, site: str, frame_part: str) -> str:
        """A fresh sample id, claimed by creating its (empty) label file exclusively: unique across processes."""
        while True:
            sample_id = f"{site}-{frame_part}-{next(self._seq):06d}"
            if any(self.images.glob(f"{glob.escape(sample_id)}.*")):
                continue
            try:
                os.close(os.open(self.labels / f"{sample_id}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                continue
            return sample_id

    def add(self, samples: Sequence[Sample]) -> list[str]:
        """Store a request's samples, all or none, and return their ids.

        Raises :class:`StoreUnavailable` over ``max_bytes`` or when a write fails (the files of
        the batch written so far are removed, and the index is cut back to its length before).
        """
        written: list[Path] = []
        entries = []
        with self.lock:
            self.check_room(sum(len(s.data) for s in samples))
            try:
                for s in samples:
                    height, width = s.image_hw
                    lines = yolo_label_lines(s.dets.xyxy, s.dets.cls, width, height)
                    sample_id = self._claim(s.site, s.frame or f"t{time.time_ns() // 1_000_000}")
                    label, image = self.labels / f"{sample_id}.txt", self.images / f"{sample_id}{SUFFIX[s.fmt]}"
                    written.append(label)
                    # label before image: an image must never be seen without its labels (it would be a negative)
                    atomic_write(label, "".join(f"{ln}\n" for ln in lines).encode())
                    written.append(image)
                    atomic_write(image, s.data)
                    entries.append({"id": sample_id, "site": s.site, "frame": s.frame, "time": round(time.time(), 3),
                                    "kind": s.kind, "origin": list(s.origin) if s.origin is not None else None,
                                    "scale": s.scale, "width": width, "height": height, "detections": len(lines),
                                    "image": f"images/{image.name}", "label": f"labels/{label.name}"})
                file_bytes = sum(p.stat().st_size for p in written)
                index_bytes = self._append("".join(json.dumps(e) + "\n" for e in entries).encode(), file_bytes)
            except OSError as err:
                for path in written:
                    with contextlib.suppress(OSError):  # the folder itself may be what failed
                        path.unlink(missing_ok=True)
                raise StoreUnavailable(f"cannot write to the hard-sample store {self.root}: {err}") from None
            self.count += len(entries)
            self.bytes += index_bytes + file_bytes
        return [e["id"] for e in entries]

    @contextlib.contextmanager
    def _index_lock(self):
        """The index opened for appending, under an exclusive ``flock`` (released on close)."""
        fd = os.open(self.index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _append(self, data: bytes, file_bytes: int) -> int:
        """Append ``data`` to the index in one write under an exclusive lock, and add it and ``file_bytes`` to
        ``.bytes``; on failure cut the index back."""
        with self._index_lock() as fd:
            size = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # never leave half a line
                raise
            self._set_shared_bytes(self._shared_bytes() + len(data) + file_bytes)
        return len(data)
