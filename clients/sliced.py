"""Sliced inference with the edge's own detector, through the ``sahi`` package: the small-object baseline
that needs no cloud (Akyon et al., "Slicing Aided Hyper Inference", ICIP 2022).

The frame is cut into overlapping ``slice`` x ``slice`` tiles (``sahi.slicing``); each tile, and the whole
frame (SAHI's standard prediction, for large objects), goes through the same :class:`clients.detector.Predictor`
the edge runtime runs, so a tile is enlarged to the model's input size and a small object gets more pixels.
The tiles' detections are shifted back and merged by SAHI's postprocess (greedy non-maximum merging on
intersection over the smaller box by default, per class), as ``sahi.predict.get_sliced_prediction`` does.

SAHI sees the frame as an array and hands the tiles back in the same channel order, so BGR frames reach
the predictor as BGR tiles. Example::

    predictor = TorchPredictor(model, imgsz=320, conf=0.25)
    dets = sliced_detect(predictor, frame, slice_px=160)  # 2x zoom on 160 px tiles, 20 % overlap
"""

from __future__ import annotations

import numpy as np

from clients.detector import Predictor
from common.detections import Detections


def sahi_model(predictor: Predictor, conf: float = 0.0):
    """``predictor`` as a SAHI detection model (``sahi.models.base.DetectionModel``), keeping scores ``>= conf``
    (SAHI's category names are the class ids)."""
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
    from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list

    class CedarDetectionModel(DetectionModel):
        def set_model(self, model, **kwargs) -> None:
            self.model = model

        def perform_inference(self, image: np.ndarray) -> None:
            self._original_predictions = self.model(image)

        def _create_object_prediction_list_from_original_predictions(self, shift_amount_list=None,
                                                                     full_shape_list=None) -> None:
            dets: Detections = self._original_predictions
            shift = (fix_shift_amount_list(shift_amount_list) or [[0, 0]])[0]
            full = fix_full_shape_list(full_shape_list)
            h, w = full[0] if full else (None, None)
            keep = dets.conf >= self.confidence_threshold
            preds = []
            for box, score, cls in zip(dets.xyxy[keep], dets.conf[keep], dets.cls[keep]):
                x1, y1, x2, y2 = (float(v) for v in box)
                if x2 - x1 <= 0 or y2 - y1 <= 0:  # SAHI refuses empty boxes; a clipped one can be
                    continue
                preds.append(ObjectPrediction(bbox=[x1, y1, x2, y2], category_id=int(cls),
                                              category_name=str(int(cls)),
                                              score=float(score), shift_amount=list(shift),
                                              full_shape=None if h is None else [int(h), int(w)]))
            self._object_prediction_list_per_image = [preds]

    return CedarDetectionModel(model=predictor, confidence_threshold=conf, device="cpu")


def sliced_detect(predictor: Predictor, image: np.ndarray, *, slice_px: int, overlap: float = 0.2,
                  conf: float = 0.0, standard_pred: bool = True,
                  postprocess: str = "GREEDYNMM", match_metric: str = "IOS", match_threshold: float = 0.5,
                  model=None) -> Detections:
    """Detections of ``predictor`` on ``image`` (BGR, H x W x 3) by SAHI's sliced prediction.

    ``slice_px``: the tiles' side in frame pixels; ``overlap``: their overlap ratio; ``standard_pred``: the
    whole frame too; ``postprocess``/``match_metric``/``match_threshold``: SAHI's merge (``GREEDYNMM``,
    ``NMM`` or ``NMS``; ``IOS`` or ``IOU``), per class. ``conf``: a floor on top of the predictor's own.
    ``model``: a :func:`sahi_model` of ``predictor`` to reuse (else one is built).
    """
    from sahi.predict import get_sliced_prediction

    if slice_px < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"slice_px={slice_px!r} must be >= 1 and overlap={overlap!r} in [0, 1)")
    if model is None:
        model = sahi_model(predictor, conf)
    result = get_sliced_prediction(
        np.ascontiguousarray(image), model, slice_height=slice_px, slice_width=slice_px,
        overlap_height_ratio=overlap, overlap_width_ratio=overlap, perform_standard_pred=standard_pred,
        postprocess_type=postprocess, postprocess_match_metric=match_metric,
        postprocess_match_threshold=match_threshold, verbose=0, force_postprocess_type=True)
    preds = result.object_prediction_list
    if not preds:
        return Detections.empty()
    return Detections(np.array([p.bbox.to_xyxy() for p in preds], dtype=np.float64),
                      np.array([p.score.value for p in preds], dtype=np.float64),
                      np.array([p.category.id for p in preds], dtype=np.int64))
