"""Robustness to adverse conditions: YOLO11n trained without vs with adverse augmentation.

Two kinds of model, same budget (the PyraFAN accuracy benchmark's training call:
``epochs_per_round * num_rounds`` epochs of the preset's optimiser settings on the
site's ``train`` split), per seed:

* **without**: the plain YOLO11n that ``benchmarks.pyrafan_accuracy`` saves
  (``<CEDAR_HOME>/models/<preset>-yolo11n-site<i>-seed<s>-<E>ep.pt``), reused;
  ``--train-missing`` trains a missing one with that benchmark's ``run_one``;
* **with** (one model per ``--adverse-p`` value, named ``p=<p>``): the same call plus
  :class:`common.adverse.AdverseAugment` (each loaded training image gets a random
  condition at a random severity 1-3 with probability p), saved as
  ``<preset>-yolo11n-adverse<p>-site<i>-seed<s>-<E>ep.pt`` and skipped when the file exists (resume).

Every model is evaluated (``common.yolo.evaluate``, mAP50 and mAP50-95) on the site's
clean ``test`` split and on adverse copies of it (``common.adverse.make_variant``,
one fixed corruption seed, so every model sees the same corrupted images) for each
condition and severity. The table gives mean ± std over seeds (sample std).

Note that training and test corruptions come from the same families and parameter
table (different random draws): this measures robustness to *seen* kinds of
corruption, not generalisation to unseen ones.

Full run (standard preset, site 0, seeds 1 and 2, one thread, p = 0.5 and 0.2)::

    python -m benchmarks.robustness --adverse-p 0.5 0.2 --set train.threads=1

Smoke run::

    python -m benchmarks.robustness --preset quick --epochs 1 --seeds 0 --train-missing --out /tmp/rob
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import machine, write_report

log = logging.getLogger("benchmarks.robustness")

ARCH = "yolo11n"
RESULTS = Path(__file__).resolve().parent / "results" / "robustness"


def training_name(p: float | None) -> str:
    """``without`` (plain) or ``p=0.5`` (adverse augmentation with that probability)."""
    return "without" if p is None else f"p={p:g}"


def adverse_weights_path(site: int, seed: int, epochs: int, preset: str, p: float) -> Path:
    from common.yolo import CEDAR_HOME

    return CEDAR_HOME / "models" / f"{preset}-{ARCH}-adverse{p:g}-site{site}-seed{seed}-{epochs}ep.pt"


def train_with_adverse(site: int, seed: int, bench, cfg, epochs: int, p: float) -> Path:
    """``benchmarks.pyrafan_accuracy.run_one``'s training call plus the adverse hook; saved, skipped if present."""
    path = adverse_weights_path(site, seed, epochs, cfg.preset, p)
    if path.is_file():
        return path
    import torch

    from common import yolo
    from common.adverse import AdverseAugment
    from common.benchmark import CLASS_NAMES

    t = cfg.train
    model = yolo.build_model(ARCH, nc=len(CLASS_NAMES), seed=seed, names=list(CLASS_NAMES))
    torch.set_num_threads(t.threads)
    augment = AdverseAugment(p, seed=seed)
    log.info("training %s with adverse_p=%g, site %d seed %d, %d epochs", ARCH, p, site, seed, epochs)
    res = yolo.train(model, bench.site_data(site), epochs=epochs, imgsz=t.imgsz, batch=t.batch, lr0=t.lr0,
                     weight_decay=t.weight_decay, warmup_iters=t.warmup_iters, mosaic=t.mosaic, workers=t.workers,
                     seed=seed, device=t.device, desc=f"{ARCH} adverse{p:g} site {site} seed {seed}",
                     augment=augment)
    return yolo.save_weights(model, path, site=site, seed=seed, epochs=epochs, imgsz=t.imgsz, adverse_p=p,
                             train_s=res.seconds, iterations=res.iterations, threads=t.threads,
                             loaded_images=augment.calls, corrupted=dict(augment.applied))


def baseline_weights(site: int, seed: int, bench, cfg, epochs: int, train_missing: bool) -> Path:
    from benchmarks.pyrafan_accuracy import run_one, weights_path

    path = weights_path(ARCH, site, seed, epochs, cfg.preset)
    if not path.is_file():
        if not train_missing:
            raise FileNotFoundError(f"{path} is missing: run benchmarks.pyrafan_accuracy for site {site} seed "
                                    f"{seed}, or pass --train-missing")
        log.info("training the plain %s, site %d seed %d, %d epochs", ARCH, site, seed, epochs)
        run_one(ARCH, site, seed, bench, cfg, epochs)
    return path


def _pyrafan_record(path: Path) -> dict:
    """``train_s`` of the ``benchmarks.pyrafan_accuracy`` run that saved ``path`` ({} if none)."""
    from benchmarks.pyrafan_accuracy import RESULTS as PYRAFAN

    jsonl = PYRAFAN.with_suffix(".jsonl")
    for line in jsonl.read_text().splitlines() if jsonl.is_file() else []:
        rec = json.loads(line)
        if rec.get("weights") == str(path):
            return {"train_s": rec["train_s"]}
    return {}


def variants(data_yaml: Path, cache: Path, conditions, severities, seed: int) -> dict[str, Path]:
    """``{"clean": data_yaml, "fog/2": <copy>/data.yaml, ...}``; copies are reused when their settings match."""
    from common import adverse

    out = {"clean": Path(data_yaml)}
    for condition in conditions:
        for severity in severities:
            folder = cache / f"{condition}-s{severity}-seed{seed}"
            meta = folder / "adverse.json"
            fresh = meta.is_file() and json.loads(meta.read_text()).get("source") == str(Path(data_yaml).resolve())
            if not fresh:
                adverse.make_variant(data_yaml, ["test"], condition, severity, folder, seed=seed)
            out[f"{condition}/{severity}"] = folder / "data.yaml"
    return out


def examples_grid(datasets: dict[str, Path], conditions, severities, path: Path, index: int = 0) -> Path:
    """One test image: a row per condition, clean then each severity (JPEG)."""
    import cv2

    from common.sites import split_dir

    def image(name: str):
        files = sorted(split_dir(datasets[name], "test").glob("*.png"))
        return cv2.imread(str(files[index]))

    clean = image("clean")
    rows = [np.concatenate([clean] + [image(f"{c}/{v}") for v in severities], 1) for c in conditions]
    grid = np.concatenate(rows, 0)
    for r, c in enumerate(conditions):
        for k, label in enumerate(["clean"] + [f"{c} {v}" for v in severities]):
            org = (k * clean.shape[1] + 4, r * clean.shape[0] + 16)
            cv2.putText(grid, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(grid, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), grid, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return path


def summarise(records: list[dict]) -> dict:
    """``{training: {dataset: {map50_mean, map50_std, map50_95_mean, map50_95_std, seeds}}}``."""
    out: dict = {}
    for r in records:
        out.setdefault(r["training"], {}).setdefault(r["dataset"], []).append(r)
    summary = {}
    for training, per_ds in out.items():
        summary[training] = {}
        for ds, rows in per_ds.items():
            cell = {"seeds": sorted(r["seed"] for r in rows), "instances": rows[0]["instances"]}
            for k in ("map50", "map50_95"):
                v = [r[k] for r in rows]
                cell[f"{k}_mean"] = float(np.mean(v))
                cell[f"{k}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
            summary[training][ds] = cell
    return summary


def _pm(cell: dict | None, key: str = "map50") -> str:
    if cell is None:
        return ""
    std = cell[f"{key}_std"]
    return f"{cell[f'{key}_mean']:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def to_markdown(result: dict) -> str:
    s, m, summary = result["settings"], result["machine"], result["summary"]
    conditions, table_sev = s["conditions"], s["table_severity"]
    trainings = [training_name(None)] + [training_name(p) for p in s["adverse_p"]]
    labels = {t: f"{ARCH} (plain)" if t == "without" else f"{ARCH} + adverse aug. ({t})" for t in trainings}
    ps = ", ".join(f"{p:g}" for p in s["adverse_p"])
    lines = [
        "# Robustness to adverse conditions",
        "",
        f"`{result['command']}`, {result['date']}, on **{m['cpu']}**, {m['logical_cpus']} logical CPUs, "
        f"{s['threads']} torch thread(s); torch {m['torch']}, Ultralytics {m['ultralytics']}. "
        f"Wall time {result['wall_s'] / 60:.1f} min (including training the models that were missing: "
        f"{', '.join(result['trained_now']) or 'none'}). The machine was shared with other work.",
        "",
        f"Preset `{s['preset']}`, site {s['site']}, seeds {s['seeds']}: YOLO11n trained {s['epochs']} epochs at "
        f"{s['imgsz']} px, batch {s['batch']} on the site's {s['train_images']} train images, without and with "
        f"adverse augmentation (`common.adverse.AdverseAugment`, p = {ps}: a random condition at "
        "a random severity 1-3 on each loaded training image, before Ultralytics' own augmentation); the same "
        "training call otherwise. Evaluated on the site's test split "
        f"({s['test_images']} images) clean and corrupted (`python -m common.adverse make`, corruption seed "
        f"{s['corruption_seed']}, the same images for every model). mAP50 (Ultralytics' validator), "
        "mean ± std over seeds.",
        "",
        f"![one test image, clean and under each condition]({result['examples']})" if result.get("examples")
        else "",
        "",
        f"Severity {table_sev}:",
        "",
        "| training | clean | " + " | ".join(conditions) + " | mean adverse |",
        "|---|---|" + "---|" * (len(conditions) + 1),
    ]
    for training in trainings:
        if training not in summary:
            continue
        row = summary[training]
        cells = [_pm(row.get("clean"))] + [_pm(row.get(f"{c}/{table_sev}")) for c in conditions]
        lines.append(f"| {labels[training]} | " + " | ".join(cells) + f" | {row['mean_adverse'][str(table_sev)]:.3f} |")
    for training in trainings[1:]:
        if training not in summary or "without" not in summary:
            continue
        w, wo = summary[training], summary["without"]
        deltas = [w["clean"]["map50_mean"] - wo["clean"]["map50_mean"]]
        deltas += [w[f"{c}/{table_sev}"]["map50_mean"] - wo[f"{c}/{table_sev}"]["map50_mean"] for c in conditions]
        deltas.append(w["mean_adverse"][str(table_sev)] - wo["mean_adverse"][str(table_sev)])
        lines.append(f"| Δ ({training} − without) | " + " | ".join(f"{d:+.3f}" for d in deltas) + " |")
    lines += ["", f"Every severity (mAP50, mean over seeds; {' → '.join(trainings)}):", "",
              "| condition | " + " | ".join(f"severity {v}" for v in s["severities"]) + " |",
              "|---|" + "---|" * len(s["severities"])]
    for c in conditions:
        cells = []
        for v in s["severities"]:
            got = [summary.get(t, {}).get(f"{c}/{v}") for t in trainings]
            cells.append(" → ".join(f"{x['map50_mean']:.3f}" for x in got if x is not None))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Parameters (`common.adverse.PARAMS`; motion-blur lengths at 320 px):", "",
              "| condition | " + " | ".join(f"severity {v}" for v in s["severities"]) + " |",
              "|---|" + "---|" * len(s["severities"])]
    for c in conditions:
        params = {str(k): v for k, v in result["params"][c].items()}
        lines.append(f"| {c} | " + " | ".join(
            ", ".join(f"{k} {x:g}" for k, x in params[str(v)].items()) for v in s["severities"]) + " |")
    dropped = {k: v for k, v in result["dropped_labels"].items() if v}
    if dropped:
        lines += ["", "Occlusion drops the labels of objects with less than 10 % of their box visible: "
                  + ", ".join(f"{k}: {v} of {result['test_labels']}" for k, v in dropped.items()) + "."]
    if result.get("training_runs"):
        lines += ["", "Training runs: " + "; ".join(
            f"{r['training']} seed {r['seed']}: {r['train_s'] / 60:.1f} min"
            + (f" ({r['threads']} thread(s))" if r.get("threads") else "") for r in result["training_runs"]) + "."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys
    from datetime import datetime, timezone

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=None,
                    help="default: train.epochs_per_round * federation.num_rounds of the preset")
    ap.add_argument("--adverse-p", type=float, nargs="+", default=[0.5],
                    help="one model per probability and seed (default: 0.5)")
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--table-severity", type=int, default=2)
    ap.add_argument("--corruption-seed", type=int, default=0)
    ap.add_argument("--train-missing", action="store_true", help="train missing plain models too")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (e.g. train.threads=1)")
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.md, .json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.perf_counter()

    import cv2
    import torch

    from benchmarks.pyrafan_accuracy import weights_path
    from common import adverse, yolo
    from common.benchmark import benchmark_from_config
    from common.config import load_config, parse_value

    cv2.setNumThreads(1)
    overrides = {k: parse_value(v) for k, _, v in (item.partition("=") for item in args.set)}
    cfg = load_config(args.preset, overrides)
    torch.set_num_threads(cfg.train.threads)
    bench = benchmark_from_config(cfg.data)
    epochs = args.epochs if args.epochs is not None else cfg.train.epochs_per_round * cfg.federation.num_rounds
    data = bench.site_data(args.site)

    # models: reuse, or train (resumable: one file per model)
    models, trained_now, runs = {}, [], []
    for p in [*args.adverse_p, None]:  # ours first: the plain ones may still be on their way
        for seed in args.seeds:
            name = training_name(p)
            if p is not None:
                path = adverse_weights_path(args.site, seed, epochs, cfg.preset, p)
                trained_now += [] if path.is_file() else [f"{name} seed {seed}"]
                models[(name, seed)] = train_with_adverse(args.site, seed, bench, cfg, epochs, p)
            else:
                path = weights_path(ARCH, args.site, seed, epochs, cfg.preset)
                trained_now += [] if path.is_file() else [f"{name} seed {seed}"]
                models[(name, seed)] = baseline_weights(args.site, seed, bench, cfg, epochs, args.train_missing)
    order = [training_name(None)] + [training_name(p) for p in args.adverse_p]
    models = {k: models[k] for k in sorted(models, key=lambda k: (order.index(k[0]), k[1]))}
    for (training, seed), path in models.items():
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        if "train_s" not in meta:  # a plain model: its training time is in the PyraFAN benchmark's records
            meta = {**meta, **_pyrafan_record(path)}
        if "train_s" in meta:
            runs.append({"training": training, "seed": seed, "train_s": meta["train_s"],
                         "threads": meta.get("threads"), "corrupted": meta.get("corrupted"),
                         "loaded_images": meta.get("loaded_images")})

    # the corrupted test splits, shared by every model
    cache = yolo.CEDAR_HOME / "adverse" / bench.root.name / f"site-{args.site}"
    datasets = variants(data, cache, adverse.CONDITIONS, args.severities, args.corruption_seed)

    e, t = cfg.eval, cfg.train
    records = []
    for (training, seed), path in models.items():
        model = yolo.load_weights(path)
        for name, ds in datasets.items():
            ev = yolo.evaluate(model, ds, split="test", imgsz=t.imgsz, batch=e.batch, conf=e.conf, iou=e.iou,
                               device=t.device)
            records.append({"training": training, "seed": seed, "dataset": name, "map50": ev.map50,
                            "map50_95": ev.map50_95, "images": ev.images, "instances": ev.instances,
                            "eval_s": ev.seconds})
            log.info("%s seed %d on %s: mAP50 %.3f", training, seed, name, ev.map50)

    summary = summarise(records)
    for row in summary.values():
        row["mean_adverse"] = {str(v): float(np.mean([row[f"{c}/{v}"]["map50_mean"] for c in adverse.CONDITIONS]))
                               for v in args.severities}
    dropped = {}
    for name, ds in datasets.items():
        meta = ds.parent / "adverse.json"
        dropped[name] = json.loads(meta.read_text())["splits"]["test"]["dropped_labels"] if meta.is_file() else 0
    test_labels = sum(len(p.read_text().splitlines()) for p in (bench.site_dir(args.site) / "labels" / "test")
                      .glob("*.txt"))
    settings = {"preset": cfg.preset, "site": args.site, "seeds": args.seeds, "epochs": epochs,
                "imgsz": t.imgsz, "batch": t.batch, "threads": t.threads, "adverse_p": args.adverse_p,
                "conditions": list(adverse.CONDITIONS), "severities": args.severities,
                "table_severity": args.table_severity, "corruption_seed": args.corruption_seed,
                "train_images": len(list((bench.site_dir(args.site) / "images" / "train").glob("*.png"))),
                "test_images": len(list((bench.site_dir(args.site) / "images" / "test").glob("*.png"))),
                "data": str(data), "models": {f"{k[0]}-seed{k[1]}": str(v) for k, v in models.items()}}
    result = {"command": "python -m benchmarks.robustness " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(cfg.train.threads),
              "wall_s": time.perf_counter() - t_start, "trained_now": trained_now, "training_runs": runs,
              "settings": settings, "params": {c: adverse.PARAMS[c] for c in adverse.CONDITIONS},
              "dropped_labels": dropped, "test_labels": test_labels, "summary": summary, "records": records}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = examples_grid(datasets, adverse.CONDITIONS, args.severities, out.parent / f"{out.name}_examples.jpg")
    result["examples"] = grid.name
    write_report(out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
