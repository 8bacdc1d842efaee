"""The graph's small-object class weights from the shared benchmark's labels (paper section 4.3, w_k)."""

from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from server.federation import _class_weights


def _dataset(root: Path, labels: dict[str, str]) -> Path:
    (root / "images" / "test").mkdir(parents=True)
    (root / "labels" / "test").mkdir(parents=True)
    for name, text in labels.items():
        (root / "images" / "test" / f"{name}.png").write_bytes(b"")
        (root / "labels" / "test" / f"{name}.txt").write_text(text)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/test\nval: images/test\ntest: images/test\nnc: 3\n"
                    "names: [a, b, c]\n")
    return data


def test_one_weight_per_class_from_small_shares(tmp_path):
    # Prepare: imgsz 100, small_px 16 -> small when max(w, h) * 100 < 16.
    # class 0: one large (0.5) -> s0 = 0; class 1: 0.1 small, 0.3 large -> s1 = 0.5; class 2: none -> s2 = 0;
    # an image without a label file counts nothing
    data = _dataset(tmp_path, {"x": "0 0.5 0.5 0.5 0.5\n1 0.5 0.5 0.1 0.05\n", "y": "1 0.2 0.2 0.3 0.1\n"})
    (tmp_path / "images" / "test" / "z.png").write_bytes(b"")
    cfg = load_config("quick", {"kd.class-weights": "small", "train.imgsz": 100, "eval.small-px": 16})

    # Execute
    weights = _class_weights(cfg, data, nc=3)

    # Assert: 1 + s = [1, 1.5, 1], mean 7/6 -> [6/7, 9/7, 6/7]: n weights, the mAP column is build_graph's
    np.testing.assert_allclose(weights, [6 / 7, 9 / 7, 6 / 7])


def test_ones_means_no_weights(tmp_path):
    cfg = load_config("quick", {"kd.class-weights": "ones"})
    assert _class_weights(cfg, tmp_path / "missing.yaml", nc=3) is None


def test_a_broken_label_line_names_the_file(tmp_path):
    data = _dataset(tmp_path, {"x": "0 0.5 0.5\n"})
    cfg = load_config("quick", {"kd.class-weights": "small"})
    with pytest.raises(ValueError, match="x.txt:1"):
        _class_weights(cfg, data, nc=3)
