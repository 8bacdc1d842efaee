"""Adverse imaging conditions: fog, low light, motion blur and occlusion.

The paper makes its detector robust to adverse conditions with GAN-synthesised
images. We use physically-motivated synthetic corruptions instead, because they

- run offline and cost milliseconds per image (no GAN to train or download),
  so they can be applied on the fly during training;
- are deterministic for a seed and have parameters with a physical meaning
  (scattering coefficient, exposure, blur length in px, covered area), so a
  result reads "mAP50 under fog with beta = 1.2", not "GAN checkpoint 12";
- never move or invent objects, so labels stay exact (occlusion follows an
  explicit rule, :func:`keep_visible`).

What they leave out: the texture of real weather (rain streaks, snow, glare,
haze colour shifts), sensor-specific noise and compression, and scene-dependent
depth. A GAN trained on real adverse images would capture some of that; the
gains measured here are for these corruption families only.

Every function takes and returns a BGR ``uint8`` image ``(H, W, 3)`` and never
modifies its input. ``severity`` 1-3 maps to the parameters in :data:`PARAMS`
(0 is the clean image); lengths in px are defined at :data:`REFERENCE_PX` and
scale with the image's long side.

Command line: an adverse copy of a YOLO dataset split::

    python -m common.adverse make --data DATA.yaml --split test --condition fog --severity 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

CONDITIONS = ("fog", "low_light", "motion_blur", "occlusion")
SEVERITIES = (1, 2, 3)
REFERENCE_PX = 320
# a label is dropped when less than this fraction of its box stays visible (see keep_visible)
MIN_VISIBLE = 0.1

PARAMS: dict[str, dict[int, dict[str, float]]] = {
    # optical thickness beta * d with d in [0.5, 1]: transmission t in [exp(-beta), exp(-beta / 2)]
    "fog": {1: {"beta": 0.6}, 2: {"beta": 1.2}, 3: {"beta": 2.0}},
    # mid-grey 128 -> 255 * exposure * (128/255)**gamma: 64, 26, 11 (before noise)
    "low_light": {
        1: {"gamma": 1.5, "exposure": 0.6, "photons": 400.0, "read_noise": 2.0},
        2: {"gamma": 2.0, "exposure": 0.4, "photons": 150.0, "read_noise": 3.0},
        3: {"gamma": 2.5, "exposure": 0.25, "photons": 60.0, "read_noise": 4.0},
    },
    # blur length in px at REFERENCE_PX (the benchmark's small objects are 4-12 px)
    "motion_blur": {1: {"length_px": 5.0}, 2: {"length_px": 9.0}, 3: {"length_px": 15.0}},
    # fraction of the image covered by occluders (70 % of them opaque)
    "occlusion": {1: {"fraction": 0.1}, 2: {"fraction": 0.2}, 3: {"fraction": 0.35}},
}


class AdverseError(ValueError):
    """An unknown condition, a bad severity or an unusable dataset; the message names it."""


def _rng(rng: np.random.Generator | int | None, what: str) -> np.random.Generator:
    if rng is None:
        raise AdverseError(f"{what} is random: pass rng (a numpy Generator or an int seed)")
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check_image(image: np.ndarray) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise AdverseError(f"expected a BGR uint8 image (H, W, 3), got {getattr(image, 'dtype', type(image))} "
                           f"{getattr(image, 'shape', '')}")
    return image


# --------------------------------------------------------------------------- fog / haze


def depth_map(shape_hw: tuple[int, int], rng: np.random.Generator | int, near: float = 0.5,
              far: float = 1.0) -> np.ndarray:
    """A smooth relative optical path (depth x fog density) in ``[near, far]``, ``(H, W)`` float32.

    ``0.6 * ramp + 0.4 * blobs``, min-max scaled to ``[near, far]``: the ramp
    runs from the bottom (near) to the top (far) of the frame, as in an oblique
    drone view; the blobs (a random 4 x 4 grid, bicubically upsampled) are
    patches of denser and thinner fog.
    """
    rng = _rng(rng, "depth_map")
    h, w = shape_hw
    ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
    coarse = rng.random((4, 4)).astype(np.float32)
    blobs = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    d = 0.6 * ramp + 0.4 * blobs
    d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
    return (near + (far - near) * d).astype(np.float32)


def fog(image: np.ndarray, beta: float, rng: np.random.Generator | int | None = None, *,
        airlight: float | Sequence[float] = 220.0, depth: np.ndarray | None = None) -> np.ndarray:
    """Koschmieder's atmospheric scattering model ``I = J * t + A * (1 - t)``, ``t = exp(-beta * d)``.

    Parameters
    ----------
    beta : scattering coefficient per unit of ``d``; 0 is clear air (the identity).
    airlight : ``A``, the colour of the fog (a grey level or a BGR triple).
    depth : ``d`` per pixel ``(H, W)``; default :func:`depth_map` drawn from ``rng``.

    Examples
    --------
    ``J = 100``, ``A = 200``, ``d = 1``, ``beta = ln 2``: ``t = 0.5`` and
    ``I = 50 + 100 = 150``. ``beta -> inf``: ``t -> 0`` and ``I -> A``.
    """
    image = _check_image(image)
    if beta < 0:
        raise AdverseError(f"fog: beta={beta} must be >= 0")
    if depth is None:
        depth = depth_map(image.shape[:2], _rng(rng, "fog without a depth map"))
    t = np.exp(-beta * np.asarray(depth, np.float32))[..., None]  # (H, W, 1)
    a = np.broadcast_to(np.asarray(airlight, np.float32), (3,))
    return _to_uint8(image.astype(np.float32) * t + a * (1.0 - t))


# --------------------------------------------------------------------------- low light


def low_light(image: np.ndarray, gamma: float, exposure: float, rng: np.random.Generator | int | None = None, *,
              photons: float | None = None, read_noise: float = 0.0) -> np.ndarray:
    """Under-exposure with gamma darkening and Poisson-Gaussian sensor noise.

    Mean signal ``mu = 255 * exposure * (J / 255) ** gamma`` (per channel).
    With ``photons`` (photo-electrons a pixel collects for the value 255), the
    count is ``Poisson(photons * mu / 255)`` and the pixel
    ``255 * count / photons + N(0, read_noise)``: shot noise grows as
    ``sqrt(mu)``, so dark images are relatively noisier; the mean stays ``mu``.

    Examples
    --------
    ``gamma = 2``, ``exposure = 0.4``, no noise: 255 -> 102 and mid-grey 128 ->
    ``102 * (128/255)**2 = 25.70`` -> 26.
    """
    image = _check_image(image)
    if gamma <= 0 or not 0 < exposure <= 1:
        raise AdverseError(f"low_light: gamma={gamma} must be > 0 and exposure={exposure} in (0, 1]")
    mu = 255.0 * exposure * (image.astype(np.float64) / 255.0) ** gamma
    if photons is not None or read_noise > 0:
        rng = _rng(rng, "low_light with noise")
        if photons is not None:
            mu = 255.0 * rng.poisson(photons * mu / 255.0) / photons
        if read_noise > 0:
            mu = mu + rng.normal(0.0, read_noise, size=mu.shape)
    return _to_uint8(mu)


# --------------------------------------------------------------------------- motion blur


def motion_blur_kernel(length_px: float, angle_deg: float) -> np.ndarray:
    """A line of ``length_px`` through the centre at ``angle_deg`` (counter-clockwise from +x), sum 1.

    ``n = ceil(length_px)`` points spaced evenly from ``-(L-1)/2`` to ``(L-1)/2``
    along the line, each bilinearly splatted with weight ``1/n``; odd square
    size. ``L = 3``, angle 0: the middle row is ``[1/3, 1/3, 1/3]``.
    """
    if length_px < 1:
        raise AdverseError(f"motion_blur: length_px={length_px} must be >= 1")
    n = max(1, math.ceil(length_px - 1e-9))
    half = (length_px - 1) / 2
    r = math.ceil(half) + 1
    k = np.zeros((2 * r + 1, 2 * r + 1), np.float64)
    theta = math.radians(angle_deg)
    for s in np.linspace(-half, half, n):
        x, y = r + s * math.cos(theta), r - s * math.sin(theta)  # image y points down
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if wx * wy > 0:
                    k[y0 + dy, x0 + dx] += wx * wy / n
    return (k / k.sum()).astype(np.float32)


def motion_blur(image: np.ndarray, length_px: float, angle_deg: float | None = None,
                rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Linear motion blur (camera shake or platform motion during the exposure).

    The image is convolved with :func:`motion_blur_kernel` (reflected border);
    ``angle_deg`` defaults to a uniform draw in ``[0, 180)`` from ``rng``.
    A constant image stays constant (the kernel sums to 1).
    """
    image = _check_image(image)
    if angle_deg is None:
        angle_deg = float(_rng(rng, "motion_blur without an angle").uniform(0.0, 180.0))
    kernel = motion_blur_kernel(length_px, angle_deg)
    out = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return _to_uint8(out)


# --------------------------------------------------------------------------- occlusion


def _shape_mask(shape_hw, kind: str, cx: float, cy: float, a: float, b: float, angle: float,
                scale: float) -> np.ndarray:
    mask = np.zeros(shape_hw, np.uint8)
    a, b = a * scale, b * scale
    if kind == "rect":
        pts = cv2.boxPoints(((cx, cy), (2 * a, 2 * b), angle))
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:
        cv2.ellipse(mask, (round(cx), round(cy)), (max(0, round(a)), max(0, round(b))), angle, 0, 360, 1, -1)
    return mask.astype(bool)


def occlusion(image: np.ndarray, fraction: float, rng: np.random.Generator | int, *, opaque_p: float = 0.7,
              return_transmission: bool = False):
    """Cover ``fraction`` of the image with random rectangles and elliptic blobs.

    Each occluder has an area of ``0.5-1.5 x min(fraction, 0.04)`` of the image,
    a random aspect ratio (1/3-3), angle and centre. With probability
    ``opaque_p`` it is opaque (a darkened colour sampled from the image plus
    texture noise: a structure or foliage in front of the scene), otherwise
    semi-opaque (alpha 0.4-0.7, a grey of 150-230: smoke, dust, dirt on the
    lens). Occluders are composited in order (``I = a * C + (1 - a) * I``) until
    the union covers ``fraction`` of the pixels; the last one is shrunk (binary
    search on its scale) so the covered fraction lands within 0.2 % of the
    image below the target.

    Returns
    -------
    image, or ``(image, transmission)`` with ``return_transmission``: the
    ``(H, W)`` fraction of the scene still seen through the occluders,
    ``prod(1 - a)``; 0 under an opaque occluder (see :func:`keep_visible`).
    """
    image = _check_image(image)
    if not 0.0 <= fraction < 1.0:
        raise AdverseError(f"occlusion: fraction={fraction} must be in [0, 1)")
    rng = _rng(rng, "occlusion")
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    transmission = np.ones((h, w), np.float32)
    covered = np.zeros((h, w), bool)
    target, tol = fraction * h * w, max(1.0, 0.002 * h * w)
    piece = min(fraction, 0.04) * h * w
    n_cov = 0
    for _attempt in range(10_000):
        if n_cov >= target - tol:
            break
        kind = "rect" if rng.random() < 0.5 else "ellipse"
        area = rng.uniform(0.5, 1.5) * piece
        aspect = math.exp(rng.uniform(-math.log(3), math.log(3)))
        a, b = (math.sqrt(area * aspect), math.sqrt(area / aspect))  # full sides of a rect of that area
        a, b = (a / 2, b / 2) if kind == "rect" else (a / math.sqrt(math.pi), b / math.sqrt(math.pi))
        cx, cy, angle = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 180)
        opaque = rng.random() < opaque_p
        if opaque:
            colour = image[rng.integers(h), rng.integers(w)].astype(np.float32) * rng.uniform(0.5, 1.0)
            alpha = 1.0
        else:
            colour = np.full(3, rng.uniform(150, 230), np.float32)
            alpha = float(rng.uniform(0.4, 0.7))
        mask = _shape_mask((h, w), kind, cx, cy, a, b, angle, 1.0)
        new = int((mask & ~covered).sum())
        if n_cov + new > target:  # shrink the last occluder onto the target
            lo, hi = 0.0, 1.0
            for _ in range(14):
                mid = (lo + hi) / 2
                m = _shape_mask((h, w), kind, cx, cy, a, b, angle, mid)
                if n_cov + int((m & ~covered).sum()) <= target:
                    lo = mid
                else:
                    hi = mid
            mask = _shape_mask((h, w), kind, cx, cy, a, b, angle, lo) if lo > 0 else np.zeros((h, w), bool)
        if not mask.any():
            continue
        texture = rng.normal(0.0, 8.0 if opaque else 3.0, size=(int(mask.sum()), 1)).astype(np.float32)
        out[mask] = alpha * (colour + texture) + (1 - alpha) * out[mask]
        transmission[mask] *= 1.0 - alpha
        covered |= mask
        n_cov = int(covered.sum())
    result = _to_uint8(out)
    return (result, transmission) if return_transmission else result


def visible_fraction(boxes_xyxy: np.ndarray, transmission: np.ndarray) -> np.ndarray:
    """Per box, the fraction of its pixels not under an opaque occluder (``transmission > 0``).

    A box covers the pixels ``floor(x0)..ceil(x1) - 1`` (and likewise in y),
    clipped to the image; a box with no pixel in the image counts as visible.
    """
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    h, w = transmission.shape
    seen = transmission > 0
    out = np.ones(len(boxes), np.float64)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        c0, c1 = max(0, math.floor(x0)), min(w, math.ceil(x1))
        r0, r1 = max(0, math.floor(y0)), min(h, math.ceil(y1))
        if c1 > c0 and r1 > r0:
            out[i] = float(seen[r0:r1, c0:c1].mean())
    return out


def keep_visible(boxes_xyxy: np.ndarray, transmission: np.ndarray, min_visible: float = MIN_VISIBLE) -> np.ndarray:
    """Which labels to keep after occlusion: at least ``min_visible`` of the box still visible.

    The rule: an object (practically) fully hidden by *opaque* occluders
    (less than 10 % of its box visible by default) loses its label; partly
    hidden objects, and objects behind semi-opaque occluders, keep theirs,
    with their full (amodal) box, as the built-in benchmark's foliage-covered
    objects do. Why: no detector can find what no pixel shows; keeping such a
    label would only lower recall in evaluation and, in training, teach the
    model to fire on blank occluders. Finding partly hidden objects is exactly
    the robustness we want, so those labels stay.
    """
    return visible_fraction(boxes_xyxy, transmission) >= min_visible


# --------------------------------------------------------------------------- one entry point


def condition_params(condition: str, severity: int, shape_hw: tuple[int, int] | None = None) -> dict[str, float]:
    """The parameters of ``condition`` at ``severity`` (lengths scaled to the image's long side)."""
    if condition not in CONDITIONS:
        raise AdverseError(f"unknown condition '{condition}' (known: {', '.join(CONDITIONS)})")
    if severity not in PARAMS[condition]:
        raise AdverseError(f"{condition}: severity={severity!r}, expected 0 (clean) or one of {SEVERITIES}")
    params = dict(PARAMS[condition][severity])
    if "length_px" in params and shape_hw is not None:
        params["length_px"] = max(1.0, params["length_px"] * max(shape_hw) / REFERENCE_PX)
    return params


def apply_with_boxes(image: np.ndarray, boxes_xyxy: np.ndarray | None, condition: str, severity: int,
                     rng: np.random.Generator | int, min_visible: float = MIN_VISIBLE
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``condition`` (one of :data:`CONDITIONS`) at ``severity`` (0 = clean, 1-3, :data:`PARAMS`), and which
    of ``boxes_xyxy`` (pixels, ``(N, 4)``, or None) keep their label.

    Only occlusion ever drops a label (:func:`keep_visible`); the random draws
    do not depend on the boxes, so the image is the same with or without them for the same seed.
    """
    _check_image(image)
    boxes = np.zeros((0, 4)) if boxes_xyxy is None else np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    keep = np.ones(len(boxes), bool)
    if severity == 0 and condition in CONDITIONS:
        return image.copy(), keep
    p = condition_params(condition, severity, image.shape[:2])
    rng = _rng(rng, "apply")
    if condition == "fog":
        return fog(image, p["beta"], rng), keep
    if condition == "low_light":
        return low_light(image, p["gamma"], p["exposure"], rng, photons=p["photons"],
                         read_noise=p["read_noise"]), keep
    if condition == "motion_blur":
        return motion_blur(image, p["length_px"], rng=rng), keep
    out, transmission = occlusion(image, p["fraction"], rng, return_transmission=True)
    return out, keep_visible(boxes, transmission, min_visible)


class AdverseAugment:
    """Training-time hook for :func:`common.yolo.train` (``augment=``).

    Called as ``augment(image, boxes_xyxy) -> (image, keep)`` on every image the
    training dataset loads; with probability ``p`` it applies a condition drawn
    uniformly from ``conditions`` at a severity drawn uniformly from
    ``severities``, otherwise returns the image untouched (``keep`` None). Its
    own generator (``seed``) never touches the global random state, so
    ``p = 0`` trains bit-identically to no hook at all. ``calls`` and
    ``applied`` (a Counter per condition) record what it did. With
    ``workers > 0`` every dataloader worker gets a copy of the same stream.
    """

    def __init__(self, p: float, conditions: Sequence[str] = CONDITIONS, severities: Sequence[int] = SEVERITIES,
                 seed: int = 0, min_visible: float = MIN_VISIBLE):
        if not 0.0 <= p <= 1.0:
            raise AdverseError(f"adverse_p={p}: must be in [0, 1]")
        for c in conditions:
            condition_params(c, 1)
        self.p, self.conditions, self.severities = float(p), tuple(conditions), tuple(severities)
        self.min_visible = min_visible
        self.rng = np.random.default_rng(seed)
        self.calls, self.applied = 0, Counter()

    def __call__(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        self.calls += 1
        if self.p <= 0.0 or self.rng.random() >= self.p:
            return image, None
        condition = self.conditions[int(self.rng.integers(len(self.conditions)))]
        severity = int(self.severities[int(self.rng.integers(len(self.severities)))])
        self.applied[condition] += 1
        return apply_with_boxes(image, boxes_xyxy, condition, severity, self.rng, self.min_visible)


# --------------------------------------------------------------------------- adverse copies of a dataset


def image_seed(seed: int, condition: str, severity: int, name: str) -> list[int]:
    """Per-image seed: the same image always gets the same corruption, whatever the order."""
    return [seed, CONDITIONS.index(condition), severity, zlib.crc32(name.encode())]


def _label_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def make_variant(data_yaml: str | Path, splits: Sequence[str], condition: str, severity: int, out: str | Path,
                 seed: int = 0, min_visible: float = MIN_VISIBLE) -> Path:
    """Write a YOLO-format copy of ``splits`` of ``data_yaml`` under ``condition`` at ``severity``.

    ``out/images/<split>/`` holds the corrupted images (PNG), ``out/labels/<split>/``
    the labels (copied; for occlusion, labels of hidden objects dropped by
    :func:`keep_visible`), ``out/data.yaml`` the dataset (no ``download:`` key;
    Ultralytics requires ``train`` and ``val``, so a missing one points at the
    first written split) and ``out/adverse.json`` the settings and counts.
    Returns the new ``data.yaml``.
    """
    from common.benchmark import write_data_yaml  # lazy: keeps this module light
    from common.detections import labels_to_pixels
    from common.sites import class_names, label_path, split_dir

    data_yaml, out = Path(data_yaml), Path(out)
    if not data_yaml.is_file():
        raise AdverseError(f"dataset file not found: {data_yaml}")
    if condition not in CONDITIONS:
        raise AdverseError(f"unknown condition '{condition}' (known: {', '.join(CONDITIONS)})")
    params = condition_params(condition, severity) if severity else {}
    names = class_names(data_yaml)
    stats = {}
    for split in splits:
        try:
            src = split_dir(data_yaml, split)
        except Exception as err:
            raise AdverseError(f"{data_yaml}: no usable '{split}' split ({err})") from None
        images = sorted(p for p in src.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not images:
            raise AdverseError(f"{data_yaml}: no images in the '{split}' split ({src})")
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        for d in (img_dir, lbl_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        n_labels = n_dropped = 0
        for path in images:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise AdverseError(f"cannot read image {path}")
            h, w = image.shape[:2]
            lines = _label_lines(label_path(path))
            boxes = labels_to_pixels([[float(v) for v in ln.split()[:5]] for ln in lines], w, h)[:, 1:]
            rng = np.random.default_rng(image_seed(seed, condition, severity, path.name))
            corrupted, keep = apply_with_boxes(image, boxes, condition, severity, rng, min_visible)
            if not cv2.imwrite(str(img_dir / f"{path.stem}.png"), corrupted):
                raise OSError(f"could not write {img_dir / path.name}")
            kept = [ln for ln, k in zip(lines, keep) if k]
            (lbl_dir / f"{path.stem}.txt").write_text("".join(f"{ln}\n" for ln in kept))
            n_labels, n_dropped = n_labels + len(lines), n_dropped + len(lines) - len(kept)
        stats[split] = {"images": len(images), "labels": n_labels, "dropped_labels": n_dropped}
        log.info("%s %s severity %d: %d images, %d of %d labels dropped -> %s", split, condition, severity,
                 len(images), n_dropped, n_labels, img_dir)
    keys = {s: f"images/{s}" for s in splits}
    for required in ("train", "val"):
        keys.setdefault(required, f"images/{splits[0]}")
    path = write_data_yaml(out, keys, names)
    (out / "adverse.json").write_text(json.dumps(
        {"source": str(data_yaml.resolve()), "condition": condition, "severity": severity, "seed": seed,
         "params": params, "min_visible": min_visible,
         "splits": stats}, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.adverse", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write an adverse copy of a YOLO dataset split")
    mk.add_argument("--data", required=True, help="the source data.yaml")
    mk.add_argument("--split", nargs="+", default=["test"], help="split(s) to corrupt (default: test)")
    mk.add_argument("--condition", required=True, choices=CONDITIONS)
    mk.add_argument("--severity", type=int, default=2, choices=(0, *SEVERITIES))
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--min-visible", type=float, default=MIN_VISIBLE,
                    help="occlusion: drop a label with less of its box visible (default %(default)s)")
    mk.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = make_variant(args.data, args.split, args.condition, args.severity, args.out, args.seed,
                            args.min_visible)
    except AdverseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
