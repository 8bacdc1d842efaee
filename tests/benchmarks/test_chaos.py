"""Tests for benchmarks.chaos: the suite's records reach the table (two fast chaos tests, in a subprocess)."""

import json
import subprocess
import sys

from tests import REPO


def test_the_suite_writes_each_tests_record_into_the_table(tmp_path):
    # Execute: only a NaN reply (fake nodes) and a truncated state.json (both milliseconds)
    out = tmp_path / "chaos"
    res = subprocess.run([sys.executable, "-m", "benchmarks.chaos", "--out", str(out), "-k",
                          "NaN or truncated_state"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)

    # Assert: pytest's exit status, one row per test with its record, and the table
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["test"].split("::")[-1]: r for r in data["rows"]}
    assert sorted(rows) == ["test_a_faulty_reply_is_dropped_and_its_site_keeps_its_state[NaN weights]",
                            "test_a_truncated_state_or_bindings_file_stops_the_resume_naming_it"]
    nan = rows["test_a_faulty_reply_is_dropped_and_its_site_keeps_its_state[NaN weights]"]
    assert nan["outcome"] == "passed" and nan["fault"] == "a reply: NaN weights (fake nodes)"
    assert nan["lost"] == 0 and nan["of"] == "8 good replies"
    assert "'w' has 1 values that are not finite" in nan["happened"]
    state = rows["test_a_truncated_state_or_bindings_file_stops_the_resume_naming_it"]
    assert state["outcome"] == "passed" and state["lost"] is None
    table = out.with_suffix(".md").read_text()
    assert "| a reply: NaN weights (fake nodes) | logged: aggregate_train: round 2: dropping reply of node 2: " in table
    assert "| 0 of 8 good replies | `test_personalized.py::test_a_faulty_reply" in table
    assert "| — | `test_resume.py::test_a_truncated_state" in table
    assert table.rstrip().endswith("2 tests, 0 not passed; 0 lost in all.")
    assert data["command"] == "python -m benchmarks.chaos -k 'NaN or truncated_state'" and data["pytest_exit"] == 0
