"""The collaboration benchmark end to end on tiny data: real cloud service process, edge runtime, tables."""

import json

import pytest

from benchmarks import collaboration

pytestmark = pytest.mark.slow


def test_collaboration_benchmark_runs_end_to_end(tiny_overrides, tmp_path):
    # Prepare: tiny data and models (1 epoch), one edge model, a two-point t_conf sweep
    sets = [f"{k}={v}" for k, v in {**tiny_overrides, "federation.num-rounds": 1, "model.cloud": "yolo11n"}.items()]
    out = tmp_path / "collab"

    # Execute
    collaboration.main(["--preset", "quick", "--edge-models", "yolo11n", "--t-conf-sweep", "0.5", "1.0",
                        "--cloud-conf", "0.001", "--out", str(out), "--set", *sets])

    # Assert: every table is there, the numbers are consistent with each other
    res = json.loads(out.with_suffix(".json").read_text())["result"]
    md = out.with_suffix(".md").read_text()
    assert "| collaboration (crops) |" in md and "| edge alone |" in md and "t_conf 1.0" in md
    assert (tmp_path / "collab_tconf.png").stat().st_size > 0
    img = res["images"]
    assert img["crops"]["frames"] == img["crops"]["keyframes"] == 4  # every test image is a keyframe
    sweep = res["sweep"]["yolo11n"]
    # t_conf = 1.0 sends every edge detection; each image with one is offloaded and answered
    full = sweep["1.0"]
    assert full["offloaded_detections"] in (0.0, 1.0)
    assert full["delivered"] == round(full["offloaded_keyframes"] * full["keyframes"])
    # the edge alone is the same in every run of the same model (deterministic edge)
    assert sweep["0.5"]["edge"] == full["edge"] == img["crops"]["edge"]
    for run in res["video"].values():
        assert run["frames"] == 12
    assert res["video"]["crops-all"]["keyframe_fraction"] == 1.0
    kf = res["keyframes"]
    assert kf["1.5/1"]["keyframe_fraction"] == 1.0 and kf["1.5/2"]["keyframe_fraction"] >= 0.5
    assert kf["1.5/1"]["map50"] == res["video"]["crops-all"]["edge"]["map50"]  # same edge, every frame
    assert set(res["validator_map50"]) == {"yolo11n", "cloud"}
    assert "## Keyframe rules on the video" in md
    # keeping the offloaded edge boxes the cloud did not answer only adds detections: recall cannot drop
    keep = img["crops-keep"]
    assert "| collaboration (crops, unanswered edge boxes kept) |" in md
    assert keep["edge"] == img["crops"]["edge"] and keep["collab"]["recall"] >= img["crops"]["collab"]["recall"]
    assert 0 <= res["images_cloud"]["recall"] <= 1 or res["images_cloud"]["recall"] != res["images_cloud"]["recall"]
