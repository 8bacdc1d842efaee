"""Chaos: the real cloud service (``python -m server.cloud``) killed with SIGKILL while an edge runtime
(``python -m clients.edge``) is delivering its queue, then restarted on the same store and port.

Every queued offload must still be delivered exactly once, read from the runtime's output
lines: one ``refined`` line per offload id. The helpers (weights, processes, line checks) are
the edge runtime's integration tests' own.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from tests.deploy_helpers import free_port, tail
from tests.clients.test_edge import (
    _check_refined,
    _edge,
    _lines,
    _start_cloud,
    _stop,
    _store_counts,
    weights,  # noqa: F401  (the fixture)
)


@pytest.mark.integration
def test_cloud_killed_mid_delivery_every_offload_refined_exactly_once(tmp_path, weights, tiny_benchmark):  # noqa: F811
    # Prepare: run A with the cloud down fills the disk queue (one JPEG per crop, so several requests)
    video = tiny_benchmark.video_dir(0) / "video.mp4"
    port = free_port()
    out_a = _edge(tmp_path, "down", weights["edge"], video, port, "--separate-crops", "--drain-timeout", "1",
                  "--max-gap", "3")
    lines_a = _lines(out_a)
    offloads_a = {ln["offload"]["id"]: ln for ln in lines_a if ln["kind"] == "edge" and ln["offload"]}
    assert len(offloads_a) >= 2 and lines_a[-1]["queue_left"] == len(offloads_a)
    queue, index = tmp_path / "queue", tmp_path / "store" / "index.jsonl"
    # Execute: the cloud comes up, run B starts delivering; SIGKILL the cloud once its first sample is stored
    cloud, cloud_log = _start_cloud(tmp_path, weights["cloud"], port)
    result: dict = {}

    def run_b():
        try:
            result["out"] = _edge(tmp_path, "back", weights["edge"], video, port, "--drain-timeout", "180",
                                  "--max-gap", "3")
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            result["error"] = err

    edge = threading.Thread(target=run_b)
    edge.start()
    try:
        deadline = time.monotonic() + 240
        while not (index.exists() and index.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.01)
        cloud.kill()  # SIGKILL: no shutdown, requests in flight are cut
        cloud.wait(10)
        pending_at_kill = len(list(queue.glob("*.json")))
        stored_at_kill = len(index.read_text().splitlines())
        time.sleep(2.0)  # the edge meets connection refused and backs off
        cloud, cloud_log = _start_cloud(tmp_path, weights["cloud"], port)
        edge.join(300)
        assert not edge.is_alive() and "error" not in result, result.get("error")
        assert cloud.poll() is None, tail(cloud_log)
    finally:
        _stop(cloud)
        edge.join(30)
    # Assert: the kill landed with offloads still queued, and every offload of both runs is refined exactly once
    assert stored_at_kill >= 1 and pending_at_kill >= 1, (stored_at_kill, pending_at_kill)
    lines_b = _lines(result["out"])
    offloads_b = {ln["offload"]["id"]: ln for ln in lines_b if ln["kind"] == "edge" and ln["offload"]}
    all_offloads = {**offloads_a, **offloads_b}
    refined = Counter(ln["offload_id"] for ln in lines_a + lines_b if ln["kind"] == "refined")
    assert refined == Counter(set(all_offloads))
    _check_refined(lines_b, all_offloads)
    assert list(queue.glob("*.json")) == [] and lines_b[-1]["queue_left"] == 0
    delivered = (queue / "delivered.log").read_text().split()
    assert sorted(delivered) == sorted(all_offloads)  # the commit log: each id once
    # the store: every offload's samples (a request answered by the killed cloud but never received by the edge
    # is stored again on resend, so counts are at least, not exactly, the crops sent)
    counts = _store_counts(tmp_path / "store")
    for i, ln in all_offloads.items():
        assert counts[i] >= len(ln["offload"]["regions"]), (i, counts[i])
    entries = [json.loads(line) for line in index.read_text().splitlines()]
    assert all((tmp_path / "store" / e["image"]).is_file() for e in entries)
    print(f"chaos: cloud killed with {stored_at_kill} sample(s) stored and {pending_at_kill} offload(s) queued; "
          f"{len(all_offloads)} offloads, {sum(refined.values())} refined lines, "
          f"{sum(counts.values()) - sum(len(ln['offload']['regions']) for ln in all_offloads.values())} "
          f"sample(s) stored twice")
