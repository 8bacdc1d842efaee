"""Chaos between the real cloud service (``python -m server.cloud``) and an edge runtime (``python -m clients.edge``):
each killed with SIGKILL while the runtime delivers its queue, then restarted (the cloud on the same store and
port, the runtime on the same queue folder).

Every offload must still be delivered exactly once, read from the runtime's output
lines: one ``refined`` line per offload id. The helpers (weights, processes, line checks) are
the edge runtime's integration tests' own. Each test records what happened with
``record_property("chaos", ...)`` for ``python -m benchmarks.chaos``.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter

import pytest

from clients.offload import DiskQueue
from tests.clients.test_edge import (
    _check_refined,
    _edge,
    _lines,
    _start_cloud,
    _start_edge,
    _stop,
    _store_counts,
    weights,  # noqa: F401  (the fixture)
)
from tests.deploy_helpers import free_port, tail


@pytest.mark.integration
def test_cloud_killed_mid_delivery_every_offload_refined_exactly_once(tmp_path, weights, tiny_benchmark,  # noqa: F811
                                                                       record_property):
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
    twice = sum(counts.values()) - sum(len(ln["offload"]["regions"]) for ln in all_offloads.values())
    record_property("chaos", {
        "fault": "the cloud service killed mid-request (SIGKILL), restarted on its store",
        "happened": f"killed with {stored_at_kill} sample(s) stored and {pending_at_kill} offload(s) queued; "
                    f"{len(all_offloads)} offloads, {sum(refined.values())} refined lines (one each); "
                    f"{twice} sample(s) stored twice (answered by the killed cloud, sent again)",
        "lost": len(set(all_offloads) - set(refined)), "of": f"{len(all_offloads)} offloads"})


@pytest.mark.integration
def test_edge_runtime_killed_mid_offload_its_queue_is_replayed_exactly_once(tmp_path, weights, tiny_benchmark,  # noqa: F811
                                                                            record_property):
    # Prepare: run A with the cloud down queues its offloads (one JPEG per crop); then the cloud comes up
    video = tiny_benchmark.video_dir(0) / "video.mp4"
    port = free_port()
    out_a = _edge(tmp_path, "down", weights["edge"], video, port, "--separate-crops", "--drain-timeout", "1",
                  "--max-gap", "3")
    lines_a = _lines(out_a)
    queue, index = tmp_path / "queue", tmp_path / "store" / "index.jsonl"
    assert lines_a[-1]["queue_left"] >= 2
    cloud, cloud_log = _start_cloud(tmp_path, weights["cloud"], port)
    try:
        # Execute: run B delivers A's queue first; SIGKILL it once the cloud has stored a sample of that delivery
        edge, out_b, log_b = _start_edge(tmp_path, "killed", weights["edge"], video, port, "--drain-timeout", "180",
                                         "--max-gap", "3")
        try:
            deadline = time.monotonic() + 240
            while not (index.exists() and index.read_text().strip()) and time.monotonic() < deadline \
                    and edge.poll() is None:
                time.sleep(0.01)
            edge.send_signal(signal.SIGKILL)
            assert edge.wait(10) == -signal.SIGKILL, tail(log_b)  # killed, not finished
        finally:
            _stop(edge)
        queued_at_kill = {DiskQueue.id_of(p) for p in queue.glob("*.json")}
        stored_at_kill = len(index.read_text().splitlines())
        # run C: the restarted runtime on the same queue folder
        out_c = _edge(tmp_path, "restarted", weights["edge"], video, port, "--drain-timeout", "180", "--max-gap", "3")
        assert cloud.poll() is None, tail(cloud_log)
    finally:
        _stop(cloud)
    runs = [_lines(out) for out in (out_a, out_b, out_c)]
    offloads = {ln["offload"]["id"]: ln for lines in runs for ln in lines if ln["kind"] == "edge" and ln["offload"]}
    offloads_b = [ln["offload"]["id"] for ln in runs[1] if ln["kind"] == "edge" and ln["offload"]]
    refined = Counter(ln["offload_id"] for lines in runs for ln in lines if ln["kind"] == "refined")
    every = set(offloads) | queued_at_kill  # an offload on disk whose edge line the kill cut off counts too
    lost = every - set(refined)
    refined_before = {ln["offload_id"] for ln in runs[1] if ln["kind"] == "refined"}
    record_property("chaos", {
        "fault": "the edge runtime killed mid-offload (SIGKILL), restarted on its queue",
        "happened": f"killed after {len(offloads_b)} offloading keyframe(s) of its own, with "
                    f"{len(queued_at_kill)} offload(s) queued and {stored_at_kill} sample(s) stored; "
                    f"the restarted runtime committed {len(queued_at_kill & refined_before)} whose refined line "
                    f"was already out and replayed the rest: {len(every)} offloads, "
                    f"{sum(refined.values())} refined lines, {sum(n > 1 for n in refined.values())} duplicated",
        "lost": len(lost), "of": f"{len(every)} offloads"})

    # Assert: the kill landed mid-delivery; every offload of the three runs is refined exactly once
    assert queued_at_kill and stored_at_kill >= 1, (queued_at_kill, stored_at_kill)
    assert refined == Counter(every), (sorted(lost), refined)
    # on disk at the kill: sent again by run C, or (its line already out in run B) committed unsent
    assert set(queued_at_kill) - refined_before <= {ln["offload_id"] for ln in runs[2]
                                               if ln["kind"] == "refined" and ln["recovered"]}
    assert runs[2][-1]["kind"] == "summary" and runs[2][-1]["queue_left"] == 0
    assert list(queue.glob("*.json")) == []
    delivered = (queue / "delivered.log").read_text().split()
    assert sorted(delivered) == sorted(every)  # the commit log: each id once
    _check_refined(runs[2], offloads)
