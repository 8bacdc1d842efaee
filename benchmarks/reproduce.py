"""The paper's Tables 1-4 and Figures 5-8 on the built-in benchmark, one command (paper section 5).

Run::

    python -m benchmarks.reproduce --preset standard     # 2 CPU cores
    python -m benchmarks.reproduce --preset paper        # 640 px, on a GPU

Writes ``benchmarks/results/reproduce_<preset>.md`` (every table with the paper's
number beside ours), ``.json`` (all measurements) and ``reproduce_<preset>_fig5..8.png``.

What runs (budget: the preset's ``reproduce`` section, ``common.config.ReproduceConfig``; the
built-in benchmark with ``data.similar-pairs`` and graph KD with ``kd.teacher-scope=local``, see
:func:`job_config`; ``--set`` overrides any of it):

- **cloud**: one cloud model (``model.cloud``, YOLO11s) trained on the shared
  benchmark's public train split; the cloud is a server-side asset, the seeds vary
  the edge side.
- **federations**, per seed, through the real ServerApp/ClientApp code
  (:func:`benchmarks.kd_federation.run_variant`): ``none`` (edge model),
  ``pyrafan`` (``none`` with the YOLO11n-PyraFAN edge), ``cloud`` (cloud->edge KD on
  every round from 2), ``graph`` (edge->edge graph KD), ``both``, and with a noisy
  site added (a different task) ``noisy-graph`` and ``noisy-all`` (naive KD from
  every site) for Figure 6. KD starts at round 2, so round 1 is the same for
  ``none``/``cloud``/``graph``/``both`` (and for the two noisy ones): it is trained once
  (``base``, ``base-noisy``, ``base-pyrafan``; ``reproduce.base-epochs`` local epochs) and
  each variant continues from a copy of it (``reproduce.epochs-per-round`` per round).
- **collaboration**, per seed: the real cloud detection service process and the edge
  runtime's own pipeline (:mod:`benchmarks.collaboration`) on every site's test
  images and video, for each federation's edge models; the t_conf sweep (Figure 5) on
  site 0 for three edge models.
- **speed**: GFLOPs at 640 px; **upload**: JPEG bytes and cloud inference time per
  image size, with a documented link model for Figure 8.

Jobs run ``workers`` at a time in separate processes (one torch thread each on CPU)
and are cached in ``<work>/jobs.jsonl`` keyed by the settings: a rerun skips what is
done, so an interrupted reproduction resumes.

All detection figures of Tables 1-4 come from one scorer
(:func:`common.detections.score`: detections at the deployment thresholds,
mAP50 class-aware, recall at IoU 0.5), so edge, cloud and collaboration compare
like for like; Figure 6 uses each federation's own metric (Ultralytics' validator on
every site's test split), the same one the KD benchmark reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from itertools import product
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from benchmarks.harness import cpu_model_name, write_report

log = logging.getLogger("benchmarks.reproduce")
RESULTS = Path(__file__).resolve().parent / "results"

# the paper's numbers (VisDrone-DET / VisDrone-VID), section 5
PAPER_T1 = {"cloud": (0.401, 0.302), "edge": (0.328, 0.246), "pyrafan": (0.368, 0.262), "cloud_kd": (0.336, 0.249),
            "graph_kd": (0.336, 0.248), "both_kd": (0.337, 0.247), "collab": (0.429, 0.302)}
PAPER_T2 = {"edge": (0.298, 7.7, 145), "pyrafan": (None, None, None), "cloud": (None, None, None),
            "collab": (0.429, 15.7, 135)}
PAPER_T3 = {"cloud": (0.952, 0.60, 0.40), "edge": (0.972, 0.54, 0.46), "cloud_kd": (0.960, 0.54, 0.46),
            "pyrafan": (0.967, 0.55, 0.45), "collab": (0.952, 0.63, 0.37)}
PAPER_T4 = {"cloud": (0.980, 0.57, 0.43), "edge": (0.999, 0.55, 0.45), "cloud_kd": (0.974, 0.51, 0.49),
            "pyrafan": (0.982, 0.56, 0.44), "collab": (0.98, 0.57, 0.43)}
PAPER_F6 = {"none": 0.328, "graph": 0.336, "noisy-all": 0.32}
ROWS = {"cloud": "cloud model", "edge": "edge model", "pyrafan": "edge model with PyraFAN",
        "cloud_kd": "cloud->edge distillation", "graph_kd": "edge->edge (graph) distillation",
        "both_kd": "cloud->edge + edge->edge distillation", "collab": "cloud-edge collaboration"}
# which federation's site models play each edge role
EDGE_ROLES = {"edge": "none", "pyrafan": "pyrafan", "cloud_kd": "cloud", "graph_kd": "graph", "both_kd": "both"}
FIG5_ROLES = ("edge", "pyrafan", "cloud_kd")
BEST_MERGE = "crops fuse+keep"  # the edge runtime's default (benchmarks/results/collaboration.md)
# what the collaboration job does beyond the settings key: changing it runs the collaboration jobs again
COLLAB_DEFINITION = ("runtime defaults: candidates, cloud crop zoom, crop atlas; refined answers carried by optical "
                     "flow; a keyframe at least every max_gap frames; the cloud answers from its own --conf")
NOISY = {"data.noisy-site": True}
PYRAFAN = {"model.edge": "yolo11n-pyrafan"}
# name -> (kd_federation variant, extra overrides, the federation whose round 1 it continues); one without a
# base is a round 1 of ``reproduce.base-epochs`` local epochs
FEDERATIONS = {
    "base": ("none", {}, None), "base-noisy": ("none", NOISY, None), "base-pyrafan": ("none", PYRAFAN, None),
    "none": ("none", {}, "base"), "cloud": ("cloud", {}, "base"), "graph": ("graph", {}, "base"),
    "both": ("both", {}, "base"), "pyrafan": ("none", PYRAFAN, "base-pyrafan"),
    "noisy-graph": ("graph", NOISY, "base-noisy"), "noisy-all": ("all", NOISY, "base-noisy"),
}
# Figure 8's link model (no real WAN here): time = RTT + bytes * 8 / bandwidth
LINKS = {"edge server (LAN / 5G MEC)": {"rtt_ms": 5.0, "mbit_s": 100.0},
         "cloud server (WAN uplink)": {"rtt_ms": 60.0, "mbit_s": 20.0}}
UPLOAD_SIZES = (160, 320, 480, 640, 960, 1280)


# --------------------------------------------------------------------------- configuration
def job_config(preset: str, overrides: dict):
    """The preset with the reproduction's budget applied (rounds, epochs; 1 torch thread per worker on CPU)."""
    from common.config import load_config

    cfg = load_config(preset, overrides)
    r = cfg.reproduce
    # the paper's premise: sites with something to teach each other. The built-in benchmark then has sites
    # in pairs of the same kind, and each site learns from the neighbours ranked above it (common.graph
    # .local_plan); with every site its own domain no site's model helps another (benchmarks/results/kd_*.md)
    budget = {"federation.num-rounds": r.num_rounds, "train.epochs-per-round": r.epochs_per_round,
              "kd.start-round": 2, "data.similar-pairs": True, "kd.teacher-scope": "local"}
    if r.num_sites:
        budget["data.num-sites"] = r.num_sites
    if cfg.train.device == "cpu" and r.workers > 1:
        budget["train.threads"] = 1
    return load_config(preset, {**budget, **overrides}), {**budget, **overrides}


# --------------------------------------------------------------------------- jobs
def plan_jobs(cfg) -> dict[str, list[str]]:
    """``{job: [jobs it needs]}``."""
    jobs: dict[str, list[str]] = {"cloud": [], "speed": [], "upload": ["cloud"]}
    for seed in cfg.reproduce.seeds:
        for name, (variant, _, base) in FEDERATIONS.items():
            jobs[f"fed:{name}:{seed}"] = (["cloud"] if variant in ("cloud", "both") else []) + \
                ([f"fed:{base}:{seed}"] if base else [])
        jobs[f"collab:{seed}"] = ["cloud", *(f"fed:{f}:{seed}" for f in EDGE_ROLES.values())]
    return jobs


def run_job(job: str, preset: str, overrides: dict, work: str, done: dict) -> dict:
    """One job in a worker process; ``done`` holds the results of the jobs it needs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg, ov = job_config(preset, overrides)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.threads))
    import torch

    torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    kind, *rest = job.split(":")
    out = {"cloud": lambda: cloud_job(cfg), "speed": lambda: speed_job(cfg),
           "upload": lambda: upload_job(cfg, done["cloud"]["weights"]),
           "fed": lambda: federation_job(preset, ov, rest[0], int(rest[1]), Path(work), done,
                                         cfg.reproduce.base_epochs),
           "collab": lambda: collab_job(cfg, int(rest[0]), done, Path(work))}[kind]()
    return {**out, "seconds": time.perf_counter() - t0}


def cloud_job(cfg) -> dict:
    from benchmarks.collaboration import cloud_model
    from common.benchmark import benchmark_from_config

    r = cfg.reproduce
    path = cloud_model(cfg, benchmark_from_config(cfg.data), r.seeds[0], r.cloud_iters,
                       edge_epochs=r.base_epochs + (r.num_rounds - 1) * r.epochs_per_round)
    return {"weights": str(path)}


def federation_job(preset: str, overrides: dict, name: str, seed: int, work: Path, done: dict,
                   base_epochs: int) -> dict:
    from benchmarks.kd_federation import run_variant

    variant, extra, base = FEDERATIONS[name]
    ov = {**overrides, **extra}
    if "cloud" in done:
        ov["model.cloud-init"] = done["cloud"]["weights"]
    rounds = list(range(2, int(ov["federation.num-rounds"]) + 1))
    if base is None:  # round 1, shared by the federations that continue it
        ov.update({"federation.num-rounds": 1, "train.epochs-per-round": base_epochs})
    start = Path(done[f"fed:{base}:{seed}"]["run_dir"]) if base else None
    res = run_variant(preset, variant, seed, ov, rounds, work / "runs", name=f"{name}-seed{seed}", start_from=start)
    res["run_dir"] = str(work / "runs" / f"{name}-seed{seed}")
    res["noisy_site"] = f"site-{max(int(s.split('-')[1]) for s in res['final_test_map50'])}" if "noisy" in name \
        else None
    return res


def collab_job(cfg, seed: int, done: dict, work: Path) -> dict:
    """Every site: edge models of each role alone and with the cloud, on images and video; cloud alone."""
    import tempfile

    from benchmarks.collaboration import (MERGES, cloud_only, cloud_service, offload_figures, per_frame, remerged,
                                          run_edge, site_test_data)
    from common.detections import score
    from clients.edge import EdgeSettings
    from clients.offload import CloudClient
    from common.benchmark import CLASS_NAMES, benchmark_from_config

    bench = benchmark_from_config(cfg.data)
    nc, small_px, r = len(CLASS_NAMES), cfg.eval.small_px, cfg.routing
    out: dict = {"sites": {}, "sweep": {}}
    with tempfile.TemporaryDirectory(prefix="cedar-repro-", dir=work) as tmp, \
            cloud_service(Path(done["cloud"]["weights"]), Path(tmp), imgsz=cfg.train.imgsz, conf=r.cloud_conf,
                          iou=cfg.eval.iou) as (url, token):
        tmp = Path(tmp)
        for site in range(cfg.data.num_sites):
            site_id = f"site-{site}"
            (tmp / site_id).mkdir()
            client = CloudClient(url, token, site_id, timeout=120)
            base = EdgeSettings.from_config(r, site=site_id, drain_timeout=600,
                                            keep_unanswered=False, merge="cloud")  # the paper's merge
            kw = dict(imgsz=cfg.train.imgsz, conf=base.detector_conf, iou=cfg.eval.iou)
            images, image_gts, video, video_gts = site_test_data(bench, site)
            res: dict = {}
            try:
                for source, gts, tag in ((images, image_gts, "images"), (video / "video.mp4", video_gts, "video")):
                    dets, ms, sizes, _ = cloud_only(source, client, site_id)
                    res[f"cloud/{tag}"] = {**score(dets, gts, nc, small_px), "ms": float(np.mean(ms)),
                                           "bytes": float(np.mean(sizes))}
                for role, fed in EDGE_ROLES.items():
                    weights = Path(done[f"fed:{fed}:{seed}"]["run_dir"]) / "nodes" / site_id / "model.pt"
                    for (source, gts, tag, gap), offload in product(
                            ((images, image_gts, "images", 1), (video / "video.mp4", video_gts, "video", base.max_gap)),
                            ("crops", "frame") if role == "edge" else ("crops",)):
                        run = role if offload == "crops" else f"{role}-frame"
                        recs = run_edge(weights, source, replace(base, run_id=f"{run}-{tag}-s{seed}", max_gap=gap,
                                                                 offload=offload), client, tmp / site_id, **kw)
                        res[f"{run}/{tag}"] = {"edge": score(per_frame(recs, False), gts, nc, small_px),
                                               "collab": score(per_frame(recs, True), gts, nc, small_px),
                                               **offload_figures(recs)}
                        if role == "edge":  # every merge policy on the same cloud answers
                            res[f"{run}/{tag}"]["merges"] = {
                                name: score(per_frame(remerged(recs, **m), True), gts, nc, small_px)
                                for name, m in MERGES.items()}
                    if site == 0 and role in FIG5_ROLES:
                        for t in cfg.reproduce.t_conf_sweep:
                            rid = f"sweep-{role}-{int(round(t * 100))}-s{seed}"
                            recs = run_edge(weights, images, replace(base, run_id=rid, max_gap=1, t_conf=t), client,
                                            tmp / site_id, **kw)
                            out["sweep"].setdefault(role, {})[str(t)] = score(per_frame(recs, True), image_gts, nc,
                                                                              small_px)["map50"]
            finally:
                client.close()
            out["sites"][site_id] = res
    return out


def speed_job(cfg) -> dict:
    from common import yolo
    from common.benchmark import CLASS_NAMES

    archs = {"edge": cfg.model.edge, "pyrafan": "yolo11n-pyrafan", "cloud": cfg.model.cloud}
    return {"gflops_640": {role: round(yolo.gflops(yolo.build_model(a, nc=len(CLASS_NAMES), seed=0), 640), 2)
                           for role, a in archs.items()}, "archs": archs}


def upload_job(cfg, cloud_weights: str) -> dict:
    """Figure 8: JPEG bytes per image size (site 0's test images resized) and the cloud model's inference time."""
    import cv2
    import torch

    from common import yolo
    from common.benchmark import benchmark_from_config

    bench = benchmark_from_config(cfg.data)
    paths = sorted((bench.site_dir(0) / "images" / "test").glob("*.png"))[:8]
    images = [cv2.imread(str(p)) for p in paths]
    model = yolo.load_weights(cloud_weights).eval()
    out = {}
    for size in UPLOAD_SIZES:
        nbytes = [len(cv2.imencode(".jpg", cv2.resize(im, (size, size)), [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
                  for im in images]
        x = torch.rand(1, 3, size, size)
        with torch.inference_mode():
            model(x)
            t0 = time.perf_counter()
            for _ in range(3):
                model(x)
        infer_ms = (time.perf_counter() - t0) / 3 * 1000
        mean_bytes = float(np.mean(nbytes))
        out[str(size)] = {"bytes": mean_bytes, "cloud_infer_ms": infer_ms,
                          **{name: link["rtt_ms"] + mean_bytes * 8 / (link["mbit_s"] * 1e6) * 1000
                             for name, link in LINKS.items()}}
    return out


# --------------------------------------------------------------------------- scheduling
def settings_key(preset: str, overrides: dict, cfg) -> str:
    from common.config import to_flat_dict

    flat = to_flat_dict(cfg)
    return json.dumps({"preset": preset, "overrides": overrides,
                       "reproduce": {k: v for k, v in flat.items() if k.startswith("reproduce.")}}, sort_keys=True)


def job_definition(job: str) -> str:
    """What a job runs beyond the settings key: a federation's variant, its extra overrides and its base."""
    kind, *rest = job.split(":")
    if kind == "collab":
        return COLLAB_DEFINITION
    return json.dumps(FEDERATIONS[rest[0]]) if kind == "fed" and rest[0] in FEDERATIONS else ""


def load_cache(cache: Path, key: str) -> dict:
    """``{job: result}`` of the cached jobs run under ``key`` and under their current definition (a federation
    whose variant changed since, e.g. another KD setting, runs again)."""
    done = {}
    for line in cache.read_text().splitlines() if cache.is_file() else []:
        rec = json.loads(line)
        if rec["key"] == key and rec.get("definition") == job_definition(rec["job"]):
            done[rec["job"]] = rec["result"]
    return done


def run_all(preset: str, overrides: dict, work: Path) -> tuple[dict, float]:
    """Every job, ``workers`` at a time, resuming from ``work/jobs.jsonl``; returns (results, wall seconds)."""
    cfg, _ = job_config(preset, overrides)
    key = settings_key(preset, overrides, cfg)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "jobs.jsonl"
    done = load_cache(cache, key)
    jobs = plan_jobs(cfg)
    pending = {j: deps for j, deps in jobs.items() if j not in done}
    t0 = time.perf_counter()
    log.info("%d jobs, %d cached, %d to run, %d at a time", len(jobs), len(jobs) - len(pending), len(pending),
             cfg.reproduce.workers)
    from benchmarks import reproduce  # pickled by its module name, also when this file runs as __main__

    with ProcessPoolExecutor(max_workers=cfg.reproduce.workers, mp_context=get_context("spawn")) as pool:
        running = {}
        while pending or running:
            for job in [j for j, deps in pending.items() if all(d in done for d in deps)]:
                if len(running) >= cfg.reproduce.workers:
                    break
                deps = {d: done[d] for d in pending.pop(job)}
                running[pool.submit(reproduce.run_job, job, preset, overrides, str(work), deps)] = job
            if not running:
                raise RuntimeError(f"jobs {sorted(pending)} wait on jobs that cannot run")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                done[job] = fut.result()  # a failed job stops the reproduction (the others stay cached)
                with cache.open("a") as f:
                    f.write(json.dumps({"job": job, "key": key, "definition": job_definition(job),
                                        "result": done[job]}) + "\n")
                log.info("done %s (%.0f s); %d left", job, done[job]["seconds"], len(pending) + len(running))
    return {j: done[j] for j in jobs}, time.perf_counter() - t0


# --------------------------------------------------------------------------- summaries
def _stats(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(results: dict, cfg) -> dict:
    """Per role and source: the mean over sites per seed, then mean and std over seeds."""
    seeds = cfg.reproduce.seeds
    out: dict = {}

    def over_sites(seed: int, value) -> float:
        """Mean over the sites of the collaboration job of ``seed`` of ``value(site results)``."""
        return statistics.fmean(value(site) for site in results[f"collab:{seed}"]["sites"].values())

    def metric(role: str, tag: str, key: str):
        if role == "cloud":
            return lambda site: site[f"cloud/{tag}"][key]
        if role == "collab":
            return lambda site: site[f"edge/{tag}"]["collab"][key]
        return lambda site: site[f"{role}/{tag}"]["edge"][key]

    for role in ROWS:
        for tag in ("images", "video"):
            for key in ("map50", "map50_small", "recall", "fnr", "conf_p1", "recall_p1"):
                per_seed = [over_sites(s, metric(role, tag, key)) for s in seeds]
                out.setdefault(role, {}).setdefault(tag, {})[key] = (*_stats(per_seed), per_seed)
    # latency per image (ms), images: edge models alone, the collaboration (edge + cloud round trip when offloaded)
    latency = {"edge": ("edge/images", "edge_ms"), "pyrafan": ("pyrafan/images", "edge_ms"),
               "cloud": ("cloud/images", "ms"), "collab": ("edge/images", "collab_ms")}
    out["latency_ms"] = {role: _stats([over_sites(s, lambda site: site[run][key]) for s in seeds])
                         for role, (run, key) in latency.items()}
    # the collaboration (YOLO11n edge) under each other merge policy, scored on the same cloud answers
    merges = results[f"collab:{seeds[0]}"]["sites"]["site-0"]["edge/images"]["merges"]
    out["merges"] = {}
    for (offload, run), name in product((("crops", "edge"), ("frame", "edge-frame")), merges):
        for tag, key in product(("images", "video"), ("map50", "fnr")):
            per_seed = [over_sites(s, lambda site: site[f"{run}/{tag}"]["merges"][name][key]) for s in seeds]
            out["merges"].setdefault(f"{offload} {name}", {}).setdefault(tag, {})[key] = (*_stats(per_seed), per_seed)
    out["offloaded_detections"] = _stats([over_sites(s, lambda site: site["edge/images"]["offloaded_detections"])
                                          for s in seeds])
    # Figure 5: collaborative mAP50 vs t_conf, site 0
    out["sweep"] = {role: {t: _stats([results[f"collab:{s}"]["sweep"][role][t] for s in seeds])
                           for t in results[f"collab:{seeds[0]}"]["sweep"][role]} for role in FIG5_ROLES}
    # Figure 6: mean own-test mAP50 over the regular sites (the noisy site excluded)
    fig6 = {}
    for name in ("none", "graph", "noisy-graph", "noisy-all"):
        per_seed = []
        for s in seeds:
            r = results[f"fed:{name}:{s}"]
            per_seed.append(statistics.fmean(v for k, v in r["final_test_map50"].items() if k != r["noisy_site"]))
        fig6[name] = (*_stats(per_seed), per_seed)
    out["fig6"] = fig6
    runs = {n: [results[f"fed:{n}:{s}"] for s in seeds] for n in ("noisy-graph", "noisy-all")}
    out["noisy_taught"] = {n: sum(r["noisy_site"] in ts for r in rs for kept in r["kept_per_round"]
                                  for ts in kept.values()) for n, rs in runs.items()}
    return out


def _rel(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f}%" if b and not math.isnan(a) and not math.isnan(b) else "-"


def _ms(stat) -> str:
    return f"{stat[0]:.3f} ± {stat[1]:.3f}" if not math.isnan(stat[0]) else "-"


def to_markdown(summary: dict, results: dict, meta: dict) -> str:
    seeds = meta["seeds"]
    lines = [f"# Reproduction of the paper's Tables 1-4 and Figures 5-8 (`{meta['preset']}` preset)", "",
             f"`{meta['command']}` on {meta['machine']}, {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min "
             f"for this invocation ({meta['job_s'] / 60:.0f} min of jobs in all, {meta['workers']} at a time). "
             f"Built-in benchmark: {meta['sites']} sites (one pair of the same kind per two sites), "
             f"{meta['imgsz']} px; federations of {meta['rounds']} rounds: round 1 of {meta['base_epochs']} local "
             f"epochs without KD (trained once per seed, shared by the variants), then {meta['epochs']} local "
             f"epochs per round with KD; seeds {', '.join(map(str, seeds))} "
             "(mean ± std over seeds of the mean over sites). Cloud model: "
             f"`{meta['cloud_arch']}` trained on the public split. The paper's numbers are VisDrone-DET/-VID with "
             "pre-training and a GPU; only directions and ratios compare. 'rel.' = change relative to the edge "
             "model in the same column.", ""]
    t1 = "## Table 1: ablation, mAP50 (images = DET, video = VID)"
    lines += [t1, "", "| model | paper DET | paper rel. | ours images | ours rel. | paper VID | paper rel. | "
              "ours video | ours rel. |", "|---|---|---|---|---|---|---|---|---|"]
    for role, name in ROWS.items():
        p, o = PAPER_T1[role], summary[role]
        pe, oe = PAPER_T1["edge"], summary["edge"]
        lines.append(f"| {name} | {p[0]:.3f} | {_rel(p[0], pe[0])} | {_ms(o['images']['map50'])} | "
                     f"{_rel(o['images']['map50'][0], oe['images']['map50'][0])} | {p[1]:.3f} | {_rel(p[1], pe[1])} | "
                     f"{_ms(o['video']['map50'])} | {_rel(o['video']['map50'][0], oe['video']['map50'][0])} |")
    if summary["merges"]:
        lines += ["", "The collaboration row uses the paper's merge: crops around the ambiguous edge boxes and "
                  "the edge's candidates (boxes below its answer threshold) are offloaded, and the cloud's box "
                  "replaces the edge boxes it overlaps (offloaded edge boxes it does not answer are dropped; the edge "
                  "runtime's default, `crops fuse+keep`, fuses and keeps them: "
                  "benchmarks/results/collaboration.md). Below, the "
                  "YOLO11n edge's collaboration offloading crops or whole "
                  "keyframes (`frame`), each under every policy of `common.routing.merge` on the same cloud answers "
                  "(`+keep`: unanswered edge boxes stay; `fuse`: overlapping edge and cloud boxes become one, "
                  "noisy-or confidence); `crops cloud` is the collaboration row:", "",
                  "| offload, merge | images mAP50 | ours rel. | video mAP50 | ours rel. | images FNR | video FNR |",
                  "|---|---|---|---|---|---|---|"]
        oe = summary["edge"]
        for name, m in summary["merges"].items():
            lines.append(f"| {name} | {_ms(m['images']['map50'])} | "
                         f"{_rel(m['images']['map50'][0], oe['images']['map50'][0])} | {_ms(m['video']['map50'])} | "
                         f"{_rel(m['video']['map50'][0], oe['video']['map50'][0])} | {_ms(m['images']['fnr'])} | "
                         f"{_ms(m['video']['fnr'])} |")
    g, lat = meta["gflops"], summary["latency_ms"]
    off = summary["offloaded_detections"][0]
    gf = {"edge": g["edge"], "pyrafan": g["pyrafan"], "cloud": g["cloud"], "collab": g["edge"] + off * g["cloud"]}
    lines += ["", "## Table 2: accuracy and speed (images)", "",
              "GFLOPs at 640 px; the collaboration's = edge + offloaded fraction of detections x cloud "
              f"({100 * off:.0f}% offloaded). FPS = 1000 / mean per-image latency on this machine (1 CPU thread "
              "per side; the collaboration's includes the cloud round trip when an image is offloaded).", "",
              "| model | paper mAP50 | paper GFLOPs | paper FPS | ours mAP50 | ours GFLOPs | ours FPS |",
              "|---|---|---|---|---|---|---|"]
    for role in ("edge", "pyrafan", "cloud", "collab"):
        p = PAPER_T2[role]
        pm = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {ROWS[role]} | {pm(p[0], '.3f')} | {pm(p[1], '.1f')} | {pm(p[2], '.0f')} | "
                     f"{_ms(summary[role]['images']['map50'])} | {gf[role]:.1f} | {1000 / lat[role][0]:.1f} |")
    for title, paper, tag in (("Table 3: images (DET)", PAPER_T3, "images"), ("Table 4: video (VID)", PAPER_T4,
                                                                              "video")):
        lines += ["", f"## {title}: confidence at which precision reaches 1.0, recall, FNR", "",
                  "| model | paper conf | ours conf | paper recall | ours recall | paper FNR | ours FNR | "
                  "FNR rel. to edge (paper / ours) |", "|---|---|---|---|---|---|---|---|"]
        for role in ("cloud", "edge", "cloud_kd", "pyrafan", "collab"):
            p, o = paper[role], summary[role][tag]
            name = "KD-trained edge model (cloud->edge)" if role == "cloud_kd" else ROWS[role]
            lines.append(f"| {name} | {p[0]:.3f} | {_ms(o['conf_p1'])} | {p[1]:.2f} | {_ms(o['recall'])} | "
                         f"{p[2]:.2f} | {_ms(o['fnr'])} | {_rel(p[2], paper['edge'][2])} / "
                         f"{_rel(o['fnr'][0], summary['edge'][tag]['fnr'][0])} |")
    lines += ["", "## Figure 5: collaborative mAP50 vs t_conf (site 0 images)", "",
              f"![Figure 5](reproduce_{meta['preset']}_fig5.png)", "",
              "| t_conf | " + " | ".join(ROWS[r] + " + cloud" for r in FIG5_ROLES) + " |",
              "|---|" + "---|" * len(FIG5_ROLES)]
    for t in summary["sweep"][FIG5_ROLES[0]]:
        lines.append(f"| {t} | " + " | ".join(_ms(summary["sweep"][r][t]) for r in FIG5_ROLES) + " |")
    f6 = summary["fig6"]
    lines += ["", "## Figure 6: distillation with similar teachers vs with a noisy teacher present", "",
              f"![Figure 6](reproduce_{meta['preset']}_fig6.png)", "",
              "Mean own-test mAP50 (Ultralytics' validator) of the regular sites; the noisy site excluded.", "",
              "| federation | paper | ours | ours rel. to no KD |", "|---|---|---|---|",
              f"| no KD | {PAPER_F6['none']:.3f} | {_ms(f6['none'])} | - |",
              f"| graph KD, similar sites only | {PAPER_F6['graph']:.3f} | {_ms(f6['graph'])} | "
              f"{_rel(f6['graph'][0], f6['none'][0])} |",
              f"| graph KD, noisy site present | - | {_ms(f6['noisy-graph'])} | "
              f"{_rel(f6['noisy-graph'][0], f6['none'][0])} |",
              f"| naive KD from every site, noisy site present | {PAPER_F6['noisy-all']:.3f} | {_ms(f6['noisy-all'])} "
              f"| {_rel(f6['noisy-all'][0], f6['none'][0])} |", "",
              f"Student-rounds in which the noisy site taught: graph {summary['noisy_taught']['noisy-graph']}, "
              f"naive {summary['noisy_taught']['noisy-all']}.", "",
              "## Figure 7: latency per image (ms, this machine)", "",
              f"![Figure 7](reproduce_{meta['preset']}_fig7.png)", "",
              "| " + " | ".join(ROWS[r] for r in lat) + " |", "|" + "---|" * len(lat),
              "| " + " | ".join(_ms(lat[r]) for r in lat) + " |", "",
              "## Figure 8: upload time vs image size", "",
              f"![Figure 8](reproduce_{meta['preset']}_fig8.png)", "",
              "JPEG (quality 90) bytes of site 0's test images resized to each size, measured; upload time from a "
              "link model, not a real network: " + "; ".join(f"{n}: RTT {v['rtt_ms']:g} ms, {v['mbit_s']:g} Mbit/s"
                                                             for n, v in LINKS.items())
              + ". Cloud inference measured on this machine (1 thread).", "",
              "| size (px) | bytes | " + " | ".join(f"upload to {n} (ms)" for n in LINKS) + " | cloud inference (ms) |",
              "|---|---|" + "---|" * len(LINKS) + "---|"]
    for size, u in results["upload"].items():
        if size == "seconds":
            continue
        lines.append(f"| {size} | {u['bytes']:.0f} | " + " | ".join(f"{u[n]:.1f}" for n in LINKS)
                     + f" | {u['cloud_infer_ms']:.1f} |")
    lines += ["", "## The paper's claims on this benchmark", "",
              "Verdict: the difference between the two sides, paired seed by seed, in the paper's direction on every "
              "seed ('yes'), on average only ('mixed') or not on average ('no').", "",
              "| claim | paper | ours | supported |", "|---|---|---|---|"]
    lines += [f"| {c} | {p} | {o} | {v} |" for c, p, o, v in claims(summary)]
    return "\n".join(lines) + "\n"


def _verdict(diffs: list[float], sign: int) -> str:
    """Whether per-seed differences (ours minus the baseline, paired by seed) go the paper's way (``sign``)."""
    diffs = [d for d in diffs if d is not None and not math.isnan(d)]
    if not diffs:
        return "not measured"
    agree = sum(d * sign > 0 for d in diffs)
    if agree == len(diffs):
        return f"yes ({agree}/{len(diffs)} seeds)"
    return f"{'mixed' if statistics.fmean(diffs) * sign > 0 else 'no'} ({agree}/{len(diffs)} seeds)"


def claims(summary: dict) -> list[tuple[str, str, str, str]]:
    """The paper's claims, each as (claim, paper, ours, verdict); the verdict pairs the two sides seed by seed."""
    out = []

    def compare(claim: str, paper: str, a: list, b: list, sign: int) -> None:
        diffs = [x - y for x, y in zip(a[2], b[2])]
        out.append((claim, paper, f"{a[0]:.3f} vs {b[0]:.3f} ({_rel(a[0], b[0])})", _verdict(diffs, sign)))

    for tag, col in (("images", 0), ("video", 1)):
        t1 = {role: summary[role][tag]["map50"] for role in ROWS}
        for role, base in (("cloud", "edge"), ("pyrafan", "edge"), ("cloud_kd", "edge"), ("graph_kd", "edge"),
                           ("both_kd", "edge"), ("collab", "cloud"), ("collab", "edge")):
            p, q = PAPER_T1[role][col], PAPER_T1[base][col]
            if p == q:  # the paper claims no direction here
                continue
            sign = 1 if p > q else -1
            compare(f"{ROWS[role]} {'>' if sign > 0 else '<'} {ROWS[base]}, mAP50 ({tag})",
                    f"{p:.3f} vs {q:.3f} ({_rel(p, q)})", t1[role], t1[base], sign)
        paper = PAPER_T3 if tag == "images" else PAPER_T4
        p, q = paper["collab"][2], paper["edge"][2]
        compare(f"collaboration FNR < edge FNR ({tag})", f"{p:.2f} vs {q:.2f} ({_rel(p, q)})",
                summary["collab"][tag]["fnr"], summary["edge"][tag]["fnr"], -1)
        best = summary["merges"][BEST_MERGE][tag]
        for base in ("cloud", "edge"):
            compare(f"collaboration ({BEST_MERGE}) > {ROWS[base]}, mAP50 ({tag})", "-", best["map50"],
                    summary[base][tag]["map50"], 1)
        compare(f"collaboration ({BEST_MERGE}) FNR < edge FNR ({tag})", "-", best["fnr"], summary["edge"][tag]["fnr"],
                -1)
    f6 = summary["fig6"]
    compare("graph KD (similar sites) > no KD (Figure 6)", f"{PAPER_F6['graph']:.3f} vs {PAPER_F6['none']:.3f}",
            f6["graph"], f6["none"], 1)
    compare("naive KD with a noisy site < no KD (Figure 6)", f"{PAPER_F6['noisy-all']:.3f} vs {PAPER_F6['none']:.3f}",
            f6["noisy-all"], f6["none"], -1)
    compare("graph KD with a noisy site > naive KD with it (Figure 6)", "-", f6["noisy-graph"], f6["noisy-all"], 1)
    taught = summary["noisy_taught"]
    out.append(("graph-guided selection never makes the noisy site a teacher", "yes",
                f"taught {taught['noisy-graph']} student-rounds (naive: {taught['noisy-all']})",
                "yes" if taught["noisy-graph"] == 0 else "no"))
    lat = summary["latency_ms"]
    out.append(("collaboration latency < cloud alone (Figure 7)", "-", f"{lat['collab'][0]:.1f} vs "
                f"{lat['cloud'][0]:.1f} ms", "yes (means)" if lat["collab"][0] < lat["cloud"][0] else "no (means)"))
    return out


def plot(summary: dict, results: dict, preset: str, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, n):
        fig.tight_layout()
        fig.savefig(out_dir / f"reproduce_{preset}_fig{n}.png", dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for role in FIG5_ROLES:
        ts = list(summary["sweep"][role])
        ax.errorbar([float(t) for t in ts], [summary["sweep"][role][t][0] for t in ts],
                    yerr=[summary["sweep"][role][t][1] for t in ts], marker="o", capsize=3, label=ROWS[role])
    ax.set_xlabel("t_conf"), ax.set_ylabel("collaborative mAP50"), ax.legend(), ax.set_title("Figure 5")
    save(fig, 5)
    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["none", "graph", "noisy-graph", "noisy-all"]
    f6 = summary["fig6"]
    ax.bar(names, [f6[n][0] for n in names], yerr=[f6[n][1] for n in names], capsize=4)
    ax.set_ylabel("mean own-test mAP50 (regular sites)"), ax.set_title("Figure 6")
    save(fig, 6)
    fig, ax = plt.subplots(figsize=(6, 4))
    lat = summary["latency_ms"]
    ax.bar([ROWS[r] for r in lat], [lat[r][0] for r in lat], yerr=[lat[r][1] for r in lat], capsize=4)
    ax.set_ylabel("ms per image"), ax.set_title("Figure 7"), ax.tick_params(axis="x", labelsize=7)
    save(fig, 7)
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [s for s in results["upload"] if s != "seconds"]
    for name in LINKS:
        ax.plot([int(s) for s in sizes], [results["upload"][s][name] for s in sizes], marker="o",
                label=f"upload to {name}")
    ax.plot([int(s) for s in sizes], [results["upload"][s]["cloud_infer_ms"] for s in sizes], marker="s",
            label="cloud inference")
    ax.set_xlabel("image size (px)"), ax.set_ylabel("ms"), ax.legend(fontsize=7), ax.set_title("Figure 8")
    save(fig, 8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (e.g. reproduce.seeds=[0,1])")
    ap.add_argument("--work", type=Path, default=None,
                    help="models, runs and the job cache (default $CEDAR_HOME/reproduce/<preset>)")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default benchmarks/results)")
    ap.add_argument("--report-only", action="store_true",
                    help="only write the markdown and plots again from the report's .json (no job runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out_dir = args.out or RESULTS
    stem = out_dir / f"reproduce_{args.preset}"
    if args.report_only:
        report = json.loads(stem.with_suffix(".json").read_text())
        plot(report["summary"], report["jobs"], args.preset, out_dir)
        write_report(stem, report, to_markdown(report["summary"], report["jobs"], report["meta"]))
        return 0

    from common import yolo
    from common.config import parse_value

    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    work = args.work or yolo.CEDAR_HOME / "reproduce" / args.preset
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, _ = job_config(args.preset, overrides)
    t0 = time.perf_counter()
    results, _ = run_all(args.preset, overrides, work)
    summary = summarise(results, cfg)
    r = cfg.reproduce
    meta = {"preset": args.preset, "command": "python -m benchmarks.reproduce " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": f"{cpu_model_name()}, {os.cpu_count()} CPU cores",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - t0,
        "job_s": sum(v["seconds"] for v in results.values()), "workers": r.workers, "seeds": r.seeds,
        "sites": cfg.data.num_sites, "imgsz": cfg.train.imgsz, "rounds": r.num_rounds, "epochs": r.epochs_per_round,
        "base_epochs": r.base_epochs,
        "cloud_arch": cfg.model.cloud, "gflops": results["speed"]["gflops_640"]}
    plot(summary, results, args.preset, out_dir)
    write_report(stem, {"meta": meta, "summary": summary, "jobs": results},
                 to_markdown(summary, results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
