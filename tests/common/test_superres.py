"""Edge super-resolution (common/superres.py) and the edge runtime's ``--upscale``.

Hand-built images check the pieces (patch grid, overlap averaging, gradient
features, PSNR); an image pair whose HR/LR relation is exactly linear in the
features checks the learning; the tiny benchmark checks that the learned
upscaler beats bicubic on held-out images.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from common import superres as sr
from common.superres import ANRParams, SuperResError


def _smooth_image(seed: int, size: tuple[int, int] = (41, 41)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.random(size, dtype=np.float32) * 255, (5, 5), 1.0)


def _tiny_model(seed: int = 0) -> sr.ANRModel:
    """A quickly trained x2 model (4 atoms) on two random smooth colour images."""
    images = [np.clip(cv2.merge([_smooth_image(seed + i + c, (64, 64)) for c in range(3)]), 0, 255).astype(np.uint8)
              for i in range(2)]
    return sr.train(images, ANRParams(atoms=4, neighbours=256, samples=3000, kmeans_iters=3))


# =========================================================================== pieces


def test_patch_grid_pads_to_a_regular_grid():
    assert sr.patch_grid(7, 3, 2)[0].tolist() == [0, 2, 4] and sr.patch_grid(7, 3, 2)[1] == 7
    corners, padded = sr.patch_grid(8, 3, 2)  # 8 - 3 = 5 is odd: one padded row
    assert corners.tolist() == [0, 2, 4, 6] and padded == 9
    with pytest.raises(SuperResError, match="smaller than the patch"):
        sr.patch_grid(2, 3, 1)


def test_extract_then_average_is_exact_and_averages_overlaps():
    # Prepare: a hand-built 8x9 image (rows need one padded row at P=3, S=2; columns fit)
    image = np.arange(72, dtype=np.float64).reshape(8, 9)
    # Execute
    patches = sr.extract_patches(image, 3, 2)
    back = sr.average_patches(patches, image.shape, 2)
    # Assert: shapes, one patch by hand, the padded row, the exact round trip
    assert patches.shape == (4, 4, 3, 3)
    assert np.array_equal(patches[1, 2], image[2:5, 4:7])
    assert np.array_equal(patches[3, 0], np.vstack([image[6:8, 0:3], image[7:8, 0:3]]))  # row 8 = row 7
    assert np.array_equal(back, image)
    # overlap averaging by hand: patch (i, j) filled with 10 i + j; pixel (2, 0) lies in patches
    # (0, 0) and (1, 0): (0 + 10) / 2 = 5; pixel (2, 2) in (0,0), (0,1), (1,0), (1,1): 22 / 4 = 5.5
    const = (10.0 * np.arange(4)[:, None] + np.arange(4)[None, :])[:, :, None, None] * np.ones((1, 1, 3, 3))
    avg = sr.average_patches(const, (8, 9), 2)
    assert avg[2, 0] == 5.0 and avg[2, 2] == 5.5 and avg[0, 0] == 0.0 and avg[7, 8] == 33.0


def test_gradient_features_hand_checked():
    row = np.array([[0, 1, 4, 9, 16]], dtype=np.float32).repeat(5, axis=0)  # x^2 along x
    g = sr.gradient_features(row)
    assert g.shape == (5, 5, 4)
    assert g[2, :, 0].tolist() == [1, 4, 8, 12, 7]  # x_{i+1} - x_{i-1}, border replicated
    assert g[2, 2, 2] == 8  # x_0 - 2 x_2 + x_4 = 0 - 8 + 16
    assert not g[..., 1].any() and not g[..., 3].any()  # constant along y


def test_psnr_and_ssim_hand_checked():
    a = np.zeros((2, 2))
    b = np.array([[0, 0], [0, 10.0]])
    # MSE = 100 / 4 = 25, PSNR = 10 log10(255^2 / 25) = 10 log10(2601)
    assert sr.psnr(a, b) == pytest.approx(34.1514, abs=1e-4)
    assert sr.psnr(a, a) == math.inf
    big = np.pad(b, 1, constant_values=99.0)  # the border is ignored
    assert sr.psnr(np.pad(a, 1, constant_values=0.0), big, border=1) == pytest.approx(34.1514, abs=1e-4)
    img = _smooth_image(3)
    assert sr.ssim(img, img) == pytest.approx(1.0)
    assert sr.ssim(img, img + 20) < 1.0


# =========================================================================== learning


def test_learned_regressor_reproduces_an_exactly_linear_mapping():
    # Prepare: HR = mid + 0.7 d/dx(mid) - 0.2 d2/dy2(mid): the residual is linear in the features
    def pair(seed):
        mid = _smooth_image(seed)
        g = sr.gradient_features(mid)
        return mid, mid + 0.7 * g[..., 0] - 0.2 * g[..., 3]

    train = [pair(s) for s in range(4)]
    params = ANRParams(patch=3, stride=2, atoms=4, neighbours=400, lam=1e-6, pca_energy=1.0, samples=4000)
    # Execute: 41 - 3 is even, so the grid needs no padding and the relation holds at every patch
    model = sr.fit(train, params)
    mid, hr = pair(99)  # held out
    # Assert: every anchor's ridge regression recovers the linear map
    # 36 features span 29 dimensions (e.g. d2/dx2 at a patch's middle column = d/dx right - d/dx left,
    # 3 rows, likewise along y); the null directions carry nothing and are dropped
    d = model.pca.shape[1]
    assert model.pca.shape == (36, 29) and model.atoms.shape == (4, d)
    assert np.abs(hr - mid).max() > 10  # the residual is far from zero ...
    np.testing.assert_allclose(model.enhance(mid), hr, atol=1e-3)  # ... and is reproduced


def test_trained_upscaler_beats_bicubic_on_held_out_benchmark_images(tiny_benchmark):
    # Prepare: train on both sites' train images (128 px), test on site 0's held-out test images
    def images(site, split):
        return [sr.read_image(p) for p in sorted((tiny_benchmark.site_dir(site) / "images" / split).glob("*.png"))]

    train, test = images(0, "train") + images(1, "train"), images(0, "test")
    model = sr.train(train, ANRParams(atoms=8, neighbours=1024, samples=20000, kmeans_iters=5))
    ours, cubic, nearest = [], [], []
    for image in test:
        lr, hr = sr.degrade(image, 2)
        y = sr.luma(hr)
        up = model.upscale(lr)
        assert up.shape == hr.shape and up.dtype == np.uint8
        ours.append(sr.psnr(y, sr.luma(up), border=2))
        cubic.append(sr.psnr(y, sr.luma(sr.bicubic(lr, 2)), border=2))
        nearest.append(sr.psnr(y, sr.luma(cv2.resize(lr, hr.shape[1::-1], interpolation=cv2.INTER_NEAREST)), border=2))
    # Assert: ours > bicubic > nearest on average, and ours wins on every image
    assert np.mean(ours) > np.mean(cubic) + 0.2 > np.mean(nearest) + 0.2, (ours, cubic, nearest)
    assert all(o > c for o, c in zip(ours, cubic))


def test_grey_frames_and_non_grid_sizes_upscale():
    model = _tiny_model()
    grey = np.clip(_smooth_image(5, (37, 50)), 0, 255).astype(np.uint8)
    out = model.upscale(grey)
    assert out.shape == (74, 100) and out.dtype == np.uint8
    # close to bicubic (the residual is a correction, not a new image)
    assert sr.psnr(out.astype(np.float32), sr.bicubic(grey, 2).astype(np.float32)) > 30
    with pytest.raises(SuperResError, match="uint8"):
        model.upscale(grey.astype(np.float32))


# =========================================================================== files and CLI


def test_model_file_round_trip(tmp_path):
    model = _tiny_model()
    path = model.save(tmp_path / "m.npz")
    loaded = sr.load_model(path)
    frame = cv2.merge([np.clip(_smooth_image(7 + c, (30, 40)), 0, 255).astype(np.uint8) for c in range(3)])
    assert np.array_equal(loaded.upscale(frame), model.upscale(frame))
    assert loaded.meta["params"]["atoms"] == 4 and loaded.scale == 2


def test_bad_model_files_name_the_file_and_the_field(tmp_path):
    model = _tiny_model()
    good = dict(np.load(model.save(tmp_path / "good.npz")))

    def write(name, **change):
        fields = {**good, **change}
        for k in [k for k, v in change.items() if v is None]:
            del fields[k]
        path = tmp_path / name
        np.savez(path, **fields)
        return path

    with pytest.raises(SuperResError, match="not found: .*missing.npz"):
        sr.load_model(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(SuperResError, match=r"text.npz: not a readable .npz"):
        sr.load_model(tmp_path / "text.npz")
    with pytest.raises(SuperResError, match=r"nopca.npz: missing field\(s\) pca"):
        sr.load_model(write("nopca.npz", pca=None))
    with pytest.raises(SuperResError, match=r"fmt.npz: field 'format'"):
        sr.load_model(write("fmt.npz", format=np.array("something-else")))
    with pytest.raises(SuperResError, match=r"ver.npz: field 'version' is 9"):
        sr.load_model(write("ver.npz", version=np.array(9)))
    with pytest.raises(SuperResError, match=r"shape.npz: field 'projections' has shape"):
        sr.load_model(write("shape.npz", projections=good["projections"][:, :, :5]))
    with pytest.raises(SuperResError, match=r"nan.npz: field 'atoms' holds NaN"):
        sr.load_model(write("nan.npz", atoms=np.full_like(good["atoms"], np.nan)))
    with pytest.raises(SuperResError, match=r"scale.npz: field 'scale' must be an integer >= 2"):
        sr.load_model(write("scale.npz", scale=np.array(1)))


def test_cli_trains_and_upscales(tmp_path, capsys):
    folder = tmp_path / "hr"
    folder.mkdir()
    for i in range(2):
        img = cv2.merge([np.clip(_smooth_image(10 * i + c, (48, 48)), 0, 255).astype(np.uint8) for c in range(3)])
        cv2.imwrite(str(folder / f"{i}.png"), img)
    model = tmp_path / "m.npz"
    assert sr.main(["train", "--images", str(folder), "--scale", "2", "--out", str(model), "--atoms", "4",
                    "--neighbours", "200", "--samples", "2000", "--kmeans-iters", "2"]) == 0
    assert sr.main(["upscale", "--model", str(model), str(folder / "0.png"), str(tmp_path / "up.png")]) == 0
    assert cv2.imread(str(tmp_path / "up.png")).shape == (96, 96, 3)
    assert "48x48 -> 96x96" in capsys.readouterr().out
    assert sr.main(["upscale", "--model", str(tmp_path / "nope.npz"), "a.png", "b.png"]) == 2
    assert "nope.npz" in capsys.readouterr().err


# =========================================================================== edge runtime --upscale


class _Cloud:
    def __init__(self):
        self.entries = []

    def send(self, entry):
        from clients.edge import CloudAnswer
        from common.routing import Detections

        self.entries.append(entry)
        return CloudAnswer(Detections.empty(), rtt_ms=1.0)


def test_edge_runtime_detects_and_offloads_on_the_upscaled_frame(tmp_path):
    from clients.detector import StaticModel
    from clients.edge import EdgeRuntime, EdgeSettings, Frame
    from common.routing import Detections

    # Prepare: a model file, 3 frames of 48x64, a predictor that records what it sees and
    # returns one small low-confidence box (always offloaded)
    path = _tiny_model().save(tmp_path / "sr.npz")
    rng = np.random.default_rng(0)
    frames = [Frame(i, cv2.GaussianBlur(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), (5, 5), 0), i / 10, 0.0)
              for i in range(3)]
    seen = []

    def predictor(image):
        seen.append(image.shape)
        return Detections([[100, 70, 106, 76]], [0.3], [1])  # only inside the upscaled 128x96 frame

    cloud = _Cloud()
    settings = EdgeSettings(site="site-1", run_id="sr", max_gap=1, drain_timeout=10, upscale=str(path))
    runtime = EdgeRuntime(StaticModel(predictor, "v"), cloud, settings, queue_dir=tmp_path / "q",
                          out=tmp_path / "out.jsonl")
    # Execute
    runtime.run(frames)
    # Assert: detection and the offloaded crops work on the 96x128 frame; lines say how long upscaling took
    lines = [json.loads(ln) for ln in (tmp_path / "out.jsonl").read_text().splitlines()]
    edge = [ln for ln in lines if ln["kind"] == "edge"]
    assert seen and all(s == (96, 128, 3) for s in seen)
    assert len(edge) == 3 and all(ln["latency_ms"]["upscale"] > 0 for ln in edge)
    assert all(ln["detections"][0]["xyxy"] == [100, 70, 106, 76] for ln in edge)
    assert cloud.entries and all(e.image_shape == [96, 128] for e in cloud.entries)
    x0, y0, x1, y1 = cloud.entries[0].regions[0]
    assert x1 <= 128 and y1 <= 96 and x1 > 106  # the crop around the box, inside the upscaled frame


def test_edge_runtime_refuses_a_bad_upscale_model_before_locking_the_queue(tmp_path):
    from clients.detector import StaticModel
    from clients.edge import EdgeRuntime, EdgeSettings

    (tmp_path / "bad.npz").write_text("garbage")
    settings = EdgeSettings(site="site-1", run_id="sr", upscale=str(tmp_path / "bad.npz"))
    with pytest.raises(SuperResError, match="bad.npz"):
        EdgeRuntime(StaticModel(lambda im: None), _Cloud(), settings, queue_dir=tmp_path / "q",
                    out=tmp_path / "o.jsonl")
    # the queue folder is free: a runtime without the model starts on it
    ok = EdgeRuntime(StaticModel(lambda im: None), _Cloud(), EdgeSettings(site="site-1", run_id="sr"),
                     queue_dir=tmp_path / "q", out=tmp_path / "o.jsonl")
    ok.close(drain=False)
