"""Server cost per round at 100, 1,000 and 10,000 sites, the keyframe selector at 1080p, and the edge
runtime's time per keyframe against a bare ONNX Runtime forward (issue 21).

No training and no SuperLink: fake nodes answer the strategy's messages with small fixed
ArrayRecords and plausible metrics, and a fake ``benchmark_fn`` returns an AP vector per
site (drifting a little each time it is asked). What is timed is the strategy's own work
in Flower's four hooks (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``), the fake nodes' time taken out. Two paths, each in its own
subprocess per size so that the peak memory (``ru_maxrss``) is that path's alone:

* ``sparse`` (what the server does): the sparse graph kept between rounds and updated in
  the rows of the sites evaluated (``common.graph.update_graph``); the periodic refresh
  spread over rounds with ``t_cycle = 100``, so 1 % of the sites is re-evaluated per round.
* ``sampled``: ``sparse`` with ``federation.fraction-train`` 0.1: a tenth of the sites trains each round,
  in turn; the graph keeps every site.
* ``dense`` (the reference): ``build_graph(method="dense")`` from scratch every round and
  every site evaluated every round (``t_cycle = 1``).

Sites lie uniformly at 0.08 per km² (about 100 within the 20 km cut-off of 4 sigma_s,
sigma_s 5 km), each detects 5 of 10 classes. Round 1 evaluates everyone (every site is
new) and builds no graph (KD starts at round 2); round 2 builds the graph; rounds 3-4 are
the steady state the report compares. A fake evaluation costs microseconds; a real one
cost 5.6 s per site model at quick sizes in issue 21's measurement (180 s for 32 sites),
so the report also gives evaluations per round and what they would cost at that rate.

The edge part runs the edge runtime (:class:`clients.edge.EdgeRuntime`, ``--onnx`` at 256 px) on
256 px frames of the built-in benchmark, every frame a keyframe, with the cloud down (a real
:class:`clients.offload.CloudClient` on a closed port: every offload goes to the disk queue),
and times each keyframe's ``process`` (the whole main-thread work: keyframe test, letterbox,
forward, NMS down to the candidate threshold, tracking, routing, the JPEG atlas, the edge line,
the queue) interleaved with a bare ``InferenceSession.run`` of the same ONNX file on the same
letterboxed input. Two models: the trained base YOLO11n of the quick preset (``--edge-weights``,
by default the one cached under ``$CEDAR_HOME/benchmark/models``; skipped when there is none) and
a YOLO11n with BatchNorm statistics from the frames and a random class layer, whose few hundred
boxes above the candidate threshold are the hard case for NMS, tracking and the offload.

    python -m benchmarks.scale [--parts federation graph keyframes edge simulation] [--sizes 100 1000 10000]
        [--dense-max 1000] [--rounds 4] [--edge-weights model.pt] [--sim-sites 32] [--sim-rounds 3]
        [--sim-set KEY=VALUE ...]

The simulation part (:func:`simulated_rounds`) is the one with real training: ``cedar-simulate`` with 32 sites
and 1 epoch per round, per round its wall time, the server's evaluation inside it and the machine's peak memory.

``--parts`` runs only the parts named and keeps the others from the report already written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import shown

OUT = Path(__file__).resolve().parent / "results" / "scale"
NUM_CLASSES = 10
SAMPLED_FRACTION = 0.1  # federation.fraction-train of the sampled path
PATHS = ("sparse", "sampled", "dense")
DENSITY_PER_KM2 = 0.08
SECONDS_PER_EVALUATION = 180.0 / 32  # issue 21: 3 min 00 s for 32 site models at quick sizes


# --------------------------------------------------------------------------- fake federation
def _site(index: int) -> dict:
    rng = np.random.default_rng(index)
    return {"position": rng.uniform(0.0, 1.0, 2), "classes": sorted(rng.choice(NUM_CLASSES, 5, replace=False).tolist()),
            "ap": rng.uniform(0.1, 0.8, NUM_CLASSES)}


class FakeNodes:
    """A grid of ``n`` fake nodes: ``query`` gets the site record, ``train`` a small fixed reply; time kept apart."""

    def __init__(self, n: int):
        from flwr.app import Array, ArrayRecord
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._run_id is None:  # what a ServerApp process would have set
            TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
        side = (n / DENSITY_PER_KM2) ** 0.5
        self.sites = [_site(i) for i in range(n)]
        for site in self.sites:
            site["position"] = (site["position"] * side).tolist()
        # 1 KiB of "weights" per site, holding the site's index (what the fake benchmark_fn reads)
        self.arrays = [ArrayRecord({"w": Array(np.full(256, i, np.float32))}) for i in range(n)]
        self.seconds = 0.0  # time spent answering, taken out of the server's time

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.sites) + 1))

    def site_record(self, node: int):
        from flwr.app import ConfigRecord

        from common import protocol as P

        site = self.sites[node - 1]
        return ConfigRecord({P.SITE_ID: f"site-{node - 1}", P.POSITION_KM: site["position"],
                             P.CLASSES: site["classes"]})

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message, MessageType, MetricRecord, RecordDict

        from common import protocol as P

        start = time.perf_counter()
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = RecordDict({P.SITE: self.site_record(node)})
            if msg.metadata.message_type != MessageType.QUERY:
                content[P.ARRAYS] = self.arrays[node - 1]
                content[P.METRICS] = MetricRecord({
                    P.NUM_EXAMPLES: 100, P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 1.0, P.VAL_MAP50: 0.4,
                    P.TEST_MAP50: 0.4, P.TEST_MAP50_95: 0.2, P.TEST_AP50: [0.4] * NUM_CLASSES})
            replies.append(Message(content, reply_to=msg))
        self.seconds += time.perf_counter() - start
        return replies


def _strategy(path: str, nodes: FakeNodes):
    import logging

    from common import graph as G
    from strategies.graph_kd import GraphKDStrategy

    logging.getLogger("flwr").setLevel(logging.WARNING)
    evaluations: list[int] = []

    def benchmark_fn(arrays):
        """The site's own AP vector plus noise of 0.01 that differs at every evaluation."""
        site = int(arrays["w"].numpy()[0])
        evaluations.append(site)
        noise = np.random.default_rng([site, len(evaluations)]).normal(0.0, 0.01, NUM_CLASSES)
        return {"map50": 0.4, "ap50": np.clip(nodes.sites[site]["ap"] + noise, 0.0, 1.0).tolist()}

    class DenseStrategy(GraphKDStrategy):
        def current_graph(self, sites):
            self.graph = G.build_graph({s: self.profiles[s] for s in sites}, self.sigma_s_km, method="dense")
            return self.graph

    cls = DenseStrategy if path == "dense" else GraphKDStrategy
    strategy = cls(num_classes=NUM_CLASSES, epochs_per_round=1, benchmark_fn=benchmark_fn, mode="graph",
                   rho=0.3, start_round=2, t_cycle=1 if path == "dense" else 100, wait_for_nodes_s=0.0,
                   expected_nodes=len(nodes.sites), fraction_train=SAMPLED_FRACTION if path == "sampled" else 1.0)
    return strategy, evaluations


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_federation(n: int, path: str, rounds: int) -> dict:
    """One path at one size: per round the server seconds, evaluations, graph rows, memory."""
    from flwr.app import ArrayRecord, ConfigRecord

    nodes = FakeNodes(n)
    strategy, evaluations = _strategy(path, nodes)
    per_round = []
    for r in range(1, rounds + 1):
        nodes.seconds, done = 0.0, len(evaluations)
        start = time.perf_counter()
        messages = list(strategy.configure_train(r, ArrayRecord(), ConfigRecord(), nodes))
        graph_seconds = time.perf_counter() - start - nodes.seconds
        replies = nodes.send_and_receive(messages)
        strategy.aggregate_train(r, replies)
        strategy.configure_evaluate(r, ArrayRecord(), ConfigRecord(), nodes)
        strategy.aggregate_evaluate(r, [])
        seconds = time.perf_counter() - start - nodes.seconds
        current, peak = _rss_mib()
        graph = strategy.graph_record or {}
        per_round.append({"round": r, "server_s": seconds, "configure_train_s": graph_seconds,
                          "evaluations": len(evaluations) - done, "rows_computed": graph.get("rows_computed", n),
                          "arcs": len(graph.get("arcs", [])), "students_with_teachers": len(strategy.plan),
                          "messages": len(messages),
                          "rss_mib": current, "peak_rss_mib": peak})
        print(json.dumps({"n": n, "path": path, **per_round[-1]}), file=sys.stderr, flush=True)
    return {"n": n, "path": path, "rounds": per_round}


def graph_timings(n: int, dense: bool) -> dict:
    """build_graph (sparse; dense when asked) and update_graph after 1 % of the profiles changed."""
    from common import graph as G

    side = (n / DENSITY_PER_KM2) ** 0.5
    profiles = {f"site-{i}": _site(i) for i in range(n)}
    for p in profiles.values():
        p["position"] = p["position"] * side
    out = {"n": n}
    start = time.perf_counter()
    graph = G.build_graph(profiles, 5.0)
    out["sparse_build_s"], out["sparse_arcs"] = time.perf_counter() - start, graph.num_arcs
    rng = np.random.default_rng(1)
    changed = {s: {**profiles[s], "ap": np.clip(profiles[s]["ap"] + rng.normal(0, 0.01, NUM_CLASSES), 0, 1)}
               for s in list(profiles)[:: 100]}
    start = time.perf_counter()
    updated = G.update_graph(graph, changed)
    out["update_1pct_s"], out["update_rows"] = time.perf_counter() - start, updated.rows_computed
    if dense:
        start = time.perf_counter()
        out["dense_arcs"] = G.build_graph(profiles, 5.0, method="dense").num_arcs
        out["dense_build_s"] = time.perf_counter() - start
    out["peak_rss_mib"] = _rss_mib()[1]
    return out


def keyframe_fps(seconds: float = 3.0) -> dict:
    """Frames/s of KeyframeSelector on 1080p BGR video: every pixel (oversample=0) vs sampled (default)."""
    from common.keyframes import KeyframeSelector

    rng = np.random.default_rng(0)
    scene = np.kron(rng.integers(30, 220, (18, 32), dtype=np.uint8), np.ones((60, 60), np.uint8))
    frames = []
    for t in range(8):
        frame = scene.copy()
        frame[400:520, 600 + 40 * t:720 + 40 * t] = 250
        frames.append(np.dstack([frame, frame // 2 + 20, 255 - frame]))
    out = {}
    for name, oversample in (("every_pixel", 0), ("sampled", 4), ("every_pixel_again", 0), ("sampled_again", 4)):
        selector, count, start = KeyframeSelector(oversample=oversample), 0, time.perf_counter()
        keys = []
        while time.perf_counter() - start < seconds / 4:
            keys.append(selector.update(frames[count % len(frames)]))
            count += 1
        out[name] = {"fps": count / (time.perf_counter() - start), "frames": count, "keys": sum(keys)}
    return {"every_pixel_fps": max(out["every_pixel"]["fps"], out["every_pixel_again"]["fps"]),
            "sampled_fps": max(out["sampled"]["fps"], out["sampled_again"]["fps"]), "runs": out}


# --------------------------------------------------------------------------- edge hot path
EDGE_IMGSZ = 256


def _edge_frames(n: int) -> list[np.ndarray]:
    """``n`` 256 px scenes of site 0 of the built-in benchmark (objects 4-32 px, clutter, noise)."""
    from common.benchmark import GeneratorSettings, make_sites, render_scene

    settings = GeneratorSettings()
    site, rng = make_sites(settings)[0], np.random.default_rng(0)
    return [render_scene(rng, settings, site, EDGE_IMGSZ)[0] for _ in range(n)]


def _random_head_weights(frames: list[np.ndarray], path: Path) -> Path:
    """YOLO11n with BatchNorm statistics from ``frames`` and a random class layer (std 0.1, bias -3), saved."""
    import torch

    from clients.detector import letterbox
    from common import yolo
    from common.benchmark import CLASS_NAMES

    model = yolo.build_model("yolo11n", len(CLASS_NAMES), seed=0, names=list(CLASS_NAMES))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(torch.from_numpy(np.concatenate([letterbox(f, EDGE_IMGSZ)[0] for f in frames])))
        for seq in model.model[-1].cv3:
            seq[-1].weight.normal_(0, 0.1, generator=generator)
            seq[-1].bias.fill_(-3.0)
    return yolo.save_weights(model.eval(), path)


def cached_base_weights() -> Path | None:
    """The newest trained base YOLO11n cached by the quick preset (``$CEDAR_HOME/benchmark/models``), if any."""
    from common.ultralytics_env import CEDAR_HOME

    found = sorted((CEDAR_HOME / "benchmark" / "models").glob("yolo11n-*/model.pt"), key=os.path.getmtime)
    return found[-1] if found else None


def edge_keyframes(weights: str | None, runs: int = 200, warmup: int = 10) -> dict:
    """Milliseconds per keyframe of the edge runtime (cloud down) beside a bare ORT forward of its ONNX file."""
    import socket
    import tempfile

    from benchmarks.harness import time_interleaved
    from clients.collab import CONF_RANGE
    from clients.detector import EdgeModel, letterbox, onnx_runtime
    from clients.edge import EdgeRuntime, EdgeSettings
    from clients.media import Frame
    from clients.offload import CloudClient

    frames = _edge_frames(40)
    inputs = [letterbox(f, EDGE_IMGSZ)[0] for f in frames]
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as closed:
        tmp = Path(tmp)
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        path = Path(weights) if weights else _random_head_weights(frames, tmp / "random-head.pt")
        settings = EdgeSettings(site="site-0", max_gap=1, retry_base=3600.0, retry_max=3600.0, drain_timeout=0.0)
        model = EdgeModel(path, onnx=tmp / "edge.onnx", imgsz=EDGE_IMGSZ, reload_every=0,
                          conf=min(settings.detector_conf, CONF_RANGE[0]))  # as clients.edge without --conf
        client = CloudClient(f"http://127.0.0.1:{closed.getsockname()[1]}", "token", "site-0", timeout=1.0)
        runtime = EdgeRuntime(model, client, settings, queue_dir=tmp / "queue", out=tmp / "edge.jsonl")
        ort = onnx_runtime(tmp / "edge.onnx")
        name = ort.get_inputs()[0].name
        records, count = [], iter(range(10**9))

        def keyframe():
            i = next(count)
            records.append(runtime.process(Frame(i, frames[i % len(frames)], i / 10, time.time())))

        def bare():
            ort.run(None, {name: inputs[len(records) % len(inputs)]})

        times = time_interleaved({"bare_ort": bare, "runtime": keyframe}, runs=runs, warmup=warmup)
        runtime.close(drain=False)
        client.close()
    records = records[warmup:]
    assert all(r["keyframe"] for r in records), "every frame is a keyframe (max_gap=1)"
    return {"model": "trained base YOLO11n" if weights else "YOLO11n, random class layer", "weights": shown(weights) if weights else None,
            "imgsz": EDGE_IMGSZ, "frame": list(frames[0].shape[:2]), "keyframes": len(records),
            "bare_ort_ms": times["bare_ort"], "keyframe_ms": times["runtime"],
            "ratio": times["runtime"]["median_ms"] / times["bare_ort"]["median_ms"],
            "detect_ms": float(np.median([r["latency_ms"]["edge"] for r in records])),
            "to_edge_line_ms": float(np.median([r["latency_ms"]["total"] for r in records])),
            "answer_boxes": float(np.median([len(r["detections"]) for r in records])),
            "candidates": float(np.median([len(r["candidates"]) for r in records])),
            "offloaded": float(np.mean([r["offload"] is not None for r in records])),
            "offload_bytes": float(np.median([r["offload"]["bytes"] for r in records if r["offload"]] or [0]))}


# --------------------------------------------------------------------------- a real simulated federation
def simulated_rounds(sites: int, rounds: int, preset: str = "quick", overrides: tuple[str, ...] = ()) -> dict:
    """``cedar-simulate`` with ``sites`` sites, ``rounds`` rounds of 1 local epoch (the preset's sizes), as a
    subprocess: per round its wall time (from the ``[ROUND k/n]`` line to the next, or to the end), the server's
    benchmark evaluation inside it (the sum of ``eval_seconds`` in ``metrics.jsonl``: the server scores one site
    after another), and the peak memory in use on the whole machine above what was in use before the start
    (``psutil.virtual_memory().used`` every 0.5 s: the SuperLink, Ray and every ClientApp included)."""
    import re
    import shutil
    import tempfile
    import threading

    import psutil

    out = Path(tempfile.mkdtemp(prefix="cedar-scale-sim-"))
    cmd = [sys.executable, "-m", "server.simulate", "--preset", preset, f"data.num-sites={sites}",
           f"federation.num-rounds={rounds}", "train.epochs-per-round=1", "tracking.wandb=off",
           *overrides, f"output-dir={out}", "run-name=scale"]
    base = psutil.virtual_memory().used
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak[0] = max(peak[0], psutil.virtual_memory().used)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks, start = {}, time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            found = re.search(r"\[ROUND (\d+)/\d+\]", line)
            if found:
                marks[int(found.group(1))] = time.monotonic()
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.set()
        sampler.join()
    end = time.monotonic()
    metrics = out / "scale" / "metrics.jsonl"
    if rc != 0 or not metrics.is_file():
        raise RuntimeError(f"cedar-simulate failed (exit {rc}):\n{''.join(tail)}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    per_round = []
    for r in sorted(marks):
        mine = [row for row in rows if row["round"] == r]
        wall = marks.get(r + 1, end) - marks[r]
        evaluation = sum(row["eval_seconds"] or 0.0 for row in mine)
        per_round.append({"round": r, "wall_s": wall, "server_eval_s": evaluation,
                          "evaluations": sum(row["evaluated"] is not None for row in mine),
                          "eval_share": evaluation / wall, "sites": len(mine),
                          "train_s_mean": float(np.mean([row["train_seconds"] for row in mine]))})
    shutil.rmtree(out, ignore_errors=True)
    return {"sites": sites, "rounds": per_round, "wall_s": end - start, "peak_used_gib": (peak[0] - base) / 2**30,
            "command": "cedar-simulate " + " ".join(cmd[5:-2])}


# --------------------------------------------------------------------------- driver
def _child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def _steady(result: dict) -> dict:
    """Mean of rounds 3.. (graph kept and updated), or the last round when there are fewer."""
    rounds = [r for r in result["rounds"] if r["round"] >= 3] or result["rounds"][-1:]
    keys = ("server_s", "evaluations", "rows_computed", "messages")
    return {k: float(np.mean([r.get(k, np.nan) for r in rounds])) for k in keys} | {
        "peak_rss_mib": max(r["peak_rss_mib"] for r in result["rounds"])}


PARTS = ("federation", "graph", "keyframes", "edge", "simulation")


def markdown(report: dict) -> str:
    fed = {(r["n"], r["path"]): r for r in report.get("federations", [])}
    graphs = {g["n"]: g for g in report.get("graphs", [])}
    lines = [
        "# Scale: server cost per round, graph, keyframes, edge hot path (issue 21)", "",
        f"Machine: {report['machine']}. Absolute seconds depend on what else the machine ran (the load averages "
        "here); the ratios compare paths measured in the same run. Load average (1, 5, 15 min) "
        "before and after each part: " + "; ".join(f"{part} {load['before']} / {load['after']}"
                                                   for part, load in report["load"].items()) + ".", "",
        "Command: `python -m benchmarks.scale` (fake nodes, no training; see the module docstring).", "",
    ]
    if fed:
        lines += ["## Server time per round (steady state: rounds 3-4, 1 % of the sites re-evaluated)", "",
                  ("| sites | path | server s/round | train messages/round | evaluations/round | at 5.6 s each | "
                   "graph rows computed | peak RSS MiB |"), "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for n in report["sizes"]:
            for path in PATHS:
                if path == "sampled" and (n, path) not in fed:
                    continue
                if (n, path) not in fed:
                    lines.append(f"| {n:,} | {path} | not run (all-pairs Python loop: see the graph table) | {n:,} | "
                                 f"{n:,} | {n * SECONDS_PER_EVALUATION / 60:,.0f} min | {n:,} | |")
                    continue
                st = _steady(fed[n, path])
                lines.append(f"| {n:,} | {path} | {st['server_s']:.2f} | {st['messages']:,.0f} | {st['evaluations']:.0f} | "
                             f"{st['evaluations'] * SECONDS_PER_EVALUATION / 60:.1f} min | {st['rows_computed']:.0f} | "
                             f"{st['peak_rss_mib']:.0f} |")
        lines += ["", "Per round, every path (server seconds; round 1 evaluates every site, as all are new):", "",
                  "| sites | path | " + " | ".join(f"round {r}" for r in range(1, report["rounds"] + 1)) + " |",
                  "|---:|---|" + "---:|" * report["rounds"]]
        for (n, path), res in sorted(fed.items()):
            lines.append(f"| {n:,} | {path} | " + " | ".join(
                f"{r['server_s']:.2f} s, {r['evaluations']} eval" for r in res["rounds"]) + " |")
        lines.append("")
    if graphs:
        lines += ["## Graph alone", "",
                  ("| sites | sparse build s | arcs kept | update after 1 % changed s | rows recomputed | dense build s | "
                   "dense arcs | dense / sparse |"), "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in sorted(graphs):
            g = graphs[n]
            dense = (f"{g['dense_build_s']:.2f} | {g['dense_arcs']:,} | {g['dense_build_s'] / g['sparse_build_s']:.0f}x"
                     if "dense_build_s" in g else "not run (O(N^2) pairs) | | ")
            lines.append(f"| {n:,} | {g['sparse_build_s']:.2f} | {g['sparse_arcs']:,} | {g['update_1pct_s']:.2f} | "
                         f"{g['update_rows']:,} | {dense} |")
        lines.append("")
    if "keyframes" in report:
        kf = report["keyframes"]
        lines += ["## Keyframe selector, 1080p BGR", "",
                  "| path | frames/s |", "|---|---:|",
                  f"| every pixel (oversample=0) | {kf['every_pixel_fps']:.0f} |",
                  f"| sampled 4x grid (default) | {kf['sampled_fps']:.0f} |",
                  f"| ratio | {kf['sampled_fps'] / kf['every_pixel_fps']:.1f}x |", ""]
    for sim in report.get("simulations", []):
        lines += [f"## A simulated federation of {sim['sites']} sites (real training, quick sizes, 1 epoch per round)",
                  "", (f"`python -m benchmarks.scale --parts simulation --sim-rounds {len(sim['rounds'])}{sim.get('args', '')}` "
                       f"runs `{sim['command']}` "
                       "and times each round "
                       "from its `[ROUND k/n]` line to the next; *server evaluation* is the server scoring the "
                       "sites the maintenance rules name on the shared benchmark, one after another. Peak memory "
                       "is the memory in use on the machine above what was in use before the run "
                       f"(SuperLink, Ray, every ClientApp): **{sim['peak_used_gib']:.1f} GiB**; the whole run "
                       f"took {sim['wall_s']:.0f} s."), "",
                  ("| round | sites training | round wall s | site training s (mean) | sites evaluated | "
                   "server evaluation s | evaluation share of the round |"), "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sim["rounds"]:
            lines.append(f"| {r['round']} | {r['sites']} | {r['wall_s']:.0f} | {r['train_s_mean']:.1f} | "
                         f"{r['evaluations']} | {r['server_eval_s']:.0f} | {r['eval_share']:.0%} |")
        lines.append("")
    if report.get("edge"):
        lines += ["## Edge runtime per keyframe, cloud down, beside a bare ONNX Runtime forward", "",
                  ("`python -m benchmarks.scale --parts edge`: `EdgeRuntime.process` on 256 px frames, every frame a keyframe, ONNX at 256 px, interleaved with "
                   "`InferenceSession.run` of the same file on the same letterboxed input (medians; see the module "
                   "docstring). *detect* is the detector call with NMS down to the candidate threshold, tracking and "
                   "routing (`latency_ms.edge`); *to edge line* is frame in to edge line out (`latency_ms.total`); "
                   "*keyframe* is all of `process`, the disk queue included."), "",
                  ("| model | bare ORT ms | keyframe ms | keyframe / bare | detect ms | to edge line ms | answer boxes | "
                   "candidates | offloaded | JPEG bytes |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in report["edge"]:
            lines.append(f"| {e['model']} | {e['bare_ort_ms']['median_ms']:.2f} | {e['keyframe_ms']['median_ms']:.2f} | "
                         f"{e['ratio']:.2f}x | {e['detect_ms']:.2f} | {e['to_edge_line_ms']:.2f} | "
                         f"{e['answer_boxes']:.0f} | {e['candidates']:.0f} | {e['offloaded']:.0%} | "
                         f"{e['offload_bytes']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run these parts; the others are kept from the report at --out")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--dense-max", type=int, default=1000, help="largest size the dense path runs at")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--edge-weights", help="trained edge weights for the edge part (default: the cached base "
                                               "YOLO11n of the quick preset, when there is one)")
    parser.add_argument("--sim-sites", type=int, default=32, help="sites of the simulation part")
    parser.add_argument("--sim-rounds", type=int, default=3, help="rounds of the simulation part")
    parser.add_argument("--sim-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of the simulation part (each set of overrides is its own table)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "federation":
            result = run_federation(int(rest[0]), rest[1], int(rest[2]))
        elif kind == "graph":
            result = graph_timings(int(rest[0]), rest[1] == "dense")
        elif kind == "edge":
            result = edge_keyframes(rest[0] if rest else None)
        elif kind == "simulation":
            result = simulated_rounds(int(rest[0]), int(rest[1]), overrides=tuple(rest[2:]))
        else:
            result = keyframe_fps()
        print(json.dumps(result))
        return
    from benchmarks.harness import cpu_model_name, write_report

    out = Path(args.out)
    report = json.loads(out.with_suffix(".json").read_text()) if set(args.parts) != set(PARTS) \
        and out.with_suffix(".json").is_file() else {}
    report["machine"] = f"{cpu_model_name()}, {os.cpu_count()} logical CPUs"
    # the load averages of the parts not run now stay with their results; those of the parts run now are replaced
    report["load"] = {key: load for key, load in report.get("load", {}).items()
                      if not any(part in key for part in args.parts)}
    report["seconds_per_evaluation"] = SECONDS_PER_EVALUATION
    if "keyframes" in args.parts:
        before = _load()
        report["keyframes"] = _child(["keyframes"])
        report["load"]["keyframes"] = {"before": before, "after": _load()}
    if {"federation", "graph"} & set(args.parts):
        before = _load()
        report.update(sizes=args.sizes, rounds=args.rounds)
        if "graph" in args.parts:
            report["graphs"] = [_child(["graph", str(n), "dense" if n <= args.dense_max else "sparse"])
                                for n in args.sizes]
        if "federation" in args.parts:
            report["federations"] = [_child(["federation", str(n), path, str(args.rounds)]) for n in args.sizes
                                     for path in (PATHS if n <= args.dense_max else PATHS[:2])]
        report["load"][" and ".join(p for p in ("federation", "graph") if p in args.parts)] = \
            {"before": before, "after": _load()}
    if "edge" in args.parts:
        before = _load()
        weights = args.edge_weights or cached_base_weights()
        report["edge"] = ([_child(["edge", str(weights)])] if weights else []) + [_child(["edge"])]
        report["load"]["edge"] = {"before": before, "after": _load()}
    if "simulation" in report:  # a report written when it held one simulation
        report["simulations"] = [report.pop("simulation")]
    if "simulation" in args.parts:
        before = _load()
        sim = _child(["simulation", str(args.sim_sites), str(args.sim_rounds), *args.sim_set])
        sim["args"] = "".join(f" --sim-set {v}" for v in args.sim_set)
        report["simulations"] = [s for s in report.get("simulations", []) if s["command"] != sim["command"]] + [sim]
        report["load"]["simulation" + sim["args"]] = {"before": before, "after": _load()}
    write_report(out, report, markdown(report))


if __name__ == "__main__":
    main()
