"""The local work of one edge site: train, evaluate, keep the model store.

Plain Python over the YOLO adapter, so it runs (and is tested) without Flower.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from common import protocol as P
from common.config import CedarConfig, from_run_config
from common.sites import SiteSpec, class_names, resolve_site, split_dir, split_images
from common.ultralytics_env import CEDAR_HOME

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    weights: dict
    metrics: dict[str, Any]
    gallery: list[dict[str, Any]] = field(default_factory=list)  # LocalSite.collab_round items, when asked


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
        default_store = CEDAR_HOME / "nodes" / spec.site_id
        cloud = {k: node_config.get(f"cloud-{k}") for k in ("url", "token-file", "cafile")}
        if not cloud["url"] and config:
            cloud.update(url=config.get(P.CLOUD_URL), token=config.get(P.CLOUD_TOKEN))
        return cls(cfg, spec, Path(str(node_config.get("model-store", default_store))), cloud)

    def cloud_client(self, keep: bool = False):
        """A :class:`clients.offload.CloudClient` for the configured cloud service, or None when there is none.

        ``keep`` False (scoring the site's own splits): the service answers without keeping the uploads as hard
        samples, so no validation or test image ever trains the cloud; True for the site's video
        (:meth:`video_offloads`), its production traffic."""
        if not self.cloud["url"]:
            return None
        from clients.offload import CloudClient
        from common.tokens import resolve_token

        try:
            token = self.cloud.get("token") or resolve_token(None, self.cloud["token-file"] or None)
        except ValueError as err:
            log.warning("%s: cloud service %s configured but no token (%s): edge metrics only",
                        self.spec.site_id, self.cloud["url"], err)
            return None
        return CloudClient(self.cloud["url"], token, self.spec.site_id, cafile=self.cloud["cafile"] or None,
                           keep=keep)

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

    def transfer_set(self, ensemble, server_round: int) -> tuple[Path, dict[str, int]]:
        """The KD transfer set: this site's labelled training images plus up to ``kd.unlabelled_frames`` of its
        unlabelled frames (evenly spaced over the source), labelled by its teachers
        (:func:`common.kd.pseudo_labels` at ``kd.pseudo_conf``, each teacher by its mixing weight).

        Written into the node's store (``transfer/``, replaced each round): the frames never leave the site. The
        soft-label loss runs on them as on the labelled images. Returns the data.yaml to train on and
        ``{transfer-frames, pseudo-boxes}``."""
        import shutil

        import cv2
        import yaml

        from clients.media import FrameSource
        from common import yolo
        from common.detections import Detections, yolo_label_lines
        from common.kd import pseudo_labels

        t, k = self.cfg.train, self.cfg.kd
        root = self.store / "transfer"
        shutil.rmtree(root, ignore_errors=True)
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        # teachers answer down to the lowest score a box can still pass with (their weights scale the scores)
        top = max(ensemble.weights)
        predictors = [yolo.Predictor(m, imgsz=t.imgsz, conf=k.pseudo_conf * top / w if w else 1.0, device=t.device)
                      for m, w in zip(ensemble.teachers, ensemble.weights)]
        source = FrameSource(self.spec.unlabelled)
        stride = max(1, (source.length or 0) // k.unlabelled_frames)
        frames = boxes = 0
        try:
            for frame in source:
                if frames >= k.unlabelled_frames:
                    break
                if frame.index % stride:
                    continue
                dets = [Detections(d["xyxy"], d["conf"], d["cls"]) for d in (p([frame.image])[0] for p in predictors)]
                labels = pseudo_labels(dets, ensemble.weights, k.pseudo_conf)
                h, w = frame.image.shape[:2]
                name = f"r{server_round}-{frame.index:06d}"
                lines = yolo_label_lines(labels.xyxy, labels.cls, w, h)
                (root / "labels" / f"{name}.txt").write_text("".join(f"{ln}\n" for ln in lines))
                cv2.imwrite(str(root / "images" / f"{name}.png"), frame.image)
                frames, boxes = frames + 1, boxes + len(lines)
        finally:
            source.close()
        splits = {s: str(split_dir(self.spec.data_yaml, s).resolve()) for s in ("train", "val", "test")}
        data = root / "data.yaml"
        data.write_text(yaml.safe_dump({"path": str(root.resolve()),
                                        "train": [splits["train"], str((root / "images").resolve())],
                                        "val": splits["val"], "test": splits["test"],
                                        "names": dict(enumerate(class_names(self.spec.data_yaml)))}))
        log.info("%s round %s: KD transfer set: %d unlabelled frames with %d pseudo-label boxes from %d teachers",
                 self.spec.site_id, server_round, frames, boxes, len(predictors))
        return data, {P.TRANSFER_FRAMES: frames, P.PSEUDO_BOXES: boxes}

    def evaluate(self, model, split: str):
        """Ultralytics' validator on one of this site's splits, at the evaluation settings."""
        from common import yolo

        t, ev = self.cfg.train, self.cfg.eval
        return yolo.evaluate(model, self.spec.data_yaml, split=split, imgsz=t.imgsz, batch=ev.batch, conf=ev.conf,
                             iou=ev.iou, device=t.device)

    def train_round(self, server_round: int, epochs: int, weights: dict | None,
                    kd: P.KDRequest | None = None, teachers: list[dict] = (), gallery: int = 0,
                    feature_teacher: dict | None = None) -> RoundResult:
        """Local training (distillation when ``kd`` names teachers; Ultralytics' own feature distillation
        from ``feature_teacher``'s weights, the library baseline of ``benchmarks.new_site``, where given), then
        evaluation on val and test, the answer threshold's calibration and the offload options' measurements
        on val (:meth:`calibrate`, stored with the weights) and the collaboration step on test at that
        threshold with the offload the budget picks (with ``gallery`` keyframes for the report, see
        :meth:`collab_round`)."""
        import torch

        from common import yolo
        from common.adverse import AdverseAugment

        torch.set_num_threads(self.cfg.train.threads)
        t = self.cfg.train
        model = self.build_model(weights)
        extra, kd_metrics = self.distiller(model, kd, list(teachers)) if kd else (None, {})
        data = self.spec.data_yaml
        if extra is not None and self.cfg.kd.unlabelled_frames and self.spec.unlabelled is not None:
            data, transfer = self.transfer_set(extra, server_round)
            kd_metrics.update(transfer)
        seed = self.cfg.seed + 1000 * server_round + self.spec.index
        augment = AdverseAugment(t.adverse_p, seed=seed) if t.adverse_p > 0 else None
        t0 = time.perf_counter()
        res = yolo.train(
            model, data, epochs=epochs, imgsz=t.imgsz, batch=t.batch,
            lr0=t.lr0 if weights is None else t.finetune_lr0,  # from scratch, or continuing a trained model
            weight_decay=t.weight_decay, warmup_iters=t.warmup_iters,  # every round: AdamW restarts
            mosaic=t.mosaic, workers=t.workers, seed=seed,
            device=t.device, desc=f"{self.spec.site_id} round {server_round}{' KD' if extra else ''}",
            extra_loss=extra, alpha=kd.alpha if extra else 1.0, augment=augment,
            feature_teacher=None if feature_teacher is None else self.build_model(feature_teacher),
        )
        val, test = self.evaluate(model, "val"), self.evaluate(model, "test")
        model.cedar_meta = {"round": server_round, "site": self.spec.site_id, **self.calibrate(model)}
        routing, pictures = self.collab_round(model, gallery)
        self.video_offloads(model, server_round)
        yolo.save_weights(model, self.store / "model.pt", **model.cedar_meta)
        log.info("%s round %s: loss %.3f, val mAP50 %.3f, test mAP50 %.3f (%.0fs)", self.spec.site_id,
                 server_round, res.loss, val.map50, test.map50, time.perf_counter() - t0)
        metrics = {
            P.NUM_EXAMPLES: max(1, res.images), P.TRAIN_LOSS: res.loss,
            P.TRAIN_SECONDS: res.seconds, P.VAL_MAP50: val.map50, P.TEST_MAP50: test.map50,
            P.TEST_MAP50_95: test.map50_95, P.TEST_AP50: P.encode_ap(test.ap50),
        }
        if extra:
            metrics[P.KD_LOSS] = res.extra_loss
        return RoundResult(yolo.state_dict(model), {**metrics, **kd_metrics, **routing}, pictures)

    # -- the collaboration step on the test split (clients.collab)
    def collab_settings(self, model=None):
        """:class:`clients.collab.CollabSettings` from ``routing`` (the edge runtime's defaults too), answering
        from ``model``'s calibrated threshold when it has one (``model.cedar_meta``, :meth:`calibrate`)."""
        from clients.collab import CollabSettings

        return CollabSettings.from_config(self.cfg.routing).for_model(getattr(model, "cedar_meta", None))

    def edge_predictor(self, model, conf: float | None = None):
        """The edge runtime's detector (:class:`clients.detector.TorchPredictor`) on ``model``, batch 1,
        down to ``conf`` (default: the candidates' confidence, else the answer threshold)."""
        from clients.detector import TorchPredictor

        t = self.cfg.train
        conf = self.collab_settings(model).detector_conf if conf is None else conf
        return TorchPredictor(model, imgsz=t.imgsz, conf=conf, iou=self.cfg.eval.iou, device=t.device)

    def calibrate(self, model) -> dict[str, Any]:
        """The model's answer threshold on this site's validation split, as the edge runtime detects (batch 1,
        down to ``CONF_RANGE[0]``): :func:`clients.collab.calibrate_conf` (F1-optimal confidence, class-aware
        matches at IoU 0.5, micro F1 over the classes, clipped to ``CONF_RANGE``). Returns ``{"det_conf", "f1",
        "precision", "recall"}``; no ``det_conf`` when no detection matches an object (the model then answers from
        ``routing.det_conf``). With ``routing.budget`` set and a cloud service that answers, also ``"offload"``:
        every offload option measured on the same split at that threshold (:func:`clients.collab.measure_offload`),
        from which the budget picks (:meth:`clients.collab.CollabSettings.for_model`)."""
        from clients.collab import CONF_RANGE, META_CONF, META_OFFLOAD, CollabSettings, calibrate_conf

        predictor = self.edge_predictor(model, conf=CONF_RANGE[0])
        images, dets, gts = [], [], []
        for _, image, gt in split_images(self.spec.data_yaml, "val"):
            images.append(image)
            dets.append(predictor(image))
            gts.append(gt)
        nc = len(class_names(self.spec.data_yaml))
        found = calibrate_conf(dets, gts, nc) or {}
        if found:
            log.info("%s: answer threshold %.3f (val F1 %.3f, precision %.3f, recall %.3f)", self.spec.site_id,
                     found[META_CONF], found["f1"], found["precision"], found["recall"])
        else:
            log.info("%s: no detection matches a val object; answer threshold routing.det_conf %.3f",
                     self.spec.site_id, self.cfg.routing.det_conf)
        if self.cfg.routing.budget and images:
            settings = CollabSettings.from_config(self.cfg.routing).for_model(found)
            measured = self.measure_offload(settings, images, gts, dets, nc)
            if measured:
                found[META_OFFLOAD] = measured
        return found

    def measure_offload(self, settings, images, gts, dets, nc: int) -> dict | None:
        """:func:`clients.collab.measure_offload` on validation images against the site's cloud service; None
        (logged) when the node knows none or it does not answer."""
        from clients.collab import measure_offload
        from clients.offload import CloudRejected, CloudUnavailable

        client = self.cloud_client()
        if client is None:
            return None
        try:
            measured = measure_offload(images, gts, dets, client, settings, nc, site=self.spec.site_id)
        except (CloudUnavailable, CloudRejected) as err:
            log.warning("%s: cloud service %s: %s: no offload measurements", self.spec.site_id, self.cloud["url"],
                        err)
            return None
        finally:
            client.close()
        log.info("%s: offload options on val (bytes/frame, mAP50, recall; whole frame %.0f B): %s", self.spec.site_id,
                 measured["frame_bytes"], "; ".join(f"{o['settings']['offload']} t_conf {o['settings']['t_conf']:g} "
                                                    f"cand {o['settings']['candidate_conf']:g} "
                                                    f"q{o['settings']['jpeg_quality']} {o['bytes']:.0f} "
                                                    f"{o['map50']:.3f} {o['recall']:.3f}"
                                                    for o in measured["options"]))
        return measured

    def video_offloads(self, model, server_round: int) -> dict[str, int]:
        """The site's video through the edge runtime's keyframe rule, tracker and collaboration step against the
        cloud service, whose uploads it keeps as hard samples: the production traffic the cloud fine-tunes on
        before a cloud-to-edge KD round (section 4.2 (2)). Frames are tagged ``r<round>.<frame>``. Returns (and
        logs) ``{"frames", "keyframes", "offloads", "bytes"}``; nothing when there is no video or no service, and
        a cloud that does not answer costs only these uploads."""
        from clients.collab import collaborate
        from clients.edge import EdgeSettings
        from clients.media import FrameSource
        from clients.offload import CloudRejected, CloudUnavailable
        from common.keyframes import IoUTracker, KeyframeSelector

        video = self.spec.unlabelled
        client = self.cloud_client(keep=True) if video is not None else None
        if client is None:
            return {}
        e, s = EdgeSettings(), self.collab_settings(model)
        selector = KeyframeSelector(beta=e.beta, warmup=e.warmup, cut_threshold=e.cut_threshold, max_gap=e.max_gap)
        tracker = IoUTracker(iou_threshold=e.track_iou, max_age=max(0, e.n_frames - 1), history=e.n_frames)
        predictor, counts, source = self.edge_predictor(model), dict(frames=0, keyframes=0, offloads=0, bytes=0), \
            FrameSource(video)
        try:
            for frame in source:
                counts["frames"] += 1
                is_key, reason = selector.update_with_reason(frame.image)
                if not is_key and counts["keyframes"]:
                    continue
                if reason == "cut":
                    tracker.reset()
                counts["keyframes"] += 1
                step = collaborate(frame.image, predictor, client, s, site=self.spec.site_id,
                                   run=f"r{server_round}", frame=frame.index, tracker=tracker)
                if step.entry is not None:
                    counts["offloads"] += 1
                    counts["bytes"] += step.entry.payload_bytes
        except (CloudUnavailable, CloudRejected) as err:
            log.warning("%s: cloud service %s: %s: video uploads stopped", self.spec.site_id, self.cloud["url"], err)
        finally:
            source.close()
            client.close()
        log.info("%s: video: %d frames, %d keyframes, %d uploads (%d B) kept by the cloud as hard samples",
                 self.spec.site_id, counts["frames"], counts["keyframes"], counts["offloads"], counts["bytes"])
        return counts

    def _collab_steps(self, model) -> Iterator[tuple[Path, Any, Any, Any, bool]]:
        """Every test image through :func:`clients.collab.collaborate`: ``(path, image, gt, step, answered)``.

        ``gt``: ``(M, 5)`` pixel rows ``cls, x1, y1, x2, y2``; ``answered``: the cloud service answered (False
        from the first failure on: the client is closed and the rest of the split runs without a cloud)."""
        from clients.collab import collaborate
        from clients.offload import CloudRejected, CloudUnavailable

        s, predictor, client = self.collab_settings(model), self.edge_predictor(model), self.cloud_client()
        log.info("%s: offload %s (%s, routing.budget %r)", self.spec.site_id, s.option(), s.offload_source, s.budget)
        try:
            for n, (path, image, gt) in enumerate(split_images(self.spec.data_yaml, "test")):
                kw = dict(site=self.spec.site_id, run="eval", frame=n)
                try:
                    step = collaborate(image, predictor, client, s, **kw)
                except (CloudUnavailable, CloudRejected) as err:
                    log.warning("%s: cloud service %s: %s: edge metrics only", self.spec.site_id, self.cloud["url"],
                                err)
                    client.close()
                    client = None
                    step = collaborate(image, predictor, None, s, **kw)
                yield path, image, gt, step, client is not None
        finally:
            if client is not None:
                client.close()

    def collab_round(self, model, gallery: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The collaboration step on the test split (paper section 4.2): what the edge offloads, and what it gains.

        Each test image is a keyframe through :func:`clients.collab.collaborate` with the edge runtime's own
        detector and settings (``routing.*``, the answer threshold ``model``'s calibrated one when it has one;
        still images have no tracks, so nothing is ``unstable``). Always: the answer threshold, the edge answer's
        mAP50, recall and FNR (class-aware, IoU 0.5, :func:`common.detections.score`), the
        recall of its confident boxes alone, the share of its boxes that are ambiguous, the offloaded boxes per
        reason and the median detection latency. When the node knows a cloud service (``routing.cloud-url`` or
        node-config ``cloud-url``) and it answers every offload: the merged answer's mAP50, recall and FNR, the
        median latency (edge plus round trip when offloaded) and the JPEG bytes sent per image. A cloud that
        cannot answer costs only those collaborative metrics, never the round. Keys: ``common.protocol``
        ``ROUTING_KEYS`` and ``COLLAB_KEYS``; a value that is not a number (no labelled object) is left out.

        Also, from the same pass, up to ``gallery`` keyframes for a report's gallery: images where the edge
        offloads first (in name order), then the others. Each item::

            {"image": "<path of the test image file>",
             "gt": boxes, "edge": boxes, "cloud": boxes | None, "merged": boxes}

        where ``boxes`` is ``{"xyxy": [[x1, y1, x2, y2], ...], "conf": [...], "cls": [...]}`` in image pixels
        (plain lists; ground truth at conf 1.0), ``edge`` the edge's answer, ``cloud`` the cloud's answer to the
        offload (None when nothing was offloaded or no cloud answered) and ``merged`` the final answer: the
        items :func:`server.report.write_gallery` takes.
        """
        import numpy as np

        from common.detections import score
        from common.routing import reason_counts
        from common.sites import class_names

        from clients.collab import boxes
        from common.detections import Detections

        steps, gts, answered = [], [], True
        offloaded: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for path, _, gt, step, ok in self._collab_steps(model):
            steps.append(step)
            gts.append(gt)
            answered &= ok
            chosen = offloaded if step.entry is not None else others
            if len(chosen) < gallery:
                chosen.append({"image": str(path), **step.boxes(),
                               "gt": boxes(Detections(gt[:, 1:], [1.0] * len(gt), gt[:, 0].astype(int)))})
        pictures = (offloaded + others)[:gallery]
        if not steps:
            return {}, pictures
        nc = len(class_names(self.spec.data_yaml))
        edge = score([st.keyframe.detections for st in steps], gts, nc)
        confident = score([st.keyframe.detections.select(~st.keyframe.offload_mask) for st in steps], gts, nc)
        n_boxes = sum(len(st.keyframe.detections) for st in steps)
        reasons = reason_counts(r for st in steps for r in st.keyframe.reasons)
        n_ambiguous = sum(int(st.keyframe.offload_mask.sum()) for st in steps)
        out = {P.EDGE_DET_CONF: self.collab_settings(model).det_conf,
               P.OFFLOAD_FRACTION: n_ambiguous / n_boxes if n_boxes else 0.0,
               P.EDGE_MAP50: edge["map50"], P.EDGE_RECALL: edge["recall"], P.EDGE_FNR: edge["fnr"],
               P.CONFIDENT_RECALL: confident["recall"],
               P.EDGE_LATENCY_MS: float(np.median([st.edge_ms for st in steps])),
               **{P.REASON_KEYS[k]: float(v) for k, v in reasons.items()},
               P.OFFLOAD_CANDIDATES: float(sum(len(st.keyframe.candidates) for st in steps))}
        if answered:  # a service was configured and answered every offload (an image without one: merged = edge)
            merged = score([st.merged for st in steps], gts, nc)
            out.update({P.COLLAB_MAP50: merged["map50"], P.COLLAB_RECALL: merged["recall"],
                        P.COLLAB_FNR: merged["fnr"],
                        P.COLLAB_LATENCY_MS: float(np.median([st.edge_ms + st.rtt_ms for st in steps])),
                        P.UPLOAD_BYTES: float(np.mean([st.sent_bytes for st in steps]))})
        return {k: float(v) for k, v in out.items() if np.isfinite(v)}, pictures
