"""The cloud detection service under load: 8 concurrent edge clients sending real offloads (issue 21 item 6,
issue 24 item 4).

The service is the real one (``python -m server.cloud --workers N`` through
:class:`server.cloud_process.CloudProcess`, one torch thread per worker) on loopback, serving a
YOLO11n at 256 px (built from its YAML, seed 0: the cost of a detection does not depend on what the
weights learned) and writing every sample to its hard-sample store. Each client is a thread with its
own :class:`clients.offload.CloudClient` sending :class:`clients.offload.OffloadEntry` s built by
:meth:`OffloadEntry.for_keyframe` from 256 px scenes of the built-in benchmark (the objects' boxes
offloaded as crops on one JPEG atlas): the same ``POST /detect/crops`` requests the edge runtime sends.
A client sends its next request as soon as the last is answered, for ``--duration`` seconds after a
warm-up of 4 requests each.

Reported per run: requests/s, latency p50 and p99 (client side, ``CloudClient.send``), errors by kind,
and the resident memory (RSS) of the service's processes (the supervisor and its workers) at the start
of the timed load, at its end and at its peak, sampled every second. The soak checks a memory bound:
the RSS at the end at most ``--rss-bound`` (fraction) above the RSS at the start.

    python -m benchmarks.cloud_load [--duration 60] [--clients 8] [--workers 1 2] [--out PATH]
    python -m benchmarks.cloud_load --duration 300 --workers 2 --out benchmarks/results/cloud_soak

Clients and service share this machine's CPUs: the figures are the whole loop's, machine named.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "cloud_load"
IMGSZ = 256


def _offloads(n: int) -> list:
    """``n`` offload entries of 256 px benchmark scenes: every object's box offloaded, crops on one atlas."""
    from clients.offload import OffloadEntry
    from common.benchmark import GeneratorSettings, make_sites, render_scene

    settings = GeneratorSettings()
    site, rng = make_sites(settings)[0], np.random.default_rng(0)
    entries = []
    for i in range(n):
        image, objects = render_scene(rng, settings, site, IMGSZ)
        boxes = np.array([o[1:] for o in objects], dtype=np.float64)
        edge = [{"xyxy": b.tolist(), "conf": 0.3, "cls": int(o[0]), "track": -1, "reasons": ["low_conf"]}
                for b, o in zip(boxes, objects)]
        entries.append(OffloadEntry.for_keyframe(image, boxes, np.ones(len(boxes), bool), site="site-0",
                                                 run="load", frame=i, mode="crops", created=time.time(),
                                                 model="load", edge=edge))
    return entries


def _service_rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` and all its descendants, MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_load(workers: int, duration_s: float, clients: int, workdir: Path) -> dict:
    """One service with ``workers`` processes under ``clients`` concurrent clients for ``duration_s``."""
    from clients.offload import CloudClient, CloudRejected, CloudUnavailable
    from common import yolo
    from common.benchmark import CLASS_NAMES
    from common.cloud_api import offload_id
    from server.cloud_process import CloudProcess

    weights = yolo.save_weights(yolo.build_model("yolo11n", len(CLASS_NAMES), seed=0, names=list(CLASS_NAMES)),
                                workdir / "cloud.pt")
    entries = _offloads(32)
    service = CloudProcess(weights, workdir / "store", workdir, args=["--imgsz", str(IMGSZ), "--workers",
                                                                      str(workers), "--log-level", "warning"])
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: Counter = Counter()
    samples: list[tuple[float, float]] = []
    with service:
        pid = service.proc.pid
        while workers > 1 and len(_worker_processes(pid)) < workers:  # every worker started (loaded: below)
            time.sleep(0.2)
        start_at = threading.Barrier(clients + 1)
        stop_at = [0.0]

        def client(k: int) -> None:
            cloud = CloudClient(service.url, service.token, f"site-{k}", timeout=60.0)
            try:
                for i in range(4):  # warm-up: every worker's model has answered before the timed load
                    cloud.send(entries[(k + i) % len(entries)])
                start_at.wait()
                i = 0
                while time.monotonic() < stop_at[0]:
                    frame = k * 1_000_000 + i
                    entry = replace(entries[i % len(entries)], frame=frame,
                                    id=offload_id(f"site-{k}", "load", frame))
                    t0 = time.perf_counter()
                    try:
                        cloud.send(entry)
                        latencies[k].append((time.perf_counter() - t0) * 1000)
                    except (CloudUnavailable, CloudRejected) as err:
                        errors[str(err)[:120]] += 1
                    i += 1
            finally:
                cloud.close()

        threads = [threading.Thread(target=client, args=(k,), name=f"client-{k}") for k in range(clients)]
        for t in threads:
            t.start()
        start_at.wait()
        t_start = time.monotonic()
        stop_at[0] = t_start + duration_s
        rss_start = _service_rss_mib(pid)
        load_start = os.getloadavg()
        while time.monotonic() < stop_at[0]:
            samples.append((time.monotonic() - t_start, _service_rss_mib(pid)))
            time.sleep(1.0)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t_start
        rss_end = _service_rss_mib(pid)
        load_end = os.getloadavg()
        health = service_health(service)
    done = [ms for per in latencies for ms in per]
    return {"workers": workers, "clients": clients, "duration_s": duration_s, "elapsed_s": elapsed,
            "requests": len(done), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "requests_per_s": len(done) / elapsed, "p50_ms": float(np.percentile(done, 50)) if done else None,
            "p99_ms": float(np.percentile(done, 99)) if done else None,
            "rss_start_mib": rss_start, "rss_end_mib": rss_end, "rss_peak_mib": max(r for _, r in samples),
            "rss_samples": [(round(t, 1), round(r, 1)) for t, r in samples],
            "load_start": [round(v, 2) for v in load_start], "load_end": [round(v, 2) for v in load_end],
            "stored_samples": _stored(workdir / "store"), "health": health,
            "crops_per_request": float(np.mean([len(e.regions) for e in entries])),
            "request_bytes": float(np.mean([e.payload_bytes for e in entries]))}


def _worker_processes(pid: int) -> list:
    """The worker processes uvicorn's supervisor ``pid`` spawned (multiprocessing's ``spawn_main``)."""
    import psutil

    found = []
    try:
        for p in psutil.Process(pid).children(recursive=True):
            if "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
    except psutil.NoSuchProcess:
        pass
    return found


def service_health(service) -> dict:
    import httpx

    return httpx.get(f"{service.url}/health", timeout=5.0).json()


def _stored(store: Path) -> int:
    index = store / "index.jsonl"
    return sum(1 for _ in index.open("rb")) if index.is_file() else 0


def markdown(report: dict) -> str:
    bound = report.get("rss_bound")
    first = report["runs"][0]
    lines = [f"# Cloud service under load: {report['clients']} concurrent edge clients, {report['duration_s']:.0f} s",
             "", (f"Machine: {report['machine']}; clients and service share it, and other jobs ran on it too "
                  "(load average over 1, 5, 15 min at the start and end of each run below)."), "",
             (f"Command: `{report['command']}` (see the module docstring: real service, real offloads "
              f"of {first['crops_per_request']:.1f} crops on one JPEG atlas, {first['request_bytes'] / 1024:.1f} KiB, "
              f"YOLO11n at {IMGSZ} px, every sample stored)."), "",
             ("| workers | requests | requests/s | p50 ms | p99 ms | errors | RSS start MiB | RSS end MiB | "
              "RSS peak MiB | samples stored | load average start / end |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['workers']} | {r['requests']:,} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['errors']} | {r['rss_start_mib']:.0f} | {r['rss_end_mib']:.0f} | "
                     f"{r['rss_peak_mib']:.0f} | {r['stored_samples']:,} | "
                     f"{', '.join(map(str, r['load_start']))} / {', '.join(map(str, r['load_end']))} |")
    for r in report["runs"]:
        if r["error_kinds"]:
            lines += ["", f"Errors with {r['workers']} worker(s): " + "; ".join(
                f"{n} x {kind}" for kind, n in r["error_kinds"].items())]
    if bound is not None:
        lines += ["", (f"Memory bound: the service's RSS at the end at most {bound:.0%} above its RSS at the start "
                       "of the load."), ""]
        for r in report["runs"]:
            growth = r["rss_end_mib"] / r["rss_start_mib"] - 1
            lines.append(f"- {r['workers']} worker(s): {r['rss_start_mib']:.0f} -> {r['rss_end_mib']:.0f} MiB "
                         f"({growth:+.1%}), peak {r['rss_peak_mib']:.0f} MiB: "
                         f"{'within' if growth <= bound else 'OVER'} the bound.")
        lines += ["", "RSS over the run (s: MiB), every 30 s:", ""]
        for r in report["runs"]:
            lines.append(f"- {r['workers']} worker(s): " + ", ".join(
                f"{t:.0f}: {m:.0f}" for t, m in r["rss_samples"][::30]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    from benchmarks.harness import cpu_model_name, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of timed load per run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="one run per worker count")
    parser.add_argument("--rss-bound", type=float, help="check: RSS at the end at most this fraction above the start")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or min(args.workers) < 1:
        parser.error("need --duration > 0, --clients >= 1, --workers >= 1")
    runs = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="cedar-load-") as tmp:
            runs.append(run_load(workers, args.duration, args.clients, Path(tmp)))
        print(f"{workers} worker(s): {runs[-1]['requests_per_s']:.1f} requests/s, errors {runs[-1]['errors']}",
              file=sys.stderr, flush=True)
    report = {"machine": f"{cpu_model_name()}, {os.cpu_count()} logical CPUs", "clients": args.clients,
              "duration_s": args.duration, "rss_bound": args.rss_bound,
              "command": "python -m benchmarks.cloud_load " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}
    if args.rss_bound is not None:
        report["within_bound"] = all(r["rss_end_mib"] <= r["rss_start_mib"] * (1 + args.rss_bound) for r in runs)
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
