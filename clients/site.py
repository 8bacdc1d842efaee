"""The local work of one edge site: train, evaluate, keep the model store.

Plain Python over the YOLO adapter, so it runs (and is tested) without Flower.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common import protocol as P
from common.config import CedarConfig, from_run_config
from common.sites import SiteSpec, class_names, resolve_site

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    weights: dict
    metrics: dict[str, Any]


class LocalSite:
    """One site's detector, data and model store."""

    def __init__(self, cfg: CedarConfig, spec: SiteSpec, store: Path):
        self.cfg, self.spec, self.store = cfg, spec, Path(store).expanduser()

    @classmethod
    def from_context(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> "LocalSite":
        cfg = from_run_config(run_config)
        spec = resolve_site(cfg, node_config)
        default_store = Path(os.environ.get("CEDAR_HOME", "~/.cache/cedar")) / "nodes" / spec.site_id
        return cls(cfg, spec, Path(str(node_config.get("model-store", default_store))))

    def identity(self) -> dict[str, Any]:
        return {P.SITE_ID: self.spec.site_id, P.POSITION_KM: [float(v) for v in self.spec.position_km],
                P.CLASSES: [int(c) for c in self.spec.classes]}

    def build_model(self, weights: dict | None = None, arch: str | None = None):
        from common import yolo

        names = class_names(self.spec.data_yaml)
        model = yolo.build_model(arch or self.cfg.model.edge, len(names), seed=self.cfg.seed, names=names)
        if weights is not None:
            yolo.load_state_dict(model, weights)
        return model

    def distiller(self, student, kd: dict[str, Any]):
        """Frozen teachers from a distillation message (see ``common.protocol.parse_kd_config``)."""
        from common.distill import TeacherEnsemble

        teachers = [self.build_model(rec.to_torch_state_dict(), arch) for rec, arch, _ in kd["teachers"]]
        return TeacherEnsemble(student, teachers, [w for _, _, w in kd["teachers"]],
                               temperature=kd["temperature"], fg_threshold=kd["fg_threshold"])

    def train_round(self, server_round: int, epochs: int, weights: dict | None,
                    kd: dict[str, Any] | None = None) -> RoundResult:
        """Local training (distillation when ``kd`` names teachers), then evaluation on val and test."""
        import torch

        from common import yolo

        torch.set_num_threads(self.cfg.train.threads)
        t = self.cfg.train
        model = self.build_model(weights)
        extra = self.distiller(model, kd) if kd else None
        t0 = time.perf_counter()
        res = yolo.train(
            model, self.spec.data_yaml, epochs=epochs, imgsz=t.imgsz, batch=t.batch, lr0=t.lr0,
            weight_decay=t.weight_decay, warmup_iters=t.warmup_iters,  # every round: AdamW restarts
            mosaic=t.mosaic, workers=t.workers, seed=self.cfg.seed + 1000 * server_round + self.spec.index,
            device=t.device, desc=f"{self.spec.site_id} round {server_round}{' KD' if kd else ''}",
            extra_loss=extra, alpha=kd["alpha"] if kd else 1.0,
        )
        ev = self.cfg.eval
        kw = dict(imgsz=t.imgsz, batch=ev.batch, conf=ev.conf, iou=ev.iou, device=t.device)
        val = yolo.evaluate(model, self.spec.data_yaml, split="val", **kw)
        test = yolo.evaluate(model, self.spec.data_yaml, split="test", **kw)
        yolo.save_weights(model, self.store / "model.pt", round=server_round, site=self.spec.site_id)
        log.info("%s round %s: loss %.3f, val mAP50 %.3f, test mAP50 %.3f (%.0fs)", self.spec.site_id,
                 server_round, res.loss, val.map50, test.map50, time.perf_counter() - t0)
        metrics = {
            P.NUM_EXAMPLES: max(1, res.images), P.TRAIN_LOSS: res.loss,
            P.TRAIN_SECONDS: res.seconds, P.VAL_MAP50: val.map50, P.TEST_MAP50: test.map50,
            P.TEST_MAP50_95: test.map50_95, P.TEST_AP50: P.encode_ap(test.ap50),
        }
        if kd:
            metrics[P.KD_LOSS] = res.extra_loss
        return RoundResult(yolo.state_dict(model), metrics)
