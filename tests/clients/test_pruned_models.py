"""A pruned checkpoint (``python -m common.prune``) loads in the edge runtime and the cloud service.

Both load weights only through :func:`common.yolo.load_weights`, which rebuilds a pruned
model's widths from the stored shapes (the adapter's loader); this checks that neither
builds a fresh architecture of its own and strict-loads into it.
"""

from __future__ import annotations

import numpy as np
import pytest

from common import yolo

NAMES = ["insulator", "bird_nest", "damper", "bolt", "crack", "rust", "vehicle", "person"]


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    from common import prune

    model = yolo.build_model("yolo11n", len(NAMES), seed=0, names=NAMES)
    groups = prune.find_groups(model)
    group = next(g for g in groups if not g.frozen and g.tie is None)  # the first group cut alone: half of it kept
    prune.apply_pruning(model, groups, {group.name: range(group.size // 2)})
    kept = {group.name: group.size // 2}
    return prune.save_pruned(model, tmp_path_factory.mktemp("pruned") / "pruned.pt", kept), model


def test_the_edge_runtime_and_the_cloud_service_load_a_pruned_checkpoint(pruned_file):
    from clients.detector import EdgeModel, TorchPredictor
    from server.cloud import YoloDetector

    path, pruned = pruned_file
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    reference = TorchPredictor(pruned.eval(), imgsz=128, conf=0.001)(image)

    edge = EdgeModel(path, imgsz=128, conf=0.001, reload_every=0).predictor(image)
    cloud = YoloDetector.from_file(path, imgsz=128, conf=0.001)([image])[0]

    assert len(reference) > 0
    assert np.allclose(edge.xyxy, reference.xyxy, atol=1e-3) and edge.cls.tolist() == reference.cls.tolist()
    assert len(cloud) > 0 and cloud.xyxy.shape[1] == 4
