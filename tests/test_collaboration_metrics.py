"""The collaboration benchmark's metrics on hand-built detections (paper Tables 3-4, section 4.2)."""

import numpy as np
import pytest

from common.detections import Detections, precision_one, score


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
