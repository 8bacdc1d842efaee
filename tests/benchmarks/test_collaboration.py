"""The collaboration benchmark end to end on tiny data: real cloud service process, edge runtime, tables."""

import json

import pytest

from benchmarks import collaboration


def test_remerged_recomputes_each_refined_answer_under_another_policy():
    """remerged: refined detections = merge(keyframe edge line, its cloud_detections, offloaded = with reasons).

    Edge: A [0,0,10,10] 0.9 confident, B [20,20,30,30] 0.4 offloaded (low_conf). Cloud answered B' =
    [21,20,31,30] 0.6 (IoU with B = 90/110). Merge "cloud": A, B'. "fuse": B+B' → noisy-or 1 − 0.6·0.4 = 0.76,
    box 0.4·B + 0.6·B' = [20.6,20,30.6,30], then A. Edge lines pass through unchanged.
    """
    # Prepare
    edge = {"kind": "edge", "frame": 0, "source_frame": 0, "detections": [
        {"xyxy": [0, 0, 10, 10], "conf": 0.9, "cls": 0, "track": 1, "reasons": []},
        {"xyxy": [20, 20, 30, 30], "conf": 0.4, "cls": 1, "track": 2, "reasons": ["low_conf"]}]}
    refined = {"kind": "refined", "frame": 0, "detections": [],
               "cloud_detections": [{"xyxy": [21, 20, 31, 30], "conf": 0.6, "cls": 1}]}
    # Execute
    plain = collaboration.remerged([edge, refined])
    fused = collaboration.remerged([edge, refined], merge="fuse")
    # Assert
    assert plain[0] is edge and [d["conf"] for d in plain[1]["detections"]] == [0.9, 0.6]
    assert [d["conf"] for d in fused[1]["detections"]] == pytest.approx([0.76, 0.9])
    assert fused[1]["detections"][0]["xyxy"] == pytest.approx([20.6, 20, 30.6, 30])
    assert refined["detections"] == []  # the input records are not modified


@pytest.mark.slow
def test_collaboration_benchmark_runs_end_to_end(tiny_overrides, tmp_path):
    # Prepare: tiny data and models (1 epoch), one edge model, a two-point t_conf sweep
    sets = [f"{k}={v}" for k, v in {**tiny_overrides, "federation.num-rounds": 1, "model.cloud": "yolo11n"}.items()]
    out = tmp_path / "collab"

    # Execute
    collaboration.main(["--preset", "quick", "--edge-models", "yolo11n", "--t-conf-sweep", "0.5", "1.0",
                        "--cloud-conf", "0.001", "--zoom-sweep", "1.5", "--sites", "0", "1", "--sliced-seeds", "2",
                        "--out", str(out),
                        "--set", *sets])

    # Assert: every table is there, the numbers are consistent with each other
    res = json.loads(out.with_suffix(".json").read_text())["result"]["sites"]["0"]
    md = out.with_suffix(".md").read_text()
    assert "| collaboration (crops, merge cloud) |" in md and "| edge alone |" in md and "t_conf 1.0" in md
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
    # merged again offline, the default policy gives exactly the runtime's own refined answers; keeping the
    # offloaded edge boxes the cloud did not answer only adds detections: recall cannot drop
    merges = img["crops"]["merges"]
    assert merges["cloud"] == img["crops"]["collab"]
    assert merges["cloud+keep"]["recall"] >= merges["cloud"]["recall"]
    assert "| collaboration (crops, merge fuse+keep) |" in md
    # the main run's crops are the service's default zoom (2x); the sweep adds crops at 1.5x on the same edge
    assert set(res["zoom"]) == {"2", "1.5"} and res["zoom"]["2"] == img["crops"]
    one = res["zoom"]["1.5"]
    assert one["edge"] == img["crops"]["edge"] and one["delivered"] == img["crops"]["delivered"]
    assert "crops resized 2x before detection" in md
    # the second site: its own row in the summary, its main edge model only
    other = json.loads(out.with_suffix(".json").read_text())["result"]["sites"]["1"]
    assert set(other["sweep"]) == {"yolo11n"} and other["images"]["crops"]["frames"] == 4
    assert "## Every site (sites 0, 1;" in md and "| 1 | " in md and "| mean | " in md
    assert "| crops, fuse+keep > both edge and cloud alone | " in md and "| crop zoom |" in md
    # sliced inference at the edge: the same ground truth as the edge alone, every image and frame, timed
    sl = res["sliced"]
    assert sl["images"]["n_gt"] == img["crops"]["edge"]["n_gt"]
    assert sl["video"]["n_gt"] == res["video"]["crops-all"]["edge"]["n_gt"]
    assert sl["images"]["edge_ms"] > 0 and sl["video"]["edge_ms"] > 0 and sl["images"]["slice_frac"] == 0.5
    assert "## Sliced inference at the edge (SAHI, no cloud)" in md
    assert "| crops, fuse+keep beats slicing at the edge (images mAP50) | " in md
    # the comparison again with the seed-2 edge model: the main seed's entry is the main run, seed 2 its own model
    assert set(res["seeds"]) == {"1", "2"} and res["seeds"]["1"]["sliced"] == sl
    two = res["seeds"]["2"]
    assert two["edge_weights"].endswith("-yolo11n-site0-seed2-1ep.pt") and two["sliced"]["images"]["n_gt"] == sl["images"]["n_gt"]
    assert two["images"]["crops"]["frames"] == 4 and two["video"]["crops-all"]["frames"] == 12
    assert "Edge models of seeds 1, 2" in md and "| sd over seeds |" in md and "/4 |" in md  # 2 sites x 2 seeds
    assert 0 <= res["images_cloud"]["recall"] <= 1 or res["images_cloud"]["recall"] != res["images_cloud"]["recall"]


def test_site_test_data_reads_the_test_split_and_every_video_frame(tiny_benchmark):
    """Site 0 of the tiny benchmark: 4 test images, 12 video frames at 128 px; label rows in pixels."""
    # Execute
    images_dir, image_gts, video_dir, video_gts = collaboration.site_test_data(tiny_benchmark, 0)
    # Assert
    assert images_dir == tiny_benchmark.site_dir(0) / "images" / "test" and len(image_gts) == 4
    assert video_dir == tiny_benchmark.video_dir(0) and len(video_gts) == 12
    label_files = [video_dir / "labels" / f"{i:06d}.txt" for i in range(12)]
    first = [line.split() for line in label_files[0].read_text().splitlines()]
    assert [len(g) for g in video_gts] == [len(f.read_text().splitlines()) for f in label_files]
    cls, cx, cy, w, h = map(float, first[0])  # normalised centre and size -> corners at 128 px
    assert video_gts[0][0].tolist() == pytest.approx([cls, 128 * (cx - w / 2), 128 * (cy - h / 2),
                                                      128 * (cx + w / 2), 128 * (cy + h / 2)])


def _sliced_result(edge, sliced, fused, ms=(10.0, 30.0, 50.0)):
    """A site-and-seed result with images mAP50s (edge, sliced, crops fuse+keep); FNR = 1 - mAP50 here, video the
    same figures as the images."""
    def fig(m):
        return {"map50": m, "fnr": 1 - m}
    run = {"edge": fig(edge), "merges": {"fuse+keep": fig(fused)}, "edge_ms": ms[0], "collab_ms": ms[2]}
    return {"images": {"crops": run}, "video": {"crops-all": run},
            "sliced": {"images": {**fig(sliced), "edge_ms": ms[1]}, "video": fig(sliced)}}


def test_sliced_table_averages_seeds_per_site_and_counts_site_seed_runs():
    """Site rows are means over seeds, the sd row is the spread over seeds of the site mean, claims count runs."""
    per = {"0": {"sliced": 1, "seeds": {"1": _sliced_result(0.4, 0.5, 0.6), "2": _sliced_result(0.2, 0.5, 0.4)}},
           "1": {"sliced": 1, "seeds": {"1": _sliced_result(0.6, 0.7, 0.8), "2": _sliced_result(0.6, 0.7, 0.6)}}}
    md = "\n".join(collaboration.sliced_markdown(per, {"seed": 1, "slice_frac": 0.5, "slice_overlap": 0.2}))
    # site 0: edge (0.4 + 0.2) / 2 = 0.3, sliced 0.5, fused (0.6 + 0.4) / 2 = 0.5
    assert "| 0 | 0.300 | 0.500 | 0.500 | 0.700 | 0.500 | 0.500 | 10.0 | 30.0 | 50.0 | 0.300 | 0.500 | 0.500 |" in md
    # mean over sites: edge 0.45, sliced 0.6, fused 0.6; per seed edge 0.5, 0.4 -> sd 0.0707; fused 0.7, 0.5 -> 0.1414
    assert "| mean | 0.450 | 0.600 | 0.600 |" in md
    assert "| sd over seeds | 0.071 | 0.000 | 0.141 |" in md
    # fused beats sliced in 2 of the 4 (site, seed) runs (seed 1 on both sites)
    assert "| crops, fuse+keep beats slicing at the edge (images mAP50) | 2/4 | 0.600 vs 0.600 (+0.0%) |" in md
    assert "| slicing's edge time per image over the edge alone's | - | 3.0x |" in md
    assert "Edge models of seeds 1, 2" in md

    # a report without per-seed entries (one seed): the site's own figures, no sd row
    one = {"0": {**_sliced_result(0.4, 0.5, 0.6), "sliced": _sliced_result(0.4, 0.5, 0.6)["sliced"]}}
    md = "\n".join(collaboration.sliced_markdown(one, {"seed": 1, "slice_frac": 0.5, "slice_overlap": 0.2}))
    assert "| 0 | 0.400 | 0.500 | 0.600 |" in md and "sd over seeds" not in md and "| 1/1 |" in md
