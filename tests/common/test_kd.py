"""Tests for common.kd: distillation losses of paper section 4.3 (L_total, L_KD, p(y)) for YOLO heads."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.detections import Detections
from common.kd import (
    GroundTruth,
    anchor_targets,
    binary_kd_loss,
    box_iou_pairs,
    box_kd_loss,
    detection_kd_loss,
    dfl_distances,
    dfl_kd_loss,
    ltrb_boxes,
    mix_teachers,
    pseudo_labels,
    split_head_outputs,
    total_loss,
    weighted_mean,
)

LN3 = math.log(3.0)
# p_t = [0.5, 0.5], p_s = [0.25, 0.75]: KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465)
KL_HALF_VS_QUARTER = 0.1438410362


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_losses_reject_bad_temperature(temperature):
    """Paper 4.3 p(y): T must be > 0; the error names the value."""
    x = torch.zeros(2, 3)
    x4 = torch.full((2, 4, 3), 1 / 3)
    for loss, student, teacher in ((binary_kd_loss, x, x), (dfl_kd_loss, x4, x4)):
        with pytest.raises(ValueError, match=f"temperature.*{temperature}"):
            loss(student, teacher, temperature)


def test_total_loss_hand_worked():
    """Paper 4.3 L_total = alpha L_CE + (1 - alpha) L_KD: 0.25 * 2 + 0.75 * 4 = 3.5."""
    assert total_loss(2.0, 4.0, 0.25) == pytest.approx(3.5)
    assert total_loss(2.0, 4.0, 0.0) == 4.0
    assert total_loss(2.0, 4.0, 1.0) == 2.0
    assert total_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match=r"1\.5"):
        total_loss(2.0, 4.0, 1.5)


# --- sigmoid (Bernoulli) KD and DFL KD ------------------------------------------------------


def test_binary_kd_loss_hand_worked_with_mask():
    """Paper 4.3 L_KD for sigmoid classes: Bernoulli KL summed over classes, mean over foreground anchors."""
    # Prepare: anchor 0: class 0 p = sigmoid(0) = 0.5, q = sigmoid(ln 3) = 0.75 ->
    #   0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.1438; class 1 equal -> 0. Anchor 1 differs wildly but is masked out.
    teacher = torch.tensor([[0.0, -2.0], [5.0, 5.0]])
    student = torch.tensor([[LN3, -2.0], [-5.0, -5.0]])
    mask = torch.tensor([True, False])
    # Execute
    loss = binary_kd_loss(student, torch.sigmoid(teacher), 1.0, mask)
    # Assert
    assert loss.item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-6)


def test_binary_kd_loss_matches_numpy_reference():
    """Paper 4.3 L_KD (Bernoulli form): T^2 mean_anchors sum_k p ln(p/q) + (1-p) ln((1-p)/(1-q)), vs numpy."""
    # Prepare
    rng = np.random.default_rng(3)
    student, teacher, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), 2.0
    p, q = 1 / (1 + np.exp(-teacher / t)), 1 / (1 + np.exp(-student / t))
    reference = t**2 * (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(axis=1).mean()
    # Execute
    loss = binary_kd_loss(torch.from_numpy(student), torch.from_numpy(p), t)
    # Assert
    assert loss.item() == pytest.approx(reference, rel=1e-9)


def test_binary_kd_loss_empty_mask_and_saturated_logits():
    """Paper 4.3 L_KD edge cases: no foreground -> a differentiable 0; saturated sigmoids -> finite, never NaN."""
    # Prepare
    student = torch.tensor([[100.0, -100.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.sigmoid(torch.tensor([[-100.0, 100.0], [100.0, -100.0]]))  # exactly 0 / 1 in float32
    # Execute
    empty = binary_kd_loss(student, teacher, 1.0, torch.zeros(2, dtype=torch.bool))
    empty.backward()
    full = binary_kd_loss(student, teacher, 1.0)
    # Assert
    assert empty.item() == 0.0 and empty.requires_grad
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert torch.isfinite(full) and full.item() > 0
    assert binary_kd_loss(torch.zeros(0, 3), torch.zeros(0, 3), 1.0).item() == 0.0


def test_binary_kd_loss_gradient_and_zero_at_teacher():
    """Paper 4.3 L_KD (Bernoulli): d/ds = T (q - p) / N per class; 0 at s = t; gradcheck."""
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(teacher / 2.0)
    binary_kd_loss(student, p, 2.0).backward()
    expected = 2.0 * (torch.sigmoid(student / 2.0) - p) / 3
    torch.testing.assert_close(student.grad, expected.detach())
    assert binary_kd_loss(teacher, p, 2.0).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.autograd.gradcheck(lambda s: binary_kd_loss(s, p, 2.0), (student.detach().requires_grad_(),))


def test_dfl_kd_loss_hand_worked():
    """Paper 4.3 L_KD on box distributions: softmax KL per side, mean over 4 sides and anchors, times T^2."""
    # Prepare: reg_max = 2, teacher p = [0.5, 0.5] on every side
    teacher = torch.full((1, 4, 2), 0.5)
    all_sides = torch.tensor([[[0.0, LN3]] * 4])  # every side q = [0.25, 0.75] -> 0.1438 per side
    one_side = torch.tensor([[[0.0, LN3], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # 0.1438 / 4 = 0.03596
    # Execute / Assert
    assert dfl_kd_loss(all_sides, teacher, 1.0).item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-6)
    assert dfl_kd_loss(one_side, teacher, 1.0).item() == pytest.approx(KL_HALF_VS_QUARTER / 4, rel=1e-6)
    assert dfl_kd_loss(torch.zeros(1, 4, 2), teacher, 1.0).item() == 0.0


def test_dfl_kd_loss_rejects_bad_shapes():
    """Paper 4.3 L_KD (DFL): tensors must be (..., 4, reg_max) and the mask must match the anchors."""
    with pytest.raises(ValueError, match=r"\(2, 3, 16\)"):
        dfl_kd_loss(torch.zeros(2, 3, 16), torch.zeros(2, 3, 16), 1.0)
    with pytest.raises(ValueError, match="mask shape"):
        dfl_kd_loss(torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), 1.0, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes differ"):
        dfl_kd_loss(torch.zeros(2, 4, 16), torch.zeros(2, 4, 8), 1.0)


# --- several teachers ----------------------------------------------------------------------


def test_mix_teachers_hand_worked():
    """Paper section 4.3, several teachers in T: probabilities mixed by teachers_for weights."""
    # [0.9, 0.1] * 0.75 + [0.5, 0.5] * 0.25 = [0.8, 0.2]; weights [3, 1] are renormalised to the same
    a, b = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    torch.testing.assert_close(mix_teachers([a, b], [0.75, 0.25]), torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(mix_teachers([a, b], [3.0, 1.0]), torch.tensor([0.8, 0.2]))


def test_mix_teachers_mixes_probabilities_not_logits():
    """Paper 4.3 soft labels p(y): a mixture of p is softer than softmax of averaged logits."""
    # Teachers [4, 0] and [2, 0]: p_1 = 0.98201, p_2 = 0.88080 -> mixed 0.93141; averaged logits [3, 0] -> 0.95257
    logits = [torch.tensor([4.0, 0.0]), torch.tensor([2.0, 0.0])]
    mixed = mix_teachers([F.softmax(z, -1) for z in logits], [0.5, 0.5])
    assert mixed[0].item() == pytest.approx(0.931408, rel=1e-5)
    assert F.softmax((logits[0] + logits[1]) / 2, -1)[0].item() == pytest.approx(0.952574, rel=1e-5)
    with pytest.raises(ValueError, match="probabilities, not logits"):
        mix_teachers(logits, [0.5, 0.5])


@pytest.mark.parametrize(
    ("weights", "message"), [([1.0], "2 outputs and 1 weights"), ([1.0, -1.0], "-1.0"), ([0.0, 0.0], "sum to > 0")]
)
def test_mix_teachers_rejects_bad_weights(weights, message):
    """Mixing weights (paper section 4.3): one non-negative weight per teacher with a positive sum."""
    with pytest.raises(ValueError, match=message):
        mix_teachers([torch.tensor([0.5]), torch.tensor([0.5])], weights)


# --- detection heads -----------------------------------------------------------------------


def _level(cls, dfl):
    """One head level from nested lists: cls (nc,) and dfl (4 * reg_max,) logits for a single 1x1 anchor."""
    return {"cls": torch.tensor(cls).view(1, -1, 1, 1), "dfl": torch.tensor(dfl).view(1, -1, 1, 1)}


def test_split_head_outputs_box_channels_first():
    """Ultralytics Detect level output (B, 4 reg_max + nc, H, W): DFL channels first, then class logits."""
    out = torch.arange(10.0).view(1, 10, 1, 1)  # reg_max = 2 -> 8 DFL channels, nc = 2
    levels = split_head_outputs([out], [8], reg_max=2)
    assert levels[8]["dfl"].flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert levels[8]["cls"].flatten().tolist() == [8, 9]
    with pytest.raises(ValueError, match="strides"):
        split_head_outputs([out], [8, 16], reg_max=2)


def test_detection_kd_loss_hand_worked_on_shared_strides():
    """Paper 4.3 L_KD on detection heads: shared strides only, foreground anchors only, cls + box terms."""
    # Prepare: student strides 4/8/16 (PyraFAN), teacher 8/16/32 (YOLO11); reg_max = 2, nc = 2.
    # Stride 8 (foreground, sigmoid(0) = 0.5 >= 0.4): cls [0 vs ln 3] -> 0.1438, [-5 vs -5] -> 0;
    #   DFL side 0 teacher [0, 0] vs student [0, ln 3] -> 0.1438 / 4 sides = 0.03596.
    # Stride 16: background for the teacher (sigmoid(-5) = 0.0067), so its wild student values do not count.
    # total = 1 * 0.14384 + 2 * 0.03596 = 0.21576
    student = {
        4: _level([9.0, 9.0], [9.0] * 8),
        8: _level([LN3, -5.0], [0.0, LN3] + [0.0] * 6),
        16: _level([5.0, 5.0], [7.0, -7.0] * 4),
    }
    teacher = {
        8: _level([0.0, -5.0], [0.0] * 8),
        16: _level([-5.0, -5.0], [0.0] * 8),
        32: _level([0.0, 0.0], [0.0] * 8),
    }
    # Execute
    result = detection_kd_loss(student, teacher, temperature=1.0, fg_threshold=0.4, box_weight=2.0)
    # Assert
    assert result.strides == (8, 16)
    assert result.num_foreground == 1
    assert result.cls.item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-6)
    assert result.box.item() == pytest.approx(KL_HALF_VS_QUARTER / 4, rel=1e-6)
    assert result.total.item() == pytest.approx(KL_HALF_VS_QUARTER * 1.5, rel=1e-6)


def test_detection_kd_loss_matches_per_anchor_reference():
    """Paper 4.3 L_KD on detection heads: pooled over anchors of all shared levels == a loop over single anchors."""
    # Prepare: raw head outputs (B=2, 4*16 + 3, H, W) at strides 8 (2x2) and 16 (1x1), split like Ultralytics
    gen = torch.Generator().manual_seed(6)
    shapes = {8: 2, 16: 1}
    student = split_head_outputs([torch.randn(2, 67, h, h, generator=gen) for h in shapes.values()], list(shapes))
    teacher = split_head_outputs([torch.randn(2, 67, h, h, generator=gen) for h in shapes.values()], list(shapes))
    t, threshold = 2.0, 0.6
    cls_terms, box_terms = [], []
    for stride, h in shapes.items():
        for b in range(2):
            for y in range(h):
                for x in range(h):
                    tc, sc = teacher[stride]["cls"][b, :, y, x], student[stride]["cls"][b, :, y, x]
                    if torch.sigmoid(tc).max() >= threshold:
                        cls_terms.append(binary_kd_loss(sc[None], torch.sigmoid(tc[None] / t), t))
                        td = teacher[stride]["dfl"][b, :, y, x].reshape(4, 16)
                        box_terms.append(dfl_kd_loss(student[stride]["dfl"][b, :, y, x].reshape(1, 4, 16),
                                                     F.softmax(td[None] / t, -1), t))
    # Execute
    result = detection_kd_loss(student, teacher, temperature=t, fg_threshold=threshold, cls_weight=0.5)
    # Assert
    assert 0 < result.num_foreground == len(cls_terms) < 10
    assert result.cls.item() == pytest.approx(torch.stack(cls_terms).mean().item(), rel=1e-5)
    assert result.box.item() == pytest.approx(torch.stack(box_terms).mean().item(), rel=1e-5)
    assert result.total.item() == pytest.approx(0.5 * result.cls.item() + result.box.item(), rel=1e-6)


def test_detection_kd_loss_groups_dfl_channels_side_major():
    """Paper 4.3 L_KD (box): channel = side * reg_max + bin as in Ultralytics' DFL, not bin-major."""
    # Teacher channels [ln 3, ln 3, 0, ...]: side-major, side 0 = [ln 3, ln 3] is uniform like the student's zeros
    # -> KL 0 everywhere. Bin-major would pair channels (0, 4) and (1, 5) -> [ln 3, 0] vs uniform -> > 0.
    student = {8: _level([0.0], [0.0] * 8)}
    teacher = {8: _level([0.0], [LN3, LN3] + [0.0] * 6)}
    result = detection_kd_loss(student, teacher, temperature=1.0, fg_threshold=0.5)
    assert result.num_foreground == 1
    assert result.box.item() == pytest.approx(0.0, abs=1e-7)


def test_detection_kd_loss_several_teachers_mix_probabilities():
    """Paper 4.3 several neighbours in T: teacher probabilities mixed by teachers_for weights."""
    # Prepare: nc = 1. Teacher 1 p = sigmoid(0) = 0.5 (w 0.75), teacher 2 p = sigmoid(ln 3) = 0.75 (w 0.25)
    # -> p = 0.5625; student q = 0.5: 0.5625 ln(1.125) + 0.4375 ln(0.875) = 0.0078330; DFL all equal -> 0
    student = {8: _level([0.0], [0.0] * 8)}
    teachers = [{8: _level([0.0], [0.0] * 8)}, {8: _level([LN3], [0.0] * 8)}]
    # Execute
    result = detection_kd_loss(student, teachers, temperature=1.0, fg_threshold=0.5, teacher_weights=[0.75, 0.25])
    # Assert
    assert result.cls.item() == pytest.approx(0.0078330, rel=1e-4)
    assert result.box.item() == 0.0
    with pytest.raises(ValueError, match="teacher_weights"):
        detection_kd_loss(student, teachers, temperature=1.0, fg_threshold=0.5)


def test_detection_kd_loss_gradients_flow_to_student_only_and_vanish_at_teacher():
    """Paper 4.3 L_KD: differentiable in the student, teacher constant, zero when student == teacher."""
    # Prepare: random levels (B=2, nc=3, reg_max=16, 4x4 and 2x2) with foreground everywhere (threshold 0)
    gen = torch.Generator().manual_seed(5)

    def levels(grad):
        return {
            s: {
                "cls": torch.randn(2, 3, h, h, generator=gen, requires_grad=grad),
                "dfl": torch.randn(2, 64, h, h, generator=gen, requires_grad=grad),
            }
            for s, h in ((8, 4), (16, 2))
        }

    student, teacher = levels(True), levels(True)
    # Execute
    result = detection_kd_loss(student, teacher, temperature=2.0, fg_threshold=0.0)
    result.total.backward()
    same = detection_kd_loss(
        {s: {k: v.detach() for k, v in lv.items()} for s, lv in teacher.items()}, teacher, 2.0, 0.0
    )
    # Assert
    assert result.num_foreground == 2 * (16 + 4)
    assert result.total.item() > 0
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for lv in student.values() for v in lv.values())
    assert all(v.grad is None for lv in teacher.values() for v in lv.values())
    assert same.total.item() == pytest.approx(0.0, abs=1e-6)


def test_detection_kd_loss_no_foreground_is_zero_not_nan():
    """Paper 4.3 L_KD with no confident teacher anchor: a differentiable 0, never NaN."""
    student = {
        8: {"cls": torch.zeros(1, 2, 2, 2, requires_grad=True), "dfl": torch.zeros(1, 8, 2, 2, requires_grad=True)}
    }
    teacher = {8: {"cls": torch.full((1, 2, 2, 2), -5.0), "dfl": torch.zeros(1, 8, 2, 2)}}
    result = detection_kd_loss(student, teacher, temperature=1.0, fg_threshold=0.5)
    result.total.backward()
    assert result.total.item() == 0.0 and result.num_foreground == 0
    assert torch.equal(student[8]["cls"].grad, torch.zeros(1, 2, 2, 2))


def test_detection_kd_loss_rejects_unshared_or_mismatched_levels():
    """Paper 4.3 L_KD across different heads: no shared stride, or different shapes on one, is an error."""
    with pytest.raises(ValueError, match=r"no shared stride: student \[4\], teacher\(s\) \[\[32\]\]"):
        detection_kd_loss({4: _level([0.0], [0.0] * 8)}, {32: _level([0.0], [0.0] * 8)}, 1.0, 0.5)
    with pytest.raises(ValueError, match="stride 8 'cls'"):
        detection_kd_loss({8: _level([0.0], [0.0] * 8)}, {8: _level([0.0, 0.0], [0.0] * 8)}, 1.0, 0.5)
    with pytest.raises(ValueError, match="needs 'cls' and 'dfl'"):
        detection_kd_loss({8: {"cls": torch.zeros(1, 1, 1, 1)}}, {8: _level([0.0], [0.0] * 8)}, 1.0, 0.5)


# --- teacher-better selection (the student's labels decide where the teacher knows better) ---------------------


def test_anchor_targets_hand_worked():
    """Anchors whose centre lies inside a box (the one under its centre always), the smallest box winning."""
    # Stride 8, 4x4 level (anchor centres 4, 12, 20, 28). Box 0 covers image 0; box 1 (0, 0, 12, 12) holds only
    # centre (4, 4) (12 is on its edge) and wins there; box 2 in image 1 holds no centre: its own (18, 18) -> (2, 2).
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 12.0, 12.0], [17.0, 17.0, 19.0, 19.0]])
    owner = anchor_targets(boxes, torch.tensor([0, 0, 1]), batch=2, shape=(4, 4), stride=8)
    expected = torch.full((2, 4, 4), -1)
    expected[0] = 0
    expected[0, 0, 0] = 1
    expected[1, 2, 2] = 2
    assert torch.equal(owner, expected)
    assert torch.equal(anchor_targets(torch.zeros(0, 4), torch.zeros(0), 1, (2, 2), 8), torch.full((1, 2, 2), -1))


def test_dfl_distances_boxes_and_pairwise_iou_hand_worked():
    probs = torch.tensor([[0.0, 1.0]]).repeat(4, 1)[None]  # (1, 4, 2): every side at bin 1
    assert ltrb_boxes(dfl_distances(probs), torch.tensor([[2.5, 2.5]]), 8).tolist() == [[12.0, 12.0, 28.0, 28.0]]
    assert dfl_distances(torch.tensor([0.25, 0.75])).item() == 0.75
    iou = box_iou_pairs(torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]]), torch.tensor([[1.0, 0, 3, 2], [2, 2, 3, 3]]))
    assert iou.tolist() == pytest.approx([1 / 3, 0.0])


def _two_anchors(teacher_first: bool):
    """Stride 8, one image, a 1x2 level, nc = 2, reg_max = 2; a class-0 box (0, 0, 8, 8) owns anchor 0 only.

    The better side: anchor 0 class-0 logit 0 (p 0.5) and DFL [0, 0] per side (distance 0.5 cell: the box
    exactly, IoU 1); anchor 1 (background) logits -5. The worse side: anchor 0 logit -ln 3 (p 0.25) and DFL
    [0, ln 3] (distance 0.75: box (-2, -2, 10, 10), IoU 64/144); anchor 1 fires at ln 3 (p 0.75).
    """
    def level(cls0, cls1, dfl):  # (1, nc, 1, 2) and (1, 8, 1, 2): anchor 0 then anchor 1 along W
        return {"cls": torch.tensor([cls0, cls1]).T.reshape(1, 2, 1, 2),
                "dfl": torch.tensor([dfl, [0.0] * 8]).T.reshape(1, 8, 1, 2)}
    good = level([0.0, -5.0], [-5.0, -5.0], [0.0] * 8)
    bad = level([-LN3, -5.0], [LN3, -5.0], [0.0, LN3] * 4)
    truth = GroundTruth(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([0]), torch.tensor([0]))
    return ({8: bad}, {8: good}, truth) if teacher_first else ({8: good}, {8: bad}, truth)


def test_teacher_better_selection_hand_worked():
    """Paper 4.3 L_KD with the student's labels: distil only where the teacher is closer to the truth."""
    student, teacher, truth = _two_anchors(teacher_first=True)
    result = detection_kd_loss(student, teacher, 1.0, fg_threshold=0.5, truth=truth)
    # class term: anchor 0 (teacher 0.5 > student 0.25 on class 0) -> 0.14384 (class 1 equal: 0); anchor 1
    # (student fires at 0.75 >= 0.5, the teacher at 0.0067) -> KL(Bern(sigmoid(-5)) || Bern(0.75)); mean of both
    background = binary_kd_loss(torch.tensor([[LN3]]), torch.sigmoid(torch.tensor([[-5.0]])), 1.0).item()
    assert result.num_foreground == 2
    assert result.cls.item() == pytest.approx((KL_HALF_VS_QUARTER + background) / 2, rel=1e-5)
    # box term: anchor 0 only (teacher IoU 1 > student 64/144): every side KL([.5, .5] || [.25, .75])
    assert result.box.item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-5)


def test_teacher_better_selection_ignores_a_teacher_behind_the_student():
    # the same two anchors with the roles swapped: the teacher is worse everywhere, so nothing is distilled
    student, teacher, truth = _two_anchors(teacher_first=False)
    result = detection_kd_loss(student, teacher, 1.0, fg_threshold=0.5, truth=truth)
    assert result.num_foreground == 0 and result.total.item() == 0.0
    # while the teacher's own foreground (anchor 1 at 0.75) is what soft-label KD would distil on
    assert detection_kd_loss(student, teacher, 1.0, fg_threshold=0.5).num_foreground == 1


# --- box distillation without DFL (YOLO26) and across families -------------------------------------------------

# teacher (1, 1, 1, 1) (a 2x2 box around the anchor), student (1, 1, 2, 1) (3x2): L1 = 1/4; intersection 4,
# union 6, hull 6 -> GIoU = 2/3 -> 1 - GIoU = 1/3
L1_PLUS_GIOU = 0.25 + 1 / 3


def test_box_kd_loss_hand_worked():
    teacher = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    student = torch.tensor([[1.0, 1, 2, 1], [-2, 1, 3, 1], [5, 5, 5, 5]], requires_grad=True)
    # row 1: student box x in [2, 3], y in [-1, 1] (1x2), teacher [-1, 1]^2: no overlap; union 2 + 4 = 6,
    # hull 4x2 = 8 -> GIoU = 0 - 2/8 = -0.25 -> 1.25; L1 (3 + 0 + 2 + 0) / 4 = 1.25 -> 2.5
    loss = box_kd_loss(student, teacher, torch.tensor([True, True, False]))
    loss.backward()
    assert loss.item() == pytest.approx((L1_PLUS_GIOU + 2.5) / 2, rel=1e-6)
    assert student.grad[2].abs().sum() == 0 and student.grad[1].abs().sum() > 0  # the disjoint pair still pulls
    assert box_kd_loss(teacher[:2], teacher[:2]).item() == pytest.approx(0.0, abs=1e-7)
    empty = box_kd_loss(student, teacher, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        box_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_box_kd_loss_matches_torchvision_on_random_boxes():
    from torchvision.ops import generalized_box_iou

    gen = torch.Generator().manual_seed(4)
    s, t = torch.rand(50, 4, generator=gen) * 3, torch.rand(50, 4, generator=gen) * 3
    anchors = torch.rand(50, 2, generator=gen) * 10
    giou = generalized_box_iou(ltrb_boxes(s, anchors, 8), ltrb_boxes(t, anchors, 8)).diagonal()  # scale-free
    reference = ((s - t).abs().mean(-1) + 1 - giou).mean()
    assert box_kd_loss(s, t).item() == pytest.approx(reference.item(), rel=1e-5)


def test_split_head_outputs_without_dfl_gives_side_distances():
    out = torch.arange(6.0).view(1, 6, 1, 1)  # reg_max = 1 (YOLO26): 4 side distances, nc = 2
    levels = split_head_outputs([out], [8], reg_max=1)
    assert set(levels[8]) == {"ltrb", "cls"}
    assert levels[8]["ltrb"].flatten().tolist() == [0, 1, 2, 3] and levels[8]["cls"].flatten().tolist() == [4, 5]


def _ltrb_level(cls, ltrb):
    return {"cls": torch.tensor(cls).view(1, -1, 1, 1), "ltrb": torch.tensor(ltrb).view(1, 4, 1, 1)}


def test_detection_kd_loss_without_dfl_hand_worked():
    """YOLO26 student and teacher: class KL as with DFL heads, box term L1 + GIoU on the foreground anchors."""
    # stride 8 foreground (teacher sigmoid(0) = 0.5 >= 0.4): cls [0 vs ln 3] at T = 2, box -> 0.58333;
    # stride 16 background for the teacher: its student values do not count
    student = {8: _ltrb_level([LN3, -5.0], [1.0, 1, 2, 1]), 16: _ltrb_level([5.0, 5.0], [9.0, 9, 9, 9])}
    teacher = {8: _ltrb_level([0.0, -5.0], [1.0, 1, 1, 1]), 16: _ltrb_level([-5.0, -5.0], [1.0, 1, 1, 1])}
    result = detection_kd_loss(student, teacher, temperature=2.0, fg_threshold=0.4, box_weight=2.0)
    cls_t2 = binary_kd_loss(torch.tensor([[LN3, -5.0]]), torch.sigmoid(torch.tensor([[0.0, -5.0]]) / 2.0), 2.0).item()
    assert result.box_kind == "ltrb" and result.strides == (8, 16) and result.num_foreground == 1
    assert result.box.item() == pytest.approx(L1_PLUS_GIOU, rel=1e-6)  # no temperature on the box term
    assert result.cls.item() == pytest.approx(cls_t2, rel=1e-6)
    assert result.total.item() == pytest.approx(cls_t2 + 2 * L1_PLUS_GIOU, rel=1e-6)


@pytest.mark.parametrize("dfl_teacher", [True, False], ids=["yolo11-teacher", "yolo11-student"])
def test_detection_kd_loss_across_families_uses_the_dfl_heads_expected_distances(dfl_teacher):
    """A DFL head (reg_max = 3, uniform bins: expected distance (0 + 1 + 2) / 3 = 1 per side) against a head
    without DFL at (1, 1, 2, 1): the box term is L1 + GIoU on side distances, 0.58333 either way round."""
    dfl = {8: {"cls": torch.zeros(1, 1, 1, 1), "dfl": torch.zeros(1, 12, 1, 1, requires_grad=True)}}
    ltrb = {8: _ltrb_level([0.0], [1.0, 1, 2, 1])}
    ltrb[8]["ltrb"].requires_grad_(True)
    student, teacher = (ltrb, dfl) if dfl_teacher else (dfl, ltrb)
    result = detection_kd_loss(student, teacher, temperature=1.0, fg_threshold=0.5)
    result.total.backward()
    assert result.box_kind == "ltrb" and result.num_foreground == 1
    assert result.box.item() == pytest.approx(L1_PLUS_GIOU, rel=1e-6)
    own = student[8]["ltrb" if dfl_teacher else "dfl"]
    assert own.grad is not None and own.grad.abs().sum() > 0
    assert teacher[8]["dfl" if dfl_teacher else "ltrb"].grad is None


def test_detection_kd_loss_without_dfl_averages_several_teachers_distances():
    # (1, 1, 1, 1) with weight 0.75 and (1, 1, 5, 1) with 0.25 -> (1, 1, 2, 1); student (1, 1, 1, 1) -> 0.58333
    assert weighted_mean([torch.tensor([2.0]), torch.tensor([6.0])], [3, 1]).tolist() == [3.0]
    student = {8: _ltrb_level([0.0], [1.0, 1, 1, 1])}
    teachers = [{8: _ltrb_level([0.0], [1.0, 1, 1, 1])}, {8: _ltrb_level([0.0], [1.0, 1, 5, 1])}]
    result = detection_kd_loss(student, teachers, 1.0, fg_threshold=0.5, teacher_weights=[0.75, 0.25])
    assert result.box.item() == pytest.approx(L1_PLUS_GIOU, rel=1e-6)


def test_teacher_better_selection_without_dfl_hand_worked():
    # stride 8, one anchor at cell (0.5, 0.5) owned by the class-0 box (0, 0, 8, 8): teacher distances 0.5 (the box,
    # IoU 1) beat the student's 0.75 (IoU 64/144): box term L1 0.25 + 1 - GIoU(1.5x1.5 cells vs 1x1) = 1 - 1/2.25
    truth = GroundTruth(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([0]), torch.tensor([0]))
    student, teacher = {8: _ltrb_level([0.0], [0.75] * 4)}, {8: _ltrb_level([0.0], [0.5] * 4)}
    result = detection_kd_loss(student, teacher, 1.0, fg_threshold=0.5, truth=truth)
    assert result.box.item() == pytest.approx(0.25 + 1 - 1 / 2.25, rel=1e-6)
    assert result.num_foreground == 0  # equal class probabilities: the teacher is not better there
    swapped = detection_kd_loss(teacher, student, 1.0, fg_threshold=0.5, truth=truth)
    assert swapped.box.item() == 0.0


# --- pseudo-labels for the unlabelled part of the transfer set ------------------------------------------------


def test_pseudo_labels_scale_by_teacher_weight_and_keep_the_best_box_where_teachers_agree():
    """Hand-worked (common.kd.pseudo_labels): teacher A (weight 2) [0,0,10,10] class 1 at 0.6; teacher B (weight 1)
    [1,0,11,10] class 1 at 0.9 -> score 0.45, [20,20,30,30] class 0 at 0.5 -> 0.25, [0,0,10,10] class 2 at 0.8
    -> 0.4. At conf 0.3 B's 0.25 box goes; A's 0.6 box suppresses B's class-1 box (IoU 90/110 = 0.82 > 0.5);
    B's class-2 box stays (another class)."""
    a = Detections([[0, 0, 10, 10]], [0.6], [1])
    b = Detections([[1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.5, 0.8], [1, 0, 2])

    out = pseudo_labels([a, b], [2.0, 1.0], conf=0.3)

    assert out.xyxy.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10]]
    assert out.conf.tolist() == pytest.approx([0.6, 0.4])
    assert out.cls.tolist() == [1, 2]
    # equal weights: B's class-1 box (0.9) wins, and its 0.5 box passes
    even = pseudo_labels([a, b], [1.0, 1.0], conf=0.3)
    assert even.conf.tolist() == pytest.approx([0.9, 0.8, 0.5]) and even.cls.tolist() == [1, 2, 0]


def test_pseudo_labels_of_teachers_that_see_nothing_are_empty_and_bad_weights_are_named():
    assert len(pseudo_labels([Detections(), Detections()], [0.5, 0.5], conf=0.3)) == 0
    with pytest.raises(ValueError, match="2 teachers' detections but 1 weights"):
        pseudo_labels([Detections(), Detections()], [1.0], conf=0.3)
    with pytest.raises(ValueError, match=r"teacher weights must be >= 0 with one > 0, got \[0.0\]"):
        pseudo_labels([Detections()], [0.0], conf=0.3)
