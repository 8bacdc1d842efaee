"""Offloads to the cloud: the queue entry, the HTTP client, the disk queue and the background worker.

The delivery guarantees (queue before send, one worker in order, retries with
backoff, the synced output line as the commit point, reconciled at start-up through ``outputs.log`` and
``delivered.log``, refusals kept in ``failed/``) are
described in :mod:`clients.edge`. When the cloud answers "not now" with a
``Retry-After`` (a 503 from a full or unwritable hard-sample store, a 429), the
worker waits that long (at most :data:`RETRY_AFTER_MAX`) instead of its backoff,
and the offload stays queued.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import os
import random
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clients.media import EdgeError
from common.cloud_api import (
    CROPS_PATH,
    DETECT_PATH,
    FRAME_HEADER,
    KEEP_HEADER,
    SITE_HEADER,
    encode_crop_meta,
    frame_tag,
    offload_id,
)
from common.detections import Detections
from common.files import atomic_write
from common.offload import encode_atlas, encode_regions, offload_plan, payload_bytes
from common.tokens import TOKEN_ENV

log = logging.getLogger(__name__)

QUEUE_FORMAT = 1


class CloudUnavailable(Exception):
    """The cloud could not answer now (connection, timeout, 408/429/5xx, auth): retry later.

    ``retry_after``: the seconds the cloud asked to wait (its ``Retry-After`` header), if it said.
    """

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


#: the longest ``Retry-After`` honoured (s): a longer one is cut to this
RETRY_AFTER_MAX = 600.0


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110: delay-seconds or an HTTP-date), or None.

    Examples: ``"30"`` -> 30.0; ``"Wed, 21 Oct 2015 07:28:10 GMT"`` 10 s after ``now`` -> 10.0
    (a date in the past -> 0.0); ``"soon"`` or no header -> None.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), RETRY_AFTER_MAX)


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

        ``atlas``: the crops go on one image (:func:`common.offload.encode_atlas`), else one JPEG each.
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

    def __init__(self, url: str, token: str, site: str, *, cafile: str | None = None, timeout: float = 10.0,
                 keep: bool = True):
        """``keep`` False: every request asks for the answer only (``X-Cedar-Keep: 0``), never a hard sample."""
        import httpx

        if not token:
            raise EdgeError("a bearer token is required: --token, --token-file or $" + TOKEN_ENV)
        self._httpx = httpx
        verify: Any = ssl.create_default_context(cafile=cafile) if cafile else True
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, verify=verify, timeout=timeout,
                                   headers={"Authorization": f"Bearer {token}", SITE_HEADER: site,
                                            KEEP_HEADER: "1" if keep else "0"})

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
            raise CloudUnavailable(f"HTTP {r.status_code}: {_detail(r)}",
                                   retry_after_seconds(r.headers.get("retry-after")))
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
        self.outputs_log = self.root / "outputs.log"

    def reconcile(self, output: str | Path) -> int:
        """Commit the pending entries whose answer an earlier run already wrote, and note ``output``.

        The worker writes an offload's ``refined`` (or ``failed``) line, synced, before it appends the id to
        ``delivered.log``; a crash between the two leaves the entry queued although its line is out. Every
        output file this queue has served is listed in ``outputs.log``; the pending ids found in one of them
        are committed and removed unsent. Call it before ``output`` is opened (truncating it erases its lines).
        Returns how many entries were reconciled; the rest (``self.recovered``) are sent first.
        """
        output = Path(output).expanduser().resolve()
        earlier = []
        if self.outputs_log.is_file():
            earlier = list(dict.fromkeys(ln.strip() for ln in self.outputs_log.read_text().splitlines() if ln.strip()))
        done: set[str] = set()
        for name in earlier:
            if not self.queued - done:
                break
            try:
                with open(name, encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            record = json.loads(line)
                        except ValueError:  # a line a crash cut short: not written as far as we know
                            continue
                        if isinstance(record, dict) and record.get("kind") in ("refined", "failed") \
                                and record.get("offload_id") in self.queued:
                            done.add(record["offload_id"])
            except OSError:  # moved or deleted since: its entries are sent again
                continue
        for path in self.paths():
            entry_id = self.id_of(path)
            if entry_id in done:
                log.info("queue: %s was answered in an earlier output; committing it", entry_id)
                self.commit(entry_id)
                self.remove(path)
        self.recovered -= len(done)
        if str(output) not in earlier[-1:]:
            with open(self.outputs_log, "a", encoding="utf-8") as fh:
                fh.write(f"{output}\n")
                fh.flush()
                os.fsync(fh.fileno())
        if self.recovered:
            log.info("queue: %d offload(s) left by an earlier run in %s will be sent first", self.recovered,
                     self.root)
        return len(done)

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

    def submit(self, entry: OffloadEntry, announce: Callable[[], None] = lambda: None) -> bool:
        """Queue durably (main thread), then ``announce`` it (the edge line, so no line names an offload that a
        crash could lose), then wake the worker; False if the id was seen before (announced all the same)."""
        try:
            path = self.queue.put(entry)
        finally:
            announce()  # the frame's result is out even when the disk refuses the entry
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
                # the cloud's Retry-After (e.g. a 503 from a full hard-sample store) wins over the backoff
                wait = delay * random.uniform(0.9, 1.1) if err.retry_after is None else err.retry_after
                if self.online is not False:
                    log.warning("cloud unavailable (%s); %d offload(s) queued, next try in %.1fs", err,
                                self.pending(), wait)
                else:
                    log.info("cloud still unavailable (%s); next try in %.1fs", err, wait)
                self.online = False
                self._wait(wait)
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

            def deliver(entry=entry, answer=answer, tries=tries):
                # the synced output line is the commit point: a crash before it sends again, a crash after it
                # is reconciled at the next start (DiskQueue.reconcile), so the line is written exactly once
                self.on_delivered(entry, answer, tries)
                self.queue.commit(entry.id)
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
