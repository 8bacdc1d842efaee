"""The KD federation benchmark script on tiny data: a table per variant, one JSON line per federation, resume."""

import json

import pytest

from benchmarks import kd_federation


@pytest.mark.slow
def test_kd_benchmark_writes_tables_and_resumes(tiny_overrides, tmp_path, monkeypatch):
    # Prepare: tiny data, 2 rounds, KD from round 2
    sets = [f"{k}={v}" for k, v in {**tiny_overrides, "federation.num-rounds": 2, "kd.start-round": 2}.items()]
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
    assert "teachers ranked by map_degree (local scope), only more accurate teachers" in md


@pytest.mark.parametrize("variant, reused", [("none", True), ("graph", False)])
def test_a_run_without_kd_is_reused_when_only_kd_settings_change(variant, reused):
    """``none`` never distils: a change of KD settings (here kd.alpha and the student check) keeps its result."""
    old = {"preset": "standard", "set": ["kd.alpha=0.5", "train.threads=1"], "noisy": False, "cloud_rounds": [2],
           "teacher_rank": "map_degree", "better_only": True}
    new = {**old, "set": ["kd.alpha=0.7", "train.threads=1"], "student_check": True, "schedule": "in-round"}

    same = kd_federation.settings_view(old, variant) == kd_federation.settings_view(new, variant)

    assert same is reused
    assert kd_federation.settings_view({**new, "set": ["train.threads=2"]}, "none") != \
        kd_federation.settings_view(new, "none")
    # a noisy site changes nothing for the regular sites of a federation without KD
    assert (kd_federation.settings_view({**new, "noisy": True}, variant) == kd_federation.settings_view(new, variant)) \
        is reused


@pytest.mark.parametrize("variant, reused", [("all", True), ("graph", False)])
def test_the_check_margin_matters_only_to_students_that_check(variant, reused):
    """``all`` never checks its teachers: a run with kd.check-margin 0 stands for one with 0.05; ``graph`` not."""
    old = {"preset": "standard", "set": ["train.threads=1"], "noisy": True, "student_check": True,
           "teacher_scope": "local", "check_margin": None}
    new = {**old, "set": ["kd.check-margin=0.05", "train.threads=1"], "check_margin": 0.05}

    assert (kd_federation.settings_view(old, variant) == kd_federation.settings_view(new, variant)) is reused


def test_a_federation_whose_nodes_failed_the_last_round_is_an_error(monkeypatch, tiny_overrides, tmp_path):
    """Failed nodes are skipped by the strategy (the round goes on); a benchmark must not score their old models."""
    import types

    import server.federation
    import server.local_grid

    def fake_federation(grid, cfg):  # round 2 of 2: site-1's reply was dropped
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        rows = [{"round": 1, "site_id": "site-0", "test_map50": 0.2},
                {"round": 1, "site_id": "site-1", "test_map50": 0.3},
                {"round": 2, "site_id": "site-0", "test_map50": 0.4}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return types.SimpleNamespace(run_dir=run_dir)

    monkeypatch.setattr(server.federation, "run_federation", fake_federation)
    monkeypatch.setattr(server.local_grid, "LocalGrid", lambda *a: None)

    with pytest.raises(RuntimeError, match=r"round 2 has no result from \['site-1'\]"):
        kd_federation.run_variant("quick", "none", 0, {**tiny_overrides, "federation.num-rounds": 2}, [], tmp_path)
