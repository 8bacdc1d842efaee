"""Soft-label distillation from frozen teachers during YOLO training (paper section 4.3).

:class:`TeacherEnsemble` is the ``extra_loss`` that :func:`common.yolo.train`
adds to the detection loss: ``alpha * L_det + (1 - alpha) * L_KD`` with
``L_KD`` from :func:`common.kd.detection_kd_loss` (per-class Bernoulli KL on
the class logits plus KL on the DFL box distributions, on the anchors the
teachers mark as foreground, on the strides student and teachers share; several
teachers' soft outputs mixed by their graph weights).

``select="teacher-better"`` replaces the teachers' foreground by the anchors where
they are closer to the student's own labels than the student is (the batch's boxes,
:func:`ground_truth`; :func:`common.kd.detection_kd_loss`). Why: a round's teachers
are the other sites' models of the round before, so a peer of the student's own
level is overtaken during the round, and from then on soft labels pull the student
back towards it (and teach it the teacher's false positives: the KD-trained students
of the reproduction fired on background far more than those trained alone).

``transfer`` (an iterable of image batches, e.g. a loader over the shared benchmark's
unlabelled images; ``kd.transfer``) adds, at every step, the same KD loss with the
paper's soft labels (``teacher-fg``) on one transfer batch: the teachers' outputs on
images the student has no labels for, and the one channel through which a peer's
knowledge of *its* data reaches the student (on the student's own images a peer of
its level soon has nothing to add).

Why shared strides and not pseudo-labels for the rest: a PyraFAN student
(strides 4/8/16) and a YOLO11 teacher (8/16/32) share 8 and 16, where most
small objects live; the student's stride-4 level still learns from the
ground-truth detection loss. Pseudo-labels would need NMS on every batch and
add a second, noisier supervision path for little gain at these sizes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from common.kd import GroundTruth, detection_kd_loss
from common.protocol import KD_SELECTIONS
from common.pyrafan import head_levels


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
                 temperature: float = 1.0, fg_threshold: float = 0.25, select: str = "teacher-fg",
                 transfer: Iterable | None = None):
        if select not in KD_SELECTIONS:
            raise ValueError(f"select={select!r}: expected one of {KD_SELECTIONS}")
        if len(teachers) != len(weights) or not teachers:
            raise ValueError(f"need one weight per teacher, got {len(teachers)} teachers and weights {list(weights)}")
        self.student = student
        self.teachers = [t.eval().requires_grad_(False) for t in teachers]
        self.weights = [float(w) for w in weights]
        self.temperature, self.fg_threshold, self.select = float(temperature), float(fg_threshold), select
        self.last = None  # the last DetectionKDLoss, for logging
        self.last_transfer = None  # the last transfer batch's DetectionKDLoss
        self.transfer, self._batches = transfer, None

    def soft_loss(self, images: torch.Tensor, preds, truth: GroundTruth | None):
        """The teachers' KD loss against the student's ``preds`` on ``images`` (teachers frozen)."""
        with torch.no_grad():
            teacher_levels = [head_levels(t, t(images)) for t in self.teachers]
        return detection_kd_loss(head_levels(self.student, preds), teacher_levels, self.temperature,
                                 self.fg_threshold, teacher_weights=self.weights, truth=truth)

    def next_transfer(self, device: torch.device) -> torch.Tensor:
        """The next transfer batch as float images in [0, 1], cycling through ``transfer`` forever."""
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.transfer)
            try:
                item = next(self._batches)
                break
            except StopIteration:
                self._batches = None
        else:
            raise ValueError("the transfer set is empty")
        images = item["img"] if isinstance(item, dict) else item
        return images.to(device).float() / (255.0 if images.dtype == torch.uint8 else 1.0)

    def __call__(self, images: torch.Tensor, preds, batch) -> torch.Tensor:
        self.last = self.soft_loss(images, preds, ground_truth(batch, images) if self.select == "teacher-better"
                                   else None)
        if self.transfer is None:
            return self.last.total
        extra = self.next_transfer(images.device)
        self.last_transfer = self.soft_loss(extra, self.forward_own_statistics(extra), None)
        return self.last.total + self.last_transfer.total

    def forward_own_statistics(self, images: torch.Tensor):
        """The student's training-mode outputs on ``images`` with its BatchNorm layers normalising by their
        running statistics and not updating them: transfer images (other sites' domains) must not shift the
        statistics the student is evaluated with on its own data."""
        norms = [m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.eval()
        try:
            return self.student(images)
        finally:
            for m in norms:
                m.train()
