"""Tests for benchmarks.scale: the fake federation it times behaves as the report says (small sizes, seconds)."""

import numpy as np

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
