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

    def __init__(self, cfg: CedarConfig, spec: SiteSpec, store: Path, cloud: Mapping[str, str] | None = None):
        self.cfg, self.spec, self.store = cfg, spec, Path(store).expanduser()
        r = cfg.routing
        self.cloud = {"url": r.cloud_url, "token-file": r.cloud_token_file, "cafile": r.cloud_cafile,
                      **{k: str(v) for k, v in (cloud or {}).items() if v}}

    @classmethod
    def from_context(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                     config: Mapping[str, Any] | None = None) -> "LocalSite":
        """The site of a ClientApp's context. The cloud service: node-config ``cloud-url``/``cloud-token-file``/
        ``cloud-cafile`` if set, else the run's own service named in the message ``config``
        (:data:`common.protocol.CLOUD_URL`/``CLOUD_TOKEN``), else ``routing.cloud-*``."""
        cfg = from_run_config(run_config)
        spec = resolve_site(cfg, node_config)
        default_store = Path(os.environ.get("CEDAR_HOME", "~/.cache/cedar")) / "nodes" / spec.site_id
        cloud = {k: node_config.get(f"cloud-{k}") for k in ("url", "token-file", "cafile")}
        if not cloud["url"] and config:
            cloud.update(url=config.get(P.CLOUD_URL), token=config.get(P.CLOUD_TOKEN))
        return cls(cfg, spec, Path(str(node_config.get("model-store", default_store))), cloud)

    def cloud_client(self):
        """A :class:`clients.edge.CloudClient` for the configured cloud service, or None when there is none."""
        if not self.cloud["url"]:
            return None
        from clients.edge import CloudClient
        from common.tokens import resolve_token

        try:
            token = self.cloud.get("token") or resolve_token(None, self.cloud["token-file"] or None)
        except ValueError as err:
            log.warning("%s: cloud service %s configured but no token (%s): edge metrics only",
                        self.spec.site_id, self.cloud["url"], err)
            return None
        return CloudClient(self.cloud["url"], token, self.spec.site_id, cafile=self.cloud["cafile"] or None)

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

    def distiller(self, student, kd: P.KDRequest, teachers: list[dict]) -> tuple[Any, dict[str, Any]]:
        """Frozen teachers (state dicts, in ``kd.teacher_ids`` order) from a distillation message.

        With ``student_check`` the student first scores itself and every proposed
        teacher on its *own* validation split and keeps only the teachers that beat
        it there by more than ``check_margin`` mAP50 (their graph weights
        renormalised; a small val split cannot tell a few points apart, and two
        untrained models both score ~0): the shared benchmark mixes every
        site's domain, so a teacher that ranks high there can still be worse on this
        site's data, and distilling from it pulls the student down. Nothing leaves
        the site but the scores. Returns ``(TeacherEnsemble or None, metrics)``.
        """
        from common.distill import TeacherEnsemble

        teachers = [self.build_model(state, arch) for state, arch in zip(teachers, kd.teacher_archs)]
        weights = list(kd.teacher_weights)
        metrics: dict[str, Any] = {}
        if kd.student_check:
            own = self.evaluate(student, "val").map50
            scores = [self.evaluate(t, "val").map50 for t in teachers]
            kept = [s > own + kd.check_margin for s in scores]
            metrics = {P.START_VAL_MAP50: own, P.TEACHER_VAL_MAP50: scores, P.TEACHERS_KEPT: [int(k) for k in kept]}
            log.info("%s: own val mAP50 %.3f; teachers %s: %s", self.spec.site_id, own,
                     ", ".join(f"{i} {s:.3f}" for i, s in zip(kd.teacher_ids, scores)),
                     "kept " + ", ".join(i for i, k in zip(kd.teacher_ids, kept) if k) if any(kept) else "none kept")
            teachers = [t for t, k in zip(teachers, kept) if k]
            weights = [w for w, k in zip(weights, kept) if k]
        if not teachers:
            return None, metrics
        total = sum(weights)
        return TeacherEnsemble(student, teachers, [w / total for w in weights],
                               temperature=kd.temperature, fg_threshold=kd.fg_threshold,
                               select=kd.select), metrics

    def evaluate(self, model, split: str):
        """Ultralytics' validator on one of this site's splits, at the evaluation settings."""
        from common import yolo

        t, ev = self.cfg.train, self.cfg.eval
        return yolo.evaluate(model, self.spec.data_yaml, split=split, imgsz=t.imgsz, batch=ev.batch, conf=ev.conf,
                             iou=ev.iou, device=t.device)

    def train_round(self, server_round: int, epochs: int, weights: dict | None,
                    kd: P.KDRequest | None = None, teachers: list[dict] = ()) -> RoundResult:
        """Local training (distillation when ``kd`` names teachers), then evaluation on val and test."""
        import torch

        from common import yolo
        from common.adverse import AdverseAugment

        torch.set_num_threads(self.cfg.train.threads)
        t = self.cfg.train
        model = self.build_model(weights)
        extra, kd_metrics = self.distiller(model, kd, list(teachers)) if kd else (None, {})
        seed = self.cfg.seed + 1000 * server_round + self.spec.index
        augment = AdverseAugment(t.adverse_p, seed=seed) if t.adverse_p > 0 else None
        t0 = time.perf_counter()
        res = yolo.train(
            model, self.spec.data_yaml, epochs=epochs, imgsz=t.imgsz, batch=t.batch,
            lr0=t.lr0 if weights is None else t.finetune_lr0,  # from scratch, or continuing a trained model
            weight_decay=t.weight_decay, warmup_iters=t.warmup_iters,  # every round: AdamW restarts
            mosaic=t.mosaic, workers=t.workers, seed=seed,
            device=t.device, desc=f"{self.spec.site_id} round {server_round}{' KD' if extra else ''}",
            extra_loss=extra, alpha=kd.alpha if extra else 1.0, augment=augment,
        )
        val, test = self.evaluate(model, "val"), self.evaluate(model, "test")
        routing = self.routing_metrics(model)
        yolo.save_weights(model, self.store / "model.pt", round=server_round, site=self.spec.site_id)
        log.info("%s round %s: loss %.3f, val mAP50 %.3f, test mAP50 %.3f (%.0fs)", self.spec.site_id,
                 server_round, res.loss, val.map50, test.map50, time.perf_counter() - t0)
        metrics = {
            P.NUM_EXAMPLES: max(1, res.images), P.TRAIN_LOSS: res.loss,
            P.TRAIN_SECONDS: res.seconds, P.VAL_MAP50: val.map50, P.TEST_MAP50: test.map50,
            P.TEST_MAP50_95: test.map50_95, P.TEST_AP50: P.encode_ap(test.ap50),
        }
        if extra:
            metrics[P.KD_LOSS] = res.extra_loss
        return RoundResult(yolo.state_dict(model), {**metrics, **kd_metrics, **routing})

    def routing_metrics(self, model) -> dict[str, float]:
        """Ambiguity routing on the test split (paper section 4.2): what the edge offloads, and what it gains.

        Each test image is detected alone (batch 1, as on an edge box) at
        ``routing.det_conf``; a detection is ambiguous if below ``t_conf`` or smaller
        than ``t_size`` px² (still images have no tracks). Recall is class-agnostic at
        IoU 0.5 (:func:`common.routing.matched_gt`), of all edge detections and of the
        confident ones alone (the edge's answer without the cloud). When the node
        knows a cloud detection service (``routing.cloud-url`` or node-config
        ``cloud-url``), the ambiguous part of each image (``routing.offload``: crops
        with context or the whole image), with the candidates below ``det_conf``
        (down to ``routing.candidate_conf``), is sent to it as the edge runtime does, and
        the merged answer's recall, the per-image latency (edge, plus the round trip
        when offloaded) and the uploaded bytes are reported too. A cloud that cannot
        answer costs only those collaborative metrics, never the round.
        """
        import cv2
        import numpy as np

        from clients.edge import CloudRejected, CloudUnavailable, OffloadEntry
        from common import yolo
        from common.routing import Detections, ambiguity_reasons, matched_gt, merge
        from common.sites import label_path, split_dir

        r, t = self.cfg.routing, self.cfg.train
        predictor = yolo.Predictor(model, imgsz=t.imgsz, conf=r.candidate_conf or r.det_conf,
                                   iou=self.cfg.eval.iou, device=t.device)
        client = self.cloud_client()
        detections = ambiguous = 0
        found_all, found_confident, found_collab, ms, collab_ms, sent = [], [], [], [], [], []
        for n, path in enumerate(sorted(split_dir(self.spec.data_yaml, "test").glob("*.*"))):
            image = cv2.imread(str(path))
            if image is None:
                continue
            t0 = time.perf_counter()
            found = predictor([image])[0]
            ms.append(1000 * (time.perf_counter() - t0))
            every = Detections(found["xyxy"], found["conf"], found["cls"])
            edge = every.select(every.conf >= r.det_conf)  # the edge's answer; below it: candidates
            candidates = every.select(every.conf < r.det_conf)
            amb = np.array([bool(x) for x in ambiguity_reasons(edge.xyxy, edge.conf, None, r.t_conf, r.t_size)],
                           dtype=bool)
            detections, ambiguous = detections + len(amb), ambiguous + int(amb.sum())
            h, w = image.shape[:2]
            labels = label_path(path)
            rows = np.loadtxt(labels, ndmin=2) if labels.is_file() and labels.stat().st_size else np.zeros((0, 5))
            gt = np.stack([(rows[:, 1] - rows[:, 3] / 2) * w, (rows[:, 2] - rows[:, 4] / 2) * h,
                           (rows[:, 1] + rows[:, 3] / 2) * w, (rows[:, 2] + rows[:, 4] / 2) * h], 1)
            found_all.extend(matched_gt(edge.xyxy, edge.conf, gt))
            found_confident.extend(matched_gt(edge.xyxy[~amb], edge.conf[~amb], gt))
            if client is None:
                continue
            final, rtt, nbytes = edge, 0.0, 0
            offloaded = np.concatenate([amb, np.ones(len(candidates), dtype=bool)])
            if offloaded.any():
                both = Detections.concat([edge, candidates])
                entry = OffloadEntry.for_keyframe(image, both.xyxy, offloaded, site=self.spec.site_id, run="eval",
                                                  frame=n, mode=r.offload, created=time.time(), model="eval",
                                                  edge=both.to_list())
                try:
                    answer = client.send(entry)
                except (CloudUnavailable, CloudRejected) as err:
                    log.warning("%s: cloud service %s: %s: edge metrics only", self.spec.site_id,
                                self.cloud["url"], err)
                    client.close()
                    client, found_collab = None, []
                    continue
                keep = np.arange(len(both)) < len(edge) if r.keep_unanswered else np.zeros(len(both), dtype=bool)
                final = merge(both, answer.detections, offloaded, keep_unanswered=keep, resolve=r.merge)
                rtt, nbytes = answer.rtt_ms, entry.payload_bytes
            found_collab.extend(matched_gt(final.xyxy, final.conf, gt))
            collab_ms.append(ms[-1] + rtt)
            sent.append(nbytes)
        if client is not None:
            client.close()
        if not ms:
            return {}
        out = {P.OFFLOAD_FRACTION: ambiguous / detections if detections else 0.0,
               P.EDGE_RECALL: float(np.mean(found_all)) if found_all else 0.0,
               P.CONFIDENT_RECALL: float(np.mean(found_confident)) if found_confident else 0.0,
               P.EDGE_LATENCY_MS: float(np.median(ms))}
        if client is not None:
            out.update({P.COLLAB_RECALL: float(np.mean(found_collab)) if found_collab else 0.0,
                        P.COLLAB_LATENCY_MS: float(np.median(collab_ms)), P.UPLOAD_BYTES: float(np.mean(sent))})
        return out
