"""The KD federation benchmark script on tiny data: a table per variant, one JSON line per federation, resume."""

import json

import pytest

from benchmarks import kd_federation

pytestmark = pytest.mark.slow


def test_kd_benchmark_writes_tables_and_resumes(tiny_overrides, tmp_path, monkeypatch):
    # Prepare: tiny data, 2 rounds, KD from round 2
    sets = [f"{k}={v}" for k, v in {**tiny_overrides, "federation.num-rounds": 2, "kd.epochs": 1}.items()]
    argv = ["--preset", "quick", "--seeds", "0", "--variants", "none", "graph", "--out", str(tmp_path / "kd"),
            "--set", *sets]
    calls = []
    real = kd_federation.run_variant
    monkeypatch.setattr(kd_federation, "run_variant", lambda *a: calls.append(a[1]) or real(*a))

    # Execute: run, then run again (everything done: nothing re-runs)
    kd_federation.main(argv)
    kd_federation.main(argv)

    # Assert
    assert calls == ["none", "graph"]
    rows = [json.loads(line) for line in (tmp_path / "kd.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["none", "graph"]
    for r in rows:
        assert set(r["final_test_map50"]) == {"site-0", "site-1"}
        assert all(0.0 <= v <= 1.0 for v in r["final_test_map50"].values())
    md = (tmp_path / "kd.md").read_text()
    assert "| none |" in md and "| graph |" in md and "| site-0 |" in md
    assert "teachers ranked by map_degree, only more accurate teachers" in md
