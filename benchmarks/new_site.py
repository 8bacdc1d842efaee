"""A new site joins with few labels and its own video: graph KD against the alternatives (paper section 4.3).

The scenario, fixed before measuring: on the built-in benchmark with sites in pairs of one kind
(``data.similar-pairs``), the established sites 0-2 train alone for ``--established-rounds`` rounds from
the base model. Then two sites join, each with only ``L`` labelled training images (the first ``L`` of its
train split) and its unlabelled video:

- the **test** site 3, of site 2's kind (its sibling) at another position;
- the **control** site 4, of a kind no established site shares.

Each arm trains the joining site for the same rounds and epochs (``--rounds``, ``--epochs``); only where
its weights and soft labels come from differs:

- ``alone`` (a): from the base model, its labels only;
- ``average`` (b): each round starts from half its own weights and half its graph teachers' (by weight);
- ``warm`` (c): starts from its top graph teacher's model, then trains alone;
- ``kd`` (d): graph KD (soft labels) on its labelled images;
- ``kd-unlabelled`` (e): graph KD whose transfer set adds its video frames with the teachers' pseudo-labels
  (``kd.unlabelled-frames``; :meth:`clients.site.LocalSite.transfer_set`), the frames never leaving the site;
- ``warm-kd-unlabelled`` (f): (c) + (e) (``kd.new-node-init=teacher``);
- ``cloud-unlabelled``: (e) with the cloud model as the only teacher;
- ``library``: Ultralytics' own distillation (the trainer's ``distill_model``: detection loss plus a
  teacher-score-weighted L2 between projected neck features, :func:`common.yolo.train`'s
  ``feature_teacher``) from the top graph teacher, on its labelled images, in the same training loop.

The teachers are the graph's for a joining site (:meth:`strategies.graph_kd.GraphKDStrategy.edge_plan`
on the established sites' benchmark profiles and the joining site's profile from the base weights), and
are the established sites' models after their rounds, fixed: in this benchmark the established sites do
not train on after the join, so no arm can change them (a joining site teaches nobody in its first round;
from the second on a federation could also pick it as a teacher, which this benchmark does not measure).
The student check is off: every arm uses the teachers it is given. Metrics: the joining site's own-test
mAP50 after every round (Ultralytics' validator), the rounds it needs to reach 90 % of its sibling's
mAP50 (test site only), and means and spreads over the seeds.

    python -m benchmarks.new_site --labelled 16 32 64 --seeds 0 1 2

Every run is appended to ``<out>.jsonl`` as it ends, and a later call skips the runs already there
(same settings), so the table grows across calls; ``<out>.md``/``.json`` and ``<out>.png`` are rewritten
from all the runs each time.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.harness import cpu_model_name, write_report

log = logging.getLogger("benchmarks.new_site")
OUT = Path(__file__).resolve().parent / "results" / "new_site"
ARMS = {
    "alone": "(a) alone, from the base model",
    "average": "(b) averaging with its graph teachers",
    "warm": "(c) warm start from the top teacher",
    "kd": "(d) graph KD, labelled images",
    "kd-unlabelled": "(e) graph KD + unlabelled frames",
    "warm-kd-unlabelled": "(f) (c) + (e)",
    "cloud-unlabelled": "cloud KD + unlabelled frames",
    "library": "Ultralytics' distill_model, top teacher",
}
TEST_SITE, CONTROL_SITE, ESTABLISHED = 3, 4, (0, 1, 2)
SIBLING = {TEST_SITE: 2}


def config(overrides: dict):
    """The quick preset with five sites in pairs of one kind, enough training images for the largest ``L``."""
    from common.config import load_config

    return load_config("quick", {"data.num-sites": 5, "data.similar-pairs": True, "data.train-per-site": 64,
                                 "federation.late-sites": [], "kd.student-check": False,
                                 "kd.unlabelled-frames": 40, "kd.cloud-rounds": [], **overrides})


def few_labels(site, labelled: int, work: Path):
    """``site`` with a data.yaml whose train split is the first ``labelled`` images of its own (a list file)."""
    import yaml

    from common.sites import split_dir

    images = sorted(p for p in split_dir(site.spec.data_yaml, "train").iterdir() if p.suffix == ".png")
    if len(images) < labelled:
        raise SystemExit(f"--labelled {labelled}: site {site.spec.site_id} has only {len(images)} train images")
    folder = work / f"{site.spec.site_id}-L{labelled}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("".join(f"{p.resolve()}\n" for p in images[:labelled]))
    spec = yaml.safe_load(site.spec.data_yaml.read_text())
    root = Path(spec.get("path") or site.spec.data_yaml.parent)
    data = folder / "data.yaml"
    data.write_text(yaml.safe_dump({"train": str(folder / "train.txt"), "val": str((root / spec["val"]).resolve()),
                                    "test": str((root / spec["test"]).resolve()), "names": spec["names"]}))
    return replace(site.spec, data_yaml=data)


class Federation:
    """The established sites after their rounds, their benchmark profiles, the base and cloud models."""

    def __init__(self, cfg, work: Path, rounds: int, epochs: int):
        from clients.site import LocalSite
        from common import yolo
        from common.sites import class_names, public_data, resolve_site
        from server.federation import BenchmarkEvaluator
        from server.models import initial_model

        self.cfg, self.work = cfg, work
        bench = public_data(cfg)
        self.names = class_names(bench)
        self.evaluator = BenchmarkEvaluator(cfg, bench, self.names)
        base, _ = initial_model(cfg, "base", bench, self.names)
        cloud, _ = initial_model(cfg, "cloud", bench, self.names)
        self.base, self.cloud = yolo.state_dict(base), yolo.state_dict(cloud)
        self.base_ap = self.score(self.base)["ap50"]
        self.sites = {i: LocalSite(cfg, resolve_site(cfg, {"partition-id": i}), work / f"site-{i}")
                      for i in (*ESTABLISHED, TEST_SITE, CONTROL_SITE)}
        self.models, self.test_map50 = {}, {}
        for i in ESTABLISHED:  # trained alone from the base model, cached by data, rounds and epochs
            path = work / "established" / f"site-{i}-R{rounds}-E{epochs}.pt"
            if path.is_file():
                self.models[i] = yolo.state_dict(yolo.load_weights(path))
                self.test_map50[i] = json.loads(path.with_suffix(".json").read_text())["test_map50"]
                continue
            weights = self.base
            for r in range(1, rounds + 1):
                res = self.sites[i].train_round(r, epochs, weights)
                weights = res.weights
            self.models[i], self.test_map50[i] = weights, res.metrics["test-map50"]
            yolo.save_weights(self.sites[i].build_model(weights), path)
            path.with_suffix(".json").write_text(json.dumps({"test_map50": self.test_map50[i]}))

    def score(self, weights: dict) -> dict:
        from flwr.app import ArrayRecord

        return self.evaluator(ArrayRecord(weights))

    def teachers_for(self, joining: int) -> dict[str, float]:
        """The graph's teachers of a joining site (``{site id: weight}``), as the ServerApp's strategy plans them."""
        from server.federation import build_strategy

        strategy = build_strategy(self.cfg, self.names, self.evaluator.data_yaml, self.evaluator, None)
        for i in ESTABLISHED:
            site = self.sites[i].spec
            strategy.profiles[site.site_id] = {"position": site.position_km, "classes": list(site.classes),
                                               "ap": self.score(self.models[i])["ap50"], "round": 1,
                                               "reasons": ["new"]}
        spec = self.sites[joining].spec
        strategy.profiles[spec.site_id] = {"position": spec.position_km, "classes": list(spec.classes),
                                           "ap": self.base_ap, "round": 2, "reasons": ["joining"]}
        present = [self.sites[i].spec.site_id for i in (*ESTABLISHED, joining)]
        return dict(strategy.edge_plan(max(2, self.cfg.kd.start_round), present).get(spec.site_id, {}))


def average(own: dict, others: list[dict], weights: list[float]) -> dict:
    """½ own + ½ the teachers' weighted mean, on every float tensor (counters stay the student's)."""
    total = sum(weights)
    out = {}
    for key, value in own.items():
        if value.is_floating_point():
            mixed = sum(w / total * o[key] for o, w in zip(others, weights))
            out[key] = 0.5 * value + 0.5 * mixed
        else:
            out[key] = value
    return out


def run_arm(fed: Federation, arm: str, joining: int, labelled: int, seed: int, rounds: int, epochs: int,
            plan: dict[str, float]) -> dict:
    from clients.site import LocalSite
    from common import protocol as P

    frames = fed.cfg.kd.unlabelled_frames if "unlabelled" in arm else 0
    cfg = replace(fed.cfg, seed=seed, kd=replace(fed.cfg.kd, unlabelled_frames=frames))
    base_site = fed.sites[joining]
    work = fed.work / "runs" / f"{arm}-{base_site.spec.site_id}-L{labelled}-s{seed}"
    site = LocalSite(cfg, few_labels(base_site, labelled, fed.work / "labelled"), work)
    by_id = {fed.sites[i].spec.site_id: fed.models[i] for i in ESTABLISHED}
    ids = sorted(plan)
    best = max(ids, key=lambda t: (plan[t], t)) if ids else None
    weights = by_id[best] if arm.startswith("warm") and best else fed.base
    curve, rows = [], []
    t0 = time.perf_counter()
    for r in range(1, rounds + 1):
        kd, teachers = None, []
        if arm == "average" and ids:
            weights = average(weights, [by_id[t] for t in ids], [plan[t] for t in ids])
        if arm == "cloud-unlabelled":
            kd, teachers = _request(cfg, ("cloud",), (1.0,), cfg.kd.cloud_select), [fed.cloud]
        elif arm in ("kd", "kd-unlabelled", "warm-kd-unlabelled") and ids:
            kd, teachers = _request(cfg, ids, [plan[t] for t in ids], cfg.kd.select), [by_id[t] for t in ids]
        feature_teacher = by_id[best] if arm == "library" and best else None
        res = site.train_round(r, epochs, weights, kd, teachers, feature_teacher=feature_teacher)
        weights = res.weights
        curve.append(res.metrics[P.TEST_MAP50])
        rows.append({k: res.metrics.get(k) for k in (P.KD_LOSS, P.TRANSFER_FRAMES, P.PSEUDO_BOXES)})
    return {"arm": arm, "site": base_site.spec.site_id, "labelled": labelled, "seed": seed, "curve": curve,
            "teachers": plan, "rounds": rows, "seconds": round(time.perf_counter() - t0, 1)}


def _request(cfg, ids, weights, select: str):
    from common import protocol as P

    k = cfg.kd
    return P.KDRequest(tuple(ids), tuple(float(w) for w in weights), (cfg.model.edge,) * len(ids), alpha=k.alpha,
                       temperature=k.temperature, fg_threshold=k.fg_threshold, select=select)


def rounds_to_reach(curve: list[float], target: float) -> int | None:
    """The first round (1-based) whose mAP50 reaches ``target``; None if none does."""
    return next((r for r, v in enumerate(curve, 1) if v >= target), None)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarise(runs: list[dict], sibling_map50: dict[str, float], settings: dict) -> str:
    lines = [
        "# A new site joins with few labels and its own video (paper section 4.3)", "",
        (f"`python -m benchmarks.new_site {settings['argv']}`; {settings['machine']}; built-in benchmark, `quick` "
        f"preset with 5 sites in pairs of one kind ({settings['train_images']} train images each), established "
        f"sites 0-2 trained alone "
        f"{settings['established_rounds']} rounds x {settings['epochs']} epochs from the base model; each arm trains "
        f"the joining site {settings['rounds']} rounds x {settings['epochs']} epochs on its first L train images "
        f"(+ up to {settings['unlabelled_frames']} frames of its video where the arm says so). Own-test mAP50 "
        f"(Ultralytics' validator, {settings['test_images']} test images); mean ± standard deviation over the seeds. "
        "See the module "
        "docstring for the arms and what this benchmark does not measure."), "",
        "Established sites' own-test mAP50 (fixed during the arms, so no arm changes them): "
        + ", ".join(f"{s} {v:.3f}" for s, v in sorted(sibling_map50.items())) + ".", "",
    ]
    for site in sorted({r["site"] for r in runs}):
        sibling = f"site-{SIBLING[int(site[-1])]}" if int(site[-1]) in SIBLING else None
        kind = f"test site (sibling {sibling})" if sibling else "control site (no established site of its kind)"
        lines += [f"## {site}: {kind}", ""]
        for labelled in sorted({r["labelled"] for r in runs if r["site"] == site}):
            group = [r for r in runs if r["site"] == site and r["labelled"] == labelled]
            alone = [r["curve"][-1] for r in group if r["arm"] == "alone"]
            head = "| arm | seeds | mAP50 per round | last round | vs (a) |"
            target = 0.9 * sibling_map50[sibling] if sibling else None
            if target is not None:
                head += f" rounds to 90 % of {sibling} ({target:.3f}) |"
            lines += [f"L = {labelled} labelled images; teachers: "
                      + (", ".join(f"{t} {w:.2f}" for t, w in sorted(group[0]["teachers"].items())) or "none"), "",
                      head, "|" + "---|" * (head.count("|") - 1)]
            for arm, label in ARMS.items():
                rs = [r for r in group if r["arm"] == arm]
                if not rs:
                    continue
                n = min(len(r["curve"]) for r in rs)
                per_round = " / ".join(f"{statistics.mean(r['curve'][i] for r in rs):.3f}" for i in range(n))
                last = [r["curve"][-1] for r in rs]
                gain = (f"{(statistics.mean(last) / statistics.mean(alone) - 1) * 100:+.1f} %"
                        if alone and statistics.mean(alone) > 0 else "-")
                row = f"| {label} | {len(rs)} | {per_round} | {_spread(last)} | {gain} |"
                if target is not None:
                    reach = [rounds_to_reach(r["curve"], target) for r in rs]
                    row += " " + ", ".join("never" if x is None else str(x) for x in reach) + " |"
                lines.append(row)
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["site"], r["labelled"]) for r in runs})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (site, labelled) in zip(axes[0], groups):
        for arm, label in ARMS.items():
            rs = [r for r in runs if (r["site"], r["labelled"], r["arm"]) == (site, labelled, arm)]
            if rs:
                n = min(len(r["curve"]) for r in rs)
                ax.plot(range(1, n + 1), [statistics.mean(r["curve"][i] for r in rs) for i in range(n)],
                        marker="o", label=label)
        ax.set(title=f"{site}, L = {labelled}", xlabel="round", ylabel="own-test mAP50")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def command(runs: list[dict], args: argparse.Namespace) -> str:
    """The arguments that reproduce ``runs`` (all of them, whichever calls made them): their L values and seeds,
    the arms and sites where not the defaults, and this call's settings where not the defaults.

    Examples
    --------
    Runs of L 16 and 32, seeds 0-2, every arm on both sites, default settings → ``"--labelled 16 32 --seeds 0 1 2"``.
    """
    parts = [f"--labelled {' '.join(str(v) for v in sorted({r['labelled'] for r in runs}))}",
             f"--seeds {' '.join(str(v) for v in sorted({r['seed'] for r in runs}))}"]
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    if arms != list(ARMS):
        parts.append(f"--arms {' '.join(arms)}")
    sites = sorted({int(r["site"].rsplit("-", 1)[1]) for r in runs})
    if sites != [TEST_SITE, CONTROL_SITE]:
        parts.append(f"--sites {' '.join(str(v) for v in sites)}")
    for flag, value, default in (("--rounds", args.rounds, 3), ("--epochs", args.epochs, 4),
                                 ("--established-rounds", args.established_rounds, 2)):
        if value != default:
            parts.append(f"{flag} {value}")
    if args.set:
        parts.append(f"--set {' '.join(args.set)}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--sites", type=int, nargs="+", default=[TEST_SITE, CONTROL_SITE],
                        choices=[TEST_SITE, CONTROL_SITE])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--established-rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="models and runs (default: $CEDAR_HOME/new_site)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from common.ultralytics_env import CEDAR_HOME

    overrides = dict(s.split("=", 1) for s in args.set)
    cfg = config(overrides)
    work = args.work or CEDAR_HOME / "new_site"
    fed = Federation(cfg, work, args.established_rounds, args.epochs)
    settings = {"rounds": args.rounds, "epochs": args.epochs, "established_rounds": args.established_rounds,
                "unlabelled_frames": cfg.kd.unlabelled_frames, "train_images": cfg.data.train_per_site,
                "test_images": cfg.data.test_per_site, "set": sorted(args.set)}
    log_path = args.out.with_suffix(".jsonl")
    runs = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    done = {(r["arm"], r["site"], r["labelled"], r["seed"]) for r in runs if r["settings"] == settings}
    plans = {i: fed.teachers_for(i) for i in args.sites}
    for labelled in args.labelled:
        for i in args.sites:
            for seed in args.seeds:
                for arm in args.arms:
                    key = (arm, fed.sites[i].spec.site_id, labelled, seed)
                    if key in done:
                        continue
                    run = run_arm(fed, arm, i, labelled, seed, args.rounds, args.epochs, plans[i])
                    run["settings"] = settings
                    runs.append(run)
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    with log_path.open("a") as f:
                        f.write(json.dumps(run) + "\n")
                    log.info("%s %s L=%s seed %s: %s (%.0f s)", arm, key[1], labelled, seed,
                                 " / ".join(f"{v:.3f}" for v in run["curve"]), run["seconds"])
    mine = [r for r in runs if r["settings"] == settings]
    sibling = {fed.sites[i].spec.site_id: fed.test_map50[i] for i in ESTABLISHED}
    machine = f"{cpu_model_name()}, {datetime.now(timezone.utc):%Y-%m-%d}"
    markdown = summarise(mine, sibling, {**settings, "argv": command(mine, args), "machine": machine})
    markdown += "\nPlot: `new_site.png` (mean own-test mAP50 per round, per site and L).\n"
    write_report(args.out, {"settings": settings, "established_test_map50": sibling, "runs": mine}, markdown)
    plot(mine, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
