"""Tests for common.yolo: building, weights, evaluation, and that nothing reaches the network."""

import io
import math
import re
import socket
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common import yolo
from common.yolo import ModelError

NC = 8


def _state_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (value, dtype or shape); [] if the state dicts are identical."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


def _bn_touched(model) -> torch.nn.Module:
    """Move BatchNorm buffers off their defaults: one forward pass in train mode."""
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    model.eval()
    return model


# building runs a stride-probing forward pass (~1 s on 2 cores): tests share these and never modify them
@pytest.fixture(scope="module")
def model0():
    return yolo.build_model("yolo11n", nc=NC, seed=0)


@pytest.fixture(scope="module")
def model_bn():
    """Seed 5, named classes, BatchNorm buffers moved off their defaults."""
    return _bn_touched(yolo.build_model("yolo11n", nc=NC, seed=5, names=[f"c{i}" for i in range(NC)]))


@pytest.fixture(scope="module")
def model_nc3():
    return yolo.build_model("yolo11n", nc=3, seed=0)


# --- environment ----------------------------------------------------------------------------


def test_ultralytics_is_isolated_under_cedar_home(cedar_home):
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    assert yolo.CEDAR_HOME == cedar_home
    assert yolo.setup() == cedar_home / "ultralytics"  # idempotent: conftest called it first
    assert USER_CONFIG_DIR == cedar_home / "ultralytics" / "Ultralytics"
    assert (cedar_home / "ultralytics" / "Ultralytics" / "Arial.ttf").is_file()  # no font download
    assert SETTINGS["sync"] is False
    assert SETTINGS.get("wandb", False) is False
    assert Path(SETTINGS["runs_dir"]) == cedar_home / "ultralytics" / "runs"


# --- building -------------------------------------------------------------------------------


def test_build_model_is_deterministic_per_seed(model0):
    again = yolo.build_model("yolo11n", nc=NC, seed=0)
    other = yolo.build_model("yolo11n", nc=NC, seed=1)

    assert _state_equal(yolo.state_dict(model0), yolo.state_dict(again)) == []
    assert len(_state_equal(yolo.state_dict(model0), yolo.state_dict(other))) > 0
    assert yolo.num_classes(model0) == NC
    assert model0.names == {i: str(i) for i in range(NC)}


def test_build_model_names(model_bn, model_nc3):
    assert model_bn.names == {i: f"c{i}" for i in range(NC)}
    assert yolo.num_classes(model_nc3) == 3 and model_nc3.names == {0: "0", 1: "1", 2: "2"}


def test_unknown_arch_is_named():
    with pytest.raises(ModelError) as info:
        yolo.build_model("yolo99z", nc=NC)

    assert "yolo99z" in str(info.value)
    assert "yolo11n" in str(info.value)  # lists the known ones


def test_zero_classes_is_an_error():
    with pytest.raises(ModelError, match="nc=0"):
        yolo.build_model("yolo11n", nc=0)


# --- weights --------------------------------------------------------------------------------


def test_arrayrecord_round_trip_is_bit_exact(model_bn):
    # Prepare: BN running stats and num_batches_tracked away from their defaults
    source = model_bn
    sd = yolo.state_dict(source)
    bn = [k for k in sd if k.endswith("running_mean")]
    assert bn and any(not torch.equal(sd[k], torch.zeros_like(sd[k])) for k in bn)
    assert all(int(sd[k]) == 1 for k in sd if k.endswith("num_batches_tracked"))
    target = yolo.build_model("yolo11n", nc=NC, seed=6)

    # Execute
    record = yolo.to_arrayrecord(source)
    yolo.from_arrayrecord(target, record)

    # Assert: every parameter and buffer, dtype included
    assert _state_equal(sd, yolo.state_dict(target)) == []


def test_arrayrecord_with_wrong_shapes_is_rejected(model0, model_nc3):
    record = yolo.to_arrayrecord(model_nc3)

    with pytest.raises(ModelError, match="wrong shape"):
        yolo.from_arrayrecord(model0, record)


def test_save_and_load_weights_round_trip(tmp_path, model_bn):
    # Prepare
    model = model_bn
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    # Execute
    path = yolo.save_weights(model, tmp_path / "w" / "model.pt", round=3)
    into = yolo.load_weights(path, model=yolo.build_model("yolo11n", nc=NC, seed=9))
    rebuilt = yolo.load_weights(path)  # architecture and names from the file

    # Assert
    with torch.no_grad():
        ref = model.eval()(x)[0]
        out_into = into.eval()(x)[0]
        out_rebuilt = rebuilt.eval()(x)[0]
    assert torch.equal(ref, out_into) and torch.equal(ref, out_rebuilt)
    assert rebuilt.names == model.names
    assert _state_equal(yolo.state_dict(model), yolo.state_dict(rebuilt)) == []
    blob = torch.load(path, weights_only=True)
    assert blob["meta"] == {"round": 3} and blob["arch"] == "yolo11n" and blob["nc"] == NC
    assert not (tmp_path / "w" / "model.pt.tmp").exists()


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        yolo.load_weights(tmp_path / "nope.pt")


def test_load_weights_corrupt_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"this is not a torch file")

    with pytest.raises(ModelError) as info:
        yolo.load_weights(path)

    assert "cannot read weights file" in str(info.value) and str(path) in str(info.value)


def test_load_weights_foreign_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)

    with pytest.raises(ModelError, match="not a cedar weights file"):
        yolo.load_weights(path)


def test_load_weights_wrong_shapes_names_a_tensor(tmp_path, model0, model_nc3):
    path = yolo.save_weights(model_nc3, tmp_path / "nc3.pt")

    with pytest.raises(ModelError) as info:
        yolo.load_weights(path, model=model0)

    msg = str(info.value)
    assert "wrong shape" in msg
    # the classification head's last conv has nc output channels: 3 in the file, 8 in the model
    assert "(3," in msg and f"({NC}," in msg


def test_load_state_dict_missing_and_extra_keys(model0):
    sd = yolo.state_dict(model0)
    key = next(iter(sd))
    sd["extra.weight"] = sd.pop(key)

    with pytest.raises(ModelError) as info:
        yolo.load_state_dict(model0, sd)  # raises before touching the model

    assert key in str(info.value) and "extra.weight" in str(info.value)


# --- user checkpoints -----------------------------------------------------------------------


def _ultralytics_checkpoint(path: Path, arch: str, nc: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Write ``path`` as Ultralytics saves a trained model; return its (half-precision) tensors as float.

    A training run saves ``{"ema": <pickled model in fp16>, "model": None, ...}``; ``strip_optimizer``
    then moves the EMA under ``"model"``, as in a released ``yolo11n.pt``. The model is Ultralytics'
    own ``DetectionModel``, built from its YAML (nothing is downloaded).
    """
    from copy import deepcopy

    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import strip_optimizer

    torch.manual_seed(seed)
    model = DetectionModel(f"{arch}.yaml", nc=nc, verbose=False)
    torch.save({"epoch": 99, "best_fitness": 0.5, "model": None, "ema": deepcopy(model).half(), "updates": 100,
                "optimizer": None, "train_args": {"model": f"{arch}.yaml", "imgsz": 640}}, path)
    stripped = strip_optimizer(path)
    assert stripped["ema"] is None and isinstance(stripped["model"], torch.nn.Module)
    return {k: v.float() for k, v in stripped["model"].state_dict().items()}


def test_80_class_ultralytics_checkpoint_loads_into_an_8_class_model(tmp_path, caplog):
    # Prepare
    theirs = _ultralytics_checkpoint(tmp_path / "yolo11n.pt", "yolo11n", nc=80)
    model = yolo.build_model("yolo11n", nc=NC, seed=0)
    fresh = yolo.state_dict(yolo.build_model("yolo11n", nc=NC, seed=0))

    # Execute
    with caplog.at_level("DEBUG", logger="common.yolo"):
        kept = yolo.load_checkpoint(model, tmp_path / "yolo11n.pt")

    # Assert: 499 tensors; the class branch (model.23.cv3) is 3 levels x (4 Conv+BN x 6 tensors + the last
    # conv's weight and bias) = 78, so 421 are kept
    own = yolo.state_dict(model)
    branch = {k for k in own if k.startswith("model.23.cv3.")}
    assert (kept, len(own), len(branch)) == (421, 499, 78)
    assert all(torch.equal(own[k], theirs[k]) for k in own if k.startswith(tuple(f"model.{i}." for i in range(11))))
    assert all(torch.equal(own[k], theirs[k]) for k in own if k not in branch)  # neck and box branch too
    assert own["model.23.cv3.0.2.weight"].shape == (NC, 64, 1, 1) != theirs["model.23.cv3.0.2.weight"].shape
    assert all(torch.equal(own[k], fresh[k]) for k in branch)  # left as built: re-initialised for 8 classes
    lines = [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
    assert len(lines) == 1 and "kept 421 of the model's 499 tensors" in lines[0] and "8 classes" in lines[0]


def test_yolo26n_ultralytics_checkpoint_loads_into_an_8_class_model(tmp_path):
    # Prepare
    theirs = _ultralytics_checkpoint(tmp_path / "yolo26n.pt", "yolo26n", nc=80)
    model = yolo.build_model("yolo26n", nc=NC, seed=0)

    # Execute
    kept = yolo.load_checkpoint(model, tmp_path / "yolo26n.pt")

    # Assert: YOLO26's head has a one-to-many and a one-to-one class branch, both re-initialised
    own = yolo.state_dict(model)
    branch = {k for k in own if k.startswith(("model.23.cv3.", "model.23.one2one_cv3."))}
    assert kept == len(own) - len(branch) and len(branch) == 2 * 78
    assert all(torch.equal(own[k], theirs[k]) for k in own if k not in branch)
    assert own["model.23.one2one_cv3.0.2.weight"].shape[0] == NC


def test_cedar_state_dict_loads_everything_and_another_architecture_is_refused(tmp_path, model_bn):
    # Prepare
    torch.save(yolo.state_dict(model_bn), tmp_path / "plain.pt")
    yolo.save_weights(yolo.build_model("yolo11s", nc=NC), tmp_path / "small.pt")
    model = yolo.build_model("yolo11n", nc=NC, seed=3)

    # Execute
    kept = yolo.load_checkpoint(model, tmp_path / "plain.pt")

    # Assert: same class count, so the class branch loads too
    assert kept == 499 and _state_equal(yolo.state_dict(model), yolo.state_dict(model_bn)) == []
    with pytest.raises(ModelError, match=r"small\.pt \(cedar weights\) does not fit model 'yolo11n': \d+ backbone"):
        yolo.load_checkpoint(model, tmp_path / "small.pt")


def test_load_checkpoint_names_a_missing_or_unreadable_file(tmp_path, model0):
    (tmp_path / "text.pt").write_text("not a checkpoint")

    with pytest.raises(ModelError, match="checkpoint not found: .*nope.pt"):
        yolo.load_checkpoint(model0, tmp_path / "nope.pt")
    with pytest.raises(ModelError, match="cannot read checkpoint .*text.pt"):
        yolo.load_checkpoint(model0, tmp_path / "text.pt")


# --- evaluation -----------------------------------------------------------------------------


def _present_classes(label_dir: Path) -> set[int]:
    return {int(line.split()[0]) for t in label_dir.glob("*.txt") for line in t.read_text().splitlines()}


def _instances(label_dir: Path) -> int:
    return sum(len(t.read_text().splitlines()) for t in label_dir.glob("*.txt"))


@pytest.fixture(scope="module")
def eval_test_site0(model0, tiny_benchmark):
    return yolo.evaluate(model0, tiny_benchmark.site_data(0), split="test", imgsz=128, batch=4)


def test_evaluate_nan_for_absent_classes(eval_test_site0, tiny_benchmark):
    # Prepare: which classes have a label in site 0's test split (site 0 draws 0..4)
    present = _present_classes(tiny_benchmark.site_dir(0) / "labels" / "test")
    assert present <= {0, 1, 2, 3, 4} and present

    res = eval_test_site0

    # Assert
    assert len(res.ap50) == NC
    assert [c for c, v in enumerate(res.ap50) if not math.isnan(v)] == sorted(present)
    for c in range(NC):
        if c in present:
            assert 0.0 <= res.ap50[c] <= 1.0
        else:
            assert math.isnan(res.ap50[c])
    for v in (res.map50, res.map50_95, res.precision, res.recall):
        assert 0.0 <= v <= 1.0
    assert res.images == 4


def test_evaluate_counts_instances(eval_test_site0, tiny_benchmark):
    assert eval_test_site0.instances == _instances(tiny_benchmark.site_dir(0) / "labels" / "test")


def test_evaluate_missing_split(model0, tmp_path, tiny_benchmark):
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tiny_benchmark.site_dir(0)}\ntrain: images/train\nval: images/val\nnc: 8\n"
                    "names: [a, b, c, d, e, f, g, h]\n")

    with pytest.raises(ModelError, match="no 'test' split"):
        yolo.evaluate(model0, data, split="test", imgsz=128)


# --- no network -----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outgoing connection and DNS lookup."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network disabled in tests")

    def connect(self, address):
        return refuse(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # the trap works: a plain connection attempt is recorded
    with pytest.raises(OSError):
        socket.socket().connect(("127.0.0.1", 9))
    with pytest.raises(OSError):
        socket.create_connection(("example.com", 80))
    assert len(attempts) == 2
    attempts.clear()
    return attempts


def test_train_evaluate_predict_never_touch_the_network(no_network, tiny_benchmark):
    # Prepare
    model = yolo.build_model("yolo11n", nc=NC, seed=0)
    before = yolo.state_dict(model)
    images = [cv2.imread(str(p)) for p in sorted((tiny_benchmark.site_dir(0) / "images" / "test").glob("*.png"))[:2]]

    # Execute
    res = yolo.train(model, tiny_benchmark.site_data(0), epochs=1, imgsz=128, batch=4, warmup_iters=2,
                     progress=False)
    ev = yolo.evaluate(model, tiny_benchmark.site_data(0), split="val", imgsz=128, batch=4)
    dets = yolo.predict(model, images, imgsz=128, conf=0.0001)

    # Assert
    assert no_network == []
    # 8 train images, batch 4: 2 iterations in 1 epoch
    assert (res.epochs, res.iterations) == (1, 2)
    assert math.isfinite(res.loss) and res.loss > 0
    assert set(res.loss_items) == {"box_loss", "cls_loss", "dfl_loss"}
    assert res.loss == pytest.approx(sum(res.loss_items.values()))
    assert len(_state_equal(before, yolo.state_dict(model))) > 0  # it did train
    assert not model.training
    assert len(ev.ap50) == NC and 0.0 <= ev.map50 <= 1.0
    assert len(dets) == 2
    for d, img in zip(dets, images):
        n = len(d["conf"])
        assert d["xyxy"].shape == (n, 4) and d["cls"].shape == (n,)
        assert d["xyxy"].dtype == np.float32 and d["cls"].dtype == np.int64
        assert np.all((d["cls"] >= 0) & (d["cls"] < NC))
        assert np.all(d["conf"] >= 0.0001)
        if n:
            assert d["xyxy"].min() >= 0 and d["xyxy"][:, [0, 2]].max() <= img.shape[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_debug_line_per_epoch_off_a_terminal_and_a_bar_on_one(tiny_benchmark, caplog, monkeypatch):
    # Prepare: under pytest stderr is captured, not a terminal (as in a ClientApp, whose stderr goes to Ray's log)
    model = yolo.build_model("yolo11n", nc=NC, seed=0)
    data = tiny_benchmark.site_data(0)
    assert not sys.stderr.isatty()

    # Execute
    with caplog.at_level("DEBUG", logger="common.yolo"):
        res = yolo.train(model, data, epochs=2, imgsz=128, batch=4, warmup_iters=2, desc="site-0 round 1")
    records = [r for r in caplog.records if r.name == "common.yolo"]
    lines = [r.getMessage() for r in records]
    caplog.clear()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level("DEBUG", logger="common.yolo"):
        yolo.train(model, data, epochs=1, imgsz=128, batch=4, warmup_iters=2, desc="site-0 round 2")

    # Assert: 8 images, batch 4: 2 batches per epoch; the last line's loss is the result's
    assert len(lines) == 2
    assert {r.levelname for r in records} == {"DEBUG"}  # at INFO the console keeps the site's one line per round
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(rf"site-0 round 1 epoch {epoch}/2: loss \d+\.\d{{3}} \(box \d+\.\d{{3}}, "
                            r"cls \d+\.\d{3}, dfl \d+\.\d{3}\), 2 batches, \d+\.\d s", line), line
    assert f"loss {res.loss:.3f} " in lines[1]
    assert [r for r in caplog.records if r.name == "common.yolo"] == []  # on a terminal: the bar only
    assert "site-0 round 2 epoch 1/1" in terminal.getvalue()


def test_train_zero_epochs_is_a_no_op(model0, tiny_benchmark):
    before = yolo.state_dict(model0)

    res = yolo.train(model0, tiny_benchmark.site_data(0), epochs=0, imgsz=128, batch=4)

    assert (res.epochs, res.iterations, res.loss) == (0, 0, 0.0)
    assert _state_equal(before, yolo.state_dict(model0)) == []


def test_export_onnx_offline_matches_torch(no_network, tmp_path, model_bn):
    import onnxruntime as ort

    # Prepare
    model = model_bn
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    before = yolo.state_dict(model)

    # Execute
    path = yolo.export_onnx(model, tmp_path / "out" / "model.onnx", imgsz=128)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x))[0].numpy()

    # Assert: (1, 4 box + nc scores, anchors); anchors at strides 8/16/32: 16^2 + 8^2 + 4^2 = 336
    assert no_network == []
    assert path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert out.shape == (1, 4 + NC, 336) == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)  # box centres reach ~480 px: float32 rounding
    assert _state_equal(before, yolo.state_dict(model)) == []  # exported a copy


# --- YOLO26: NMS-free, no DFL ---------------------------------------------------------------


@pytest.mark.parametrize("arch, strides", [("yolo26n", [8, 16, 32]), ("yolo26n-p2", [4, 8, 16, 32])])
def test_yolo26_and_its_p2_variant_build_offline_with_a_one_to_one_head_and_no_dfl(no_network, arch, strides, model0):
    model = yolo.build_model(arch, nc=NC, seed=0)

    head = model.model[-1]
    assert no_network == []
    assert head.stride.tolist() == strides and head.reg_max == 1  # box = 4 raw side distances, no DFL bins
    assert yolo.is_end2end(model) and not yolo.is_end2end(model0)
    assert type(model.init_criterion()).__name__ == "E2ELoss"
    model.train()
    preds = model(torch.zeros(1, 3, 64, 64))
    anchors = sum((64 // s) ** 2 for s in strides)
    for branch in ("one2many", "one2one"):  # training: both branches' raw outputs
        assert preds[branch]["boxes"].shape == (1, 4, anchors) and preds[branch]["scores"].shape == (1, NC, anchors)


def test_yolo26_trains_with_the_end_to_end_loss_and_evaluates_its_one_to_one_head(tiny_benchmark, monkeypatch):
    """Two epochs: the one-to-many weight falls from 0.8 to 0.1 after the first, as Ultralytics' schedule
    ``max(1 - updates / (epochs - 1), 0) * 0.7 + 0.1`` gives with epochs = 2; evaluation runs without NMS."""
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils.loss import E2ELoss

    # Prepare: record the one-to-many weight at each batch and the validator's nms setting
    weights_seen, nms_seen = [], []
    loss_call, val_call = E2ELoss.__call__, DetectionValidator.__call__
    monkeypatch.setattr(E2ELoss, "__call__", lambda self, *a: weights_seen.append(self.o2m) or loss_call(self, *a))
    monkeypatch.setattr(DetectionValidator, "__call__",
                        lambda self, *a, **k: nms_seen.append(self.args.nms) or val_call(self, *a, **k))
    model = yolo.build_model("yolo26n", nc=NC, seed=0)
    before = yolo.state_dict(model)

    # Execute
    res = yolo.train(model, tiny_benchmark.site_data(0), epochs=2, imgsz=128, batch=4, warmup_iters=2,
                     progress=False)
    ev = yolo.evaluate(model, tiny_benchmark.site_data(0), split="val", imgsz=128, batch=4)

    # Assert: 8 images, batch 4: 2 batches per epoch
    assert weights_seen == pytest.approx([0.8, 0.8, 0.1, 0.1])
    assert set(res.loss_items) == {"box_loss", "cls_loss", "l1_loss"} and math.isfinite(res.loss)
    changed = _state_equal(before, yolo.state_dict(model))
    assert any(".one2one_cv3." in k for k in changed) and any(".cv3." in k and "one2one" not in k for k in changed)
    assert nms_seen == [False]  # the NMS-free head, as the edge runs it
    assert len(ev.ap50) == NC and 0.0 <= ev.map50 <= 1.0 and ev.images == 4


def test_feature_teacher_trains_with_ultralytics_own_distillation_loss(tiny_benchmark, monkeypatch):
    """``feature_teacher``: the library's DistillationModel loss, detection + ``dis`` x feature L2; the teacher
    stays as it was, the student keeps no hook, projector or criterion afterwards."""
    from ultralytics.nn.distill_model import DistillationModel

    # Prepare: record the distillation term of every batch
    seen = []
    loss_call = DistillationModel.loss
    monkeypatch.setattr(DistillationModel, "loss",
                        lambda self, batch, preds=None: seen.append(loss_call(self, batch, preds)) or seen[-1])
    model = yolo.build_model("yolo11n", nc=NC, seed=0)
    teacher = yolo.build_model("yolo11n", nc=NC, seed=1)
    teacher_before, before = yolo.state_dict(teacher), yolo.state_dict(model)

    # Execute
    res = yolo.train(model, tiny_benchmark.site_data(0), epochs=1, imgsz=128, batch=4, warmup_iters=2,
                     progress=False, feature_teacher=teacher)

    # Assert: 8 images, batch 4: 2 batches; the loss items are the library's, its distillation term > 0
    assert len(seen) == 2
    assert set(res.loss_items) == {"box_loss", "cls_loss", "dfl_loss", "dis_loss"}
    assert all(float(items["dis_loss"]) > 0 for _, items in seen)
    assert res.loss == pytest.approx(sum(res.loss_items.values()))
    assert _state_equal(teacher_before, yolo.state_dict(teacher)) == []
    assert len(_state_equal(before, yolo.state_dict(model))) > 0
    assert set(yolo.state_dict(model)) == set(before)  # no projector in the student
    assert not any(m._forward_hooks for m in model.modules()) and not hasattr(model, "criterion")
