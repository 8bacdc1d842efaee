"""Tests for benchmarks.scale: the fake federation it times behaves as the report says (small sizes, seconds)."""

import numpy as np
import pytest

from benchmarks import scale


def test_sparse_path_evaluates_one_percent_after_round_one_and_dense_path_everyone():
    # Execute: 200 sites, t_cycle 100 on the sparse path (each site's turn is crc32(site) % 100)
    sparse = scale.run_federation(200, "sparse", 4)["rounds"]
    dense = scale.run_federation(200, "dense", 3)["rounds"]

    # Assert: round 1 evaluates every (new) site on both paths; then sparse about 2 of 200 a round, dense all
    import zlib

    turns = [zlib.crc32(f"site-{i}".encode()) % 100 for i in range(200)]
    assert [r["evaluations"] for r in sparse] == [200] + [turns.count(r) for r in (2, 3, 4)]
    assert [r["evaluations"] for r in dense] == [200, 200, 200]
    # the graph appears at round 2 (KD starts there); rows recomputed on round 4 follow round 3's evaluations only
    assert sparse[0]["arcs"] == 0 and sparse[1]["rows_computed"] == 200
    assert sparse[2]["rows_computed"] < 200 and sparse[3]["arcs"] > 0
    assert dense[1]["arcs"] >= sparse[1]["arcs"] and dense[2]["rows_computed"] == 200


def test_sampled_path_sends_a_tenth_of_the_sites_a_round_and_keeps_all_of_them_in_the_graph():
    """fraction-train 0.1 of 200 sites: round 1 trains all (none has a model), then ceil(0.1 * 200) = 20 a round;
    only those can be re-scored; round 2's graph spans all 200 sites, as the sparse path's does."""
    sampled = scale.run_federation(200, "sampled", 4)["rounds"]
    sparse = scale.run_federation(200, "sparse", 2)["rounds"]

    assert [r["messages"] for r in sampled] == [200, 20, 20, 20]
    assert sampled[0]["evaluations"] == 200 and all(r["evaluations"] <= 20 for r in sampled[1:])
    assert sampled[1]["arcs"] == sparse[1]["arcs"] > 0 and sampled[1]["rows_computed"] == 200


def test_graph_timings_compare_the_same_profiles():
    out = scale.graph_timings(150, dense=True)
    assert out["n"] == 150 and 0 < out["sparse_arcs"] <= out["dense_arcs"] <= 150 * 149
    assert 2 <= out["update_rows"] < 150  # 2 profiles changed (every 100th site), plus the rows they touch


def test_keyframe_fps_reports_both_paths_on_the_same_video():
    out = scale.keyframe_fps(seconds=0.4)
    assert out["every_pixel_fps"] > 0 and out["sampled_fps"] > 0
    runs = out["runs"]
    assert runs["every_pixel"]["frames"] > 0 and runs["sampled"]["frames"] > 0
    assert np.isfinite(out["sampled_fps"] / out["every_pixel_fps"])


def test_edge_keyframes_times_every_frame_as_a_keyframe_with_the_cloud_down():
    # Execute: the random-class-layer model, 6 timed keyframes after 2 of warm-up
    out = scale.edge_keyframes(None, runs=6, warmup=2)

    # Assert: every timed frame a keyframe with an offload queued (the cloud is down); the ratio is the medians'
    assert out["keyframes"] == 6 and out["offloaded"] == 1.0 and out["offload_bytes"] > 0
    assert out["candidates"] > 0 and out["frame"] == [256, 256]
    assert out["bare_ort_ms"]["runs"] == out["keyframe_ms"]["runs"] == 6
    assert out["ratio"] == out["keyframe_ms"]["median_ms"] / out["bare_ort_ms"]["median_ms"]
    assert out["detect_ms"] <= out["to_edge_line_ms"]


def test_parts_keep_the_report_of_the_parts_not_run(tmp_path, monkeypatch):
    # Prepare: a report with a keyframe part; a child that answers the edge part at once
    import json

    (tmp_path / "scale.json").write_text(json.dumps({"keyframes": {"every_pixel_fps": 50.0, "sampled_fps": 500.0},
                                                     "load": {}}))
    fake_edge = {"model": "m", "bare_ort_ms": {"median_ms": 10.0}, "keyframe_ms": {"median_ms": 12.0}, "ratio": 1.2,
                 "detect_ms": 11.0, "to_edge_line_ms": 11.5, "answer_boxes": 3, "candidates": 4, "offloaded": 1.0,
                 "offload_bytes": 900.0}
    monkeypatch.setattr(scale, "_child", lambda args: fake_edge)
    monkeypatch.setattr(scale, "cached_base_weights", lambda: None)
    # Execute
    scale.main(["--parts", "edge", "--out", str(tmp_path / "scale")])
    # Assert: the keyframe part kept, the edge part added, both in the markdown
    report = json.loads((tmp_path / "scale.json").read_text())
    assert report["keyframes"]["sampled_fps"] == 500.0 and report["edge"] == [fake_edge]
    md = (tmp_path / "scale.md").read_text()
    assert "| sampled 4x grid (default) | 500 |" in md and "| m | 10.00 | 12.00 | 1.20x |" in md


def test_the_simulation_part_in_the_report():
    sim = {"sites": 32, "wall_s": 700.0, "peak_used_gib": 4.25, "command": "cedar-simulate --preset quick x=1",
           "rounds": [{"round": 1, "sites": 31, "wall_s": 300.0, "train_s_mean": 60.0, "evaluations": 31,
                       "server_eval_s": 150.0, "eval_share": 0.5},
                      {"round": 2, "sites": 32, "wall_s": 200.0, "train_s_mean": 61.5, "evaluations": 2,
                       "server_eval_s": 10.0, "eval_share": 0.05}]}
    md = scale.markdown({"machine": "m", "load": {}, "simulations": [sim]})
    assert "**4.2 GiB**" in md and "took 700 s" in md and "`cedar-simulate --preset quick x=1`" in md
    assert "| 1 | 31 | 300 | 60.0 | 31 | 150 | 50% |" in md and "| 2 | 32 | 200 | 61.5 | 2 | 10 | 5% |" in md


def test_each_simulation_variant_keeps_its_own_table(tmp_path, monkeypatch):
    """A report holding one simulation (the defaults) gains a second run with --sim-set; both stay."""
    import json

    def sim(command, args):
        return {"sites": 32, "wall_s": 10.0, "peak_used_gib": 1.0, "command": command, "args": args,
                "rounds": [{"round": 1, "sites": 31, "wall_s": 5.0, "train_s_mean": 1.0, "evaluations": 31,
                            "server_eval_s": 2.0, "eval_share": 0.4}]}

    (tmp_path / "scale.json").write_text(json.dumps({"load": {}, "simulation": sim("cedar-simulate a", "")}))
    calls = []
    monkeypatch.setattr(scale, "_child", lambda args: calls.append(args) or sim("cedar-simulate a kd.t-cycle=4", ""))

    scale.main(["--parts", "simulation", "--sim-rounds", "2", "--sim-set", "kd.t-cycle=4", "--out",
                str(tmp_path / "scale")])

    assert calls == [["simulation", "32", "2", "kd.t-cycle=4"]]
    report = json.loads((tmp_path / "scale.json").read_text())
    assert [s["command"] for s in report["simulations"]] == ["cedar-simulate a", "cedar-simulate a kd.t-cycle=4"]
    md = (tmp_path / "scale.md").read_text()
    assert "`python -m benchmarks.scale --parts simulation --sim-rounds 1` runs `cedar-simulate a`" in md
    assert "`python -m benchmarks.scale --parts simulation --sim-rounds 1 --sim-set kd.t-cycle=4` runs" in md


@pytest.mark.integration
def test_simulated_rounds_times_a_real_tiny_federation(tmp_path):
    # Execute: cedar-simulate on tiny data, 2 sites x 2 rounds, both from round 1, 1-epoch base and cloud models
    overrides = ("data.imgsz=128", "train.imgsz=128", "data.train-per-site=8", "data.val-per-site=4",
                 "data.test-per-site=4", "data.public-per-site=4", "data.public-train-per-site=4",
                 "data.video-frames=8", f"data.cache-dir={tmp_path / 'cache'}", "model.base-epochs=1",
                 "model.cloud-epochs=1", "kd.cloud-rounds=[]", "federation.late-sites=[]")
    out = scale.simulated_rounds(2, 2, overrides=overrides)

    # Assert: both rounds timed from the log, the evaluation inside them, memory measured above the baseline
    assert [r["round"] for r in out["rounds"]] == [1, 2] and [r["sites"] for r in out["rounds"]] == [2, 2]
    first, second = out["rounds"]
    assert first["evaluations"] == 2 and 0 < first["server_eval_s"] < first["wall_s"]
    assert first["eval_share"] == pytest.approx(first["server_eval_s"] / first["wall_s"])
    assert second["wall_s"] > 0 and out["wall_s"] > first["wall_s"] + second["wall_s"]
    assert out["peak_used_gib"] > 0 and "data.num-sites=2" in out["command"]
