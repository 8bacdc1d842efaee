"""common/detections.py: the one NMS, label reading, matching to ground truth and the collaboration metrics
(paper Tables 3-4, section 4.2), on hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest

from common.detections import (
    Detections,
    box_area,
    image_labels,
    label_path,
    labels_to_pixels,
    matched_gt,
    nms,
    precision_one,
    read_yolo_labels,
    score,
    yolo_label_lines,
)


def test_nms_matches_torchvision_on_random_boxes():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    # Prepare: 200 random boxes with distinct scores, 3 classes
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (200, 2))], axis=1)
    scores = rng.permutation(200) / 200 + 0.001
    classes = rng.integers(0, 3, 200)
    # Execute / Assert
    expected = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), 0.5).numpy()
    assert nms(boxes, scores, 0.5).tolist() == expected.tolist()
    batched = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes), 0.5)
    assert nms(boxes, scores, 0.5, classes=classes).tolist() == batched.numpy().tolist()


@pytest.mark.parametrize("chunk", [1 << 22, 5])
def test_nms_matches_torchvision_on_crowded_boxes_in_any_pair_chunk(monkeypatch, chunk):
    """A detector's output at a low threshold: clusters of near-duplicates, big and degenerate boxes, tied
    scores; the pair sweep measured in chunks of 5 pairs decides as in one piece and as torchvision."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import common.detections as D

    monkeypatch.setattr(D, "_PAIR_CHUNK", chunk)
    # Prepare: 40 objects, 1-12 boxes each jittered by up to 3 px, 60 big boxes, 5 zero-width ones, 4 classes
    rng = np.random.default_rng(2)
    centres = rng.uniform(0, 200, (40, 2)).repeat(rng.integers(1, 13, 40), axis=0)
    small = np.concatenate([centres - 6, centres + 6], axis=1) + rng.uniform(-3, 3, (len(centres), 4))
    xy = rng.uniform(0, 100, (60, 2))
    big = np.concatenate([xy, xy + rng.uniform(80, 150, (60, 2))], axis=1)
    flat = np.array([[50.0, 50, 50, 60]] * 5)
    boxes = np.concatenate([small, big, flat]).round(1)
    scores = rng.integers(1, 50, len(boxes)) / 50.0  # many ties
    classes = rng.integers(0, 4, len(boxes))
    for iou in (0.45, 0.7):
        # Execute / Assert
        expected = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), iou).numpy()
        assert nms(boxes, scores, iou).tolist() == expected.tolist()
        batched = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes), iou)
        assert nms(boxes, scores, iou, classes=classes).tolist() == batched.numpy().tolist()


def test_nms_hand_worked_classes_ties_and_empty():
    # [0,0,10,10] vs [1,0,11,10]: IoU = 90/110 ≈ 0.82 > 0.7: the less confident one goes, unless of another class
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]]
    assert nms(boxes, [0.9, 0.8, 0.7], 0.7).tolist() == [0, 2]
    assert nms(boxes, [0.9, 0.8, 0.7], 0.7, classes=[0, 1, 0]).tolist() == [0, 1, 2]
    # IoU exactly at the threshold keeps both ([0,0,10,10] vs [5,0,15,10]: 50/150 = 1/3); equal scores: input order
    assert nms([[0, 0, 10, 10], [5, 0, 15, 10]], [0.5, 0.5], 1 / 3).tolist() == [0, 1]
    assert nms([[5, 0, 15, 10], [0, 0, 10, 10]], [0.5, 0.5], 0.3).tolist() == [0]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match="scores has 1 entries for 2 boxes"):
        nms([[0, 0, 1, 1], [0, 0, 2, 2]], [0.5], 0.5)


def test_labels_read_into_pixel_boxes(tmp_path):
    # Prepare: an image path under images/ and its label file under labels/
    image = tmp_path / "data" / "images" / "test" / "a.png"
    labels = tmp_path / "data" / "labels" / "test" / "a.txt"
    labels.parent.mkdir(parents=True)
    labels.write_text("3 0.5 0.25 0.2 0.1\n\n0 0.1 0.1 0.2 0.2 0.9 0.9\n")  # a blank line, an extra column
    # Execute
    rows = read_yolo_labels(labels)
    pixels = image_labels(image, 100, 200)
    # Assert: [3, 0.5, 0.25, 0.2, 0.1] on 100x200 -> centre (50, 50), 20x20 -> [40, 40, 60, 60]
    assert label_path(image) == labels
    assert rows.tolist() == [[3, 0.5, 0.25, 0.2, 0.1], [0, 0.1, 0.1, 0.2, 0.2]]
    assert np.allclose(pixels, [[3, 40, 40, 60, 60], [0, 0, 0, 20, 40]])
    assert labels_to_pixels(np.zeros((0, 5)), 10, 10).shape == (0, 5)
    assert read_yolo_labels(tmp_path / "missing.txt").shape == (0, 5)
    labels.write_text("3 0.5 0.25\n")
    with pytest.raises(ValueError, match=r"a\.txt:1: a label line is 'cls cx cy w h', got '3 0.5 0.25'"):
        read_yolo_labels(labels)


def test_matched_gt_hand_checked():
    """Recall/FNR of the edge model (paper section 5.2, Tables 3-4): greedy IoU >= 0.5 matching."""
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    # [0,0,10,9] vs GT0: IoU 90/100 = 0.9; [50,50,60,60] overlaps nothing
    assert matched_gt([[0, 0, 10, 9], [50, 50, 60, 60]], [0.9, 0.8], gt).tolist() == [True, False]
    # two detections on GT0: the confident one takes it, the other cannot take GT1 (IoU 0)
    assert matched_gt([[0, 0, 10, 10], [1, 1, 10, 10]], [0.3, 0.9], gt).tolist() == [True, False]
    # IoU exactly 0.5 counts: [0,0,10,5] vs GT0 = 50/100
    assert matched_gt([[0, 0, 10, 5]], [0.5], gt).tolist() == [True, False]
    assert matched_gt([], [], gt).tolist() == [False, False]
    assert matched_gt([[0, 0, 1, 1]], [0.5], []).tolist() == []


def test_detections_round_trip_and_select():
    d = Detections([[0, 0, 10, 20], [5, 5, 6, 6]], [0.9, 0.2], [3, 1])
    assert box_area(d.xyxy).tolist() == [200.0, 1.0]
    assert Detections.from_list(d.to_list()).to_list() == d.to_list()
    assert d.select(d.conf > 0.5).cls.tolist() == [3]


# --- the collaboration metrics ---------------------------------------------------------------


@pytest.mark.parametrize(("conf", "tp", "n_gt", "expected"), [
    ([0.9, 0.8, 0.6, 0.5], [1, 1, 0, 1], 4, (0.6, 0.5)),  # the docstring example
    ([0.5, 0.9], [1, 1], 3, (0.0, 2 / 3)),  # no false positive: precision 1 at every threshold
    ([0.7, 0.2], [0, 1], 2, (0.7, 0.0)),  # the most confident detection is wrong
])
def test_precision_one_hand_worked(conf, tp, n_gt, expected):
    """Paper Tables 3-4 'confidence when precision reaches 1.0' and the recall above it."""
    out = precision_one(conf, tp, n_gt)
    assert (out["conf_p1"], out["recall_p1"]) == pytest.approx(expected)


def test_score_hand_worked():
    """Two images, class-aware matching at IoU 0.5: recall 2/3, FNR 1/3, conf at precision 1 = the FP's 0.7.

    Image 1: GT class 0 [0,0,10,10] and class 1 [20,20,30,30]; detections class 0 on the first (0.9, TP),
    class 0 on the second (0.7: wrong class, FP). Image 2: GT class 0 [5,5,15,15], detected (0.8, TP).
    """
    gts = [np.array([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]], float), np.array([[0, 5, 5, 15, 15]], float)]
    dets = [Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0.9, 0.7], np.float32),
                       np.array([0, 0])),
            Detections(np.array([[5, 5, 15, 15]], np.float32), np.array([0.8], np.float32), np.array([0]))]

    s = score(dets, gts, nc=2, small_px=16)

    assert s["recall"] == pytest.approx(2 / 3) and s["fnr"] == pytest.approx(1 / 3)
    assert s["n_gt"] == 3
    assert s["conf_p1"] == pytest.approx(0.7) and s["recall_p1"] == pytest.approx(2 / 3)
    # class 0: TP, TP, FP over 2 objects -> AP 0.995; class 1: no detection -> AP 0 -> mAP 0.4975
    assert s["map50"] == pytest.approx(0.4975)


def test_yolo_label_lines_normalise_clip_and_drop():
    # [10, 20, 30, 60] on 100x200: cx = 20/100, cy = 40/200, w = 20/100, h = 40/200
    # [90, 190, 130, 230] is clipped to [90, 190, 100, 200]: cx = 0.95, cy = 0.975, w = 0.1, h = 0.05
    # [150, 0, 160, 10] lies outside: dropped
    boxes = [[10, 20, 30, 60], [90, 190, 130, 230], [150, 0, 160, 10]]
    lines = yolo_label_lines(boxes, [3, 0, 1], 100, 200)
    assert lines == ["3 0.200000 0.200000 0.200000 0.200000", "0 0.950000 0.975000 0.100000 0.050000"]
    # read back: the kept boxes in pixels (the clipped one as clipped)
    back = labels_to_pixels([[float(v) for v in ln.split()] for ln in lines], 100, 200)
    np.testing.assert_allclose(back, [[3, 10, 20, 30, 60], [0, 90, 190, 100, 200]], atol=1e-4)
    assert yolo_label_lines(np.zeros((0, 4)), [], 100, 200) == []
    with pytest.raises(ValueError, match="width=0"):
        yolo_label_lines(boxes, [3, 0, 1], 0, 200)
    with pytest.raises(ValueError, match="3 boxes but 2 classes"):
        yolo_label_lines(boxes, [3, 0], 100, 200)
