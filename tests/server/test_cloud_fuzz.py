"""A property-based fuzz of the cloud service's HTTP API (server/cloud.py), in-process.

Hypothesis generates requests (paths, methods, auth and id headers, content types,
raw bodies, hand-built multipart bodies with ``meta``/``crop``/``atlas``/``image``
parts, meta JSON from valid to hostile, real and mutated PNG/JPEG bytes) and sends
them to the ASGI app (Starlette's TestClient) with a fake detector and a real
hard-sample store. The property: no answer is in the 5xx range, every 4xx carries a
``detail`` message, and ``/health`` answers after every request.

The default suite runs a short, derandomized fuzz; the ``slow`` one sends >= 1,000.
"""

from __future__ import annotations

import asyncio
import json

import cv2
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.detections import Detections
from server.cloud import CloudService, Limits, create_app
from server.hard_samples import HardSampleStore

TOKEN = "fuzz-token"
NAMES = ["a", "b", "c"]
PNG = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))[1].tobytes()
JPEG = cv2.imencode(".jpg", np.full((40, 40, 3), 120, np.uint8))[1].tobytes()
# a PNG header claiming 40000x40000 (a decompression bomb, refused from its header)
BOMB = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + (40000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"


def _fake_detect(images):
    return [Detections([[2, 2, 12, 12]], [0.9], [1]) for _ in images]


# --------------------------------------------------------------------------- strategies

text_ascii = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=90)
# header values as bytes: anything but CR, LF and NUL (what an HTTP client can put on the wire)
header_bytes = st.binary(max_size=90).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))
ids = st.one_of(st.sampled_from(["site-0", "s.1", "a" * 64, "a" * 65, "../etc", "", " x", "ok_1-2.3"]), text_ascii)


@st.composite
def images(draw) -> bytes:
    """A real PNG/JPEG, a truncated or bit-flipped one, a bomb header, or random bytes."""
    base = draw(st.sampled_from([PNG, JPEG, BOMB]))
    how = draw(st.sampled_from(["as is", "truncate", "flip", "random", "signature + junk"]))
    if how == "truncate":
        return base[:draw(st.integers(0, len(base)))]
    if how == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "signature + junk":
        return base[:draw(st.integers(2, 30))] + draw(st.binary(max_size=200))
    return base


numbers = st.one_of(st.integers(-10, 2000), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.just(10 ** 400), st.booleans(), text_ascii, st.none())
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text_ascii),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(text_ascii, inner, max_size=4)), max_leaves=20)


@st.composite
def metas(draw) -> bytes:
    """The ``meta`` part: a plausible crop list with hostile values, arbitrary JSON, deep nesting, or junk bytes."""
    kind = draw(st.sampled_from(["crops", "crops", "json", "deep", "bytes", "big int"]))
    if kind == "crops":
        keys = st.sampled_from(["x0", "y0", "scale", "ax", "ay", "width", "height", "zoom"])
        item = st.dictionaries(keys, st.one_of(numbers, st.lists(numbers, max_size=3)), max_size=7)
        plausible = st.fixed_dictionaries({"x0": st.integers(0, 500), "y0": st.integers(0, 500),
                                           "ax": st.integers(0, 40), "ay": st.integers(0, 40),
                                           "width": st.integers(1, 40), "height": st.integers(1, 40)})
        crops = draw(st.lists(st.one_of(item, plausible, numbers), max_size=6))
        meta = {"crops": crops} if draw(st.booleans()) else draw(st.sampled_from([crops, {"crops": {}}, "crops"]))
        return json.dumps(meta, allow_nan=True).encode()
    if kind == "json":
        return json.dumps(draw(json_values), allow_nan=True).encode()
    if kind == "deep":
        n = draw(st.integers(5, 50_000))
        return b'{"crops": ' + b"[" * n + b"]" * draw(st.integers(0, n)) + b"}"
    if kind == "big int":
        return b'{"crops": [{"x0": ' + b"7" * draw(st.integers(1, 6000)) + b', "y0": 0}]}'
    return draw(st.binary(max_size=200))


part_types = st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "", "image/gif",
                              "application/json", "text/plain; charset=utf-8"])


@st.composite
def multipart(draw) -> tuple[bytes, str]:
    """A hand-built multipart body (so it can be malformed) and its Content-Type header."""
    boundary = draw(st.one_of(st.just("b0undary"), st.text(st.characters(min_codepoint=39, max_codepoint=122),
                                                           min_size=1, max_size=80)))
    parts = []
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.one_of(st.sampled_from(["meta", "crop", "atlas", "image"]), text_ascii))
        data = draw(metas()) if name == "meta" else draw(images())
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            disposition += '; filename="x.png"'
        headers = [f"Content-Disposition: {disposition}"]
        if (ctype := draw(part_types)) or draw(st.booleans()):
            headers.append(f"Content-Type: {ctype}")
        if draw(st.integers(0, 9)) == 0:
            headers = [draw(text_ascii)]  # garbage headers
        parts.append("\r\n".join(headers).encode("latin-1") + b"\r\n\r\n" + data)
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    ending = draw(st.sampled_from(["close", "close", "none", "truncate"]))
    if ending == "close":
        body += b"--" + boundary.encode() + b"--\r\n"
    elif ending == "truncate":
        body = body[:draw(st.integers(0, len(body)))]
    param = draw(st.sampled_from([f'boundary="{boundary}"', f"boundary={boundary}", "", "boundary=",
                                  f"boundary*=utf-8''{boundary}", f"boundary={boundary}; boundary=x"]))
    return body, f"multipart/form-data; {param}"


@st.composite
def plausible(draw) -> dict:
    """A well-formed request (a frame, crops or an atlas) with values drawn near and over the limits."""
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Cedar-Site": draw(st.sampled_from(["site-0", "s.1"]))}
    if draw(st.booleans()):
        headers["X-Cedar-Frame"] = draw(st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
    kind = draw(st.sampled_from(["frame", "crops", "atlas"]))
    if kind == "frame":
        return {"method": "POST", "url": "/detect", "content": draw(st.sampled_from([PNG, JPEG])),
                "headers": {**headers, "Content-Type": "image/png"}}
    n = draw(st.integers(1, 5))
    crops = [{"x0": draw(st.integers(0, 1_000_001)), "y0": draw(st.floats(0, 1e4)),
              "scale": draw(st.one_of(st.floats(0.5, 4), st.lists(st.floats(0.5, 4), min_size=2, max_size=2)))}
             for _ in range(n)]
    if kind == "atlas":
        crops = [{**c, "ax": draw(st.integers(0, 30)), "ay": draw(st.integers(0, 20)), "width": draw(st.integers(1, 8)),
                  "height": draw(st.integers(1, 8))} for c in crops]
        files = [("atlas", ("a.png", PNG, "image/png"))]
    else:
        files = [("crop", (f"{i}.jpg", draw(st.sampled_from([PNG, JPEG])), "image/jpeg")) for i in range(n)]
    files = [("meta", (None, json.dumps({"crops": crops}).encode(), "application/json")), *files]
    return {"method": "POST", "url": "/detect/crops", "headers": headers, "files": files}


@st.composite
def hostile(draw) -> dict:
    path = draw(st.sampled_from(["/detect", "/detect/crops", "/detect/crops", "/health", "/nope", "/detect/"]))
    method = draw(st.sampled_from(["POST"] * 12 + ["GET", "PUT"]))
    headers: dict[str, bytes | str] = {}
    auth = draw(st.sampled_from(["good"] * 7 + ["none", "wrong", "junk"]))
    if auth != "none":
        headers["Authorization"] = {"good": f"Bearer {TOKEN}", "wrong": "Bearer nope"}.get(auth) \
            or draw(header_bytes)
    if draw(st.integers(0, 9)):
        headers["X-Cedar-Site"] = draw(st.one_of(ids, header_bytes)) if draw(st.integers(0, 3)) == 0 else "site-1"
    if draw(st.booleans()):
        headers["X-Cedar-Frame"] = draw(st.one_of(ids, header_bytes))
    if draw(st.booleans()) or path != "/detect":
        body, headers["Content-Type"] = draw(multipart())
    else:
        body = draw(images())
        headers["Content-Type"] = draw(st.one_of(st.sampled_from(["image/png", "image/jpeg", "image/gif", ""]),
                                                 header_bytes))
    if draw(st.integers(0, 19)) == 0:
        headers["Content-Type"] = draw(header_bytes)
    return {"method": method, "url": path, "headers": headers, "content": body}


requests = st.one_of(plausible(), hostile(), hostile())


# --------------------------------------------------------------------------- the property


class _Client:
    """A synchronous client of the ASGI app: httpx's ASGITransport on one event loop (no server, no sockets)."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                        base_url="http://cloud")

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, url, **kwargs))

    def get(self, url: str) -> httpx.Response:
        return self.request("GET", url)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    store = HardSampleStore(tmp_path_factory.mktemp("fuzz") / "store", NAMES)
    service = CloudService(_fake_detect, arch="fake", names=NAMES, token=TOKEN, store=store,
                           limits=Limits(max_body_bytes=64 * 1024, max_pixels=256 * 256, max_crops=4))
    client = _Client(create_app(service))
    yield client, {"sent": 0, "status": {}}
    client.close()
    service.executor.shutdown()


def _fuzz(fuzz_app, request: dict) -> None:
    client, tally = fuzz_app
    r = client.request(**request)
    tally["sent"] += 1
    tally["status"][r.status_code] = tally["status"].get(r.status_code, 0) + 1
    assert r.status_code < 500, (request["method"], request["url"], request["headers"], r.text)
    if r.status_code >= 400 and r.status_code not in (404, 405):  # the service's own errors name the problem
        assert r.json()["detail"], r.text
    assert client.get("/health").json()["status"] == "ok"


_SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@settings(max_examples=60, derandomize=True, **_SETTINGS)
@given(request=requests)
def test_fuzzed_requests_never_get_a_5xx(fuzz_app, request):
    _fuzz(fuzz_app, request)


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx_at_scale(fuzz_app):
    _, tally = fuzz_app
    sent = tally["sent"]
    settings(max_examples=1200, **_SETTINGS)(given(request=requests)(lambda request: _fuzz(fuzz_app, request)))()
    assert tally["sent"] - sent >= 1000 and not [s for s in tally["status"] if s >= 500], tally
    print(f"fuzz: {tally['sent'] - sent} requests, answers by status {dict(sorted(tally['status'].items()))}")


def test_the_fuzz_reached_every_kind_of_answer(fuzz_app):
    """Runs after the fuzz above (file order): it sent its requests and got 200s and several 4xx kinds."""
    _, tally = fuzz_app
    assert tally["sent"] >= 60, tally
    assert not [s for s in tally["status"] if s >= 500], tally
    assert tally["status"].get(200, 0) > 0 and len([s for s in tally["status"] if 400 <= s < 500]) >= 4, tally
    print(f"fuzz: {tally['sent']} requests, answers by status {dict(sorted(tally['status'].items()))}")
