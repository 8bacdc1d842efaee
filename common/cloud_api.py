"""The cloud detection service's HTTP API, shared by the edge (client) and the service.

One definition of what goes over the wire (the service's endpoints are described in
:mod:`server.cloud`):

- paths :data:`DETECT_PATH` (one frame) and :data:`CROPS_PATH` (regions of one frame);
- headers :data:`SITE_HEADER` (required) and :data:`FRAME_HEADER` (optional), whose
  values follow :data:`ID_PATTERN`; :func:`check_ids` is the service's check,
  :func:`offload_id` and :func:`frame_tag` build the edge's values; :data:`KEEP_HEADER`
  (optional, ``1`` by default): ``0`` asks for an answer without keeping the upload as a
  hard sample (a site scoring its own validation or test split; :func:`check_keep`);
- the crop metadata part ``meta`` of ``/detect/crops``: :func:`encode_crop_meta` (edge)
  and :func:`parse_crop_meta` (service); with an atlas each crop also names its cell
  (:data:`ATLAS_FIELDS`).

A bad value raises :class:`RequestError` with the HTTP status the service answers and a
message naming the value. Pure: json, re only.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

DETECT_PATH = "/detect"
CROPS_PATH = "/detect/crops"
SITE_HEADER = "X-Cedar-Site"
FRAME_HEADER = "X-Cedar-Frame"
KEEP_HEADER = "X-Cedar-Keep"
#: what the service accepts in :data:`SITE_HEADER` and :data:`FRAME_HEADER`
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ID_RULE = "[A-Za-z0-9_.-]{1,64}"
#: an edge run's id: no dots, so ``<site>.<run>.<frame>`` splits back unambiguously
RUN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,40}")
#: with an atlas, each crop's cell on it: ``atlas[ay:ay + height, ax:ax + width]``
ATLAS_FIELDS = ("ax", "ay", "width", "height")
#: bounds on the ``meta`` part, checked before it is decoded: bytes, bracket nesting (a valid meta nests 4 deep:
#: object, crops list, crop object, scale list), frame coordinates (pixels) and scale factors
META_MAX_BYTES = 256 * 1024
META_MAX_DEPTH = 8
MAX_COORD = 1_000_000
SCALE_RANGE = (1e-3, 1e3)


class RequestError(Exception):
    """A client error: HTTP ``status`` and a message naming the bad value."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def show(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters (never echo a whole hostile header back)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- ids


def frame_tag(run: str, frame: int) -> str:
    """:data:`FRAME_HEADER` of an edge offload: ``<run>.<frame:06d>``."""
    return f"{run}.{frame:06d}"


def offload_id(site: str, run: str, frame: int) -> str:
    """An edge offload's id, ``<site>.<run>.<frame:06d>``: the hard samples it leaves are ``<site>-<tag>-<n>``."""
    return f"{site}.{frame_tag(run, frame)}"


def check_keep(value: str | None) -> bool:
    """:data:`KEEP_HEADER`: absent or ``1``: the upload may become a hard sample; ``0``: answer only. 400 if other."""
    if value is None or value == "1":
        return True
    if value == "0":
        return False
    raise RequestError(400, f"bad {KEEP_HEADER} {show(value)}: must be 0 or 1")


def check_ids(site: str | None, frame: str | None) -> tuple[str, str | None]:
    """The service's check of :data:`SITE_HEADER` (required) and :data:`FRAME_HEADER` (optional); 400 if bad."""
    if site is None:
        raise RequestError(400, f"missing header {SITE_HEADER} (the sending site's id)")
    if not ID_PATTERN.fullmatch(site):
        raise RequestError(400, f"bad {SITE_HEADER} {show(site)}: must match {ID_RULE}")
    if frame is not None and not ID_PATTERN.fullmatch(frame):
        raise RequestError(400, f"bad {FRAME_HEADER} {show(frame)}: must match {ID_RULE}")
    return site, frame


# --------------------------------------------------------------------------- crop metadata


def encode_crop_meta(regions: Sequence[Sequence[int]], atlas: Sequence[Sequence[int]] | None = None) -> bytes:
    """The ``meta`` part for crops cut at ``regions`` (frame pixels ``x1, y1, x2, y2``), sent at scale 1.

    ``atlas``: each crop's top-left corner ``(ax, ay)`` on the one atlas image (then each
    item also carries its cell). Example: region ``[10, 20, 42, 52]`` at atlas corner
    ``(0, 16)`` -> ``{"crops": [{"x0": 10, "y0": 20, "ax": 0, "ay": 16, "width": 32, "height": 32}]}``.
    """
    crops = [{"x0": int(r[0]), "y0": int(r[1])} for r in regions]
    if atlas is not None:
        crops = [{**c, "ax": int(ax), "ay": int(ay), "width": int(r[2] - r[0]), "height": int(r[3] - r[1])}
                 for c, (ax, ay), r in zip(crops, atlas, regions, strict=True)]
    return json.dumps({"crops": crops}).encode()


def _number(value: Any, field: str, low: float, high: float) -> float:
    # bounds compared before any float conversion: a 400-digit integer is out of range, not an overflow
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(422, f"{field} must be a number in [{low:g}, {high:g}], got {show(value)}")
    return float(value)


def _pixels(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= MAX_COORD \
            or value != int(value):
        raise RequestError(422, f"{field} must be a whole number of pixels in [{minimum}, {MAX_COORD}], "
                                f"got {show(value)}")
    return int(value)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(text: bytes) -> int:
    """The deepest bracket nesting of JSON ``text`` (brackets inside strings do not count), without decoding it.

    Example: ``b'{"crops": [{"x0": 1, "scale": [2, 2]}]}'`` -> 4; ``b'[["]]]]"]]'`` -> 2.
    """
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub(b"", text)):
        depth += 1 if bracket in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def parse_crop_meta(text: bytes, n_crops: int | None) -> list[dict]:
    """Validate ``{"crops": [{"x0", "y0", "scale"?}, ...]}`` against ``n_crops`` crop parts.

    ``n_crops=None``: the crops come on one atlas, and every item also needs its cell
    ``ax, ay, width, height`` (whole pixels; the crop is ``atlas[ay:ay+height, ax:ax+width]``).
    Returns one ``{"x0": float, "y0": float, "scale": float | [sx, sy]}`` per crop (plus the
    atlas fields as ints); a bad field raises :class:`RequestError` 422 naming it (``meta.crops[1].x0``).
    Coordinates lie in ``[0, MAX_COORD]``, scales in :data:`SCALE_RANGE`. Over
    :data:`META_MAX_BYTES` is a 413 and nesting deeper than :data:`META_MAX_DEPTH` a 422,
    both checked before decoding.
    """
    if len(text) > META_MAX_BYTES:
        raise RequestError(413, f"meta is {len(text)} bytes; the limit is {META_MAX_BYTES} bytes")
    depth = json_depth(text)
    if depth > META_MAX_DEPTH:
        raise RequestError(422, f"meta nests {depth} levels deep; the limit is {META_MAX_DEPTH}")
    try:
        meta = json.loads(text)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        raise RequestError(422, f"meta is not valid JSON: {show(str(err), 200)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("crops"), list):
        raise RequestError(422, f"meta must be an object with a list 'crops', got {show(meta)}")
    crops = meta["crops"]
    if n_crops is not None and len(crops) != n_crops:
        raise RequestError(422, f"meta.crops lists {len(crops)} crops but the body has {n_crops} 'crop' parts")
    if not crops:
        raise RequestError(422, "meta.crops is empty: name at least one crop")
    required = ("x0", "y0") + (ATLAS_FIELDS if n_crops is None else ())
    out = []
    for i, item in enumerate(crops):
        where = f"meta.crops[{i}]"
        if not isinstance(item, dict):
            raise RequestError(422, f"{where} must be an object, got {show(item)}")
        for key in required:
            if key not in item:
                raise RequestError(422, f"{where}.{key} is missing")
        unknown = sorted(set(item) - {"scale", *required})
        if unknown:
            raise RequestError(422, f"{where} has unknown field(s) {unknown} (allowed: {', '.join(required)}, scale)")
        scale = item.get("scale", 1.0)
        if isinstance(scale, list):
            if len(scale) != 2:
                raise RequestError(422, f"{where}.scale must be a number or [sx, sy], got {show(scale)}")
            scale = [_number(v, f"{where}.scale[{j}]", *SCALE_RANGE) for j, v in enumerate(scale)]
        else:
            scale = _number(scale, f"{where}.scale", *SCALE_RANGE)
        cell = {k: _pixels(item[k], f"{where}.{k}", 1 if k in ("width", "height") else 0)
                for k in ATLAS_FIELDS if k in required}
        out.append({"x0": _number(item["x0"], f"{where}.x0", 0, MAX_COORD),
                    "y0": _number(item["y0"], f"{where}.y0", 0, MAX_COORD), "scale": scale, **cell})
    return out
