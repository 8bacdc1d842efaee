"""PyraFAN ablation: YOLO11n and YOLO26n, their plain P2 heads, PyraFAN (v1) and PyraFAN v2 on the built-in
benchmark.

Every (model, site, seed) run builds the model from YAML with that seed, trains it on
the site's ``train`` split with the same budget (the preset's optimiser settings;
``--epochs`` defaults to what one edge model trains in a federation:
``epochs_per_round * num_rounds``), and evaluates it on the site's ``test`` split:

* **mAP50**: Ultralytics' validator (``common.yolo.evaluate``), all objects;
* **mAP50 (small)**: objects smaller than ``eval.small_px`` (16) px, i.e. both box
  sides < 16 px at the image's own size (the generator's "small" objects, 5-15 px).
  Evaluated COCO-style for a size range (as COCO's APs does for area < 32^2): large
  ground truth is *ignored*, not deleted. Detections (conf >= ``eval.conf``, NMS at
  ``eval.iou``, at most 300 per image) are matched greedily in confidence order, per
  image and class, to the unmatched small ground truth of highest IoU >= 0.5 (TP);
  a detection that instead overlaps a large ground-truth box (IoU >= 0.5) is ignored,
  so is an unmatched detection that is itself not small (a side >= 16 px); any other
  detection is a FP. Simply deleting large boxes from the labels would turn every
  correct detection of a large object into a FP and punish the better detector;
  keeping every detection would do the same for large false alarms. AP is Ultralytics'
  101-point interpolation (:func:`common.detections.compute_ap`), averaged over the classes with at least one
  small object in the split. The same matcher without the size range
  (``map50_all_own``, JSON only) cross-checks it against the validator's mAP50.

Per model, values are averaged over sites for each seed, then reported as the mean
and standard deviation over seeds. Raw runs are appended to ``<out>.jsonl`` as they
finish; a rerun with the same settings skips the runs already there (resume).

Full run (standard preset, 4 sites x 3 seeds x 7 models)::

    python -m benchmarks.pyrafan_accuracy --preset standard --seeds 3

Several jobs side by side (each its own ``--models`` and ``--out`` copy of the jsonl), then the report
from the merged jsonl without training::

    python -m benchmarks.pyrafan_accuracy --preset standard --seeds 3 --report

Smoke run::

    python -m benchmarks.pyrafan_accuracy --epochs 1 --seeds 1 --sites 1 --out /tmp/acc
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import shown, write_report
from common.detections import image_labels, size_range_ap50

log = logging.getLogger("benchmarks.pyrafan_accuracy")

MODELS = ("yolo11n", "yolo11n-p2", "yolo11n-pyrafan", "yolo11n-pyrafan2", "yolo26n", "yolo26n-p2", "yolo26n-pyrafan2")
RESULTS = Path(__file__).resolve().parent / "results" / "pyrafan_accuracy"


# --------------------------------------------------------------------------- metric


def read_split(site_dir: Path, split: str = "test") -> tuple[list[Path], list[np.ndarray]]:
    """Image paths and their labels as ``(M, 5)`` ``cls, x0, y0, x1, y1`` pixel rows."""
    import cv2

    images = sorted((site_dir / "images" / split).glob("*.png"))
    labels = []
    for path in images:
        h, w = cv2.imread(str(path)).shape[:2]
        labels.append(image_labels(path, w, h))
    return images, labels


# --------------------------------------------------------------------------- runs


def weights_path(arch: str, site: int, seed: int, epochs: int, preset: str) -> Path:
    """Where a run keeps its trained model (other benchmarks reuse it: edge models for collaboration)."""
    from common.yolo import CEDAR_HOME

    return CEDAR_HOME / "models" / f"{preset}-{arch}-site{site}-seed{seed}-{epochs}ep.pt"


def run_one(arch: str, site: int, seed: int, bench, cfg, epochs: int) -> dict:
    import cv2
    import torch

    from common import yolo
    from common.benchmark import CLASS_NAMES

    t, e = cfg.train, cfg.eval
    data = bench.site_data(site)
    model = yolo.build_model(arch, nc=len(CLASS_NAMES), seed=seed, names=list(CLASS_NAMES))
    torch.set_num_threads(t.threads)
    res = yolo.train(model, data, epochs=epochs, imgsz=t.imgsz, batch=t.batch, lr0=t.lr0,
                     weight_decay=t.weight_decay, warmup_iters=t.warmup_iters, mosaic=t.mosaic, workers=t.workers,
                     seed=seed, device=t.device, desc=f"{arch} site {site} seed {seed}")
    saved = yolo.save_weights(model, weights_path(arch, site, seed, epochs, cfg.preset), site=site, seed=seed,
                              epochs=epochs, imgsz=t.imgsz)
    ev = yolo.evaluate(model, data, split="test", imgsz=t.imgsz, batch=e.batch, conf=e.conf, iou=e.iou,
                       device=t.device)
    paths, gts = read_split(bench.site_dir(site), "test")
    preds = yolo.predict(model, [cv2.imread(str(p)) for p in paths], imgsz=t.imgsz, conf=e.conf, iou=e.iou,
                         device=t.device)
    small = size_range_ap50(preds, gts, len(CLASS_NAMES), small_px=e.small_px)
    every = size_range_ap50(preds, gts, len(CLASS_NAMES), small_px=None)
    return {"model": arch, "site": site, "seed": seed, "params": yolo.count_parameters(model),
            "gflops": yolo.gflops(model, t.imgsz), "map50": ev.map50, "map50_95": ev.map50_95, "map50_small": small["map50"],
            "ap50_small": small["ap50"], "n_small": small["n_gt"], "n_gt": every["n_gt"],
            "map50_all_own": every["map50"], "train_loss": res.loss, "train_s": res.seconds,
            "iterations": res.iterations, "eval_s": ev.seconds, "weights": shown(saved)}


def summarise(records: list[dict], models: list[str]) -> dict:
    """Per model: per-seed means over sites, then mean and std over seeds."""
    out = {}
    for arch in models:
        rows = [r for r in records if r["model"] == arch]
        if not rows:
            continue
        seeds = sorted({r["seed"] for r in rows})
        per_seed = {k: [float(np.nanmean([r[k] for r in rows if r["seed"] == s])) for s in seeds]
                    for k in ("map50", "map50_95", "map50_small", "map50_all_own")}
        out[arch] = {"params": rows[0]["params"], "gflops": rows[0].get("gflops", float("nan")), "seeds": seeds, "sites": sorted({r["site"] for r in rows}),
                     "runs": len(rows), "train_s_mean": float(np.mean([r["train_s"] for r in rows])),
                     **{f"{k}_mean": float(np.mean(v)) for k, v in per_seed.items()},
                     **{f"{k}_std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
                        for k, v in per_seed.items()},
                     "per_site": {str(site): {**{k: float(np.nanmean([r[k] for r in rows if r["site"] == site]))
                                                 for k in ("map50", "map50_small")},
                                              "seeds": sum(r["site"] == site for r in rows)}
                                  for site in sorted({r["site"] for r in rows})}}
    return out


def head_to_head(records: list[dict], challenger: str, reference: str) -> dict | None:
    """``challenger`` against ``reference`` on the (site, seed) runs both have (None if none).

    mAP50 of each: per seed the mean over the shared sites, then the mean over seeds; ``diff``: challenger minus
    reference per seed, then mean and std over seeds; ``wins``: shared runs where the challenger's mAP50 is higher."""
    by = {(r["model"], r["site"], r["seed"]): r for r in records}
    pairs = sorted((site, seed) for m, site, seed in by if m == challenger and (reference, site, seed) in by)
    if not pairs:
        return None
    seeds = sorted({seed for _, seed in pairs})
    per_seed = {m: [float(np.mean([by[m, site, s]["map50"] for site, seed in pairs if seed == s])) for s in seeds]
                for m in (challenger, reference)}
    diff = [c - r for c, r in zip(per_seed[challenger], per_seed[reference])]
    mean = {m: float(np.mean(v)) for m, v in per_seed.items()}
    return {"challenger": challenger, "reference": reference, "pairs": len(pairs),
            "sites": sorted({site for site, _ in pairs}), "seeds": seeds,
            "wins": sum(by[challenger, p[0], p[1]]["map50"] > by[reference, p[0], p[1]]["map50"] for p in pairs),
            "challenger_map50": mean[challenger], "reference_map50": mean[reference],
            "diff_mean": float(np.mean(diff)), "diff_std": float(np.std(diff, ddof=1)) if len(diff) > 1 else float("nan"),
            "challenger_gflops": by[(challenger, *pairs[0])]["gflops"], "reference_gflops": by[(reference, *pairs[0])]["gflops"]}


def onnx_latency(speed_json: Path, imgsz: int) -> dict:
    """``{model: ms}``: ONNX Runtime median latency at ``imgsz`` from ``benchmarks.pyrafan_speed``'s report
    (empty if it is missing or has no such size), with the machine and date it was measured on."""
    if not speed_json.is_file():
        return {}
    speed = json.loads(speed_json.read_text())
    ms = {key.split("|")[0]: v["median_ms"] for key, v in speed.get("latency", {}).items()
          if key.endswith(f"|{imgsz}|onnxruntime")}
    return {"ms": ms, "date": speed["date"], "cpu": speed["machine"]["cpu"],
            "threads": speed["machine"]["threads"]} if ms else {}


GOALS = (("yolo11n-pyrafan2", "yolo11n-p2"), ("yolo26n-pyrafan2", "yolo26n-p2"))


def to_markdown(summary: dict, settings: dict) -> str:
    def pm(row, key):
        std = row[f"{key}_std"]
        return f"{row[f'{key}_mean']:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")

    base = summary.get("yolo11n")
    lines = [
        "# PyraFAN ablation: accuracy on the built-in benchmark",
        "",
        f"`python -m benchmarks.pyrafan_accuracy {settings['argv']}`, {settings['date']}. Preset "
        f"`{settings['preset']}`, sites {settings['sites']}, seeds {settings['seeds']}, {settings['epochs']} "
        f"epochs at {settings['imgsz']} px, batch {settings['batch']} (the same budget for every model). "
        "Test split of each site. mAP50: Ultralytics' validator; mAP50 small: objects with both sides < "
        f"{settings['small_px']} px, COCO-style ignores (see the script's docstring). Mean ± std over seeds "
        "of the mean over sites. Train s/run is the wall time of a run's training, which shared the machine with "
        "other jobs in some runs: not a speed comparison (ONNX ms is).",
        "",
    ]
    latency = settings.get("latency") or {}
    if latency:
        lines += [f"ONNX latency: median ONNX Runtime forward at {settings['imgsz']} px, batch 1, from "
                  f"`python -m benchmarks.pyrafan_speed` ({latency['date']}, {latency['cpu']}, "
                  f"{latency['threads']} threads; [pyrafan_speed.md](pyrafan_speed.md)).", ""]
    lines += [
        f"| model | runs | params | GFLOPs at {settings['imgsz']} px | ONNX ms | mAP50 | mAP50-95 | "
        "mAP50 small | Δ mAP50 small vs yolo11n | train s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, row in summary.items():
        gain = None if base is None or arch == "yolo11n" else row["map50_small_mean"] - base["map50_small_mean"]
        delta = "" if gain is None else f"{gain:+.3f}"
        ms = latency.get("ms", {}).get(arch)
        lines.append(f"| {arch} | {row['runs']}/{len(settings['sites']) * len(settings['seeds'])} | {row['params'] / 1e6:.3f} M "
                     f"| {row['gflops']:.2f} | {'' if ms is None else f'{ms:.1f}'} | {pm(row, 'map50')} | "
                     f"{pm(row, 'map50_95')} | {pm(row, 'map50_small')} | {delta} | {row['train_s_mean']:.0f} |")
    full = len(settings["sites"]) * len(settings["seeds"])
    if any(row["runs"] < full for row in summary.values()):
        lines += ["", f"A model with fewer than {full} runs averages different sites for different seeds: compare "
                  "those on the head-to-head lines and the per-site table, not on the means above."]
    goals = [g for g in settings.get("head_to_head", []) if g]
    if goals:
        lines += ["", "Goal: PyraFAN v2 beats the plain P2 head's mAP50 at no more than its GFLOPs. Head to head on "
                  "the (site, seed) runs both models have; Δ is the challenger minus the reference, mean ± std over "
                  "seeds of the mean over sites:", "",
                  "| challenger | reference | runs | sites | mAP50 | Δ mAP50 | wins | GFLOPs | met |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g in goals:
            std = "" if math.isnan(g["diff_std"]) else f" ± {g['diff_std']:.3f}"
            met = g["diff_mean"] > 0 and g["challenger_gflops"] <= g["reference_gflops"]
            lines.append(f"| {g['challenger']} | {g['reference']} | {g['pairs']} | {g['sites']} | "
                         f"{g['challenger_map50']:.3f} vs {g['reference_map50']:.3f} | {g['diff_mean']:+.3f}{std} | "
                         f"{g['wins']}/{g['pairs']} | {g['challenger_gflops']:.2f} vs {g['reference_gflops']:.2f} | "
                         f"{'yes' if met else 'no'}{' so far' if g['pairs'] < full else ''} |")
    lines += ["", "Per site (mean over seeds; in brackets the number of seeds where fewer than "
              f"{len(settings['seeds'])} have run), mAP50 / mAP50 small:", "",
              "| model | " + " | ".join(f"site {s}" for s in settings["sites"]) + " |",
              "|---|" + "---|" * len(settings["sites"])]
    for arch, row in summary.items():
        cells = []
        for site in settings["sites"]:
            cell = row["per_site"].get(str(site))
            n = "" if cell is None or cell["seeds"] >= len(settings["seeds"]) else f" ({cell['seeds']})"
            cells.append("" if cell is None else f"{cell['map50']:.3f} / {cell['map50_small']:.3f}{n}")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys
    from datetime import datetime, timezone

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    ap.add_argument("--sites", type=int, default=None, help="first N sites (default: all)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="default: train.epochs_per_round * federation.num_rounds of the preset")
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.md, .json, .jsonl)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (e.g. train.threads=1)")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: write the report from the runs already in <out>.jsonl")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from common.benchmark import benchmark_from_config
    from common.config import load_config, parse_value

    cfg = load_config(args.preset, {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    bench = benchmark_from_config(cfg.data)
    sites = list(range(cfg.data.num_sites if args.sites is None else min(args.sites, cfg.data.num_sites)))
    epochs = args.epochs if args.epochs is not None else cfg.train.epochs_per_round * cfg.federation.num_rounds
    settings = {"preset": args.preset, "sites": sites, "seeds": list(range(args.seeds)), "epochs": epochs,
                "imgsz": cfg.train.imgsz, "batch": cfg.train.batch, "small_px": cfg.eval.small_px,
                "data_root": shown(bench.root)}
    key = {k: settings[k] for k in ("preset", "epochs", "imgsz", "batch", "small_px")}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    done = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    done = [r for r in done if r.get("settings") == key]
    have = {(r["model"], r["site"], r["seed"]) for r in done}
    todo = [] if args.report else [(a, s, seed) for seed in settings["seeds"] for s in sites for a in args.models
                                   if (a, s, seed) not in have]
    log.info("%d runs to do (%d already in %s); data %s", len(todo), len(have), jsonl, bench.root)
    t0 = time.perf_counter()
    for n, (arch, site, seed) in enumerate(todo, 1):
        record = {**run_one(arch, site, seed, bench, cfg, epochs), "settings": key}
        with jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.append(record)
        log.info("[%d/%d] %s site %d seed %d: mAP50 %.3f, small %.3f (%.0f s so far)", n, len(todo), arch, site,
                 seed, record["map50"], record["map50_small"], time.perf_counter() - t0)

    records = [r for r in done if r["model"] in args.models and r["site"] in sites and r["seed"] in settings["seeds"]]
    from common import yolo
    from common.benchmark import CLASS_NAMES

    for arch in {r["model"] for r in records if "gflops" not in r}:  # runs recorded before GFLOPs were: the model's
        flops = yolo.gflops(yolo.build_model(arch, nc=len(CLASS_NAMES), seed=0), settings["imgsz"])
        for r in records:
            if r["model"] == arch:
                r.setdefault("gflops", flops)
    summary = summarise(records, args.models)
    settings.update(latency=onnx_latency(RESULTS.with_name("pyrafan_speed.json"), settings["imgsz"]),
                    head_to_head=[head_to_head(records, a, b) for a, b in GOALS])
    settings.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    argv=" ".join(sys.argv[1:] if argv is None else argv))
    write_report(out, {"settings": settings, "summary": summary}, to_markdown(summary, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
