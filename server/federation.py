"""The server side of a federation run: config, benchmark, strategy, outputs, tracking."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from common import protocol as P
from common.config import CedarConfig, to_flat_dict
from common.sites import class_names, num_sites, public_data
from server.outputs import RunOutputs
from server.tracking import Tracker
from strategies.personalized import NodeReply, PersonalizedStrategy

log = logging.getLogger(__name__)


class BenchmarkEvaluator:
    """Scores a node's returned weights on the shared labelled benchmark (per-class AP50)."""

    def __init__(self, cfg: CedarConfig, data_yaml: Path, names: list[str]):
        from common import yolo

        self.cfg, self.data_yaml, self.yolo = cfg, data_yaml, yolo
        self.model = yolo.build_model(cfg.model.edge, len(names), seed=cfg.seed, names=names)

    def __call__(self, reply: NodeReply) -> dict[str, Any]:
        self.yolo.from_arrayrecord(self.model, reply.arrays)
        t, ev = self.cfg.train, self.cfg.eval
        res = self.yolo.evaluate(self.model, self.data_yaml, split="test", imgsz=t.imgsz, batch=ev.batch,
                                 conf=ev.conf, iou=ev.iou, device=t.device)
        return {"map50": res.map50, "map50_95": res.map50_95, "ap50": res.ap50, "seconds": res.seconds}

    def save(self, reply: NodeReply, path: Path, server_round: int) -> None:
        self.yolo.from_arrayrecord(self.model, reply.arrays)
        self.yolo.save_weights(self.model, path, round=server_round, site=reply.site[P.SITE_ID])


def run_federation(grid, cfg: CedarConfig) -> RunOutputs:
    import torch

    torch.set_num_threads(cfg.train.threads)
    out = RunOutputs.create(cfg)
    log.info("run folder: %s", out.run_dir)
    bench_yaml = public_data(cfg)
    names = class_names(bench_yaml)
    evaluator = BenchmarkEvaluator(cfg, bench_yaml, names)
    tracker = Tracker(cfg.tracking.wandb, cfg.tracking.project, out.run_dir, to_flat_dict(cfg), out.run_dir.name)
    strategy = PersonalizedStrategy(num_classes=len(names), epochs_per_round=cfg.train.epochs_per_round,
                                    evaluate_fn=evaluator, aggregation=cfg.federation.aggregation)

    def on_round_end(server_round: int, replies: list[NodeReply]) -> None:
        rows = []
        for r in sorted(replies, key=lambda r: r.site[P.SITE_ID]):
            site_id = r.site[P.SITE_ID]
            record = {
                "round": server_round, "node_id": r.node_id, "site_id": site_id,
                "position_km": r.site[P.POSITION_KM], "classes": r.site[P.CLASSES],
                "train_loss": r.metrics[P.TRAIN_LOSS], "train_seconds": r.metrics[P.TRAIN_SECONDS],
                "num_examples": r.metrics[P.NUM_EXAMPLES], "val_map50": r.metrics[P.VAL_MAP50],
                "test_map50": r.metrics[P.TEST_MAP50], "test_ap50": r.metrics[P.TEST_AP50],
                "benchmark_map50": r.benchmark["map50"], "benchmark_map50_95": r.benchmark["map50_95"],
                "benchmark_ap50": r.benchmark["ap50"], "eval_seconds": r.benchmark["seconds"],
            }
            out.append_metrics(record)
            evaluator.save(r, out.node_weights_path(site_id), server_round)
            rows.append([site_id, record["train_loss"], record["test_map50"], record["benchmark_map50"]])
            tracker.log({f"{site_id}/{k}": v for k, v in record.items()
                         if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))},
                        step=server_round)
        tracker.table("round_summary", ["site", "train_loss", "test_map50", "benchmark_map50"], rows, server_round)
        log.info("round %s summary:\n%s", server_round, "\n".join(
            f"  {s:<10} loss {l:7.3f}  own-test mAP50 {m:.3f}  benchmark mAP50 {b:.3f}" for s, l, m, b in rows))
        out.write_summary()

    try:
        strategy.start(grid, num_rounds=cfg.federation.num_rounds, expected_nodes=num_sites(cfg),
                       wait_for_nodes_s=cfg.federation.wait_for_nodes_s,
                       timeout=cfg.federation.reply_timeout_s, on_round_end=on_round_end)
    finally:
        tracker.finish()
    log.info("done: %s", out.write_summary())
    (out.run_dir / "DONE").write_text(f"{cfg.federation.num_rounds} rounds\n")
    return out
