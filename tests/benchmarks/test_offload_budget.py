"""The offload budget benchmark's tables on hand-built measurements (no models, no service)."""

import pytest

from benchmarks import offload_budget as ob


def _opt(mode, nbytes, map50, recall, **kw):
    settings = {"offload": mode, "t_conf": 0.5, "candidate_conf": 0.05, "jpeg_quality": 90, **kw}
    return {"settings": settings, "bytes": nbytes, "map50": map50, "recall": recall}


def _site(val, test, frame_bytes=1000.0):
    from common.routing import choose_offload, parse_budget

    measured = {"val": {"frame_bytes": frame_bytes, "options": val},
                "test": {"frame_bytes": frame_bytes, "options": test}, "det_conf": 0.2}
    measured["chosen"] = {}
    for budget in ob.BUDGETS:
        pick = choose_offload(measured["val"], parse_budget(budget))
        i = val.index(pick)
        measured["chosen"][budget] = {"index": i, "settings": pick["settings"], "val": pick, "test": test[i]}
    return measured


def test_frontier_budget_and_verdict_hand_worked():
    """Two sites, options edge / crops (20 % of a 1000 B frame) / cloud alone (100 %). Site 0's val favours the
    crops under a quarter frame, site 1's val the edge (its crops are worse there). Test means: edge (0.30 + 0.20)
    / 2 = 0.25, crops (0.40 + 0.10) / 2 = 0.25, cloud (0.50 + 0.30) / 2 = 0.40. frame:0.25 picks crops on site 0
    (test 0.40) and the edge on site 1 (test 0.20): 0.30 at (20 % + 0 %) / 2 = 10 %; the bar is 0.40 - 0.02 =
    0.38: not met, and no option within 25 % reaches it (best 0.25, the edge, first of the tie by bytes)."""
    sites = {"0": _site([_opt("none", 0, 0.3, 0.3), _opt("crops", 200, 0.35, 0.4), _opt("cloud", 1000, 0.5, 0.6)],
                        [_opt("none", 0, 0.3, 0.3), _opt("crops", 200, 0.4, 0.5), _opt("cloud", 1000, 0.5, 0.6)]),
             "1": _site([_opt("none", 0, 0.3, 0.3), _opt("crops", 200, 0.25, 0.3), _opt("cloud", 1000, 0.2, 0.3)],
                        [_opt("none", 0, 0.2, 0.2), _opt("crops", 200, 0.1, 0.2), _opt("cloud", 1000, 0.3, 0.4)])}
    regime = {"sites": sites}

    rows = ob.frontier(regime)
    assert [r["option"] for r in rows] == ["edge alone", "crops, t_conf 0.5, candidates ≥ 0.05",
                                          "cloud alone (whole keyframe), JPEG q90"]
    assert [r["map50"] for r in rows] == pytest.approx([0.25, 0.25, 0.40])
    assert [r["share"] for r in rows] == pytest.approx([0.0, 0.2, 1.0])
    assert [r["pareto"] for r in rows] == [True, False, True]  # the crops add nothing over the edge's 0.25
    chosen = ob.budget_rows(regime)["frame:0.25"]
    assert chosen["map50"] == pytest.approx(0.30) and chosen["share"] == pytest.approx(0.10)
    assert chosen["chosen"] == ["crops, t_conf 0.5, candidates ≥ 0.05", "edge alone"]
    v = ob.verdict(regime)
    assert (v["edge"], v["cloud"], v["bar"]) == pytest.approx((0.25, 0.40, 0.38))
    assert not v["met"] and not v["frontier_can"] and v["best_within"] == pytest.approx(0.25)
    assert v["best_within_option"] == "edge alone"


def test_calibration_check_hand_worked():
    """One image, 4 objects of class 0 (20 px boxes 40 px apart); detections at conf 0.9 (hit), 0.8 (hit), 0.6
    (miss), 0.5 (hit), 0.3 (miss): the f1_threshold example, best F1 0.75 from 0.5 on, recall there 3/4. Deployed at
    det_conf 0.7 (calibrated elsewhere): 2 hits of 4, recall 0.5, a relative gap of (0.75 - 0.5) / 0.75 = 1/3."""
    import numpy as np

    from common.detections import Detections

    gt = np.array([[0, 40 * i, 0, 40 * i + 20, 20] for i in range(4)], dtype=float)
    boxes = [[0, 0, 20, 20], [40, 0, 60, 20], [300, 300, 320, 320], [80, 0, 100, 20], [400, 400, 420, 420]]
    dets = Detections(boxes, [0.9, 0.8, 0.6, 0.5, 0.3], [0, 0, 0, 0, 0])

    c = ob.calibration_check([dets], [gt], 0.7, nc=1)
    assert c["recall"] == pytest.approx(0.5)
    assert (c["best_f1_conf"], c["best_f1_recall"]) == pytest.approx((0.5, 0.75))
    assert c["relative_gap"] == pytest.approx(1 / 3) and not c["within_10pct"]
    assert ob.calibration_check([dets], [gt], 0.5, nc=1)["within_10pct"]
