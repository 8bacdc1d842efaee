"""Tests for common/keyframes.py (paper section 4.2: Δf_t, keyframes, tracks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.keyframes import (
    IoUTracker,
    KeyframeSelector,
    area_resize,
    box_iou,
    preprocess_frame,
    sample_grid,
    to_gray,
)


def gray(level: int, shape=(64, 64)) -> np.ndarray:
    """A uniform uint8 frame: Δ between gray(a) and gray(b) is |a - b| / 255."""
    return np.full(shape, level, dtype=np.uint8)


def levels_video(levels, shape=(64, 64)) -> list[np.ndarray]:
    return [gray(v, shape) for v in levels]


def frame_difference(prev: np.ndarray, cur: np.ndarray, **kwargs) -> float:
    """Δf_t as the selector computes it for ``cur`` right after ``prev``."""
    selector = KeyframeSelector(**kwargs)
    selector.update(prev)
    selector.update(cur)
    return selector.last_delta


def select_keyframes(frames, **kwargs) -> list[int]:
    """Indices of the frames a fresh :class:`KeyframeSelector` calls key."""
    selector = KeyframeSelector(**kwargs)
    return [i for i, frame in enumerate(frames) if selector.update(frame)]


def _cv2():
    try:
        import cv2  # noqa: PLC0415

        return cv2
    except Exception:  # cv2 may be absent or half-installed
        return None


# --------------------------------------------------------------------------- #
# Δf_t
# --------------------------------------------------------------------------- #
def test_frame_difference_black_to_white_is_one():
    """Paper 4.2, Δf_t = ||f_t - f_{t-1}||_2: every pixel changes by 255/255 = 1 → RMS 1."""
    # Prepare
    black, white = gray(0, (48, 80)), gray(255, (48, 80))
    # Execute
    delta = frame_difference(black, white)
    # Assert
    assert delta == pytest.approx(1.0, abs=1e-6)
    assert frame_difference(black, black) == 0.0


def test_frame_difference_half_frame_is_sqrt_half():
    """Paper 4.2: left half 0 → 255: sqrt(0.5·64·64·1²)/64 = sqrt(0.5) ≈ 0.70711."""
    # Prepare
    prev = gray(0, (128, 128))
    cur = prev.copy()
    cur[:, :64] = 255
    # Execute
    delta = frame_difference(prev, cur)
    # Assert
    assert delta == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_frame_difference_uniform_level_change():
    """Uniform 10 → 27 grey levels: Δ = 17/255 ≈ 0.066667."""
    assert frame_difference(gray(10), gray(27)) == pytest.approx(17 / 255, abs=1e-6)


def test_frame_difference_is_resolution_independent():
    """The same scene change at 64×64 and at 480×640 gives the same Δ (the scale note of 4.2)."""
    # Prepare: a bright square covering the same quarter of the frame at two resolutions
    small_prev, small_cur = gray(0, (64, 64)), gray(0, (64, 64))
    small_cur[:32, :32] = 200
    big_prev, big_cur = gray(0, (480, 640)), gray(0, (480, 640))
    big_cur[:240, :320] = 200
    # Execute
    d_small = frame_difference(small_prev, small_cur)
    d_big = frame_difference(big_prev, big_cur)
    # Assert: a quarter of the pixels change by 200/255: sqrt(0.25)·200/255 = 0.392157
    assert d_small == pytest.approx(0.5 * 200 / 255, abs=1e-6)
    assert d_big == pytest.approx(d_small, abs=1e-6)


def test_frame_difference_bgr_uses_bt601_weights():
    """BGR input: pure blue (255, 0, 0) vs black differs by 0.114 (BT.601 blue weight)."""
    # Prepare
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    blue = black.copy()
    blue[..., 0] = 255
    red = black.copy()
    red[..., 2] = 255
    # Execute / Assert
    assert frame_difference(black, blue) == pytest.approx(0.114, abs=1e-6)
    assert frame_difference(black, red) == pytest.approx(0.299, abs=1e-6)
    # a gray frame and its 3-channel copy are the same image: Δ = 0
    assert frame_difference(gray(90), np.dstack([gray(90)] * 3)) == pytest.approx(0.0, abs=1e-6)


def test_to_gray_and_preprocess_values():
    """to_gray(0, 0, 255) = 0.299·255 = 76.245; 2×2 [[0,255],[255,255]] → 1×1 = 0.75."""
    # Prepare
    red = np.array([[[0, 0, 255]]], dtype=np.uint8)
    frame = np.array([[0, 255], [255, 255]], dtype=np.uint8)
    # Execute
    g = to_gray(red)
    small = preprocess_frame(frame, size=(1, 1))
    # Assert
    assert float(g[0, 0]) == pytest.approx(76.245, abs=1e-4)
    assert small.shape == (1, 1)
    assert float(small[0, 0]) == pytest.approx(0.75)


def test_area_resize_hand_values():
    """Width 3 → 2: [0, 3, 6] → [(0 + 3/2)/1.5, (3/2 + 6)/1.5] = [1, 5]; 2×2 → 1×1 = mean."""
    out = area_resize(np.array([[0.0, 3.0, 6.0]]), (1, 2))
    np.testing.assert_allclose(out, [[1.0, 5.0]])
    np.testing.assert_allclose(area_resize(np.array([[0.0, 2.0], [4.0, 6.0]]), (1, 1)), [[3.0]])


def test_area_resize_integer_factor_is_block_mean():
    """An integer factor (4×6 → 2×2) is the mean of each 2×3 block."""
    # Prepare
    img = np.arange(24, dtype=np.float64).reshape(4, 6)
    expected = img.reshape(2, 2, 2, 3).mean(axis=(1, 3))
    # Execute / Assert
    np.testing.assert_allclose(area_resize(img, (2, 2)), expected)


def test_area_resize_matches_opencv_inter_area():
    """The numpy resize equals cv2.INTER_AREA when downscaling (skipped without cv2)."""
    cv2 = _cv2()
    if cv2 is None:
        pytest.skip("cv2 not importable")
    # Prepare
    img = np.random.default_rng(0).integers(0, 256, (100, 150)).astype(np.float64)
    # Execute
    ours = area_resize(img, (64, 64))
    theirs = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    # Assert
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(
    "frame, match",
    [
        (np.zeros((8, 8), dtype=np.float32), "uint8"),
        (np.zeros((8, 8, 4), dtype=np.uint8), "shape"),
        (np.zeros((0, 8), dtype=np.uint8), "empty"),
        ([[0, 1], [2, 3]], "numpy array"),
    ],
)
def test_frame_difference_rejects_bad_frames(frame, match):
    """A bad frame is a ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        frame_difference(gray(0, (8, 8)), frame)


# --------------------------------------------------------------------------- #
# KeyframeSelector
# --------------------------------------------------------------------------- #
def test_first_frame_is_key_and_still_frames_never_are():
    """Paper 4.2: the first frame is key; 99 identical frames after it never are (Δ = 0)."""
    # Prepare
    frames = [gray(120)] * 100
    selector = KeyframeSelector(beta=1.5, warmup=3)
    # Execute
    results = [selector.update_with_reason(f) for f in frames]
    # Assert
    assert results[0] == (True, "first")
    assert all(r == (False, None) for r in results[1:])
    assert select_keyframes(frames) == [0]


def test_tiny_change_in_still_video_is_not_key_thanks_to_floor():
    """Median 0 guard: one pixel of a still 64×64 video changes by 10 levels.

    Δ = (10/255)/64 = 6.13e-4 < β·min_delta = 1.5·1e-3 → not key. Without the
    floor (min_delta → 1e-12) the threshold would be β·0 and the frame would be key.
    """
    # Prepare
    still = [gray(50)] * 10
    flicker = gray(50)
    flicker[10, 10] = 60
    frames = still + [flicker] + still
    # Execute
    with_floor = select_keyframes(frames, beta=1.5, warmup=3)
    no_floor = select_keyframes(frames, beta=1.5, warmup=3, min_delta=1e-12)
    # Assert
    assert frame_difference(still[0], flicker) == pytest.approx(10 / 255 / 64, rel=1e-5)
    assert with_floor == [0]
    assert no_floor == [0, 10, 11]  # the change and the change back


def test_scene_cut_is_always_key_even_in_warmup():
    """Scene cut: Δ ≥ cut_threshold (0.25) is key, at frame 1 (in warm-up) and later."""
    # Prepare: still, cut at frame 1 (Δ = 200/255 = 0.784), still, cut back at frame 8
    frames = levels_video([20, 220, 220, 220, 220, 220, 220, 220, 20, 20])
    selector = KeyframeSelector(beta=1.5, warmup=3, cut_threshold=0.25)
    # Execute
    results = [selector.update_with_reason(f) for f in frames]
    # Assert
    keys = [i for i, (k, _) in enumerate(results) if k]
    assert keys == [0, 1, 8]
    assert [results[i][1] for i in keys] == ["first", "cut", "cut"]


def test_cut_between_textured_scenes():
    """A cut between two textured BGR scenes (B = inverse of A) is key, only there.

    Scene A: 8×8 random grey blocks of 16×16 px (128×128, so each 64×64 output
    pixel lies inside one block), the same in the 3 channels. Scene B = 255 - A:
    every pixel changes by |2a - 255|, Δ = RMS over blocks of |2a - 255|/255
    (≈ 1/sqrt(3) for uniform a) ≥ 0.25. Pixel noise of ±2 levels on the stills
    gives Δ ≈ 0.004, nearly constant, so it never reaches 1.5 × its median.
    """
    # Prepare
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    scene_a = np.dstack([np.kron(blocks, np.ones((16, 16), dtype=np.uint8))] * 3)
    scene_b = 255 - scene_a
    noisy = lambda s: np.clip(s.astype(int) + rng.integers(-2, 3, s.shape), 0, 255).astype(np.uint8)  # noqa: E731
    frames = [noisy(scene_a) for _ in range(6)] + [noisy(scene_b) for _ in range(6)]
    # Execute
    keys = select_keyframes(frames)
    # Assert
    expected = np.sqrt(np.mean((np.abs(2.0 * blocks - 255) / 255) ** 2))
    assert frame_difference(scene_a, scene_b) == pytest.approx(expected, abs=1e-6)
    assert expected > 0.25
    assert keys == [0, 6]


def test_beta_sensitivity_ratio_1_7():
    """Paper 4.2, β ∈ {1.5, 2}: Δ = 1.7 × median is key at β = 1.5, not at β = 2.

    Levels 0, 10, 20, 30, 40, 50, 67: differences 10/255 ×5 then 17/255.
    At frame 6 the median of [10,10,10,10,10,17]/255 is 10/255; 17 > 15 but 17 < 20.
    """
    # Prepare
    frames = levels_video([0, 10, 20, 30, 40, 50, 67])
    # Execute
    keys_15 = select_keyframes(frames, beta=1.5, warmup=3)
    keys_20 = select_keyframes(frames, beta=2.0, warmup=3)
    selector = KeyframeSelector(beta=1.5, warmup=3)
    reasons = [selector.update_with_reason(f)[1] for f in frames]
    # Assert
    assert keys_15 == [0, 6]
    assert keys_20 == [0]
    assert reasons[-1] == "motion"
    assert selector.last_delta == pytest.approx(17 / 255, abs=1e-6)
    assert selector.last_threshold == pytest.approx(1.5 * 10 / 255, abs=1e-6)


def test_median_includes_current_difference():
    """Δf_t is in its own median (the paper's median over i = 1..t).

    Differences 10, 10, 30, 28, 35 (grey levels). At the last frame the median
    including 35 is 28 → threshold 42 → not key; excluding it the median would
    be (10 + 28)/2 = 19 → threshold 28.5 < 35 → key. (Frame 4: median of
    [10, 10, 30, 28] = 19, 28 < 28.5 → not key either.)
    """
    # Prepare
    frames = levels_video([0, 10, 20, 50, 78, 113])
    selector = KeyframeSelector(beta=1.5, warmup=3)
    # Execute
    keys = [selector.update(f) for f in frames]
    # Assert
    assert keys == [True, False, False, False, False, False]
    assert selector.last_threshold == pytest.approx(1.5 * 28 / 255, abs=1e-6)


def test_warmup_blocks_motion_keyframes():
    """During the first `warmup` differences only cuts are key.

    Levels 0, 0, 40: Δ2 = 40/255 = 0.157 (< cut 0.25). With warmup=0 the median
    of [0, 40] is 20 → threshold 30 < 40 → key; with warmup=3 frame 2 is in warm-up.
    """
    frames = levels_video([0, 0, 40])
    assert select_keyframes(frames, beta=1.5, warmup=3) == [0]
    assert select_keyframes(frames, beta=1.5, warmup=0) == [0, 2]


def test_history_bounds_the_median():
    """history=3 keeps the last 3 differences only.

    Differences 10, 10, 10, 50, 50: the median of all is 10 (threshold 1.5·10), of the last 3 it is 50.
    """
    # Prepare
    frames = levels_video([0, 10, 20, 30, 80, 130])
    bounded, unbounded = KeyframeSelector(history=3), KeyframeSelector()
    # Execute
    for f in frames:
        bounded.update(f)
        unbounded.update(f)
    # Assert
    assert bounded.last_threshold == pytest.approx(1.5 * 50 / 255, abs=1e-6)
    assert unbounded.last_threshold == pytest.approx(1.5 * 10 / 255, abs=1e-6)


def test_cut_ratio_and_max_gap():
    """cut_ratio: Δ > ratio·median is a cut; max_gap forces a keyframe after a long gap."""
    # Prepare: differences 2, 2, 2, 2 then 30 grey levels (0.118 < 0.25 absolute)
    frames = levels_video([0, 2, 4, 6, 8, 38])
    selector = KeyframeSelector(beta=1.5, warmup=3, cut_ratio=10.0)
    # Execute
    reasons = [selector.update_with_reason(f)[1] for f in frames]
    gap_keys = select_keyframes([gray(7)] * 7, max_gap=3)
    # Assert: 30 > 10·2 → "cut" (not just "motion")
    assert reasons == ["first", None, None, None, None, "cut"]
    assert gap_keys == [0, 3, 6]


def test_reset_starts_over():
    selector = KeyframeSelector()
    selector.update(gray(0))
    selector.update(gray(0))
    selector.reset()
    assert selector.update_with_reason(gray(0)) == (True, "first")
    # the median runs over the differences after the reset only: [10] -> 10, not [0, 10] -> 5
    selector.update(gray(10))
    assert selector.last_threshold == pytest.approx(1.5 * 10 / 255, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta": 0}, "beta"),
        ({"warmup": -1}, "warmup"),
        ({"cut_threshold": 0}, "cut_threshold"),
        ({"min_delta": 0}, "min_delta"),
        ({"history": 0}, "history"),
        ({"size": (0, 64)}, "size"),
        ({"cut_ratio": 1.0}, "cut_ratio"),
        ({"max_gap": 0}, "max_gap"),
        ({"oversample": -1}, "oversample"),
    ],
)
def test_selector_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KeyframeSelector(**kwargs)


def test_sample_grid_hand_values():
    """Span centres floor((i + 0.5) n_in / n): 480 -> 2 samples at 120, 360; small axes are not sampled."""
    assert sample_grid(480, 1, 2).tolist() == [120, 360]
    assert sample_grid(1080, 64).size == 256 and sample_grid(1080, 64)[:3].tolist() == [2, 6, 10]
    assert sample_grid(256, 64) is None and sample_grid(1080, 64, 0) is None


def _hd_video():
    """1080p BGR: textured background (60 px blocks), a bright 120 px square moving 40 px per frame with a
    pause, a cut to the inverse scene at frame 9, noise of +-2 grey levels."""
    rng = np.random.default_rng(5)
    blocks = rng.integers(40, 200, (18, 32), dtype=np.uint8)
    scene = np.kron(blocks, np.ones((60, 60), dtype=np.uint8))
    frames = []
    for t, x in enumerate([0, 0, 0, 0, 0, 200, 200, 200, 200, 200, 200, 200]):
        base = (255 - scene) if t >= 9 else scene.copy()
        base[400:520, 600 + x:720 + x] = 250
        noise = rng.integers(-2, 3, base.shape)
        frames.append(np.dstack([np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)] * 3))
    return frames


def test_sampling_large_frames_keeps_the_decisions_and_the_scale():
    """1080p: the sampled copy (default) selects the same keyframes for the same reasons as the every-pixel
    average (oversample=0), and each Δ stays within 0.01 (RMS, in [0, 1]) of it."""
    frames = _hd_video()
    exact, sampled = KeyframeSelector(oversample=0), KeyframeSelector()
    decisions = [(exact.update_with_reason(f), sampled.update_with_reason(f), exact.last_delta, sampled.last_delta)
                 for f in frames]
    assert [d[0] for d in decisions] == [d[1] for d in decisions]
    assert [i for i, d in enumerate(decisions) if d[0][0]] == [0, 5, 9]
    for _, _, d_exact, d_sampled in decisions[1:]:
        assert d_sampled == pytest.approx(d_exact, abs=0.01)


# --------------------------------------------------------------------------- #
# IoU and tracks
# --------------------------------------------------------------------------- #
def test_box_iou_hand_values():
    """[0,0,2,2] vs [1,1,3,3]: 1/7; vs itself: 1; vs [2,2,4,4] (touching): 0."""
    # Prepare
    a = np.array([[0, 0, 2, 2], [0, 0, 10, 10]], dtype=float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [2, 2, 4, 4], [1, 0, 11, 10]], dtype=float)
    # Execute
    iou = box_iou(a, b)
    # Assert
    expected = [
        # [0,0,2,2] vs [1,0,11,10]: intersection 1·2 = 2, union 4 + 100 - 2 = 102
        [1 / 7, 1.0, 0.0, 2 / 102],
        # [0,0,10,10] contains the three 2×2 boxes: 4/100; vs 1-px shift: 90/110
        [4 / 100, 4 / 100, 4 / 100, 90 / 110],
    ]
    np.testing.assert_allclose(iou, expected)
    np.testing.assert_allclose(box_iou(b, a), np.array(expected).T)


def test_box_iou_empty_and_degenerate():
    assert box_iou(np.zeros((0, 4)), [[0, 0, 1, 1], [1, 1, 2, 2]]).shape == (0, 2)
    assert box_iou([[0, 0, 1, 1]], []).shape == (1, 0)
    np.testing.assert_array_equal(box_iou([[5, 5, 5, 5]], [[5, 5, 5, 5]]), [[0.0]])
    with pytest.raises(ValueError, match="shape"):
        box_iou([[0, 0, 1]], [[0, 0, 1, 1]])


def test_tracker_follows_boxes_not_order():
    """Paper 4.2 (trajectories over W_j): ids follow boxes even if detection order flips."""
    # Prepare
    tracker = IoUTracker(iou_threshold=0.3)
    kf1 = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=float)
    kf2 = np.array([[51, 50, 61, 60], [1, 0, 11, 10]], dtype=float)  # swapped, moved by 1 px
    # Execute
    ids1 = tracker.update(kf1, [3, 3])
    ids2 = tracker.update(kf2, [3, 3])
    # Assert: IoU of a 1-px shift = 90/110 = 0.82 ≥ 0.3
    np.testing.assert_array_equal(ids1, [0, 1])
    np.testing.assert_array_equal(ids2, [1, 0])
    assert tracker.pattern(0) == (True, True)
    np.testing.assert_array_equal(tracker.tracks[1].box, [51, 50, 61, 60])


def test_tracker_is_per_class_and_greedy():
    """A box of another class never continues a track; the best-IoU detection wins."""
    # Prepare
    tracker = IoUTracker(iou_threshold=0.3)
    tracker.update([[0, 0, 10, 10]], [1])  # track 0, class 1
    # Execute: same place but class 2 → new track; two class-1 candidates:
    # [1,0,11,10] IoU 90/110 = 0.82 and [0,5,10,15] IoU 50/150 = 0.33
    ids = tracker.update([[0, 0, 10, 10], [0, 5, 10, 15], [1, 0, 11, 10]], [2, 1, 1])
    # Assert
    np.testing.assert_array_equal(ids, [1, 2, 0])
    assert tracker.tracks[0].cls == 1 and tracker.tracks[1].cls == 2


def test_tracker_history_and_max_age():
    """Hit, miss, hit → (T, F, T); a track older than max_age misses is dropped; history ≤ 5."""
    # Prepare
    tracker = IoUTracker(iou_threshold=0.3, max_age=1, history=5)
    box = [[0, 0, 10, 10]]
    # Execute
    tracker.update(box, [0])
    tracker.update([], [])
    ids = tracker.update(box, [0])
    pattern_after_gap = tracker.histories(ids)
    tracker.update([], [])
    tracker.update([], [])  # second consecutive miss > max_age=1 → deleted
    ids_new = tracker.update(box, [0])
    for _ in range(6):
        tracker.update(box, [0])
    # Assert
    assert pattern_after_gap == [(True, False, True)]
    assert ids_new.tolist() == [1]
    assert tracker.pattern(0) == ()
    assert tracker.pattern(1) == (True,) * 5
    assert tracker.tracks[1].hits == 7


def test_tracker_rejects_mismatched_classes():
    with pytest.raises(ValueError, match="classes"):
        IoUTracker().update([[0, 0, 1, 1]], [0, 1])
    with pytest.raises(ValueError, match="iou_threshold"):
        IoUTracker(iou_threshold=0.0)
