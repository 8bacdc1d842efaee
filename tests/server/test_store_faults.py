"""Faults of the hard-sample store (server/hard_samples.py) and how the service and the edge take them.

- a store over its size bound, or one whose writes fail (its ``images/`` folder replaced by a
  file), answers 503 with Retry-After, stores nothing of that request and keeps serving;
- the edge's offload worker (clients/offload.py), against the service on a real loopback
  socket, waits the Retry-After of a 503 and then delivers the offload exactly once;
- two writer processes appending to one store at once: every index line parses, names are
  unique, and every named file exists.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
import time

import cv2
import httpx
import numpy as np
import pytest

from clients.offload import RETRY_AFTER_MAX, CloudClient, DiskQueue, OffloadEntry, Offloader, retry_after_seconds
from common.detections import Detections
from server.cloud import CloudService, Limits, create_app
from server.hard_samples import HardSampleStore, Sample, StoreUnavailable
from tests.deploy_helpers import free_port

TOKEN = "store-token"
NAMES = ["a", "b", "c", "d"]
HEADERS = {"Authorization": f"Bearer {TOKEN}", "X-Cedar-Site": "site-3"}


def _fake_detect(images):
    """Every image: one box [2, 2, 12, 12], class 1, confidence 0.9."""
    return [Detections([[2, 2, 12, 12]], [0.9], [1]) for _ in images]


def _png(h: int = 24, w: int = 32, seed: int = 0) -> bytes:
    return cv2.imencode(".png", np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))[1].tobytes()


def _post(app, url: str, **kwargs) -> httpx.Response:
    import asyncio

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cloud",
                                     headers=HEADERS) as client:
            return await client.post(url, **kwargs)

    return asyncio.run(go())


def _crop_files(n: int) -> list:
    meta = {"crops": [{"x0": 10 * i, "y0": 5} for i in range(n)]}
    return [("meta", (None, json.dumps(meta).encode(), "application/json"))] + [
        ("crop", (f"{i}.png", _png(seed=i), "image/png")) for i in range(n)]


def _index(store: HardSampleStore) -> list[dict]:
    return [json.loads(line) for line in store.index.read_text().splitlines()] if store.index.exists() else []


def test_a_full_store_answers_503_with_retry_after_and_stores_nothing(tmp_path):
    # Prepare: a store bounded to what it holds after one frame, plus 10 bytes
    png = _png()
    store = HardSampleStore(tmp_path / "store", NAMES)
    service = CloudService(_fake_detect, arch="fake", names=NAMES, token=TOKEN, store=store,
                           limits=Limits(retry_after_s=7))
    app = create_app(service)
    assert _post(app, "/detect", content=png, headers={"Content-Type": "image/png"}).status_code == 200
    held = store.bytes
    # the store's own count: the image as uploaded, its one label line, its one index line
    files = [*store.images.iterdir(), *store.labels.iterdir(), store.index]
    assert held == sum(p.stat().st_size for p in files) and len(files) == 3
    store.max_bytes = held + 10
    # Execute
    frame = _post(app, "/detect", content=png, headers={"Content-Type": "image/png"})
    crops = _post(app, "/detect/crops", files=_crop_files(2))
    # Assert
    for r, incoming in ((frame, len(png)), (crops, 2 * len(png))):
        assert r.status_code == 503 and r.headers["retry-after"] == "7", r.text
        assert r.json()["detail"] == (f"the hard-sample store holds {held} bytes; {incoming} more would pass its "
                                      f"bound of {held + 10} bytes (--store-max-mb); retry after 7 s")
    assert len(_index(store)) == 1 and len(list(store.images.iterdir())) == 1 and store.bytes == held
    assert service.served == 1
    # the bound lifted (space freed): the same request is served and stored
    store.max_bytes = None
    assert _post(app, "/detect/crops", files=_crop_files(2)).status_code == 200
    assert len(_index(store)) == 3
    service.executor.shutdown()


def test_the_bound_holds_for_all_writers_of_a_store_together(tmp_path):
    """Two writers of one folder (two worker processes; each store object keeps only what it wrote in memory,
    the shared count is on disk): bounded to about 3 samples' bytes, writer A stores 2, writer B one, then both
    refuse. Each sample: a 24x32 PNG, its one label line and its index line (whose time field varies by a few
    digits), so the counts are the files' sizes."""
    # Prepare
    png = _png()
    a = HardSampleStore(tmp_path / "store", NAMES)
    b = HardSampleStore(tmp_path / "store", NAMES)

    def sample() -> list[Sample]:
        return [Sample("site-1", "f", "frame", png, "png", (24, 32), Detections([[2, 2, 12, 12]], [0.9], [1]))]

    a.add(sample())
    one = a.bytes  # the bytes of one sample, give or take the time field's digits
    a.max_bytes = b.max_bytes = 3 * one + 10
    # Execute
    a.add(sample())
    b.add(sample())  # B's own count: 1 sample; the store's: 3
    # Assert: the store-wide count is the files' sizes and the sum of what each writer wrote
    files = [*a.images.iterdir(), *a.labels.iterdir(), a.index]
    held = sum(p.stat().st_size for p in files)
    assert held == int((tmp_path / "store" / ".bytes").read_text()) == a.bytes + b.bytes
    assert abs(a.bytes - 2 * one) <= 6 and abs(b.bytes - one) <= 6 and abs(held - 3 * one) <= 9
    # nothing more fits, for either writer, and the refusal names the store-wide count
    for writer in (a, b):
        with pytest.raises(StoreUnavailable, match=f"holds {held} bytes; {len(png)} more would pass"):
            writer.add(sample())
    assert len(_index(a)) == 3
    # a writer started later counts what is there
    assert HardSampleStore(tmp_path / "store", NAMES).bytes == held


def test_an_unwritable_store_answers_503_and_leaves_no_half_sample(tmp_path):
    # Prepare: images/ replaced by a file, so every image write fails (NotADirectoryError, an OSError)
    store = HardSampleStore(tmp_path / "store", NAMES)
    service = CloudService(_fake_detect, arch="fake", names=NAMES, token=TOKEN, store=store,
                           limits=Limits(retry_after_s=3))
    app = create_app(service)
    shutil.rmtree(store.images)
    store.images.write_bytes(b"not a folder")
    # Execute
    r = _post(app, "/detect/crops", files=_crop_files(3))
    # Assert: 503, nothing left behind (the first crop's label was written, then removed)
    assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
    assert r.json()["detail"].startswith(f"cannot write to the hard-sample store {store.root}: ")
    assert "Not a directory" in r.json()["detail"]
    assert list(store.labels.iterdir()) == [] and _index(store) == [] and store.count == 0
    # repaired: served again, and the stored names follow on
    store.images.unlink()
    store.images.mkdir()
    r = _post(app, "/detect/crops", files=_crop_files(3))
    assert r.status_code == 200 and len(_index(store)) == 3 == store.count
    assert sorted(p.stem for p in store.images.iterdir()) == sorted(c["sample"] for c in r.json()["crops"])
    service.executor.shutdown()


def test_retry_after_values():
    assert retry_after_seconds("30") == 30.0 and retry_after_seconds(" 0 ") == 0.0
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=now) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0  # in the past
    assert retry_after_seconds("99999999") == RETRY_AFTER_MAX
    for junk in (None, "", "soon", "-5", "1.5", "３"):
        assert retry_after_seconds(junk) is None, junk


class _Timed(CloudClient):
    """The real HTTP client, recording when each send started and how it ended."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sends: list[tuple[float, str]] = []

    def send(self, entry):
        t = time.monotonic()
        try:
            answer = super().send(entry)
        except Exception as err:
            self.sends.append((t, type(err).__name__))
            raise
        self.sends.append((t, "ok"))
        return answer


def test_the_edge_waits_the_retry_after_of_a_503_then_delivers_once(tmp_path):
    """A full store answers 503, Retry-After 1; the worker's own backoff is 10-50 ms, so without honouring
    Retry-After it would try about 20 times in that second. It tries once more, >= 1 s later, and delivers."""
    import uvicorn

    store = HardSampleStore(tmp_path / "store", NAMES, max_bytes=1)
    service = CloudService(_fake_detect, arch="fake", names=NAMES, token=TOKEN, store=store,
                           limits=Limits(retry_after_s=1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                          ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    queue = client = worker = None
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        frame = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
        entry = OffloadEntry.for_keyframe(frame, np.array([[20, 20, 40, 40], [70, 50, 90, 80]], np.float32),
                                          [True, True], site="site-3", run="runA", frame=17, mode="crops",
                                          created=time.time(), model="edge-v1", edge=[])
        delivered, failed = [], []
        queue = DiskQueue(tmp_path / "queue")
        client = _Timed(f"http://127.0.0.1:{port}", TOKEN, "site-3")
        worker = Offloader(queue, client, retry_base=0.01, retry_max=0.05,
                           on_delivered=lambda e, answer, tries: delivered.append((e.id, tries)),
                           on_failed=lambda e, err: failed.append((e.id, err)))
        # Execute: the first send meets the full store; the operator frees space while the worker waits
        assert worker.submit(entry)
        while not client.sends and time.monotonic() < deadline:
            time.sleep(0.01)
        store.max_bytes = None
        assert worker.drain(timeout=15)
    finally:
        if worker:
            worker.stop()
        if client:
            client.close()
        if queue:
            queue.close()
        server.should_exit = True
        thread.join(10)
    # Assert
    assert [how for _, how in client.sends] == ["CloudUnavailable", "ok"]
    assert client.sends[1][0] - client.sends[0][0] >= 1.0  # Retry-After: 1, not the 10-50 ms backoff
    assert delivered == [("site-3.runA.000017", 2)] and failed == []
    assert (tmp_path / "queue" / "delivered.log").read_text() == "site-3.runA.000017\n"
    index = _index(store)
    assert len(index) == 2 and {e["frame"] for e in index} == {"runA.000017"}  # two crops, stored once


# --------------------------------------------------------------------------- concurrent writers


def _writer(root: str, site: str, n: int, start) -> None:
    store = HardSampleStore(root, NAMES)
    start.wait()
    for i in range(n):
        crops = [Sample(site, "same", "crop", _png(8, 8, seed=i * 3 + k), "png", (8, 8),
                        Detections([[1, 1, 5, 5]], [0.9], [k])) for k in range(1 + i % 3)]
        store.add(crops)


def test_two_writer_processes_never_corrupt_the_index(tmp_path):
    """Two processes add 60 batches each (1-3 samples, same frame tag) to one store, started together:
    both begin with the same sequence number, so names collide unless claimed. 120 batches of
    1 + 2 + 3 (repeating) = 240 samples."""
    root = tmp_path / "store"
    HardSampleStore(root, NAMES)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(root), "site-1", 60, start)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = (root / "index.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line parses
    assert len(entries) == 240 and len({e["id"] for e in entries}) == 240
    for e in entries:
        assert (root / e["image"]).is_file() and (root / e["label"]).is_file()
        assert e["id"].startswith("site-1-same-")
    assert len(list((root / "images").iterdir())) == 240 == len(list((root / "labels").iterdir()))
    # each label holds its sample's one box, of the class its position in the batch gave
    assert sorted(int((root / e["label"]).read_text().split()[0]) for e in entries) == [0] * 120 + [1] * 80 + [2] * 40

