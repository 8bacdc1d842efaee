"""The server's models (server/models.py): the cache of trained base/cloud models, ``model.*-init``, the closed loop.

Trained on the tiny benchmark at 128 px for 1 epoch (a few seconds); values are checked against the files
written (tensor equality), not just that something ran.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch

from common import yolo
from common.config import ConfigError, load_config
from common.sites import class_names, public_data
from server import models as M


@pytest.fixture
def cfg_of(tiny_overrides, tmp_path):
    """A config over the tiny benchmark, with its own model cache (``data.cache-dir`` is shared)."""

    def make(**extra):
        return load_config("quick", {**tiny_overrides, "model.base-epochs": 1, "model.cloud-epochs": 1,
                                     "model.cloud": "yolo11n", "output-dir": str(tmp_path / "out"), **extra})

    return make


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(M, "cache_root", lambda cfg: tmp_path / "models")
    return tmp_path / "models"


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_key_changes_with_what_determines_the_model(cfg_of):
    cfg = cfg_of()
    base = M.Recipe.from_config(cfg, "yolo11n", 5)

    # Assert: equal recipes share a key; each field that shapes the model gives another one
    assert M.Recipe.from_config(cfg, "yolo11n", 5).key() == base.key()
    others = [M.Recipe.from_config(cfg, "yolo11s", 5), M.Recipe.from_config(cfg, "yolo11n", 6),
              M.Recipe.from_config(cfg_of(seed=1), "yolo11n", 5),
              M.Recipe.from_config(cfg_of(**{"train.imgsz": 160}), "yolo11n", 5),
              M.Recipe.from_config(cfg_of(**{"data.seed": 3}), "yolo11n", 5)]  # another benchmark
    keys = {r.key() for r in others}
    assert len(keys) == len(others) and base.key() not in keys
    assert base.data_key.startswith("builtin-") and len(base.key()) == 12


@pytest.mark.slow
def test_trained_model_is_cached_and_reused(cfg_of, tmp_path, caplog):
    cfg = cfg_of()
    data = public_data(cfg)
    names = class_names(data)
    recipe = M.Recipe.from_config(cfg, "yolo11n", 1)

    # Execute: twice
    with caplog.at_level(logging.INFO, logger="server.models"):
        first = M.trained("base", recipe, data, names, tmp_path / "models")
        stamp = first.stat().st_mtime_ns
        second = M.trained("base", recipe, data, names, tmp_path / "models")
        cloud = M.trained("cloud", recipe, data, names, tmp_path / "models")

    # Assert: one training, then the same file from the cache (not rewritten), named in the log; a cloud model of
    # the same recipe is that file too
    assert first == second == cloud == tmp_path / "models" / f"yolo11n-{recipe.key()}" / "model.pt"
    assert second.stat().st_mtime_ns == stamp
    messages = [r.getMessage() for r in caplog.records]
    assert sum("trained 1 epochs" in m for m in messages) == 1
    assert messages[-2:] == [f"base model: loaded from cache {first}", f"cloud model: loaded from cache {first}"]
    blob = torch.load(first, weights_only=True)
    assert blob["meta"]["epochs"] == 1 and blob["meta"]["recipe"]["arch"] == "yolo11n" and blob["nc"] == len(names)


@pytest.mark.slow
def test_base_arrays_are_the_cached_base_model(cfg_of, own_cache):
    cfg = cfg_of()
    data = public_data(cfg)

    # Execute
    arrays = M.base_arrays(cfg, data, class_names(data))

    # Assert: the record holds exactly the cached file's tensors
    (path,) = own_cache.glob("yolo11n-*/model.pt")
    assert _equal(arrays.to_torch_state_dict(), torch.load(path, weights_only=True)["state_dict"])


def test_scratch_needs_no_model(cfg_of):
    cfg = cfg_of(**{"model.edge-init": "scratch"})
    assert M.initial_model(cfg, "base", Path("unused.yaml"), ["a"]) == (None, "scratch")
    assert M.base_arrays(cfg, Path("unused.yaml"), ["a"]) is None


def test_init_from_a_cedar_weights_file(cfg_of, tmp_path):
    names = [str(i) for i in range(8)]
    saved = yolo.build_model("yolo11n", 8, seed=7, names=names)
    path = yolo.save_weights(saved, tmp_path / "mine.pt")
    cfg = cfg_of(**{"model.edge-init": str(path)})

    # Execute
    model, source = M.initial_model(cfg, "base", Path("unused.yaml"), names)

    # Assert: the file's tensors, not the seed-0 initialisation
    assert source == str(path)
    assert _equal(yolo.state_dict(model), yolo.state_dict(saved))


def test_init_from_a_checkpoint_of_another_class_count(cfg_of, tmp_path):
    coco = yolo.build_model("yolo11n", 80, seed=7)
    path = yolo.save_weights(coco, tmp_path / "coco.pt")
    names = [str(i) for i in range(8)]
    cfg = cfg_of(**{"model.edge-init": str(path)})

    # Execute
    model, _ = M.initial_model(cfg, "base", Path("unused.yaml"), names)

    # Assert: the backbone is the file's; the class convs keep the 8-class initialisation of build(seed=cfg.seed)
    mine, theirs, fresh = yolo.state_dict(model), yolo.state_dict(coco), yolo.state_dict(M.build("yolo11n", names, 0))
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith("model.0."))
    class_keys = [k for k in mine if k.startswith("model.23.cv3.")]
    assert class_keys and all(torch.equal(mine[k], fresh[k]) for k in class_keys)
    assert mine["model.23.cv3.0.2.weight"].shape[0] == 8 and theirs["model.23.cv3.0.2.weight"].shape[0] == 80


@pytest.mark.parametrize("key", ["edge-init", "cloud-init"])
def test_missing_checkpoint_names_the_key_and_the_path(cfg_of, tmp_path, key):
    missing = tmp_path / "nowhere" / "model.pt"
    cfg = cfg_of(**{f"model.{key}": str(missing)})  # loading the config works: sites never read the file
    role = "base" if key == "edge-init" else "cloud"
    with pytest.raises(ConfigError, match=rf"model\.{key.replace('-', '_')}=.*no such file {missing}"):
        M.initial_model(cfg, role, Path("unused.yaml"), ["a"])


def test_empty_init_is_a_config_error(cfg_of):
    with pytest.raises(ConfigError, match="model.edge_init=''"):
        cfg_of(**{"model.edge-init": ""})


def _add_hard_samples(store: Path, data_yaml: Path, n: int) -> None:
    """Copy ``n`` labelled public train images into a store laid out as server.cloud.HardSampleStore's."""
    images = sorted((data_yaml.parent / "images" / "train").glob("*.png"))[:n]
    (store / "images").mkdir(parents=True, exist_ok=True)
    (store / "labels").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        shutil.copy(img, store / "images" / f"site-0-{i}-{i:06d}.png")
        shutil.copy(data_yaml.parent / "labels" / "train" / f"{img.stem}.txt", store / "labels" / f"site-0-{i}-{i:06d}.txt")


@pytest.mark.slow
def test_cloud_model_is_fine_tuned_on_new_hard_samples_and_the_service_restarted(cfg_of, own_cache, tmp_path,
                                                                                  caplog):
    # Prepare: a cloud model, a service stand-in, an empty store
    cfg = cfg_of(**{"cloud.finetune-epochs": 1})
    data = public_data(cfg)
    cloud = M.CloudModel(cfg, data, class_names(data), tmp_path / "run")
    cloud.service = Mock(spec=["restart"])
    start = yolo.state_dict(cloud.model)

    # Execute / Assert: nothing in the store: no fine-tune, the model and the service untouched
    with caplog.at_level(logging.INFO, logger="server.models"):
        arrays, arch = cloud(2)
    assert arch == "yolo11n" and _equal(arrays.to_torch_state_dict(), start)
    cloud.service.restart.assert_not_called()
    assert cloud.path == tmp_path / "run" / "cloud" / "model.pt"

    # Execute: 3 hard samples arrive
    _add_hard_samples(cloud.store, data, 3)
    with caplog.at_level(logging.INFO, logger="server.models"):
        arrays, _ = cloud(3)

    # Assert: fine-tuned on them (new weights, saved, served), logged with the count; the next round without new
    # samples changes nothing
    assert cloud.path == tmp_path / "run" / "cloud" / "model-round-003.pt" and cloud.used == 3
    assert not _equal(arrays.to_torch_state_dict(), start)
    assert _equal(arrays.to_torch_state_dict(), torch.load(cloud.path, weights_only=True)["state_dict"])
    cloud.service.restart.assert_called_once_with(cloud.path)
    assert any("+ 3 hard samples (3 new)" in r.getMessage() for r in caplog.records)
    assert cloud.refresh(4) is False and cloud.service.restart.call_count == 1
    assert M.hard_sample_count(cloud.store) == 3


@pytest.mark.parametrize("key", ["model.base-epochs", "model.cloud-epochs", "cloud.finetune-epochs"])
def test_negative_epochs_are_a_config_error(cfg_of, key):
    with pytest.raises(ConfigError, match=rf"{key.replace('-', '_')}=-1: must be >= 0"):
        cfg_of(**{key: -1})


def test_defaults_start_sites_from_the_base_model_and_serve_the_cloud():
    cfg = load_config("quick")
    assert (cfg.model.edge_init, cfg.model.cloud_init, cfg.cloud.serve) == ("base", "train", True)
    assert M.cache_root(cfg) == Path("~/.cache/cedar/benchmark/models").expanduser()


def test_cloud_model_saves_its_calibrated_threshold_and_the_service_answers_from_it(cfg_of, own_cache, tmp_path,
                                                                                   monkeypatch):
    """The cloud's answer threshold is calibrated like an edge model's (issue 25 item 2; the F1 optimum itself is
    tested in tests/clients/test_collab.py): saved with the weights, and the service's detector answers from it
    unless ``--conf`` is given; a file without one answers from ``routing.cloud_conf``."""
    from common.config import RoutingConfig
    from server.cloud import YoloDetector

    # Prepare: the calibration stands in for a model that has trained long enough to find objects
    cfg = cfg_of()
    data = public_data(cfg)
    found = {"det_conf": 0.123, "f1": 0.5, "precision": 0.6, "recall": 0.4}
    seen = []
    monkeypatch.setattr(M, "calibrate", lambda c, model, yaml, names: seen.append(yaml) or dict(found))

    # Execute
    cloud = M.CloudModel(cfg, data, class_names(data), tmp_path / "run")

    # Assert: calibrated on the public data, in the served file's metadata, used by the service's detector
    assert seen == [data]
    assert torch.load(cloud.path, weights_only=True)["meta"]["det_conf"] == 0.123
    assert YoloDetector.from_file(cloud.path, imgsz=128).conf == 0.123
    assert YoloDetector.from_file(cloud.path, imgsz=128, conf=0.4).conf == 0.4
    plain = yolo.save_weights(cloud.model, tmp_path / "plain.pt")
    assert YoloDetector.from_file(plain, imgsz=128).conf == RoutingConfig.cloud_conf


def test_calibrate_finds_the_threshold_of_a_model_that_detects(cfg_of, monkeypatch):
    """A predictor stand-in answers each public val image's own labels at conf 0.3, plus one false box at 0.9 on
    the first image: by hand, F1 is best at 0.3 (n true boxes of n, one false: precision n/(n+1), recall 1)."""
    import numpy as np

    from clients import detector as D
    from common.detections import Detections
    from common.sites import split_images

    cfg = cfg_of()
    data = public_data(cfg)
    truth = [gt for _, _, gt in split_images(data, "val")]
    answers = iter(truth)

    class Stand:
        def __init__(self, *a, **k):
            self.first = True

        def __call__(self, image):
            gt = next(answers)
            xyxy, conf, cls = gt[:, 1:], [0.3] * len(gt), gt[:, 0].astype(int)
            if self.first:
                self.first = False
                xyxy = np.vstack([xyxy, [[0, 0, 5, 5]]])
                conf, cls = conf + [0.9], np.append(cls, (cls[0] + 1) % 8 if len(cls) else 0)
            return Detections(xyxy, conf, cls)

    n = sum(len(g) for g in truth)
    monkeypatch.setattr(D, "TorchPredictor", Stand)
    found = M.calibrate(cfg, None, data, class_names(data))
    assert found["det_conf"] == pytest.approx(0.3)
    assert found["recall"] == pytest.approx(1.0) and found["precision"] == pytest.approx(n / (n + 1))
