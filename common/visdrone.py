"""VisDrone2019-DET / -VID → YOLO format, partitioned into federated sites.

Input layouts (the official releases, unchanged)::

    DET root: images/<name>.jpg, annotations/<name>.txt
              line: left,top,width,height,score,category,truncation,occlusion
    VID root: sequences/<seq>/<frame:07d>.jpg, annotations/<seq>.txt
              line: frame_index,target_id,left,top,width,height,score,category,
                    truncation,occlusion

Output, one YOLO dataset per site::

    <out>/site_<i>/images/{train,val,test}/<name>.jpg
    <out>/site_<i>/labels/{train,val,test}/<name>.txt   "cls cx cy w h", normalised, 6 decimals
    <out>/site_<i>/data.yaml                            path, train, val, test, nc, names
    <out>/site_<i>/site.json                            position_km, classes, counts
    <out>/sites.json                                    all sites' site.json

Choices (the paper's data section is silent on these):

* Boxes with score 0 (ignored regions) and categories 0 (ignored) and 11
  (others) are dropped; categories 1..10 map to YOLO ids 0..9 (``CLASS_NAMES``).
  Truncation and occlusion are read and not used (no box is dropped for them).
* Boxes are clipped to the image; a box with zero area after clipping is dropped.
* Image sizes come from the JPEG/PNG header (read here in pure Python, no
  decoding; other formats fall back to OpenCV, imported lazily). EXIF
  orientation is ignored (VisDrone images carry none). A VID sequence has one
  frame size: the first frame's header is read. Tests pass a ``size_of``
  callable instead.
* Every site's ``data.yaml`` has the full 10-class label space (``nc: 10``) so
  that all site models share a head (needed for KD and per-class AP vectors);
  the site's *class set* (``site.json: classes``, used by the collaboration
  graph's task relevance) is the set of YOLO ids that occur in its train split.
  ``data.yaml`` never has a ``download:`` key: nothing is fetched at run time.
* Partition (:func:`partition_into_sites`) is deterministic in ``seed``. DET:
  images are shuffled, dealt to sites, and each site's images split by
  ``fractions`` (default 0.7/0.15/0.15). VID (``by="sequence"``): whole
  sequences go to sites (balanced by frame count, largest first), so no scene
  is shared between sites; inside a site each sequence is split *temporally*
  (first 70 % of its frames train, next 15 % val, last 15 % test): a site
  trains on its cameras' past and is tested on their future, and every split
  sees every scene even when a site has a single sequence.
* Site positions default to evenly spaced points on a circle of radius
  ``radius_km`` (5 km) around the origin, site i at angle 2πi/n (a single site
  sits at the origin); pass ``positions`` (km, local plane) to override.
* Images are symlinked into the output by default (``link="copy"`` or
  ``"hardlink"`` otherwise).

Malformed annotation lines (wrong field count, non-integers, unknown category)
raise ``ValueError("<file>:<line>: ...")``.

CLI::

    python -m common.visdrone --det-root VisDrone2019-DET-train --out data/visdrone --sites 4
    python -m common.visdrone --vid-root VisDrone2019-VID-train --out data/visdrone-vid --sites 4
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from common.detections import yolo_label_lines

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "IGNORED_CATEGORIES",
    "VisDroneBox",
    "parse_line",
    "read_det_annotation",
    "read_vid_annotation",
    "convert_boxes",
    "image_size",
    "Sample",
    "scan_det",
    "scan_vid",
    "partition_into_sites",
    "site_positions",
    "Site",
    "write_sites",
    "build_sites",
    "main",
]

#: YOLO class names, index = VisDrone category - 1.
CLASS_NAMES = (
    "pedestrian",
    "people",
    "bicycle",
    "car",
    "van",
    "truck",
    "tricycle",
    "awning-tricycle",
    "bus",
    "motor",
)
#: VisDrone categories that are dropped: 0 = ignored region, 11 = others.
IGNORED_CATEGORIES = (0, 11)
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

SizeOf = Callable[[Path], tuple[int, int]]


# --------------------------------------------------------------------------- #
# Annotation parsing and YOLO conversion
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class VisDroneBox:
    """One VisDrone annotation line (DET lines have ``frame_index = target_id = -1``)."""

    left: int
    top: int
    width: int
    height: int
    score: int
    category: int
    truncation: int
    occlusion: int
    frame_index: int = -1
    target_id: int = -1


_N_FIELDS = {"det": 8, "vid": 10}


def parse_line(
    line: str, path: str | Path = "<string>", lineno: int = 0, kind: str = "det"
) -> VisDroneBox | None:
    """Parse one annotation line; ``None`` for a blank line.

    A single trailing comma (present in some official files) is allowed.

    Parameters
    ----------
    line : str
        e.g. DET ``"684,8,273,116,0,0,0,0"`` or VID ``"1,0,593,43,174,190,0,0,0,0"``.
    path, lineno : str, int
        Used in the error message only.
    kind : {"det", "vid"}
        8 or 10 fields.

    Returns
    -------
    VisDroneBox or None

    Raises
    ------
    ValueError
        ``"<path>:<lineno>: ..."`` for a wrong field count, a non-integer field
        or a category outside 0..11.
    """
    if kind not in _N_FIELDS:
        raise ValueError(f"kind must be 'det' or 'vid', got {kind!r}")
    text = line.strip()
    if not text:
        return None
    if text.endswith(","):
        text = text[:-1]
    fields = [f.strip() for f in text.split(",")]
    expected = _N_FIELDS[kind]
    if len(fields) != expected:
        raise ValueError(
            f"{path}:{lineno}: expected {expected} comma-separated fields for VisDrone-"
            f"{kind.upper()}, got {len(fields)}: {line.strip()!r}"
        )
    try:
        values = [int(f) for f in fields]
    except ValueError:
        raise ValueError(f"{path}:{lineno}: non-integer field in {line.strip()!r}") from None
    if kind == "vid":
        frame_index, target_id, *rest = values
    else:
        frame_index, target_id, rest = -1, -1, values
    box = VisDroneBox(*rest, frame_index=frame_index, target_id=target_id)
    if not 0 <= box.category <= 11:
        raise ValueError(f"{path}:{lineno}: category {box.category} is outside 0..11")
    if kind == "vid" and frame_index < 0:
        raise ValueError(f"{path}:{lineno}: negative frame index {frame_index}")
    return box


def _read_lines(path: Path, kind: str) -> list[VisDroneBox]:
    path = Path(path)
    boxes = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            box = parse_line(line, path, lineno, kind)
            if box is not None:
                boxes.append(box)
    return boxes


def read_det_annotation(path: str | Path) -> list[VisDroneBox]:
    """All boxes of a VisDrone-DET annotation file, in file order."""
    return _read_lines(Path(path), "det")


def read_vid_annotation(path: str | Path) -> dict[int, list[VisDroneBox]]:
    """Boxes of a VisDrone-VID annotation file grouped by (1-based) frame index."""
    by_frame: dict[int, list[VisDroneBox]] = defaultdict(list)
    for box in _read_lines(Path(path), "vid"):
        by_frame[box.frame_index].append(box)
    return dict(by_frame)


def convert_boxes(boxes: Iterable[VisDroneBox], image_size: tuple[int, int]) -> list[str]:
    """YOLO label lines for the boxes kept, in input order (:func:`common.detections.yolo_label_lines`).

    Dropped: ``score == 0`` (an ignored region), category 0 or 11, or no area left after
    clipping to the image. Class = category - 1.

    Examples
    --------
    Box ``left=90, top=10, width=20, height=20``, category 4 (car), image
    100×50: clipped to x 90..100, y 10..30 → ``"3 0.950000 0.400000 0.100000 0.400000"``.
    """
    kept = [b for b in boxes if b.score != 0 and b.category not in IGNORED_CATEGORIES]
    return yolo_label_lines([(b.left, b.top, b.left + b.width, b.top + b.height) for b in kept],
                            [b.category - 1 for b in kept], *image_size)


# --------------------------------------------------------------------------- #
# Image size from the file header
# --------------------------------------------------------------------------- #
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(fh) -> tuple[int, int] | None:
    if fh.read(2) != b"\xff\xd8":
        return None
    while True:
        byte = fh.read(1)
        while byte and byte != b"\xff":  # skip to the next marker
            byte = fh.read(1)
        while byte == b"\xff":  # fill bytes
            byte = fh.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue  # standalone markers
        if marker == 0xD9:
            return None
        seg = fh.read(2)
        if len(seg) != 2:
            return None
        (length,) = struct.unpack(">H", seg)
        if marker in _JPEG_SOF:
            data = fh.read(5)
            if len(data) != 5:
                return None
            height, width = struct.unpack(">xHH", data)
            return width, height
        fh.seek(length - 2, os.SEEK_CUR)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image, from the JPEG/PNG header (no decoding).

    Other formats are decoded with OpenCV (imported lazily).

    Raises
    ------
    ValueError
        If the file is not a readable image.
    """
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(24)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return int(width), int(height)
        if head[:2] == b"\xff\xd8":
            fh.seek(0)
            size = _jpeg_size(fh)
            if size is not None and size[0] > 0 and size[1] > 0:
                return size
            raise ValueError(f"{path}: cannot read the JPEG header")
    try:
        import cv2  # noqa: PLC0415 - optional fallback
    except ImportError:  # pragma: no cover - depends on the install
        raise ValueError(f"{path}: not a JPEG/PNG and OpenCV is not installed") from None
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    return int(img.shape[1]), int(img.shape[0])


# --------------------------------------------------------------------------- #
# Scanning the official layouts
# --------------------------------------------------------------------------- #
@dataclass
class Sample:
    """One image with its YOLO label lines.

    ``key`` is unique: the image stem (DET) or ``"<seq>/<frame:07d>"`` (VID);
    ``name`` is the output file stem (``"/"`` replaced by ``"_"``).
    """

    key: str
    image: Path
    labels: list[str]

    @property
    def name(self) -> str:
        return self.key.replace("/", "_")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_det(root: str | Path, size_of: SizeOf = image_size) -> list[Sample]:
    """Read a VisDrone-DET split (``images/``, ``annotations/``) into samples.

    Raises
    ------
    ValueError
        If a folder or an image's annotation file is missing, or a line is malformed.
    """
    root = Path(root)
    images_dir, ann_dir = root / "images", root / "annotations"
    for d in (images_dir, ann_dir):
        if not d.is_dir():
            raise ValueError(f"VisDrone-DET root {root} has no folder {d.name}/")
    samples = []
    for img in _images_in(images_dir):
        ann = ann_dir / f"{img.stem}.txt"
        if not ann.is_file():
            raise ValueError(f"{img}: no annotation file {ann}")
        labels = convert_boxes(read_det_annotation(ann), size_of(img))
        samples.append(Sample(img.stem, img, labels))
    logger.info("scan_det: %d images under %s", len(samples), root)
    return samples


def scan_vid(root: str | Path, size_of: SizeOf = image_size) -> list[Sample]:
    """Read a VisDrone-VID split (``sequences/<seq>/``, ``annotations/<seq>.txt``).

    Frames with no annotation line get an empty label list; annotation lines
    for frames with no image are ignored (logged).
    """
    root = Path(root)
    seq_dir, ann_dir = root / "sequences", root / "annotations"
    for d in (seq_dir, ann_dir):
        if not d.is_dir():
            raise ValueError(f"VisDrone-VID root {root} has no folder {d.name}/")
    samples = []
    for seq in sorted(p for p in seq_dir.iterdir() if p.is_dir()):
        ann = ann_dir / f"{seq.name}.txt"
        if not ann.is_file():
            raise ValueError(f"sequence {seq}: no annotation file {ann}")
        by_frame = read_vid_annotation(ann)
        frames = _images_in(seq)
        if not frames:
            logger.warning("scan_vid: sequence %s has no frames, skipped", seq.name)
            continue
        size = size_of(frames[0])  # one frame size per sequence
        indices = set()
        for img in frames:
            try:
                index = int(img.stem)
            except ValueError:
                raise ValueError(f"{img}: frame file names must be integers like 0000001") from None
            indices.add(index)
            labels = convert_boxes(by_frame.get(index, []), size)
            samples.append(Sample(f"{seq.name}/{index:07d}", img, labels))
        orphans = sorted(set(by_frame) - indices)
        if orphans:
            logger.warning(
                "scan_vid: %s annotates %d frames with no image (first: %d)",
                ann, len(orphans), orphans[0],
            )
    logger.info("scan_vid: %d frames under %s", len(samples), root)
    return samples


# --------------------------------------------------------------------------- #
# Partition into sites
# --------------------------------------------------------------------------- #
def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder split of n into len(fractions) parts (exact, ties → earlier part).

    Every part with a positive fraction gets at least 1 when n allows it
    (taken from the largest part). Example: n = 10, (0.7, 0.15, 0.15) →
    exact (7, 1.5, 1.5) → (7, 2, 1); n = 3 → (2, 1, 0) → (1, 1, 1).
    """
    fr = [Fraction(f).limit_denominator(10**6) for f in fractions]
    total = sum(fr)
    exact = [n * f / total for f in fr]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(fr)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    positive = [i for i, f in enumerate(fr) if f > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                j = max(range(len(counts)), key=lambda k: (counts[k], -k))
                counts[j] -= 1
                counts[i] += 1
    return counts


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(not f >= 0 for f in fractions) or not sum(fractions) > 0:
        raise ValueError(f"fractions must be 3 numbers >= 0 (train, val, test), got {fractions!r}")
    if fractions[0] <= 0:
        raise ValueError(f"the train fraction must be > 0, got {fractions!r}")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def partition_into_sites(
    items: Sequence[str],
    n_sites: int,
    by: str = "image",
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> list[dict[str, list[str]]]:
    """Deterministic split of items into ``n_sites`` sites, each with train/val/test.

    ``by="image"``: every item is a unit; units are sorted, shuffled with
    ``numpy.random.default_rng(seed)``, dealt round-robin to sites, and each
    site's list is cut in that order by ``fractions``.

    ``by="sequence"``: items are ``"<seq>/<frame>"`` keys; a sequence is a
    unit. Sequences are sorted, shuffled, then (stable) sorted by frame count,
    largest first, and each goes to the site with the fewest frames so far
    (ties → lowest site index). Inside a site each sequence's frames, in frame
    order, are cut temporally by ``fractions``.

    Parameters
    ----------
    items : sequence of str
        Unique keys (DET image stems or VID ``"<seq>/<frame:07d>"``).
    n_sites : int
        Number of sites (>= 1, <= number of units).
    by : {"image", "sequence"}
    seed : int
    fractions : (train, val, test)
        Split fractions, normalised; largest-remainder rounding, and every split
        with a positive fraction gets at least one item when there are enough.

    Returns
    -------
    list of dict
        ``[{"train": [...], "val": [...], "test": [...]}, ...]``, one per site.

    Examples
    --------
    Sequences A (10 frames), B (6), C (4) over 2 sites: A → site 0, B → site 1,
    C → site 1 (6 < 10 frames). Site 0 = A's frames 1-7 train, 8-9 val, 10 test.
    """
    if by not in ("image", "sequence"):
        raise ValueError(f"by must be 'image' or 'sequence', got {by!r}")
    if int(n_sites) != n_sites or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    fractions = _check_fractions(fractions)
    items = [str(i) for i in items]
    if len(set(items)) != len(items):
        dup = sorted({i for i in items if items.count(i) > 1})[:3]
        raise ValueError(f"items must be unique, duplicated: {dup}")
    rng = np.random.default_rng(seed)
    sites: list[dict[str, list[str]]] = [{s: [] for s in SPLITS} for _ in range(n_sites)]

    if by == "image":
        units = sorted(items)
        if len(units) < n_sites:
            raise ValueError(f"n_sites={n_sites} exceeds the {len(units)} images")
        shuffled = [units[i] for i in rng.permutation(len(units))]
        for s in range(n_sites):
            mine = shuffled[s::n_sites]
            counts = _split_counts(len(mine), fractions)
            start = 0
            for split, c in zip(SPLITS, counts):
                sites[s][split] = mine[start : start + c]
                start += c
        return sites

    groups: dict[str, list[str]] = defaultdict(list)
    for item in items:
        if "/" not in item:
            raise ValueError(f"by='sequence' needs '<seq>/<frame>' keys, got {item!r}")
        groups[item.split("/", 1)[0]].append(item)
    names = sorted(groups)
    if len(names) < n_sites:
        raise ValueError(f"n_sites={n_sites} exceeds the {len(names)} sequences")
    shuffled = [names[i] for i in rng.permutation(len(names))]
    shuffled.sort(key=lambda g: -len(groups[g]))  # stable: ties keep the shuffled order
    load = [0] * n_sites
    assigned: list[list[str]] = [[] for _ in range(n_sites)]
    for g in shuffled:
        s = min(range(n_sites), key=lambda k: (load[k], k))
        assigned[s].append(g)
        load[s] += len(groups[g])
    for s in range(n_sites):
        for g in sorted(assigned[s]):
            frames = sorted(groups[g])
            counts = _split_counts(len(frames), fractions)
            start = 0
            for split, c in zip(SPLITS, counts):
                sites[s][split].extend(frames[start : start + c])
                start += c
    return sites


def site_positions(n_sites: int, radius_km: float = 5.0) -> list[tuple[float, float]]:
    """Evenly spaced site positions on a circle: ``(R cos 2πi/n, R sin 2πi/n)`` km.

    A single site sits at the origin. Example: n = 4, R = 5 → (5, 0), (0, 5),
    (−5, 0), (0, −5) (up to float rounding).
    """
    if int(n_sites) != n_sites or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if not radius_km >= 0:
        raise ValueError(f"radius_km must be >= 0, got {radius_km!r}")
    if n_sites == 1:
        return [(0.0, 0.0)]
    return [
        (radius_km * math.cos(2 * math.pi * i / n_sites), radius_km * math.sin(2 * math.pi * i / n_sites))
        for i in range(n_sites)
    ]


# --------------------------------------------------------------------------- #
# Writing per-site YOLO datasets
# --------------------------------------------------------------------------- #
@dataclass
class Site:
    """One written site: where it is, what it holds."""

    index: int
    root: Path
    position_km: tuple[float, float]
    classes: list[int]  # YOLO ids that occur in the train split
    counts: dict[str, int] = field(default_factory=dict)  # images per split
    instances: dict[str, int] = field(default_factory=dict)  # boxes per split

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def data_yaml(self) -> Path:
        return self.root / "data.yaml"

    def to_dict(self) -> dict:
        return {
            "site": self.index,
            "name": self.name,
            "root": str(self.root),
            "data_yaml": str(self.data_yaml),
            "position_km": [float(v) for v in self.position_km],
            "classes": list(self.classes),
            "class_names": [CLASS_NAMES[c] for c in self.classes],
            "counts": dict(self.counts),
            "instances": dict(self.instances),
        }


def _data_yaml(root: Path) -> str:
    # JSON strings are valid YAML double-quoted scalars; no YAML library needed.
    lines = [
        f"path: {json.dumps(str(root.resolve()))}",
        "train: images/train",
        "val: images/val",
        "test: images/test",
        f"nc: {len(CLASS_NAMES)}",
        "names:",
    ]
    lines += [f"  {i}: {json.dumps(n)}" for i, n in enumerate(CLASS_NAMES)]
    return "\n".join(lines) + "\n"


def _place(src: Path, dst: Path, link: str) -> None:
    if link == "symlink":
        dst.symlink_to(src.resolve())
    elif link == "hardlink":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def write_sites(
    samples: Sequence[Sample],
    partition: Sequence[dict[str, list[str]]],
    out: str | Path,
    positions: Sequence[tuple[float, float]] | None = None,
    radius_km: float = 5.0,
    link: str = "symlink",
    overwrite: bool = False,
) -> list[Site]:
    """Write one YOLO dataset per site (see the module docstring for the layout).

    Parameters
    ----------
    samples : sequence of Sample
    partition : list of {"train", "val", "test"} → keys
        As returned by :func:`partition_into_sites`.
    out : path
        Output folder; ``site_<i>/`` and ``sites.json`` are written in it.
    positions : list of (x, y) km or None
        One per site; default :func:`site_positions` ``(n, radius_km)``.
    link : {"symlink", "hardlink", "copy"}
        How images get into the output.
    overwrite : bool
        Replace existing ``site_<i>/`` folders (otherwise they are an error).
    """
    if link not in ("symlink", "hardlink", "copy"):
        raise ValueError(f"link must be 'symlink', 'hardlink' or 'copy', got {link!r}")
    n = len(partition)
    if positions is None:
        positions = site_positions(n, radius_km)
    if len(positions) != n:
        raise ValueError(f"positions has {len(positions)} entries for {n} sites")
    for i, p in enumerate(positions):
        if len(p) != 2 or not all(math.isfinite(float(v)) for v in p):
            raise ValueError(f"position of site {i} must be (x_km, y_km), got {p!r}")
    by_key = {s.key: s for s in samples}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sites = []
    for i, splits in enumerate(partition):
        root = out / f"site_{i}"
        if root.exists():
            if not overwrite:
                raise ValueError(f"{root} exists; pass overwrite=True (--overwrite) to replace it")
            shutil.rmtree(root)
        counts, instances, classes = {}, {}, set()
        for split in SPLITS:
            img_dir, lbl_dir = root / "images" / split, root / "labels" / split
            img_dir.mkdir(parents=True)
            lbl_dir.mkdir(parents=True)
            keys = splits.get(split, [])
            n_boxes = 0
            for key in keys:
                if key not in by_key:
                    raise ValueError(f"partition names {key!r}, which is not a sample")
                sample = by_key[key]
                _place(sample.image, img_dir / f"{sample.name}{sample.image.suffix}", link)
                text = "".join(line + "\n" for line in sample.labels)
                (lbl_dir / f"{sample.name}.txt").write_text(text, encoding="utf-8")
                n_boxes += len(sample.labels)
                if split == "train":
                    classes.update(int(line.split(" ", 1)[0]) for line in sample.labels)
            counts[split] = len(keys)
            instances[split] = n_boxes
            if not keys:
                logger.warning("write_sites: site %d has an empty %s split", i, split)
        (root / "data.yaml").write_text(_data_yaml(root), encoding="utf-8")
        pos = (float(positions[i][0]), float(positions[i][1]))
        site = Site(i, root, pos, sorted(classes), counts, instances)
        (root / "site.json").write_text(json.dumps(site.to_dict(), indent=2) + "\n", encoding="utf-8")
        logger.info(
            "write_sites: %s at %s km, %s images, classes %s", root.name, pos, counts, site.classes
        )
        sites.append(site)
    (out / "sites.json").write_text(
        json.dumps([s.to_dict() for s in sites], indent=2) + "\n", encoding="utf-8"
    )
    return sites


def build_sites(
    roots: Sequence[str | Path],
    out: str | Path,
    kind: str = "det",
    n_sites: int = 4,
    by: str | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    positions: Sequence[tuple[float, float]] | None = None,
    radius_km: float = 5.0,
    link: str = "symlink",
    overwrite: bool = False,
    size_of: SizeOf = image_size,
) -> list[Site]:
    """Scan VisDrone roots, partition into sites and write them (the CLI's work).

    ``by`` defaults to ``"image"`` for DET and ``"sequence"`` for VID. Several
    roots (e.g. the train and val releases) are pooled; keys must not repeat.
    """
    if kind not in ("det", "vid"):
        raise ValueError(f"kind must be 'det' or 'vid', got {kind!r}")
    if not roots:
        raise ValueError("at least one VisDrone root is needed")
    by = by or ("image" if kind == "det" else "sequence")
    scan = scan_det if kind == "det" else scan_vid
    samples: list[Sample] = []
    for root in roots:
        samples.extend(scan(root, size_of=size_of))
    keys = [s.key for s in samples]
    partition = partition_into_sites(keys, n_sites, by=by, seed=seed, fractions=fractions)
    return write_sites(samples, partition, out, positions, radius_km, link, overwrite)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m common.visdrone",
        description="Convert VisDrone2019-DET/-VID to YOLO format, partitioned into sites.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--det-root", action="append", type=Path, metavar="DIR",
                     help="VisDrone2019-DET split folder (images/, annotations/); repeatable")
    src.add_argument("--vid-root", action="append", type=Path, metavar="DIR",
                     help="VisDrone2019-VID split folder (sequences/, annotations/); repeatable")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    p.add_argument("--by", choices=("image", "sequence"), default=None,
                   help="partition unit (default: image for DET, sequence for VID)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                   metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--radius-km", type=float, default=5.0,
                   help="sites sit evenly on a circle of this radius (default 5 km)")
    p.add_argument("--link", choices=("symlink", "hardlink", "copy"), default="symlink")
    p.add_argument("--overwrite", action="store_true", help="replace existing site folders")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kind = "det" if args.det_root else "vid"
    try:
        sites = build_sites(
            args.det_root or args.vid_root,
            args.out,
            kind=kind,
            n_sites=args.sites,
            by=args.by,
            seed=args.seed,
            fractions=args.fractions,
            radius_km=args.radius_km,
            link=args.link,
            overwrite=args.overwrite,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for s in sites:
        print(
            f"{s.name}: {s.counts['train']}/{s.counts['val']}/{s.counts['test']} images "
            f"(train/val/test), position {s.position_km[0]:.2f},{s.position_km[1]:.2f} km, "
            f"classes {','.join(CLASS_NAMES[c] for c in s.classes) or '-'} -> {s.data_yaml}"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
