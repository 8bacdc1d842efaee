"""Tests for common/routing.py (paper section 4.2 (a)-(c): ambiguity, offload, merge)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.detections import Detections, box_area
from common.keyframes import IoUTracker
from common.offload import (
    atlas_layout,
    crop_image,
    crop_regions,
    encode_atlas,
    encode_regions,
    merge_overlapping,
    offload_plan,
    payload_bytes,
    shelf_pack,
    to_frame_coords,
)
from common.routing import (
    REASONS,
    Budget,
    ambiguity_reasons,
    ambiguous_mask,
    choose_offload,
    is_unstable,
    merge,
    parse_budget,
    reason_counts,
    route,
)

T, F = True, False
PAPER = dict(t_conf=0.5, t_size=256.0, n_frames=5)  # the paper's T_conf and N, T_size 16x16


def dets(boxes, conf=None, cls=None) -> Detections:
    n = len(boxes)
    return Detections(
        np.asarray(boxes, dtype=float).reshape(-1, 4),
        [0.9] * n if conf is None else conf,
        [0] * n if cls is None else cls,
    )


# --------------------------------------------------------------------------- #
# Detections
# --------------------------------------------------------------------------- #
def test_detections_basics_and_json_roundtrip():
    """Light shared type: len, area, select, index, concat, to_list/from_list via JSON."""
    # Prepare
    d = Detections([[0, 0, 10, 20], [5, 5, 9, 7]], [0.9, 0.2], [3, 1])
    # Execute
    restored = Detections.from_list(json.loads(json.dumps(d.to_list())))
    both = Detections.concat([d, d[1]])
    # Assert
    assert len(d) == 2
    np.testing.assert_allclose(box_area(d.xyxy), [200.0, 8.0])  # 10·20, 4·2
    assert d.to_list()[0] == {"xyxy": [0.0, 0.0, 10.0, 20.0], "conf": 0.9, "cls": 3}
    np.testing.assert_allclose(restored.xyxy, d.xyxy)
    np.testing.assert_allclose(restored.conf, d.conf)
    np.testing.assert_array_equal(restored.cls, d.cls)
    assert restored.cls.dtype == np.int64
    np.testing.assert_array_equal(d.select([False, True]).cls, [1])
    np.testing.assert_array_equal(both.cls, [3, 1, 1])
    assert len(Detections.concat([])) == 0


def test_detections_empty():
    e = Detections.empty()
    assert len(e) == 0 and e.xyxy.shape == (0, 4)
    assert e.to_list() == []
    assert len(Detections.from_list([])) == 0
    assert Detections([], [], []).xyxy.shape == (0, 4)


@pytest.mark.parametrize(
    "items, match",
    [
        ([{"xyxy": [0, 0, 1, 1], "conf": 0.5, "cls": 0}, {"xyxy": [0, 0, 1, 1], "cls": 0}],
         "detection 1 lacks key 'conf'"),
        ([{"xyxy": [0, 0, 1], "conf": 0.5, "cls": 0}], "detection 0 has a bad box"),
        ([{"xyxy": [0, 0, 1, 1], "conf": "high", "cls": 0}], "detection 0 has a non-numeric"),
        ([{"xyxy": [0, 0, 1, 1], "conf": 0.5, "cls": 1.5}], "detection 0 has a non-numeric"),
        ([[0, 0, 1, 1]], "detection 0 must be an object"),
        ("not a list", "must be a list"),
    ],
)
def test_detections_from_list_names_the_bad_item(items, match):
    with pytest.raises(ValueError, match=match):
        Detections.from_list(items)


def test_detections_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        Detections([[0, 0, 1]], [0.5], [0])
    with pytest.raises(ValueError, match="same length"):
        Detections([[0, 0, 1, 1]], [0.5, 0.6], [0])
    with pytest.raises(ValueError, match="integers"):
        Detections([[0, 0, 1, 1]], [0.5], [0.5])
    with pytest.raises(ValueError, match="mask has 1 entries for 2"):
        dets([[0, 0, 1, 1], [0, 0, 2, 2]]).select([True])


# --------------------------------------------------------------------------- #
# Ambiguity reasons
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "history, n, expected",
    [
        ((T, F, T), 5, True),  # seen, missed, seen
        ((T, T, T, T, T), 5, False),  # always seen
        ((T,), 5, False),  # new track
        ((T, F, T, T, T, T, T), 5, False),  # the miss is older than the last 5 keyframes
        ((T, T, F, T, T, T), 5, True),  # window (T, F, T, T, T)
        ((T, F), 5, True),  # seen then missed (a lost track)
        ((F, F, F), 5, False),  # never seen in the window: not "intermittent"
        ((T, F, T), 1, False),  # a 1-keyframe window cannot hold both
        (None, 5, False),
        ((), 5, False),
    ],
)
def test_is_unstable_patterns(history, n, expected):
    """Paper 4.2 (c): intermittent = at least one hit and one miss in the last N keyframes."""
    assert is_unstable(history, n) is expected


def test_each_reason_on_hand_built_detections():
    """Paper 4.2 (a)-(c), T_conf 0.5, T_size 256 px², N 5: one detection per reason.

    0: 20×20 = 400 px², 0.9, stable          → ()
    1: 20×20, 0.3                            → (low_conf,)
    2: 10×10 = 100 px² < 256, 0.9            → (small,)
    3: 20×20, 0.9, history T F T             → (unstable,)
    4: 8×8 = 64 px², 0.1, history T T F T    → all three
    5: exactly 0.5 and exactly 16×16 = 256   → () (strict comparisons)
    """
    # Prepare
    boxes = [
        [0, 0, 20, 20],
        [0, 0, 20, 20],
        [0, 0, 10, 10],
        [0, 0, 20, 20],
        [0, 0, 8, 8],
        [100, 100, 116, 116],
    ]
    scores = [0.9, 0.3, 0.9, 0.9, 0.1, 0.5]
    histories = [(T, T), (T,), (T, T, T), (T, F, T), (T, T, F, T), (T,)]
    # Execute
    reasons = ambiguity_reasons(boxes, scores, histories, t_conf=0.5, t_size=256, n_frames=5)
    # Assert
    assert reasons == [
        (),
        ("low_conf",),
        ("small",),
        ("unstable",),
        ("low_conf", "small", "unstable"),
        (),
    ]
    np.testing.assert_array_equal(ambiguous_mask(reasons), [F, T, T, T, T, F])
    assert reason_counts(reasons) == {"low_conf": 2, "small": 2, "unstable": 2}
    assert REASONS == ("low_conf", "small", "unstable")


def test_thresholds_are_parameters():
    """t_conf = 0.95 makes a 0.9 detection ambiguous; t_size = 0 turns 'small' off."""
    reasons = ambiguity_reasons([[0, 0, 4, 4]], [0.9], None, t_conf=0.95, t_size=0, n_frames=5)
    assert reasons == [("low_conf",)]


def test_no_histories_means_no_unstable_reason():
    assert ambiguity_reasons([[0, 0, 20, 20]], [0.9], None, **PAPER) == [()]
    assert ambiguity_reasons(np.zeros((0, 4)), [], None, **PAPER) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"t_conf": 1.5}, "t_conf must be in \\[0, 1\\], got 1.5"),
        ({"t_size": -1}, "t_size must be >= 0 px², got -1"),
        ({"n_frames": 0}, "n_frames must be an integer >= 1, got 0"),
        ({"track_histories": [(T,), (T,)]}, "track_histories has 2 entries for 1"),
    ],
)
def test_ambiguity_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ambiguity_reasons([[0, 0, 20, 20]], [0.9], **{"track_histories": None, **PAPER, **kwargs})


def test_tracker_feeds_the_unstable_rule():
    """Paper 4.2 (c) end to end: an object seen, missed, seen again (same place) is unstable.

    A second object seen on every keyframe stays stable. Both are big and confident.
    """
    # Prepare
    tracker = IoUTracker(iou_threshold=0.3, max_age=4, history=5)
    steady = [100, 100, 140, 140]
    flicker = [0, 0, 40, 40]
    # Execute
    tracker.update([steady, flicker], [0, 0])
    tracker.update([steady], [0])  # flicker missed
    ids = tracker.update([steady, [1, 0, 41, 40]], [0, 0])  # flicker back, 1 px right
    result = route(dets([steady, [1, 0, 41, 40]]), tracker.histories(ids), **PAPER)
    # Assert
    assert tracker.histories(ids) == [(T, T, T), (T, F, T)]
    assert result.reasons == [(), ("unstable",)]
    np.testing.assert_array_equal(result.offload_mask, [F, T])


def test_route_splits_in_order():
    """route: confident and offloaded keep input order; the mask is over the input."""
    # Prepare
    d = dets([[0, 0, 20, 20], [30, 0, 50, 20], [60, 0, 80, 20]], conf=[0.3, 0.8, 0.4], cls=[1, 2, 3])
    # Execute
    r = route(d, None, **PAPER)
    # Assert
    np.testing.assert_array_equal(r.offload_mask, [T, F, T])
    np.testing.assert_array_equal(r.confident.cls, [2])
    np.testing.assert_array_equal(r.offloaded.cls, [1, 3])
    assert r.reasons == [("low_conf",), (), ("low_conf",)]


# --------------------------------------------------------------------------- #
# Merge
# --------------------------------------------------------------------------- #
def test_merge_cloud_wins_overlaps():
    """Final = confident edge + cloud; an edge box with IoU ≥ 0.5 to a cloud box is dropped.

    Edge A [0,0,10,10] kept, B [20,20,30,30] offloaded, C [50,50,60,60] kept.
    Cloud: B' = [20,20,30,30] (re-detected, class 5) and A' = [1,0,11,10]
    (IoU with A = 90/110 = 0.82, class 7 ≠ A's class 0). Class-agnostic: A dropped
    → result C, B', A'. Same-class only: A survives → A, C, B', A'.
    """
    # Prepare
    edge = dets([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.2, 0.8], [0, 0, 0])
    cloud = dets([[20, 20, 30, 30], [1, 0, 11, 10]], [0.95, 0.7], [5, 7])
    offloaded = [F, T, F]
    # Execute
    agnostic = merge(edge, cloud, offloaded, iou=0.5)
    same_class = merge(edge, cloud, offloaded, iou=0.5, class_agnostic=False)
    # Assert
    np.testing.assert_allclose(agnostic.xyxy, [[50, 50, 60, 60], [20, 20, 30, 30], [1, 0, 11, 10]])
    np.testing.assert_array_equal(agnostic.cls, [0, 5, 7])
    np.testing.assert_allclose(agnostic.conf, [0.8, 0.95, 0.7])
    np.testing.assert_array_equal(same_class.cls, [0, 0, 5, 7])


def test_merge_keep_unanswered_keeps_offloaded_boxes_the_cloud_did_not_answer():
    """keep_unanswered: an offloaded edge box with no cloud box at IoU ≥ 0.5 stays at its own confidence.

    Edge A [0,0,10,10] kept (0.9), B [20,20,30,30] offloaded (0.2), D [40,40,50,50] offloaded (0.3).
    Cloud answers only B' = [21,20,31,30] (IoU with B = 90/110 = 0.82): B is replaced, D stays.
    Without the option D is dropped. An empty cloud answer keeps every edge box.
    """
    # Prepare
    edge = dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.2, 0.3], [0, 1, 2])
    cloud = dets([[21, 20, 31, 30]], [0.8], [1])
    offloaded = [F, T, T]
    # Execute
    kept = merge(edge, cloud, offloaded, keep_unanswered=True)
    plain = merge(edge, cloud, offloaded)
    silent = merge(edge, Detections.empty(), offloaded, keep_unanswered=True)
    # Assert
    np.testing.assert_allclose(kept.xyxy, [[0, 0, 10, 10], [40, 40, 50, 50], [21, 20, 31, 30]])
    np.testing.assert_allclose(kept.conf, [0.9, 0.3, 0.8])
    np.testing.assert_array_equal(plain.cls, [0, 1])
    np.testing.assert_allclose(plain.conf, [0.9, 0.8])
    np.testing.assert_array_equal(silent.cls, [0, 1, 2])


def test_merge_fuse_pairs_edge_and_cloud_as_one_ensemble():
    """resolve="fuse": one-to-one pairs by descending IoU, box weighted by confidence, noisy-or confidence.

    Edge A [0,0,10,10] 0.4 cls 1 (offloaded), B [20,20,30,30] 0.3 (offloaded), C [50,50,60,60] 0.9 (kept).
    Cloud A' [2,0,12,10] 0.6 cls 2 (IoU with A = 80/120 = 0.67), E [100,100,110,110] 0.5.
    A+A' → box 0.4·A + 0.6·A' = [1.2,0,11.2,10], cls 2 (cloud surer), conf 1 − 0.6·0.4 = 0.76;
    B unpaired and offloaded → dropped (kept with keep_unanswered); C, E stay as they are.
    """
    # Prepare
    edge = dets([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.4, 0.3, 0.9], [1, 0, 0])
    cloud = dets([[2, 0, 12, 10], [100, 100, 110, 110]], [0.6, 0.5], [2, 1])
    offloaded = [T, T, F]
    # Execute
    fused = merge(edge, cloud, offloaded, resolve="fuse")
    kept = merge(edge, cloud, offloaded, resolve="fuse", keep_unanswered=True)
    same_class = merge(edge, cloud, offloaded, resolve="fuse", class_agnostic=False)
    # Assert
    np.testing.assert_allclose(fused.xyxy, [[1.2, 0, 11.2, 10], [50, 50, 60, 60], [100, 100, 110, 110]])
    np.testing.assert_allclose(fused.conf, [0.76, 0.9, 0.5])
    np.testing.assert_array_equal(fused.cls, [2, 0, 1])
    np.testing.assert_array_equal(kept.cls, [2, 0, 0, 1])
    np.testing.assert_allclose(kept.conf, [0.76, 0.3, 0.9, 0.5])
    # classes differ: no pair; A was offloaded and is unanswered → only C, A', E
    np.testing.assert_allclose(same_class.conf, [0.9, 0.6, 0.5])


def test_merge_fuse_pairs_greedily_by_iou_and_each_box_once():
    """Two edge boxes on one cloud box: the higher-IoU edge box pairs, the other stays unpaired.

    Edge P [0,0,10,10] 0.5, Q [1,0,11,10] 0.5 (both kept, not offloaded); cloud R [1,0,11,10] 0.5.
    IoU(P,R) = 90/110 = 0.82, IoU(Q,R) = 1 → Q+R fuse (conf 1 − 0.25 = 0.75, box R), P stays at 0.5.
    The cloud policy instead drops both edge boxes (each overlaps R). With no cloud boxes, fuse = the
    unoffloaded edge boxes.
    """
    # Prepare
    edge = dets([[0, 0, 10, 10], [1, 0, 11, 10]], [0.5, 0.5], [3, 3])
    cloud = dets([[1, 0, 11, 10]], [0.5], [3])
    # Execute
    fused = merge(edge, cloud, [F, F], resolve="fuse")
    trusted = merge(edge, cloud, [F, F])
    alone = merge(edge, Detections.empty(), [T, F], resolve="fuse")
    # Assert
    np.testing.assert_allclose(fused.xyxy, [[1, 0, 11, 10], [0, 0, 10, 10]])
    np.testing.assert_allclose(fused.conf, [0.75, 0.5])
    np.testing.assert_allclose(trusted.conf, [0.5])
    np.testing.assert_allclose(alone.xyxy, [[1, 0, 11, 10]])
    with pytest.raises(ValueError, match="'vote'"):
        merge(edge, cloud, resolve="vote")


def test_merge_iou_threshold_is_inclusive():
    """IoU exactly 0.5 counts as an overlap: [0,0,10,10] vs [0,0,10,20] → 100/200 = 0.5."""
    merged = merge(dets([[0, 0, 10, 10]]), dets([[0, 0, 10, 20]]), [F], iou=0.5)
    np.testing.assert_allclose(merged.xyxy, [[0, 0, 10, 20]])
    kept = merge(dets([[0, 0, 10, 10]]), dets([[0, 0, 10, 20]]), [F], iou=0.51)
    assert len(kept) == 2


def test_merge_empty_sides():
    """Empty cloud: offloaded edge detections are dropped, the rest kept; empty edge: cloud only."""
    # Prepare
    edge = dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.2])
    cloud = dets([[5, 5, 15, 15]], [0.6], [2])
    # Execute / Assert
    np.testing.assert_allclose(merge(edge, Detections.empty(), [F, T]).xyxy, [[0, 0, 10, 10]])
    np.testing.assert_allclose(merge(Detections.empty(), cloud, []).xyxy, [[5, 5, 15, 15]])
    assert len(merge(Detections.empty(), Detections.empty(), None)) == 0
    assert len(merge(edge, Detections.empty(), None)) == 2  # nothing offloaded
    with pytest.raises(ValueError, match="offloaded_mask has 1 entries for 2"):
        merge(edge, cloud, [T])
    with pytest.raises(ValueError, match="iou must be in"):
        merge(edge, cloud, None, iou=0)


# --------------------------------------------------------------------------- #
# Crops and coordinates
# --------------------------------------------------------------------------- #
def test_crop_geometry_context_and_min_size():
    """Box [100,100,120,110] (20×10), context 0.5 → [90,95,130,115] (40×20);
    height 20 < 32 grows 6 px each side → [90, 89, 130, 121]."""
    crops = crop_regions([[100, 100, 120, 110]], (480, 640, 3), context=0.5, min_size=32)
    np.testing.assert_array_equal(crops, [[90, 89, 130, 121]])
    assert crops.dtype == np.int64


def test_crop_is_shifted_inside_and_clipped():
    """Corner box [0,0,4,4]: context → [-2,-2,6,6], min 32 → [-14,-14,18,18],
    shifted inside → [0,0,32,32]. In a 20×20 image the crop is the whole image."""
    np.testing.assert_array_equal(crop_regions([[0, 0, 4, 4]], (480, 640)), [[0, 0, 32, 32]])
    np.testing.assert_array_equal(crop_regions([[636, 476, 640, 480]], (480, 640)), [[608, 448, 640, 480]])
    np.testing.assert_array_equal(crop_regions([[5, 5, 10, 10]], (20, 20)), [[0, 0, 20, 20]])


def test_crop_rounds_outwards():
    """[10.5, 10.5, 50.5, 50.5], no context, min 1 → floor/ceil → [10, 10, 51, 51]."""
    crops = crop_regions([[10.5, 10.5, 50.5, 50.5]], (100, 100), context=0.0, min_size=1)
    np.testing.assert_array_equal(crops, [[10, 10, 51, 51]])


def test_overlapping_crops_are_merged():
    """Two close boxes: crops [84,84,116,116] and [104,84,136,116] overlap → [84,84,136,116];
    a far box keeps its own crop [384,284,416,316]; sorted top to bottom."""
    # Prepare: 8×8 boxes at (96..104) and (116..124), context 0.5 → 16 px, min 32
    boxes = [[96, 96, 104, 104], [116, 96, 124, 104], [396, 296, 404, 304]]
    # Execute
    merged = crop_regions(boxes, (480, 640))
    separate = crop_regions(boxes, (480, 640), merge_overlaps=False)
    # Assert
    np.testing.assert_array_equal(
        separate, [[84, 84, 116, 116], [104, 84, 136, 116], [384, 284, 416, 316]]
    )
    np.testing.assert_array_equal(merged, [[84, 84, 136, 116], [384, 284, 416, 316]])


def test_merge_overlapping_chains_and_touching():
    """A∪B grows into C → one window; touching windows (shared edge) stay apart."""
    chained = merge_overlapping([[0, 0, 10, 10], [8, 0, 20, 10], [18, 5, 30, 30]])
    np.testing.assert_array_equal(chained, [[0, 0, 30, 30]])
    touching = merge_overlapping([[0, 0, 10, 10], [10, 0, 20, 10]])
    np.testing.assert_array_equal(touching, [[0, 0, 10, 10], [10, 0, 20, 10]])
    assert merge_overlapping(np.zeros((0, 4))).shape == (0, 4)


def _merge_pairwise(windows) -> list[list[int]]:
    """Reference: merge the first overlapping pair found, start over, until no pair overlaps; sort."""
    boxes = [list(map(int, w)) for w in windows]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]):
                    boxes[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return sorted(boxes, key=lambda b: (b[1], b[0], b[3], b[2]))


def test_merge_overlapping_equals_merging_pair_by_pair():
    """Whole groups merged per round give what merging one pair at a time gives, also where a merged window
    reaches one its parts did not touch: [0,0,10,10] + [5,5,20,12] -> [0,0,20,12], which now overlaps
    [15,0,25,4] (neither part alone does: the first ends at x 10, the second starts at y 5)."""
    # Prepare
    reach = [[0, 0, 10, 10], [5, 5, 20, 12], [15, 0, 25, 4], [30, 30, 31, 31]]
    rng = np.random.default_rng(0)
    cases = [reach] + [np.concatenate([xy := rng.integers(0, 120, (n, 2)), xy + rng.integers(0, 30, (n, 2))], 1)
                       for n in rng.integers(2, 40, 200)]
    # Execute / Assert
    np.testing.assert_array_equal(merge_overlapping(reach), [[0, 0, 25, 12], [30, 30, 31, 31]])
    for windows in cases:
        assert merge_overlapping(windows).tolist() == _merge_pairwise(windows)


def test_to_frame_coords():
    """Crop at (100, 50) sent at 2×: [10,20,30,40] → [10/2+100, 20/2+50, ...] = [105,60,115,70]."""
    # Prepare
    in_crop = dets([[10, 20, 30, 40]], [0.7], [4])
    # Execute
    same_scale = to_frame_coords(in_crop, (100, 50))
    scaled = to_frame_coords(in_crop, (100, 50), scale=2.0)
    aniso = to_frame_coords(in_crop, (0, 0), scale=(2.0, 4.0))
    # Assert
    np.testing.assert_allclose(same_scale.xyxy, [[110, 70, 130, 90]])
    np.testing.assert_allclose(scaled.xyxy, [[105, 60, 115, 70]])
    np.testing.assert_allclose(aniso.xyxy, [[5, 5, 15, 10]])
    assert scaled.conf.tolist() == [0.7] and scaled.cls.tolist() == [4]
    np.testing.assert_allclose(to_frame_coords(in_crop, (0, 0), scale=np.float64(2)).xyxy, [[5, 10, 15, 20]])
    with pytest.raises(ValueError, match="scale must be > 0"):
        to_frame_coords(in_crop, (0, 0), scale=0)
    with pytest.raises(ValueError, match="crop_origin"):
        to_frame_coords(in_crop, (0,))


def test_crop_roundtrip_maps_cloud_box_back_to_frame():
    """A detection made on the crop pixels maps back onto the original box."""
    # Prepare: a bright 10×10 object at [200, 150, 210, 160] in a 480×640 frame
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    image[150:160, 200:210] = 255
    plan = offload_plan([[200, 150, 210, 160]], [T], image.shape)
    x1, y1, x2, y2 = plan.regions[0]
    crop = crop_image(image, plan.regions[0])
    # Execute: "cloud" finds the bright pixels in the crop
    ys, xs = np.nonzero(crop[..., 0])
    found = dets([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
    back = to_frame_coords(found, (x1, y1))
    # Assert: crop [189, 139, 221, 171] (10 px box, +5 context, grown to 32)
    np.testing.assert_array_equal(plan.regions, [[189, 139, 221, 171]])
    np.testing.assert_allclose(back.xyxy, [[200, 150, 210, 160]])


def test_offload_plan_modes():
    """crops: one region per separated ambiguous box; frame: one full-frame region; none → empty."""
    # Prepare
    boxes = [[10, 10, 20, 20], [300, 200, 310, 210], [600, 400, 610, 410]]
    mask = [T, F, T]
    # Execute
    crops = offload_plan(boxes, mask, (480, 640), mode="crops")
    frame = offload_plan(boxes, mask, (480, 640), mode="frame")
    nothing = offload_plan(boxes, [F, F, F], (480, 640))
    # Assert: [10,10,20,20] → [5,5,25,25] → grown to [-1,-1,31,31] → shifted [0,0,32,32]
    np.testing.assert_array_equal(crops.regions, [[0, 0, 32, 32], [589, 389, 621, 421]])
    np.testing.assert_array_equal(crops.box_region, [0, -1, 1])
    np.testing.assert_array_equal(frame.regions, [[0, 0, 640, 480]])
    np.testing.assert_array_equal(frame.box_region, [0, -1, 0])
    assert nothing.empty and nothing.box_region.tolist() == [-1, -1, -1]
    # cloud: the whole frame always, also with nothing offloaded (and with no box at all)
    cloud = offload_plan(boxes, [F, F, F], (480, 640), mode="cloud")
    np.testing.assert_array_equal(cloud.regions, [[0, 0, 640, 480]])
    np.testing.assert_array_equal(offload_plan(np.zeros((0, 4)), [], (480, 640), mode="cloud").regions,
                                  [[0, 0, 640, 480]])
    with pytest.raises(ValueError, match="mode must be"):
        offload_plan(boxes, mask, (480, 640), mode="tiles")


def test_crop_image_rejects_outside_region():
    with pytest.raises(ValueError, match="outside"):
        crop_image(np.zeros((10, 10), np.uint8), [5, 5, 20, 8])


# --------------------------------------------------------------------------- #
# Bytes and metrics
# --------------------------------------------------------------------------- #
def test_payload_bytes():
    """The payload sums encoded sizes (bytes objects and counts); a negative size is named."""
    assert payload_bytes([b"abc", 10]) == 13
    with pytest.raises(ValueError, match="-1"):
        payload_bytes([-1])


def test_encode_regions_jpeg():
    """Crops cost fewer bytes than the frame they come from (skipped without cv2)."""
    try:
        import cv2  # noqa: F401, PLC0415
    except Exception:
        pytest.skip("cv2 not importable")
    # Prepare
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    # Execute
    crops = encode_regions(image, [[0, 0, 32, 32], [100, 100, 164, 132]], quality=90)
    frame = encode_regions(image, [[0, 0, 320, 240]], quality=90)
    # Assert
    assert len(crops) == 2 and all(c[:2] == b"\xff\xd8" for c in crops)
    assert payload_bytes(crops) == len(crops[0]) + len(crops[1])
    assert 0 < payload_bytes(crops) < payload_bytes(frame)


def test_shelf_pack_hand_checked():
    """Canvases 100x100, gap 2: tallest first; a shelf fills left to right, then the next shelf, then canvas."""
    assert shelf_pack([(60, 40), (50, 50), (30, 20)], 100, 100, gap=2) == [(0, 0, 52), (0, 0, 0), (0, 62, 52)]
    assert shelf_pack([(60, 60), (60, 60), (200, 10)], 100, 100, gap=2) == [(0, 0, 0), (1, 0, 0), None]
    assert shelf_pack([], 100, 100) == []
    # one unbounded canvas, no gap: the second 60x60 goes on the next shelf, not a new canvas
    assert shelf_pack([(60, 60), (60, 60)], 100) == [(0, 0, 0), (0, 0, 60)]
    with pytest.raises(ValueError, match="-1"):
        shelf_pack([(1, 1)], 100, gap=-1)


def test_atlas_layout_hand_checked():
    """Crops 40x32, 20x10 at align 16: cells 48x32 + 32x16 = 2048 px² -> W = 48 (ceil(45.3) to 16);
    the 48x32 cell at (0, 0), the 32x16 on the next shelf at (0, 32); atlas 48x48."""
    corners, size = atlas_layout([(40, 32), (20, 10)])
    assert corners.tolist() == [[0, 0], [0, 32]] and size == (48, 48)
    # four 16x16 crops: W = sqrt(1024) = 32, two shelves of two
    corners, size = atlas_layout([(16, 16)] * 4)
    assert corners.tolist() == [[0, 0], [16, 0], [0, 16], [16, 16]] and size == (32, 32)
    # a crop wider than the square side sets the width; align 1 = no padding
    corners, size = atlas_layout([(100, 5), (10, 10)], align=1)
    assert size == (100, 15) and corners.tolist() == [[0, 10], [0, 0]]
    assert atlas_layout([])[1] == (0, 0)
    with pytest.raises(ValueError, match="0"):
        atlas_layout([(0, 5)])


def test_encode_atlas_decodes_each_crop_as_if_sent_alone():
    """Every crop cut from the decoded atlas is as faithful as the same crop sent as its own JPEG (16-px
    grid, so no JPEG block mixes two crops), and the atlas is smaller than the separate JPEGs by about
    their ~600-byte headers, paid once (skipped without cv2)."""
    cv2 = pytest.importorskip("cv2")
    # Prepare: a smooth image (a real frame's statistics) and three crops of awkward sizes
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), (9, 9), 3)
    regions = np.array([[0, 0, 33, 37], [100, 100, 164, 132], [200, 50, 241, 90]])
    # Execute
    atlas, corners = encode_atlas(image, regions, quality=90)
    separate = encode_regions(image, regions, quality=90)
    decoded = cv2.imdecode(np.frombuffer(atlas, np.uint8), cv2.IMREAD_COLOR)
    # Assert
    assert corners.shape == (3, 2) and (corners % 16 == 0).all()
    for (x1, y1, x2, y2), (ax, ay), alone in zip(regions, corners, separate):
        ours = decoded[ay:ay + y2 - y1, ax:ax + x2 - x1].astype(int)
        theirs = cv2.imdecode(np.frombuffer(alone, np.uint8), cv2.IMREAD_COLOR).astype(int)
        original = image[y1:y2, x1:x2].astype(int)
        assert ours.shape == theirs.shape
        # as close to the original as the crop's own JPEG (measured: 1.92 vs 1.92, 2.22 vs 2.18, 2.07 vs 2.06;
        # the decoder's chroma upsampling reads a neighbour's pixels at a cell's edge, hence not identical)
        assert np.abs(ours - original).mean() <= np.abs(theirs - original).mean() + 0.1
    assert len(atlas) < payload_bytes(separate) - 2 * 500  # measured 1656 vs 2835 bytes
    with pytest.raises(ValueError, match="at least one region"):
        encode_atlas(image, np.zeros((0, 4)))


def test_reason_counts_rejects_unknown():
    with pytest.raises(ValueError, match="blurry"):
        reason_counts([("blurry",)])


def test_merge_keep_unanswered_per_detection():
    """keep_unanswered as a mask: edge A [0,0,10,10] 0.9 kept (not offloaded); B [20,20,30,30] 0.4 offloaded and
    answered by B' [21,20,31,30] 0.6 (IoU 90/110) -> fused, noisy-or 1 - 0.6 * 0.4 = 0.76; C [50,50,60,60] 0.1
    offloaded, unanswered: kept only where its flag says so."""
    edge = Detections([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.4, 0.1], [0, 1, 1])
    cloud = Detections([[21, 20, 31, 30]], [0.6], [1])
    offloaded = [False, True, True]
    dropped = merge(edge, cloud, offloaded, keep_unanswered=[True, True, False], resolve="fuse")
    kept = merge(edge, cloud, offloaded, keep_unanswered=[False, False, True], resolve="fuse")
    assert dropped.conf.tolist() == pytest.approx([0.76, 0.9])
    assert kept.conf.tolist() == pytest.approx([0.76, 0.9, 0.1])
    assert merge(edge, cloud, offloaded, keep_unanswered=True, resolve="fuse").to_list() == kept.to_list()
    with pytest.raises(ValueError, match="keep_unanswered has 2 entries for 3 edge detections"):
        merge(edge, cloud, offloaded, keep_unanswered=[True, False])


# --------------------------------------------------------------------------- offloading chosen by a budget
def option(mode, nbytes, map50, recall, **thresholds):
    return {"settings": {"offload": mode, **thresholds}, "bytes": nbytes, "map50": map50, "recall": recall}


# a whole keyframe is 10 000 B; hand-built measurements of one site's validation split
EDGE = option("none", 0.0, 0.30, 0.40)
CROPS = option("crops", 1800.0, 0.36, 0.52, t_conf=0.5)
CROPS_WIDE = option("crops", 3000.0, 0.38, 0.55, t_conf=0.7)
FRAME = option("frame", 9500.0, 0.55, 0.74)
CLOUD = option("cloud", 10000.0, 0.58, 0.76)


def test_budget_sends_whole_frames_when_it_allows_and_the_cloud_is_better():
    """Cloud >> edge: with room for whole keyframes (cap 10 000 B) the cloud alone (0.58) beats everything; at
    9 500 B the frame mode (0.55) is the best that fits, above every crop option."""
    measured = {"frame_bytes": 10000.0, "options": [EDGE, CROPS, CROPS_WIDE, FRAME, CLOUD]}
    assert choose_offload(measured, Budget("frame", 1.0)) is CLOUD
    assert choose_offload(measured, Budget("bytes", 9500)) is FRAME
    assert choose_offload(measured, Budget("recall", 0.7)) is FRAME  # the cheapest option with recall >= 0.7


def test_budget_sends_crops_when_it_does_not_allow_whole_frames():
    """The same site at a quarter of a keyframe (cap 2 500 B): of edge (0 B) and crops (1 800 B) the crops
    (mAP50 0.36); the wider crops (3 000 B) do not fit. Below every upload: the edge alone."""
    measured = {"frame_bytes": 10000.0, "options": [EDGE, CROPS, CROPS_WIDE, FRAME, CLOUD]}
    assert choose_offload(measured, Budget("frame", 0.25)) is CROPS
    assert choose_offload(measured, Budget("bytes", 3000)) is CROPS_WIDE
    assert choose_offload(measured, Budget("bytes", 100)) is EDGE
    assert choose_offload(measured, Budget("recall", 0.5)) is CROPS  # 0.52 >= 0.5 at 1 800 B


def test_budget_ties_and_nothing_that_fits():
    """Equal mAP50: the fewer bytes; equal bytes too: the earlier option. No option within the cap (no edge
    option measured): the cheapest. No option reaching the recall: the highest recall."""
    a, b, c = option("crops", 900.0, 0.4, 0.5), option("crops", 600.0, 0.4, 0.5), option("crops", 600.0, 0.4, 0.5)
    measured = {"frame_bytes": 1000.0, "options": [a, b, c]}
    assert choose_offload(measured, Budget("frame", 1.0)) is b
    assert choose_offload(measured, Budget("bytes", 10)) is b
    assert choose_offload({"frame_bytes": 1.0, "options": [CROPS, FRAME]}, Budget("recall", 0.9)) is FRAME
    with pytest.raises(ValueError, match="no measured options"):
        choose_offload({"frame_bytes": 1.0, "options": []}, Budget("bytes", 1))


@pytest.mark.parametrize("text, expected", [("", None), ("off", None), ("bytes:4000", Budget("bytes", 4000.0)),
                                            ("frame:0.25", Budget("frame", 0.25)), (" recall:1 ", Budget("recall", 1.0)),
                                            ("bytes:0", Budget("bytes", 0.0))])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["bytes=4000", "bytes:", "bytes:-1", "frame:nan", "recall:0", "recall:1.5",
                                  "share:0.25", "4000"])
def test_parse_budget_names_the_bad_value(text):
    with pytest.raises(ValueError, match=f"budget '{text.strip()}': expected ''"):
        parse_budget(text)
