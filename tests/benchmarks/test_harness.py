"""The benchmarks' shared harness: interleaved timing and report files."""

import json

from benchmarks.harness import time_interleaved, write_report


def test_time_interleaved_warms_up_then_calls_every_runner_once_per_round():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}

    stats = time_interleaved(runners, runs=3, warmup=2)

    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up per runner, then round by round
    assert set(stats) == {"a", "b"}
    for s in stats.values():
        assert s["runs"] == 3 and 0 <= s["p25_ms"] <= s["median_ms"] <= s["p75_ms"]


def test_write_report_writes_json_and_markdown(tmp_path, capsys):
    write_report(tmp_path / "sub" / "r", {"x": [1, 2]}, "# table\n")

    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "sub" / "r.md").read_text() == "# table\n"
    assert capsys.readouterr().out == "# table\n\n"
