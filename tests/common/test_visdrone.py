"""Tests for common/visdrone.py: VisDrone2019-DET/-VID → YOLO, partitioned into sites.

The tests write tiny files in the official VisDrone format themselves and compare
the converted labels with YOLO lines worked out by hand.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from common.visdrone import (
    CLASS_NAMES,
    VisDroneBox,
    _split_counts,
    build_sites,
    convert_boxes,
    image_size,
    main,
    parse_line,
    partition_into_sites,
    read_det_annotation,
    read_vid_annotation,
    scan_det,
    scan_vid,
    site_positions,
)
from tests import REPO


# --------------------------------------------------------------------------- #
# Tiny image files, no image library needed
# --------------------------------------------------------------------------- #
def write_png(path: Path, width: int, height: int) -> Path:
    """A black RGB PNG of width × height."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + bytes(width * 3) for _ in range(height))  # filter byte + row
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def write_jpeg_header(path: Path, width: int, height: int) -> Path:
    """SOI, an APP0 (JFIF) segment, an SOF0 frame header and EOI: enough for the size."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes(9)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8" + app0 + sof0 + b"\xff\xd9")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --------------------------------------------------------------------------- #
# A tiny DET split and a tiny VID split
# --------------------------------------------------------------------------- #
DET_EXPECTED = {
    # 100×50 image
    "0000001_00000_d_0000001": [
        "3 0.950000 0.400000 0.100000 0.400000",  # car 90,10,20,20 clipped to x 90..100
        "0 0.250000 0.300000 0.300000 0.400000",  # pedestrian x 10..40, y 5..25
        "9 0.025000 0.900000 0.050000 0.200000",  # motor -5,40,10,20 → x 0..5, y 40..50
    ],
    # 64×64 image: bus x 32..36, y 8..12 → cx 34/64, cy 10/64, w = h = 4/64
    "0000002_00000_d_0000002": ["8 0.531250 0.156250 0.062500 0.062500"],
    # 100×50 JPEG with an empty annotation file
    "0000003_00000_d_0000003": [],
    # 80×40 image: people 0,0,8,4 → cx 4/80, cy 2/40, w 8/80, h 4/40
    "0000004_00000_d_0000004": ["1 0.050000 0.050000 0.100000 0.100000"],
}
DET_CLASSES = {"0000001_00000_d_0000001": {0, 3, 9}, "0000002_00000_d_0000002": {8},
               "0000003_00000_d_0000003": set(), "0000004_00000_d_0000004": {1}}


@pytest.fixture
def det_root(tmp_path: Path) -> Path:
    root = tmp_path / "VisDrone2019-DET-train"
    write_png(root / "images" / "0000001_00000_d_0000001.png", 100, 50)
    write_lines(
        root / "annotations" / "0000001_00000_d_0000001.txt",
        [
            "90,10,20,20,1,4,0,0",  # car, clipped
            "10,5,30,20,1,1,0,1,",  # pedestrian, trailing comma as in some official files
            "0,0,50,50,0,0,0,0",  # ignored region (score 0, category 0): dropped
            "5,5,10,10,1,11,0,0",  # others: dropped
            "",  # blank line: skipped
            "120,10,10,10,1,4,0,0",  # entirely right of the image: zero area, dropped
            "-5,40,10,20,1,10,0,0",  # motor, clipped on the left and bottom
        ],
    )
    write_png(root / "images" / "0000002_00000_d_0000002.png", 64, 64)
    write_lines(root / "annotations" / "0000002_00000_d_0000002.txt", ["32,8,4,4,1,9,0,0"])
    write_jpeg_header(root / "images" / "0000003_00000_d_0000003.jpg", 100, 50)
    write_lines(root / "annotations" / "0000003_00000_d_0000003.txt", [])
    write_png(root / "images" / "0000004_00000_d_0000004.png", 80, 40)
    write_lines(root / "annotations" / "0000004_00000_d_0000004.txt", ["0,0,8,4,1,2,0,0"])
    return root


SEQ1, SEQ2 = "uav0000001_00000_v", "uav0000002_00000_v"
VID_EXPECTED = {
    # 64×32 frames
    f"{SEQ1}/0000001": ["3 0.218750 0.375000 0.125000 0.125000"],  # car x 10..18, y 10..14
    f"{SEQ1}/0000002": ["3 0.250000 0.375000 0.125000 0.125000"],  # car moved 2 px right
    f"{SEQ1}/0000003": [],  # no annotation line
    f"{SEQ1}/0000004": ["0 0.968750 0.937500 0.062500 0.125000"],  # x 60..64, y 28..32
    f"{SEQ2}/0000001": ["5 0.250000 0.250000 0.500000 0.500000"],  # truck 0,0,32,16
    f"{SEQ2}/0000002": [],
    f"{SEQ2}/0000003": [],
}


@pytest.fixture
def vid_root(tmp_path: Path) -> Path:
    root = tmp_path / "VisDrone2019-VID-train"
    for i in range(1, 5):
        write_png(root / "sequences" / SEQ1 / f"{i:07d}.png", 64, 32)
    for i in range(1, 4):
        write_png(root / "sequences" / SEQ2 / f"{i:07d}.png", 64, 32)
    write_lines(
        root / "annotations" / f"{SEQ1}.txt",
        [
            "1,0,10,10,8,4,1,4,0,0",
            "2,0,12,10,8,4,1,4,0,0",
            "2,1,0,0,64,32,0,0,0,0",  # ignored region
            "4,2,60,28,8,8,1,1,0,0",  # clipped at the bottom-right corner
            "9,3,0,0,4,4,1,1,0,0",  # frame 9 has no image: ignored
        ],
    )
    write_lines(root / "annotations" / f"{SEQ2}.txt", ["1,0,0,0,32,16,1,6,0,0"])
    return root


# --------------------------------------------------------------------------- #
# Parsing and conversion
# --------------------------------------------------------------------------- #
def test_parse_det_and_vid_lines():
    """DET has 8 fields, VID 10 (frame_index, target_id first); a trailing comma is fine."""
    det = parse_line("684,8,273,116,0,0,0,0,", kind="det")
    vid = parse_line("1,7,593,43,174,190,1,4,0,2", kind="vid")
    assert det == VisDroneBox(684, 8, 273, 116, 0, 0, 0, 0)
    assert vid == VisDroneBox(593, 43, 174, 190, 1, 4, 0, 2, frame_index=1, target_id=7)
    assert parse_line("   \n", kind="det") is None


@pytest.mark.parametrize(
    "line, kind, match",
    [
        ("1,2,3,4,1,4,0", "det", r"ann\.txt:7: expected 8 comma-separated fields .* got 7"),
        ("1,2,3,4,1,4,0,0", "vid", r"ann\.txt:7: expected 10 .* got 8"),
        ("1,2,3.5,4,1,4,0,0", "det", r"ann\.txt:7: non-integer field"),
        ("a,2,3,4,1,4,0,0", "det", r"ann\.txt:7: non-integer field"),
        ("1,2,3,4,1,12,0,0", "det", r"ann\.txt:7: category 12 is outside 0\.\.11"),
    ],
)
def test_malformed_lines_name_file_and_line(line, kind, match):
    with pytest.raises(ValueError, match=match):
        parse_line(line, "ann.txt", 7, kind=kind)


def test_malformed_file_names_its_line_number(tmp_path: Path):
    """The third line is bad → the message says '<file>:3'."""
    path = write_lines(tmp_path / "x.txt", ["1,1,2,2,1,1,0,0", "", "1,1,2,2,1,1,0"])
    with pytest.raises(ValueError, match=r"x\.txt:3: expected 8"):
        read_det_annotation(path)


@pytest.mark.parametrize(
    "box, expected",
    [
        # car, clipped to x 90..100 in a 100×50 image
        (VisDroneBox(90, 10, 20, 20, 1, 4, 0, 0), "3 0.950000 0.400000 0.100000 0.400000"),
        # fully inside: x 20..30, y 10..20 → cx 0.25, cy 0.3, w 0.1, h 0.2
        (VisDroneBox(20, 10, 10, 10, 1, 10, 2, 2), "9 0.250000 0.300000 0.100000 0.200000"),
        (VisDroneBox(20, 10, 10, 10, 0, 4, 0, 0), None),  # score 0: ignored region
        (VisDroneBox(20, 10, 10, 10, 1, 0, 0, 0), None),  # category 0
        (VisDroneBox(20, 10, 10, 10, 1, 11, 0, 0), None),  # category 11 (others)
        (VisDroneBox(100, 10, 10, 10, 1, 4, 0, 0), None),  # starts at the right edge
        (VisDroneBox(20, 10, 0, 10, 1, 4, 0, 0), None),  # zero width
    ],
)
def test_convert_boxes_hand_values(box, expected):
    assert convert_boxes([box], (100, 50)) == ([] if expected is None else [expected])


def test_class_names():
    assert CLASS_NAMES[0] == "pedestrian" and CLASS_NAMES[9] == "motor" and len(CLASS_NAMES) == 10
    assert CLASS_NAMES[7] == "awning-tricycle"


def test_det_annotation_to_yolo_lines(det_root: Path):
    """The whole 100×50 annotation file → the three hand-computed YOLO lines."""
    boxes = read_det_annotation(det_root / "annotations" / "0000001_00000_d_0000001.txt")
    assert len(boxes) == 6
    assert convert_boxes(boxes, (100, 50)) == DET_EXPECTED["0000001_00000_d_0000001"]


def test_read_vid_annotation_groups_by_frame(vid_root: Path):
    by_frame = read_vid_annotation(vid_root / "annotations" / f"{SEQ1}.txt")
    assert sorted(by_frame) == [1, 2, 4, 9]
    assert [b.target_id for b in by_frame[2]] == [0, 1]


# --------------------------------------------------------------------------- #
# Image sizes from headers
# --------------------------------------------------------------------------- #
def test_image_size_png_and_jpeg_headers(tmp_path: Path):
    assert image_size(write_png(tmp_path / "a.png", 37, 23)) == (37, 23)
    assert image_size(write_jpeg_header(tmp_path / "b.jpg", 1360, 765)) == (1360, 765)


def test_image_size_of_a_real_jpeg(tmp_path: Path):
    """Our header parser agrees with a JPEG written by OpenCV (skipped without cv2)."""
    try:
        import cv2  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
    except Exception:
        pytest.skip("cv2 not importable")
    path = tmp_path / "real.jpg"
    cv2.imwrite(str(path), np.zeros((23, 37, 3), dtype=np.uint8))
    assert image_size(path) == (37, 23)


def test_image_size_rejects_garbage(tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xd9")
    with pytest.raises(ValueError, match="bad.jpg"):
        image_size(bad)


# --------------------------------------------------------------------------- #
# Partition
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "n, fractions, expected",
    [
        (10, (0.7, 0.15, 0.15), [7, 2, 1]),  # exact 7, 1.5, 1.5; the tie goes to val
        (3, (0.7, 0.15, 0.15), [1, 1, 1]),  # 2, 1, 0 → every split gets one
        (2, (0.7, 0.15, 0.15), [2, 0, 0]),  # too few to fill all three
        (20, (0.8, 0.2, 0.0), [16, 4, 0]),  # a zero fraction stays empty
        (0, (0.7, 0.15, 0.15), [0, 0, 0]),
    ],
)
def test_split_counts(n, fractions, expected):
    assert _split_counts(n, fractions) == expected


def test_partition_by_image_is_deterministic_and_complete():
    """Every image in exactly one site and split; same seed → same result; 100 / 4 = 25 each."""
    # Prepare
    items = [f"img{i:03d}" for i in range(100)]
    # Execute
    a = partition_into_sites(items, 4, by="image", seed=0)
    b = partition_into_sites(list(reversed(items)), 4, by="image", seed=0)
    c = partition_into_sites(items, 4, by="image", seed=1)
    # Assert
    assert a == b  # order of the input does not matter
    assert a != c
    flat = [x for site in a for split in ("train", "val", "test") for x in site[split]]
    assert sorted(flat) == items
    # 25 per site: exact 17.5, 3.75, 3.75 → floors 17, 3, 3; the 2 left over go to the
    # largest remainders, val (.75) and test (.75), not train (.5) → 17, 4, 4
    assert [[len(s["train"]), len(s["val"]), len(s["test"])] for s in a] == [[17, 4, 4]] * 4


def test_partition_by_sequence_keeps_sequences_whole():
    """Sequences A (10 frames), B (6), C (4) on 2 sites: A → 0, B → 1, C → 1 (6 < 10).

    Site 0: A split temporally 7/2/1 → frames 1-7 train, 8-9 val, 10 test.
    Site 1: B 6 → exact 4.2, 0.9, 0.9 → 4, 1, 1; C 4 → 2.8, .6, .6 → 3, 1, 0 → 2, 1, 1.
    """
    # Prepare
    items = [f"A/{i:07d}" for i in range(1, 11)] + [f"B/{i:07d}" for i in range(1, 7)]
    items += [f"C/{i:07d}" for i in range(1, 5)]
    # Execute
    sites = partition_into_sites(items, 2, by="sequence", seed=0)
    # Assert
    assert sites[0]["train"] == [f"A/{i:07d}" for i in range(1, 8)]
    assert sites[0]["val"] == ["A/0000008", "A/0000009"]
    assert sites[0]["test"] == ["A/0000010"]
    assert sites[1]["train"] == [f"B/{i:07d}" for i in range(1, 5)] + ["C/0000001", "C/0000002"]
    assert sites[1]["val"] == ["B/0000005", "C/0000003"]
    assert sites[1]["test"] == ["B/0000006", "C/0000004"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_sites": 0}, "n_sites must be an integer >= 1, got 0"),
        ({"n_sites": 5}, "n_sites=5 exceeds the 3 images"),
        ({"n_sites": 1, "by": "camera"}, "by must be"),
        ({"n_sites": 1, "fractions": (0.0, 0.5, 0.5)}, "train fraction"),
        ({"n_sites": 1, "by": "sequence"}, "needs '<seq>/<frame>' keys"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_into_sites(["a", "b", "c"], **kwargs)


def test_partition_rejects_duplicates():
    with pytest.raises(ValueError, match="unique"):
        partition_into_sites(["a", "a", "b"], 1)


def test_site_positions_on_a_circle():
    """n = 4, R = 5 km: (5, 0), (0, 5), (-5, 0), (0, -5); one site sits at the origin."""
    pos = site_positions(4, radius_km=5.0)
    for (x, y), (ex, ey) in zip(pos, [(5, 0), (0, 5), (-5, 0), (0, -5)]):
        assert x == pytest.approx(ex, abs=1e-12) and y == pytest.approx(ey, abs=1e-12)
    assert site_positions(1) == [(0.0, 0.0)]
    # neighbours on a 3-site circle of radius 2 are 2·sqrt(3) km apart
    (x0, y0), (x1, y1), _ = site_positions(3, radius_km=2.0)
    assert math.hypot(x1 - x0, y1 - y0) == pytest.approx(2 * math.sqrt(3))


# --------------------------------------------------------------------------- #
# End to end: scan, partition, write
# --------------------------------------------------------------------------- #
def _labels_by_name(site_root: Path) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for split in ("train", "val", "test"):
        for f in (site_root / "labels" / split).glob("*.txt"):
            out[f.stem] = (split, f.read_text().splitlines())
    return out


def test_scan_det_samples(det_root: Path):
    samples = scan_det(det_root)
    assert [s.key for s in samples] == sorted(DET_EXPECTED)
    assert {s.key: s.labels for s in samples} == DET_EXPECTED


def test_det_sites_written_as_yolo(det_root: Path, tmp_path: Path):
    """DET → one site: labels equal the hand-written lines, data.yaml has exactly the 6 keys."""
    yaml = pytest.importorskip("yaml")
    # Prepare
    out = tmp_path / "out"
    # Execute
    sites = build_sites([det_root], out, kind="det", n_sites=1, seed=0, link="copy")
    # Assert
    (site,) = sites
    labels = _labels_by_name(site.root)
    assert {name: lines for name, (_, lines) in labels.items()} == DET_EXPECTED
    # 4 images → 2/1/1 (see test_split_counts-style arithmetic: 2.8, .6, .6 → 3, 1, 0 → 2, 1, 1)
    assert site.counts == {"train": 2, "val": 1, "test": 1}
    train = [name for name, (split, _) in labels.items() if split == "train"]
    assert site.classes == sorted(set().union(*(DET_CLASSES[n] for n in train)))
    # images are next to their labels, with their own suffix
    for name, (split, _) in labels.items():
        suffix = ".jpg" if name == "0000003_00000_d_0000003" else ".png"
        img = site.root / "images" / split / f"{name}{suffix}"
        assert img.is_file() and not img.is_symlink()
    data = yaml.safe_load((site.root / "data.yaml").read_text())
    assert set(data) == {"path", "train", "val", "test", "nc", "names"}
    assert "download" not in data
    assert data["path"] == str(site.root.resolve())
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val", "images/test")
    assert data["nc"] == 10 and data["names"] == dict(enumerate(CLASS_NAMES))
    meta = json.loads((site.root / "site.json").read_text())
    assert meta["position_km"] == [0.0, 0.0]
    assert meta["classes"] == site.classes
    assert meta["instances"]["train"] + meta["instances"]["val"] + meta["instances"]["test"] == 5
    assert json.loads((out / "sites.json").read_text()) == [meta]


def test_vid_sites_split_by_sequence_and_time(vid_root: Path, tmp_path: Path):
    """VID → 2 sites: SEQ1 (4 frames) → site 0 as 2/1/1, SEQ2 (3) → site 1 as 1/1/1, in time order.

    Site classes are the train split's: site 0 trains on frames 1-2 (car → {3}),
    site 1 on frame 1 (truck → {5}).
    """
    # Prepare
    out = tmp_path / "vid_out"
    # Execute
    sites = build_sites([vid_root], out, kind="vid", n_sites=2, seed=0,
                        positions=[(0.0, 0.0), (3.0, 4.0)])
    # Assert
    s0, s1 = sites
    l0, l1 = _labels_by_name(s0.root), _labels_by_name(s1.root)
    assert {k: v[0] for k, v in l0.items()} == {
        f"{SEQ1}_0000001": "train", f"{SEQ1}_0000002": "train",
        f"{SEQ1}_0000003": "val", f"{SEQ1}_0000004": "test",
    }
    assert {k: v[0] for k, v in l1.items()} == {
        f"{SEQ2}_0000001": "train", f"{SEQ2}_0000002": "val", f"{SEQ2}_0000003": "test",
    }
    got = {k: v[1] for k, v in {**l0, **l1}.items()}
    assert got == {k.replace("/", "_"): v for k, v in VID_EXPECTED.items()}
    assert (s0.classes, s1.classes) == ([3], [5])
    assert s1.position_km == (3.0, 4.0)
    img = s0.root / "images" / "train" / f"{SEQ1}_0000001.png"
    assert img.is_symlink() and img.resolve() == (vid_root / "sequences" / SEQ1 / "0000001.png").resolve()


def test_scan_vid_samples(vid_root: Path):
    samples = scan_vid(vid_root)
    assert {s.key: s.labels for s in samples} == VID_EXPECTED


def test_scan_reports_the_bad_annotation_line(det_root: Path):
    """A malformed line inside a scanned split names the file and the line number."""
    write_lines(det_root / "annotations" / "0000002_00000_d_0000002.txt",
                ["32,8,4,4,1,9,0,0", "32,8,4,4,1,x,0,0"])
    with pytest.raises(ValueError, match=r"0000002_00000_d_0000002\.txt:2: non-integer"):
        scan_det(det_root)


def test_scan_det_missing_annotation(det_root: Path):
    (det_root / "annotations" / "0000004_00000_d_0000004.txt").unlink()
    with pytest.raises(ValueError, match="0000004_00000_d_0000004.txt"):
        scan_det(det_root)
    with pytest.raises(ValueError, match="no folder sequences/"):
        scan_vid(det_root)


def test_size_lookup_callable_is_used(det_root: Path):
    """A size_of callable replaces header reading (e.g. 200×100 doubles every width in px)."""
    samples = scan_det(det_root, size_of=lambda path: (200, 100))
    first = {s.key: s.labels for s in samples}["0000001_00000_d_0000001"]
    # car 90,10,20,20 in a 200×100 image: no clipping → cx 100/200, cy 20/100, w .1, h .2
    assert first[0] == "3 0.500000 0.200000 0.100000 0.200000"


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def test_cli_det(det_root: Path, tmp_path: Path, capsys):
    """`python -m common.visdrone --det-root ... --out ... --sites 2`: 2 sites, rerun needs --overwrite."""
    # Prepare
    out = tmp_path / "cli_out"
    argv = ["--det-root", str(det_root), "--out", str(out), "--sites", "2", "--link", "copy"]
    # Execute
    rc = main(argv)
    rc_again = main(argv)
    rc_overwrite = main(argv + ["--overwrite"])
    # Assert
    assert (rc, rc_again, rc_overwrite) == (0, 2, 0)
    meta = json.loads((out / "sites.json").read_text())
    assert [m["name"] for m in meta] == ["site_0", "site_1"]
    assert sum(sum(m["counts"].values()) for m in meta) == 4
    assert meta[0]["position_km"] == [5.0, 0.0]
    captured = capsys.readouterr()
    assert "exists; pass overwrite=True" in captured.err
    assert "site_1:" in captured.out


def test_cli_module_entry_point(vid_root: Path, tmp_path: Path):
    """The module runs as a script (`python -m common.visdrone --vid-root ...`)."""
    out = tmp_path / "m_out"
    proc = subprocess.run(
        [sys.executable, "-m", "common.visdrone", "--vid-root", str(vid_root),
         "--out", str(out), "--sites", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "site_0" / "data.yaml").is_file() and (out / "site_1" / "data.yaml").is_file()


def test_write_sites_rejects_bad_positions(det_root: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"position of site 0 must be \(x_km, y_km\)"):
        build_sites([det_root], tmp_path / "o", n_sites=1, positions=[(1.0, 2.0, 3.0)])
    assert not (tmp_path / "o" / "site_0").exists()


def test_cli_requires_a_root(tmp_path: Path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
