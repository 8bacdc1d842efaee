"""Sliced inference through SAHI (clients.sliced): tiles, shifts back to the frame and the merge, worked by hand."""

import cv2
import numpy as np
import pytest

from clients.sliced import sliced_detect
from common.detections import Detections


class BlobDetector:
    """A predictor that finds bright squares (connected components) in what it is given, at score 0.9, class 0;
    it records the shape of every image it sees."""

    def __init__(self):
        self.seen = []

    def __call__(self, image: np.ndarray) -> Detections:
        self.seen.append(image.shape)
        n, _, stats, _ = cv2.connectedComponentsWithStats((image.max(axis=2) > 0).astype(np.uint8))
        boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:n]]
        return Detections(boxes, [0.9] * len(boxes), [0] * len(boxes))


def _sorted(d: Detections) -> list:
    return sorted(d.xyxy.tolist())


def test_four_tiles_without_overlap_shift_each_tiles_box_back_to_the_frame():
    """200 x 200 frame, 100 px tiles, no overlap: tiles start at (0, 0), (100, 0), (0, 100), (100, 100); one
    10 px square inside each tile comes back at its frame position; the whole frame is seen once more."""
    image = np.zeros((200, 200, 3), np.uint8)
    for x, y in ((10, 10), (110, 10), (10, 110), (130, 150)):
        image[y:y + 10, x:x + 10] = 255
    detector = BlobDetector()

    dets = sliced_detect(detector, image, slice_px=100, overlap=0.0)

    assert _sorted(dets) == [[10, 10, 20, 20], [10, 110, 20, 120], [110, 10, 120, 20], [130, 150, 140, 160]]
    assert detector.seen.count((100, 100, 3)) == 4 and detector.seen.count((200, 200, 3)) == 1
    assert dets.conf.tolist() == [0.9] * 4 and dets.cls.tolist() == [0] * 4


def test_an_object_seen_by_two_overlapping_tiles_and_the_whole_frame_is_merged_into_one_box():
    """100 x 150 frame, 100 px tiles at 50 % overlap start at x = 0 and 50: the square [60, 10, 90, 40] lies in
    both and in the whole frame, three equal boxes that SAHI's greedy merge (IOS 1.0 > 0.5) makes one."""
    image = np.zeros((100, 150, 3), np.uint8)
    image[10:40, 60:90] = 255
    detector = BlobDetector()

    dets = sliced_detect(detector, image, slice_px=100, overlap=0.5)

    assert detector.seen.count((100, 100, 3)) == 2 and detector.seen.count((100, 150, 3)) == 1
    assert _sorted(dets) == [[60, 10, 90, 40]]


def test_the_predictor_gets_tiles_in_the_frames_channel_order_and_the_conf_floor_applies():
    image = np.zeros((64, 64, 3), np.uint8)
    image[8:16, 8:16, 0] = 255  # blue only, in BGR
    channels = []  # (first channel's max, last channel's max) of every image the predictor sees

    def detector(tile):
        channels.append((int(tile[..., 0].max()), int(tile[..., 2].max())))
        return BlobDetector()(tile)

    kept = sliced_detect(detector, image, slice_px=32, overlap=0.0, conf=0.5)
    dropped = sliced_detect(detector, image, slice_px=32, overlap=0.0, conf=0.95)

    assert _sorted(kept) == [[8, 8, 16, 16]] and len(dropped) == 0
    # per call: 4 tiles of 32 px, the square in the first, and the whole frame
    assert channels == [(255, 0), (0, 0), (0, 0), (0, 0), (255, 0)] * 2


@pytest.mark.parametrize("slice_px, overlap", [(0, 0.2), (64, 1.0), (64, -0.1)])
def test_bad_slice_settings_are_refused_by_name(slice_px, overlap):
    with pytest.raises(ValueError, match=rf"slice_px={slice_px}.*overlap={overlap}"):
        sliced_detect(BlobDetector(), np.zeros((8, 8, 3), np.uint8), slice_px=slice_px, overlap=overlap)


def test_one_tile_the_size_of_the_frame_under_nms_gives_the_edge_predictors_detections_nms_again():
    """A real detector (YOLO11n, TorchPredictor): one tile = the frame, no standard prediction, SAHI's NMS at
    IoU 0.7 per class: the predictor's own detections after :func:`common.detections.nms` at 0.7 once more (the
    predictor suppresses on boxes before clipping to the frame; its clipped boxes can coincide)."""
    from clients.detector import TorchPredictor
    from common import yolo
    from common.detections import nms

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    predictor = TorchPredictor(yolo.build_model("yolo11n", nc=3, seed=0), imgsz=128, conf=0.001, iou=0.7)
    alone = predictor(image)
    alone = alone[nms(alone.xyxy, alone.conf, 0.7, classes=alone.cls)]

    dets = sliced_detect(predictor, image, slice_px=128, overlap=0.0, standard_pred=False, postprocess="NMS",
                         match_metric="IOU", match_threshold=0.7)

    assert len(alone) > 0
    order_a, order_d = np.lexsort(alone.xyxy.T), np.lexsort(dets.xyxy.T)
    np.testing.assert_allclose(dets.xyxy[order_d], alone.xyxy[order_a], atol=1e-4)
    np.testing.assert_allclose(dets.conf[order_d], alone.conf[order_a], atol=1e-6)
    assert dets.cls[order_d].tolist() == alone.cls[order_a].tolist()
