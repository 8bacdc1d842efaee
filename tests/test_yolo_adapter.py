"""Tests for common.yolo: building, weights, evaluation, and that nothing reaches the network."""

import math
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
    assert res.present_classes == sorted(present)
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
