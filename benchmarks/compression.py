r"""Entropy channel filtering (platform text (seeds/002)): a site's trained model before and after compression.

For each trained edge model (``--seeds``: the models ``benchmarks.pyrafan_accuracy``
saves, ``<CEDAR_HOME>/models/<preset>-yolo11n-site<S>-seed<N>-<E>ep.pt``) and each
``--ratios`` value, :mod:`common.prune` removes that fraction of the parameters
(lowest-entropy channels, scored on ``--calib-images`` train images; the dropped
channels' means folded into the next layer), then fine-tunes ``--epochs`` epochs with
:func:`common.yolo.train` (the preset's batch, size, schedule and, unless ``--lr0``,
learning rate). A **control** row fine-tunes the unpruned model with the same
budget, so the gain of the extra epochs alone is visible. Right after each cut, the
same widths are also cut by other criteria (entropy over each channel's own range,
BatchNorm |gamma|, random channels) and evaluated, to see whether entropy picks
better channels than they do. ``--scratch`` adds, per ratio, the pruned *shape* trained
from a random init with the fine-tune budget: does the cut keep anything that
training the small network directly would not find?

Columns, side by side in one run:

* **params**, **GFLOPs** at ``imgsz`` (Ultralytics' ``get_flops``/THOP, unfused; as in
  ``benchmarks/pyrafan_speed.py``), **ONNX MB** (``common.yolo.export_onnx`` at ``imgsz``,
  float32);
* **CPU latency** per image, torch and ONNX Runtime: batch 1, Conv+BN fused, raw head
  output (no NMS), ``--threads`` threads, all cells interleaved round by round after a
  warm-up (``benchmarks.harness``, as in ``benchmarks/pyrafan_speed.py``); median and [p25-p75];
* **mAP50** and mAP50-95 on the site's ``test`` split (``common.yolo.evaluate``), right
  after the cut (no fine-tune) and after the fine-tune; **retention** = fine-tuned
  mAP50 / original mAP50; **mAP50 small** (objects < ``eval.small_px`` px, the matcher of
  ``benchmarks/pyrafan_accuracy.py``), since an entropy criterion may drop channels
  that fire only on rare small objects.

Widths after the cut depend only on the architecture and the ratio (one keep fraction
per model), so every seed's pruned model has the same shape: cost columns are
measured on the first seed's models; accuracy is the mean over seeds (per-seed values
in the JSON). Fine-tuned rows are appended to ``<out>.jsonl`` as they finish (with
their weights under ``<CEDAR_HOME>/models/compression/``); a rerun with the same
settings reuses them.

Run (the committed result)::

    OMP_NUM_THREADS=1 python -m benchmarks.compression --seeds 1 2 --ratios 0.3 0.5 0.7 --epochs 5
    # the original's training budget for the fine-tune, against the same shape from scratch:
    OMP_NUM_THREADS=1 python -m benchmarks.compression --seeds 1 2 --ratios 0.7 --epochs 25 --no-control \
        --scratch --out benchmarks/results/compression_ft25

Smoke run (first a 1-epoch quick-preset model for seed 0, site 0)::

    python -m benchmarks.pyrafan_accuracy --preset quick --models yolo11n --seeds 1 --sites 1 --epochs 1 \
        --out /tmp/acc
    python -m benchmarks.compression --preset quick --seeds 0 --train-epochs 1 --epochs 1 --runs 3 --out /tmp/comp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from copy import deepcopy
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.pyrafan_accuracy import read_split, size_range_ap50, weights_path
from benchmarks.harness import cpu_model_name, latency_runners, machine, time_interleaved, write_report

log = logging.getLogger("benchmarks.compression")

RESULTS = Path(__file__).resolve().parent / "results" / "compression"
RATIOS = (0.3, 0.5, 0.7)
CRITERIA = ("map50_random_no_ft", "map50_entropy_own_range_no_ft", "map50_bn_gamma_no_ft")


def variant_name(ratio: float | None, epochs: int) -> str:
    if ratio is None:
        return "original"
    if ratio == 0:
        return f"control: +{epochs} ep, no pruning"
    return f"pruned {ratio:.0%} + {epochs} ep"


def scratch_name(ratio: float, epochs: int) -> str:
    return f"pruned {ratio:.0%} shape, random init + {epochs} ep"


def accuracy(model, bench, site: int, cfg) -> dict:
    import cv2

    from common import yolo
    from common.benchmark import CLASS_NAMES

    e, imgsz = cfg.eval, cfg.train.imgsz
    ev = yolo.evaluate(model, bench.site_data(site), split="test", imgsz=imgsz, batch=e.batch, conf=e.conf,
                       iou=e.iou)
    paths, gts = read_split(bench.site_dir(site), "test")
    preds = yolo.predict(model, [cv2.imread(str(p)) for p in paths], imgsz=imgsz, conf=e.conf, iou=e.iou)
    small = size_range_ap50(preds, gts, len(CLASS_NAMES), small_px=e.small_px)
    return {"map50": ev.map50, "map50_95": ev.map50_95, "map50_small": small["map50"]}


def criteria_scores(model, groups, batches, seed: int, bins: int) -> dict[str, dict]:
    """Channel scores of the baselines the entropy criterion is compared with (highest kept)."""
    import torch

    from common import prune

    g = torch.Generator().manual_seed(seed)
    return {
        "random": {grp.name: torch.rand(grp.size, generator=g) for grp in groups},
        # the scale-free variant of the estimator: each channel binned over its own range
        "entropy_own_range": prune.calibrate(model, groups, batches, bins, shared_range=False).entropy,
        # network slimming's magnitude criterion
        "bn_gamma": {grp.name: sum(model.get_submodule(p).bn.weight.detach().abs()[o: o + grp.size]
                                   for p, o in grp.producers) for grp in groups if not grp.frozen},
    }


def run_seed(seed: int, args, cfg, bench, key: dict, done: dict, jsonl: Path) -> list[dict]:
    """The original, the control and every ratio for one trained model (rows already in ``done`` are reused)."""
    from common import prune, yolo

    t = cfg.train
    data = bench.site_data(args.site)
    src = weights_path(args.arch, args.site, seed, args.train_epochs, cfg.preset)
    original = yolo.load_weights(src)
    rows = []
    if (seed, "original") not in done:
        row = {"seed": seed, "variant": "original", "ratio": None, "weights": str(src),
               "params": yolo.count_parameters(original), **accuracy(original, bench, args.site, cfg)}
        done[(seed, "original")] = row
        with jsonl.open("a") as f:
            f.write(json.dumps({**row, "settings": key}) + "\n")
    rows.append(done[(seed, "original")])
    cal = baselines = None
    for ratio in [0.0, *args.ratios] if args.control else args.ratios:
        name = variant_name(ratio, args.epochs)
        if (seed, name) in done:
            rows.append(done[(seed, name)])
            continue
        model = deepcopy(original)
        row = {"seed": seed, "variant": name, "ratio": ratio}
        kept = {}
        if ratio > 0:
            groups = prune.find_groups(original)
            if cal is None:  # one calibration per model, shared by every ratio
                t0 = time.perf_counter()
                batches = list(prune.calibration_batches(data, imgsz=t.imgsz, max_images=args.calib_images))
                cal = prune.calibrate(original, groups, batches, args.bins)
                calib_s = time.perf_counter() - t0
                baselines = criteria_scores(original, groups, batches, seed, args.bins)
            report = prune.prune_to_ratio(model, ratio, cal.entropy, groups, input_mean=cal.input_mean)
            kept = report.kept_channels
            row.update(keep_fraction=report.keep_fraction, ratio_achieved=report.ratio_achieved, calib_s=calib_s,
                       **{f"{k}_no_ft": v for k, v in accuracy(model, bench, args.site, cfg).items()})
            # the same widths and mean compensation, other criteria: does entropy choose better?
            for crit, scores in baselines.items():
                other = deepcopy(original)
                prune.prune_to_ratio(other, ratio, scores, groups, input_mean=cal.input_mean)
                assert yolo.count_parameters(other) == yolo.count_parameters(model)
                ev = yolo.evaluate(other, data, split="test", imgsz=t.imgsz, batch=cfg.eval.batch,
                                   conf=cfg.eval.conf, iou=cfg.eval.iou)
                row[f"map50_{crit}_no_ft"] = ev.map50
        res = yolo.train(model, data, epochs=args.epochs, imgsz=t.imgsz, batch=t.batch, lr0=args.lr0,
                         weight_decay=t.weight_decay, warmup_iters=t.warmup_iters, mosaic=t.mosaic,
                         workers=t.workers, seed=seed, desc=f"seed {seed} {name}")
        out = yolo.CEDAR_HOME / "models" / "compression" / f"{src.stem}-r{ratio:g}-ft{args.epochs}.pt"
        prune.save_pruned(model, out, kept, prune_ratio=ratio, finetune_epochs=args.epochs, lr0=args.lr0)
        row.update(params=yolo.count_parameters(model), finetune_s=res.seconds, finetune_iterations=res.iterations,
                   weights=str(out), **accuracy(model, bench, args.site, cfg))
        done[(seed, name)] = row
        with jsonl.open("a") as f:
            f.write(json.dumps({**row, "settings": key}) + "\n")
        log.info("seed %d %s: %d params, mAP50 %.3f (no fine-tune %s)", seed, name, row["params"], row["map50"],
                 f"{row['map50_no_ft']:.3f}" if "map50_no_ft" in row else "-")
        rows.append(row)
    for ratio in args.ratios if args.scratch else ():
        # "rethinking the value of pruning": the pruned shape trained from a random init with the same budget
        name = scratch_name(ratio, args.epochs)
        if (seed, name) not in done:
            pruned = yolo.load_weights(done[(seed, variant_name(ratio, args.epochs))]["weights"])
            model = yolo.build_model(args.arch, nc=yolo.num_classes(original), seed=seed,
                                     names=[original.names[k] for k in sorted(original.names)])
            prune.apply_pruning(model, prune.find_groups(model),
                                {g: range(k) for g, k in pruned.cedar_meta["pruned_channels"].items()})
            assert yolo.count_parameters(model) == yolo.count_parameters(pruned)
            res = yolo.train(model, data, epochs=args.epochs, imgsz=t.imgsz, batch=t.batch, lr0=args.lr0,
                             weight_decay=t.weight_decay, warmup_iters=t.warmup_iters, mosaic=t.mosaic,
                             workers=t.workers, seed=seed, desc=f"seed {seed} {name}")
            row = {"seed": seed, "variant": name, "ratio": ratio, "params": yolo.count_parameters(model),
                   "finetune_s": res.seconds, "finetune_iterations": res.iterations,
                   **accuracy(model, bench, args.site, cfg)}
            done[(seed, name)] = row
            with jsonl.open("a") as f:
                f.write(json.dumps({**row, "settings": key}) + "\n")
            log.info("seed %d %s: mAP50 %.3f", seed, name, row["map50"])
        rows.append(done[(seed, name)])
    return rows


def measure_cost(weights: dict[str, str], imgsz: int, runs: int, warmup: int, threads: int, workdir: Path) -> dict:
    """Params, GFLOPs, ONNX size and interleaved torch / ONNX Runtime latency of each model file."""
    import torch

    from common import yolo

    torch.set_num_threads(threads)
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    info, runners = {}, {}
    for name, path in weights.items():
        model = yolo.load_weights(path).eval()
        onnx_path = yolo.export_onnx(model, workdir / f"{len(info)}.onnx", imgsz=imgsz)
        info[name] = {"params": yolo.count_parameters(model), f"gflops_{imgsz}": round(yolo.gflops(model, imgsz), 3),
                      "onnx_mb": onnx_path.stat().st_size / 2**20}
        run_torch, run_onnx, info[name]["onnx_max_abs_diff"] = latency_runners(model, onnx_path, x, threads)
        runners[(name, "torch")], runners[(name, "onnxruntime")] = run_torch, run_onnx
    for (name, rt), stats in time_interleaved(runners, runs, warmup).items():
        info[name][f"{rt}_ms"] = stats
    return info


def summarise(rows: list[dict], cost: dict) -> list[dict]:
    """One line per variant: cost (first seed's model) and accuracy (mean over seeds, per-seed list)."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    base = {r["seed"]: r["map50"] for r in rows if r["variant"] == "original"}
    out = []
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        line = {"variant": name, "ratio": rs[0]["ratio"], "seeds": [r["seed"] for r in rs], **cost.get(name, {})}
        for k in ("map50", "map50_95", "map50_small", "map50_no_ft", "map50_small_no_ft", *CRITERIA,
                  "ratio_achieved"):
            if k in rs[0]:
                line[k] = [float(r[k]) for r in rs]
                line[f"{k}_mean"] = float(np.mean(line[k]))
        line["retention"] = [float(r["map50"] / base[r["seed"]]) if base.get(r["seed"]) else float("nan")
                             for r in rs]
        line["retention_mean"] = float(np.mean(line["retention"]))
        out.append(line)
    return out


def to_markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    imgsz = s["imgsz"]

    def acc(line, key):
        if f"{key}_mean" not in line:
            return "-"
        per = " / ".join(f"{v:.3f}" for v in line[key])
        return f"{line[f'{key}_mean']:.3f}" + (f" ({per})" if len(line[key]) > 1 else "")

    def ms(line, rt):
        c = line.get(f"{rt}_ms")
        return f"{c['median_ms']:.1f} [{c['p25_ms']:.1f}-{c['p75_ms']:.1f}]" if c else "-"

    def cut(line):
        return acc(line, "map50_no_ft")

    base_params = result["summary"][0]["params"]
    lines = [
        "# Entropy channel filtering: a site's YOLO11n before and after compression",
        "",
        f"`{result['command']}`, {result['date']}, on **{m['cpu']}**, {m['logical_cpus']} logical CPUs (KVM guest), "
        f"{m['threads']} thread(s) for torch and ONNX Runtime; torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, "
        f"Ultralytics {m['ultralytics']}. Load average {result['load_before'][0]:.2f} before and "
        f"{result['load_after'][0]:.2f} after (the machine was shared with another benchmark: compare rows with "
        "each other).",
        "",
        f"Models: preset `{s['preset']}`, {s['arch']} trained {s['train_epochs']} epochs on site {s['site']} "
        f"(seeds {s['seeds']}). Pruning: lowest-entropy channels ({s['bins']}-bin histogram entropy of "
        f"post-activation values, bins shared by each layer, on {s['calib_images']} train images, "
        f"`common/prune.py`), one keep fraction per model; fine-tune {s['epochs']} epochs at lr0 {s['lr0']}, "
        f"{imgsz} px, batch {s['batch']} "
        f"({s['iterations_per_epoch']} iterations/epoch). Test split of site {s['site']} ({s['test_images']} images). "
        "Accuracy: mean over seeds (per seed in brackets); \"after cut\": right after pruning (dropped channels' "
        "calibration means folded into the next layer), before the fine-tune; retention = fine-tuned mAP50 / the "
        "original's mAP50. Cost: "
        f"GFLOPs at {imgsz} px (THOP, unfused), latency batch 1 at {imgsz} px, fused, raw head output, median of "
        f"{s['runs']} interleaved rounds [p25-p75].",
        "",
        f"| model | params | removed | GFLOPs@{imgsz} | ONNX MB | torch ms | ORT ms | mAP50 after cut | mAP50 | "
        "retention | mAP50-95 | mAP50 small |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in result["summary"]:
        removed = 1 - line["params"] / base_params
        lines.append(
            f"| {line['variant']} | {line['params'] / 1e6:.3f} M | {removed:.1%} | {line[f'gflops_{imgsz}']:.2f} | "
            f"{line['onnx_mb']:.2f} | {ms(line, 'torch')} | {ms(line, 'onnxruntime')} | {cut(line)} | "
            f"{acc(line, 'map50')} | {line['retention_mean']:.1%} | {acc(line, 'map50_95')} | "
            f"{acc(line, 'map50_small')} |")
    worst = max(line["onnx_max_abs_diff"] for line in result["summary"])
    lines += ["", f"ONNX Runtime vs torch (fused): max abs output difference {worst:.1e} over all rows.", "",
              "Which channels to keep: mAP50 right after the cut (no fine-tune), the same widths and the same "
              "mean compensation, channels chosen by each criterion (highest kept):", "",
              "| removed | entropy, shared bins (ours) | entropy, per-channel bins | BN abs(gamma) | random |",
              "|---|---|---|---|---|"]
    for line in result["summary"]:
        if "map50_no_ft_mean" in line:
            lines.append(f"| {line['ratio']:.0%} | {acc(line, 'map50_no_ft')} | "
                         f"{acc(line, 'map50_entropy_own_range_no_ft')} | {acc(line, 'map50_bn_gamma_no_ft')} | "
                         f"{acc(line, 'map50_random_no_ft')} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--arch", default="yolo11n")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds of the trained models")
    ap.add_argument("--train-epochs", type=int, default=None,
                    help="epochs the models were trained (file name); default: epochs_per_round * num_rounds")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="fractions of parameters removed")
    ap.add_argument("--epochs", type=int, default=5, help="fine-tune epochs (also for the control)")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the control (fine-tuning the unpruned model)")
    ap.add_argument("--scratch", action="store_true",
                    help="also train each pruned shape from a random init with the fine-tune budget")
    ap.add_argument("--lr0", type=float, default=None, help="fine-tune learning rate (default: the preset's)")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--bins", type=int, default=32)
    ap.add_argument("--runs", type=int, default=30, help="timed latency rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wait-min", type=float, default=0, help="wait up to this long for the trained models to appear")
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.md, .json, .jsonl)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bad = [r for r in args.ratios if not 0 < r < 1]
    if bad:
        ap.error(f"--ratios {bad}: each must be in (0, 1)")

    import torch

    from common.benchmark import benchmark_from_config
    from common.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset)
    if args.lr0 is None:
        args.lr0 = cfg.train.lr0
    if args.train_epochs is None:
        args.train_epochs = cfg.train.epochs_per_round * cfg.federation.num_rounds
    bench = benchmark_from_config(cfg.data)
    sources = [weights_path(args.arch, args.site, s, args.train_epochs, cfg.preset) for s in args.seeds]
    deadline = time.time() + 60 * args.wait_min
    while missing := [p for p in sources if not p.is_file()]:
        if time.time() > deadline:
            ap.error(f"trained model(s) not found: {', '.join(map(str, missing))} "
                     "(made by benchmarks.pyrafan_accuracy)")
        log.info("waiting for %s", ", ".join(map(str, missing)))
        time.sleep(120)

    key = {"preset": cfg.preset, "arch": args.arch, "site": args.site, "train_epochs": args.train_epochs,
           "epochs": args.epochs, "lr0": args.lr0, "calib_images": args.calib_images, "bins": args.bins}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    previous = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    done = {(r["seed"], r["variant"]): r for r in previous if r.get("settings") == key}
    load_before = os.getloadavg()
    rows = [r for seed in args.seeds for r in run_seed(seed, args, cfg, bench, key, done, jsonl)]

    first = args.seeds[0]
    weights = {r["variant"]: r["weights"] for r in rows
               if r["seed"] == first and "control" not in r["variant"] and "weights" in r}
    with tempfile.TemporaryDirectory(prefix="cedar-compression-") as tmp:
        cost = measure_cost(weights, cfg.train.imgsz, args.runs, args.warmup, args.threads, Path(tmp))
    if args.control:
        cost[variant_name(0.0, args.epochs)] = cost["original"]  # the same network
    for ratio in args.ratios if args.scratch else ():
        cost[scratch_name(ratio, args.epochs)] = cost[variant_name(ratio, args.epochs)]
    train_images = len(list((bench.site_dir(args.site) / "images" / "train").glob("*.png")))
    settings = {**key, "seeds": args.seeds, "ratios": args.ratios, "imgsz": cfg.train.imgsz,
                "batch": cfg.train.batch, "runs": args.runs, "warmup": args.warmup,
                "iterations_per_epoch": -(-train_images // cfg.train.batch),
                "test_images": len(read_split(bench.site_dir(args.site), "test")[0]), "data_root": str(bench.root)}
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python -m benchmarks.compression " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {**machine(args.threads), "cpu": cpu_model_name()}, "settings": settings,
              "load_before": load_before, "load_after": os.getloadavg(), "summary": summarise(rows, cost),
              "rows": rows}
    write_report(out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
