"""Does distillation help? Whole federations, side by side (paper section 4.3, Table 1, Figure 6).

Variants, each run for every seed on the same built-in benchmark (``data.seed``
fixed, the training seed varies):

- ``none``: local training only (the baseline);
- ``graph``: edge->edge graph-guided KD (top-rho teachers);
- ``cloud``: cloud->edge KD from a YOLO11s trained by the server (``--cloud-rounds``);
- ``all``: naive KD, every other site teaches every site uniformly;
- ``both``: ``graph`` plus the cloud model on ``--cloud-rounds`` (half of the soft labels each).

Distillation runs inside each round's local epochs, so every variant trains
for exactly as many epochs: the differences are the teachers' doing.

``--noisy`` adds a site whose labels follow a different task (Figure 6): the
table then reports the mean mAP50 of the *other* sites and how often the
noisy site was picked as a teacher.

Federations run through :class:`server.local_grid.LocalGrid` (the real
ServerApp and ClientApp code, in one process, no Ray), so the comparison
measures the method, not the transport. Each site's mAP50 is on its own test
split after the last round.

Run::

    python -m benchmarks.kd_federation --preset standard --seeds 0 1 2 --variants none graph cloud
    python -m benchmarks.kd_federation --preset standard --seeds 0 1 2 --variants none graph all --noisy

``--set data.similar-pairs=true --out benchmarks/results/kd_similar`` runs the same on a benchmark
where sites come in pairs of the same kind (``common.benchmark.make_sites``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.harness import cpu_model_name, write_report

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "none": {"kd.mode": "none"},
    "graph": {"kd.mode": "graph"},
    "all": {"kd.mode": "all", "kd.student-check": False},  # naive: no site refuses a teacher
    "cloud": {"kd.mode": "none"},  # + kd.cloud-rounds
    "both": {"kd.mode": "graph"},  # + kd.cloud-rounds
}
CLOUD_VARIANTS = ("cloud", "both")


def settings_view(settings: dict, variant: str) -> dict:
    """The part of a run's settings that its result depends on.

    ``none`` ignores every KD setting and the noisy site: without distillation the
    sites never see each other's models, so the regular sites' results are the same
    with or without a noisy site in the federation (the noisy run reuses them).
    ``all`` ignores ``kd.check-margin``: its students never check their teachers.
    """
    view = {"preset": settings.get("preset")} if variant == "none" else \
        {k: settings.get(k) for k in ("preset", "noisy")}
    # kd.check-margin is compared as its own field (runs before it existed had none: 0)
    view["set"] = sorted(s for s in settings.get("set", []) if not s.startswith("kd.check-margin")
                         and (variant != "none" or not s.startswith("kd.")))
    if variant != "none":
        view.update({k: settings.get(k) for k in ("teacher_rank", "better_only", "student_check", "schedule")})
        view["teacher_scope"] = settings.get("teacher_scope", "global")
        # the margin only matters to a student that checks its teachers ("all" never does)
        checks = VARIANTS[variant].get("kd.student-check", True)
        view["check_margin"] = settings.get("check_margin", 0.0) if checks else None
    if variant in CLOUD_VARIANTS:
        view["cloud_rounds"] = settings.get("cloud_rounds")
    return view


def run_variant(preset: str, variant: str, seed: int, overrides: dict, cloud_rounds: list[int], out_dir: Path,
                name: str | None = None, start_from: Path | None = None) -> dict:
    """One federation; its run folder is ``out_dir / name`` (default ``<variant>-seed<seed>``).

    ``start_from``: the run folder of a finished federation to continue from (its rounds
    are copied and the run resumes after them, ``federation.resume``): variants whose first
    rounds are identical (no KD before ``kd.start-round``) train those rounds once.
    """
    import shutil

    from common.config import load_config
    from common.sites import num_sites
    from server.federation import run_federation
    from server.local_grid import LocalGrid

    ov = {"kd.cloud-rounds": [], "federation.late-sites": [],  # the variant decides, whatever the preset says
          "model.edge-init": "scratch", "cloud.serve": False,  # what the KD results measure: sites from scratch
          **overrides, **VARIANTS[variant], "seed": seed, "output-dir": str(out_dir),
          "run-name": name or f"{variant}-seed{seed}", "tracking.wandb": "off", "federation.wait-for-nodes-s": 0}
    if variant in CLOUD_VARIANTS:
        ov["kd.cloud-rounds"] = cloud_rounds
    if start_from is not None:
        dest = out_dir / ov["run-name"]
        shutil.rmtree(dest, ignore_errors=True)  # what a crashed attempt left
        shutil.copytree(start_from, dest)
        (dest / "DONE").unlink(missing_ok=True)
        ov["federation.resume"] = True
    cfg = load_config(preset, ov)
    run_config = {"preset": preset, "overrides": " ".join(
        f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, list) else v}" for k, v in ov.items())}
    t0 = time.perf_counter()
    out = run_federation(LocalGrid(run_config, range(1, num_sites(cfg) + 1)), cfg)
    rows = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in rows)
    final = {r["site_id"]: r["test_map50"] for r in rows if r["round"] == last}
    sites = {r["site_id"] for r in rows}
    if last != cfg.federation.num_rounds or set(final) != sites:  # a benchmark never scores a failed node's old model
        raise RuntimeError(f"{out.run_dir}: round {cfg.federation.num_rounds} has no result from "
                           f"{sorted(sites - set(final)) if last == cfg.federation.num_rounds else sorted(sites)} "
                           "(see the run's log for the nodes' errors)")
    # per KD round, the teachers each student actually distilled from (after its own check)
    kept = [{r["site_id"]: sorted(r["teachers"]) for r in rows if r["round"] == n and r.get("teachers")}
            for n in range(1, last + 1)]
    teachers = []
    for g in sorted((out.run_dir / "graphs").glob("round-*.json")) if (out.run_dir / "graphs").is_dir() else []:
        rec = json.loads(g.read_text())
        teachers.append(sorted(rec.get("teachers") or {t for v in rec.get("teachers_for", {}).values() for t in v}))
    return {"variant": variant, "seed": seed, "final_test_map50": final, "teachers_per_round": teachers,
            "kept_per_round": kept, "seconds": time.perf_counter() - t0}


def summarise(results: list[dict], noisy_site: str | None) -> list[str]:
    by_variant: dict[str, dict[int, float]] = {}  # variant -> seed -> mean over the (regular) sites
    picked: dict[str, str] = {}
    for r in results:
        sites = {s: v for s, v in r["final_test_map50"].items() if s != noisy_site}
        by_variant.setdefault(r["variant"], {})[r["seed"]] = statistics.fmean(sites.values())
        if noisy_site:
            proposed = sum(noisy_site in t for t in r["teachers_per_round"])
            taught = sum(noisy_site in ts for kept in r.get("kept_per_round", []) for ts in kept.values())
            old = picked.get(r["variant"], "0 / 0").split(" / ")
            picked[r["variant"]] = f"{int(old[0]) + proposed} / {int(old[1]) + taught}"
    none = by_variant.get("none", {})
    lines = ["| variant | mean edge mAP50 | std over seeds | per seed | vs none on the same seeds |"
             + (" noisy site picked as teacher (rounds) / taught (student-rounds) |" if noisy_site else ""),
             "|---|---|---|---|---|" + ("---|" if noisy_site else "")]
    for variant, per_seed in by_variant.items():
        vals = list(per_seed.values())
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        paired = [s for s in per_seed if s in none]
        base = statistics.fmean(none[s] for s in paired) if paired else None
        rel = f"{100 * (statistics.fmean(per_seed[s] for s in paired) - base) / base:+.1f}%" if base else "-"
        line = (f"| {variant} | {mean:.3f} | {std:.3f} | "
                f"{', '.join(f'{v:.3f} (s{s})' for s, v in per_seed.items())} | {rel} |")
        lines.append(line + (f" {picked.get(variant, 0)} |" if noisy_site else ""))
    variants = list(by_variant)
    sites = sorted({s for r in results for s in r["final_test_map50"]})
    common = set.intersection(*(set(per_seed) for per_seed in by_variant.values()))
    lines += ["", f"Per site, own test mAP50 after the last round (mean over the seeds every variant has: "
              f"{', '.join(map(str, sorted(common)))}):", "",
              "| site | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for site in sites:
        cells = [[r["final_test_map50"][site] for r in results if r["variant"] == v and r["seed"] in common
                  and site in r["final_test_map50"]] for v in variants]
        lines.append(f"| {site} | " + " | ".join(f"{statistics.fmean(c):.3f}" if c else "-" for c in cells) + " |")
    teachers = {(r["variant"], r["seed"]): r["teachers_per_round"] for r in results if r["teachers_per_round"]}
    if teachers:
        lines += ["", "Teachers per KD round: " + "; ".join(
            f"{v} seed {s}: {' / '.join(','.join(t) or '-' for t in ts)}" for (v, s), ts in teachers.items()), ""]
    kept = {(r["variant"], r["seed"]): r["kept_per_round"] for r in results if any(r.get("kept_per_round", []))}
    if kept:
        lines += ["Student <- teachers it kept, per round (after the student-side check): " + "; ".join(
            f"{v} seed {s}: " + " / ".join(f"r{n + 1} " + (", ".join(f"{st}<-{'+'.join(ts)}" for st, ts in k.items()))
                                           for n, k in enumerate(ks) if k)
            for (v, s), ks in kept.items()), ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["none", "graph", "cloud"], choices=sorted(VARIANTS))
    parser.add_argument("--cloud-rounds", type=int, nargs="+", default=[2])
    parser.add_argument("--noisy", action="store_true", help="add a site trained on a different task")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    parser.add_argument("--out", type=Path, default=None, help="results file stem (default benchmarks/results/...)")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the finished runs only")
    parser.add_argument("--report", type=Path, default=None, help="stem of the .md/.json tables (default: --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from common.config import load_config, parse_value

    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.noisy:
        overrides["data.noisy-site"] = True
    cfg = load_config(args.preset, overrides)
    noisy_site = f"site-{cfg.data.num_sites}" if args.noisy else None
    stem = args.out or RESULTS / ("kd_federation_noisy" if args.noisy else "kd_federation")
    stem.parent.mkdir(parents=True, exist_ok=True)
    # one JSON line per finished federation, keyed by the settings: a rerun skips what is done (resume)
    key = {"preset": args.preset, "set": sorted(args.set), "noisy": args.noisy, "cloud_rounds": args.cloud_rounds,
           "teacher_rank": cfg.kd.teacher_rank, "better_only": cfg.kd.better_only,
           "student_check": cfg.kd.student_check, "schedule": "in-round", "teacher_scope": cfg.kd.teacher_scope,
           "check_margin": cfg.kd.check_margin}
    jsonl = stem.with_suffix(".jsonl")
    # the noisy experiment (stem "<name>_noisy") also finds its "none" runs among the plain federations'
    # ("<name>.jsonl"; see settings_view)
    plain = stem.with_name(stem.name.removesuffix("_noisy") + ".jsonl")
    files = {jsonl, plain} if args.noisy else {jsonl}
    lines = [json.loads(line) for f in sorted(files) if f.is_file() for line in f.read_text().splitlines()]
    done = {(r["variant"], r["seed"]): r for r in lines
            if settings_view(r.get("settings", {}), r["variant"]) == settings_view(key, r["variant"])}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cedar-kd-bench-") as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                if (variant, seed) in done or args.report_only:
                    continue
                result = {**run_variant(args.preset, variant, seed, overrides, args.cloud_rounds, Path(tmp)),
                          "settings": key}
                with jsonl.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                done[variant, seed] = result
                logging.info("%s seed %s: %s", variant, seed, result["final_test_map50"])
    results = [done[v, s] for s in args.seeds for v in args.variants if (v, s) in done]
    wall = sum(r["seconds"] for r in results)
    header = [
        f"# Distillation in a federation ({'with a noisy site' if args.noisy else 'edge->edge and cloud->edge'})",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python -m benchmarks.kd_federation "
        f"--preset {args.preset} --seeds {' '.join(map(str, args.seeds))} --variants {' '.join(args.variants)}"
        f"{' --noisy' if args.noisy else ''}{' --set ' + ' '.join(args.set) if args.set else ''}` on "
        f"{cpu_model_name()}, 2 CPU cores; {wall:.0f} s of federations ({time.perf_counter() - t0:.0f} s in "
        "this invocation; the runs are resumable).",
        "",
        f"{cfg.data.num_sites} sites{' + 1 noisy' if args.noisy else ''}, {cfg.federation.num_rounds} rounds of "
        f"{cfg.train.epochs_per_round} local epochs at {cfg.train.imgsz} px; KD: rho {cfg.kd.rho}, "
        f"alpha {cfg.kd.alpha}, T {cfg.kd.temperature}, inside the local epochs from round {cfg.kd.start_round}, "
        f"teachers ranked by {cfg.kd.teacher_rank} ({cfg.kd.teacher_scope} scope)"
        f"{', only more accurate teachers' if cfg.kd.better_only else ''}"
        + (f", kept by a student only if better on its own val split by > {cfg.kd.check_margin:g}"
           if cfg.kd.student_check else "")
        + (f"; cloud rounds {args.cloud_rounds}" if set(CLOUD_VARIANTS) & set(args.variants) else "")
        + ". mAP50 = mean over sites of each site's own test split after the last "
        "round" + (" (the noisy site excluded)." if args.noisy else "."),
        "",
    ]
    write_report(args.report or stem, results, "\n".join(header + summarise(results, noisy_site)) + "\n")


if __name__ == "__main__":
    main()
