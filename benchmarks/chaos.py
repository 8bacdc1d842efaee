"""The chaos suite (issue 24): every fault test in one pytest run, and the table of what happened.

Each test injects its fault (SIGKILL to a real process, a broken file, a hostile reply), checks the
outcome, and records it with pytest's ``record_property("chaos", {"fault", "happened", "lost", "of"})``:
``lost`` counts the samples, offloads or site-rounds lost (target 0), or is ``None`` where the fault
has nothing to lose (a refused file). This module only selects the tests, collects those records
from the test reports and writes them out, so each fault is defined once, in its test.

    python -m benchmarks.chaos [--out benchmarks/results/chaos] [-k EXPR]

writes ``<out>.json`` and ``<out>.md``; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "chaos"
REPO = Path(__file__).resolve().parent.parent

# the tests, real processes first (marks are ignored: integration and slow ones run too)
SUITE = [
    "tests/test_chaos.py",  # SuperNode, SuperLink, ClientApp in a real deployment
    "tests/server/test_cloud_chaos.py",  # cloud service and edge runtime killed mid-delivery
    "tests/server/test_resume.py::test_killed_server_resumes_after_its_last_completed_round",
    "tests/strategies/test_personalized.py::test_a_faulty_reply_is_dropped_and_its_site_keeps_its_state",
    "tests/server/test_resume.py::test_a_truncated_state_or_bindings_file_stops_the_resume_naming_it",
    "tests/server/test_resume.py::test_a_truncated_model_file_stops_the_resume_naming_it",
    "tests/clients/test_edge.py::test_reload_picks_up_new_weights_in_the_background",
]


class Collector:
    """A pytest plugin: per test, its outcome, seconds and ``chaos`` record."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        row = self.rows.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "seconds": 0.0})
        row["seconds"] = round(row["seconds"] + report.duration, 1)
        if report.failed:
            row["outcome"] = f"failed ({report.when})"
            crash = getattr(report.longrepr, "reprcrash", None)
            row.setdefault("happened", f"failed: {crash.message.splitlines()[0]}" if crash else "failed")
        elif report.skipped and row["outcome"] == "passed":
            row["outcome"] = "skipped"
        for name, value in report.user_properties:
            if name == "chaos":
                row.update(value)


def markdown(rows: list[dict], command: str, load: tuple[float, ...]) -> str:
    intro = (f"Command: `{command}` (pytest, real processes on loopback where the fault needs them). "
             f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, shared with other jobs (load average "
             f"{', '.join(f'{x:.1f}' for x in load)} at the start). Each row is one test; what happened is what "
             "the test measured and checked, and lost counts what the fault cost (target 0).")
    lines = ["# Chaos suite (issue 24)", "", intro, "",
             "| fault | what happened | lost | test | outcome | s |", "|---|---|---:|---|---|---:|"]
    for r in rows:
        lost = "—" if r.get("lost") is None else f"{r['lost']} of {r['of']}"
        lines.append(f"| {r.get('fault', '(no record)')} | {r.get('happened', '')} | {lost} | "
                     f"`{r['test'].split('/')[-1]}` | {r['outcome']} | {r['seconds']:.0f} |")
    failed = [r for r in rows if r["outcome"] != "passed"]
    lost = sum(r.get("lost") or 0 for r in rows)
    lines += ["", f"{len(rows)} tests, {len(failed)} not passed; {lost} lost in all."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import pytest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="writes <out>.json and <out>.md")
    parser.add_argument("-k", default=None, help="run only the tests pytest's -k selects")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    load = os.getloadavg()
    collector = Collector()
    pytest_args = [*SUITE, "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rf"]
    if args.k:
        pytest_args += ["-k", args.k]
    t0 = time.monotonic()
    rc = int(pytest.main(pytest_args, plugins=[collector]))
    rows = list(collector.rows.values())
    command = "python -m benchmarks.chaos" + (f" -k '{args.k}'" if args.k else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "seconds": round(time.monotonic() - t0), "pytest_exit": rc, "rows": rows}, indent=1)
        + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, command, load))
    print(markdown(rows, command, load))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
