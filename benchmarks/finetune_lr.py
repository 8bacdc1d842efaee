"""The learning rate of the rounds that continue a trained model (``train.finetune_lr0``), side by side.

Every federation round after a site's first continues the site's own model with a
fresh AdamW (warm-up, cosine decay). This benchmark takes the reproduction's
round-1 models (``benchmarks.reproduce``: its ``fed:base:<seed>`` federations and
its cloud model, from the reproduction's job cache) and runs the reproduction's
second round again for each continuation learning rate, without KD (``none``) and
with cloud->edge KD (``cloud``), every seed: the same starting models, the same
data order, only the rate differs.

    python -m benchmarks.finetune_lr --lrs 0.01 0.002

Writes ``benchmarks/results/finetune_lr.md`` / ``.json``; results are cached in
``<work>/finetune_lr.jsonl`` (a rerun only runs what is missing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

from benchmarks.harness import cpu_model_name, write_report
from benchmarks.reproduce import RESULTS, job_config, load_cache, run_job, settings_key

log = logging.getLogger("benchmarks.finetune_lr")


def _job(preset: str, name: str, seed: int, lr: float, work: str, done: dict) -> dict:
    res = run_job(f"fed:{name}:{seed}", preset, {"train.finetune-lr0": lr}, str(Path(work) / f"lr{lr:g}"), done)
    return {"name": name, "seed": seed, "lr": lr, "final_test_map50": res["final_test_map50"],
            "seconds": res["seconds"]}


def reproduction_jobs(preset: str, work: Path) -> dict:
    """The reproduction's cached jobs at its default settings: ``{job: result}``."""
    cfg, _ = job_config(preset, {})
    key, cache = settings_key(preset, {}, cfg), work / "jobs.jsonl"
    if not cache.is_file():
        raise FileNotFoundError(f"{cache}: run `python -m benchmarks.reproduce --preset {preset}` first")
    return load_cache(cache, key)


def to_markdown(rows: list[dict], meta: dict) -> str:
    lrs, seeds, names = meta["lrs"], meta["seeds"], meta["variants"]

    def mean_map(name, seed, lr):
        (r,) = [r for r in rows if (r["name"], r["seed"], r["lr"]) == (name, seed, lr)]
        return statistics.fmean(r["final_test_map50"].values())

    lines = ["# Learning rate of the continuation rounds (`train.finetune_lr0`)", "",
             f"`{meta['command']}` on {meta['machine']}, {meta['date']}; {meta['wall_s'] / 60:.1f} min wall for "
             f"the {len(rows) - meta['cached']} runs of this invocation ({meta['cached']} from an earlier one's cache), "
             f"{meta['workers']} jobs at a time, 1 torch thread each. From the `{meta['preset']}` reproduction's "
             "round-1 models (same models, same data order per seed), its round 2 "
             f"({meta['epochs']} epochs) at each peak learning rate; mean test mAP50 over the sites. "
             "Round 1 (from scratch) stays at `train.lr0`.", "",
             "| variant | " + " | ".join(f"lr {lr:g}, seed {s}" for lr in lrs for s in seeds)
             + " | " + " | ".join(f"lr {lr:g}, mean ± std" for lr in lrs) + " |",
             "|---|" + "---|" * (len(lrs) * (len(seeds) + 1))]
    for name in names:
        cells = [f"{mean_map(name, s, lr):.3f}" for lr in lrs for s in seeds]
        for lr in lrs:
            vals = [mean_map(name, s, lr) for s in seeds]
            cells.append(f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "none" in names and "cloud" in names:
        lines += ["", "Cloud->edge KD relative to no KD, per seed:", "", "| lr | " + " | ".join(
            f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---|" * (len(seeds) + 1)]
        for lr in lrs:
            rel = [100 * (mean_map("cloud", s, lr) / mean_map("none", s, lr) - 1) for s in seeds]
            lines.append(f"| {lr:g} | " + " | ".join(f"{x:+.1f}%" for x in rel) + f" | {statistics.fmean(rel):+.1f}% |")
    lines += ["", "Base (round 1) mean test mAP50 per seed: "
              + ", ".join(f"seed {s} {v:.3f}" for s, v in meta["base"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from common import yolo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.002])
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the reproduction's")
    ap.add_argument("--variants", nargs="+", default=["none", "cloud"], choices=["none", "cloud", "graph", "both"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="the reproduction's work folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work or yolo.CEDAR_HOME / "reproduce" / args.preset
    cfg, _ = job_config(args.preset, {})
    seeds = args.seeds or list(cfg.reproduce.seeds)
    done = reproduction_jobs(args.preset, work)
    needed = ["cloud", *(f"fed:base:{s}" for s in seeds)]
    if missing := [j for j in needed if j not in done]:
        raise SystemExit(f"the reproduction's cache {work / 'jobs.jsonl'} lacks {missing}")
    cache = work / "finetune_lr.jsonl"
    rows = [json.loads(x) for x in cache.read_text().splitlines()] if cache.is_file() else []
    have = {(r["name"], r["seed"], r["lr"]) for r in rows}
    todo = [(n, s, lr) for s in seeds for n in args.variants for lr in args.lrs if (n, s, lr) not in have]
    log.info("%d runs, %d cached", len(todo) + len(have), len(have))
    t0 = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_job, args.preset, n, s, lr, str(work / "finetune-lr"),
                               {"cloud": done["cloud"], f"fed:base:{s}": done[f"fed:base:{s}"]}) for n, s, lr in todo]
        for fut in futures:
            row = fut.result()
            rows.append(row)
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("done %s seed %s lr %g: %s", row["name"], row["seed"], row["lr"], row["final_test_map50"])
    rows = [r for r in rows if r["seed"] in seeds and r["lr"] in args.lrs and r["name"] in args.variants]
    meta = {"command": "python -m benchmarks.finetune_lr " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{cpu_model_name()}, {os.cpu_count()} CPU cores", "preset": args.preset,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - t0,
            "workers": args.workers, "cached": len(have), "lrs": args.lrs, "seeds": seeds, "variants": args.variants,
            "epochs": cfg.reproduce.epochs_per_round,
            "base": {s: statistics.fmean(done[f"fed:base:{s}"]["final_test_map50"].values()) for s in seeds}}
    write_report(args.out / "finetune_lr", {"meta": meta, "runs": rows}, to_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
