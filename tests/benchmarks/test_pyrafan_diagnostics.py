"""The PyraFAN diagnostics read the gate and the fusion weights the model really uses."""

import pytest
import torch

from benchmarks.pyrafan_diagnostics import diagnose
from common import yolo


def test_diagnose_fresh_pyrafan_has_uniform_fusion_and_sigmoid_gate():
    """Fusion logits start at zero: every level weighs 1/3; the gate is sigmoid(mean) in (0, 1)."""
    model = yolo.build_model("yolo11n-pyrafan", nc=3, seed=0).eval()
    torch.manual_seed(0)

    out = diagnose(model, torch.rand(2, 3, 64, 64))

    assert set(out["fusion"]) == {"F3", "F4"}
    for weights in out["fusion"].values():
        assert list(weights) == ["X2", "X3", "X4"]
        assert list(weights.values()) == pytest.approx([1 / 3] * 3)
    assert 0 < out["gate_min"] <= out["gate_mean"] <= out["gate_max"] < 1
