"""The cloud service's HTTP parsing: image headers checked before decoding, multipart bodies, body limits, atlases.

Every function raises :class:`common.cloud_api.RequestError` with the HTTP status and a
message naming the bad value; nothing here knows the model or the store.
"""

from __future__ import annotations

import asyncio
import re
import struct
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from typing import Sequence

import numpy as np

from common.cloud_api import ATLAS_FIELDS, RequestError, show

IMAGE_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
# a multipart file part may also come untyped or as octet-stream (the bytes' signature decides)
PART_TYPES = {*IMAGE_TYPES, "application/octet-stream", ""}


# --------------------------------------------------------------------------- image headers


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_header(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` of PNG/JPEG bytes, from the header only (nothing is decoded).

    PNG: the IHDR chunk must come first (bytes 12-24: ``IHDR``, width, height).
    JPEG: markers are walked from SOI to the first start-of-frame (SOF) segment,
    whose payload is ``precision(1) height(2) width(2)``.

    Raises
    ------
    RequestError
        400 if the bytes are not a PNG/JPEG with a readable, non-zero size.

    Examples
    --------
    A PNG whose IHDR says 40000x40000 -> ``("png", 40000, 40000)`` from 24 bytes.
    """
    if data[:8] == _PNG_MAGIC:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise RequestError(400, "cannot decode image: PNG without an IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        if width == 0 or height == 0:
            raise RequestError(400, f"cannot decode image: PNG header says {width}x{height}")
        return "png", int(width), int(height)
    if data[:2] == b"\xff\xd8":
        i, n = 2, len(data)
        while i < n:
            if data[i] != 0xFF:  # skip to the next marker
                i += 1
                continue
            while i < n and data[i] == 0xFF:  # fill bytes
                i += 1
            if i >= n:
                break
            marker = data[i]
            i += 1
            if marker in (0xD8, 0x01, 0x00) or 0xD0 <= marker <= 0xD7:
                continue  # standalone markers (0x00: a stuffed byte)
            if marker == 0xD9 or i + 2 > n:
                break
            (length,) = struct.unpack(">H", data[i:i + 2])
            if marker in _JPEG_SOF:
                if i + 7 > n:
                    break
                height, width = struct.unpack(">HH", data[i + 3:i + 7])
                if width == 0 or height == 0:
                    raise RequestError(400, f"cannot decode image: JPEG header says {width}x{height}")
                return "jpeg", int(width), int(height)
            if length < 2:
                break
            i += length
        raise RequestError(400, "cannot decode image: no JPEG frame header (SOF) found")
    raise RequestError(400, f"cannot decode image: not a JPEG or PNG (starts with {show(data[:8])})")


def parse_max_pixels(text: str) -> int:
    """``"4096x4096"`` -> 16777216; a plain integer is a pixel count."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
    value = int(m[1]) * int(m[2]) if m else int(text) if str(text).strip().isdigit() else 0
    if value <= 0:
        raise ValueError(f"max pixels must be WIDTHxHEIGHT or a positive integer, got {text!r}")
    return value


def decode_image(data: bytes, max_pixels: int) -> tuple[str, np.ndarray]:
    """``(format, BGR image)``; the size is checked from the header *before* decoding.

    Raises :class:`RequestError` 413 for too many pixels, 400 for anything undecodable.
    """
    fmt, width, height = image_header(data)
    if width * height > max_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels; "
                                f"the limit is {max_pixels} pixels (--max-pixels)")
    import cv2

    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV raises on some corrupt streams instead of returning None
        image = None
    if image is None or image.size == 0:
        raise RequestError(400, f"cannot decode image: corrupt or truncated {fmt.upper()} "
                                f"({len(data)} bytes, header {width}x{height})")
    return fmt, image


# --------------------------------------------------------------------------- request bodies


def media_type(content_type: str | None) -> tuple[str, Message]:
    """``("multipart/form-data", parsed header)`` from a Content-Type value (lower-cased type)."""
    msg = Message()
    msg["content-type"] = content_type or ""
    return (msg.get_content_type() if content_type else ""), msg


@dataclass
class Part:
    name: str | None
    content_type: str
    data: bytes


def parse_multipart(body: bytes, boundary: str | tuple | None, max_parts: int, limit_name: str = "") -> list[Part]:
    """Split a ``multipart/form-data`` body (RFC 7578) into parts, byte-exact.

    Raises :class:`RequestError` 400 if it is malformed, 413 for more than ``max_parts`` parts.
    """
    # RFC 2046: 1-70 characters; an RFC 2231 ``boundary*=`` parameter arrives as a tuple
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise RequestError(400, f"multipart body needs a boundary parameter of 1-70 ASCII characters, "
                                f"got {show(boundary)}")
    delim = b"\r\n--" + boundary.encode("ascii")
    sections = (b"\r\n" + body).split(delim)
    if len(sections) < 2:
        raise RequestError(400, "malformed multipart body: boundary not found")
    parts = []
    for section in sections[1:]:
        if section.startswith(b"--"):
            return parts  # closing delimiter
        if len(parts) >= max_parts:
            raise RequestError(413, f"more than {max_parts} parts in the multipart body{limit_name}")
        head, sep, data = section.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(400, f"malformed multipart body: part {len(parts)} has no header end")
        headers = HeaderParser().parsestr(head.lstrip(b" \t").lstrip(b"\r\n").decode("latin-1"))
        parts.append(Part(headers.get_param("name", header="content-disposition"),
                          headers.get_content_type() if headers.get("content-type") else "", data))
    raise RequestError(400, "malformed multipart body: no closing boundary")


async def read_body(request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``max_bytes`` (never buffered beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"\s*[0-9]{1,18}\s*", declared):
            raise RequestError(400, f"bad Content-Length {show(declared)}")
        if int(declared) > max_bytes:
            raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {max_bytes} "
                                    f"bytes (--max-body-mb)")
    chunks, size = [], 0

    async def collect():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, f"body is over the limit of {max_bytes} bytes (--max-body-mb); "
                                        f"stopped reading at {size} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"body not received within {timeout_s:g} s ({size} bytes so far)") from None
    if size == 0:
        raise RequestError(400, "empty body: send an image")
    return b"".join(chunks)


def cut_atlas(atlas: np.ndarray, metas: Sequence[dict]) -> list[np.ndarray]:
    """The crops of an atlas (copies), from the cells in ``metas``; a cell outside the atlas is a 422."""
    h, w = atlas.shape[:2]
    crops = []
    for i, m in enumerate(metas):
        ax, ay, cw, ch = (m[k] for k in ATLAS_FIELDS)
        if ax + cw > w or ay + ch > h:
            raise RequestError(422, f"meta.crops[{i}]: cell {cw}x{ch} at ({ax}, {ay}) is outside the {w}x{h} atlas")
        crops.append(np.ascontiguousarray(atlas[ay:ay + ch, ax:ax + cw]))
    return crops
