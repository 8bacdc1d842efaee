"""KD training through the YOLO adapter (paper section 4.3: L_total = alpha L_det + (1 - alpha) L_KD).

Real models and the tiny built-in benchmark; a few iterations each.
"""

import pytest
import torch

from common import yolo
from common.distill import TeacherEnsemble, ground_truth

NC = 8


def _train(model, data, extra=None, alpha=1.0):
    return yolo.train(model, data, epochs=1, imgsz=128, batch=4, seed=3, progress=False, mosaic=0.0,
                      extra_loss=extra, alpha=alpha)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_alpha_one_ignores_the_teacher_exactly(tiny_benchmark):
    """alpha = 1: L_total = L_det, so training with a teacher gives bit-identical weights."""
    data = tiny_benchmark.site_data(0)
    plain, distilled = yolo.build_model("yolo11n", NC, seed=1), yolo.build_model("yolo11n", NC, seed=1)
    teacher = yolo.build_model("yolo11n", NC, seed=2)

    _train(plain, data)
    res = _train(distilled, data, TeacherEnsemble(distilled, [teacher], [1.0], fg_threshold=0.0), alpha=1.0)

    assert _same(plain, distilled)
    assert res.extra_loss > 0  # the KD term was computed (fg_threshold 0: every anchor), just weighted 0


def test_kd_changes_the_student_and_never_the_teachers(tiny_benchmark):
    data = tiny_benchmark.site_data(0)
    plain, student = yolo.build_model("yolo11n", NC, seed=1), yolo.build_model("yolo11n", NC, seed=1)
    teachers = [yolo.build_model("yolo11n", NC, seed=s) for s in (2, 3)]
    before = [yolo.state_dict(t) for t in teachers]

    _train(plain, data)
    res = _train(student, data, TeacherEnsemble(student, teachers, [0.25, 0.75], fg_threshold=0.0), alpha=0.5)

    assert not _same(plain, student)
    assert res.extra_loss > 0 and torch.isfinite(torch.tensor(res.extra_loss))
    for t, sd in zip(teachers, before):
        assert all(torch.equal(v, sd[k]) for k, v in t.state_dict().items())
        assert not t.training and not any(p.requires_grad for p in t.parameters())


def test_pyrafan_student_learns_from_a_yolo11_teacher_on_shared_strides(tiny_benchmark):
    """PyraFAN (strides 4/8/16) and YOLO11 (8/16/32) share strides 8 and 16."""
    student = yolo.build_model("yolo11n-pyrafan", NC, seed=1)
    teacher = yolo.build_model("yolo11n", NC, seed=2)
    kd = TeacherEnsemble(student, [teacher], [1.0], fg_threshold=0.0)

    res = _train(student, tiny_benchmark.site_data(1), kd, alpha=0.5)

    assert kd.last.strides == (8, 16) and kd.last.num_foreground > 0
    assert res.extra_loss > 0


def test_teacher_weights_must_match_teachers():
    student = yolo.build_model("yolo11n", NC, seed=1)
    with pytest.raises(ValueError, match="one weight per teacher"):
        TeacherEnsemble(student, [student], [0.5, 0.5])


def test_ground_truth_is_the_batch_labels_in_pixels():
    # one 64 x 128 image; box centre (0.5, 0.5), size (0.25, 0.5) of the image -> (48, 16) to (80, 48) px
    batch = {"bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.5]]), "cls": torch.tensor([[3.0]]),
             "batch_idx": torch.tensor([0.0])}
    truth = ground_truth(batch, torch.zeros(1, 3, 64, 128))
    assert truth.boxes.tolist() == [[48.0, 16.0, 80.0, 48.0]]
    assert truth.classes.tolist() == [3] and truth.image_index.tolist() == [0]


def test_teacher_better_selection_uses_the_student_labels(tiny_benchmark):
    """A teacher identical to the student is nowhere closer to the labels: nothing to distil; a trained one is."""
    student = yolo.build_model("yolo11n", NC, seed=1).eval()
    trained = yolo.build_model("yolo11n", NC, seed=1)
    _train(trained, tiny_benchmark.site_data(0))
    loader, _ = yolo.make_train_loader(tiny_benchmark.site_data(0), imgsz=128, batch=4, stride=32, mosaic=0.0,
                                       workers=0, seed=0)
    batch = next(iter(loader))
    images = batch["img"].float() / 255
    twin = TeacherEnsemble(student, [yolo.build_model("yolo11n", NC, seed=1)], [1.0], select="teacher-better")
    other = TeacherEnsemble(student, [trained], [1.0], select="teacher-better")

    with torch.no_grad():
        preds = student(images)
        twin(images, preds, batch), other(images, preds, batch)

    assert len(batch["cls"]) > 0
    assert twin.last.num_foreground == 0 and twin.last.total.item() == 0.0
    assert other.last.num_foreground > 0 and other.last.total.item() > 0
    with pytest.raises(ValueError, match="select='teacher-worse'"):
        TeacherEnsemble(student, [student], [1.0], select="teacher-worse")


# --- YOLO26 (no DFL, one-to-one head) and across families -----------------------------------------------------


@pytest.fixture(scope="module")
def kd_batch(tiny_benchmark):
    loader, _ = yolo.make_train_loader(tiny_benchmark.site_data(0), imgsz=128, batch=4, stride=32, mosaic=0.0,
                                       workers=0, seed=0)
    batch = next(iter(loader))
    return batch["img"].float() / 255, batch


@pytest.mark.parametrize("student_arch, teacher_arch, strides", [
    ("yolo26n", "yolo26s", (8, 16, 32)),
    ("yolo26n", "yolo11s", (8, 16, 32)),  # YOLO11s cloud -> YOLO26n edge
    ("yolo11n", "yolo26s", (8, 16, 32)),  # the reverse
    ("yolo26n-p2", "yolo11s", (8, 16, 32)),  # the student's stride 4 learns from the labels only
])
def test_box_distillation_without_dfl_reaches_the_students_one_to_many_box_branch(kd_batch, student_arch,
                                                                                   teacher_arch, strides):
    # Prepare
    images, batch = kd_batch
    student = yolo.build_model(student_arch, NC, seed=1).train()
    kd = TeacherEnsemble(student, [yolo.build_model(teacher_arch, NC, seed=2)], [1.0], fg_threshold=0.0)

    # Execute: the KD term alone, backwards
    loss = kd(images, student(images), batch)
    loss.backward()

    # Assert: side distances, not DFL (one head has none); every shared anchor distilled (threshold 0)
    head = student.model[-1]
    anchors = sum((128 // s) ** 2 for s in strides) * len(images)
    assert kd.last.box_kind == "ltrb" and kd.last.strides == strides and kd.last.num_foreground == anchors
    assert loss.item() == pytest.approx(kd.last.cls.item() + kd.last.box.item(), rel=1e-6) and kd.last.box > 0
    assert head.cv2[-1][-1].weight.grad.abs().sum() > 0  # the box branch
    if yolo.is_end2end(student):  # its one-to-one branch is not distilled
        assert head.one2one_cv2[-1][-1].weight.grad is None and head.one2one_cv3[-1][-1].weight.grad is None


def test_yolo11s_teaches_a_yolo26n_student_in_training(tiny_benchmark):
    student = yolo.build_model("yolo26n", NC, seed=1)
    kd = TeacherEnsemble(student, [yolo.build_model("yolo11s", NC, seed=2)], [1.0], fg_threshold=0.0)

    res = _train(student, tiny_benchmark.site_data(0), kd, alpha=0.5)

    # 8 images, batch 4: the mean KD term over the 2 batches; the last batch's is one of them
    assert kd.last.box_kind == "ltrb" and res.iterations == 2
    assert res.extra_loss > 0 and torch.isfinite(torch.tensor(res.extra_loss)) and kd.last.total.item() > 0
