"""Soft-label distillation from frozen teachers during YOLO training (paper section 4.3).

:class:`TeacherEnsemble` is the ``extra_loss`` that :func:`common.yolo.train`
adds to the detection loss: ``alpha * L_det + (1 - alpha) * L_KD`` with
``L_KD`` from :func:`common.kd.detection_kd_loss` (per-class Bernoulli KL on
the class logits plus KL on the DFL box distributions, or L1 + GIoU on the side
distances where a head has no DFL, on the anchors the teachers mark as foreground,
on the strides student and teachers share; several teachers' soft outputs mixed
by their graph weights).

**YOLO26** (an end-to-end head without DFL) distils on its one-to-many branch,
which shapes the backbone; its one-to-one branch, the one that answers at
inference, learns from the labels only (soft labels on every teacher-foreground
anchor would teach it the duplicates it exists to avoid).

``select="teacher-better"`` replaces the teachers' foreground by the anchors where
they are closer to the student's own labels than the student is (the batch's boxes,
:func:`ground_truth`; :func:`common.kd.detection_kd_loss`). Why: a round's teachers
are the other sites' models of the round before, so a peer of the student's own
level is overtaken during the round, and from then on soft labels pull the student
back towards it (and teach it the teacher's false positives: the KD-trained students
of the reproduction fired on background far more than those trained alone).

Why shared strides and not pseudo-labels for the rest: a PyraFAN student
(strides 4/8/16) and a YOLO11 teacher (8/16/32) share 8 and 16, where most
small objects live; the student's stride-4 level still learns from the
ground-truth detection loss. Pseudo-labels would need NMS on every batch and
add a second, noisier supervision path for little gain at these sizes. Across
families the same rule holds: YOLO11 and YOLO26 share 8/16/32 (a YOLO26-P2
student adds 4), their class logits mean the same, and the box term compares
side distances (a DFL head's expected bins).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from common.kd import GroundTruth, detection_kd_loss
from common.protocol import KD_SELECTIONS
from common.yolo import head_levels


def ground_truth(batch: dict, images: torch.Tensor) -> GroundTruth:
    """An Ultralytics training batch's labels (normalised xywh) as pixel boxes on its ``images`` (B, 3, H, W)."""
    h, w = images.shape[2:]
    xywh = batch["bboxes"].to(images.device).float() * torch.tensor([w, h, w, h], device=images.device)
    boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    return GroundTruth(boxes, batch["cls"].to(images.device).view(-1).long(),
                       batch["batch_idx"].to(images.device).view(-1).long())


class TeacherEnsemble:
    """Frozen teachers (eval mode, no grad) and their mixing weights, as a KD loss on a batch."""

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], weights: Sequence[float], *,
                 temperature: float = 1.0, fg_threshold: float = 0.25, select: str = "teacher-fg"):
        if select not in KD_SELECTIONS:
            raise ValueError(f"select={select!r}: expected one of {KD_SELECTIONS}")
        if len(teachers) != len(weights) or not teachers:
            raise ValueError(f"need one weight per teacher, got {len(teachers)} teachers and weights {list(weights)}")
        self.student = student
        self.teachers = [t.eval().requires_grad_(False) for t in teachers]
        self.weights = [float(w) for w in weights]
        self.temperature, self.fg_threshold, self.select = float(temperature), float(fg_threshold), select
        self.last = None  # the last DetectionKDLoss, for logging

    def __call__(self, images: torch.Tensor, preds, batch) -> torch.Tensor:
        with torch.no_grad():
            teacher_levels = [head_levels(t, t(images)) for t in self.teachers]
        self.last = detection_kd_loss(head_levels(self.student, preds), teacher_levels, self.temperature,
                                      self.fg_threshold, teacher_weights=self.weights,
                                      truth=ground_truth(batch, images) if self.select == "teacher-better"
                                      else None)
        return self.last.total
