"""Cloud-edge collaborative inference, measured end to end (paper sections 4.1-4.2, Tables 1/3/4, Figure 5).

Real parts: the cloud detection service runs as its own process (``python -m
server.cloud``) on loopback; the edge side is the edge runtime's own pipeline
(:class:`clients.edge.EdgeRuntime`: keyframes, tracks, ambiguity routing,
JPEG offload through the disk queue and :class:`clients.offload.CloudClient`,
merge). Edge and cloud get one CPU thread each on the same machine.

Models
    *Edge*: the ``standard``-preset models that ``benchmarks.pyrafan_accuracy``
    trains on one site (kept under ``$CEDAR_HOME/models``; trained here with the
    same budget when missing). *Cloud*: ``model.cloud`` (YOLO11s) trained on the
    benchmark's public train split (the cloud never sees a site's private data)
    for the same number of iterations as an edge model; cached likewise.

Data
    The site's test images (every image is a keyframe: ``max_gap=1``) and the
    site's video (90 frames with per-frame labels, a still stretch and a cut).

Metrics (all at the operating points: edge ``routing.det_conf``, cloud ``--conf``)
    mAP50: Ultralytics' 101-point AP over the detections each variant outputs,
    class-aware, IoU 0.5 (:func:`common.detections.score`);
    recall and FNR = 1 - recall: ground truth matched class-aware at IoU 0.5;
    offload: fraction of keyframes with an upload and of edge detections routed
    to the cloud; bytes: JPEG payload per frame; latency per frame: edge =
    keyframe detection, collaborative = edge + cloud round trip when the frame
    was offloaded (the refined answer), cloud only = JPEG encode + round trip of
    the whole frame. A non-keyframe reuses its keyframe's detections (and, in
    the collaboration, its refined answer).

Run (standard preset; trains what is missing, then ~10 min)::

    python -m benchmarks.collaboration --preset standard

``--sliced-seeds 0 2`` repeats the sliced-inference comparison (edge alone, SAHI slicing, crops fuse+keep;
images and video) with the main edge model of those seeds too, against the same cloud model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.pyrafan_accuracy import read_split, weights_path
from benchmarks.harness import cpu_model_name, shown, write_report
from common.config import RoutingConfig
from common.detections import labels_to_pixels, read_yolo_labels, score

log = logging.getLogger("benchmarks.collaboration")
RESULTS = Path(__file__).resolve().parent / "results" / "collaboration"
EDGE_MODELS = ("yolo11n", "yolo11n-p2", "yolo11n-pyrafan")


# --------------------------------------------------------------------------- models


def edge_model(cfg, bench, arch: str, site: int, seed: int) -> Path:
    """The site's trained edge model (the PyraFAN accuracy benchmark's file, trained here if missing)."""
    epochs = cfg.train.epochs_per_round * cfg.federation.num_rounds
    path = weights_path(arch, site, seed, epochs, cfg.preset)
    if not path.is_file():
        from benchmarks.pyrafan_accuracy import run_one

        log.info("training edge model %s site %d seed %d (%d epochs)", arch, site, seed, epochs)
        run_one(arch, site, seed, bench, cfg, epochs)
    return path


def cloud_model(cfg, bench, seed: int, iters_factor: float = 1.0, edge_epochs: int | None = None) -> Path:
    """``model.cloud`` trained on the public train split for ``iters_factor`` times an edge model's iterations
    (``edge_epochs`` local epochs; default the federation's rounds x epochs per round)."""
    import yaml

    from common import yolo
    from common.benchmark import CLASS_NAMES

    t = cfg.train
    edge_epochs = edge_epochs or t.epochs_per_round * cfg.federation.num_rounds
    edge_iters = edge_epochs * math.ceil(cfg.data.train_per_site / t.batch)
    spec = yaml.safe_load(bench.public_data.read_text())
    n_train = len(list((Path(spec["path"]) / spec["train"]).glob("*.png")))
    epochs = math.ceil(iters_factor * edge_iters / math.ceil(n_train / t.batch))
    path = yolo.CEDAR_HOME / "models" / f"{cfg.preset}-cloud-{cfg.model.cloud}-public-seed{seed}-{epochs}ep.pt"
    if path.is_file():
        return path
    import torch

    torch.set_num_threads(t.threads)
    model = yolo.build_model(cfg.model.cloud, nc=len(CLASS_NAMES), seed=seed, names=list(CLASS_NAMES))
    log.info("training the cloud model %s on %d public images, %d epochs", cfg.model.cloud, n_train, epochs)
    res = yolo.train(model, bench.public_data, epochs=epochs, imgsz=t.imgsz, batch=t.batch, lr0=t.lr0,
                     weight_decay=t.weight_decay, warmup_iters=t.warmup_iters, mosaic=t.mosaic, workers=t.workers,
                     seed=seed, device=t.device, desc=f"cloud {cfg.model.cloud}")
    return yolo.save_weights(model, path, epochs=epochs, iterations=res.iterations, train_s=res.seconds)


# --------------------------------------------------------------------------- the cloud service


@contextmanager
def cloud_service(weights: Path, workdir: Path, *, imgsz: int, conf: float, iou: float, threads: int = 1,
                  crop_zoom: float | None = None):
    """``python -m server.cloud`` on a free loopback port; yields ``(url, token)``; always stopped.

    ``crop_zoom``: the service's ``--crop-zoom`` (None: its default, ``routing.crop_zoom``)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CEDAR_CLOUD_TOKEN": token}
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "cloud.log"
    args = [sys.executable, "-m", "server.cloud", "--weights", str(weights), "--port", str(port),
            "--store", str(workdir / "store"), "--imgsz", str(imgsz), "--conf", str(conf), "--iou", str(iou),
            "--log-level", "warning", *(["--crop-zoom", str(crop_zoom)] if crop_zoom is not None else [])]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the cloud service did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- runs


def run_edge(weights: Path, source: Path, settings, client, workdir: Path, *, imgsz: int, conf: float,
             iou: float) -> list[dict]:
    """The edge runtime over ``source``; its JSON lines (edge, refined, failed, summary)."""
    from clients.detector import EdgeModel
    from clients.edge import EdgeRuntime
    from clients.media import FrameSource

    out = workdir / f"{settings.run_id}.jsonl"
    model = EdgeModel(weights, imgsz=imgsz, conf=conf, iou=iou, reload_every=1e9)
    runtime = EdgeRuntime(model, client, settings, queue_dir=workdir / f"queue-{settings.run_id}", out=out)
    frames = FrameSource(source)
    try:
        runtime.run(frames)
    finally:
        frames.close()
    return [json.loads(line) for line in out.read_text().splitlines()]


def cloud_only(source: Path, client, site: str, quality: int = 90) -> tuple[list, list[float], list[int], list[int]]:
    """Every frame whole to ``/detect``: detections, per-frame latency (encode + round trip), JPEG bytes,
    HTTP body bytes."""
    from clients.media import FrameSource
    from clients.offload import OffloadEntry
    from common.offload import encode_regions

    dets, ms, sizes, wire = [], [], [], []
    frames = FrameSource(source)
    for frame in frames:
        t0 = time.perf_counter()
        h, w = frame.image.shape[:2]
        payloads = encode_regions(frame.image, [[0, 0, w, h]], quality=quality)
        entry = OffloadEntry(id=f"{site}.cloud.{frame.index:06d}", site=site, run="cloud", frame=frame.index,
                             mode="frame", created=frame.time, model="-", pts_s=frame.pts_s, image_shape=[h, w],
                             regions=[[0, 0, w, h]], edge=[], offloaded=[], payloads=payloads)
        answer = client.send(entry)
        ms.append((time.perf_counter() - t0) * 1000)
        sizes.append(entry.payload_bytes)
        wire.append(answer.request_bytes)
        dets.append(answer.detections)
    frames.close()
    return dets, ms, sizes, wire


# merge policies scored offline on the same cloud answers (name -> clients.collab.CollabSettings fields); the
# runtime's own refined lines here use the first ("cloud" wins, offloaded unanswered edge boxes dropped)
MERGES = {"cloud": {"merge": "cloud", "keep_unanswered": False},
          "cloud+keep": {"merge": "cloud", "keep_unanswered": True},
          "fuse": {"merge": "fuse", "keep_unanswered": False},
          "fuse+keep": {"merge": "fuse", "keep_unanswered": True}}


def remerged(records: list[dict], **policy) -> list[dict]:
    """The records with each refined answer (``refined`` and ``carried`` lines) merged again from its
    ``cloud_detections`` and its edge boxes and candidates by :func:`clients.collab.merge_answer` under
    ``policy`` (:class:`clients.collab.CollabSettings` fields, e.g. ``merge="fuse", keep_unanswered=True``;
    the others at their defaults)."""
    from clients.collab import CollabSettings, merge_answer
    from common.detections import Detections

    settings = CollabSettings(**{"merge": "cloud", "keep_unanswered": False, **policy})
    edge = {r["frame"]: r for r in records if r["kind"] == "edge"}
    out = []
    for r in records:
        if r["kind"] in ("refined", "carried"):  # the keyframe's answer and its candidates (moved, when carried)
            key = r["edge_detections"] if r["kind"] == "carried" else \
                edge[r["frame"]]["detections"] + edge[r["frame"]].get("candidates", [])
            final, _ = merge_answer(key, Detections.from_list(r["cloud_detections"]), settings)
            r = {**r, "detections": final.to_list()}
        out.append(r)
    return out


def sliced_run(weights: Path, source: Path, gts: list[np.ndarray], settings, *, imgsz: int, iou: float,
               slice_frac: float, overlap: float, nc: int, small_px: float) -> dict:
    """The site's edge model alone on every frame of ``source`` by sliced inference (:func:`clients.sliced.
    sliced_detect`: tiles of ``slice_frac`` of the frame's shorter side, ``overlap``, plus the whole frame), at the
    answer threshold the runtime would use for it (its calibrated ``det_conf``): scores and edge ms per frame."""
    from clients.detector import TorchPredictor
    from clients.media import FrameSource
    from clients.sliced import sahi_model, sliced_detect
    from common import yolo

    model = yolo.load_weights(weights)
    conf = settings.for_model(getattr(model, "cedar_meta", None)).det_conf
    predictor = TorchPredictor(model, imgsz=imgsz, conf=conf, iou=iou)
    sahi = sahi_model(predictor, conf)
    dets, ms = [], []
    frames = FrameSource(source)
    try:
        for frame in frames:
            side = max(1, round(slice_frac * min(frame.image.shape[:2])))
            t0 = time.perf_counter()
            dets.append(sliced_detect(predictor, frame.image, slice_px=side, overlap=overlap, model=sahi))
            ms.append((time.perf_counter() - t0) * 1000)
    finally:
        frames.close()
    return {**score(dets, gts, nc, small_px), "edge_ms": float(np.mean(ms)), "det_conf": conf,
            "slice_frac": slice_frac, "overlap": overlap}


def per_frame(records: list[dict], collaborative: bool) -> list:
    """Final detections per frame: with ``collaborative``, a keyframe's ``refined`` answer or, on a later
    frame, that answer ``carried`` there (:class:`clients.carry.RefinedCarrier`); else (or when neither came)
    the frame's ``edge`` line."""
    from common.detections import Detections

    failed = [r for r in records if r["kind"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} offloads refused by the cloud, e.g. {failed[0]['error']}")
    refined = {r["frame"]: r for r in records if r["kind"] in ("refined", "carried")} if collaborative else {}
    edge = sorted((r for r in records if r["kind"] == "edge"), key=lambda r: r["frame"])
    return [Detections.from_list(refined.get(r["frame"], r)["detections"]) for r in edge]


def offload_figures(records: list[dict]) -> dict:
    edge = [r for r in records if r["kind"] == "edge"]
    keys = [r for r in edge if r["keyframe"]]
    refined = {r["frame"]: r for r in records if r["kind"] == "refined"}
    n_det = sum(len(r["detections"]) for r in keys)
    n_off = sum(r["offload"]["detections"] for r in keys if r["offload"])
    edge_ms = [r["latency_ms"]["edge"] for r in keys]
    collab_ms = [r["latency_ms"]["edge"] + (refined[r["frame"]]["latency_ms"]["cloud_rtt"]
                                           if r["frame"] in refined else 0.0) for r in keys]
    rtt = sum(r["latency_ms"]["cloud_rtt"] for r in refined.values())
    total = sum(r["latency_ms"]["total"] for r in edge)
    return {"frames": len(edge), "keyframes": len(keys), "keyframe_fraction": len(keys) / len(edge),
            # per frame, over all frames: time to the edge line; and that plus the cloud round trips it caused
            "first_ms": total / len(edge), "frame_ms": (total + rtt) / len(edge),
            "offloaded_keyframes": sum(1 for r in keys if r["offload"]) / len(keys),
            "offloaded_detections": n_off / n_det if n_det else 0.0,
            "bytes_per_frame": sum(r["offload"]["bytes"] for r in keys if r["offload"]) / len(edge),
            "request_bytes_per_frame": sum(r["request_bytes"] for r in refined.values()) / len(edge),
            "edge_ms": float(np.mean(edge_ms)), "collab_ms": float(np.mean(collab_ms)),
            "delivered": len(refined)}


def separate_crop_bytes(records: list[dict], source: Path, quality: int = 90) -> float:
    """Bytes per frame had each crop of the run's offloads been its own JPEG (``--separate-crops``)."""
    from clients.media import FrameSource
    from common.offload import encode_regions, payload_bytes

    regions = {r["frame"]: r["offload"]["regions"] for r in records if r["kind"] == "edge" and r["offload"]}
    frames, total, n = FrameSource(source), 0, 0
    for frame in frames:
        n += 1
        if frame.index in regions:
            total += payload_bytes(encode_regions(frame.image, regions[frame.index], quality=quality))
    frames.close()
    return total / max(n, 1)


def site_test_data(bench, site: int) -> tuple[Path, list[np.ndarray], Path, list[np.ndarray]]:
    """A site's test images folder and their boxes, and its video folder and every frame's boxes (pixel rows)."""
    images_dir = bench.site_dir(site) / "images" / "test"
    _, image_gts = read_split(bench.site_dir(site), "test")
    video_dir = bench.video_dir(site)
    meta = json.loads((video_dir / "meta.json").read_text())
    n, size = meta["frames"], meta["imgsz"]
    video_gts = [labels_to_pixels(read_yolo_labels(video_dir / "labels" / f"{i:06d}.txt"), size, size)
                 for i in range(n)]
    return images_dir, image_gts, video_dir, video_gts


# --------------------------------------------------------------------------- the experiment


def measure(args, cfg, bench, workdir: Path, site: int) -> dict:
    """Every table's numbers for one site (its own edge models, the shared cloud model)."""
    import torch

    from clients.edge import EdgeSettings
    from clients.offload import CloudClient
    from common.benchmark import CLASS_NAMES

    torch.set_num_threads(1)
    workdir = workdir / f"site-{site}"
    workdir.mkdir()
    nc, small_px, r = len(CLASS_NAMES), cfg.eval.small_px, cfg.routing
    site_id = f"site-{site}"
    images_dir, image_gts, video_dir, video_gts = site_test_data(bench, site)
    archs = args.edge_models if site == args.sites[0] else args.edge_models[:1]  # the others: first site only
    edges = {arch: edge_model(cfg, bench, arch, site, args.seed) for arch in archs}
    cloud = cloud_model(cfg, bench, args.seed, args.cloud_iters)
    # with candidates the edge detects down to routing.candidate_conf; its answer stays at det_conf
    base = EdgeSettings.from_config(r, site=site_id, drain_timeout=600,
                                    keep_unanswered=False, merge="cloud")  # the paper's merge; MERGES gives the others
    kw = dict(imgsz=cfg.train.imgsz, conf=base.detector_conf, iou=cfg.eval.iou)
    main_arch = args.edge_models[0]
    result: dict = {"edge_weights": {a: shown(p) for a, p in edges.items()}, "cloud_weights": shown(cloud)}
    from common import yolo

    # each model's own quality on the test split (PNG, Ultralytics' validator at conf 0.001): context for the rest
    result["validator_map50"] = {
        name: yolo.evaluate(yolo.load_weights(path), bench.site_data(site), split="test", imgsz=cfg.train.imgsz,
                            batch=cfg.eval.batch, conf=cfg.eval.conf, iou=cfg.eval.iou).map50
        for name, path in {**edges, "cloud": cloud}.items()}
    serve = dict(imgsz=cfg.train.imgsz, conf=args.cloud_conf, iou=cfg.eval.iou)
    with cloud_service(cloud, workdir, crop_zoom=args.crop_zoom, **serve) as (url, tok):
        client = CloudClient(url, tok, site_id, timeout=120)
        try:
            # warm both sides up (first calls build the predictors)
            run_edge(edges[main_arch], images_dir, replace(base, run_id="warmup", max_gap=1, t_conf=1.0), client,
                     workdir, **kw)

            def images_run(arch: str, t_conf: float, offload: str, tag: str, cloud_client=client,
                           weights: Path | None = None) -> dict:
                # a run id is an offload id prefix: never reuse one (the queue would skip "delivered" ids)
                rid = f"{tag}-{arch}-{offload}-{int(round(t_conf * 100))}"
                recs = run_edge(weights or edges[arch], images_dir, replace(base, run_id=rid, max_gap=1, t_conf=t_conf,
                                                                 offload=offload), cloud_client, workdir, **kw)
                separate = {"separate_bytes_per_frame": separate_crop_bytes(recs, images_dir)} \
                    if offload == "crops" else {}
                return {**separate, "edge": score(per_frame(recs, False), image_gts, nc, small_px),
                        "collab": score(per_frame(recs, True), image_gts, nc, small_px),
                        "merges": {name: score(per_frame(remerged(recs, **m), True), image_gts, nc, small_px)
                                   for name, m in MERGES.items()}, **offload_figures(recs)}

            def video_run(arch: str, offload: str, every_frame: bool, weights: Path | None = None,
                          tag: str = "vid") -> dict:
                rid = f"{tag}-{arch}-{offload}-{'all' if every_frame else 'key'}"
                settings = replace(base, run_id=rid, offload=offload, max_gap=1 if every_frame else args.max_gap)
                recs = run_edge(weights or edges[arch], video_dir / "video.mp4", settings, client, workdir, **kw)
                return {"edge": score(per_frame(recs, False), video_gts, nc, small_px),
                        "collab": score(per_frame(recs, True), video_gts, nc, small_px),
                        "merges": {name: score(per_frame(remerged(recs, **m), True), video_gts, nc, small_px)
                                   for name, m in MERGES.items()}, **offload_figures(recs)}

            for key, source, gts in (("images_cloud", images_dir, image_gts),
                                     ("video_cloud", video_dir / "video.mp4", video_gts)):
                dets, ms, sizes, wire = cloud_only(source, client, site_id)
                result[key] = {**score(dets, gts, nc, small_px), "ms": float(np.mean(ms)),
                               "bytes_per_frame": float(np.mean(sizes)),
                               "request_bytes_per_frame": float(np.mean(wire))}
            result["images"] = {mode: images_run(main_arch, r.t_conf, mode, "img") for mode in ("crops", "frame")}
            sliced = dict(settings=base, imgsz=cfg.train.imgsz, iou=cfg.eval.iou, slice_frac=args.slice_frac,
                          overlap=args.slice_overlap, nc=nc, small_px=small_px)
            result["sliced"] = {"images": sliced_run(edges[main_arch], images_dir, image_gts, **sliced),
                                "video": sliced_run(edges[main_arch], video_dir / "video.mp4", video_gts, **sliced)}
            result["video"] = {f"{mode}-{'all' if every else 'key'}": video_run(main_arch, mode, every)
                               for mode in ("crops", "frame") for every in (False, True)}
            # the sliced comparison again with the main edge model of other seeds (the same cloud)
            result["seeds"] = {str(args.seed): {"images": {"crops": result["images"]["crops"]},
                                                "video": {"crops-all": result["video"]["crops-all"]},
                                                "sliced": result["sliced"]}}
            for seed in (s for s in args.sliced_seeds if str(s) not in result["seeds"]):
                w = edge_model(cfg, bench, main_arch, site, seed)
                result["seeds"][str(seed)] = {
                    "edge_weights": shown(w),
                    "images": {"crops": images_run(main_arch, r.t_conf, "crops", f"seed{seed}", weights=w)},
                    "video": {"crops-all": video_run(main_arch, "crops", True, weights=w, tag=f"vid{seed}")},
                    "sliced": {"images": sliced_run(w, images_dir, image_gts, **sliced),
                               "video": sliced_run(w, video_dir / "video.mp4", video_gts, **sliced)}}
            result["sweep"] = {arch: {str(t): images_run(arch, t, "crops", "sweep") for t in args.t_conf_sweep}
                               for arch in archs}
        finally:
            client.close()
    # crops detected by the cloud at other zooms (a fresh service each): what the cloud's compute buys
    result["zoom"] = {f"{args.crop_zoom:g}": result["images"]["crops"]}
    for zoom in args.zoom_sweep:
        if f"{zoom:g}" in result["zoom"]:
            continue
        with cloud_service(cloud, workdir / f"zoom-{zoom:g}", crop_zoom=zoom, **serve) as (url, tok):
            zoomed = CloudClient(url, tok, site_id, timeout=120)
            try:
                result["zoom"][f"{zoom:g}"] = images_run(main_arch, r.t_conf, "crops", f"zoom{round(100 * zoom)}",
                                                         zoomed)
            finally:
                zoomed.close()
    # keyframe rules on the video, edge only (no cloud): how many frames each drops and what it costs
    result["keyframes"] = {}
    rules = [(b, None) for b in args.beta_sweep] + [(1.5, g) for g in (*args.gap_sweep, 1)]
    for (beta, gap), flow in [(r, False) for r in rules] + [(r, True) for r in rules if r[1] != 1]:
        settings = replace(base, run_id=f"kf-{int(beta * 100)}-{gap or 0}{'-flow' if flow else ''}", beta=beta,
                           max_gap=gap, propagate=flow)
        recs = run_edge(edges[main_arch], video_dir / "video.mp4", settings, NullCloud(), workdir, **kw)
        result["keyframes"][f"{beta:g}/{gap or '-'}{'/flow' if flow else ''}"] = {
            "beta": beta, "max_gap": gap, "propagate": flow, **score(per_frame(recs, False), video_gts, nc, small_px),
            "keyframe_fraction": offload_figures(recs)["keyframe_fraction"]}
    return result


class NullCloud:
    """A cloud that answers at once with nothing (for edge-only runs of the runtime)."""

    def send(self, entry):
        from clients.offload import CloudAnswer
        from common.detections import Detections

        return CloudAnswer(Detections.empty(), 0.0)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- report


def _rel(ours: float, base: float) -> str:
    return f"{100 * (ours - base) / base:+.1f}%" if base else "-"


def to_markdown(res: dict, settings: dict) -> str:
    """The report: the sites side by side (when more than one), then the first site in detail."""
    sites = [str(s) for s in settings["sites"]]
    lines = ["# Cloud-edge collaborative inference on the built-in benchmark", "",
             f"`python -m benchmarks.collaboration {settings['argv']}`, {settings['date']}, {settings['machine']}; "
             f"wall time {settings['wall_s']:.0f} s.", ""]
    if len(sites) > 1:
        lines += summary_markdown(res, settings)
    lines += sliced_markdown(res["sites"], settings)
    return "\n".join(lines + site_markdown(res["sites"][sites[0]], settings, sites[0]))


def sliced_row(r: dict) -> list[float]:
    """One site and seed's sliced-comparison figures, in the order of the report's columns."""
    img, vid, sl = r["images"]["crops"], r["video"]["crops-all"], r["sliced"]
    fused, vfused = img["merges"]["fuse+keep"], vid["merges"]["fuse+keep"]
    return [img["edge"]["map50"], sl["images"]["map50"], fused["map50"], img["edge"]["fnr"], sl["images"]["fnr"],
            fused["fnr"], img["edge_ms"], sl["images"]["edge_ms"], img["collab_ms"], vid["edge"]["map50"],
            sl["video"]["map50"], vfused["map50"]]


def sliced_markdown(per: dict, settings: dict) -> list[str]:
    """Sliced inference at the edge (no cloud) beside the edge alone and the crops collaboration (fuse+keep),
    for every seed of the edge model measured (``--sliced-seeds``): a site's row is the mean over its seeds, the
    sd row the spread over seeds of the mean over sites, and a claim counts (site, seed) runs."""
    per = {site: r for site, r in per.items() if "sliced" in r}
    if not per:
        return []
    runs = {site: {seed: sliced_row(x) for seed, x in r.get("seeds", {str(settings["seed"]): r}).items()}
            for site, r in per.items()}
    seeds = sorted({seed for v in runs.values() for seed in v}, key=int)
    lines = ["## Sliced inference at the edge (SAHI, no cloud) against the collaboration", "",
             f"`clients.sliced`: SAHI's sliced prediction with the site's own edge model on every frame, tiles of "
             f"{settings['slice_frac']:g} x the frame's shorter side at {settings['slice_overlap']:g} overlap plus "
             "the whole frame, merged by SAHI's greedy NMM (IOS 0.5), at the model's answer threshold. Edge ms: the "
             "edge's detection per frame (sliced: all tiles and the merge; collab.: plus the cloud round trip). "
             f"Edge models of seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} (a site's row: the mean over "
             f"them), one cloud model (seed {settings['seed']}).", "",
             "| site | images mAP50: edge | sliced | crops, fuse+keep | FNR: edge | sliced | crops, fuse+keep | "
             "edge ms / image: edge | sliced | collab. | video (every frame) mAP50: edge | sliced | "
             "crops, fuse+keep |", "|---|" + "---|" * 12]
    rows = {site: list(np.mean(list(v.values()), axis=0)) for site, v in runs.items()}
    mean = list(np.mean(list(rows.values()), axis=0))
    table = [*rows.items(), ("mean", mean)]
    if len(seeds) > 1:
        per_seed = [np.mean([v[seed] for v in runs.values() if seed in v], axis=0) for seed in seeds]
        table.append(("sd over seeds", list(np.std(per_seed, axis=0, ddof=1))))
    for site, v in table:
        lines.append(f"| {site} | " + " | ".join(f"{x:.3f}" for x in v[:6]) + " | "
                     + " | ".join(f"{x:.1f}" for x in v[6:9]) + " | " + " | ".join(f"{x:.3f}" for x in v[9:]) + " |")
    every = [v for site_runs in runs.values() for v in site_runs.values()]
    won = sum(v[2] > v[1] for v in every)
    won_video = sum(v[11] > v[10] for v in every)
    lines += ["", "| claim | runs (site x seed) where it holds | mean |", "|---|---|---|",
              f"| crops, fuse+keep beats slicing at the edge (images mAP50) | {won}/{len(every)} | {mean[2]:.3f} vs "
              f"{mean[1]:.3f} ({_rel(mean[2], mean[1])}) |",
              f"| crops, fuse+keep beats slicing at the edge (video mAP50) | {won_video}/{len(every)} | "
              f"{mean[11]:.3f} vs {mean[10]:.3f} ({_rel(mean[11], mean[10])}) |",
              f"| slicing's edge time per image over the edge alone's | - | {mean[7] / mean[6]:.1f}x |", ""]
    return lines


SUMMARY = (("crops, merge cloud (paper)", "crops", "cloud"), ("crops, fuse+keep", "crops", "fuse+keep"),
           ("frame, fuse+keep", "frame", "fuse+keep"))


def keyframe_cost(key: dict, every: dict) -> dict[str, float]:
    """Fraction of the video's frames the keyframe selector drops (``key`` run vs ``every`` frame detected),
    and what it costs in mAP50 points: edge alone, the runtime's own merge, and fuse+keep."""
    def points(x: dict, y: dict) -> float:
        return 100 * (y["map50"] - x["map50"])

    return {"dropped": 1 - key["keyframe_fraction"], "edge": points(key["edge"], every["edge"]),
            "collab": points(key["collab"], every["collab"]),
            "fused": points(key["merges"]["fuse+keep"], every["merges"]["fuse+keep"])}


def summary_markdown(res: dict, settings: dict) -> list[str]:
    """Per site and on average: edge, cloud and the collaborations' mAP50 and FNR, upload bytes, crop zooms."""
    per = res["sites"]
    z = settings.get("crop_zoom", 1.0)
    lines = [f"## Every site (sites {', '.join(per)}; one cloud; crops detected at {z:g}x by the cloud)", "",
             "| site | edge | cloud | " + " | ".join(n for n, _, _ in SUMMARY) + " | FNR edge | FNR "
             + " | FNR ".join(n for n, _, _ in SUMMARY) + " | crop bytes / frame bytes (atlas) | "
             "(one JPEG per crop) | (HTTP bodies, atlas) |",
             "|---|---|---|" + "---|" * (2 * len(SUMMARY) + 4)]
    rows = {}
    for site, r in per.items():
        img = r["images"]
        vals = [img["crops"]["edge"], r["images_cloud"], *(img[mode]["merges"][m] for _, mode, m in SUMMARY)]
        frame_bytes = max(img["frame"]["bytes_per_frame"], 1)
        shares = [img["crops"][k] / frame_bytes if k in img["crops"] else float("nan")
                  for k in ("bytes_per_frame", "separate_bytes_per_frame")]
        shares.append(img["crops"].get("request_bytes_per_frame", float("nan"))
                      / max(img["frame"].get("request_bytes_per_frame", 0), 1))
        rows[site] = ([v["map50"] for v in vals], [vals[0]["fnr"], *(v["fnr"] for v in vals[2:])], shares)
    for site, (maps, fnrs, shares) in [*rows.items(), ("mean", tuple(
            np.mean([row[i] for row in rows.values()], axis=0) for i in range(3)))]:
        lines.append(f"| {site} | " + " | ".join(f"{m:.3f}" for m in maps) + " | "
                     + " | ".join(f"{f:.3f}" for f in fnrs) + " | " + " | ".join(f"{100 * x:.0f}%" for x in shares)
                     + " |")
    lines += ["", f"Video (keyframes only, {keyframe_rule(settings)}; a non-keyframe gets its keyframe's answer "
              "moved by optical flow), mAP50: edge, cloud on every frame, and the collaborations; then ms per video "
              "frame (over all frames: the edge pipeline plus the cloud round trips of its offloads; cloud alone: "
              "encode + round trip of every frame):", "",
              "| site | edge | cloud | " + " | ".join(n for n, _, _ in SUMMARY) + " | ms / frame: cloud alone | "
              "crops collab. | frame collab. | frames dropped | mAP50 cost of the keyframes (points): edge | "
              "crops, fuse+keep |", "|---|---|---|" + "---|" * (len(SUMMARY) + 6)]
    video = {site: [r["video"]["crops-key"]["edge"]["map50"], r["video_cloud"]["map50"],
                    *(r["video"][f"{mode}-key"]["merges"][m]["map50"] for _, mode, m in SUMMARY)]
             for site, r in per.items() if "merges" in r["video"]["crops-key"]}
    timing = {site: {"cloud_ms": per[site]["video_cloud"]["ms"],
                     **{f"{mode}_ms": per[site]["video"][f"{mode}-key"].get("frame_ms", np.nan)
                        for mode in ("crops", "frame")},
                     **keyframe_cost(per[site]["video"]["crops-key"], per[site]["video"]["crops-all"])}
              for site in video}
    if video:
        video["mean"] = list(np.mean(list(video.values()), axis=0))
        timing["mean"] = {k: float(np.mean([t[k] for t in timing.values()])) for k in next(iter(timing.values()))}
    for site, maps in video.items():
        t = timing[site]
        lines.append(f"| {site} | " + " | ".join(f"{m:.3f}" for m in maps) + f" | {t['cloud_ms']:.1f} | "
                     f"{t['crops_ms']:.1f} | {t['frame_ms']:.1f} | {100 * t['dropped']:.0f}% | {t['edge']:+.1f} | "
                     f"{t['fused']:+.1f} |")
    sites = [site for site in video if site != "mean"]
    lines += ["", "| claim (mAP50 at the operating points; images unless named) | sites where it holds | mean |",
              "|---|---|---|"]
    for i, (name, _, _) in enumerate(SUMMARY):
        both = [max(m[0], m[1]) for m, _, _ in rows.values()]
        coll = [m[2 + i] for m, _, _ in rows.values()]
        fnr_e, fnr_c = [f[0] for _, f, _ in rows.values()], [f[1 + i] for _, f, _ in rows.values()]
        lines += [f"| {name} > both edge and cloud alone | {sum(c > b for c, b in zip(coll, both))}/{len(both)} | "
                  f"{np.mean(coll):.3f} vs best alone {np.mean(both):.3f} ({_rel(np.mean(coll), np.mean(both))}) |",
                  f"| {name}: FNR >= 19.56% below the edge's | "
                  f"{sum(c <= 0.8044 * e for c, e in zip(fnr_c, fnr_e))}/{len(fnr_e)} | "
                  f"{np.mean(fnr_c):.3f} vs {np.mean(fnr_e):.3f} ({_rel(np.mean(fnr_c), np.mean(fnr_e))}) |"]
        if video:
            best, coll = [max(video[s][0], video[s][1]) for s in sites], [video[s][2 + i] for s in sites]
            lines.append(f"| {name} > both edge and cloud alone (video) | "
                         f"{sum(c > b for c, b in zip(coll, best))}/{len(best)} | {np.mean(coll):.3f} vs best alone "
                         f"{np.mean(best):.3f} ({_rel(np.mean(coll), np.mean(best))}) |")
    if video:
        t, mean = [timing[s] for s in sites], timing["mean"]
        lines.append(f"| keyframes (>= 50% of frames dropped) cost crops, fuse+keep <= 1 point of mAP50 | "
                     f"{sum(x['fused'] <= 1 and x['dropped'] >= 0.5 for x in t)}/{len(t)} | "
                     f"{mean['fused']:+.1f} points, {100 * mean['dropped']:.0f}% dropped |")
        lines.append(f"| crops collaboration: ms per video frame < cloud alone's | "
                     f"{sum(x['crops_ms'] < x['cloud_ms'] for x in t)}/{len(t)} | {mean['crops_ms']:.1f} vs "
                     f"{mean['cloud_ms']:.1f} ({_rel(mean['crops_ms'], mean['cloud_ms'])}) |")
    zooms = sorted({k for r in per.values() for k in r.get("zoom", {})}, key=float)
    if zooms:
        lines += ["", "Crops detected by the cloud at other zooms (`server.cloud --crop-zoom`; each crop resized "
                  "before detection, boxes mapped back; same upload): mean over the sites (per site in the .json).",
                  "", "| crop zoom | crops, merge cloud | crops, fuse+keep | FNR fuse+keep | collab. ms / image |",
                  "|---|---|---|---|---|"]
        for k in zooms:
            runs = [r["zoom"][k] for r in per.values() if k in r.get("zoom", {})]
            lines.append(f"| {k} | {np.mean([x['merges']['cloud']['map50'] for x in runs]):.3f} | "
                         f"{np.mean([x['merges']['fuse+keep']['map50'] for x in runs]):.3f} | "
                         f"{np.mean([x['merges']['fuse+keep']['fnr'] for x in runs]):.3f} | "
                         f"{np.mean([x['collab_ms'] for x in runs]):.1f} |")
    return lines + [""]


def site_markdown(res: dict, settings: dict, site: str) -> list[str]:
    img, vid = res["images"], res["video"]
    main = settings["edge_models"][0]
    lines = [
        f"## Site {site} in detail",
        "",
        f"Site {site} (test split: {settings['n_images']} "
        f"images; video: {settings['n_frames']} frames), edge model `{main}` (seed {settings['seed']}, "
        f"{settings['edge_epochs']} epochs), cloud model `{settings['cloud']}` trained on the public train split "
        f"for {settings.get('cloud_iters', 1.0):g}x an edge model's iterations. The cloud service is a separate process on loopback; edge and cloud get one "
        f"CPU thread each. Edge detections at conf >= {settings['det_conf']} (candidates offloaded down to "
        f"{settings.get('candidate_conf', 0):g}), cloud at >= {settings['cloud_conf']} "
        f"(crops resized {settings.get('crop_zoom', 1.0):g}x before detection); "
        f"routing t_conf {settings['t_conf']}, t_size {settings['t_size']} px², n_frames {settings['n_frames_rule']}. "
        "Each model's mAP50 on these test images by Ultralytics' validator (PNG, conf 0.001): "
        + ", ".join(f"{k} {v:.3f}" for k, v in res.get("validator_map50", {}).items()) + ".",
        "",
        "### Images (every image a keyframe)",
        "",
        "| variant | mAP50 | mAP50 small | recall | FNR | conf at precision 1 | recall there | offloaded "
        "images | offloaded detections | bytes / image | latency / image (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    e, c = img["crops"]["edge"], res["images_cloud"]

    def row(name, s, off="-", det="-", nbytes=0.0, ms=0.0):
        return (f"| {name} | {s['map50']:.3f} | {s['map50_small']:.3f} | {s['recall']:.3f} | {s['fnr']:.3f} | "
                f"{s['conf_p1']:.3f} | {s['recall_p1']:.3f} | {off} | {det} | {nbytes:.0f} | {ms:.1f} |")

    lines.append(row("edge alone", e, ms=img["crops"]["edge_ms"]))
    lines.append(row("cloud alone (whole image)", c, "100%", "-", c["bytes_per_frame"], c["ms"]))
    for mode in ("crops", "frame"):
        x = img[mode]
        for name, m in x["merges"].items():
            lines.append(row(f"collaboration ({mode}, merge {name})", m, f"{100 * x['offloaded_keyframes']:.0f}%",
                             f"{100 * x['offloaded_detections']:.0f}%", x["bytes_per_frame"], x["collab_ms"]))
    col = img["crops"]["collab"]
    lines += [
        "",
        "Merge policies (`common.routing.merge`, scored on the same cloud answers): `cloud` = the cloud's box "
        "replaces every edge box it overlaps and offloaded edge boxes it did not answer are dropped (the paper's "
        "merge); `+keep` = those unanswered edge boxes stay (`--keep-unanswered`); `fuse` = overlapping edge and "
        "cloud boxes become one (confidence-weighted box, noisy-or confidence; `--merge fuse`). The edge "
        "runtime's default: crops with its candidates, `fuse+keep`.",
        "",
        "Against the paper (VisDrone; ours: the built-in benchmark, so only the directions compare; "
        "collaboration = crops, merge `cloud`):",
        "",
        "| claim | paper | ours |",
        "|---|---|---|",
        f"| collaboration vs cloud alone, mAP50 | 0.429 vs 0.401 (+6.98%) | {col['map50']:.3f} vs {c['map50']:.3f} "
        f"({_rel(col['map50'], c['map50'])}) |",
        f"| collaboration vs edge alone, mAP50 | 0.429 vs 0.328 | {col['map50']:.3f} vs {e['map50']:.3f} "
        f"({_rel(col['map50'], e['map50'])}) |",
        f"| FNR, collaboration vs edge | 0.37 vs 0.46 (-19.56%) | {col['fnr']:.3f} vs {e['fnr']:.3f} "
        f"({_rel(col['fnr'], e['fnr'])}) |",
        f"| crop upload vs whole-frame upload, bytes | - (goal <= 25%) | {img['crops']['bytes_per_frame']:.0f} "
        f"(atlas; {img['crops'].get('separate_bytes_per_frame', float('nan')):.0f} as one JPEG per crop) vs "
        f"{img['frame']['bytes_per_frame']:.0f} B/image "
        f"({100 * img['crops']['bytes_per_frame'] / max(img['frame']['bytes_per_frame'], 1):.0f}%), mAP50 "
        f"{img['crops']['collab']['map50']:.3f} vs {img['frame']['collab']['map50']:.3f} |",
    ]
    for name, m in img["crops"]["merges"].items():
        if name != "cloud":
            lines.append(f"| merge {name}: vs cloud alone, vs edge alone (mAP50); FNR vs edge | - | {m['map50']:.3f} "
                         f"({_rel(m['map50'], c['map50'])}, {_rel(m['map50'], e['map50'])}); {m['fnr']:.3f} vs "
                         f"{e['fnr']:.3f} ({_rel(m['fnr'], e['fnr'])}) |")
    lines += [
        "",
        f"### Video (keyframes: {keyframe_rule(settings)}; a non-keyframe gets its keyframe's answers moved by "
        "optical flow)",
        "",
        "ms / frame: over all frames, the time to the frame's edge line (first answer), and that plus the cloud "
        "round trips of the frame's own offload (edge + cloud).",
        "",
        "| variant | keyframes | mAP50 edge | mAP50 collaboration (merge cloud) | mAP50 fuse+keep | recall edge | "
        "recall collab. | conf at precision 1 edge / collab. | offloaded keyframes | bytes / frame | "
        "edge ms / keyframe | collab. ms / keyframe | first answer ms / frame | edge + cloud ms / frame |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, x in vid.items():
        mode, which = key.split("-")
        fused = x.get("merges", {}).get("fuse+keep", {}).get("map50", math.nan)
        name = f"{mode}, {'every frame detected' if which == 'all' else 'keyframes only'}"
        lines.append(f"| {name} | {100 * x['keyframe_fraction']:.0f}% | {x['edge']['map50']:.3f} | "
                     f"{x['collab']['map50']:.3f} | {fused:.3f} | "
                     f"{x['edge']['recall']:.3f} | {x['collab']['recall']:.3f} | "
                     f"{x['edge']['conf_p1']:.3f} / {x['collab']['conf_p1']:.3f} | "
                     f"{100 * x['offloaded_keyframes']:.0f}% | {x['bytes_per_frame']:.0f} | {x['edge_ms']:.1f} | "
                     f"{x['collab_ms']:.1f} | {x.get('first_ms', math.nan):.1f} | {x.get('frame_ms', math.nan):.1f} |")
    vc = res["video_cloud"]
    lines.append(f"| cloud alone, every frame | 100% | - | {vc['map50']:.3f} (cloud) | - | - | {vc['recall']:.3f} "
                 "(cloud) | "
                 f"- / {vc['conf_p1']:.3f} (cloud) | 100% | {vc['bytes_per_frame']:.0f} | - | {vc['ms']:.1f} (cloud) | "
                 f"{vc['ms']:.1f} | {vc['ms']:.1f} |")
    kc = keyframe_cost(vid["crops-key"], vid["crops-all"])
    lines += [
        "",
        f"The keyframe selector drops {100 * kc['dropped']:.0f}% of the frames; mAP50 cost {kc['edge']:+.1f} points "
        f"(edge), {kc['collab']:+.1f} (collaboration, merge cloud) and {kc['fused']:+.1f} (fuse+keep) against "
        "detecting every frame (crops; goal: >= 50% dropped for <= 1 point).",
        "",
        "### Collaborative mAP50 vs t_conf (paper Figure 5; images, crop offload)",
        "",
        "| edge model | edge alone | " + " | ".join(f"t_conf {t}" for t in settings["t_conf_sweep"]) + " |",
        "|---|---|" + "---|" * len(settings["t_conf_sweep"]),
    ]
    for arch, runs in res["sweep"].items():
        first = runs[str(settings["t_conf_sweep"][0])]
        cells = [f"{runs[str(t)]['collab']['map50']:.3f} ({100 * runs[str(t)]['offloaded_detections']:.0f}% off.)"
                 for t in settings["t_conf_sweep"]]
        lines.append(f"| {arch} | {first['edge']['map50']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"Cloud alone on the same images: mAP50 {c['map50']:.3f}. Plot: `collaboration_tconf.png`.", "",
              "### Keyframe rules on the video (edge alone)", "",
              "A non-keyframe reuses its keyframe's detections, as they are or moved by optical flow "
              "(`--propagate`, `clients.carry.flow_shift`).", "",
              "| β | max_gap | boxes on dropped frames | frames detected | frames dropped | mAP50 | "
              "Δ mAP50 vs every frame (points) | recall |",
              "|---|---|---|---|---|---|---|---|"]
    kf = res["keyframes"]
    every = next(x for x in kf.values() if x["max_gap"] == 1)
    for x in kf.values():
        lines.append(f"| {x['beta']:g} | {x['max_gap'] or '-'} | {'optical flow' if x.get('propagate') else 'reused'} | "
                     f"{100 * x['keyframe_fraction']:.0f}% | "
                     f"{100 * (1 - x['keyframe_fraction']):.0f}% | {x['map50']:.3f} | "
                     f"{100 * (x['map50'] - every['map50']):+.1f} | {x['recall']:.3f} |")
    lines.append("")
    return lines


def plot_sweep(res: dict, settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ts = settings["t_conf_sweep"]
    for arch, runs in res["sweep"].items():
        ax.plot(ts, [runs[str(t)]["collab"]["map50"] for t in ts], marker="o", label=f"{arch} + cloud")
    ax.axhline(res["images_cloud"]["map50"], color="gray", linestyle="--", label="cloud alone")
    ax.set_xlabel("t_conf (edge detections below it go to the cloud)")
    ax.set_ylabel("collaborative mAP50")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def keyframe_rule(settings: dict) -> str:
    """The video runs' keyframe rule in words (reports written before ``max_gap`` was recorded had none)."""
    gap = settings.get("max_gap")
    return "β = 1.5" + (f", a keyframe at least every {gap} frames" if gap else "")


def main(argv: list[str] | None = None) -> int:
    from clients.edge import EdgeSettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--sites", type=int, nargs="+", default=[0],
                    help="sites measured (each with its own edge models; one cloud); the first one is shown in detail")
    ap.add_argument("--seed", type=int, default=1, help="seed of the edge and cloud models")
    ap.add_argument("--edge-models", nargs="+", default=list(EDGE_MODELS),
                    help="the first one is the main table's edge model; the others are swept on the first site only")
    ap.add_argument("--cloud-conf", type=float, default=RoutingConfig.cloud_conf, help="the cloud service's --conf")
    ap.add_argument("--crop-zoom", type=float, default=RoutingConfig.crop_zoom, help="the cloud service's --crop-zoom")
    ap.add_argument("--zoom-sweep", type=float, nargs="*", default=[1.0, 1.5, 2.0],
                    help="crop zooms also measured (crop offload, images; a fresh service each)")
    ap.add_argument("--cloud-iters", type=float, default=1.0,
                    help="cloud training iterations as a multiple of an edge model's (a larger model needs more)")
    ap.add_argument("--t-conf-sweep", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--beta-sweep", type=float, nargs="+", default=[1.0, 1.2, 1.5, 2.0],
                    help="keyframe beta values tried on the video (edge only)")
    ap.add_argument("--max-gap", type=int, default=EdgeSettings.max_gap,
                    help="the keyframes-only video runs' max_gap (0: off, the paper's rule alone)")
    ap.add_argument("--gap-sweep", type=int, nargs="+", default=[2, 3, 5, 10],
                    help="keyframe max_gap values tried with beta 1.5 (gap 1 = every frame is always added)")
    ap.add_argument("--slice-frac", type=float, default=0.5,
                    help="sliced-inference baseline: tile side as a fraction of the frame's shorter side")
    ap.add_argument("--slice-overlap", type=float, default=0.2, help="sliced-inference baseline: tile overlap")
    ap.add_argument("--sliced-seeds", type=int, nargs="*", default=[],
                    help="the sliced comparison also with the main edge model of these seeds (the same cloud)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.md, .json, .png)")
    args = ap.parse_args(argv)
    args.max_gap = args.max_gap or None  # 0: the paper's rule alone
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from common.benchmark import benchmark_from_config
    from common.config import load_config, parse_value

    cfg = load_config(args.preset, {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    bench = benchmark_from_config(cfg.data)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cedar-collab-") as tmp:
        res = {"sites": {str(site): measure(args, cfg, bench, Path(tmp), site) for site in args.sites}}
    meta = json.loads((bench.video_dir(args.sites[0]) / "meta.json").read_text())
    settings = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "sites": args.sites, "seed": args.seed,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{cpu_model_name()}, {os.cpu_count()} CPU cores", "wall_s": time.perf_counter() - t0,
                "edge_models": args.edge_models, "edge_epochs": cfg.train.epochs_per_round * cfg.federation.num_rounds,
                "cloud": cfg.model.cloud, "cloud_iters": args.cloud_iters, "det_conf": cfg.routing.det_conf, "cloud_conf": args.cloud_conf,
                "t_conf": cfg.routing.t_conf, "t_size": cfg.routing.t_size, "n_frames_rule": cfg.routing.n_frames,
                "t_conf_sweep": args.t_conf_sweep, "n_images": cfg.data.test_per_site, "n_frames": meta["frames"],
                "crop_zoom": args.crop_zoom, "candidate_conf": cfg.routing.candidate_conf,
                "max_gap": args.max_gap, "slice_frac": args.slice_frac, "slice_overlap": args.slice_overlap,
                "sliced_seeds": sorted({args.seed, *args.sliced_seeds})}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_sweep(res["sites"][str(args.sites[0])], settings, out.parent / f"{out.name}_tconf.png")
    write_report(out, {"settings": settings, "result": res}, to_markdown(res, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
