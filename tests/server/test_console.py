"""The ServerApp's console: one round of a real strategy and the end of the run, every record printed once."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests import REPO

# The ServerApp's main with a fake grid: run_federation is replaced by one round of the real graph-KD
# strategy (its flwr log lines), cedar loggers at INFO and WARNING, and the end of the run (RunOutputs.finish).
# A root handler is installed first, as a library's logging.basicConfig would: it must not double anything.
_ROUND = r"""
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="ROOT %(name)s: %(message)s")

from flwr.app import ArrayRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 42, 1, 0

import server.app
from server.outputs import RunOutputs
from strategies.graph_kd import GraphKDStrategy
from tests.strategies.test_personalized import FakeGrid, _arrays, _content
from flwr.app import Message

def one_round(grid, cfg):
    log = logging.getLogger("server.federation")
    out = RunOutputs(Path(sys.argv[1]))
    out.run_dir.mkdir()
    log.info("run folder: %s", out.run_dir)
    benchmark = lambda arrays: {"map50": 0.5, "map50_95": 0.25, "ap50": [0.5, 0.5, 0.5], "seconds": 1.0}
    strategy = GraphKDStrategy(num_classes=3, epochs_per_round=1, benchmark_fn=benchmark, expected_nodes=2,
                               wait_for_nodes_s=0, start_round=1)

    def on_round_end(record):
        for r in record.replies:
            out.append_metrics({"round": record.server_round, "site_id": r.site_id, "test_map50": 0.25})
        logging.getLogger("strategies.graph_kd").warning("a cedar warning in round %s", record.server_round)
        log.info("round %s summary: %s sites", record.server_round, len(record.replies))

    strategy.on_round_end = on_round_end
    strategy.start(grid, ArrayRecord(), num_rounds=1)
    logging.getLogger("third.party").info("a third-party record")
    out.finish()

server.app.run_federation = one_round
grid = FakeGrid([1, 2], reply=lambda m: Message(_content(m.metadata.dst_node_id, _arrays(1.0)), reply_to=m))
server.app.main(grid, Context(run_id=42, node_id=0, node_config={}, state=RecordDict(),
                              run_config={"preset": "quick"}))
"""


def _console(tmp_path: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", _ROUND, str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # Flower colours the level
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_one_round_prints_every_record_once(tmp_path):
    lines = _console(tmp_path)

    # a record's first line is "<LEVEL> :  <message>" (Flower's handler) or "ROOT <logger>: <message>" (the root's)
    heads = [re.match(r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) *:|ROOT [\w.]+:)\s*(.*)", line) for line in lines]
    messages = [m.group(1) for m in heads if m and m.group(1)]
    twice = {message: n for message, n in Counter(messages).items() if n > 1}
    assert twice == {}
    expected = [  # one of each source: Flower's strategy, cedar INFO/WARNING, the end of the run, a third party
        "INFO :      [ROUND 1/1]",
        f"INFO :      run folder: {tmp_path / 'run'}",
        "WARNING :   a cedar warning in round 1",
        "INFO :      round 1 summary: 2 sites",
        f"INFO :      report: {tmp_path / 'run' / 'report.html'} (rebuild: python -m server.report {tmp_path / 'run'})",
        "ROOT third.party: a third-party record",
    ]
    for line in expected:
        assert line in lines, line
    assert not [line for line in lines if line.startswith("ROOT") and "third.party" not in line]
    assert (tmp_path / "run" / "report.html").is_file()
