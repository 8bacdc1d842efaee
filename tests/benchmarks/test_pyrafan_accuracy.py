"""The PyraFAN accuracy report's arithmetic: means over sites then seeds, the head-to-head goal line, ONNX latency
taken from the speed benchmark's report (hand-worked values)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.pyrafan_accuracy import head_to_head, onnx_latency, summarise, to_markdown


def run(model, site, seed, map50, gflops=2.0):
    return {"model": model, "site": site, "seed": seed, "params": 1_500_000, "gflops": gflops, "map50": map50,
            "map50_95": map50 / 2, "map50_small": map50 - 0.1, "map50_all_own": map50, "train_s": 100.0}


RECORDS = [
    run("p2", 0, 0, 0.70, 2.5), run("p2", 1, 0, 0.50, 2.5), run("p2", 0, 1, 0.80, 2.5), run("p2", 1, 1, 0.40, 2.5),
    run("v2", 0, 0, 0.75), run("v2", 1, 0, 0.45), run("v2", 0, 1, 0.90),  # (site 1, seed 1) has not run
]


def test_summarise_averages_sites_per_seed_then_seeds():
    s = summarise(RECORDS, ["p2", "v2", "absent"])
    assert set(s) == {"p2", "v2"}
    # p2: seed 0 (0.70 + 0.50) / 2 = 0.60, seed 1 (0.80 + 0.40) / 2 = 0.60 -> 0.60 ± 0
    assert s["p2"]["map50_mean"] == pytest.approx(0.60) and s["p2"]["map50_std"] == pytest.approx(0.0)
    # v2: seed 0 0.60, seed 1 0.90 (site 0 only) -> 0.75 ± sd(0.6, 0.9) = 0.2121
    assert s["v2"]["map50_mean"] == pytest.approx(0.75)
    assert s["v2"]["map50_std"] == pytest.approx(math.sqrt(0.045))
    assert s["v2"]["runs"] == 3 and s["v2"]["per_site"]["1"] == {"map50": pytest.approx(0.45),
                                                                  "map50_small": pytest.approx(0.35), "seeds": 1}


def test_head_to_head_uses_only_the_runs_both_models_have():
    g = head_to_head(RECORDS, "v2", "p2")
    assert g["pairs"] == 3 and g["sites"] == [0, 1] and g["seeds"] == [0, 1]
    # seed 0: ((0.75 - 0.70) + (0.45 - 0.50)) / 2 = 0; seed 1: 0.90 - 0.80 = 0.10 -> 0.05 ± sd(0, 0.1)
    assert g["diff_mean"] == pytest.approx(0.05) and g["diff_std"] == pytest.approx(math.sqrt(0.005))
    assert g["wins"] == 2
    # per seed over the shared sites, then over seeds: v2 (0.60 + 0.90) / 2, p2 (0.60 + 0.80) / 2
    assert g["challenger_map50"] == pytest.approx(0.75) and g["reference_map50"] == pytest.approx(0.70)
    assert (g["challenger_gflops"], g["reference_gflops"]) == (2.0, 2.5)
    assert head_to_head(RECORDS, "v2", "absent") is None


def test_report_states_the_goal_and_reads_onnx_latency(tmp_path):
    speed = tmp_path / "pyrafan_speed.json"
    speed.write_text(json.dumps({"date": "2026-01-01 00:00 UTC", "machine": {"cpu": "Some CPU", "threads": 2},
                                 "latency": {"v2|320|onnxruntime": {"median_ms": 12.34},
                                             "v2|640|onnxruntime": {"median_ms": 40.0},
                                             "v2|320|torch": {"median_ms": 30.0}}}))
    latency = onnx_latency(speed, 320)
    assert latency == {"ms": {"v2": 12.34}, "date": "2026-01-01 00:00 UTC", "cpu": "Some CPU", "threads": 2}
    assert onnx_latency(tmp_path / "missing.json", 320) == {}
    assert onnx_latency(speed, 416) == {}

    settings = {"argv": "", "date": "d", "preset": "standard", "sites": [0, 1], "seeds": [0, 1], "epochs": 25,
                "imgsz": 320, "batch": 8, "small_px": 16, "latency": latency,
                "head_to_head": [head_to_head(RECORDS, "v2", "p2"), None]}
    md = to_markdown(summarise(RECORDS, ["p2", "v2"]), settings)
    assert "| v2 | 3/4 | 1.500 M | 2.00 | 12.3 | 0.750 ± 0.212 |" in md
    assert "| p2 | 4/4 | 1.500 M | 2.50 |  | 0.600 ± 0.000 |" in md
    assert "| v2 | p2 | 3 | [0, 1] | 0.750 vs 0.700 | +0.050 ± 0.071 | 2/3 | 2.00 vs 2.50 | yes so far |" in md
    assert "| v2 | 0.825 / 0.725 | 0.450 / 0.350 (1) |" in md
