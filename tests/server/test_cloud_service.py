"""The cloud detection service (server/cloud.py).

Two layers:

- pure pieces and the app in-process (Starlette's TestClient) with a fake
  detector that always finds ``[10, 10, 20, 20]``, so coordinate mapping is
  checked against hand-worked values;
- the REAL process (``python -m server.cloud``) on loopback, with an untrained
  YOLO11n written by ``save_weights``: health, detection on PNG/JPEG, crops,
  every 4xx path, the service surviving them, concurrency, the hard-sample
  store (trainable by Ultralytics) and TLS.

The untrained model gives a few detections only at very low confidence, so the
real service runs with ``--conf 0.001``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from common.cloud_api import RequestError
from common.config import RoutingConfig
from common.detections import Detections, yolo_label_lines
from common.offload import atlas_layout, to_frame_coords
from server.cloud import CloudService, Limits, create_app, crops_to_frame, detect_packed
from server.cloud_http import decode_image, image_header, parse_max_pixels, parse_multipart
from server.hard_samples import HardSampleStore

LABEL_CONF, ANSWER_CONF = RoutingConfig.label_conf, RoutingConfig.cloud_conf
from tests import REPO
from tests.deploy_helpers import free_port, stop_tree, tail

TOKEN = "s3cret-token"
NAMES = ["insulator", "bird_nest", "damper", "bolt", "crack", "rust", "vehicle", "person"]
PNG_BOMB = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (40000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00" \
    + b"\x00" * 4 + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def _jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _crop_files(meta, crops: list[bytes], kind: str = "image/png"):
    files = [("meta", (None, json.dumps(meta).encode(), "application/json"))]
    return files + [("crop", (f"{i}.png", data, kind)) for i, data in enumerate(crops)]


# =========================================================================== pure pieces


def test_image_header_reads_png_and_jpeg_sizes_without_decoding():
    # Prepare
    img = np.zeros((30, 70, 3), np.uint8)
    # Execute / Assert
    assert image_header(cv2.imencode(".png", img)[1].tobytes()) == ("png", 70, 30)
    assert image_header(_jpeg(img)) == ("jpeg", 70, 30)
    assert image_header(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()) == ("jpeg", 70, 30)
    assert image_header(PNG_BOMB) == ("png", 40000, 40000)  # 24 bytes read, nothing allocated
    for bad in (b"GIF89a....", b"\xff\xd8\xff\xe0\x00\x10JFIF", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(RequestError, match="cannot decode image") as err:
            image_header(bad)
        assert err.value.status == 400


def test_decode_image_refuses_a_bomb_before_decoding_and_corrupt_bytes():
    with pytest.raises(RequestError, match=r"40000x40000 = 1600000000 pixels") as err:
        decode_image(PNG_BOMB, parse_max_pixels("4096x4096"))
    assert err.value.status == 413
    good = _jpeg(np.full((20, 20, 3), 128, np.uint8))
    with pytest.raises(RequestError, match="cannot decode image") as err:
        decode_image(good[:len(good) // 2], 4096 * 4096)  # truncated
    assert err.value.status == 400
    fmt, img = decode_image(good, 400)  # exactly at the limit: 20*20 = 400
    assert fmt == "jpeg" and img.shape == (20, 20, 3)
    assert parse_max_pixels("4096x4096") == 16777216 and parse_max_pixels("1000") == 1000
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_max_pixels("big")


def test_crops_to_frame_hand_checked():
    # a crop at origin (100, 50) with a box [10, 10, 20, 20] -> [110, 60, 120, 70];
    # the same crop sent at 2x sees [20, 20, 40, 40] -> 20/2 + 100 = 110, ... -> the same box;
    # sx=2, sy=4 on [10, 10, 20, 20] at (0, 0) -> [5, 2.5, 10, 5]
    dets = [Detections([[10, 10, 20, 20]], [0.9], [3]), Detections([[20, 20, 40, 40]], [0.8], [1]),
            Detections([[10, 10, 20, 20]], [0.7], [2])]
    metas = [{"x0": 100, "y0": 50, "scale": 1.0}, {"x0": 100, "y0": 50, "scale": 2.0},
             {"x0": 0, "y0": 0, "scale": [2.0, 4.0]}]
    out = crops_to_frame(dets, metas)
    assert out[0].xyxy.tolist() == [[110, 60, 120, 70]] and out[0].cls.tolist() == [3]
    assert out[1].xyxy.tolist() == [[110, 60, 120, 70]]
    assert out[2].xyxy.tolist() == [[5, 2.5, 10, 5]]
    assert np.allclose(out[0].xyxy, to_frame_coords(dets[0], (100, 50)).xyxy)


def _white_boxes(images):
    """A fake detector: a class-0 box around each white (255) blob of each image; records the input sizes."""
    _white_boxes.sizes.append([im.shape[:2] for im in images])
    out = []
    for im in images:
        n, _, stats, _ = cv2.connectedComponentsWithStats((im[..., 0] == 255).astype(np.uint8))
        boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:n]]
        out.append(Detections(boxes, [0.9] * len(boxes), [0] * len(boxes)) if boxes else Detections.empty())
    return out


def test_detect_packed_keeps_each_crop_at_its_scale_and_maps_boxes_back():
    """Three crops with a white square each, packed onto one 64 px tile (one detector call); a 100 px crop
    goes alone. Each crop gets its own square back, in its own pixels."""
    crops = []
    for (h, w), (y, x, side) in zip([(20, 30), (24, 24), (16, 40), (100, 100)],
                                    [(2, 3, 5), (10, 4, 6), (5, 30, 4), (40, 50, 8)]):
        crop = np.full((h, w, 3), 60, np.uint8)
        crop[y:y + side, x:x + side] = 255
        crops.append((crop, [x, y, x + side, y + side]))
    _white_boxes.sizes = []

    found = detect_packed(_white_boxes, [c for c, _ in crops], 64)

    for dets, (_, box) in zip(found, crops):
        np.testing.assert_allclose(dets.xyxy, [box])
    # one call: one 64x64 tile holding the three small crops, then the large crop as it is
    assert _white_boxes.sizes == [[(64, 64), (100, 100)]]


def test_detect_packed_zoom_enlarges_crops_and_maps_boxes_back_to_crop_pixels():
    """crop_zoom 2: a 20x30 and a 24x24 crop reach the detector as 40x60 and 48x48 (packed onto one 128 px
    tile) and a 30x70 crop as 60x140, alone (wider than a tile); each white square comes back in its own
    crop's pixels (within the 1 px a bicubic edge blurs), clipped to the crop."""
    crops = []
    for (h, w), (y, x, side) in zip([(20, 30), (24, 24), (30, 70)], [(2, 3, 5), (10, 4, 6), (20, 60, 10)]):
        crop = np.full((h, w, 3), 60, np.uint8)
        crop[y:y + side, x:x + side] = 255
        crops.append((crop, [x, y, min(x + side, w), min(y + side, h)]))
    _white_boxes.sizes = []

    found = detect_packed(_white_boxes, [c for c, _ in crops], 128, zoom=2.0)

    for dets, (crop, box) in zip(found, crops):
        np.testing.assert_allclose(dets.xyxy, [box], atol=1.0)
        assert (dets.xyxy[:, 2] <= crop.shape[1]).all() and (dets.xyxy[:, 3] <= crop.shape[0]).all()
    assert _white_boxes.sizes == [[(128, 128), (60, 140)]]
    assert detect_packed(_white_boxes, [crops[0][0]], 128, zoom=1.0)[0].xyxy.tolist() == [[3, 2, 8, 7]]
    with pytest.raises(ValueError, match="zoom must be > 0, got 0"):
        detect_packed(_white_boxes, [crops[0][0]], 128, zoom=0)


def test_parse_multipart_is_byte_exact():
    # Prepare: binary payloads full of CR/LF and dashes, encoded by httpx itself
    payload = bytes(range(256)) * 3 + b"\r\n--\r\n\r\n"
    request = httpx.Request("POST", "http://x", files=[("meta", (None, b'{"a": 1}', "application/json")),
                                                       ("crop", ("a.png", payload, "image/png"))])
    body = request.read()
    boundary = request.headers["content-type"].split("boundary=")[1]
    # Execute
    parts = parse_multipart(body, boundary, max_parts=5)
    # Assert
    assert [(p.name, p.content_type) for p in parts] == [("meta", "application/json"), ("crop", "image/png")]
    assert parts[0].data == b'{"a": 1}' and parts[1].data == payload
    with pytest.raises(RequestError, match="more than 1 parts") as err:
        parse_multipart(body, boundary, max_parts=1)
    assert err.value.status == 413
    with pytest.raises(RequestError, match="boundary not found"):
        parse_multipart(b"junk", boundary, max_parts=5)


# =========================================================================== in-process app, fake detector


def _fake_detect(images):
    """Every image: one box [10, 10, 20, 20], class 3, confidence 0.9."""
    return [Detections([[10, 10, 20, 20]], [0.9], [3]) for _ in images]


class _InProcess:
    """A synchronous client for the ASGI app (httpx's ASGITransport, no server, no sockets)."""

    def __init__(self, app, headers):
        self.app, self.headers = app, headers

    def post(self, url, headers=None, **kwargs) -> httpx.Response:
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://cloud",
                                         headers=self.headers) as client:
                return await client.post(url, headers=headers, **kwargs)

        return asyncio.run(go())


@pytest.fixture
def app_client(tmp_path):
    store = HardSampleStore(tmp_path / "store", NAMES)
    service = CloudService(_fake_detect, arch="fake", names=NAMES, token=TOKEN, store=store,
                           limits=Limits(max_body_bytes=200_000, max_pixels=512 * 512, max_crops=4))
    yield _InProcess(create_app(service), {"Authorization": f"Bearer {TOKEN}", "X-Cedar-Site": "site-3"}), store
    service.executor.shutdown()


def test_crops_endpoint_maps_to_frame_and_stores_crop_labels(app_client):
    # Prepare: crop 0 (64x48) at (100, 50); crop 1 (32x32) at (0, 0) sent at 2x (a 16x16 region)
    client, store = app_client
    meta = {"crops": [{"x0": 100, "y0": 50}, {"x0": 0, "y0": 0, "scale": 2}]}
    # Execute
    r = client.post("/detect/crops", files=_crop_files(meta, [_png(48, 64), _png(32, 32, 1)]),
                    headers={"X-Cedar-Frame": "f7"})
    # Assert
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["crops"][0]["detections"] == [{"xyxy": [110.0, 60.0, 120.0, 70.0], "conf": 0.9, "cls": 3}]
    assert body["crops"][1]["detections"][0]["xyxy"] == [5.0, 5.0, 10.0, 10.0]  # 10/2 + 0, 20/2 + 0
    assert [c["width"] for c in body["crops"]] == [64, 32]
    assert sorted(d["xyxy"][0] for d in body["detections"]) == [5.0, 110.0]  # merged, no overlap
    # labels are in the stored crop's own pixels: [10, 10, 20, 20] on 64x48 -> cx 15/64, cy 15/48, w 10/64, h 10/48
    label = (store.root / "labels" / f"{body['crops'][0]['sample']}.txt").read_text()
    assert label == f"3 {15 / 64:.6f} {15 / 48:.6f} {10 / 64:.6f} {10 / 48:.6f}\n"
    index = [json.loads(line) for line in store.index.read_text().splitlines()]
    assert [(e["kind"], e["origin"], e["scale"], e["frame"], e["site"]) for e in index] == [
        ("crop", [100.0, 50.0], 1.0, "f7", "site-3"), ("crop", [0.0, 0.0], 2.0, "f7", "site-3")]
    assert index[0]["id"].startswith("site-3-f7-")


def test_keep_0_answers_without_storing_and_a_bad_keep_value_is_named(app_client):
    """A site scoring its own validation or test split sends X-Cedar-Keep: 0: the same answer, nothing stored."""
    client, store = app_client
    files = lambda: _crop_files({"crops": [{"x0": 100, "y0": 50}]}, [_png(48, 64)])  # noqa: E731
    frame = _png(48, 64)
    answers = [client.post("/detect/crops", files=files(), headers={"X-Cedar-Keep": "0"}),
               client.post("/detect", content=frame, headers={"Content-Type": "image/png", "X-Cedar-Keep": "0"})]
    assert [r.status_code for r in answers] == [200, 200]
    assert answers[0].json()["crops"][0]["sample"] is None and answers[1].json()["sample"] is None
    assert not store.index.exists() or store.index.read_text() == ""
    assert not list((store.root / "images").glob("*"))
    kept = client.post("/detect/crops", files=files(), headers={"X-Cedar-Keep": "1"})
    assert kept.json()["crops"][0]["detections"] == answers[0].json()["crops"][0]["detections"]
    assert len(store.index.read_text().splitlines()) == 1  # "1" (and no header) keeps it
    r = client.post("/detect/crops", files=files(), headers={"X-Cedar-Keep": "no"})
    assert r.status_code == 400 and "X-Cedar-Keep 'no'" in r.json()["detail"]


def test_store_labels_only_boxes_at_or_above_label_conf(tmp_path):
    """The answer has every box the detector returned (from --conf on); the hard-sample store's labels only
    those at >= label_conf (default routing.label_conf 0.25), since cloud->edge KD trains on them."""
    def detect(images):
        return [Detections([[10, 10, 20, 20], [30, 30, 40, 40], [50, 50, 60, 60]], [0.9, 0.25, 0.2], [3, 1, 2])
                for _ in images]

    labels = {}
    for label_conf in (LABEL_CONF, 0.0):
        store = HardSampleStore(tmp_path / f"store-{label_conf}", NAMES)
        service = CloudService(detect, arch="fake", names=NAMES, token=TOKEN, store=store, label_conf=label_conf)
        client = _InProcess(create_app(service), {"Authorization": f"Bearer {TOKEN}", "X-Cedar-Site": "site-3"})
        r = client.post("/detect", content=_png(100, 100), headers={"Content-Type": "image/png"})
        service.executor.shutdown()
        assert r.status_code == 200, r.text
        assert [d["conf"] for d in r.json()["detections"]] == [0.9, 0.25, 0.2]
        labels[label_conf] = (store.root / "labels" / f"{r.json()['sample']}.txt").read_text().splitlines()
    assert LABEL_CONF == 0.25 and ANSWER_CONF < LABEL_CONF
    assert [ln.split()[0] for ln in labels[LABEL_CONF]] == ["3", "1"]  # 0.2 < 0.25 is answered, not stored
    assert [ln.split()[0] for ln in labels[0.0]] == ["3", "1", "2"]


def test_atlas_crops_are_cut_detected_mapped_and_stored_as_png(tmp_path):
    """Two crops of a frame with a white square each, on one atlas at the cells atlas_layout gives:
    each square comes back in frame pixels, as it would from separate crops, and each crop is stored alone."""
    # Prepare: frame 120x160; squares at [20,15,30,25] and [110,70,118,78]; regions around them
    frame = np.full((120, 160, 3), 60, np.uint8)
    frame[15:25, 20:30] = 255
    frame[70:78, 110:118] = 255
    regions = [[10, 10, 50, 40], [100, 60, 140, 100]]
    corners, (width, height) = atlas_layout([(x2 - x1, y2 - y1) for x1, y1, x2, y2 in regions])
    atlas = np.full((height, width, 3), 114, np.uint8)
    for (x1, y1, x2, y2), (ax, ay) in zip(regions, corners.tolist()):
        atlas[ay:ay + y2 - y1, ax:ax + x2 - x1] = frame[y1:y2, x1:x2]
    meta = {"crops": [{"x0": x1, "y0": y1, "ax": ax, "ay": ay, "width": x2 - x1, "height": y2 - y1}
                      for (x1, y1, x2, y2), (ax, ay) in zip(regions, corners.tolist())]}
    files = [("meta", (None, json.dumps(meta).encode(), "application/json")),
             ("atlas", ("atlas.png", cv2.imencode(".png", atlas)[1].tobytes(), "image/png"))]
    store = HardSampleStore(tmp_path / "store", NAMES)
    _white_boxes.sizes = []
    service = CloudService(_white_boxes, arch="fake", names=NAMES, token=TOKEN, store=store,
                           limits=Limits(max_crops=2))
    client = _InProcess(create_app(service), {"Authorization": f"Bearer {TOKEN}", "X-Cedar-Site": "site-1"})
    # Execute
    r = client.post("/detect/crops", files=files)
    # Assert
    assert r.status_code == 200, r.text
    body = r.json()
    assert _white_boxes.sizes == [[(30, 40), (40, 40)]]  # the detector saw the two crops, not the atlas
    assert sorted(d["xyxy"] for d in body["detections"]) == [[20, 15, 30, 25], [110, 70, 118, 78]]
    assert [(c["width"], c["height"], c["ax"]) for c in body["crops"]] == [(40, 30, 0), (40, 40, corners[1, 0])]
    stored = [cv2.imread(str(store.root / "images" / f"{c['sample']}.png")) for c in body["crops"]]
    assert all(np.array_equal(img, frame[y1:y2, x1:x2]) for img, (x1, y1, x2, y2) in zip(stored, regions))
    # bad atlas requests: named, 4xx, and the service keeps serving
    outside = {"crops": [{**meta["crops"][0], "ax": width - 8}]}
    bad = {
        "outside the": [("meta", (None, json.dumps(outside).encode(), "application/json")), files[1]],
        "either 'crop' parts or one 'atlas'": [*files, ("crop", ("0.png", _png(), "image/png"))],
        "limit is 2 \\(--max-crops\\)": [("meta", (None, json.dumps({"crops": meta["crops"] * 2}).encode(),
                                               "application/json")), files[1]],
        "atlas: cannot decode": [files[0], ("atlas", ("a.jpg", b"\xff\xd8\xff\xe0junk", "image/jpeg"))],
    }
    for message, body_files in bad.items():
        r = client.post("/detect/crops", files=body_files)
        assert 400 <= r.status_code < 500 and re.search(message, r.json()["detail"]), (message, r.text)
    assert client.post("/detect/crops", files=files).status_code == 200
    service.executor.shutdown()


def test_in_process_errors_and_limits(app_client):
    client, _ = app_client
    assert client.post("/detect/crops", files=_crop_files({"crops": [{"x0": 1}]}, [_png()])).status_code == 422
    five = _crop_files({"crops": [{"x0": 0, "y0": 0}] * 5}, [_png(8, 8)] * 5)
    r = client.post("/detect/crops", files=five)
    assert r.status_code == 413 and "more than 5 parts" in r.json()["detail"] and "--max-crops" in r.json()["detail"]
    r = client.post("/detect/crops", files=_crop_files({"crops": [{"x0": 0, "y0": 0}]}, [b"GIF89a"], "image/gif"))
    assert r.status_code == 415 and "image/gif" in r.json()["detail"]
    r = client.post("/detect/crops", content=_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 415
    flat = cv2.imencode(".png", np.zeros((600, 600, 3), np.uint8))[1].tobytes()  # small file, many pixels
    r = client.post("/detect", content=flat, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "600x600" in r.json()["detail"]
    r = client.post("/detect", files={"image": ("x.png", _png(), "image/png")})
    assert r.status_code == 200 and r.json()["detections"][0]["xyxy"] == [10.0, 10.0, 20.0, 20.0]


def test_store_refuses_a_folder_made_for_other_classes(tmp_path):
    from server.cloud import StoreError

    HardSampleStore(tmp_path, NAMES)
    HardSampleStore(tmp_path, NAMES)  # same classes: fine
    with pytest.raises(StoreError, match="other classes|not this model"):
        HardSampleStore(tmp_path, ["a", "b"])


# =========================================================================== the real process


def _start(tmp: Path, name: str, weights: Path, store: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = tmp / f"{name}.log"
    args = [sys.executable, "-m", "server.cloud", "--weights", str(weights), "--host", "127.0.0.1",
            "--port", str(port), "--token-file", str(tmp / "token"), "--store", str(store), "--imgsz", "128",
            "--conf", "0.001", "--label-conf", "0", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO)
    return proc, f"127.0.0.1:{port}", log_path


def _wait_healthy(proc, url: str, log_path: Path, verify=True, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"cloud service exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", verify=verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"cloud service not healthy after {timeout:.0f}s:\n{tail(log_path)}")


def _stop(proc: subprocess.Popen, log_path: Path) -> None:
    stop_tree(proc, timeout=15)
    assert proc.poll() is not None, f"cloud service still running:\n{tail(log_path)}"


@pytest.fixture(scope="module")
def cloud_weights(tmp_path_factory) -> Path:
    from common import yolo

    model = yolo.build_model("yolo11n", len(NAMES), names=NAMES)  # untrained is fine
    return yolo.save_weights(model, tmp_path_factory.mktemp("cloud-weights") / "cloud.pt")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, cloud_weights):
    """One real service (1 MiB body limit, 512x512 pixel limit) shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cloud-service")
    (tmp / "token").write_text(TOKEN + "\n")
    store = tmp / "store"
    proc, address, log_path = _start(tmp, "cloud", cloud_weights, store, "--max-body-mb", "1",
                                     "--max-pixels", "512x512")
    url = f"http://{address}"
    try:
        _wait_healthy(proc, url, log_path)
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}", "X-Cedar-Site": "site-0"}) as client:
            yield {"proc": proc, "url": url, "client": client, "store": store, "log": log_path}
    finally:
        _stop(proc, log_path)


@pytest.fixture(scope="module")
def frame_png(tiny_benchmark) -> bytes:
    path = sorted((tiny_benchmark.site_dir(0) / "images" / "test").glob("*.png"))[0]
    return path.read_bytes()


def _check_detections(items, width, height):
    for d in items:
        assert set(d) == {"xyxy", "conf", "cls"}
        x1, y1, x2, y2 = d["xyxy"]
        assert -1 <= x1 <= x2 <= width + 1 and -1 <= y1 <= y2 <= height + 1
        assert 0 <= d["conf"] <= 1 and 0 <= d["cls"] < len(NAMES)
    Detections.from_list(items)  # the client-side type reads it back


def test_health_names_the_model_and_classes(cloud):
    r = httpx.get(f"{cloud['url']}/health")  # no token needed
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "yolo11n" and body["classes"] == NAMES
    assert isinstance(body["served"], int) and body["crop_zoom"] == 2.0  # routing.crop_zoom
    assert body["label_conf"] == 0.0  # the fixture's --label-conf


def test_detect_png_and_jpeg_frames_and_store_them(cloud, frame_png):
    # Prepare
    client, store = cloud["client"], cloud["store"]
    image = cv2.imdecode(np.frombuffer(frame_png, np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    served = httpx.get(f"{cloud['url']}/health").json()["served"]
    # Execute
    r_png = client.post("/detect", content=frame_png, headers={"Content-Type": "image/png", "X-Cedar-Frame": "11"})
    r_jpg = client.post("/detect", content=_jpeg(image), headers={"Content-Type": "image/jpeg", "X-Cedar-Frame": "12"})
    r_multi = client.post("/detect", files={"image": ("f.jpg", _jpeg(image), "image/jpeg")})
    # Assert
    for r in (r_png, r_jpg, r_multi):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"], body["model"], body["site"]) == (w, h, "yolo11n", "site-0")
        _check_detections(body["detections"], w, h)
    assert r_png.json()["frame"] == "11" and r_multi.json()["frame"] is None
    assert httpx.get(f"{cloud['url']}/health").json()["served"] == served + 3
    # the untrained model at --conf 0.001 finds a few (deterministic) boxes: the labels must say the same
    dets = Detections.from_list(r_png.json()["detections"])
    assert len(dets) > 0
    sample = r_png.json()["sample"]
    assert sample.startswith("site-0-11-")
    stored = store / "images" / f"{sample}.png"
    assert stored.read_bytes() == frame_png  # kept exactly as uploaded
    assert (store / "images" / f"{r_jpg.json()['sample']}.jpg").is_file()
    lines = (store / "labels" / f"{sample}.txt").read_text().splitlines()
    assert lines == yolo_label_lines(dets.xyxy, dets.cls, w, h)
    index = {e["id"]: e for e in map(json.loads, (store / "index.jsonl").read_text().splitlines())}
    assert index[sample]["site"] == "site-0" and index[sample]["frame"] == "11"
    assert index[sample]["kind"] == "frame" and index[sample]["detections"] == len(lines)
    assert (index[sample]["width"], index[sample]["height"]) == (w, h)


def test_crops_are_mapped_to_frame_coordinates(cloud, frame_png):
    # Prepare: two crops of the frame, at (100, 50)-ish and (0, 0) sent at 2x
    client, store = cloud["client"], cloud["store"]
    frame = cv2.imdecode(np.frombuffer(frame_png, np.uint8), cv2.IMREAD_COLOR)
    crop0 = frame[50:114, 60:124]  # origin (60, 50), 64x64
    crop1 = cv2.resize(frame[0:40, 0:40], (80, 80))  # origin (0, 0), scale 2
    meta = {"crops": [{"x0": 60, "y0": 50}, {"x0": 0, "y0": 0, "scale": 2.0}]}
    files = _crop_files(meta, [cv2.imencode(".png", crop0)[1].tobytes(), _jpeg(crop1)])
    files[2] = ("crop", ("1.jpg", files[2][1][1], "image/jpeg"))
    # Execute
    r = client.post("/detect/crops", files=files, headers={"X-Cedar-Frame": "crops-1"})
    # Assert
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(c["x0"], c["y0"], c["scale"], c["width"], c["height"]) for c in body["crops"]] == [
        (60, 50, 1.0, 64, 64), (0, 0, 2.0, 80, 80)]
    index = {e["id"]: e for e in map(json.loads, (store / "index.jsonl").read_text().splitlines())}
    n_checked = 0
    for crop in body["crops"]:
        entry = index[crop["sample"]]
        assert entry["kind"] == "crop" and entry["origin"] == [crop["x0"], crop["y0"]]
        # stored labels are in crop pixels: map them to the frame by hand and find them in the answer
        answer = np.array([d["xyxy"] for d in crop["detections"]]).reshape(-1, 4)
        s = crop["scale"]
        for line in (store / "labels" / f"{crop['sample']}.txt").read_text().splitlines():
            _, cx, cy, bw, bh = map(float, line.split())
            cx, cy, bw, bh = cx * crop["width"], cy * crop["height"], bw * crop["width"], bh * crop["height"]
            expected = np.array([(cx - bw / 2) / s + crop["x0"], (cy - bh / 2) / s + crop["y0"],
                                 (cx + bw / 2) / s + crop["x0"], (cy + bh / 2) / s + crop["y0"]])
            assert np.abs(answer - expected).max(axis=1).min() < 0.01 * crop["width"], (expected, answer)
            n_checked += 1
    assert n_checked > 0
    merged = np.array([d["xyxy"] for d in body["detections"]]).reshape(-1, 4)
    assert 0 < len(merged) <= sum(len(c["detections"]) for c in body["crops"])


def test_bad_requests_get_clear_4xx_and_the_service_keeps_serving(cloud, frame_png):
    client, url = cloud["client"], cloud["url"]
    png = {"Content-Type": "image/png"}
    jpg = {"Content-Type": "image/jpeg"}

    def check(r, status, text):
        assert r.status_code == status, (r.status_code, r.text)
        assert text in r.json()["detail"], r.json()

    good_jpeg = _jpeg(np.full((32, 32, 3), 90, np.uint8))
    check(client.post("/detect", content=good_jpeg[:20] + b"\x00" * 300, headers=jpg), 400, "cannot decode image")
    check(client.post("/detect", content=good_jpeg[: len(good_jpeg) // 2], headers=jpg), 400, "cannot decode image")
    check(client.post("/detect", content=b"\x00" * 100, headers=png), 400, "not a JPEG or PNG")
    check(client.post("/detect", content=PNG_BOMB, headers=png), 413, "40000x40000")
    check(client.post("/detect", content=b"x" * (1024 * 1024 + 1), headers=png), 413, "over the limit")

    def stream():  # no Content-Length: counted while it streams in
        for _ in range(40):
            yield b"\x89PNG" + b"\x00" * 65532

    check(client.post("/detect", content=stream(), headers=png), 413, "stopped reading")
    check(client.post("/detect", content=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain")
    check(client.post("/detect", content=b"GIF89a", headers={"Content-Type": "image/gif"}), 415, "image/gif")
    check(httpx.post(f"{url}/detect", content=frame_png, headers={**png, "X-Cedar-Site": "s"}), 401, "missing bearer")
    check(httpx.post(f"{url}/detect", content=frame_png, headers={**png, "X-Cedar-Site": "s",
                                                                   "Authorization": "Bearer nope"}), 401, "invalid")
    check(client.post("/detect", content=frame_png, headers={**png, "X-Cedar-Site": "../etc"}), 400, "X-Cedar-Site")
    check(client.post("/detect", content=frame_png, headers={**png, "X-Cedar-Site": "a" * 65}), 400, "X-Cedar-Site")
    check(client.post("/detect", content=frame_png, headers={**png, "X-Cedar-Frame": "a b"}), 400, "X-Cedar-Frame")
    bad_meta = _crop_files({"crops": [{"x0": 10, "y0": "top"}]}, [frame_png])
    check(client.post("/detect/crops", files=bad_meta), 422, "meta.crops[0].y0")
    check(client.post("/detect/crops", files=_crop_files({"crops": [{"x0": 1, "y0": 1}]}, [PNG_BOMB])), 413,
          "crop 0")
    # Assert: still alive, still answering
    assert cloud["proc"].poll() is None
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = client.post("/detect", content=frame_png, headers=png)
    assert r.status_code == 200 and "detections" in r.json()


def test_concurrent_requests_get_unique_samples(cloud, frame_png):
    client, store = cloud["client"], cloud["store"]
    before = len((store / "index.jsonl").read_text().splitlines()) if (store / "index.jsonl").exists() else 0

    def one(i):
        return client.post("/detect", content=frame_png,
                           headers={"Content-Type": "image/png", "X-Cedar-Site": f"site-{i % 2}",
                                    "X-Cedar-Frame": "same"})

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(one, range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    assert len({r.json()["detections"].__repr__() for r in replies}) == 1  # same image, same answer
    samples = {r.json()["sample"] for r in replies}
    assert len(samples) == 6
    assert len((store / "index.jsonl").read_text().splitlines()) == before + 6


def test_hard_sample_store_is_a_trainable_yolo_dataset(cloud, frame_png):
    # Prepare: at least one sample in the store
    client, store = cloud["client"], cloud["store"]
    assert client.post("/detect", content=frame_png, headers={"Content-Type": "image/png"}).status_code == 200
    from ultralytics.data.utils import check_det_dataset

    from common import yolo  # noqa: F401  (makes Ultralytics offline first)

    # Execute
    data = check_det_dataset(str(store / "data.yaml"))
    # Assert
    assert "download" not in (store / "data.yaml").read_text()
    assert data["nc"] == len(NAMES) and [data["names"][i] for i in range(len(NAMES))] == NAMES
    entries = [json.loads(line) for line in (store / "index.jsonl").read_text().splitlines()]
    images = sorted(p for p in (store / "images").iterdir() if not p.name.startswith("."))
    assert len(entries) == len(images) > 0
    assert not [p for p in (store / "images").iterdir() if p.name.startswith(".")]  # no temp files left
    for e in entries:
        assert set(e) >= {"id", "site", "frame", "time", "kind", "origin", "detections"}
        img = cv2.imread(str(store / e["image"]))
        assert img is not None and img.shape[:2] == (e["height"], e["width"])
        lines = (store / e["label"]).read_text().splitlines()
        assert len(lines) == e["detections"]
        for line in lines:
            k, *xywh = line.split()
            assert 0 <= int(k) < len(NAMES) and len(xywh) == 4
            assert all(0 <= float(v) <= 1 for v in xywh)


# --------------------------------------------------------------------------- TLS


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp / "cert.pem", tmp / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def test_tls_mode(tmp_path, cloud_weights, frame_png):
    # Prepare
    (tmp_path / "token").write_text(TOKEN)
    certfile, keyfile = _self_signed(tmp_path)
    proc, address, log_path = _start(tmp_path, "cloud-tls", cloud_weights, tmp_path / "store",
                                     "--certfile", str(certfile), "--keyfile", str(keyfile))
    verify = ssl.create_default_context(cafile=str(certfile))
    try:
        _wait_healthy(proc, f"https://{address}", log_path, verify=verify)
        # Execute
        r = httpx.post(f"https://{address}/detect", content=frame_png, verify=verify, timeout=60,
                       headers={"Content-Type": "image/png", "X-Cedar-Site": "site-1",
                                "Authorization": f"Bearer {TOKEN}"})
        # Assert
        assert r.status_code == 200, r.text
        assert r.json()["site"] == "site-1"
        with pytest.raises(httpx.ConnectError):  # an unverified server is refused by default
            httpx.get(f"https://{address}/health", timeout=5)
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer
            httpx.get(f"http://{address}/health", timeout=5)
        assert proc.poll() is None
    finally:
        _stop(proc, log_path)
