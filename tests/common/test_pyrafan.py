"""Tests for common.pyrafan: the PyraFAN head (paper section 3), its Ultralytics registration and KD levels."""

import copy
import math
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from common import yolo
from common.kd import detection_kd_loss
from common.pyrafan import ChannelGate, LearnedGate, LevelFusion, PyraFAN, PyraFANv2, ResidualFusion
from common.yolo import head_levels

NC = 8
GEN = torch.Generator().manual_seed(0)


def _bn_touched(model: nn.Module) -> nn.Module:
    """Move BatchNorm buffers off their defaults (one train-mode forward), then eval mode."""
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def _small_head(nc: int = 3) -> PyraFAN:
    """A hand-sized head: X2/X3/X4 with 8/16/32 channels, r = 4 -> C = 32, C/r = 8 (== C2: no X2 projection)."""
    torch.manual_seed(0)
    head = PyraFAN(nc=nc, r=4, reg_max=16, ch=(8, 16, 32))
    head.stride = torch.tensor([4.0, 8.0, 16.0])
    return head


def _levels(batch: int = 2, size: int = 32) -> list[torch.Tensor]:
    """[X2, X3, X4] of a ``size`` px image: 8 x (size/4)^2, 16 x (size/8)^2, 32 x (size/16)^2."""
    return [torch.randn(batch, c, size // s, size // s, generator=GEN) for c, s in ((8, 4), (16, 8), (32, 16))]


# building runs a stride-probing forward pass: tests share these models and never modify them
@pytest.fixture(scope="module")
def pyrafan_n():
    return _bn_touched(yolo.build_model("yolo11n-pyrafan", nc=NC, seed=0))


@pytest.fixture(scope="module")
def yolo11n():
    return yolo.build_model("yolo11n", nc=NC, seed=0).eval()


# --- building and shapes --------------------------------------------------------------------


@pytest.mark.parametrize("imgsz", [320, 640])
def test_strides_and_shapes(pyrafan_n, imgsz):
    # Prepare
    x = torch.rand(1, 3, imgsz, imgsz, generator=GEN)
    # 320 px: 80^2 + 40^2 + 20^2 = 8400 anchors; 640 px: 160^2 + 80^2 + 40^2 = 33600
    sides = [imgsz // 4, imgsz // 8, imgsz // 16]
    anchors = sum(s * s for s in sides)

    # Execute
    with torch.no_grad():
        y, preds = pyrafan_n(x)

    # Assert
    head = pyrafan_n.model[-1]
    assert isinstance(head, PyraFAN)
    assert pyrafan_n.stride.tolist() == head.stride.tolist() == [4.0, 8.0, 16.0]
    assert y.shape == (1, 4 + NC, anchors)
    assert preds["boxes"].shape == (1, 4 * 16, anchors) and preds["scores"].shape == (1, NC, anchors)
    # head inputs [X2_attn, F3, F4]: C/r = 128 / 4 = 32 channels each (YOLO11n neck: 32/64/128)
    assert [tuple(f.shape) for f in preds["feats"]] == [(1, 32, s, s) for s in sides]
    # decoded class scores are sigmoids, box centres lie in the image
    assert 0.0 <= float(y[:, 4:].min()) and float(y[:, 4:].max()) <= 1.0
    assert 0.0 <= float(y[:, :2].min()) and float(y[:, :2].max()) <= imgsz


def test_training_mode_output_is_detects_dict(pyrafan_n):
    model = yolo.build_model("yolo11n-pyrafan", nc=NC, seed=0).train()

    preds = model(torch.rand(2, 3, 128, 128, generator=GEN))

    # 32^2 + 16^2 + 8^2 = 1344 anchors; what v8DetectionLoss reads
    assert set(preds) == {"boxes", "scores", "feats"}
    assert preds["boxes"].shape == (2, 64, 1344) and preds["scores"].shape == (2, NC, 1344)
    assert isinstance(preds["feats"], list) and preds["feats"][0].shape[-2:] == (32, 32)


def test_yolo11s_pyrafan_has_the_papers_width():
    model = yolo.build_model("yolo11s-pyrafan", nc=NC, seed=0)

    head = model.model[-1]
    # YOLO11s neck: X2/X3/X4 = 64/128/256 channels, C = 256, C/r = 64: the concatenation
    # Z2 || Z3 || Z4 has 3C/r = 192 channels, the paper's example
    assert head.c_head == 64
    assert head.fusion[0].logits.in_channels == head.fusion[1].logits.in_channels == 192
    assert isinstance(head.proj2, nn.Identity)


def test_p2_ablation_is_stock_detect_on_the_same_levels(pyrafan_n):
    from ultralytics.nn.modules import Detect

    model = yolo.build_model("yolo11n-p2", nc=NC, seed=0)

    assert type(model.model[-1]) is Detect
    assert model.stride.tolist() == [4.0, 8.0, 16.0]
    # same backbone and neck as the PyraFAN model: only the last layer differs
    neck = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("model.26.")}
    neck_pf = {k: v.shape for k, v in pyrafan_n.state_dict().items() if not k.startswith("model.26.")}
    assert neck == neck_pf


def test_stock_yamls_parse_as_before():
    # Ultralytics' own summary for yolo11n.yaml (nc = 80): 2,624,080 parameters
    assert yolo.count_parameters(yolo.build_model("yolo11n", nc=80)) == 2_624_080


def test_registration_lasts_only_while_the_adapter_builds(pyrafan_n):
    import ultralytics.nn.tasks as tasks
    from ultralytics.nn.tasks import DetectionModel

    from common.pyrafan import registered

    stock = tasks.parse_model
    with registered():
        assert tasks.parse_model is not stock
    assert tasks.parse_model is stock and isinstance(pyrafan_n.model[-1], PyraFAN)
    with pytest.raises(KeyError, match="PyraFAN"):  # outside the adapter, Ultralytics is as it ships
        DetectionModel(yolo.resolve_model_cfg("yolo11n-pyrafan"), nc=NC, verbose=False)


def test_build_is_deterministic_per_seed():
    a = yolo.state_dict(yolo.build_model("yolo11n-pyrafan", nc=NC, seed=1))
    b = yolo.state_dict(yolo.build_model("yolo11n-pyrafan", nc=NC, seed=1))

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bias_init_like_detect(pyrafan_n):
    head = pyrafan_n.model[-1]
    for box, cls, s in zip(head.box, head.cls, (4, 8, 16)):
        # e.g. stride 4, nc = 8: log(5 / 8 / 160^2) = -10.6200
        assert torch.allclose(cls.bias, torch.full((NC,), math.log(5 / NC / (640 / s) ** 2)))
        assert torch.all(box.bias == 2.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly 3 levels"):
        PyraFAN(nc=3, ch=(8, 16))
    with pytest.raises(ValueError, match="end2end"):
        PyraFAN(nc=3, end2end=True, ch=(8, 16, 32))
    with pytest.raises(ValueError, match="r=3"):
        PyraFAN(nc=3, r=3, ch=(8, 16, 32))


# --- the module's pieces --------------------------------------------------------------------


def test_fusion_weights_sum_to_one_at_every_pixel():
    # Prepare: non-zero fusion logits, so the weights are not the initial uniform 1/3
    head = _small_head()
    for fusion in head.fusion:
        nn.init.normal_(fusion.logits.weight, std=1.0, generator=GEN)
    xs = _levels()

    for fusion, side in zip(head.fusion, (4, 2)):  # 32 px: level 3 is 4x4, level 4 is 2x2
        # Execute
        with torch.no_grad():
            z = fusion.aligned(xs)
            w = fusion.level_weights(z)
            fused = fusion(xs)

        # Assert
        assert [tuple(t.shape) for t in z] == [(2, 8, side, side)] * 3
        assert w.shape == (2, 3, side, side)
        torch.testing.assert_close(w.sum(dim=1), torch.ones(2, side, side))
        assert float(w.min()) > 0.0 and float(w.std()) > 0.01  # really per pixel, not uniform
        torch.testing.assert_close(fused, w[:, 0:1] * z[0] + w[:, 1:2] * z[1] + w[:, 2:3] * z[2])


def test_fusion_starts_as_the_mean():
    fusion = LevelFusion((8, 16, 32), 8, target=1)
    xs = _levels()

    z = fusion.aligned(xs)

    assert torch.equal(fusion.level_weights(z), torch.full((2, 3, 4, 4), 1 / 3))
    torch.testing.assert_close(fusion(xs), (z[0] + z[1] + z[2]) / 3)


def test_alignment_is_nearest_resampling():
    # Prepare: a DW/PW alignment that passes values through (identity kernels, no BN, no activation)
    fusion = LevelFusion((1, 1, 1), 1, target=1)
    for align in fusion.align:
        for conv in (align.dw, align.pw):
            conv.conv.weight.data.zero_()
            conv.conv.weight.data[..., conv.conv.kernel_size[0] // 2, conv.conv.kernel_size[1] // 2] = 1.0
            conv.bn, conv.act = nn.Identity(), nn.Identity()
    x2 = torch.arange(16.0).view(1, 1, 4, 4)  # stride 4 -> level 3 (2x2): keeps every 2nd pixel
    x3 = torch.full((1, 1, 2, 2), 7.0)
    x4 = torch.tensor([[[[5.0]]]])  # stride 16 -> level 3: repeated 2x2

    z2, z3, z4 = fusion.aligned([x2, x3, x4])

    assert z2.flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
    assert z3.flatten().tolist() == [7.0] * 4
    assert z4.flatten().tolist() == [5.0] * 4


def test_gate_is_sigmoid_of_channel_mean_on_a_hand_built_input():
    # Prepare: channel 0 = [[1, 3], [-1, 1]] (mean 1), channel 1 = all -2 (mean -2)
    x = torch.tensor([[[[1.0, 3.0], [-1.0, 1.0]], [[-2.0, -2.0], [-2.0, -2.0]]]])

    # Execute
    a = ChannelGate.attention(x)
    out = ChannelGate()(x)

    # Assert: sigmoid(1) = 1 / (1 + e^-1) = 0.7310586, sigmoid(-2) = 1 / (1 + e^2) = 0.1192029
    assert a.shape == (1, 2, 1, 1)
    torch.testing.assert_close(a.flatten(), torch.tensor([0.7310586, 0.1192029]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.7310586, 2.1931758], [-0.7310586, 0.7310586]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 1], torch.full((2, 2), -0.2384058), atol=1e-6, rtol=0)


def test_gate_lies_strictly_between_zero_and_one():
    x = 3 * torch.randn(4, 16, 8, 8, generator=GEN)

    a = ChannelGate.attention(x)

    assert float(a.min()) > 0.0 and float(a.max()) < 1.0
    torch.testing.assert_close(a, torch.sigmoid(x.mean(dim=(2, 3), keepdim=True)))
    assert sum(p.numel() for p in ChannelGate().parameters()) == 0


def test_small_object_level_is_the_gated_x2():
    head = _small_head()
    xs = _levels()

    x2_attn = head.head_inputs(xs)[0]

    torch.testing.assert_close(x2_attn, xs[0] * torch.sigmoid(xs[0].mean(dim=(2, 3), keepdim=True)))


def test_one_shared_depthwise_conv_serves_every_level_and_both_tasks():
    # Prepare
    head = _small_head().eval()
    calls = []
    head.dw.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    xs = _levels()

    # Execute
    with torch.no_grad():
        preds = head.forward_head(head.head_inputs(xs))

    # Assert: one call per level (8x8, 4x4, 2x2 at 32 px), the same weight tensor each time
    assert calls == [(2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    head_dw = [m for name, m in head.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith("fusion")
               and m.groups > 1]
    assert head_dw == [head.dw] and head.dw.weight.shape == (8, 1, 3, 3)
    # both task-specific 1x1 convs read the same shared features
    for level, feat in enumerate(preds["feats"]):
        h = torch.nn.functional.silu(head.dw_bn[level](head.dw(feat)))
        n = feat.shape[-1] ** 2
        start = sum(f.shape[-1] ** 2 for f in preds["feats"][:level])
        torch.testing.assert_close(preds["boxes"][..., start : start + n], head.box[level](h).flatten(2))
        torch.testing.assert_close(preds["scores"][..., start : start + n], head.cls[level](h).flatten(2))


def test_parameter_count_by_hand():
    head = _small_head(nc=3)
    # ch = (8, 16, 32), r = 4: C = 32, C/r = 8; nc = 3, reg_max = 16
    # T_{l,k}: DW 3x3 (9 c_k) + BN (2 c_k) + PW (8 c_k) + BN (2 * 8)  = 19 c_k + 16
    #   sum over c_k = 8, 16, 32:  19 * 56 + 3 * 16                     = 1112
    #   fusion logits 1x1: 3 * 8 -> 3, with bias: 24 * 3 + 3           =   75
    #   per fused level 1187, levels 3 and 4                            = 2374
    # gate: 0; X2 projection: none (C2 = C/r = 8)                       =    0
    # shared DW 3x3 (no bias): 8 * 9                                     =   72
    # per-level BN after it: 3 * 2 * 8                                   =   48
    # box 1x1: 3 levels * (8 * 64 + 64)                                  = 1728
    # cls 1x1: 3 levels * (8 * 3 + 3)                                    =   81
    # DFL integral (fixed, 16 bins)                                      =   16
    # total                                                              = 4319
    assert sum(p.numel() for p in head.parameters()) == 4319
    assert sum(p.numel() for p in head.fusion.parameters()) == 2374


def test_x2_is_projected_when_its_width_differs():
    head = PyraFAN(nc=3, r=4, ch=(16, 16, 32))  # C/r = 8 != C2 = 16

    x2_attn = head.head_inputs([torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 32, 2, 2)])[0]

    assert x2_attn.shape == (1, 8, 8, 8)


def test_fuse_folds_bn_without_changing_outputs():
    # Prepare: BN statistics off their defaults
    head = _small_head()
    xs = _levels()
    head.train()
    with torch.no_grad():
        head(xs)
    head.eval()
    with torch.no_grad():
        before = head(xs)[0]

    # Execute
    head.fuse()
    with torch.no_grad():
        after = head(xs)[0]

    # Assert
    assert head.dw is None and head.dw_bn is None and len(head.dw_fused) == 3
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-5)


# --- KD levels ------------------------------------------------------------------------------


def test_head_levels_of_pyrafan_match_the_per_level_convs(pyrafan_n):
    # Prepare
    x = torch.rand(1, 3, 128, 128, generator=GEN)
    head = pyrafan_n.model[-1]

    # Execute
    with torch.no_grad():
        out = pyrafan_n(x)
        levels = head_levels(pyrafan_n, out)
        # Assert: {4: 32x32, 8: 16x16, 16: 8x8}, each equal to the level's own 1x1 conv outputs
        assert sorted(levels) == [4, 8, 16]
        for level, (stride, feat) in enumerate(zip((4, 8, 16), out[1]["feats"])):
            h = head.shared_features(feat, level)
            side = 128 // stride
            assert levels[stride]["cls"].shape == (1, NC, side, side)
            assert levels[stride]["dfl"].shape == (1, 64, side, side)
            torch.testing.assert_close(levels[stride]["cls"], head.cls[level](h))
            torch.testing.assert_close(levels[stride]["dfl"], head.box[level](h))


def test_head_levels_of_stock_detect(yolo11n):
    x = torch.rand(1, 3, 128, 128, generator=GEN)
    head = yolo11n.model[-1]

    with torch.no_grad():
        out = yolo11n(x)
        levels = head_levels(yolo11n, out)
        assert sorted(levels) == [8, 16, 32]
        for level, (stride, feat) in enumerate(zip((8, 16, 32), out[1]["feats"])):
            torch.testing.assert_close(levels[stride]["cls"], head.cv3[level](feat))
            torch.testing.assert_close(levels[stride]["dfl"], head.cv2[level](feat))
        # training-mode dicts work too
        yolo11n.train()
        try:
            train_levels = head_levels(yolo11n.model[-1], yolo11n(x))
        finally:
            yolo11n.eval()
    assert train_levels[32]["cls"].shape == (1, NC, 4, 4)


def test_kd_between_pyrafan_and_yolo11_uses_the_shared_strides(pyrafan_n, yolo11n):
    x = torch.rand(2, 3, 128, 128, generator=GEN)
    with torch.no_grad():
        student = head_levels(pyrafan_n, pyrafan_n(x))
        teacher = head_levels(yolo11n, yolo11n(x))

    kd = detection_kd_loss(student, teacher, temperature=2.0, fg_threshold=0.0)
    self_kd = detection_kd_loss(student, student, temperature=2.0, fg_threshold=0.0)

    assert kd.strides == (8, 16)
    # fg_threshold 0: every anchor of the shared strides, 2 images x (16^2 + 8^2)
    assert kd.num_foreground == 2 * (16 * 16 + 8 * 8)
    assert math.isfinite(float(kd.total)) and float(kd.total) > 0
    assert float(self_kd.total) == pytest.approx(0.0, abs=1e-5)


def test_head_levels_rejects_export_output(pyrafan_n):
    with pytest.raises(ValueError, match="raw prediction dict"):
        head_levels(pyrafan_n, torch.zeros(1, 12, 336))


# --- weights, pickling, ONNX ----------------------------------------------------------------


def test_save_load_round_trip_gives_identical_outputs(pyrafan_n, tmp_path):
    x = torch.rand(1, 3, 160, 160, generator=GEN)
    path = yolo.save_weights(pyrafan_n, tmp_path / "pf.pt")

    loaded = yolo.load_weights(path).eval()  # rebuilt from the arch name in the file

    assert isinstance(loaded.model[-1], PyraFAN) and loaded.cedar_arch == "yolo11n-pyrafan"
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], pyrafan_n(x)[0])


def test_pickled_checkpoint_loads_in_a_fresh_process_without_installing(pyrafan_n, tmp_path):
    # Prepare: an Ultralytics-style checkpoint (pickled model object) and the expected output
    x = torch.rand(1, 3, 96, 96, generator=GEN)
    torch.save({"model": pyrafan_n}, tmp_path / "ckpt.pt")
    with torch.no_grad():
        torch.save(pyrafan_n(x)[0], tmp_path / "expected.pt")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import ultralytics.nn.tasks as tasks
        def refuse(*args, **kwargs):
            raise AssertionError(f"auto-install attempted: {{args}}")
        tasks.check_requirements = refuse
        assert "common.pyrafan" not in sys.modules
        ckpt, _ = tasks.torch_safe_load(r"{tmp_path / 'ckpt.pt'}")
        assert "common.pyrafan" in sys.modules  # imported by unpickling
        model = ckpt["model"].eval()
        with torch.no_grad():
            y = model(torch.load(r"{tmp_path / 'x.pt'}"))[0]
        # another process may use another thread count (summation order): not bit-exact
        torch.testing.assert_close(y, torch.load(r"{tmp_path / 'expected.pt'}"), atol=1e-4, rtol=1e-5)
        print("ok", type(model.model[-1]).__module__)
    """)

    # Execute
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "common.pyrafan"]


def test_onnx_export_matches_torch(pyrafan_n, tmp_path):
    import onnxruntime as ort

    # Prepare
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    with torch.no_grad():
        ref = pyrafan_n(torch.from_numpy(x))[0].numpy()

    # Execute
    path = yolo.export_onnx(pyrafan_n, tmp_path / "pf.onnx", imgsz=128)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})

    # Assert: BN folded (Ultralytics' fuse + PyraFAN.fuse) and still within 1e-4 of torch
    assert out.shape == ref.shape == (1, 4 + NC, 32 * 32 + 16 * 16 + 8 * 8)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)


# --- training -------------------------------------------------------------------------------


def _tiny_dataset(root, n_images: int = 4, size: int = 128):
    """``n_images`` PNGs with bright squares (6-24 px) on grey noise, YOLO labels and a data.yaml (no download key)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n_images):
            img = rng.integers(90, 130, (size, size, 3), dtype=np.uint8)
            lines = []
            for j in range(4):
                side = int(rng.integers(6, 25))
                x0, y0 = (int(v) for v in rng.integers(4, size - side - 4, 2))
                cls = j % 2
                img[y0 : y0 + side, x0 : x0 + side] = (255, 255, 255) if cls == 0 else (0, 0, 255)
                cx, cy = (x0 + side / 2) / size, (y0 + side / 2) / size
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {side / size:.6f} {side / size:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnc: 2\nnames: [white, red]\n")
    return data


def _fixed_batch(data_yaml, size: int = 128) -> dict:
    """All train images as one batch in the layout v8DetectionLoss reads."""
    root = data_yaml.parent
    imgs, idx, cls, boxes = [], [], [], []
    for i, path in enumerate(sorted((root / "images" / "train").glob("*.png"))):
        imgs.append(torch.from_numpy(cv2.imread(str(path))[..., ::-1].copy()).permute(2, 0, 1).float() / 255)
        for line in (root / "labels" / "train" / f"{path.stem}.txt").read_text().split("\n"):
            if line:
                c, *xywh = (float(v) for v in line.split())
                idx.append(i), cls.append([c]), boxes.append(xywh)
    return {"img": torch.stack(imgs), "batch_idx": torch.tensor(idx), "cls": torch.tensor(cls),
            "bboxes": torch.tensor(boxes)}


def test_loss_decreases_when_overfitting_one_batch(tmp_path):
    # Prepare
    batch = _fixed_batch(_tiny_dataset(tmp_path))
    model = yolo.build_model("yolo11n-pyrafan", nc=2, seed=0).train()
    criterion = model.init_criterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    # Execute: 12 steps on the same 4 images
    losses = []
    for _ in range(12):
        loss, _items = criterion(model(batch["img"]), batch)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        losses.append(float(loss.detach().sum()))

    # Assert: every term finite; the last steps well below the first
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    # gradients reached the fusion and the shared head
    head = model.model[-1]
    assert head.fusion[0].logits.weight.grad.abs().sum() > 0 and head.dw.weight.grad.abs().sum() > 0


def test_adapter_train_evaluate_predict_run_with_pyrafan(tmp_path):
    # Prepare
    data = _tiny_dataset(tmp_path)
    model = yolo.build_model("yolo11n-pyrafan", nc=2, seed=0, names=["white", "red"])
    before = yolo.state_dict(model)
    image = cv2.imread(str(tmp_path / "images" / "val" / "0.png"))

    # Execute
    res = yolo.train(model, data, epochs=2, imgsz=128, batch=2, warmup_iters=2, mosaic=0.0, progress=False)
    ev = yolo.evaluate(model, data, split="val", imgsz=128, batch=2)
    dets = yolo.predict(model, [image], imgsz=128, conf=0.001)

    # Assert: 4 images, batch 2, 2 epochs -> 4 iterations
    assert (res.epochs, res.iterations) == (2, 4)
    assert math.isfinite(res.loss) and res.loss > 0
    assert any(not torch.equal(before[k], v) for k, v in yolo.state_dict(model).items())
    assert ev.images == 4 and ev.instances == 16 and [i for i, v in enumerate(ev.ap50) if not math.isnan(v)] == [0, 1] and 0.0 <= ev.map50 <= 1.0
    assert isinstance(model.model[-1], PyraFAN) and not model.training
    assert dets[0]["xyxy"].shape[1] == 4 and np.all(dets[0]["cls"] < 2)


# --- the small-object metric of benchmarks/pyrafan_accuracy.py -------------------------------


def _dets(rows):
    """rows of (x0, y0, x1, y1, conf, cls) -> predict()-style dict."""
    a = np.asarray(rows, dtype=np.float32).reshape(-1, 6)
    return {"xyxy": a[:, :4], "conf": a[:, 4], "cls": a[:, 5].astype(np.int64)}


def test_small_object_ap_ignores_large_objects_instead_of_deleting_them():
    from benchmarks.pyrafan_accuracy import size_range_ap50

    # Prepare: class 0, a 10 px and a 40 px object
    gt = np.array([[0, 0, 0, 10, 10], [0, 50, 50, 90, 90]], dtype=float)
    pred = _dets([(50, 50, 90, 90, 0.95, 0),  # the 40 px object: ignored for "small"
                  (0, 0, 10, 10, 0.90, 0),  # the 10 px object: TP
                  (200, 200, 208, 208, 0.70, 0),  # 8 px false alarm: FP
                  (150, 150, 180, 180, 0.60, 0)])  # 30 px false alarm: out of range, ignored

    # Execute
    small = size_range_ap50([pred], [gt], nc=2, small_px=16)
    deleted = size_range_ap50([pred], [gt[:1]], nc=2, small_px=None)  # labels filtered, detections kept
    every = size_range_ap50([pred], [gt], nc=2, small_px=None)

    # Assert: TP then FP -> recall 1 at precision 1 -> 0.995 (Ultralytics' 101-point AP of a perfect ranking);
    # deleting the large label makes the 0.95 detection a FP first -> precision 0.5 at recall 1 -> ~0.5
    assert small["n_gt"] == 1 and small["ap50"][0] == pytest.approx(0.995)
    assert math.isnan(small["ap50"][1]) and small["map50"] == pytest.approx(0.995)
    assert deleted["ap50"][0] == pytest.approx(0.5, abs=0.01)
    assert every["n_gt"] == 2 and every["ap50"][0] == pytest.approx(0.995)  # both objects found first


def test_small_object_ap_counts_misses_and_a_box_on_the_wrong_object():
    from benchmarks.pyrafan_accuracy import size_range_ap50

    gts = [np.array([[1, 0, 0, 8, 8], [1, 20, 20, 28, 28]], dtype=float), np.zeros((0, 5))]
    # image 0: one of the two small objects found (conf 0.5) after a small FP (conf 0.9); image 1: a small FP
    preds = [_dets([(0, 0, 8, 8, 0.5, 1), (40, 40, 48, 48, 0.9, 1)]), _dets([(5, 5, 12, 12, 0.3, 1)])]

    res = size_range_ap50(preds, gts, nc=2, small_px=16)

    # ranking FP(0.9), TP(0.5), FP(0.3): best precision 0.5, reached at recall 0.5 -> the envelope is 0.5 on
    # [0, 0.5) and 0 from 0.5 on (np.interp takes the value after the step); trapezoid over the 101 points
    # 0, 0.01, ..., 1: 0.49 * 0.5 + 0.01 * (0.5 + 0) / 2 = 0.2475
    assert res["n_gt"] == 2
    assert res["ap50"][1] == pytest.approx(0.2475, abs=1e-6)
    assert math.isnan(res["ap50"][0])
    assert size_range_ap50([_dets([])], [gts[0]], nc=2)["ap50"][1] == 0.0  # nothing detected


def test_compute_ap_is_ultralytics():
    from ultralytics.utils.metrics import compute_ap as ultralytics_ap

    from common.detections import compute_ap

    rng = np.random.default_rng(0)
    for n in (1, 5, 40):
        tp = rng.random(n) < 0.6
        recall = np.cumsum(tp) / max(1, tp.sum() + 2)
        precision = np.cumsum(tp) / np.arange(1, n + 1)
        assert compute_ap(recall, precision) == pytest.approx(float(ultralytics_ap(recall, precision)[0]), abs=1e-12)


def test_dynamic_onnx_export_runs_at_other_sizes(pyrafan_n, tmp_path):
    import onnxruntime as ort

    path = yolo.export_onnx(pyrafan_n, tmp_path / "pf-dyn.onnx", imgsz=128, dynamic=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    for size in (64, 160):  # anchors: (16^2 + 8^2 + 4^2) = 336 and (40^2 + 20^2 + 10^2) = 2100
        x = np.random.default_rng(size).random((2, 3, size, size), dtype=np.float32)
        (out,) = session.run(None, {session.get_inputs()[0].name: x})
        with torch.no_grad():
            ref = pyrafan_n(torch.from_numpy(x))[0].numpy()
        assert out.shape == ref.shape == (2, 4 + NC, {64: 336, 160: 2100}[size])
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)


# --- PyraFAN v2 ----------------------------------------------------------------------------------


def test_learned_gate_starts_as_the_identity_and_scales_by_twice_its_sigmoid():
    """W = 0, b = 0: 2 sigmoid(0) = 1 on every channel; b = log 3: 2 sigmoid(log 3) = 2 * 3/4 = 1.5."""
    gate = LearnedGate(4)
    x = torch.randn(2, 4, 5, 5, generator=GEN)

    same = gate(x)
    with torch.no_grad():
        gate.fc.bias.fill_(math.log(3))
    scaled = gate(x)

    torch.testing.assert_close(same, x)
    torch.testing.assert_close(scaled, 1.5 * x)


def test_residual_fusion_adds_the_own_level_to_v1s_mean_at_init():
    """Zero logits: F_3 = Z_3 + (Z_2 + Z_3 + Z_4) / 3."""
    fusion = ResidualFusion((8, 16, 32), 8, target=1)
    xs = _levels()

    z = fusion.aligned(xs)

    torch.testing.assert_close(fusion(xs), z[1] + (z[0] + z[1] + z[2]) / 3)


def test_v2_feeds_the_fused_maps_to_detects_own_branches():
    torch.manual_seed(0)
    head = PyraFANv2(nc=3, r=4, reg_max=16, ch=(8, 16, 32)).train()
    head.stride = torch.tensor([4.0, 8.0, 16.0])
    xs = _levels(size=64)

    preds = head(xs)
    fused = head.head_inputs(xs)

    # C = 32, r = 4: 8 channels per level; Detect's cv2/cv3 on them: 16 x 16 + 8 x 8 + 4 x 4 anchors
    assert [f.shape[1] for f in fused] == [8, 8, 8] and len(head.cv2) == len(head.cv3) == 3
    assert preds["boxes"].shape == (2, 64, 336) and preds["scores"].shape == (2, 3, 336)
    torch.testing.assert_close(preds["scores"], torch.cat([head.cv3[i](f).flatten(2) for i, f in enumerate(fused)], 2))
    with pytest.raises(ValueError, match=r"r=3 must be >= 1 and divide C = max\(ch\) = 32"):
        PyraFANv2(nc=3, r=3, ch=(8, 16, 32))


@pytest.mark.parametrize("arch, end2end, strides", [("yolo11n-pyrafan2", False, [4, 8, 16]),
                                                      ("yolo26n-pyrafan2", True, [4, 8, 16])])
def test_v2_models_build_on_yolo11_and_yolo26_and_export_to_onnx(arch, end2end, strides, tmp_path):
    """YOLO26's v2 has the one-to-one branch: its ONNX output is (1, 300, 6) decided boxes, no NMS."""
    import onnxruntime as ort

    model = yolo.build_model(arch, nc=NC, seed=0)
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    for module in model.modules():  # BatchNorm statistics of this input (one pass), so features are not ~0
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.from_numpy(x))
    model.eval()
    reference = copy.deepcopy(model)
    reference.model[-1].end2end = end2end  # torch through the branch the export runs
    with torch.no_grad():
        ref = reference(torch.from_numpy(x))[0].numpy()

    path = yolo.export_onnx(model, tmp_path / f"{arch}.onnx", imgsz=128)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})

    assert isinstance(model.model[-1], PyraFANv2) and model.stride.tolist() == strides
    assert yolo.is_end2end(model) is end2end
    assert out.shape == ref.shape == ((1, 300, 6) if end2end else (1, 4 + NC, 32 * 32 + 16 * 16 + 8 * 8))
    # BatchNorm folded for the export: boxes of up to ~250 px agree within 0.05 px, scores within 1e-4
    if not end2end:
        np.testing.assert_allclose(out, ref, atol=0.05, rtol=1e-4)
        return
    # near-tied scores may come out in another order: every row clearly inside the top 300 has its twin
    sure = ref[0][ref[0, :, 4] > ref[0, -1, 4] + 1e-4]
    assert len(sure) > 100 and all(np.abs(out[0] - row).max(axis=1).min() < 0.05 for row in sure)


def test_adapter_trains_yolo26_pyrafan2_with_the_end_to_end_loss(tmp_path):
    data = _tiny_dataset(tmp_path)
    model = yolo.build_model("yolo26n-pyrafan2", nc=2, seed=0, names=["white", "red"])
    before = yolo.state_dict(model)

    res = yolo.train(model, data, epochs=2, imgsz=128, batch=2, warmup_iters=2, mosaic=0.0, progress=False)
    ev = yolo.evaluate(model, data, split="val", imgsz=128, batch=2)

    changed = [k for k, v in yolo.state_dict(model).items() if not torch.equal(before[k], v)]
    assert set(res.loss_items) == {"box_loss", "cls_loss", "l1_loss"} and math.isfinite(res.loss)
    assert any(".fusion." in k for k in changed) and any(".gate." in k for k in changed)
    assert any(".one2one_cv3." in k for k in changed) and ev.images == 4 and 0.0 <= ev.map50 <= 1.0
