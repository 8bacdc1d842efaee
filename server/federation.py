"""The server side of a federation run: config, benchmark, models, cloud service, strategy, outputs, tracking,
resume."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common import protocol as P
from common.config import CedarConfig, KDConfig, to_flat_dict
from common.files import atomic_write
from common.sites import class_names, num_sites, public_data
from server.cloud_process import serve
from server.models import CloudModel, base_arrays
from server.outputs import RunOutputs
from server.tracking import Tracker
from strategies.graph_kd import GraphKDStrategy
from strategies.personalized import NodeReply, RoundRecord

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """A run folder a resume needs does not read; the message names the file."""


class BenchmarkEvaluator:
    """Scores a node's returned weights on the shared labelled benchmark (per-class AP50)."""

    def __init__(self, cfg: CedarConfig, data_yaml: Path, names: list[str]):
        from common import yolo

        self.cfg, self.data_yaml, self.yolo = cfg, data_yaml, yolo
        self.model = yolo.build_model(cfg.model.edge, len(names), seed=cfg.seed, names=names)
        self.template = ArrayRecord(yolo.state_dict(self.model))  # the layout every reply's weights must have

    def __call__(self, arrays) -> dict[str, Any]:
        self.yolo.from_arrayrecord(self.model, arrays)
        t, ev = self.cfg.train, self.cfg.eval
        res = self.yolo.evaluate(self.model, self.data_yaml, split="test", imgsz=t.imgsz, batch=ev.batch,
                                 conf=ev.conf, iou=ev.iou, device=t.device)
        return {"map50": res.map50, "map50_95": res.map50_95, "ap50": res.ap50, "seconds": res.seconds}

    def save(self, arrays, path: Path, **meta) -> None:
        self.yolo.from_arrayrecord(self.model, arrays)
        self.yolo.save_weights(self.model, path, **meta)

    def load(self, path: Path):
        from flwr.app import ArrayRecord

        return ArrayRecord(self.yolo.state_dict(self.yolo.load_weights(path, model=self.model)))


def _class_weights(cfg: CedarConfig, data_yaml: Path, nc: int) -> list[float] | None:
    """Per-class distance weights (one per class; the mAP column always weighs 1): None for all ones, or
    small-object emphasis (:func:`common.graph.small_object_class_weights`) from the benchmark's test labels,
    an object being small when its longer side is under ``eval.small_px`` at ``train.imgsz``."""
    if cfg.kd.class_weights == "ones":
        return None
    import numpy as np

    from common.detections import label_path, read_yolo_labels
    from common.graph import small_object_class_weights
    from common.sites import split_dir

    small, total = np.zeros(nc), np.zeros(nc)
    for image in split_dir(data_yaml, "test").iterdir():
        rows = read_yolo_labels(label_path(image))
        cls = rows[:, 0].astype(int)
        np.add.at(total, cls, 1)
        np.add.at(small, cls, np.maximum(rows[:, 3], rows[:, 4]) * cfg.train.imgsz < cfg.eval.small_px)
    return small_object_class_weights(small, total).tolist()


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1, default=str).encode()


class RoundWriter:
    """The per-round outputs of a run (the strategy's ``on_round_end``): metrics.jsonl, each site's weights
    (and the fedavg model), the graph as JSON and PNG, W&B, the round summary, and state.json for a resume;
    bindings.json (``{site id: node id}``) whenever the strategy binds a site (its ``on_bind``)."""

    def __init__(self, out: RunOutputs, tracker: Tracker, evaluator: BenchmarkEvaluator, strategy: GraphKDStrategy,
                 kd: KDConfig):
        self.out, self.tracker, self.evaluator, self.strategy, self.kd = out, tracker, evaluator, strategy, kd

    @property
    def state_path(self) -> Path:
        return self.out.run_dir / "state.json"

    @property
    def bindings_path(self) -> Path:
        return self.out.run_dir / "bindings.json"

    @property
    def global_path(self) -> Path:
        return self.out.run_dir / "global" / "model.pt"

    def __call__(self, record: RoundRecord) -> None:
        out, tracker, server_round = self.out, self.tracker, record.server_round
        rows = []
        for r in sorted(record.replies, key=lambda r: r.site_id):
            row = self.metrics_row(server_round, r)
            out.append_metrics(row)
            self.evaluator.save(r.arrays, out.node_weights_path(r.site_id), round=server_round, site=r.site_id)
            rows.append([r.site_id, r.phase, row["train_loss"], row["test_map50"], row["benchmark_map50"]])
            tracker.log({f"{r.site_id}/{key}": v for key, v in row.items()
                         if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))},
                        step=server_round)
            if r.gallery:
                self.write_gallery(r)
        if record.global_arrays is not None:
            self.evaluator.save(record.global_arrays, self.global_path, round=server_round)
        tracker.table("round_summary", ["site", "phase", "train_loss", "test_map50", "benchmark_map50"], rows,
                      server_round)
        if record.graph is not None:
            self.write_graph(server_round, record.graph)
        atomic_write(self.state_path, _json({"round": server_round, "strategy": self.strategy.state_dict(),
                                             "sites": sorted(self.strategy.arrays)}))
        log.info("round %s summary:\n%s", server_round, "\n".join(
            f"  {s:<10} {ph:<5} loss {lo:7.3f}  own-test mAP50 {m:.3f}  benchmark mAP50 "
            + ("-" if b is None else f"{b:.3f}") for s, ph, lo, m, b in rows))
        out.write_summary()

    def metrics_row(self, server_round: int, r: NodeReply) -> dict[str, Any]:
        """One metrics.jsonl line: a site's round."""
        bench, kd = r.benchmark or {}, r.phase == "kd"
        return {
            "round": server_round, "node_id": r.node_id, "site_id": r.site_id, "phase": r.phase,
            "position_km": r.site[P.POSITION_KM], "classes": r.site[P.CLASSES],
            "train_loss": r.metrics[P.TRAIN_LOSS], "train_seconds": r.metrics[P.TRAIN_SECONDS],
            "num_examples": r.metrics[P.NUM_EXAMPLES], "val_map50": r.metrics[P.VAL_MAP50],
            "test_map50": r.metrics[P.TEST_MAP50], "test_ap50": r.metrics[P.TEST_AP50],
            "kd_loss": r.metrics.get(P.KD_LOSS), "teachers": r.metrics.get("teachers"),
            "teachers_proposed": r.metrics.get("teachers_proposed"),
            "teachers_rejected": r.metrics.get("teachers_rejected"),
            **{key.replace("-", "_"): r.metrics.get(key) for key in (*P.ROUTING_KEYS, *P.COLLAB_KEYS)},
            "kd_alpha": self.kd.alpha if kd else None, "kd_temperature": self.kd.temperature if kd else None,
            "evaluated": list(r.evaluated) or None,
            "benchmark_map50": bench.get("map50"), "benchmark_map50_95": bench.get("map50_95"),
            "benchmark_ap50": bench.get("ap50"), "eval_seconds": bench.get("seconds"),
        }

    def write_gallery(self, r: NodeReply) -> None:
        """The site's gallery for the report (``gallery/<site>``); a broken one costs only the pictures."""
        import cv2
        import numpy as np

        from server.report import GalleryError, write_gallery

        try:
            items = []
            for k, item in enumerate(r.gallery):
                bgr = cv2.imdecode(np.frombuffer(item["image"], np.uint8), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise GalleryError(f"gallery {r.site_id} item {k}: the image does not decode")
                items.append({**item, "image": cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)})
            write_gallery(self.out.run_dir, r.site_id, items)
        except GalleryError as err:
            log.warning("%s", err)

    def write_graph(self, server_round: int, graph: dict[str, Any]) -> None:
        graph_dir = self.out.run_dir / "graphs"
        graph_dir.mkdir(exist_ok=True)
        atomic_write(graph_dir / f"round-{server_round:03d}.json", _json(graph))
        if "nodes" in graph:
            from server.graph_plot import draw_graph

            png = draw_graph(graph, graph_dir / f"round-{server_round:03d}.png")
            self.tracker.image("graph", png, server_round)
            self.tracker.table("graph_arcs", ["source", "target", "raw", "weight"],
                               [[a["source"], a["target"], a["raw"], a["weight"]] for a in graph["arcs"]],
                               server_round)

    def write_bindings(self, bindings: dict[str, int]) -> None:
        atomic_write(self.bindings_path, _json(bindings))

    def read_bindings(self) -> dict[str, int]:
        """bindings.json (``{}`` when there is none); :class:`ResumeError` when it does not read."""
        if not self.bindings_path.is_file():
            return {}
        try:
            bindings = json.loads(self.bindings_path.read_text())
            if not isinstance(bindings, dict) or not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in bindings.values()):
                raise ValueError(f"expected {{site id: node id}}, got {str(bindings)[:80]}")
        except ValueError as err:
            raise ResumeError(f"{self.bindings_path}: cannot resume from it ({err}); restore it, or delete it to have "
                              f"every site bound again to the first node that claims it") from None
        return bindings

    def resume(self) -> ArrayRecord:
        """Load state.json and the saved weights into the strategy; returns the initial global weights.

        A file that does not read (state.json, a site's model.pt) raises :class:`ResumeError` naming it, before
        anything is written: a resumed run never goes on from a guess.
        """
        from common.yolo import ModelError

        try:
            state = json.loads(self.state_path.read_text())
            self.strategy.load_state_dict(state["strategy"])
            sites = [str(s) for s in state["sites"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ResumeError(f"{self.state_path}: cannot resume from it ({type(err).__name__}: {err}); restore it, "
                              f"or start a new run (another run-name)") from None
        try:
            for site_id in sites:
                self.strategy.arrays[site_id] = self.evaluator.load(self.out.node_weights_path(site_id))
            initial = self.evaluator.load(self.global_path) if self.global_path.is_file() else ArrayRecord()
        except ModelError as err:
            raise ResumeError(f"cannot resume: {err}; restore the file, or start a new run (another run-name)") \
                from None
        log.info("resuming %s after round %s (%s sites)", self.out.run_dir, state["round"], len(sites))
        return initial


def late_sites(cfg: CedarConfig) -> dict[str, int]:
    """``{site id: join round}`` from ``federation.late-sites`` (site indices, negative from the end)."""
    from common.sites import resolve_site

    n = num_sites(cfg)
    return {resolve_site(cfg, {"partition-id": i % n}).site_id: cfg.federation.late_join_round
            for i in cfg.federation.late_sites}


def build_strategy(cfg: CedarConfig, names: list[str], bench_yaml: Path, evaluator: BenchmarkEvaluator,
                   cloud: CloudModel | None) -> GraphKDStrategy:
    k, f = cfg.kd, cfg.federation
    return GraphKDStrategy(
        num_classes=len(names), epochs_per_round=cfg.train.epochs_per_round, benchmark_fn=evaluator,
        aggregation=f.aggregation, expected_nodes=num_sites(cfg), wait_for_nodes_s=f.wait_for_nodes_s,
        query_timeout_s=min(f.reply_timeout_s, 120.0), join_round=late_sites(cfg),
        site_binding=f.site_binding, template=evaluator.template, fraction_train=f.fraction_train,
        mode=k.mode, rho=k.rho, teacher_rank=k.teacher_rank,
        teacher_scope=k.teacher_scope, better_only=k.better_only, sigma_s_km=k.sigma_s_km,
        min_weight=k.min_weight, class_weights=_class_weights(cfg, bench_yaml, len(names)), alpha=k.alpha,
        temperature=k.temperature, fg_threshold=k.fg_threshold, select=k.select,
        cloud_select=k.cloud_select, student_check=k.student_check,
        check_margin=k.check_margin, start_round=k.start_round,
        cloud_rounds=tuple(k.cloud_rounds), cloud_fn=cloud, edge_arch=cfg.model.edge, t_cycle=k.t_cycle,
        delta_down=k.delta_down, patience=k.patience, top_k=k.graph_top_k, cutoff_sigmas=k.graph_cutoff_sigmas,
        new_node_init=k.new_node_init,
        renorm_tol=k.graph_renorm_tol,
    )


def run_federation(grid, cfg: CedarConfig) -> RunOutputs:
    """The ServerApp's work: the strategy on Flower's ``Strategy.start``, one set of outputs per round."""
    import torch

    torch.set_num_threads(cfg.train.threads)
    out = RunOutputs.create(cfg)
    log.info("run folder: %s", out.run_dir)
    bench_yaml = public_data(cfg)
    names = class_names(bench_yaml)
    evaluator = BenchmarkEvaluator(cfg, bench_yaml, names)
    initial_arrays = base_arrays(cfg, bench_yaml, names)
    cloud = CloudModel(cfg, bench_yaml, names, out.run_dir) if cfg.kd.cloud_rounds or cfg.cloud.serve else None
    tracker = Tracker(cfg.tracking.wandb, cfg.tracking.project, out.run_dir, to_flat_dict(cfg), out.run_dir.name)
    strategy = build_strategy(cfg, names, bench_yaml, evaluator, cloud)
    writer = RoundWriter(out, tracker, evaluator, strategy, cfg.kd)
    strategy.on_round_end, strategy.on_bind = writer, writer.write_bindings
    if cfg.federation.resume:
        strategy.load_bindings(writer.read_bindings(), release=cfg.federation.release_sites)
    elif cfg.federation.release_sites:
        log.warning("federation.release-sites=%s: only a resumed run has bindings to release; ignored",
                    cfg.federation.release_sites)
    initial = writer.resume() if cfg.federation.resume and writer.state_path.is_file() else ArrayRecord()
    if not len(initial) and initial_arrays is not None:
        initial = initial_arrays  # a site without a model of its own starts from the base model
    service = serve(cfg, cloud) if cfg.cloud.serve else None  # stopped in the finally below
    if service is not None:
        strategy.train_config.update({P.CLOUD_URL: service.url, P.CLOUD_TOKEN: service.token})
    strategy.train_config[P.GALLERY_ROUND] = cfg.federation.num_rounds  # the last round's replies carry pictures
    try:
        strategy.start(grid, initial, num_rounds=cfg.federation.num_rounds, timeout=cfg.federation.reply_timeout_s)
        out.finish(tracker)
    finally:
        if service is not None:
            service.stop()
        tracker.finish()
    log.info("done: %s", out.write_summary())
    (out.run_dir / "DONE").write_text(f"{cfg.federation.num_rounds} rounds\n")
    return out
