"""Entropy channel filtering (``common/prune.py``): the estimator, the channel surgery and the saved format.

The entropy estimator on hand-worked inputs; the channel surgery against an oracle
(channels made exactly zero beforehand must be removable without changing any
output); parameter counts by hand; save/load and ONNX round trips of a pruned model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from copy import deepcopy

import numpy as np
import pytest
import torch
from torch import nn
from ultralytics.nn.modules.conv import Conv

from common import prune, yolo

NC = 8
torch.set_num_threads(1)


def channel_entropy(x: torch.Tensor, bins: int, shared_range: bool = True) -> torch.Tensor:
    """:class:`prune.EntropyMeter` over ``x`` in one batch (both passes)."""
    meter = prune.EntropyMeter(x.shape[1], bins, shared_range)
    meter.update(x)
    meter.start_counting()
    meter.update(x)
    return meter.entropy()


def zero_channels(model: nn.Module, group: prune.ChannelGroup, channels: Sequence[int]) -> None:
    """Make ``channels`` of ``group`` exactly 0 everywhere (BN gamma = beta = 0 on every producer and pass-through).

    With SiLU(0) = 0, zero channels contribute nothing downstream, so cutting them
    must leave the model's output unchanged: the oracle for :func:`common.prune.apply_pruning`.
    """
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    with torch.no_grad():
        for path, offset in group.producers:
            bn = model.get_submodule(path).bn
            bn.weight[idx + offset] = 0.0
            bn.bias[idx + offset] = 0.0
        for path in group.passthrough:
            bn = model.get_submodule(path).bn
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their (0, 1) init, so outputs are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model


def _random_half(groups, seed: int = 0) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per prunable group: (kept, dropped) channels, about half each, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    keep, drop = {}, {}
    for grp in groups:
        if grp.frozen:
            continue
        perm = torch.randperm(grp.size, generator=g).tolist()
        k = max(1, grp.size // 2)
        keep[grp.name], drop[grp.name] = sorted(perm[:k]), sorted(perm[k:])
    return keep, drop


@pytest.fixture(scope="module")
def yolo11n() -> nn.Module:
    return _randomise_bn(yolo.build_model("yolo11n", nc=NC, seed=0)).eval()


@pytest.fixture(scope="module")
def pruned11n(yolo11n) -> nn.Module:
    """yolo11n with about half of every prunable group cut (random channels)."""
    model = deepcopy(yolo11n)
    groups = prune.find_groups(model)
    keep, _ = _random_half(groups, seed=1)
    return prune.apply_pruning(model, groups, keep).eval()


# --------------------------------------------------------------------------- entropy estimator


def test_entropy_hand_values_shared_range():
    # Prepare: columns are channels; the layer's range is [-1, 7], 8 bins of width 1
    constant = [2.5, 2.5, 2.5, 2.5]  # bin 3 only -> 0
    two_values = [-1.0, 7.0, -1.0, 7.0]  # bins 0 and 7, equally often -> ln 2
    worked = [0.0, 0.0, 1.0, 3.0]  # bins 1, 1, 2, 4: counts [2, 1, 1] -> 1.5 ln 2
    faint = [0.0, 0.1, 0.0, 0.1]  # bin 1 only -> 0 (ln 2 on its own range)
    x = torch.tensor([constant, two_values, worked, faint]).T  # (N=4, C=4)

    # Execute
    shared = channel_entropy(x, bins=8)
    own = channel_entropy(x, bins=8, shared_range=False)

    # Assert
    np.testing.assert_allclose(shared.numpy(), [0.0, math.log(2), 1.5 * math.log(2), 0.0], atol=1e-12)
    # own range: [0, 3] in 8 bins of 3/8 puts 0, 0, 1, 3 in bins 0, 0, 2, 7 -> 1.5 ln 2 as well
    np.testing.assert_allclose(own.numpy(), [0.0, math.log(2), 1.5 * math.log(2), math.log(2)], atol=1e-12)


def test_entropy_two_values_is_log_2_whatever_the_bins():
    x = torch.tensor([[-1.0], [7.0], [-1.0], [7.0]])

    for bins in (2, 3, 32):
        assert channel_entropy(x, bins=bins).item() == pytest.approx(math.log(2), abs=1e-12)


def test_entropy_uniform_over_all_bins_is_log_bins():
    x = torch.arange(8, dtype=torch.float32).repeat(5)[:, None]  # 0..7, five times each: 8 bins of 1 value

    assert channel_entropy(x, bins=8).item() == pytest.approx(math.log(8), abs=1e-12)
    # 4 bins: two values per bin, still uniform
    assert channel_entropy(x, bins=4).item() == pytest.approx(math.log(4), abs=1e-12)


def test_entropy_from_counts_worked_example_and_empty_bins():
    h = prune.entropy_from_counts(torch.tensor([[2, 1, 1, 0], [0, 0, 9, 0]]))

    np.testing.assert_allclose(h.numpy(), [1.5 * math.log(2), 0.0], atol=1e-12)


def test_entropy_of_maps_equals_entropy_of_samples():
    maps = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    samples = maps.permute(0, 2, 3, 1).reshape(-1, 3)  # (B*H*W, C)

    np.testing.assert_allclose(channel_entropy(maps, bins=6).numpy(),
                               channel_entropy(samples, bins=6).numpy(), atol=0)


def test_entropy_meter_batches_equal_one_batch():
    # Prepare: 3 batches of maps, one channel constant
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 4, 3, 3, generator=g) * torch.tensor([1.0, 5.0, 0.01, 0.0])[None, :, None, None]
               for _ in range(3)]
    meter = prune.EntropyMeter(4, bins=16)

    # Execute
    for b in batches:
        meter.update(b)
    meter.start_counting()
    for b in batches:
        meter.update(b)

    # Assert: the same as on all the data at once; the constant channel has 0
    expected = channel_entropy(torch.cat(batches), bins=16)
    np.testing.assert_allclose(meter.entropy().numpy(), expected.numpy(), atol=1e-12)
    assert meter.entropy()[3].item() == 0.0
    # shared bins: the faint channel (x 0.01) lands in at most 2 of the 16 bins, the wide one spreads
    assert meter.entropy()[2].item() <= math.log(2) < meter.entropy()[1].item()


def test_entropy_meter_without_data_says_which_pass():
    meter = prune.EntropyMeter(3)
    with pytest.raises(RuntimeError, match="pass 1 saw no data"):
        meter.start_counting()
    meter.update(torch.zeros(2, 3))
    meter.start_counting()
    with pytest.raises(RuntimeError, match="pass 2 saw no data"):
        meter.entropy()


def test_select_channels_keeps_highest_entropy_in_order():
    group = prune.ChannelGroup(name="g", size=4)
    entropy = {"g": torch.tensor([0.1, 0.9, 0.5, 0.7])}

    # keep_fraction 0.5 -> 2 channels: the two highest, 0.9 (1) and 0.7 (3), ascending
    assert prune.select_channels(entropy, [group], 0.5) == {"g": [1, 3]}
    # ties go to the lower index; min_channels wins over a tiny fraction
    assert prune.select_channels({"g": torch.zeros(4)}, [group], 0.01, min_channels=2) == {"g": [0, 1]}
    # frozen groups are never selected
    assert prune.select_channels(entropy, [prune.ChannelGroup("g", 4, frozen=True)], 0.5) == {}


# --------------------------------------------------------------------------- surgery on a conv pair


class _Pair(nn.Module):
    """conv-bn-SiLU (3 -> 6, 3x3) then conv-bn-SiLU (6 -> 4, 1x1)."""

    def __init__(self):
        super().__init__()
        self.a = Conv(3, 6, 3)
        self.b = Conv(6, 4, 1)

    def forward(self, x):
        return self.b(self.a(x))


def _pair_and_group():
    torch.manual_seed(0)
    pair = _randomise_bn(_Pair()).eval()
    group = prune.ChannelGroup(name="a", size=6, producers=[("a", 0)], consumers=[("b.conv", 0)],
                               signals=[("a", 0)])
    return pair, group


def test_pruned_pair_keeps_the_kept_channels_and_matches_a_zeroed_original():
    # Prepare
    pair, group = _pair_and_group()
    keep, drop = [0, 2, 3, 5], [1, 4]
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a_before = pair.a(x)  # (2, 6, 8, 8)
    zeroed = deepcopy(pair)
    zero_channels(zeroed, group, drop)
    with torch.no_grad():
        ref = zeroed(x)

    # Execute
    pruned = prune.apply_pruning(deepcopy(pair), [group], {"a": keep})
    with torch.no_grad():
        a_after, out = pruned.a(x), pruned(x)

    # Assert: the producer's output is the original's, restricted to the kept channels ...
    assert a_after.shape == (2, 4, 8, 8)
    torch.testing.assert_close(a_after, a_before[:, keep], atol=1e-6, rtol=0)
    # ... and the pair's output is the original's with the dropped channels zeroed
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(out, pair(x), atol=1e-3)  # the dropped channels did matter


def test_constant_channels_dropped_with_mean_compensation_leave_the_output_unchanged():
    # Prepare: channels 1 and 4 of the producer are constant, SiLU(0.7) and SiLU(-1.3) (BN gamma = 0)
    pair, group = _pair_and_group()
    with torch.no_grad():
        pair.a.bn.weight[[1, 4]] = 0.0
        pair.a.bn.bias[[1, 4]] = torch.tensor([0.7, -1.3])
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pair(x)

    # Execute
    cal = prune.calibrate(pair, [group], [x], bins=32)
    compensated = prune.apply_pruning(deepcopy(pair), [group], {"a": [0, 2, 3, 5]}, cal.input_mean)
    plain = prune.apply_pruning(deepcopy(pair), [group], {"a": [0, 2, 3, 5]})

    # Assert: constant channels have no entropy; their means (SiLU(b) = b * sigmoid(b)) move into b's BN
    assert cal.entropy["a"][[1, 4]].tolist() == [0.0, 0.0] and (cal.entropy["a"][[0, 2, 3, 5]] > 0).all()
    silu = [0.7 / (1 + math.exp(-0.7)), -1.3 / (1 + math.exp(1.3))]  # 0.4678, -0.2785
    np.testing.assert_allclose(cal.input_mean["b.conv"][[1, 4]].numpy(), silu, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compensated(x), ref, atol=1e-5, rtol=0)  # 1x1 consumer: no border effect
        assert not torch.allclose(plain(x), ref, atol=1e-3)


def test_pruned_pair_parameter_count_by_hand():
    pair, group = _pair_and_group()
    # before: a = 6*3*3*3 + 2*6 (BN) = 174; b = 4*6*1*1 + 2*4 = 32 -> 206
    assert yolo.count_parameters(pair) == 206

    prune.apply_pruning(pair, [group], {"a": [0, 2, 3, 5]})

    # after: a = 4*3*3*3 + 2*4 = 116; b = 4*4 + 2*4 = 24 -> 140
    assert yolo.count_parameters(pair) == 140
    assert (pair.a.conv.out_channels, pair.a.bn.num_features, pair.b.conv.in_channels) == (4, 4, 4)
    assert tuple(pair.a.bn.running_mean.shape) == (4,)


def test_apply_pruning_names_bad_requests():
    pair, group = _pair_and_group()
    with pytest.raises(prune.PruneError, match="unknown channel group 'nope'"):
        prune.apply_pruning(pair, [group], {"nope": [0]})
    with pytest.raises(prune.PruneError, match=r"in \[0, 6\)"):
        prune.apply_pruning(pair, [group], {"a": [0, 6]})
    with pytest.raises(prune.PruneError, match="frozen"):
        prune.apply_pruning(pair, [prune.ChannelGroup("a", 6, frozen=True)], {"a": [0]})


# --------------------------------------------------------------------------- whole models


def _head_outputs(model, x) -> torch.Tensor:
    """Every branch's raw boxes and class logits, (B, C, anchors): both branches of an end-to-end head."""
    raw = model(x)[1]
    branches = [raw["one2many"], raw["one2one"]] if "one2one" in raw else [raw]
    return torch.cat([torch.cat([b["boxes"], b["scores"]], 1) for b in branches], 1)


@pytest.mark.parametrize("arch", ["yolo11n", "yolo11n-pyrafan", "yolo26n", "yolo26n-p2"])
def test_cutting_zeroed_channels_leaves_the_model_output_unchanged(arch):
    # Prepare: about half of every prunable group made exactly 0 (BN gamma = beta = 0; SiLU(0) = 0).
    # float64, so that the only difference could come from the surgery, not from summation order.
    model = _randomise_bn(yolo.build_model(arch, nc=NC, seed=0)).double().eval()
    groups = prune.find_groups(model)
    keep, drop = _random_half(groups, seed=2)
    for grp in groups:
        if grp.name in drop:
            zero_channels(model, grp, drop[grp.name])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)[0]  # (2, 4 + nc, anchors): decoded boxes and class scores
        ref_raw = _head_outputs(model, x)

    # Execute
    pruned = prune.apply_pruning(deepcopy(model), groups, keep)
    with torch.no_grad():
        out = pruned(x)[0]
        out_raw = _head_outputs(pruned, x)

    # Assert
    assert out.shape == ref.shape and out_raw.shape == ref_raw.shape
    assert (out - ref).abs().max().item() < 1e-5 and (out_raw - ref_raw).abs().max().item() < 1e-5
    assert yolo.count_parameters(pruned) < 0.45 * yolo.count_parameters(model)  # half the channels: ~1/4 of most convs


def test_yolo11n_groups_cover_the_network():
    model = yolo.build_model("yolo11n", nc=NC)

    groups = {g.name: g for g in prune.find_groups(model)}

    assert not any(g.frozen for g in groups.values())
    # a C2f's halves are tied; the second half runs through the residual bottleneck
    assert groups["model.2.cv1[0]"].tie == groups["model.2.cv1[1]"].tie == "model.2"
    assert groups["model.2.cv1[1]"].producers == [("model.2.cv1", 16), ("model.2.m.0.cv2", 0)]
    # SPPF cv1 is read four times by cv2 (x and three poolings)
    assert groups["model.9.cv1"].consumers == [("model.9.cv2.conv", 128 * k) for k in range(4)]
    # P3 (layer 16) feeds layer 17 and the Detect head, through the class branch's depthwise conv
    assert groups["model.16.cv2"].passthrough == ["model.23.cv3.0.0.0"]
    # the backbone's P4 is concatenated after the upsampled P5 (256 channels) in layer 12
    assert ("model.13.cv1.conv", 256) in groups["model.6.cv2"].consumers


def test_pyrafan_inputs_are_frozen_the_rest_is_not():
    groups = prune.find_groups(yolo.build_model("yolo11n-pyrafan", nc=NC))

    frozen = sorted(g.name for g in groups if g.frozen)

    assert frozen == ["model.19.cv2", "model.22.cv2", "model.25.cv2"]  # X2, X3, X4 feed PyraFAN's fusion


def test_yolo26n_groups_reach_both_branches_of_its_end_to_end_head():
    groups = {g.name: g for g in prune.find_groups(yolo.build_model("yolo26n", nc=NC))}

    # P3 (layer 16) feeds layer 17 and both head branches, each through its class branch's depthwise conv
    assert groups["model.16.cv2"].passthrough == ["model.23.cv3.0.0.0", "model.23.one2one_cv3.0.0.0"]
    assert {"model.23.cv2.0.0.conv", "model.23.one2one_cv2.0.0.conv"} <= {c for c, _ in groups["model.16.cv2"].consumers}
    assert "model.23.one2one_cv2.0.0" in groups and "model.23.one2one_cv3.0.1.1" in groups
    # left alone: the attention C3k2 of P5 (its halves) and the output read by the residual SPPF
    assert sorted(g for g in groups if groups[g].frozen) == ["model.22.cv1[0]", "model.22.cv1[1]", "model.8.cv2"]


def test_pruned_checkpoint_loads_with_the_plain_loader_and_exports(tmp_path, pruned11n):
    import onnxruntime as ort

    # Prepare: a file as ``python -m common.prune`` writes it
    kept = {g.name: g.size for g in prune.find_groups(pruned11n)}  # every group at its pruned width
    original = {g.name: g.size for g in prune.find_groups(yolo.build_model("yolo11n", nc=NC))}
    kept = {name: k for name, k in kept.items() if k != original[name]}
    x = np.random.default_rng(4).random((1, 3, 64, 64), dtype=np.float32)
    path = prune.save_pruned(pruned11n, tmp_path / "pruned.pt", kept, note="test")

    # Execute: the loader every caller uses rebuilds the pruned widths from the stored shapes
    loaded = yolo.load_weights(path).eval()
    onnx = yolo.export_onnx(loaded, tmp_path / "pruned.onnx", imgsz=64)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})

    # Assert
    assert yolo.count_parameters(loaded) == yolo.count_parameters(pruned11n) < yolo.count_parameters(
        yolo.build_model("yolo11n", nc=NC))
    with torch.no_grad():
        ref = pruned11n(torch.from_numpy(x))[0]
        assert torch.equal(loaded(torch.from_numpy(x))[0], ref)
    assert loaded.cedar_meta["pruned_channels"] == kept and loaded.cedar_meta["note"] == "test"
    assert out.shape == tuple(ref.shape) == (1, 4 + NC, 8 * 8 + 4 * 4 + 2 * 2)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-5)
    with pytest.raises(yolo.ModelError, match="wrong shape"):  # into a given full-width model: strict
        yolo.load_weights(path, model=yolo.build_model("yolo11n", nc=NC))


def test_pruned_yolo26n_loads_and_exports_its_one_to_one_head(tmp_path):
    import onnxruntime as ort

    # Prepare: about half of every prunable group cut, saved as the CLI saves it
    model = _randomise_bn(yolo.build_model("yolo26n", nc=NC, seed=0)).eval()
    with torch.no_grad():  # spread the class scores: fewer near-ties in the head's top-k
        for seq in model.model[-1].one2one_cv3:
            seq[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
            seq[-1].bias.fill_(-2.0)
    full = yolo.count_parameters(model)
    groups = prune.find_groups(model)
    keep, _ = _random_half(groups, seed=1)
    pruned = prune.apply_pruning(model, groups, keep).eval()
    path = prune.save_pruned(pruned, tmp_path / "pruned.pt", {name: len(k) for name, k in keep.items()})
    x = np.random.default_rng(4).random((1, 3, 128, 128), dtype=np.float32)

    # Execute
    loaded = yolo.load_weights(path).eval()
    onnx = yolo.export_onnx(loaded, tmp_path / "pruned.onnx", imgsz=128)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})

    # Assert: the export is the NMS-free head's decided boxes, as the pruned model gives them
    assert yolo.count_parameters(loaded) == yolo.count_parameters(pruned) < 0.45 * full
    reference = deepcopy(pruned)
    reference.end2end = True
    with torch.no_grad():
        ref = reference(torch.from_numpy(x))[0].numpy()
    assert out.shape == ref.shape == (1, 300, 6)
    # near-tied scores may come out in another order: every row clearly inside the top 300 has its twin
    sure = ref[0][ref[0, :, 4] > ref[0, -1, 4] + 1e-4]
    twins = [np.abs(out[0] - row).max(axis=1).min() < 1e-3 for row in sure]
    assert len(sure) > 100 and all(twins)


def test_pruned_pyrafan_checkpoint_loads(tmp_path):
    # Prepare: yolo11n-pyrafan with half of every prunable group cut
    model = _randomise_bn(yolo.build_model("yolo11n-pyrafan", nc=NC, seed=0)).eval()
    groups = prune.find_groups(model)
    prune.apply_pruning(model, groups, _random_half(groups, seed=2)[0])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))

    # Execute
    loaded = yolo.load_weights(prune.save_pruned(model, tmp_path / "pf.pt", {})).eval()

    # Assert
    assert yolo.count_parameters(loaded) == yolo.count_parameters(model)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_inconsistent_pruned_widths_are_refused_with_the_reason(tmp_path, pruned11n):
    # Prepare: one conv reads fewer channels than its producer writes; another changes its kernel size
    weights = yolo.state_dict(pruned11n)
    broken = dict(weights)
    broken["model.1.conv.weight"] = weights["model.1.conv.weight"][:, :-1]
    torch.save({"arch": "yolo11n", "nc": NC, "names": {}, "meta": {}, "state_dict": broken}, tmp_path / "b.pt")
    kernel = dict(weights)
    kernel["model.1.conv.weight"] = weights["model.1.conv.weight"][:, :, :1, :1]
    torch.save({"arch": "yolo11n", "nc": NC, "names": {}, "meta": {}, "state_dict": kernel}, tmp_path / "k.pt")

    # Execute / Assert
    with pytest.raises(yolo.ModelError, match="do not form a working 'yolo11n' network"):
        yolo.load_weights(tmp_path / "b.pt")
    with pytest.raises(yolo.ModelError, match=r"model\.1\.conv\.weight has shape .*only channel counts"):
        yolo.load_weights(tmp_path / "k.pt")


# --------------------------------------------------------------------------- scoring and the ratio


def test_dead_channel_has_zero_entropy_and_is_cut_first(yolo11n):
    # Prepare: channel 5 of layer 1's output (32 channels, 16 x 16 at 64 px) made constant (0)
    model = deepcopy(yolo11n)
    groups = prune.find_groups(model)
    group = next(g for g in groups if g.name == "model.1")
    zero_channels(model, group, [5])
    images = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))]

    # Execute
    entropy = prune.calibrate(model, [group], images, bins=16).entropy

    # Assert: 512 samples per channel; only the dead one scores 0, and it is the first to go
    h = entropy["model.1"]
    assert h.shape == (32,) and h[5].item() == 0.0 and (h[torch.arange(32) != 5] > 0).all()
    assert prune.select_channels(entropy, [group], 31 / 32)["model.1"] == [c for c in range(32) if c != 5]


def test_prune_to_ratio_reaches_the_target(yolo11n):
    model = deepcopy(yolo11n)

    report = prune.prune_to_ratio(model, 0.7, entropy={})

    assert report.params_before == 2_591_400 == yolo.count_parameters(yolo11n)  # YOLO11n, nc = 8
    assert report.params_after == yolo.count_parameters(model)
    assert 0.70 <= report.ratio_achieved < 0.71
    assert report.groups_pruned > 0 and report.groups_frozen == 0


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_prune_to_ratio_outside_the_open_interval_is_named(yolo11n, ratio):
    with pytest.raises(prune.PruneError, match=rf"ratio={ratio}: .* must be in \(0, 1\)"):
        prune.prune_to_ratio(deepcopy(yolo11n), ratio, entropy={})


def test_prune_to_ratio_beyond_reach_says_how_far_it_can_go(yolo11n):
    with pytest.raises(prune.PruneError, match=r"ratio=0.995: at most 0.9\d\d"):
        prune.prune_to_ratio(deepcopy(yolo11n), 0.995, entropy={})


def test_calibration_batches_are_letterboxed_unit_images(tiny_benchmark):
    batches = list(prune.calibration_batches(tiny_benchmark.site_data(0), imgsz=64, max_images=5, batch=2))

    assert [tuple(b.shape) for b in batches] == [(2, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]
    assert all(0.0 <= b.min() and b.max() <= 1.0 for b in batches)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("ratio", ["1.5", "0"])
def test_cli_names_a_bad_ratio(tmp_path, capsys, ratio):
    with pytest.raises(SystemExit):
        prune.main(["--weights", "x.pt", "--data", "d.yaml", "--ratio", ratio, "--out", str(tmp_path / "o.pt")])
    assert f"--ratio {float(ratio)}: " in capsys.readouterr().err


def test_cli_names_a_missing_file(tmp_path, capsys, tiny_benchmark):
    with pytest.raises(SystemExit):
        prune.main(["--weights", str(tmp_path / "nope.pt"), "--data", str(tiny_benchmark.site_data(0)),
                    "--ratio", "0.5", "--out", str(tmp_path / "o.pt")])
    assert f"--weights {tmp_path / 'nope.pt'}: file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compresses_fine_tunes_saves_and_exports(tmp_path, tiny_benchmark, yolo11n):
    # Prepare
    src = yolo.save_weights(yolo11n, tmp_path / "site.pt")
    out, onnx = tmp_path / "small.pt", tmp_path / "small.onnx"

    # Execute: the fine-tune runs common.yolo.train on the pruned model
    rc = prune.main(["--weights", str(src), "--data", str(tiny_benchmark.site_data(0)), "--ratio", "0.7",
                     "--epochs", "1", "--imgsz", "64", "--batch", "4", "--calib-images", "4",
                     "--out", str(out), "--onnx", str(onnx)])

    # Assert
    assert rc == 0 and out.is_file() and onnx.is_file()
    model = yolo.load_weights(out)
    meta = torch.load(out, weights_only=True)["meta"]
    assert yolo.count_parameters(model) == meta["params_after"] <= 0.3 * meta["params_before"] + 1
    assert meta["finetune_epochs"] == 1 and meta["pruned_channels"]
    res = yolo.evaluate(model, tiny_benchmark.site_data(0), imgsz=64, batch=4)
    assert 0.0 <= res.map50 <= 1.0


def test_parameter_count_without_cutting_equals_the_cut(yolo11n):
    groups = prune.find_groups(yolo11n)
    keep, _ = _random_half(groups, seed=6)

    predicted = prune._parameters_after(yolo11n, *prune._masks(yolo11n, groups, keep))

    assert predicted == yolo.count_parameters(prune.apply_pruning(deepcopy(yolo11n), groups, keep))


def test_grouped_convs_are_left_alone():
    # Prepare: a bottleneck whose cv2 is a grouped conv (g=2) cannot be cut by channel index alone
    from ultralytics.nn.modules.block import Bottleneck

    class _Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = Bottleneck(8, 8, g=2)
            self.model = []

        def forward(self, x):
            return self.b(x)

    # Execute
    groups = prune.find_groups(_Net())

    # Assert
    assert [(g.name, g.frozen) for g in groups] == [("b.cv1", True)]
