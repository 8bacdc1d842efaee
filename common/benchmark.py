"""The built-in benchmark: procedural aerial power-line inspection scenes.

Everything is drawn from a seed, so the same config always produces the same
bytes. It is generated on first use into ``<cache_dir>/<key>/`` (``key`` hashes
the generator settings and :data:`GENERATOR_VERSION`) and reused afterwards::

    <root>/manifest.json                 settings, sites, counts
    <root>/sites/site-<i>/data.yaml      Ultralytics dataset (train/val/test)
    <root>/sites/site-<i>/site.json      position (km), classes, domain, size mix
    <root>/sites/site-<i>/{images,labels}/{train,val,test}/
    <root>/public/data.yaml              the shared labelled benchmark (all sites): test split
                                         for evaluation, train split for the cloud model
    <root>/videos/site-<i>/video.mp4     short clip written by OpenCV
    <root>/videos/site-<i>/labels/<frame>.txt, meta.json (cut, still stretches)

What makes it hard (and realistic for inspection drones): most objects are
4-12 px across at the preset's image size (``small_fraction``), drawn at 4x and
area-downsampled so their edges blur, and faint (drawn at 40-85 % opacity,
``contrast``); some are partly covered by foliage (``occlusion_prob``); clutter
(power lines, bushes, rocks, orange tags that are not rust, and look-alike
decoys: a single pale disc, a hexagon without its centre, a straight dark
stroke) sits near the objects; each site has its own background, lighting and
colour cast (its *domain*), class subset and size mix. The optional *noisy*
site draws the same kinds of scenes but labels them with a permuted class map:
its model learns a different task (paper section 5.2, Figure 6).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from common.config import DataConfig
from common.detections import yolo_label_lines

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3
CLASS_NAMES = ("insulator", "bird_nest", "damper", "bolt", "crack", "rust", "vehicle", "person")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "val", "test")
SUPERSAMPLE = 4  # objects are drawn at 4x and area-downsampled

# (name, background BGR, texture amplitude, gain, colour cast BGR)
DOMAINS = (
    ("grassland", (70, 130, 90), 28.0, 1.00, (0, 0, 0)),
    ("desert", (120, 170, 200), 22.0, 1.10, (-10, 0, 12)),
    ("urban-dusk", (105, 100, 95), 30.0, 0.70, (18, 0, -12)),
    ("snow", (215, 215, 210), 14.0, 0.95, (8, 4, 0)),
    ("forest-shade", (45, 85, 55), 24.0, 0.60, (0, 8, 0)),
    ("farmland", (80, 140, 150), 26.0, 1.05, (0, 6, 6)),
)


_D = DataConfig()


@dataclass(frozen=True)
class GeneratorSettings:
    """The generator-relevant part of :class:`common.config.DataConfig` (its defaults and meaning)."""

    seed: int = _D.seed
    num_sites: int = _D.num_sites
    imgsz: int = _D.imgsz
    train_per_site: int = _D.train_per_site
    val_per_site: int = _D.val_per_site
    test_per_site: int = _D.test_per_site
    public_per_site: int = _D.public_per_site
    public_train_per_site: int = _D.public_train_per_site
    objects_per_image: tuple[int, int] = tuple(_D.objects_per_image)
    small_px: tuple[int, int] = tuple(_D.small_px)
    large_px: tuple[int, int] = tuple(_D.large_px)
    small_fraction: float = _D.small_fraction
    occlusion_prob: float = _D.occlusion_prob
    clutter_per_image: tuple[int, int] = tuple(_D.clutter_per_image)
    noise_std: float = _D.noise_std
    contrast: tuple[float, float] = tuple(_D.contrast)  # opacity of the drawn objects
    classes_per_site: int = _D.classes_per_site
    video_frames: int = _D.video_frames
    noisy_site: bool = _D.noisy_site
    site_spacing_km: float = _D.site_spacing_km
    similar_pairs: bool = _D.similar_pairs

    @classmethod
    def from_data_config(cls, data) -> "GeneratorSettings":
        kwargs = {}
        for name in cls.__dataclass_fields__:
            value = getattr(data, name)
            kwargs[name] = tuple(value) if isinstance(value, (list, tuple)) else value
        return cls(**kwargs)

    def key(self) -> str:
        fields = asdict(self)
        if not fields["similar_pairs"]:  # added later: benchmarks generated before keep their key
            del fields["similar_pairs"]
        blob = json.dumps({"version": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Site:
    """One edge site of the benchmark."""

    index: int
    site_id: str
    position_km: tuple[float, float]
    classes: tuple[int, ...]
    domain: str
    small_fraction: float
    noisy: bool = False
    # label id written for each drawn class (identity except on the noisy site)
    label_map: tuple[int, ...] = tuple(range(NUM_CLASSES))

    @property
    def draw_classes(self) -> tuple[int, ...]:
        """The object kinds drawn on this site (``classes`` are their label ids)."""
        inverse = {label: drawn for drawn, label in enumerate(self.label_map)}
        return tuple(sorted(inverse[c] for c in self.classes))

    def to_dict(self) -> dict:
        return asdict(self)


def make_sites(s: GeneratorSettings) -> list[Site]:
    """Sites on a 3-column grid ``site_spacing_km`` apart; the noisy one far away.

    Site i sees the classes ``{(2i + k) mod 8 : k < classes_per_site}`` so that
    neighbours share some classes and differ in others, domain ``i mod 6``
    and a size mix ``small_fraction`` shifted by a per-site offset. Every site is
    then its own domain: a model trained at one site detects little at another.
    With ``similar_pairs`` sites come in pairs of the same kind (sites 2k and
    2k+1 share classes, domain and size mix, with their own images), the case
    where a neighbour's model has something to teach.
    """
    k = min(s.classes_per_site, NUM_CLASSES)
    offsets = (0.0, 0.08, -0.08, 0.12, -0.12, 0.04)
    sites = []
    for i in range(s.num_sites):
        kind = i - i % 2 if s.similar_pairs else i
        classes = tuple(sorted({(2 * kind + j) % NUM_CLASSES for j in range(k)}))
        pos = (s.site_spacing_km * (i % 3), s.site_spacing_km * (i // 3))
        frac = float(np.clip(s.small_fraction + offsets[kind % len(offsets)], 0.0, 1.0))
        sites.append(Site(i, f"site-{i}", pos, classes, DOMAINS[kind % len(DOMAINS)][0], frac))
    if s.noisy_site:
        i = s.num_sites
        # a derangement: every class is labelled as another one
        label_map = tuple((c + 3) % NUM_CLASSES for c in range(NUM_CLASSES))
        classes = tuple(range(k))
        far = s.site_spacing_km * 10.0
        sites.append(
            Site(i, f"site-{i}", (far, far), tuple(sorted(label_map[c] for c in classes)),
                 DOMAINS[i % len(DOMAINS)][0], s.small_fraction, True, label_map)
        )
    return sites


# --------------------------------------------------------------------------- drawing


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def _background(rng: np.random.Generator, size: int, domain: str, noise_std: float) -> np.ndarray:
    """Textured, unevenly lit ground of one domain. (size, size, 3) float32."""
    _, base, amp, gain, cast = next(d for d in DOMAINS if d[0] == domain)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(base, np.float32) + np.asarray(cast, np.float32)
    for cells, scale in ((4, 1.0), (16, 0.5), (48, 0.25)):  # fractal-ish texture
        grid = rng.normal(0.0, amp * scale, (cells, cells, 1)).astype(np.float32)
        img += cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + 0.25 * ((np.cos(angle) * xx + np.sin(angle) * yy) - 0.5)
    img *= (gain * light)[..., None]
    img += rng.normal(0.0, noise_std, img.shape).astype(np.float32)
    return img


def _glyph(canvas: np.ndarray, mask: np.ndarray, cls: int, w: float, h: float, rng) -> None:
    """Draw class ``cls`` filling a w x h box (at SUPERSAMPLE scale, 1 px margin)."""
    S = SUPERSAMPLE
    x0, y0, x1, y1 = S, S, S + w * S, S + h * S
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    def fill(pts, color):
        pts = np.round(np.asarray(pts)).astype(np.int32)
        cv2.fillPoly(canvas, [pts], color, cv2.LINE_AA)
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)

    def ellipse(c, axes, color, thick=-1):
        c = tuple(int(round(v)) for v in c)
        axes = tuple(max(1, int(round(v))) for v in axes)
        cv2.ellipse(canvas, c, axes, 0, 0, 360, color, thick, cv2.LINE_AA)
        cv2.ellipse(mask, c, axes, 0, 0, 360, 255, thick, cv2.LINE_AA)

    def line(p, q, color, thick):
        p = tuple(int(round(v)) for v in p)
        q = tuple(int(round(v)) for v in q)
        cv2.line(canvas, p, q, color, thick, cv2.LINE_AA)
        cv2.line(mask, p, q, 255, thick, cv2.LINE_AA)

    W, H = x1 - x0, y1 - y0
    jitter = rng.uniform(-20, 20, 3)
    tone = lambda c: tuple(float(np.clip(v + j, 0, 255)) for v, j in zip(c, jitter))  # noqa: E731
    if cls == 0:  # insulator: a chain of pale discs
        for k in range(3):
            ellipse((cx, y0 + H * (k + 0.5) / 3), (W / 2, H / 6), tone((235, 225, 200)))
    elif cls == 1:  # bird nest: brown disc with dark twigs
        ellipse((cx, cy), (W / 2, H / 2), tone((40, 70, 110)))
        for _ in range(4):
            a = rng.uniform(0, np.pi)
            dx, dy = np.cos(a) * W / 2.2, np.sin(a) * H / 2.2
            line((cx - dx, cy - dy), (cx + dx, cy + dy), tone((15, 30, 50)), max(1, S // 2))
    elif cls == 2:  # damper: two weights on a bar
        line((x0 + W * 0.2, cy), (x1 - W * 0.2, cy), tone((60, 60, 60)), max(1, int(H / 4)))
        ellipse((x0 + W * 0.2, cy), (W * 0.2, H / 2), tone((50, 50, 55)))
        ellipse((x1 - W * 0.2, cy), (W * 0.2, H / 2), tone((50, 50, 55)))
    elif cls == 3:  # bolt: silver hexagon with a dark centre
        ang = np.arange(6) * np.pi / 3
        fill(np.stack([cx + W / 2 * np.cos(ang), cy + H / 2 * np.sin(ang)], 1), tone((190, 190, 195)))
        ellipse((cx, cy), (W / 6, H / 6), (30, 30, 30))
    elif cls == 4:  # crack: dark zig-zag from corner to corner
        n = 5
        xs = np.linspace(x0, x1, n)
        ys = np.where(np.arange(n) % 2 == 0, y0, y1)
        ys[1:-1] = ys[1:-1] + rng.uniform(-0.15, 0.15, n - 2) * H
        for k in range(n - 1):
            line((xs[k], ys[k]), (xs[k + 1], ys[k + 1]), tone((20, 20, 25)), max(1, S))
    elif cls == 5:  # rust: orange irregular blob
        ang = np.linspace(0, 2 * np.pi, 9)[:-1]
        r = rng.uniform(0.7, 1.0, 8)
        fill(np.stack([cx + W / 2 * r * np.cos(ang), cy + H / 2 * r * np.sin(ang)], 1), tone((20, 90, 200)))
    elif cls == 6:  # vehicle: coloured body with a dark windscreen
        body = [(30, 30, 200), (200, 80, 20), (235, 235, 235), (30, 200, 230)][rng.integers(4)]
        fill([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], tone(body))
        fill([(x0 + W * 0.62, y0 + H * 0.1), (x0 + W * 0.8, y0 + H * 0.1),
              (x0 + W * 0.8, y1 - H * 0.1), (x0 + W * 0.62, y1 - H * 0.1)], (40, 30, 30))
    else:  # person: head and body, seen from above at an angle
        shirt = [(40, 40, 180), (180, 60, 40), (40, 160, 40), (20, 200, 230)][rng.integers(4)]
        fill([(x0 + W * 0.15, y0 + H * 0.35), (x1 - W * 0.15, y0 + H * 0.35),
              (x1 - W * 0.15, y1), (x0 + W * 0.15, y1)], tone(shirt))
        ellipse((cx, y0 + H * 0.18), (W * 0.3, H * 0.18), tone((120, 150, 200)))


# aspect (w / h) of each class's box
ASPECT = (0.55, 1.0, 2.0, 1.0, 1.4, 1.0, 1.8, 0.6)


def _paste(img: np.ndarray, cls: int, x: float, y: float, w: float, h: float, rng, alpha: float) -> None:
    """Draw an object whose box is [x, x+w] x [y, y+h] (floats) into ``img``."""
    S = SUPERSAMPLE
    ix, iy = int(np.floor(x)) - 1, int(np.floor(y)) - 1  # 1 px margin around the box
    fx, fy = x - ix - 1, y - iy - 1  # sub-pixel offset
    pw, ph = int(np.ceil(w + fx)) + 2, int(np.ceil(h + fy)) + 2
    canvas = np.zeros((ph * S, pw * S, 3), np.uint8)
    mask = np.zeros((ph * S, pw * S), np.uint8)
    shift = np.float32([[1, 0, fx * S], [0, 1, fy * S]])
    _glyph(canvas, mask, cls, w, h, rng)
    canvas = cv2.warpAffine(canvas, shift, (pw * S, ph * S))
    mask = cv2.warpAffine(mask, shift, (pw * S, ph * S))
    small = cv2.resize(canvas, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32)
    a = cv2.resize(mask, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255 * alpha
    H, W = img.shape[:2]
    x0, y0, x1, y1 = max(ix, 0), max(iy, 0), min(ix + pw, W), min(iy + ph, H)
    if x1 <= x0 or y1 <= y0:
        return
    sl = (slice(y0 - iy, y1 - iy), slice(x0 - ix, x1 - ix))
    region = img[y0:y1, x0:x1]
    region[:] = region * (1 - a[sl]) + small[sl] * a[sl]


def _clutter(img: np.ndarray, rng, n: int, near: list[tuple[float, float]]) -> None:
    """Distractors: power lines, bushes, rocks, orange survey tags and look-alike decoys."""
    size = img.shape[0]
    for _ in range(rng.integers(1, 3)):  # power lines across the frame
        y_a, y_b = rng.uniform(0, size, 2)
        cv2.line(img, (0, int(y_a)), (size - 1, int(y_b)), tuple(float(v) for v in rng.uniform(20, 60, 3)), 1, cv2.LINE_AA)
    for k in range(n):
        if near and k % 2 == 0:  # half of the clutter sits next to an object
            cx, cy = near[rng.integers(len(near))]
            cx, cy = cx + rng.uniform(-18, 18), cy + rng.uniform(-18, 18)
        else:
            cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(2, 9)
        kind = rng.integers(4)
        if kind == 3:
            _decoy(img, rng, cx, cy)
            continue
        if kind == 0:  # bush
            color = tuple(float(v) for v in rng.uniform([20, 70, 20], [60, 130, 60]))
        elif kind == 1:  # rock
            g = rng.uniform(90, 170)
            color = (g, g, g * 0.95)
        else:  # orange tag (looks like rust, is not)
            color = (30.0, 120.0, 230.0)
            r = rng.uniform(1.5, 4)
        cv2.ellipse(img, (int(cx), int(cy)), (int(r) + 1, int(r * rng.uniform(0.5, 1.0)) + 1),
                    float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)


def _decoy(img: np.ndarray, rng, cx: float, cy: float) -> None:
    """A small unlabelled look-alike: a single pale disc (not an insulator chain), a hexagon
    without its dark centre (not a bolt), a straight dark stroke (not a zig-zag crack), a plain
    brown disc (not a nest) or a grey box without windscreen (not a vehicle)."""
    s = rng.uniform(4, 12)
    kind = rng.integers(5)
    c = (int(round(cx * 16)), int(round(cy * 16)))  # 4 fractional bits
    r = int(round(s / 2 * 16))
    jitter = rng.uniform(-20, 20)
    if kind == 0:
        cv2.circle(img, c, r, (235 + jitter, 225 + jitter, 200 + jitter), -1, cv2.LINE_AA, 4)
    elif kind == 1:
        ang = np.arange(6) * np.pi / 3
        pts = np.stack([cx + s / 2 * np.cos(ang), cy + s / 2 * np.sin(ang)], 1)
        cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], (180 + jitter,) * 3, cv2.LINE_AA, 4)
    elif kind == 2:
        a = rng.uniform(0, np.pi)
        d = (np.cos(a) * s / 2, np.sin(a) * s / 2)
        p, q = (int(round((cx - d[0]) * 16)), int(round((cy - d[1]) * 16))), \
            (int(round((cx + d[0]) * 16)), int(round((cy + d[1]) * 16)))
        cv2.line(img, p, q, (25, 25, 30), 1, cv2.LINE_AA, 4)
    elif kind == 3:
        cv2.circle(img, c, r, (40 + jitter, 70 + jitter, 110 + jitter), -1, cv2.LINE_AA, 4)
    else:
        w, h = s * 0.9, s * 0.5
        pts = np.array([(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)])
        cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], (150 + jitter,) * 3, cv2.LINE_AA, 4)


def _sample_box(rng, s: GeneratorSettings, small_fraction: float, cls: int) -> tuple[float, float]:
    lo, hi = s.small_px if rng.random() < small_fraction else s.large_px
    side = rng.uniform(lo, hi)  # geometric mean of w and h
    aspect = ASPECT[cls]
    w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    # keep the longer side within the size class so "small" stays < small_px[1]
    scale = min(1.0, hi / max(w, h))
    return w * scale, h * scale


def render_scene(rng, s: GeneratorSettings, site: Site, size: int) -> tuple[np.ndarray, list[tuple]]:
    """One image and its boxes ``(cls, x0, y0, x1, y1)`` in pixels (drawn class ids)."""
    img = _background(rng, size, site.domain, s.noise_std)
    n = int(rng.integers(s.objects_per_image[0], s.objects_per_image[1] + 1))
    objects, centres = [], []
    for _ in range(n):
        cls = int(site.draw_classes[rng.integers(len(site.draw_classes))])
        w, h = _sample_box(rng, s, site.small_fraction, cls)
        for _attempt in range(10):  # avoid heavy overlaps between labelled objects
            x, y = rng.uniform(2, size - w - 2), rng.uniform(2, size - h - 2)
            if all(abs(x + w / 2 - cx) > (w + ow) / 2 or abs(y + h / 2 - cy) > (h + oh) / 2
                   for cx, cy, ow, oh in centres):
                break
        centres.append((x + w / 2, y + h / 2, w, h))
        objects.append((cls, x, y, w, h))
    _clutter(img, rng, int(rng.integers(s.clutter_per_image[0], s.clutter_per_image[1] + 1)),
             [(c[0], c[1]) for c in centres])
    boxes = []
    for cls, x, y, w, h in objects:
        _paste(img, cls, x, y, w, h, rng, alpha=rng.uniform(*s.contrast))
        if rng.random() < s.occlusion_prob:  # foliage covering 30-50% of the object
            frac = rng.uniform(0.3, 0.5)
            ox = x + (w * (1 - frac) if rng.random() < 0.5 else -w * 0.1)
            leaf = tuple(float(v) for v in rng.uniform([20, 70, 20], [60, 130, 60]))
            cv2.rectangle(img, (int(ox), int(y - 1)), (int(ox + w * frac + 1), int(y + h + 1)), leaf, -1)
        boxes.append((cls, x, y, x + w, y + h))
    img = cv2.GaussianBlur(img, (3, 3), 0.8)  # camera blur
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def yolo_lines(boxes, size: int, label_map) -> list[str]:
    """Label lines of ``(cls, x0, y0, x1, y1)`` pixel boxes on a ``size`` px square, each class written as
    ``label_map[cls]`` (:func:`common.detections.yolo_label_lines`)."""
    rows = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    return yolo_label_lines(rows[:, 1:], [label_map[int(c)] for c in rows[:, 0]], size, size)


def _write(path_img: Path, path_lbl: Path, img: np.ndarray, lines: list[str]) -> None:
    path_img.parent.mkdir(parents=True, exist_ok=True)
    path_lbl.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path_img), img):
        raise OSError(f"could not write {path_img}")
    path_lbl.write_text("".join(f"{ln}\n" for ln in lines))


def write_data_yaml(root: Path, splits: dict[str, str], names=CLASS_NAMES, final_root: Path | None = None) -> Path:
    """An Ultralytics data.yaml in ``root`` (never a ``download:`` key).

    ``path:`` is absolute: ``final_root`` if the folder is going to be moved there.
    """
    lines = [f"path: {(final_root or root).resolve()}"]
    lines += [f"{k}: {v}" for k, v in splits.items()]
    lines.append(f"nc: {len(names)}")
    lines.append("names:")
    lines += [f"  {i}: {n}" for i, n in enumerate(names)]
    path = root / "data.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- video


def _render_video(out: Path, s: GeneratorSettings, site: Site) -> dict:
    """A short clip: moving and blinking objects, a still stretch and one scene cut.

    Frames ``[T/4, T/4 + T/6)`` are a still stretch (nothing moves, only sensor
    noise changes); frame ``T/2`` is a scene cut (new background, new objects).
    """
    T, size = s.video_frames, s.imgsz
    cut = T // 2
    still = (T // 4, T // 4 + max(2, T // 6))
    rng_static = _rng(s.seed, 7, site.index)
    lbl_dir = out / "labels"
    lbl_dir.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out / "video.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (size, size))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {out / 'video.mp4'}")
    tracks = []

    def new_scene(seed_part: int):
        rng = _rng(s.seed, 8, site.index, seed_part)
        bg = _background(rng, size, site.domain, 0.0)
        _clutter(bg, rng, int(s.clutter_per_image[0]), [])
        objs = []
        for k in range(int(rng.integers(s.objects_per_image[0], s.objects_per_image[1] + 1))):
            cls = int(site.draw_classes[rng.integers(len(site.draw_classes))])
            w, h = _sample_box(rng, s, site.small_fraction, cls)
            objs.append(dict(
                track=len(tracks) + k, cls=cls, w=w, h=h,
                x=rng.uniform(4, size - w - 4), y=rng.uniform(4, size - h - 4),
                vx=rng.uniform(-1.5, 1.5) if k % 3 else 0.0, vy=rng.uniform(-1.5, 1.5) if k % 3 else 0.0,
                blink=k % 4 == 1, seed=int(rng.integers(1 << 30)),
            ))
        tracks.extend(objs)
        return bg, objs

    bg, objs = new_scene(0)
    t_move = 0  # motion clock: frozen during the still stretch
    for t in range(T):
        if t == cut:
            bg, objs = new_scene(1)
        if not (still[0] <= t < still[1]):
            t_move += 1
        frame = bg.copy()
        boxes = []
        for o in objs:
            if o["blink"] and (t // 3) % 2 == 1 and not (still[0] <= t < still[1]):
                continue  # blinks out for 3 frames out of 6
            x = float(np.clip(o["x"] + o["vx"] * t_move, 1, size - o["w"] - 1))
            y = float(np.clip(o["y"] + o["vy"] * t_move, 1, size - o["h"] - 1))
            _paste(frame, o["cls"], x, y, o["w"], o["h"], _rng(o["seed"]), alpha=0.95)
            boxes.append((o["cls"], x, y, x + o["w"], y + o["h"], o["track"]))
        frame += rng_static.normal(0.0, s.noise_std * 0.3, frame.shape).astype(np.float32)
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
        lines = yolo_lines([b[:5] for b in boxes], size, site.label_map)
        (lbl_dir / f"{t:06d}.txt").write_text("".join(f"{ln}\n" for ln in lines))
        with open(out / "tracks.txt", "a") as fh:
            fh.writelines(f"{t} {b[5]} {ln}\n" for b, ln in zip(boxes, lines))
    writer.release()
    meta = {"frames": T, "fps": 10.0, "cut_frames": [cut], "still": list(still), "imgsz": size}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Benchmark:
    """Paths of a generated benchmark."""

    root: Path
    sites: tuple[Site, ...]

    def site_dir(self, index: int) -> Path:
        return self.root / "sites" / f"site-{index}"

    def site_data(self, index: int) -> Path:
        return self.site_dir(index) / "data.yaml"

    @property
    def public_data(self) -> Path:
        return self.root / "public" / "data.yaml"

    def video_dir(self, index: int) -> Path:
        return self.root / "videos" / f"site-{index}"


def _generate_into(root: Path, s: GeneratorSettings, sites: list[Site], final_root: Path) -> None:
    counts = dict(train=s.train_per_site, val=s.val_per_site, test=s.test_per_site)
    for site in sites:
        sdir = root / "sites" / site.site_id
        for split_idx, split in enumerate(SPLITS):
            for i in range(counts[split]):
                img, boxes = render_scene(_rng(s.seed, site.index, split_idx, i), s, site, s.imgsz)
                stem = f"{site.site_id}-{split}-{i:05d}"
                _write(sdir / "images" / split / f"{stem}.png", sdir / "labels" / split / f"{stem}.txt",
                       img, yolo_lines(boxes, s.imgsz, site.label_map))
        write_data_yaml(sdir, {"train": "images/train", "val": "images/val", "test": "images/test"},
                        final_root=final_root / "sites" / site.site_id)
        (sdir / "site.json").write_text(json.dumps(site.to_dict(), indent=1))
        _render_video(root / "videos" / site.site_id, s, site)
    pub = root / "public"
    for site in sites:
        if site.noisy:
            continue  # the shared benchmark is labelled with the true task
        for split, part, count in (("test", 99, s.public_per_site), ("train", 98, s.public_train_per_site)):
            for i in range(count):
                img, boxes = render_scene(_rng(s.seed, site.index, part, i), s, site, s.imgsz)
                stem = f"public-{site.site_id}-{split}-{i:05d}"
                _write(pub / "images" / split / f"{stem}.png", pub / "labels" / split / f"{stem}.txt",
                       img, yolo_lines(boxes, s.imgsz, site.label_map))
    # test: what every edge model is scored on; train: what the cloud model learns from
    write_data_yaml(pub, {"train": "images/train", "val": "images/test", "test": "images/test"},
                    final_root=final_root / "public")


def generate(settings: GeneratorSettings, cache_dir: str | Path) -> Benchmark:
    """Generate the benchmark once (atomically) and return its paths.

    A finished benchmark has a ``manifest.json``; a half-written one (killed
    mid-way) lives in a temporary folder and is never used.
    """
    sites = make_sites(settings)
    root = Path(cache_dir).expanduser() / f"builtin-{settings.key()}"
    if (root / "manifest.json").is_file():
        return Benchmark(root, tuple(sites))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating built-in benchmark into %s", root)
    _generate_into(tmp, settings, sites, final_root=root)
    manifest = {"version": GENERATOR_VERSION, "settings": asdict(settings),
                "sites": [site.to_dict() for site in sites], "class_names": list(CLASS_NAMES)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "manifest.json").is_file():
            raise
    return Benchmark(root, tuple(sites))


def benchmark_from_config(data) -> Benchmark:
    """:func:`generate` from a :class:`common.config.DataConfig`."""
    return generate(GeneratorSettings.from_data_config(data), data.cache_dir)
