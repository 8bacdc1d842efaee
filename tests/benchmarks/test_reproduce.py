"""The reproduction command end to end on tiny data: every job, the report, the plots, resume."""

import json
from pathlib import Path

import pytest

from benchmarks import reproduce


def test_verdict_pairs_seeds_and_follows_the_papers_direction():
    """yes: every paired difference goes the paper's way; mixed: only the mean does; no: not even the mean."""
    assert reproduce._verdict([0.02, 0.01, 0.03], 1) == "yes (3/3 seeds)"
    assert reproduce._verdict([0.05, -0.01, 0.01], 1) == "mixed (2/3 seeds)"
    assert reproduce._verdict([-0.05, 0.01, 0.01], 1) == "no (2/3 seeds)"
    assert reproduce._verdict([-0.02, -0.01], -1) == "yes (2/2 seeds)"  # e.g. a lower FNR
    assert reproduce._verdict([float("nan")], 1) == "not measured"


@pytest.mark.slow
def test_reproduce_runs_every_job_writes_the_report_and_resumes(tiny_overrides, tmp_path):
    # Prepare: tiny data, one seed, a YOLO11n as the cloud, two workers (the process pool)
    sets = [f"{k}={v}" for k, v in {**tiny_overrides, "model.cloud": "yolo11n", "reproduce.seeds": "[0]",
                                     "reproduce.base-epochs": 1, "reproduce.epochs-per-round": 1,
                                     "reproduce.cloud-iters": 1,
                                     "reproduce.t-conf-sweep": "[0.5,1.0]"}.items()]
    argv = ["--preset", "quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res"), "--set", *sets]

    # Execute: run, then again (everything cached: no job runs twice), then only the report from its .json
    reproduce.main(argv)
    jobs = (tmp_path / "work" / "jobs.jsonl").read_text().splitlines()
    reproduce.main(argv)
    first = (tmp_path / "res" / "reproduce_quick.md").read_text()
    (tmp_path / "res" / "reproduce_quick.md").unlink()
    reproduce.main([*argv, "--report-only"])

    # Assert: one cached result per planned job, and the rerun added none
    assert (tmp_path / "work" / "jobs.jsonl").read_text().splitlines() == jobs
    names = [json.loads(line)["job"] for line in jobs]
    assert sorted(names) == sorted(["cloud", "speed", "upload", "collab:0",
                                    *(f"fed:{f}:0" for f in reproduce.FEDERATIONS)])
    md = (tmp_path / "res" / "reproduce_quick.md").read_text()
    assert md == first  # the report is a function of its .json
    assert "| graph-guided selection never makes the noisy site a teacher |" in md
    assert "| frame fuse+keep |" in md and f"| collaboration ({reproduce.BEST_MERGE}) > cloud model" in md
    for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "Figure 5", "Figure 6", "Figure 7", "Figure 8",
                    "The paper's claims"):
        assert f"## {heading}" in md
    for n in (5, 6, 7, 8):
        assert (tmp_path / "res" / f"reproduce_quick_fig{n}.png").stat().st_size > 0
    report = json.loads((tmp_path / "res" / "reproduce_quick.json").read_text())
    summary, results = report["summary"], report["jobs"]
    assert set(summary["merges"]) == {f"{o} {m}" for o in ("crops", "frame")
                                      for m in ("cloud", "cloud+keep", "fuse", "fuse+keep")}
    # the runtime's own merge of the crops run is the collaboration row, seed by seed
    for tag in ("images", "video"):
        assert summary["merges"]["crops cloud"][tag]["map50"] == summary["collab"][tag]["map50"]
    # the collaboration's latency is the edge's plus the cloud round trips of the same run
    assert summary["latency_ms"]["collab"][0] >= summary["latency_ms"]["edge"][0]
    # every site of every federation has a model that the collaboration job scored
    sites = results["collab:0"]["sites"]
    assert set(sites) == set(results["fed:none:0"]["final_test_map50"])
    for site in sites.values():
        for role in reproduce.EDGE_ROLES:
            for tag in ("images", "video"):
                assert 0.0 <= site[f"{role}/{tag}"]["edge"]["recall"] <= 1.0 or \
                    site[f"{role}/{tag}"]["edge"]["n_gt"] == 0
        for tag in ("images", "video"):  # what is offloaded changes the refined answers, never the edge's own
            assert site[f"edge-frame/{tag}"]["edge"] == site[f"edge/{tag}"]["edge"]
    # round 1 is trained once: the variants continue from a copy of their base federation's round
    for name, base_name in (("none", "base"), ("graph", "base"), ("cloud", "base"), ("both", "base"),
                            ("pyrafan", "base-pyrafan"), ("noisy-all", "base-noisy")):
        base = (Path(results[f"fed:{base_name}:0"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        rows = (Path(results[f"fed:{name}:0"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert rows[:len(base)] == base and {json.loads(r)["round"] for r in rows[len(base):]} == {2}
    # t_conf = 1.0 offloads every detection; the noisy federations exclude their noisy site from Figure 6
    assert set(results["collab:0"]["sweep"]) == set(reproduce.FIG5_ROLES)
    assert results["fed:noisy-all:0"]["noisy_site"] not in results["fed:none:0"]["final_test_map50"]
    # Figure 8: bytes grow with the image size; the WAN link model is slower than the edge link at every size
    up = results["upload"]
    sizes = [s for s in up if s != "seconds"]
    assert [up[s]["bytes"] for s in sizes] == sorted(up[s]["bytes"] for s in sizes)
    edge_link, cloud_link = reproduce.LINKS
    assert all(up[s][cloud_link] > up[s][edge_link] for s in sizes)


def test_cache_keeps_only_jobs_run_under_the_current_settings_and_definitions(tmp_path):
    """A federation whose variant definition changed (e.g. another KD rule for one variant) runs again, and so
    does a collaboration job run before the collaboration's current definition."""
    key = "settings"
    current = reproduce.job_definition("fed:noisy-all:0")
    rows = [{"job": "cloud", "key": key, "definition": "", "result": {"weights": "c.pt"}},
            {"job": "fed:none:0", "key": key, "definition": reproduce.job_definition("fed:none:0"), "result": 1},
            {"job": "fed:none:1", "key": "other settings", "definition": reproduce.job_definition("fed:none:1"),
             "result": 2},
            {"job": "fed:noisy-all:0", "key": key, "definition": current.replace("all", "graph"), "result": 3},
            {"job": "fed:graph:0", "key": key, "result": 4},  # written before definitions were recorded
            {"job": "collab:0", "key": key, "definition": "", "result": 5},  # before the runtime's defaults
            {"job": "collab:1", "key": key, "definition": reproduce.COLLAB_DEFINITION, "result": 6}]
    cache = tmp_path / "jobs.jsonl"
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert reproduce.load_cache(cache, key) == {"cloud": {"weights": "c.pt"}, "fed:none:0": 1, "collab:1": 6}
    assert reproduce.load_cache(tmp_path / "missing.jsonl", key) == {}
    assert '"all"' in current and reproduce.job_definition("cloud") == ""
