"""Knowledge-distillation losses (paper section 4.3: L_total, L_KD and p(y)).

Torch only. Teacher outputs are constants everywhere (detached); gradients flow to
the student only. Choices where the paper is unclear:

* **Direction.** The paper writes ``KL(p_s, p_t)``; we use ``KL(p_t || p_s)``, the
  standard (Hinton et al., 2015) direction, whose gradient w.r.t. the student logits
  is ``(p_s - p_t) / T``. Both losses are multiplied by ``T^2`` so their gradient
  scale does not shrink with the temperature.
* **Reduction.** Summed over classes (or bins), averaged over samples / anchors
  (torch's ``reduction="batchmean"`` for 2-D input). Zero samples give a
  differentiable 0, never NaN.
* **Detection.** YOLO class scores are independent sigmoids, so the classification
  term is a per-class Bernoulli KL ``KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T)))``,
  summed over classes; the box term is a softmax KL on the DFL distributions
  (``reg_max`` bins per side), averaged over the 4 sides. Both are averaged over
  the anchors the teacher marks as foreground (max class probability >= a
  threshold, at T = 1), pooled over all shared strides (so each anchor counts once
  and finer levels weigh by their anchor count, like Ultralytics' own loss). With
  the student's labels given (``truth``), only the anchors where the teacher is
  closer to them than the student (*teacher-better* selection; not in the paper).
* **Boxes without DFL.** A head without DFL bins (YOLO26: ``reg_max = 1``) predicts the
  four side distances directly, so there is no distribution to match: where the student
  or a teacher has no DFL (or another ``reg_max``), the box term is :func:`box_kd_loss`,
  L1 on the side distances plus ``1 - GIoU`` of the boxes they span, both in grid cells
  at the anchor, on the same anchors; a DFL head enters it through its expected
  distances. The temperature does not apply to it (a regression, not a distribution).
* **Different heads.** Teacher and student may have different strides (PyraFAN:
  4/8/16, YOLO11 and YOLO26: 8/16/32, YOLO26-P2: 4/8/16/32); we distil only on the
  strides both have. The same holds across families (a YOLO11 teacher, a YOLO26
  student, or the reverse): class logits mean the same in both, and the box term is
  :func:`box_kd_loss` on side distances.
* **Several teachers.** Their soft outputs are mixed as *probabilities* (a mixture
  of their predictive distributions), not logits: averaging logits would make the
  mixture sharper than any teacher where they agree and can invent confident
  classes neither predicts. The losses take teacher probabilities, so a mixture goes in directly.
* **Unlabelled images.** A site's unlabelled frames (its video) join the transfer set with hard
  pseudo-labels from its teachers (:func:`pseudo_labels`), so the detection loss has boxes to learn
  from there too, and the soft-label loss runs on them as on the labelled images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from common.detections import Detections, nms


def total_loss(task_loss, kd_loss, alpha: float):
    """``L_total = alpha * L_task + (1 - alpha) * L_KD`` (paper section 4.3, L_total).

    Works on floats and tensors. Example: alpha = 0.25, task = 2, kd = 4 -> 0.5 + 3 = 3.5.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha!r}")
    return alpha * task_loss + (1.0 - alpha) * kd_loss


def binary_kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class Bernoulli distillation loss for sigmoid classifiers (paper section 4.3, L_KD for YOLO heads).

    ``T^2 * mean_{anchors in mask} sum_k KL(Bern(p_k) || Bern(q_k))``, ``p = sigmoid(t / T)`` (the teacher's,
    or a mixture of teachers', see :func:`mix_teachers`), ``q = sigmoid(s / T)``,
    ``KL = p ln(p/q) + (1-p) ln((1-p)/(1-q))``.

    Parameters
    ----------
    student_logits : torch.Tensor
        Shape ``(..., nc)``.
    teacher_probs : torch.Tensor
        ``sigmoid(t / T)``, shape ``(..., nc)``.
    temperature : float
        T > 0.
    mask : torch.Tensor, optional
        Bool, shape ``(...)`` (e.g. the teacher's foreground anchors); all anchors by default.
        An empty mask gives a differentiable 0.

    Examples
    --------
    t = 0 -> p = 0.5; s = ln 3 -> q = 0.75; KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.14384.
    """
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_probs)
    p = teacher_probs.detach()
    s = student_logits / temperature
    # p ln p + (1-p) ln(1-p) - p ln q - (1-p) ln(1-q), with ln q = logsigmoid(s), ln(1-q) = logsigmoid(-s)
    kl = (
        torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p) - p * F.logsigmoid(s) - (1 - p) * F.logsigmoid(-s)
    )  # (..., nc)
    return _masked_mean(kl.sum(dim=-1), mask) * temperature**2


def dfl_kd_loss(
    student_dfl: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Localisation distillation on DFL box distributions (paper section 4.3, L_KD).

    ``T^2 * mean_{anchors in mask} mean_{4 sides} KL(softmax(t/T) || softmax(s/T))`` over the
    ``reg_max`` bins of each side.

    Parameters
    ----------
    student_dfl : torch.Tensor
        Logits, shape ``(..., 4, reg_max)`` (Ultralytics: reg_max = 16).
    teacher_probs : torch.Tensor
        ``softmax(t / T)`` over the bins (or a mixture of teachers'), shape ``(..., 4, reg_max)``.
    temperature : float
        T > 0.
    mask : torch.Tensor, optional
        Bool, shape ``(...)``; all anchors by default.

    Examples
    --------
    Every side with teacher [0.5, 0.5] and student logits [0, ln 3] (reg_max = 2) -> 0.14384 per side -> 0.14384.
    """
    _check_temperature(temperature)
    _check_same_shape(student_dfl, teacher_probs)
    if student_dfl.dim() < 2 or student_dfl.shape[-2] != 4:
        raise ValueError(f"DFL tensors must be shaped (..., 4, reg_max), got {tuple(student_dfl.shape)}")
    per_anchor = _softmax_kl(student_dfl, teacher_probs, temperature).mean(dim=-1)  # (...)
    return _masked_mean(per_anchor, mask) * temperature**2


def box_kd_loss(student_ltrb: torch.Tensor, teacher_ltrb: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Box distillation without DFL: ``mean_{anchors in mask} [mean_4 |s - t| + 1 - GIoU(s, t)]``.

    Both boxes sit on the same anchor, so each is ``(-l, -t, r, b)`` around it and the
    L1 of the side distances equals the L1 of the corners. GIoU = IoU - (C - U) / C with
    C the smallest box enclosing both and U their union; it keeps a gradient where the
    boxes do not overlap.

    Parameters
    ----------
    student_ltrb, teacher_ltrb : torch.Tensor
        Shape ``(..., 4)``: left, top, right, bottom distances from the anchor point, in grid cells
        (YOLO26's raw box channels; a DFL head's expected bins, :func:`dfl_distances`).
    mask : torch.Tensor, optional
        Bool, shape ``(...)``; all anchors by default. An empty mask gives a differentiable 0.

    Examples
    --------
    Teacher (1, 1, 1, 1) (a 2x2 box), student (1, 1, 2, 1) (3x2): L1 = (0 + 0 + 1 + 0) / 4 = 0.25;
    intersection 4, union 6, enclosing 6: GIoU = 2/3; loss = 0.25 + 1/3 = 0.58333.
    """
    _check_same_shape(student_ltrb, teacher_ltrb)
    if student_ltrb.dim() < 1 or student_ltrb.shape[-1] != 4:
        raise ValueError(f"side distances must be shaped (..., 4), got {tuple(student_ltrb.shape)}")
    t = teacher_ltrb.detach()
    l1 = (student_ltrb - t).abs().mean(dim=-1)
    return _masked_mean(l1 + 1.0 - _giou_same_anchor(student_ltrb, t), mask)


def _giou_same_anchor(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """GIoU of the boxes ``(-l, -t, r, b)`` that two ``(..., 4)`` side-distance tensors span around one anchor."""
    area_a = (a[..., 0] + a[..., 2]).clamp(min=0) * (a[..., 1] + a[..., 3]).clamp(min=0)
    area_b = (b[..., 0] + b[..., 2]).clamp(min=0) * (b[..., 1] + b[..., 3]).clamp(min=0)
    near, far = torch.minimum(a, b), torch.maximum(a, b)
    inter = (near[..., 0] + near[..., 2]).clamp(min=0) * (near[..., 1] + near[..., 3]).clamp(min=0)
    union = area_a + area_b - inter
    hull = (far[..., 0] + far[..., 2]).clamp(min=0) * (far[..., 1] + far[..., 3]).clamp(min=0)
    return inter / union.clamp(min=eps) - (hull - union) / hull.clamp(min=eps)


def mix_teachers(outputs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Mix several teachers' probabilities: ``sum_k w_k p_k / sum_k w_k`` (weights from ``teachers_for``).

    Mixes probabilities, not logits (see the module docstring); the result of
    per-class sigmoids stays in [0, 1], of softmaxes sums to 1.

    Parameters
    ----------
    outputs : sequence of torch.Tensor
        Teacher probabilities, all the same shape, values in [0, 1].
    weights : sequence of float
        Non-negative, positive sum; renormalised to sum 1.

    Examples
    --------
    [0.9, 0.1] with weight 0.75 and [0.5, 0.5] with 0.25 -> [0.8, 0.2].
    """
    for k, out in enumerate(outputs):
        if out.numel() and (out.min() < 0 or out.max() > 1):
            raise ValueError(
                f"teacher output {k} has values outside [0, 1]: mix_teachers mixes probabilities, not logits"
            )
    return weighted_mean(outputs, weights)


def weighted_mean(outputs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k w_k x_k / sum_k w_k`` of same-shaped (detached) tensors; what :func:`mix_teachers` and the
    teachers' side distances use. Example: [2.0] with weight 3 and [6.0] with 1 -> [3.0]."""
    if len(outputs) == 0 or len(outputs) != len(weights):
        raise ValueError(f"need one weight per teacher output, got {len(outputs)} outputs and {len(weights)} weights")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and sum to > 0, got {list(weights)}")
    for out in outputs:
        _check_same_shape(outputs[0], out)
    total = float(sum(weights))
    return sum(out.detach() * (w / total) for out, w in zip(outputs, weights, strict=True))


def split_head_outputs(
    outputs: Sequence[torch.Tensor], strides: Sequence[int], reg_max: int = 16
) -> dict[int, dict[str, torch.Tensor]]:
    """Raw per-level Detect-head outputs -> ``{stride: {"dfl": ..., "cls": ...}}`` (``"ltrb"`` for ``reg_max = 1``).

    An Ultralytics Detect head returns, per level, ``(B, 4 * reg_max + nc, H, W)``: the
    box channels first (DFL logits, or with ``reg_max = 1`` as in YOLO26 the four side
    distances in grid cells), then the class logits.

    Examples
    --------
    One level ``(2, 64 + 3, 80, 80)`` at stride 8 -> ``{8: {"dfl": (2, 64, 80, 80), "cls": (2, 3, 80, 80)}}``;
    with ``reg_max = 1``, ``(2, 4 + 3, 80, 80)`` -> ``{8: {"ltrb": (2, 4, 80, 80), "cls": (2, 3, 80, 80)}}``.
    """
    if len(outputs) != len(strides):
        raise ValueError(f"got {len(outputs)} level outputs for strides {list(strides)}")
    levels = {}
    for stride, out in zip(strides, outputs, strict=True):
        if out.dim() != 4 or out.shape[1] <= 4 * reg_max:
            raise ValueError(f"stride {stride}: expected (B, 4*{reg_max} + nc, H, W), got {tuple(out.shape)}")
        levels[int(stride)] = {"dfl" if reg_max > 1 else "ltrb": out[:, : 4 * reg_max], "cls": out[:, 4 * reg_max :]}
    return levels


class DetectionKDLoss(NamedTuple):
    """Result of :func:`detection_kd_loss`."""

    total: torch.Tensor  # cls_weight * cls + box_weight * box
    cls: torch.Tensor  # Bernoulli KL term
    box: torch.Tensor  # DFL KL term, or L1 + (1 - GIoU) on side distances (box_kind "ltrb")
    num_foreground: int  # anchors the class term distilled on
    strides: tuple[int, ...]  # shared strides used
    box_kind: str = "dfl"  # "dfl": every head has the same DFL bins; "ltrb": box_kd_loss


class GroundTruth(NamedTuple):
    """The student's labelled boxes of a batch, for :func:`detection_kd_loss`'s teacher-better selection."""

    boxes: torch.Tensor  # (N, 4) xyxy, input pixels
    classes: torch.Tensor  # (N,) class ids
    image_index: torch.Tensor  # (N,) image of each box in the batch


def detection_kd_loss(
    student_levels: Mapping[int, Mapping[str, torch.Tensor]],
    teacher_levels: Mapping[int, Mapping[str, torch.Tensor]] | Sequence[Mapping[int, Mapping[str, torch.Tensor]]],
    temperature: float,
    fg_threshold: float,
    cls_weight: float = 1.0,
    box_weight: float = 1.0,
    teacher_weights: Sequence[float] | None = None,
    truth: GroundTruth | None = None,
) -> DetectionKDLoss:
    """Response-based detection distillation on the strides student and teacher(s) share (paper section 4.3, L_KD).

    ``total = cls_weight * binary_kd + box_weight * box``, pooled over all shared strides,
    each averaged over its selected anchors. ``box`` is :func:`dfl_kd_loss` when student and
    teachers have the same DFL bins, else :func:`box_kd_loss` on side distances (a head
    without DFL, e.g. YOLO26, or two families; ``box_kind`` says which). The anchors:

    * without ``truth`` (the paper's soft labels): both over the teacher's foreground
      anchors (max class probability >= ``fg_threshold``);
    * with ``truth`` (the student's own labels; *teacher-better* selection): only where the
      teacher is closer to the truth than the student, judged at T = 1 on detached outputs.
      Class term: at an anchor of a labelled box (:func:`anchor_targets`) when the teacher
      gives the box's class a higher probability than the student; at a background anchor
      when the student fires there (max probability >= ``fg_threshold``) and the teacher
      fires less. Box term: at an anchor of a labelled box when the teacher's decoded box
      overlaps it more (IoU) than the student's. A teacher that is behind the student
      anywhere (a peer the student has overtaken during the round, a site of another task)
      then cannot pull it back there.

    Parameters
    ----------
    student_levels : mapping stride -> {"cls": (B, nc, H, W), "dfl": (B, 4 * reg_max, H, W)}
        Raw logits (see :func:`split_head_outputs`); DFL channels ordered side-major
        (channel = side * reg_max + bin), as in Ultralytics. A head without DFL gives
        ``"ltrb": (B, 4, H, W)`` side distances in grid cells instead of ``"dfl"``.
    teacher_levels : one such mapping, or a sequence of them (several teachers)
        Detached. With several teachers, give ``teacher_weights`` (e.g. from
        ``teachers_for``): their probabilities are mixed (:func:`mix_teachers`), their
        side distances averaged (:func:`weighted_mean`), and the foreground mask comes
        from the mixed class probabilities at T = 1.
    temperature : float
        T > 0.
    fg_threshold : float
        Foreground threshold on the teacher's max class probability, in [0, 1].

    Raises
    ------
    ValueError
        No shared stride, or shapes that differ on a shared stride.
    """
    _check_temperature(temperature)
    _check_threshold(fg_threshold)
    if isinstance(teacher_levels, Mapping):
        teachers, weights = [teacher_levels], [1.0]
    else:
        teachers, weights = list(teacher_levels), teacher_weights
        if weights is None or len(weights) != len(teachers):
            raise ValueError(f"{len(teachers)} teachers need as many teacher_weights, got {weights}")
    strides = set(student_levels)
    for levels in teachers:
        strides &= set(levels)
    if not strides:
        raise ValueError(
            f"no shared stride: student {sorted(student_levels)}, teacher(s) {[sorted(levels) for levels in teachers]}"
        )
    for stride in strides:
        _check_level(stride, student_levels, teachers)
    heads = [student_levels, *teachers]
    use_dfl = all("dfl" in levels[s] for levels in heads for s in strides) and all(
        levels[s]["dfl"].shape == student_levels[s]["dfl"].shape for levels in teachers for s in strides)

    s_cls, s_box, t_cls, t_box, cls_masks, box_masks = [], [], [], [], [], []
    for stride in sorted(strides):
        student = student_levels[stride]
        s_cls.append(_anchors_cls(student["cls"]))  # (A_l, nc)
        # (A_l, 4, reg_max) DFL logits, or (A_l, 4) side distances in cells
        s_box.append(_anchors_dfl(student["dfl"]) if use_dfl else _level_distances(student))
        with torch.no_grad():
            cls_logits = [_anchors_cls(levels[stride]["cls"]) for levels in teachers]
            t_cls.append(mix_teachers([torch.sigmoid(z / temperature) for z in cls_logits], weights))
            t_dist = weighted_mean([_level_distances(levels[stride]) for levels in teachers], weights)  # (A_l, 4)
            t_box.append(mix_teachers([F.softmax(_anchors_dfl(levels[stride]["dfl"]) / temperature, dim=-1)
                                       for levels in teachers], weights) if use_dfl else t_dist)
            confidence = mix_teachers([torch.sigmoid(z) for z in cls_logits], weights)  # T = 1
            if truth is None:
                cls_masks.append(confidence.amax(dim=-1) >= fg_threshold)  # (A_l,)
                box_masks.append(cls_masks[-1])
                continue
            b, _, h, w = student["cls"].shape
            owner = anchor_targets(truth.boxes, truth.image_index, b, (h, w), stride).reshape(-1)  # (A_l,)
            gt = owner >= 0
            probs = torch.sigmoid(s_cls[-1].detach())
            k = truth.classes.long()[owner.clamp(min=0)]  # the owner's class (garbage where background)
            cls_better = torch.where(gt, confidence.gather(1, k[:, None])[:, 0] > probs.gather(1, k[:, None])[:, 0],
                                     (probs.amax(-1) >= fg_threshold) & (confidence.amax(-1) < probs.amax(-1)))
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            points = (torch.stack([xs, ys], -1).reshape(-1, 2).to(probs) + 0.5).repeat(b, 1)  # (A_l, 2) cells
            target = truth.boxes.to(probs)[owner.clamp(min=0)]
            t_iou = box_iou_pairs(ltrb_boxes(t_dist, points, stride), target)
            s_iou = box_iou_pairs(ltrb_boxes(_level_distances(student).detach(), points, stride), target)
            cls_masks.append(cls_better)
            box_masks.append(gt & (t_iou > s_iou))

    cls_mask, box_mask = torch.cat(cls_masks), torch.cat(box_masks)  # (A,) over all shared levels
    cls = binary_kd_loss(torch.cat(s_cls), torch.cat(t_cls), temperature, cls_mask)
    if use_dfl:
        box = dfl_kd_loss(torch.cat(s_box), torch.cat(t_box), temperature, box_mask)
    else:
        box = box_kd_loss(torch.cat(s_box), torch.cat(t_box), box_mask)
    return DetectionKDLoss(cls_weight * cls + box_weight * box, cls, box, int(cls_mask.sum()),
                           tuple(sorted(strides)), "dfl" if use_dfl else "ltrb")


def anchor_targets(boxes: torch.Tensor, image_index: torch.Tensor, batch: int, shape: tuple[int, int],
                   stride: int) -> torch.Tensor:
    """Which ground-truth box each anchor of one level belongs to (-1: background), shape ``(B, H, W)``.

    An anchor belongs to a box when its centre ``((x + 0.5) * stride, (y + 0.5) * stride)``
    lies inside it; the anchor under the box's own centre always does, so a box smaller
    than the stride still owns one anchor. Where boxes overlap the smallest one wins.

    Parameters
    ----------
    boxes : torch.Tensor
        ``(N, 4)`` xyxy in input pixels.
    image_index : torch.Tensor
        ``(N,)`` image of each box in the batch.
    batch : int
        B.
    shape : (H, W) of the level.
    stride : int

    Examples
    --------
    Stride 8, a 4x4 level, box (0, 0, 12, 12) in image 0: anchor centres 4 and 12 ->
    only (0, 0) lies inside (12 is on the edge, not inside) -> target[0] = [[0, -1, ...], ...].
    """
    h, w = shape
    out = torch.full((batch, h, w), -1, dtype=torch.long, device=boxes.device)
    if not len(boxes):
        return out
    cx = (torch.arange(w, device=boxes.device) + 0.5) * stride
    cy = (torch.arange(h, device=boxes.device) + 0.5) * stride
    x1, y1, x2, y2 = boxes.unbind(-1)
    inside = ((cx[None, None, :] > x1[:, None, None]) & (cx[None, None, :] < x2[:, None, None])
              & (cy[None, :, None] > y1[:, None, None]) & (cy[None, :, None] < y2[:, None, None]))  # (N, H, W)
    n = torch.arange(len(boxes), device=boxes.device)
    ix = ((x1 + x2) / 2 / stride).long().clamp(0, w - 1)
    iy = ((y1 + y2) / 2 / stride).long().clamp(0, h - 1)
    inside[n, iy, ix] = True
    for k in torch.argsort((x2 - x1) * (y2 - y1), descending=True).tolist():  # smaller boxes written last
        out[int(image_index[k])][inside[k]] = k
    return out


def dfl_distances(dfl_probs: torch.Tensor) -> torch.Tensor:
    """Side distances (cells) from DFL bin probabilities ``(..., 4, reg_max)``: the expected bin ``sum_i i * p_i``,
    as Ultralytics' ``DFL``. Example: p = [0.25, 0.75] on every side -> 0.75."""
    bins = torch.arange(dfl_probs.shape[-1], dtype=dfl_probs.dtype, device=dfl_probs.device)
    return (dfl_probs * bins).sum(-1)


def ltrb_boxes(ltrb: torch.Tensor, anchors: torch.Tensor, stride: float | torch.Tensor) -> torch.Tensor:
    """Boxes (xyxy, pixels) from side distances ``(A, 4)`` (left, top, right, bottom, in cells) at anchor points
    ``(A, 2)`` (in cells), as Ultralytics' ``dist2bbox``. Example: distances 1 at anchor (2.5, 2.5), stride 8 ->
    (12, 12, 28, 28)."""
    return torch.cat([anchors - ltrb[:, :2], anchors + ltrb[:, 2:]], -1) * stride


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(A, 4)`` xyxy tensors. Example: (0,0,2,2) vs (1,0,3,2) -> 1/3."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1) + (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area - inter).clamp(min=1e-9)


def _check_level(stride: int, student_levels: Mapping, teachers: Sequence[Mapping]) -> None:
    """'cls' and a box ('dfl' or 'ltrb') present and consistent at ``stride``; ValueError naming what differs."""
    named = [("student", student_levels)] + [(f"teacher {k}", levels) for k, levels in enumerate(teachers)]
    for who, levels in named:
        level = levels[stride]
        if "cls" not in level or not {"dfl", "ltrb"} & set(level):
            raise ValueError(f"stride {stride} of the {who} needs 'cls' and 'dfl' (DFL logits) or 'ltrb' "
                             f"(side distances), got {sorted(level)}")
        cls, box = level["cls"], _box_channels(level)
        if cls.dim() != 4 or box.dim() != 4 or box.shape[1] % 4 or cls.shape[2:] != box.shape[2:] \
                or ("ltrb" in level and box.shape[1] != 4):
            raise ValueError(f"stride {stride} of the {who}: expected cls (B, nc, H, W) and dfl (B, 4 * reg_max, H, W)"
                             f" or ltrb (B, 4, H, W), got {tuple(cls.shape)} and {tuple(box.shape)}")
    student = student_levels[stride]["cls"]
    for who, levels in named[1:]:
        if levels[stride]["cls"].shape != student.shape:
            raise ValueError(f"stride {stride} 'cls': {who} {tuple(levels[stride]['cls'].shape)}"
                             f" != student {tuple(student.shape)}")


def _box_channels(level: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return level["ltrb"] if "ltrb" in level else level["dfl"]


def _level_distances(level: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A level's side distances ``(B * H * W, 4)`` in cells: its ``ltrb`` channels, or its DFL's expected bins."""
    if "ltrb" in level:
        return level["ltrb"].permute(0, 2, 3, 1).reshape(-1, 4)
    return dfl_distances(F.softmax(_anchors_dfl(level["dfl"]), dim=-1))


def _anchors_cls(cls: torch.Tensor) -> torch.Tensor:
    """(B, nc, H, W) -> (B * H * W, nc)."""
    return cls.permute(0, 2, 3, 1).reshape(-1, cls.shape[1])


def _anchors_dfl(dfl: torch.Tensor) -> torch.Tensor:
    """(B, 4 * reg_max, H, W) -> (B * H * W, 4, reg_max), channel = side * reg_max + bin."""
    b, c4, h, w = dfl.shape
    return dfl.reshape(b, 4, c4 // 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4, c4 // 4)


def _softmax_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_c p_c (ln p_c - ln q_c)``, q = softmax(s / T), over the last dim: (..., C) -> (...)."""
    p = teacher_probs.detach()
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True; 0 (still attached to the graph) when nothing is selected."""
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the anchors' shape {tuple(values.shape)}")
    selected = torch.where(mask, values, torch.zeros_like(values))
    return selected.sum() / mask.sum().clamp(min=1)


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold!r}")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def pseudo_labels(teacher_dets: Sequence[Detections], weights: Sequence[float], conf: float,
                  iou: float = 0.5) -> Detections:
    """Hard labels for an unlabelled image from its teachers' detections (the transfer set of section 4.3).

    A teacher's box scores ``conf_box * w_t / max(w)``: the teacher with the largest graph weight keeps its
    confidences, a teacher with half its weight needs twice the confidence. Boxes scoring ``>= conf`` from
    every teacher are pooled, and class-aware NMS at ``iou`` (:func:`common.detections.nms`) keeps the
    best-scoring box where teachers agree. The result carries those scores as its confidences.

    Example: teacher A (weight 2) ``[0,0,10,10]`` class 1 at 0.6; teacher B (weight 1) ``[1,0,11,10]``
    class 1 at 0.9 (score 0.45) and ``[20,20,30,30]`` class 0 at 0.5 (score 0.25). At ``conf=0.3``: B's
    second box is dropped; A's box (0.6) suppresses B's first (IoU 0.82) -> one box, ``[0,0,10,10]`` 0.6.
    """
    if len(teacher_dets) != len(weights):
        raise ValueError(f"{len(teacher_dets)} teachers' detections but {len(weights)} weights")
    if not weights or min(weights) < 0 or max(weights) <= 0:
        raise ValueError(f"teacher weights must be >= 0 with one > 0, got {list(weights)!r}")
    _check_threshold(conf)
    top = max(weights)
    scores = [d.conf * (w / top) for d, w in zip(teacher_dets, weights)]
    keep = [s >= conf for s in scores]
    xyxy = np.concatenate([d.xyxy[k] for d, k in zip(teacher_dets, keep)])
    score = np.concatenate([s[k] for s, k in zip(scores, keep)])
    cls = np.concatenate([d.cls[k] for d, k in zip(teacher_dets, keep)])
    order = nms(xyxy, score, iou, classes=cls)
    return Detections(xyxy[order], score[order], cls[order])
