"""What the edge sends the cloud for a keyframe: crop regions, the crop atlas, frame coordinates (paper 4.2).

Crops
    Each ambiguous box is widened by ``context`` × its width/height on each
    side, grown symmetrically to at least ``min_size`` px per side, shifted
    back inside the image and clipped to it, and rounded outwards to whole
    pixels. Crops whose intersection has positive area are replaced by their
    bounding rectangle, repeatedly, until no two overlap (touching crops are
    kept apart). In ``"frame"`` mode the whole frame is sent once when anything
    is ambiguous.

Crop atlas
    The crops of one keyframe are sent as *one* JPEG (:func:`encode_atlas`):
    each crop, padded to a multiple of 16 px by repeating its edge pixels,
    sits on a 16-px grid of a near-square canvas. A JPEG from OpenCV carries
    about 620 bytes of headers and tables whatever its size, as much as a
    32×32 crop's own data; one atlas pays them once per keyframe. On the
    16-px grid no JPEG block (8 px luma, 16 px for 4:2:0 chroma) holds pixels
    of two crops, so each crop decodes as it would have alone.

Pure: numpy; OpenCV is imported lazily, only to JPEG-encode crops and atlases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from common.detections import Detections, as_boxes

__all__ = ["crop_regions", "merge_overlapping", "to_frame_coords", "OffloadPlan", "offload_plan", "crop_image",
           "encode_regions", "shelf_pack", "atlas_layout", "encode_atlas", "payload_bytes"]


def _image_hw(image_shape: Any) -> tuple[int, int]:
    try:
        h, w = int(image_shape[0]), int(image_shape[1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"image_shape must be (H, W[, C]), got {image_shape!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_shape must be positive, got {image_shape!r}")
    return h, w


def _grow_1d(lo: np.ndarray, hi: np.ndarray, min_len: float, limit: int):
    """Grow [lo, hi) symmetrically to >= min_len, then shift/clip into [0, limit]."""
    length = hi - lo
    pad = np.clip(min_len - length, 0, None) / 2.0
    lo, hi = lo - pad, hi + pad
    # shift windows that stick out on one side back inside, keeping their length
    shift_right = np.clip(-lo, 0, None)
    lo, hi = lo + shift_right, hi + shift_right
    shift_left = np.clip(hi - limit, 0, None)
    lo, hi = lo - shift_left, hi - shift_left
    return np.clip(lo, 0, limit), np.clip(hi, 0, limit)


def merge_overlapping(windows: Any) -> np.ndarray:
    """Replace overlapping windows by their bounding rectangle until none overlap.

    Two windows overlap when their intersection has positive area (touching
    edges do not count). The result is sorted by ``(y1, x1, y2, x2)``.

    Examples
    --------
    ``[0,0,10,10]``, ``[5,5,20,20]``, ``[20,0,30,5]`` → the first two merge into
    ``[0,0,20,20]``, which only touches the third: ``[[0,0,20,20],[20,0,30,5]]``.
    """
    boxes = np.asarray(windows).reshape(-1, 4).astype(np.int64)
    # The result does not depend on the order of the merges (a group, once merged, only grows, so any two windows
    # merged in one order end up together in every other), so each round merges every connected group of
    # overlapping windows at once, until a round finds no overlap.
    while len(boxes) > 1:
        overlap = (np.minimum(boxes[:, None, 2], boxes[None, :, 2]) > np.maximum(boxes[:, None, 0], boxes[None, :, 0])) \
            & (np.minimum(boxes[:, None, 3], boxes[None, :, 3]) > np.maximum(boxes[:, None, 1], boxes[None, :, 1]))
        np.fill_diagonal(overlap, False)
        if not overlap.any():
            break
        group = np.arange(len(boxes))  # each window ends with the smallest index of its connected group
        while True:
            lowest = np.minimum(group, np.where(overlap, group[None, :], len(boxes)).min(axis=1))
            lowest = lowest[lowest]
            if np.array_equal(lowest, group):
                break
            group = lowest
        labels, group = np.unique(group, return_inverse=True)
        merged = np.empty((len(labels), 4), dtype=np.int64)
        merged[:, :2] = np.iinfo(np.int64).max
        merged[:, 2:] = np.iinfo(np.int64).min
        np.minimum.at(merged[:, 0], group, boxes[:, 0])
        np.minimum.at(merged[:, 1], group, boxes[:, 1])
        np.maximum.at(merged[:, 2], group, boxes[:, 2])
        np.maximum.at(merged[:, 3], group, boxes[:, 3])
        boxes = merged
    order = np.lexsort((boxes[:, 2], boxes[:, 3], boxes[:, 0], boxes[:, 1]))  # by (y1, x1, y2, x2)
    return boxes[order].reshape(-1, 4)


def crop_regions(
    boxes: Any,
    image_shape: Any,
    context: float = 0.5,
    min_size: int = 32,
    merge_overlaps: bool = True,
) -> np.ndarray:
    """Crop windows around boxes, with context, inside the image, overlaps merged.

    For a box of width w, height h: ``[x1 - c·w, y1 - c·h, x2 + c·w, y2 + c·h]``
    (c = ``context``), grown symmetrically to at least ``min_size`` per side,
    shifted back inside the image and clipped to ``[0, W] × [0, H]``, rounded
    outwards (floor x1/y1, ceil x2/y2); then overlapping windows are merged
    (:func:`merge_overlapping`).

    Parameters
    ----------
    boxes : array_like
        ``(N, 4)`` xyxy in frame pixels.
    image_shape : tuple
        ``(H, W)`` or ``(H, W, C)``.
    context : float
        Margin on each side as a fraction of the box size (>= 0).
    min_size : int
        Minimum crop side in px (a crop is smaller only if the image is).
    merge_overlaps : bool
        Merge overlapping crops (default True).

    Returns
    -------
    np.ndarray
        ``(K, 4)`` int64 windows ``x1, y1, x2, y2``, K <= N.

    Examples
    --------
    Box ``[100, 100, 120, 110]`` (w = 20, h = 10), context 0.5, min 32, image
    480×640: widened to ``[90, 95, 130, 115]`` (40×20); height 20 < 32 grows by
    6 each side → ``[90, 89, 130, 121]``.
    """
    if not context >= 0:
        raise ValueError(f"context must be >= 0, got {context!r}")
    if int(min_size) != min_size or min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1 px, got {min_size!r}")
    h_img, w_img = _image_hw(image_shape)
    b = as_boxes(boxes)
    if b.shape[0] == 0:
        return np.zeros((0, 4), dtype=np.int64)
    bw = np.clip(b[:, 2] - b[:, 0], 0, None)
    bh = np.clip(b[:, 3] - b[:, 1], 0, None)
    x1, x2 = _grow_1d(b[:, 0] - context * bw, b[:, 2] + context * bw, min_size, w_img)
    y1, y2 = _grow_1d(b[:, 1] - context * bh, b[:, 3] + context * bh, min_size, h_img)
    windows = np.stack(
        [np.floor(x1), np.floor(y1), np.ceil(x2), np.ceil(y2)], axis=1
    ).astype(np.int64)
    return merge_overlapping(windows) if merge_overlaps else windows


def to_frame_coords(
    dets_in_crop: Detections,
    crop_origin: Sequence[float],
    scale: float | Sequence[float] = 1.0,
) -> Detections:
    """Map detections found on a crop back to frame coordinates.

    ``x_frame = x_crop / s_x + x0`` and ``y_frame = y_crop / s_y + y0``, where
    ``(x0, y0)`` is the crop's top-left corner in the frame and ``s`` the factor
    the crop was resized by before detection (sent size = crop size · s).

    Examples
    --------
    A box ``[10, 20, 30, 40]`` on a crop at origin ``(100, 50)`` that was sent
    at 2× → ``[105, 60, 115, 70]``.
    """
    try:
        x0, y0 = (float(v) for v in crop_origin)
    except (TypeError, ValueError):
        raise ValueError(f"crop_origin must be (x0, y0), got {crop_origin!r}") from None
    try:
        if np.ndim(scale) == 0:
            sx = sy = float(scale)  # type: ignore[arg-type]
        else:
            sx, sy = (float(v) for v in scale)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number or (sx, sy), got {scale!r}") from None
    if not (sx > 0 and sy > 0):
        raise ValueError(f"scale must be > 0, got {scale!r}")
    xyxy = dets_in_crop.xyxy / np.array([sx, sy, sx, sy]) + np.array([x0, y0, x0, y0])
    return Detections(xyxy, dets_in_crop.conf.copy(), dets_in_crop.cls.copy())


@dataclass(eq=False)
class OffloadPlan:
    """What to send to the cloud for one keyframe.

    ``regions`` are ``(K, 4)`` int64 windows in frame pixels (one full-frame
    window in ``"frame"`` mode, none when nothing is ambiguous); ``box_region[i]``
    is the index of the region that covers detection i, -1 if i is not offloaded.
    """

    mode: str
    regions: np.ndarray
    box_region: np.ndarray

    @property
    def empty(self) -> bool:
        return self.regions.shape[0] == 0


def offload_plan(
    boxes: Any,
    offload_mask: Any,
    image_shape: Any,
    mode: str = "crops",
    context: float = 0.5,
    min_size: int = 32,
) -> OffloadPlan:
    """Plan the upload for one keyframe: crops around ambiguous boxes or the whole frame.

    Parameters
    ----------
    boxes : array_like
        ``(N, 4)`` xyxy of all edge detections (frame pixels).
    offload_mask : array_like
        ``(N,)`` bool, True for ambiguous detections.
    image_shape : tuple
        ``(H, W)`` or ``(H, W, C)``.
    mode : {"crops", "frame", "cloud"}
        Send merged crops (see :func:`crop_regions`) or the full frame: in ``"frame"`` mode when a box is
        offloaded, in ``"cloud"`` mode always.

    Examples
    --------
    Ambiguous boxes ``[10,10,20,20]`` and ``[600,400,610,410]`` on a 480×640
    image in ``"crops"`` mode → regions ``[0,0,32,32]`` and ``[589,389,621,421]``
    (sorted top to bottom), ``box_region == [0, 1]``; in ``"frame"`` mode → one
    region ``[0, 0, 640, 480]``, ``box_region == [0, 0]``.
    """
    if mode not in ("crops", "frame", "cloud"):
        raise ValueError(f"mode must be 'crops', 'frame' or 'cloud', got {mode!r}")
    h_img, w_img = _image_hw(image_shape)
    xyxy = as_boxes(boxes)
    mask = np.asarray(offload_mask, dtype=bool).reshape(-1)
    if mask.shape[0] != xyxy.shape[0]:
        raise ValueError(f"offload_mask has {mask.shape[0]} entries for {xyxy.shape[0]} boxes")
    box_region = np.full(xyxy.shape[0], -1, dtype=np.int64)
    if not mask.any() and mode != "cloud":
        return OffloadPlan(mode, np.zeros((0, 4), dtype=np.int64), box_region)
    if mode in ("frame", "cloud"):
        box_region[mask] = 0
        return OffloadPlan(mode, np.array([[0, 0, w_img, h_img]], dtype=np.int64), box_region)
    regions = crop_regions(xyxy[mask], (h_img, w_img), context=context, min_size=min_size)
    # the region that contains the (clipped) box; every crop contains its own box
    clipped = np.clip(xyxy[mask], 0, [w_img, h_img, w_img, h_img])
    inside = (
        (regions[None, :, 0] <= clipped[:, None, 0])
        & (regions[None, :, 1] <= clipped[:, None, 1])
        & (regions[None, :, 2] >= clipped[:, None, 2])
        & (regions[None, :, 3] >= clipped[:, None, 3])
    )  # (n_offloaded, K)
    assert inside.any(axis=1).all(), "a crop region must contain its box"
    box_region[mask] = np.argmax(inside, axis=1)
    return OffloadPlan(mode, regions, box_region)


def crop_image(image: np.ndarray, region: Sequence[int]) -> np.ndarray:
    """The pixels of ``region`` (``x1, y1, x2, y2``) of an ``(H, W[, C])`` image (a view)."""
    x1, y1, x2, y2 = (int(v) for v in region)
    h, w = _image_hw(image.shape)
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"region {[x1, y1, x2, y2]} is empty or outside the {w}x{h} image")
    return image[y1:y2, x1:x2]


def encode_regions(image: np.ndarray, regions: Any, quality: int = 90) -> list[bytes]:
    """JPEG-encode each region of ``image`` with OpenCV (imported lazily).

    Returns one ``bytes`` per region, in order.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality!r}")
    try:
        import cv2  # noqa: PLC0415 - optional, only for the byte counts
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("encode_regions needs opencv-python (cv2) to JPEG-encode") from exc
    out = []
    for region in np.asarray(regions).reshape(-1, 4):
        ok, buf = cv2.imencode(
            ".jpg", np.ascontiguousarray(crop_image(image, region)),
            [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)],
        )
        if not ok:
            raise ValueError(f"cv2.imencode failed for region {region.tolist()}")
        out.append(buf.tobytes())
    return out


def shelf_pack(
    sizes: Sequence[tuple[int, int]], width: int, height: int | None = None, gap: int = 0
) -> list[tuple[int, int, int] | None]:
    """Shelf packing of rectangles ``(w, h)`` onto canvases ``width`` wide (and ``height`` tall).

    Returns ``(canvas index, x, y)`` per rectangle (its top-left corner), or None for
    one that does not fit a canvas. Rectangles go tallest first (ties in input order);
    each shelf is a row as tall as its first rectangle, ``gap`` px between neighbours
    and between shelves. ``height=None``: one canvas, as tall as needed.

    Examples
    --------
    Canvases 100×100, gap 2: sizes (60, 40), (50, 50), (30, 20) → the 50×50 at
    ``(0, 0, 0)``; the 60×40 does not fit beside it (52 + 60 > 100) → next shelf
    ``(0, 0, 52)``; the 30×20 beside it at ``(0, 62, 52)``.
    """
    if int(width) < 1 or (height is not None and int(height) < 1) or int(gap) < 0:
        raise ValueError(f"need width, height >= 1 and gap >= 0, got {width!r}, {height!r}, {gap!r}")
    out: list[tuple[int, int, int] | None] = [None] * len(sizes)
    index, x, y, shelf = 0, 0, 0, 0
    for i in sorted(range(len(sizes)), key=lambda k: -sizes[k][1]):
        w, h = (int(v) for v in sizes[i])
        if w > width or (height is not None and h > height):
            continue
        if x + w > width:  # next shelf
            x, y, shelf = 0, y + shelf + gap, 0
        if height is not None and y + h > height:  # next canvas
            index, x, y, shelf = index + 1, 0, 0, 0
        out[i] = (index, x, y)
        x, shelf = x + w + gap, max(shelf, h)
    return out


def atlas_layout(sizes: Sequence[tuple[int, int]], align: int = 16) -> tuple[np.ndarray, tuple[int, int]]:
    """Where each crop ``(w, h)`` goes in a crop atlas, and the atlas size ``(W, H)``.

    Each crop takes a cell of its size rounded up to a multiple of ``align``; the
    atlas is ``W = max(widest cell, ⌈√(Σ cell areas) / align⌉ · align)`` wide (near
    square) and the cells are shelf-packed onto it without gaps (:func:`shelf_pack`).
    Every cell, hence every crop, starts on the ``align`` grid.

    Returns ``(K, 2)`` int64 top-left corners ``(ax, ay)`` and ``(W, H)``.

    Examples
    --------
    Crops 40×32 and 20×10, align 16: cells 48×32 and 32×16, areas 1536 + 512 →
    √2048 ≈ 45.3 → W = 48; the 48×32 at (0, 0), the 32×16 on the next shelf at
    (0, 32); ``(W, H) = (48, 48)``.
    """
    if int(align) < 1:
        raise ValueError(f"align must be >= 1 px, got {align!r}")
    if any(w < 1 or h < 1 for w, h in sizes):
        raise ValueError(f"crop sizes must be >= 1 px, got {list(sizes)!r}")
    cells = [(-(-int(w) // align) * align, -(-int(h) // align) * align) for w, h in sizes]
    if not cells:
        return np.zeros((0, 2), dtype=np.int64), (0, 0)
    side = -(-int(np.ceil(np.sqrt(sum(w * h for w, h in cells)))) // align) * align
    width = max(max(w for w, _ in cells), side)
    places = shelf_pack(cells, width)
    corners = np.array([(x, y) for _, x, y in places], dtype=np.int64)  # type: ignore[misc]
    height = max(y + h for (_, y), (_, h) in zip(corners.tolist(), cells))
    return corners, (int(width), int(height))


def encode_atlas(image: np.ndarray, regions: Any, quality: int = 90, align: int = 16) -> tuple[bytes, np.ndarray]:
    """The regions of ``image`` on one crop atlas, JPEG-encoded (see "Crop atlas" above).

    Each crop is padded right and down to its :func:`atlas_layout` cell by repeating
    its last column/row; the rest of the atlas is gray (114). Returns the JPEG and the
    ``(K, 2)`` atlas corners ``(ax, ay)`` of the crops, in the order of ``regions``;
    crop k is ``atlas[ay:ay + h_k, ax:ax + w_k]`` with ``w_k × h_k`` its region's size.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality!r}")
    import cv2  # lazily, as in encode_regions

    crops = [crop_image(image, r) for r in np.asarray(regions).reshape(-1, 4)]
    if not crops:
        raise ValueError("encode_atlas needs at least one region")
    corners, (width, height) = atlas_layout([(c.shape[1], c.shape[0]) for c in crops], align)
    canvas = np.full((height, width) + image.shape[2:], 114, dtype=image.dtype)
    for crop, (ax, ay) in zip(crops, corners.tolist()):
        h, w = crop.shape[:2]
        cell = cv2.copyMakeBorder(np.ascontiguousarray(crop), 0, -h % align, 0, -w % align, cv2.BORDER_REPLICATE)
        canvas[ay:ay + cell.shape[0], ax:ax + cell.shape[1]] = cell.reshape(cell.shape[:2] + image.shape[2:])
    ok, buf = cv2.imencode(".jpg", canvas, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError(f"cv2.imencode failed for a {width}x{height} atlas")
    return buf.tobytes(), corners


def payload_bytes(encoded: Iterable[bytes | int]) -> int:
    """Total upload size: the sum of the encoded sizes (``bytes`` or ints).

    Examples
    --------
    ``payload_bytes([b"abc", 10]) == 13``.
    """
    total = 0
    for item in encoded:
        n = len(item) if isinstance(item, (bytes, bytearray, memoryview)) else int(item)
        if n < 0:
            raise ValueError(f"encoded size must be >= 0, got {item!r}")
        total += n
    return total

