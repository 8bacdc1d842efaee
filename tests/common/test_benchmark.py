"""Tests for common.benchmark: the procedural built-in benchmark (determinism, layout, labels)."""

import hashlib
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from common.benchmark import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    NUM_CLASSES,
    GeneratorSettings,
    _rng,
    generate,
    make_sites,
    render_scene,
    yolo_lines,
)


def _hashes(root: Path, suffixes=(".png", ".txt", ".mp4", ".json")) -> dict[str, str]:
    """sha256 of every generated file under ``root`` (``data.yaml`` holds the absolute path: left out)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in suffixes}


def _labels(label_dir: Path) -> list[list[str]]:
    return [line.split() for txt in sorted(label_dir.glob("*.txt")) for line in txt.read_text().splitlines()]


SMALL = GeneratorSettings(num_sites=2, imgsz=96, train_per_site=3, val_per_site=1, test_per_site=1,
                          public_per_site=2, public_train_per_site=1, video_frames=6)


# --- determinism and caching ----------------------------------------------------------------


def test_same_settings_give_identical_bytes(tmp_path):
    # Execute
    a = generate(SMALL, tmp_path / "a")
    b = generate(SMALL, tmp_path / "b")

    # Assert
    ha, hb = _hashes(a.root), _hashes(b.root)
    assert len(ha) > 0 and ha == hb
    # 2 sites x (3 + 1 + 1) images, 2 public test and 1 public train image per site
    assert sum(k.endswith(".png") for k in ha) == 2 * 5 + 2 * 2 + 2 * 1


def test_other_seed_gives_other_bytes(tmp_path):
    a = generate(SMALL, tmp_path / "a")
    b = generate(replace(SMALL, seed=1), tmp_path / "a")

    assert a.root != b.root  # the folder name hashes the settings
    ha, hb = _hashes(a.root, (".png",)), _hashes(b.root, (".png",))
    assert ha.keys() == hb.keys()
    assert all(ha[k] != hb[k] for k in ha)


def test_second_generate_reuses_and_leaves_no_temp_folder(tmp_path):
    # Prepare
    first = generate(SMALL, tmp_path)
    manifest = first.root / "manifest.json"
    image = first.site_dir(0) / "images" / "train" / "site-0-train-00000.png"
    stamps = (manifest.stat().st_mtime_ns, image.stat().st_mtime_ns)

    # Execute
    second = generate(SMALL, tmp_path)

    # Assert
    assert second.root == first.root
    assert (manifest.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]  # no "<name>.tmp-<pid>" left
    assert first.root.name == f"builtin-{SMALL.key()}"


def test_manifest_records_settings_and_sites(tiny_benchmark, tiny_settings):
    manifest = json.loads((tiny_benchmark.root / "manifest.json").read_text())

    assert manifest["settings"]["imgsz"] == 128 and manifest["settings"]["num_sites"] == 2
    assert manifest["class_names"] == list(CLASS_NAMES)
    assert [s["site_id"] for s in manifest["sites"]] == ["site-0", "site-1"]


# --- labels ---------------------------------------------------------------------------------


def test_label_geometry(tiny_benchmark):
    for site in tiny_benchmark.sites:
        rows = _labels(tiny_benchmark.site_dir(site.index) / "labels" / "train")
        rows += _labels(tiny_benchmark.site_dir(site.index) / "labels" / "test")
        assert len(rows) >= 8 * 4  # at least objects_per_image[0] = 4 per train image
        for row in rows:
            assert len(row) == 5
            cls, cx, cy, w, h = int(row[0]), *map(float, row[1:])
            assert cls in site.classes
            assert w > 0 and h > 0
            assert 0.0 <= cx - w / 2 and cx + w / 2 <= 1.0
            assert 0.0 <= cy - h / 2 and cy + h / 2 <= 1.0


def test_every_image_has_one_label_file(tiny_benchmark):
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        images = sorted(p.stem for p in (tiny_benchmark.site_dir(1) / "images" / split).glob("*.png"))
        labels = sorted(p.stem for p in (tiny_benchmark.site_dir(1) / "labels" / split).glob("*.txt"))
        assert images == labels
        assert len(images) == n


@pytest.fixture(scope="module")
def many_boxes(tmp_path_factory):
    s = GeneratorSettings(num_sites=2, imgsz=128, train_per_site=40, val_per_site=1, test_per_site=1,
                          public_per_site=1, public_train_per_site=1, video_frames=6,
                          objects_per_image=(10, 12))
    return s, generate(s, tmp_path_factory.mktemp("many-boxes"))


@pytest.mark.parametrize("index", [0, 1])
def test_size_mix_matches_the_site_small_fraction(many_boxes, index):
    # Prepare: enough boxes for a tight bound. _sample_box draws "small" with probability
    # small_fraction, side in small_px=[4, 12] and longer side scaled to <= 12 px; a large box has
    # side in [16, 32] and longer side = side * sqrt(max(a, 1/a)) >= 16 px (scaled down to 32 at most).
    # So "longer side < 16 px" is exactly "drawn small" (labels have 6 decimals: error < 1e-4 px),
    # and the count of small boxes is Binomial(N, p) with p = the site's small_fraction.
    s, bench = many_boxes
    site = bench.sites[index]

    # Execute
    rows = _labels(bench.site_dir(index) / "labels" / "train")
    longer = np.array([max(float(r[3]), float(r[4])) * s.imgsz for r in rows])

    # Assert
    assert site.small_fraction == pytest.approx((0.75, 0.83)[index])
    assert not np.any((longer > 12.0 + 1e-3) & (longer < 16.0 - 1e-3))  # nothing in the gap
    n = len(longer)  # >= 40 x 10 = 400
    frac = float(np.mean(longer < 15.5))
    tol = 4 * math.sqrt(site.small_fraction * (1 - site.small_fraction) / n)  # 4 sigma: ~0.085 at n=400
    assert n >= 400
    assert abs(frac - site.small_fraction) < tol


def test_yolo_lines_hand_worked():
    # box (10, 20)-(30, 60) in a 100 px image: centre (0.2, 0.4), size (0.2, 0.4); class 2 -> label 5
    # a box past the right edge is clipped to 100; a box fully outside is dropped
    boxes = [(2, 10.0, 20.0, 30.0, 60.0), (0, 90.0, 0.0, 110.0, 10.0), (1, 120.0, 5.0, 130.0, 9.0)]
    label_map = (3, 4, 5, 6, 7, 0, 1, 2)

    lines = yolo_lines(boxes, 100, label_map)

    assert lines == ["5 0.200000 0.400000 0.200000 0.400000", "3 0.950000 0.050000 0.100000 0.100000"]


# --- layout ---------------------------------------------------------------------------------


def test_data_yaml_keys(tiny_benchmark):
    for path in [tiny_benchmark.site_data(0), tiny_benchmark.site_data(1), tiny_benchmark.public_data]:
        data = yaml.safe_load(path.read_text())
        assert list(data) == ["path", "train", "val", "test", "nc", "names"]
        assert "download" not in path.read_text()
        assert data["nc"] == NUM_CLASSES == 8
        assert data["names"] == dict(enumerate(CLASS_NAMES))
        assert Path(data["path"]) == path.parent.resolve()  # the final folder, not the temporary one
    site = yaml.safe_load(tiny_benchmark.site_data(0).read_text())
    assert (site["train"], site["val"], site["test"]) == ("images/train", "images/val", "images/test")


def test_site_json_matches_make_sites(tiny_benchmark, tiny_settings):
    for site in make_sites(tiny_settings):
        stored = json.loads((tiny_benchmark.site_dir(site.index) / "site.json").read_text())
        assert stored["classes"] == list(site.classes)
        assert stored["position_km"] == list(site.position_km)
        assert stored["small_fraction"] == site.small_fraction


def test_public_benchmark_has_every_non_noisy_site(tmp_path):
    # Prepare: 2 sites plus the noisy one (site-2), 2 public images per site
    bench = generate(replace(SMALL, noisy_site=True), tmp_path)

    # Execute
    stems = sorted(p.stem for p in (bench.root / "public" / "images" / "test").glob("*.png"))
    train = sorted(p.stem for p in (bench.root / "public" / "images" / "train").glob("*.png"))

    # Assert: a test split (edge evaluation) and a disjoint train split (the cloud model's data)
    assert stems == ["public-site-0-test-00000", "public-site-0-test-00001",
                     "public-site-1-test-00000", "public-site-1-test-00001"]
    assert train == ["public-site-0-train-00000", "public-site-1-train-00000"]
    public_yaml = yaml.safe_load(bench.public_data.read_text())
    assert (public_yaml["test"], public_yaml["val"], public_yaml["train"]) == ("images/test", "images/test",
                                                                               "images/train")
    labels = sorted(p.stem for p in (bench.root / "public" / "labels" / "test").glob("*.txt"))
    assert labels == stems


def test_video(tiny_benchmark):
    # Prepare
    vdir = tiny_benchmark.video_dir(1)

    # Execute
    cap = cv2.VideoCapture(str(vdir / "video.mp4"))
    frames = []
    ok, frame = cap.read()
    while ok:
        frames.append(frame)
        ok, frame = cap.read()
    reported = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    meta = json.loads((vdir / "meta.json").read_text())

    # Assert: T=12 frames of 128x128, cut at T//2=6, still stretch [T//4, T//4 + max(2, T//6)) = [3, 5)
    assert len(frames) == 12 and reported == 12
    assert all(f.shape == (128, 128, 3) for f in frames)
    assert sorted(p.name for p in (vdir / "labels").glob("*.txt")) == [f"{t:06d}.txt" for t in range(12)]
    assert meta == {"frames": 12, "fps": 10.0, "cut_frames": [6], "still": [3, 5], "imgsz": 128}
    # still stretch: nothing moves, only noise changes; a cut changes the scene
    still = np.abs(frames[4].astype(float) - frames[3].astype(float)).mean()
    cut = np.abs(frames[6].astype(float) - frames[5].astype(float)).mean()
    assert cut > 3 * still


# --- sites ----------------------------------------------------------------------------------


def test_make_sites_four_sites_hand_checked():
    # Site i: classes {(2i + k) mod 8 : k < 5}, position spacing * (i mod 3, i div 3),
    # domain i mod 6, small_fraction 0.75 + (0, 0.08, -0.08, 0.12)[i]
    s = GeneratorSettings(num_sites=4, site_spacing_km=2.0)

    sites = make_sites(s)

    assert [x.classes for x in sites] == [(0, 1, 2, 3, 4), (2, 3, 4, 5, 6), (0, 4, 5, 6, 7), (0, 1, 2, 6, 7)]
    assert [x.position_km for x in sites] == [(0.0, 0.0), (2.0, 0.0), (4.0, 0.0), (0.0, 2.0)]
    assert [x.domain for x in sites] == ["grassland", "desert", "urban-dusk", "snow"]
    assert [x.small_fraction for x in sites] == pytest.approx([0.75, 0.83, 0.67, 0.87])
    assert [x.site_id for x in sites] == ["site-0", "site-1", "site-2", "site-3"]
    assert not any(x.noisy for x in sites)
    assert all(x.draw_classes == x.classes for x in sites)


def test_similar_pairs_share_classes_domain_and_size_mix_but_not_images(tmp_path):
    """similar_pairs: sites 2k, 2k+1 are of site 2k's kind; positions stay on the grid; default key unchanged."""
    s = GeneratorSettings(num_sites=4, site_spacing_km=2.0, similar_pairs=True)

    sites = make_sites(s)

    assert [x.classes for x in sites] == [(0, 1, 2, 3, 4)] * 2 + [(0, 4, 5, 6, 7)] * 2
    assert [x.domain for x in sites] == ["grassland", "grassland", "urban-dusk", "urban-dusk"]
    assert [x.small_fraction for x in sites] == pytest.approx([0.75, 0.75, 0.67, 0.67])
    assert [x.position_km for x in sites] == [(0.0, 0.0), (2.0, 0.0), (4.0, 0.0), (0.0, 2.0)]
    assert GeneratorSettings(num_sites=4).key() != s.key()
    # the default's key is computed as before the field existed: caches generated earlier stay valid
    old = {k: v for k, v in asdict(GeneratorSettings()).items() if k != "similar_pairs"}
    blob = json.dumps({"version": GENERATOR_VERSION, **old}, sort_keys=True).encode()
    assert GeneratorSettings().key() == hashlib.sha256(blob).hexdigest()[:12]
    tiny = GeneratorSettings(num_sites=2, imgsz=64, train_per_site=2, val_per_site=1, test_per_site=1,
                             public_per_site=1, public_train_per_site=1, video_frames=4, similar_pairs=True)
    bench = generate(tiny, tmp_path)
    a, b = (sorted((bench.site_dir(i) / "images" / "train").glob("*.png")) for i in (0, 1))
    assert a[0].read_bytes() != b[0].read_bytes()


def test_make_sites_small_fraction_is_clipped():
    sites = make_sites(GeneratorSettings(num_sites=4, small_fraction=0.95))

    assert [x.small_fraction for x in sites] == pytest.approx([0.95, 1.0, 0.87, 1.0])


def test_noisy_site_uses_the_permuted_map():
    # label_map c -> (c + 3) mod 8; it draws kinds 0..4 and labels them 3..7
    sites = make_sites(GeneratorSettings(num_sites=4, noisy_site=True))

    noisy = sites[4]
    assert len(sites) == 5 and noisy.noisy and noisy.site_id == "site-4"
    assert noisy.label_map == (3, 4, 5, 6, 7, 0, 1, 2)
    assert noisy.classes == (3, 4, 5, 6, 7)
    assert noisy.draw_classes == (0, 1, 2, 3, 4)
    assert noisy.position_km == (20.0, 20.0)
    assert all(c != d for d, c in enumerate(noisy.label_map))  # a derangement


def test_noisy_site_labels_are_the_permuted_classes(tmp_path):
    # Prepare
    s = replace(SMALL, noisy_site=True)
    bench = generate(s, tmp_path)
    noisy = bench.sites[2]

    # Execute: re-render the first train scene and compare with the label file on disk
    _, boxes = render_scene(_rng(s.seed, noisy.index, 0, 0), s, noisy, s.imgsz)
    written = (bench.site_dir(2) / "labels" / "train" / "site-2-train-00000.txt").read_text().splitlines()

    # Assert: same geometry, class id = label_map[drawn class]
    identity = yolo_lines(boxes, s.imgsz, tuple(range(NUM_CLASSES)))
    assert [ln.split()[1:] for ln in written] == [ln.split()[1:] for ln in identity]
    assert [int(ln.split()[0]) for ln in written] == [(int(ln.split()[0]) + 3) % 8 for ln in identity]
    all_ids = {int(r[0]) for r in _labels(bench.site_dir(2) / "labels" / "train")}
    assert all_ids <= set(noisy.classes)
    assert json.loads((bench.site_dir(2) / "site.json").read_text())["classes"] == [3, 4, 5, 6, 7]
