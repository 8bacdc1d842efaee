"""The robustness benchmark: its summary on hand-made records, and end to end on tiny data."""

import json
import math

import pytest

from benchmarks import robustness


def test_summarise_mean_and_sample_std_over_seeds():
    records = [
        {"training": "with", "seed": 1, "dataset": "fog/2", "map50": 0.2, "map50_95": 0.1, "instances": 9},
        {"training": "with", "seed": 2, "dataset": "fog/2", "map50": 0.4, "map50_95": 0.3, "instances": 9},
        {"training": "without", "seed": 1, "dataset": "clean", "map50": 0.5, "map50_95": 0.25, "instances": 10},
    ]

    s = robustness.summarise(records)

    # mean 0.3, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert s["with"]["fog/2"]["map50_mean"] == pytest.approx(0.3)
    assert s["with"]["fog/2"]["map50_std"] == pytest.approx(math.sqrt(0.02))
    assert s["with"]["fog/2"]["seeds"] == [1, 2]
    assert s["without"]["clean"]["map50_mean"] == 0.5 and math.isnan(s["without"]["clean"]["map50_std"])


@pytest.mark.slow
def test_robustness_benchmark_runs_end_to_end(tiny_overrides, tmp_path):
    sets = [f"{k}={v}" for k, v in tiny_overrides.items()]
    out = tmp_path / "rob"

    robustness.main(["--preset", "quick", "--epochs", "1", "--seeds", "0", "--severities", "2", "--train-missing",
                     "--adverse-p", "0.5", "1", "--out", str(out), "--set", *sets, "train.threads=1"])
    again = robustness.main(["--preset", "quick", "--epochs", "1", "--seeds", "0", "--severities", "2",
                             "--adverse-p", "0.5", "1", "--out", str(out), "--set", *sets,
                             "train.threads=1"])  # resumes: nothing to train

    res = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert again == 0 and res["trained_now"] == []
    assert set(res["summary"]) == {"without", "p=0.5", "p=1"}
    assert set(res["summary"]["p=0.5"]) == {"clean", "fog/2", "low_light/2", "motion_blur/2", "occlusion/2",
                                           "mean_adverse"}
    assert len(res["records"]) == 3 * 5 and all(r["images"] == 4 for r in res["records"])
    assert "| Δ (p=0.5 − without) |" in md and "| Δ (p=1 − without) |" in md and "| occlusion |" in md
    assert res["settings"]["threads"] == 1
    assert (tmp_path / "rob_examples.jpg").stat().st_size > 0 and "rob_examples.jpg" in md
    runs = {r["training"]: r for r in res["training_runs"]}
    assert runs["p=0.5"]["loaded_images"] > 0 and sum(runs["p=0.5"]["corrupted"].values()) > 0
    assert sum(runs["p=1"]["corrupted"].values()) == runs["p=1"]["loaded_images"]  # every image
