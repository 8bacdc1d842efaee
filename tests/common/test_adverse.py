"""Tests for common.adverse: the corruptions' values, determinism, dataset copies and the training hook."""

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from common import adverse as A
from common.adverse import AdverseError


def apply(image: np.ndarray, condition: str, severity: int, rng) -> np.ndarray:
    """The corrupted image alone."""
    return A.apply_with_boxes(image, None, condition, severity, rng)[0]


def _grey(value: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A textured 64 x 80 BGR image (not constant, so every condition changes it)."""
    rng = np.random.default_rng(7)
    return cv2.GaussianBlur(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), (5, 5), 1.5)


# --- fog ------------------------------------------------------------------------------------


def test_fog_with_zero_beta_is_the_identity(scene):
    assert np.array_equal(A.fog(scene, 0.0, rng=1), scene)


def test_fog_hand_computed_half_transmission():
    # J = 100, A = 200, d = 1, beta = ln 2: t = 0.5, I = 0.5 * 100 + 0.5 * 200 = 150
    out = A.fog(_grey(100), math.log(2), airlight=200.0, depth=np.ones((24, 32), np.float32))

    assert np.all(out == 150)


def test_fog_with_vanishing_transmission_is_the_airlight(scene):
    # d >= 0.5, beta = 1000: t <= exp(-500) = 0 in float32 -> A everywhere
    out = A.fog(scene, 1000.0, rng=3, airlight=(10, 120, 230))

    assert np.all(out == np.array([10, 120, 230], np.uint8))


def test_depth_map_is_smooth_and_in_range():
    d = A.depth_map((60, 80), rng=0)

    assert d.shape == (60, 80) and d.dtype == np.float32
    assert d.min() == pytest.approx(0.5) and d.max() == pytest.approx(1.0)
    assert np.abs(np.diff(d, axis=0)).max() < 0.05 and np.abs(np.diff(d, axis=1)).max() < 0.05  # smooth
    assert d[:10].mean() > d[-10:].mean()  # the top of the frame is farther


def test_fog_needs_an_rng_or_a_depth(scene):
    with pytest.raises(AdverseError, match="rng"):
        A.fog(scene, 1.0)


# --- low light ------------------------------------------------------------------------------


def test_low_light_hand_computed_without_noise():
    # gamma 2, exposure 0.4: 255 -> 255 * 0.4 = 102; 128 -> 102 * (128/255)**2 = 25.70 -> 26; 0 -> 0
    img = np.array([[[255, 128, 0]]], np.uint8)

    out = A.low_light(img, gamma=2.0, exposure=0.4)

    assert out.tolist() == [[[102, 26, 0]]]


def test_low_light_gamma_one_full_exposure_is_the_identity(scene):
    assert np.array_equal(A.low_light(scene, 1.0, 1.0), scene)


def test_low_light_noise_is_poisson_gaussian():
    # mu = 25.70; photons 150: shot variance 255 * mu / 150 = 43.69 (DN^2), read noise 3: 9 -> std 7.26
    img = _grey(128, 200, 200)

    out = A.low_light(img, 2.0, 0.4, rng=0, photons=150.0, read_noise=3.0).astype(np.float64)

    assert out.mean() == pytest.approx(25.70, abs=0.15)
    assert out.std() == pytest.approx(math.sqrt(255 * 25.70 / 150 + 9 + 1 / 12), abs=0.15)  # + rounding


def test_low_light_rejects_bad_parameters(scene):
    with pytest.raises(AdverseError, match="exposure=0"):
        A.low_light(scene, 2.0, 0.0)
    with pytest.raises(AdverseError, match="rng"):
        A.low_light(scene, 2.0, 0.5, photons=10.0)


# --- motion blur ----------------------------------------------------------------------------


@pytest.mark.parametrize("length, angle", [(1, 0), (3, 0), (5, 90), (9, 33.3), (15, 135), (4.5, 10)])
def test_motion_blur_kernel_sums_to_one_and_constant_stays_constant(length, angle):
    k = A.motion_blur_kernel(length, angle)

    assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert k.sum() == pytest.approx(1.0, abs=1e-6) and k.min() >= 0
    assert np.array_equal(A.motion_blur(_grey(77), length, angle), _grey(77))


def test_motion_blur_kernel_horizontal_line():
    k = A.motion_blur_kernel(3, 0)
    r = k.shape[0] // 2

    assert np.allclose(k[r, r - 1:r + 2], 1 / 3) and k.sum() - k[r, r - 1:r + 2].sum() == pytest.approx(0)


@pytest.mark.parametrize("angle, expected", [(0, [(10, 9), (10, 10), (10, 11)]), (90, [(9, 10), (10, 10), (11, 10)])])
def test_motion_blur_spreads_an_impulse_along_the_motion(angle, expected):
    # one pixel of 90, length 3: three pixels of 30 along the direction of motion
    img = np.zeros((21, 21, 3), np.uint8)
    img[10, 10] = 90

    out = A.motion_blur(img, 3, angle)

    assert sorted(zip(*np.nonzero(out[..., 0]))) == expected
    assert np.all(out[tuple(np.array(expected).T)] == 30)


def test_motion_blur_length_one_is_the_identity(scene):
    assert np.array_equal(A.motion_blur(scene, 1, 45), scene)


# --- occlusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction, seed", [(0.1, 0), (0.2, 1), (0.35, 2), (0.6, 3)])
def test_occlusion_covers_the_requested_fraction(fraction, seed):
    img = _grey(128, 160, 200)

    out, t = A.occlusion(img, fraction, seed, return_transmission=True)

    covered = t < 1
    assert covered.mean() == pytest.approx(fraction, abs=0.003)
    assert np.array_equal(out[~covered], img[~covered])  # nothing outside the occluders changes
    assert (t == 0).any()  # opaque occluders (70 % of them)
    if fraction > 0.3:  # many occluders: semi-opaque ones too
        assert ((t > 0) & (t < 1)).any()


def test_occlusion_zero_fraction_is_the_identity(scene):
    out, t = A.occlusion(scene, 0.0, 0, return_transmission=True)

    assert np.array_equal(out, scene) and np.all(t == 1)


def test_keep_visible_drops_only_hidden_objects():
    # left half opaque (t = 0), right half behind a semi-opaque occluder (t = 0.4)
    t = np.ones((20, 40), np.float32)
    t[:, :20] = 0.0
    t[:, 20:30] = 0.4
    boxes = np.array([
        [2, 2, 10, 10],  # fully under the opaque half: dropped
        [15, 2, 25, 10],  # half visible: kept
        [22, 2, 28, 10],  # behind the semi-opaque occluder: kept
        [19.5, 0, 39.5, 1],  # 20 of 21 columns visible (floor/ceil pixel cover): kept
        [0, 0, 19.5, 20],  # pixels 0..19, all hidden: dropped
        [10, 0, 20.5, 20],  # 1 of 11 columns visible: 0.09 < 0.1, dropped
    ])

    vis = A.visible_fraction(boxes, t)
    keep = A.keep_visible(boxes, t)

    assert vis == pytest.approx([0.0, 0.5, 1.0, 20 / 21, 0.0, 1 / 11])
    assert keep.tolist() == [False, True, True, True, False, False]


# --- apply, determinism ---------------------------------------------------------------------


@pytest.mark.parametrize("condition", A.CONDITIONS)
def test_same_seed_same_output_and_other_seed_differs(scene, condition):
    a = apply(scene, condition, 2, np.random.default_rng(5))
    b = apply(scene, condition, 2, np.random.default_rng(5))
    c = apply(scene, condition, 2, np.random.default_rng(6))

    assert a.dtype == np.uint8 and a.shape == scene.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, scene)


@pytest.mark.parametrize("condition", A.CONDITIONS)
def test_apply_severity_zero_is_clean_and_severity_grows(scene, condition):
    assert np.array_equal(apply(scene, condition, 0, 0), scene)
    dist = [np.abs(apply(scene, condition, s, 0).astype(float) - scene).mean() for s in A.SEVERITIES]
    assert dist[0] < dist[1] < dist[2]


def test_apply_with_boxes_image_does_not_depend_on_the_boxes_and_only_occlusion_drops(scene):
    boxes = np.array([[0, 0, 80, 64], [10, 10, 12, 12]], float)
    for condition in A.CONDITIONS:
        img, keep = A.apply_with_boxes(scene, boxes, condition, 3, 11)
        assert np.array_equal(img, apply(scene, condition, 3, 11))
        if condition != "occlusion":
            assert keep.all()
    assert A.apply_with_boxes(scene, boxes, "occlusion", 3, 11)[1][0]  # the whole image stays visible


def test_motion_blur_length_scales_with_the_image():
    assert A.condition_params("motion_blur", 2, (320, 320))["length_px"] == 9
    assert A.condition_params("motion_blur", 2, (480, 640))["length_px"] == 18
    assert A.condition_params("fog", 2, (480, 640)) == {"beta": 1.2}


def test_unknown_condition_and_bad_severity_are_named(scene):
    with pytest.raises(AdverseError, match="unknown condition 'rain'"):
        apply(scene, "rain", 1, 0)
    with pytest.raises(AdverseError, match="severity=4"):
        apply(scene, "fog", 4, 0)
    with pytest.raises(AdverseError, match="expected a BGR uint8"):
        apply(scene.astype(np.float32), "fog", 1, 0)


def test_input_is_never_modified(scene):
    before = scene.copy()
    for condition in A.CONDITIONS:
        apply(scene, condition, 3, 0)
    assert np.array_equal(scene, before)


# --- the training hook ----------------------------------------------------------------------


def test_adverse_augment_p0_never_and_p1_always(scene):
    never, always = A.AdverseAugment(0.0, seed=1), A.AdverseAugment(1.0, seed=1)
    boxes = np.array([[1, 1, 5, 5]], float)

    outs = [never(scene, boxes) for _ in range(20)]
    changed = [not np.array_equal(always(scene, boxes)[0], scene) for _ in range(40)]

    assert all(img is scene and keep is None for img, keep in outs)
    assert (never.calls, sum(never.applied.values())) == (20, 0)
    assert all(changed) and always.calls == 40 and sum(always.applied.values()) == 40
    assert set(always.applied) == set(A.CONDITIONS)


def test_adverse_augment_rejects_bad_settings():
    with pytest.raises(AdverseError, match="adverse_p=1.5"):
        A.AdverseAugment(1.5)
    with pytest.raises(AdverseError, match="unknown condition 'snow'"):
        A.AdverseAugment(0.5, conditions=("fog", "snow"))


# --- adverse copies of a dataset ------------------------------------------------------------


def _labels(folder: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().splitlines() for p in sorted(folder.glob("*.txt"))}


def test_make_variant_fog_copies_labels(tiny_benchmark, tmp_path):
    site = tiny_benchmark.site_dir(0)

    data = A.make_variant(tiny_benchmark.site_data(0), ["test"], "fog", 2, tmp_path / "fog")

    cfg = yaml.safe_load(data.read_text())
    assert "download" not in cfg
    assert (cfg["path"], cfg["test"], cfg["train"], cfg["val"]) == (str((tmp_path / "fog").resolve()),
                                                                    "images/test", "images/test", "images/test")
    assert cfg["names"] == yaml.safe_load(tiny_benchmark.site_data(0).read_text())["names"]
    src = sorted((site / "images" / "test").glob("*.png"))
    out = sorted((tmp_path / "fog" / "images" / "test").glob("*.png"))
    assert [p.name for p in out] == [p.name for p in src]
    for s, o in zip(src, out):
        assert not np.array_equal(cv2.imread(str(s)), cv2.imread(str(o)))
    assert _labels(tmp_path / "fog" / "labels" / "test") == _labels(site / "labels" / "test")


def test_make_variant_is_deterministic_and_occlusion_drops_hidden_labels(tiny_benchmark, tmp_path):
    site = tiny_benchmark.site_dir(0)
    args = (tiny_benchmark.site_data(0), ["test", "val"], "occlusion", 3)

    A.make_variant(*args, tmp_path / "a", seed=4)
    A.make_variant(*args, tmp_path / "b", seed=4)
    A.make_variant(*args, tmp_path / "all", seed=4, min_visible=0.0)  # keep everything

    for split in ("test", "val"):
        for p in (tmp_path / "a" / "images" / split).glob("*.png"):
            assert np.array_equal(cv2.imread(str(p)), cv2.imread(str(tmp_path / "b" / "images" / split / p.name)))
        kept, src = _labels(tmp_path / "a" / "labels" / split), _labels(site / "labels" / split)
        assert all(set(kept[k]) <= set(src[k]) for k in src)  # a subset, lines unchanged
        assert _labels(tmp_path / "all" / "labels" / split) == src
    meta = yaml.safe_load((tmp_path / "a" / "adverse.json").read_text())
    assert meta["condition"] == "occlusion" and meta["params"] == {"fraction": 0.35}
    dropped = sum(len(src) - len(kept) for kept, src in
                  ((_labels(tmp_path / "a" / "labels" / s)[k], _labels(site / "labels" / s)[k])
                   for s in ("test", "val") for k in _labels(site / "labels" / s)))
    assert dropped == meta["splits"]["test"]["dropped_labels"] + meta["splits"]["val"]["dropped_labels"]
    cfg = yaml.safe_load((tmp_path / "a" / "data.yaml").read_text())
    assert (cfg["test"], cfg["val"], cfg["train"]) == ("images/test", "images/val", "images/test")


def test_cli_make_and_errors(tiny_benchmark, tmp_path, capsys):
    rc = A.main(["make", "--data", str(tiny_benchmark.site_data(0)), "--split", "test", "--condition",
                 "motion_blur", "--severity", "1", "--out", str(tmp_path / "mb")])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "mb" / "data.yaml")
    assert len(list((tmp_path / "mb" / "images" / "test").glob("*.png"))) == 4

    rc = A.main(["make", "--data", str(tmp_path / "none.yaml"), "--condition", "fog", "--out", str(tmp_path / "x")])
    assert rc == 2 and "dataset file not found" in capsys.readouterr().err


# --- training with the hook (common.yolo.train) ----------------------------------------------


def _train(tiny_benchmark, augment, mosaic=1.0):
    import torch

    from common import yolo

    torch.set_num_threads(1)
    model = yolo.build_model("yolo11n", nc=8, seed=0)
    res = yolo.train(model, tiny_benchmark.site_data(0), epochs=1, imgsz=128, batch=4, warmup_iters=2,
                     mosaic=mosaic, seed=3, progress=False, augment=augment)
    return yolo.state_dict(model), res


def test_train_with_p1_corrupts_every_training_image(tiny_benchmark):
    # 8 train images, no mosaic, batch 4: 2 iterations, every image loaded once and corrupted once
    from common.sites import label_path

    seen = []

    class Spy(A.AdverseAugment):
        def __call__(self, image, boxes):
            out, keep = super().__call__(image, boxes)
            seen.append((image.shape, not np.array_equal(out, image), np.asarray(boxes, float)))
            return out, keep

    spy = Spy(1.0, seed=2)
    _, res = _train(tiny_benchmark, spy, mosaic=0.0)

    assert res.iterations == 2 and spy.calls == 8 and sum(spy.applied.values()) == 8
    assert all(shape == (128, 128, 3) and changed for shape, changed, _ in seen)
    # the boxes the hook sees are the label files' boxes in pixels of the loaded image
    files = sorted((tiny_benchmark.site_dir(0) / "images" / "train").glob("*.png"))
    expected = []
    for f in files:
        rows = np.loadtxt(label_path(f), ndmin=2).reshape(-1, 5)
        expected.append(np.stack([rows[:, 1] - rows[:, 3] / 2, rows[:, 2] - rows[:, 4] / 2,
                                  rows[:, 1] + rows[:, 3] / 2, rows[:, 2] + rows[:, 4] / 2], 1) * 128)
    for _, _, boxes in seen:
        assert sum(len(e) == len(boxes) and np.allclose(np.sort(e, 0), np.sort(boxes, 0), atol=1e-3)
                   for e in expected) >= 1


def test_train_hook_can_drop_labels(tiny_benchmark):
    # a hook that drops every label: training still runs (images without objects), the box loss is 0
    drop_all = lambda image, boxes: (image, np.zeros(len(boxes), bool))  # noqa: E731

    _, res = _train(tiny_benchmark, drop_all, mosaic=0.0)

    assert res.iterations == 2 and math.isfinite(res.loss)
    assert res.loss_items["box_loss"] == 0.0


def test_train_with_p0_is_bit_identical_to_no_hook(tiny_benchmark):
    import torch

    plain, res_plain = _train(tiny_benchmark, None)
    hooked, res_hooked = _train(tiny_benchmark, A.AdverseAugment(0.0, seed=9))

    assert res_plain.iterations == 2
    assert all(torch.equal(plain[k], hooked[k]) for k in plain)
    assert res_hooked.loss == res_plain.loss


# --- config and the site's trainer ------------------------------------------------------------


def test_config_adverse_p_defaults_off_and_is_checked():
    from common.config import ConfigError, load_config

    assert load_config("quick").train.adverse_p == 0.0
    assert load_config("quick", {"train.adverse-p": "0.5"}).train.adverse_p == 0.5
    with pytest.raises(ConfigError, match="train.adverse_p=1.5"):
        load_config("quick", {"train.adverse-p": 1.5})


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_site_passes_the_hook_only_when_adverse_p_is_set(tiny_overrides, monkeypatch, p):
    from clients.site import LocalSite
    from common import yolo
    from common.config import load_config
    from common.sites import resolve_site

    class Stop(Exception):
        pass

    seen = {}

    def fake_train(model, data, **kwargs):
        seen.update(kwargs)
        raise Stop

    cfg = load_config("quick", {**tiny_overrides, "train.adverse-p": p})
    site = LocalSite(cfg, resolve_site(cfg, {"partition-id": 1}), Path("/nonexistent"))
    monkeypatch.setattr(LocalSite, "build_model", lambda self, *a, **k: object())
    monkeypatch.setattr(yolo, "train", fake_train)

    with pytest.raises(Stop):
        site.train_round(3, 1, None)

    if p == 0:
        assert seen["augment"] is None
    else:
        aug = seen["augment"]
        assert isinstance(aug, A.AdverseAugment) and aug.p == 0.5 and aug.conditions == A.CONDITIONS
        assert seen["seed"] == cfg.seed + 3000 + 1
