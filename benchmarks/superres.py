"""Edge super-resolution (A+, ``common/superres.py``): image quality, detection mAP50 and latency.

On the built-in benchmark (``--preset``, default standard: 320 px images):

1. **Training.** Upscalers are trained on the train split of every site
   (HR images, degraded by INTER_AREA x ``--scale``), all on one shared sample
   of patches: A+ with the defaults (K = 128 atoms, n = 256 neighbours), with
   A+'s neighbourhood size (n = 2048), with K = 512, and K = 1 (one global
   ridge regression: what the anchoring adds).
2. **Quality.** Every site's *test* images (held out) are area-downscaled by
   ``--scale`` and upscaled back by nearest neighbour (a floor), bicubic and
   each model; PSNR and SSIM on the luminance (Y of YCrCb), ``scale`` px shaved
   at each border (the usual SR convention), mean over images; "wins" counts
   the images on which a method beats bicubic.
3. **Detection.** A trained edge model (``--weights``, by default the 25-epoch
   site-0 YOLO11n kept by ``benchmarks/pyrafan_accuracy.py``) is evaluated with
   :func:`common.yolo.evaluate` on site 0's test images: the originals (ceiling),
   the low-resolution images as they are (the detector's letterbox then
   upscales them bilinearly to ``imgsz``), and the low-resolution images
   upscaled by each method. The labels are copied unchanged (normalised
   coordinates do not change with the image size).
4. **Latency.** Upscaling one low-resolution test frame (e.g. 160x160 ->
   320x320, BGR in, BGR out), every method on every frame, interleaved frame by
   frame so machine load hits all methods alike; mean, median and p90 per frame.

Run it with one thread (the latency is single-core)::

    OMP_NUM_THREADS=1 python -m benchmarks.superres      # writes benchmarks/results/superres.{md,json}
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from benchmarks import harness
from benchmarks.harness import write_report
from common import superres as sr

log = logging.getLogger("benchmarks.superres")

RESULTS = Path(__file__).resolve().parent / "results" / "superres"
MODELS = {  # name -> ANRParams overrides
    "ridge K=1": dict(atoms=1, neighbours=10**9),
    "A+ K=128 n=256": dict(),  # the default
    "A+ K=128 n=2048": dict(neighbours=2048),
    "A+ K=512 n=256": dict(atoms=512),
}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in sr.IMAGE_SUFFIXES)


def train_models(bench, scale: int, samples: int, cache: Path) -> tuple[dict, dict]:
    """Every model is fitted on one shared sample of patches (same data, only K and n differ)."""
    files = [p for site in bench.sites for p in _images(bench.site_dir(site.index) / "images" / "train")]
    base = sr.ANRParams(scale=scale, samples=samples)
    log.info("sampling %d patches from %d HR train images", samples, len(files))
    t0 = time.perf_counter()
    sample = sr.sample_patches((sr.training_pair(sr.read_image(f), scale) for f in files), base.patch, base.stride,
                               samples, base.seed)
    sample_s = time.perf_counter() - t0
    models, info = {}, {}
    for name, over in MODELS.items():
        params = sr.ANRParams(scale=scale, samples=samples, **over)
        t0 = time.perf_counter()
        model = sr.fit_patches(sample, params, meta={"images": len(files)})
        seconds = time.perf_counter() - t0
        path = model.save(cache / f"{bench.root.name}-x{scale}-K{model.atoms.shape[0]}-n{model.neighbours}.npz")
        models[name] = model
        info[name] = {"fit_s": round(seconds, 1), "atoms": int(model.atoms.shape[0]),
                      "pca_dims": model.pca.shape[1], "neighbours": int(model.neighbours),
                      "samples": model.meta["samples"], "lam": params.lam, "patch": params.patch,
                      "stride": params.stride, "file": str(path), "file_bytes": path.stat().st_size}
        log.info("%s: fitted in %.1f s (%d PCA dims) -> %s", name, seconds, model.pca.shape[1], path)
    return models, {"train_images": len(files), "sample_s": round(sample_s, 1), "models": info}


def upscalers(models: dict, scale: int) -> dict:
    def nearest(lr):
        return cv2.resize(lr, (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_NEAREST)

    return {"nearest": nearest, "bicubic": lambda lr: sr.bicubic(lr, scale),
            **{k: m.upscale for k, m in models.items()}}


def quality_and_latency(bench, methods: dict, scale: int) -> dict:
    files = [p for site in bench.sites for p in _images(bench.site_dir(site.index) / "images" / "test")]
    psnr = {k: [] for k in methods}
    ssim = {k: [] for k in methods}
    ms = {k: [] for k in methods}
    cpu_ms = {k: [] for k in methods}
    lr_shape = None
    for f in files:
        lr, hr = sr.degrade(sr.read_image(f), scale)
        lr_shape = lr.shape
        y = sr.luma(hr)
        for name, fn in methods.items():  # interleaved: every method on this frame
            t0, c0 = time.perf_counter(), time.process_time()
            up = fn(lr)
            ms[name].append((time.perf_counter() - t0) * 1e3)
            cpu_ms[name].append((time.process_time() - c0) * 1e3)
            yu = sr.luma(up)
            psnr[name].append(sr.psnr(y, yu, border=scale))
            ssim[name].append(sr.ssim(y, yu, border=scale))
    base = np.array(psnr["bicubic"])
    out = {}
    for name in methods:
        p = np.array(psnr[name])
        out[name] = {"psnr_db": float(p.mean()), "ssim": float(np.mean(ssim[name])),
                     "psnr_gain_db": float((p - base).mean()), "wins_vs_bicubic": int((p > base).sum()),
                     "ms_mean": float(np.mean(ms[name])), "ms_median": float(np.median(ms[name])),
                     "ms_p90": float(np.percentile(ms[name], 90)), "cpu_ms_mean": float(np.mean(cpu_ms[name])),
                     "cpu_ms_median": float(np.median(cpu_ms[name]))}
    log.info("quality and latency on %d test images", len(files))
    return {"images": len(files), "lr_shape": list(lr_shape[:2]), "hr_shape": [lr_shape[0] * scale,
                                                                                lr_shape[1] * scale],
            "methods": out}


def _write_split(root: Path, src_images: Path, src_labels: Path, transform) -> Path:
    (root / "images" / "test").mkdir(parents=True)
    shutil.copytree(src_labels, root / "labels" / "test")
    for f in _images(src_images):
        image = sr.read_image(f)
        if not cv2.imwrite(str(root / "images" / "test" / f.name), transform(image)):
            raise OSError(f"could not write {root / 'images' / 'test' / f.name}")
    from common.benchmark import write_data_yaml

    # Ultralytics wants train and val keys: all three name the one split
    return write_data_yaml(root, {"train": "images/test", "val": "images/test", "test": "images/test"})


def detection(bench, site: int, methods: dict, scale: int, weights: Path, imgsz: int, ev) -> dict:
    from common import yolo  # offline Ultralytics first

    model = yolo.load_weights(weights)
    src = bench.site_dir(site)
    variants = {"original (HR)": lambda im: im,
                f"LR 1/{scale}, as is": lambda im: sr.degrade(im, scale)[0],
                **{f"LR -> {name}": (lambda im, fn=fn: fn(sr.degrade(im, scale)[0])) for name, fn in methods.items()}}
    out = {}
    with tempfile.TemporaryDirectory(prefix="cedar-superres-") as tmp:
        for i, (name, transform) in enumerate(variants.items()):
            data = _write_split(Path(tmp) / f"v{i}", src / "images" / "test", src / "labels" / "test", transform)
            res = yolo.evaluate(model, data, split="test", imgsz=imgsz, batch=ev.batch, conf=ev.conf, iou=ev.iou)
            out[name] = {"map50": res.map50, "map50_95": res.map50_95, "precision": res.precision,
                         "recall": res.recall, "images": res.images, "instances": res.instances}
            log.info("%-24s mAP50 %.4f  mAP50-95 %.4f", name, res.map50, res.map50_95)
    return out


def machine() -> dict:
    return {**harness.machine(1), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "numpy": np.__version__,
            "opencv": cv2.__version__}


def to_markdown(r: dict) -> str:
    m, q, s = r["machine"], r["quality"], r["settings"]
    lr, hr = "x".join(map(str, q["lr_shape"][::-1])), "x".join(map(str, q["hr_shape"][::-1]))
    lines = [
        "# Edge super-resolution (A+): quality, detection and latency",
        "",
        f"Measured {r['date']} by `{r['command']}` on **{m['cpu']}**, {m['logical_cpus']} logical CPUs "
        f"(KVM guest), 1 thread (OpenCV, torch; OMP_NUM_THREADS={m['omp_num_threads']}); numpy {m['numpy']}, "
        f"OpenCV {m['opencv']}, torch {m['torch']}, Ultralytics {m['ultralytics']}. Load average "
        f"{r['load_before'][0]:.2f} before and {r['load_after'][0]:.2f} after (the machine was shared with "
        "other benchmark runs: wall-clock latencies are upper bounds; compare rows with each other).",
        "",
        f"Built-in benchmark, preset `{s['preset']}` ({s['benchmark']}). x{s['scale']}: HR test images "
        f"area-downscaled to {lr} and upscaled back to {hr}. Upscalers trained on the train split of every site "
        f"({r['training']['train_images']} HR images, {s['samples']} sampled 6x6 patches, lambda 0.1, "
        "stride 2; K and n of the default chosen on the val split, see `common/superres.py`); quality on the "
        f"{q['images']} held-out test images of all sites.",
        "",
        "## Quality and latency",
        "",
        f"PSNR/SSIM on Y (YCrCb), {s['scale']} px shaved per border, mean over images; gain = mean per-image PSNR "
        f"difference to bicubic; wins = images where the method beats bicubic. Latency: one {lr} BGR frame -> "
        f"{hr}, per frame over the {q['images']} frames: wall-clock mean / median / p90, and the process's "
        "CPU time (mean / median; less sensitive to the other work on the machine).",
        "",
        "| method | PSNR dB | gain dB | wins | SSIM | ms mean | ms median | ms p90 | CPU ms mean | CPU ms median |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in q["methods"].items():
        wins = "-" if name == "bicubic" else f"{v['wins_vs_bicubic']}/{q['images']}"
        lines.append(f"| {name} | {v['psnr_db']:.3f} | {v['psnr_gain_db']:+.3f} | {wins} | {v['ssim']:.4f} "
                     f"| {v['ms_mean']:.2f} | {v['ms_median']:.2f} | {v['ms_p90']:.2f} | {v['cpu_ms_mean']:.2f} "
                     f"| {v['cpu_ms_median']:.2f} |")
    lines += ["", f"Training: sampling the patches took {r['training']['sample_s']} s, then per model:", "",
              "| model | atoms K | neighbours n | PCA dims | fit s | file |", "|---|---|---|---|---|---|"]
    for name, v in r["training"]["models"].items():
        lines.append(f"| {name} | {v['atoms']} | {v['neighbours']} | {v['pca_dims']} "
                     f"| {v['fit_s']} | {v['file_bytes'] / 1024:.0f} KiB |")
    if r.get("detection"):
        d = r["detection"]
        first = next(iter(d.values()))
        lines += [
            "",
            "## Detection",
            "",
            f"`{s['weights']}` (YOLO11n trained on site {s['site']}), `common.yolo.evaluate` at imgsz "
            f"{s['imgsz']}, conf {s['eval_conf']}, iou {s['eval_iou']}, on site {s['site']}'s {first['images']} "
            f"test images ({first['instances']} objects). 'as is': the {lr} images, which the detector's "
            f"letterbox enlarges bilinearly to {s['imgsz']} px.",
            "",
            "| input | mAP50 | mAP50-95 | precision | recall |",
            "|---|---|---|---|---|",
        ]
        for name, v in d.items():
            lines.append(f"| {name} | {v['map50']:.4f} | {v['map50_95']:.4f} | {v['precision']:.3f} "
                         f"| {v['recall']:.3f} |")
        lines += ["", "One detector (one training seed) on one site's test split: the differences between the "
                  "learned upscalers were not tested for significance."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--samples", type=int, default=100_000, help="training patches per model")
    ap.add_argument("--site", type=int, default=0, help="the site whose test split the detector is scored on")
    ap.add_argument("--weights", help="trained edge model (default: pyrafan_accuracy's 25-epoch yolo11n, seed 1)")
    ap.add_argument("--no-detection", action="store_true", help="skip the mAP50 part")
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.md and .json are written)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cv2.setNumThreads(1)

    from common import yolo  # noqa: F401  (offline Ultralytics before anything imports it)
    from common.benchmark import benchmark_from_config
    from common.config import load_config

    import torch

    torch.set_num_threads(1)
    cfg = load_config(args.preset)
    bench = benchmark_from_config(cfg.data)
    weights = Path(args.weights).expanduser() if args.weights else \
        yolo.CEDAR_HOME / "models" / f"{args.preset}-yolo11n-site{args.site}-seed1-25ep.pt"
    if not args.no_detection and not weights.is_file():
        log.error("edge model %s not found (train it with benchmarks.pyrafan_accuracy, pass --weights, "
                  "or use --no-detection)", weights)
        return 2
    load_before = os.getloadavg()
    models, training = train_models(bench, args.scale, args.samples, yolo.CEDAR_HOME / "superres")
    methods = upscalers(models, args.scale)
    quality = quality_and_latency(bench, methods, args.scale)
    det = None if args.no_detection else detection(bench, args.site, methods, args.scale, weights,
                                                   cfg.train.imgsz, cfg.eval)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "OMP_NUM_THREADS=1 python -m benchmarks.superres" + "".join(f" {a}" for a in
                                                                            (argv or sys.argv[1:])),
        "machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
        "settings": {"preset": args.preset, "benchmark": bench.root.name, "scale": args.scale,
                     "samples": args.samples, "site": args.site, "weights": str(weights), "imgsz": cfg.train.imgsz,
                     "eval_conf": cfg.eval.conf, "eval_iou": cfg.eval.iou},
        "training": training, "quality": quality, "detection": det,
    }
    write_report(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
