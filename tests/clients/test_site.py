"""Tests for clients.site.LocalSite and common.sites.resolve_site on the tiny benchmark."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.site import LocalSite
from common import protocol as P
from common.benchmark import GeneratorSettings
from common.config import ConfigError, load_config
from common.sites import SiteSpec, class_names, num_sites, resolve_site


@pytest.fixture(scope="module")
def tiny_cfg(tiny_overrides):
    return load_config("quick", tiny_overrides)


def _overrides_string(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def _label_ids(label_dir: Path) -> set[int]:
    return {int(line.split()[0]) for t in label_dir.glob("*.txt") for line in t.read_text().splitlines()}


def test_tiny_config_resolves_to_the_session_benchmark(tiny_cfg, tiny_settings):
    # the same generator settings -> the same cache key -> no second generation
    assert GeneratorSettings.from_data_config(tiny_cfg.data) == tiny_settings
    assert num_sites(tiny_cfg) == 2


# --- resolve_site ---------------------------------------------------------------------------


def test_resolve_site_from_partition_id(tiny_cfg, tiny_benchmark):
    spec = resolve_site(tiny_cfg, {"partition-id": 1})

    assert spec == SiteSpec(1, "site-1", (2.0, 0.0), (2, 3, 4, 5, 6), tiny_benchmark.site_data(1),
                            tiny_benchmark.video_dir(1) / "video.mp4")


def test_resolve_site_index_wins_and_node_config_overrides(tiny_cfg):
    spec = resolve_site(tiny_cfg, {"site-index": "0", "partition-id": 1, "position-km": "1.5, -2",
                                   "site-id": "tower-7"})

    assert (spec.index, spec.site_id, spec.position_km, spec.classes) == (0, "tower-7", (1.5, -2.0), (0, 1, 2, 3, 4))
    assert spec.unlabelled.name == "video.mp4" and spec.unlabelled.parent.name == "site-0"  # the built-in video
    folder = resolve_site(tiny_cfg, {"site-index": "0", "unlabelled": str(spec.unlabelled.parent)})
    assert folder.unlabelled == spec.unlabelled.parent  # the node's own source wins


@pytest.mark.parametrize("node_config, named", [
    ({"partition-id": 2}, "partition-id=2 but the config has 2 sites (0..1)"),
    ({"partition-id": -1}, "partition-id=-1"),
    ({"site-index": 5}, "site-index=5"),
    ({"partition-id": "one"}, "partition-id='one' is not an integer"),
    ({}, "'site-index' (deployment) or 'partition-id'"),
    ({"partition-id": 0, "position-km": "3"}, "position-km='3'"),
    ({"partition-id": 0, "unlabelled": "/no/such/video.mp4"}, "site 0: unlabelled frames not found: /no/such/video.mp4"),
])
def test_resolve_site_errors_name_the_key(tiny_cfg, node_config, named):
    with pytest.raises(ConfigError) as info:
        resolve_site(tiny_cfg, node_config)

    assert named in str(info.value)


def test_from_context_uses_run_config_and_model_store(tiny_overrides, tiny_benchmark, tmp_path):
    run_config = {"preset": "quick", "overrides": _overrides_string(tiny_overrides)}

    site = LocalSite.from_context(run_config, {"partition-id": 1, "model-store": str(tmp_path / "store")})

    assert site.cfg.preset == "quick" and site.cfg.train.imgsz == 128 and site.cfg.data.num_sites == 2
    assert site.spec.data_yaml == tiny_benchmark.site_data(1)
    assert site.store == tmp_path / "store"


def test_from_context_default_store_is_under_cedar_home(tiny_overrides, cedar_home):
    run_config = {"preset": "quick", "overrides": _overrides_string(tiny_overrides)}

    site = LocalSite.from_context(run_config, {"partition-id": 0})

    assert site.store == cedar_home / "nodes" / "site-0"


def test_identity(tiny_cfg):
    site = LocalSite(tiny_cfg, resolve_site(tiny_cfg, {"partition-id": 1}), Path("unused"))

    identity = site.identity()

    assert identity == {P.SITE_ID: "site-1", P.POSITION_KM: [2.0, 0.0], P.CLASSES: [2, 3, 4, 5, 6]}
    assert P.parse_site(identity, nc=8) == identity


# --- train_round ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site1(tiny_cfg, tmp_path_factory):
    return LocalSite(tiny_cfg, resolve_site(tiny_cfg, {"partition-id": 1}), tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def round1(site1):
    return site1.train_round(server_round=1, epochs=1, weights=None)


def test_train_round_metrics(round1, site1, tiny_benchmark):
    # Prepare: classes with a label in site 1's test split are scored, the rest are absent (-1)
    present = _label_ids(tiny_benchmark.site_dir(1) / "labels" / "test")

    m = round1.metrics

    # Assert: every protocol key, valid as the server will check it
    assert set(m) == {P.NUM_EXAMPLES, P.TRAIN_LOSS, P.TRAIN_SECONDS, P.VAL_MAP50, P.TEST_MAP50, P.TEST_MAP50_95,
                      P.TEST_AP50, *P.ROUTING_KEYS}
    assert all(0.0 <= m[k] <= 1.0 for k in (P.OFFLOAD_FRACTION, P.EDGE_RECALL, P.CONFIDENT_RECALL))
    assert m[P.CONFIDENT_RECALL] <= m[P.EDGE_RECALL]  # the confident detections are a subset
    assert m[P.EDGE_LATENCY_MS] > 0
    parsed = P.parse_train_metrics(m, nc=8)
    # 8 train images, batch 4: 2 iterations x 4 images
    assert m[P.NUM_EXAMPLES] == 8
    assert math.isfinite(m[P.TRAIN_LOSS]) and m[P.TRAIN_LOSS] > 0 and m[P.TRAIN_SECONDS] > 0
    assert [c for c in range(8) if m[P.TEST_AP50][c] != P.ABSENT] == sorted(present)
    assert [c for c in range(8) if not math.isnan(parsed[P.TEST_AP50][c])] == sorted(present)
    assert 0.0 <= m[P.TEST_MAP50_95] <= m[P.TEST_MAP50] <= 1.0


def test_train_round_writes_the_model_store(round1, site1):
    from common import yolo

    path = site1.store / "model.pt"

    blob = torch.load(path, weights_only=True)
    # the stored answer threshold is the file's model's own calibration (none when nothing matches on val)
    assert blob["meta"] == {"round": 1, "site": "site-1", **site1.calibrate(yolo.load_weights(path))}
    assert round1.metrics[P.EDGE_DET_CONF] == blob["meta"].get("det_conf", site1.cfg.routing.det_conf)
    assert blob["names"] == dict(enumerate(class_names(site1.spec.data_yaml)))
    stored = yolo.state_dict(yolo.load_weights(path))
    assert stored.keys() == round1.weights.keys()
    assert all(torch.equal(stored[k], round1.weights[k]) for k in stored)


def test_train_round_changes_the_weights(round1, site1):
    fresh = site1.build_model().state_dict()

    assert any(not torch.equal(fresh[k], round1.weights[k]) for k in fresh)


def test_next_round_starts_from_the_given_weights(round1, site1):
    # epochs=0 trains nothing, so the returned weights are exactly the ones sent
    res = site1.train_round(server_round=2, epochs=0, weights=round1.weights)

    assert res.weights.keys() == round1.weights.keys()
    assert all(torch.equal(res.weights[k], round1.weights[k]) for k in res.weights)
    assert torch.load(site1.store / "model.pt", weights_only=True)["meta"]["round"] == 2


def test_zero_epoch_round_reply_is_valid(round1, site1):
    res = site1.train_round(server_round=2, epochs=0, weights=round1.weights)

    P.parse_train_metrics(res.metrics, nc=8)


# --- metric assembly (training and evaluation faked) ----------------------------------------


def _fake_adapter(monkeypatch, iterations: int):
    """Replace yolo.train/evaluate: ``iterations`` batches, fixed scores (site 1's classes are 2..6)."""
    from common import yolo

    calls = []

    def train(model, data_yaml, **kw):
        calls.append(("train", kw["epochs"], kw["batch"], kw["warmup_iters"], kw["seed"], kw["lr0"]))
        return yolo.TrainResult(epochs=kw["epochs"], iterations=iterations, seconds=1.5, loss=2.25, images=8)

    def evaluate(model, data_yaml, *, split, **kw):
        calls.append(("evaluate", split))
        ap = [math.nan, math.nan, 0.5, 0.25, math.nan, 0.0, 1.0, math.nan]
        return yolo.EvalResult(map50=0.4 if split == "val" else 0.6, map50_95=0.3, precision=0.5, recall=0.5,
                               ap50=ap, images=4, instances=9, seconds=0.1)

    monkeypatch.setattr(yolo, "train", train)
    monkeypatch.setattr(yolo, "evaluate", evaluate)
    return calls


def test_train_round_assembles_metrics(monkeypatch, tiny_cfg, tmp_path):
    # Prepare: 8 train images, batch 4 -> 2 iterations
    calls = _fake_adapter(monkeypatch, iterations=2)
    site = LocalSite(tiny_cfg, resolve_site(tiny_cfg, {"partition-id": 1}), tmp_path)

    # Execute
    res = site.train_round(server_round=3, epochs=1, weights=None)

    # Assert: warm-up in every round (the optimizer restarts); seed = cfg.seed + 1000 * round + index = 3001;
    # a model built from scratch (no weights sent) trains at train.lr0
    assert calls == [("train", 1, 4, tiny_cfg.train.warmup_iters, 3001, tiny_cfg.train.lr0), ("evaluate", "val"),
                     ("evaluate", "test")]
    routing = {k: res.metrics.pop(k) for k in P.ROUTING_KEYS}
    assert set(routing) == set(P.ROUTING_KEYS)
    assert res.metrics == {P.NUM_EXAMPLES: 8, P.TRAIN_LOSS: 2.25, P.TRAIN_SECONDS: 1.5, P.VAL_MAP50: 0.4,
                           P.TEST_MAP50: 0.6, P.TEST_MAP50_95: 0.3,
                           P.TEST_AP50: [-1.0, -1.0, 0.5, 0.25, -1.0, 0.0, 1.0, -1.0]}
    assert (tmp_path / "model.pt").is_file()


def test_a_round_that_continues_a_model_trains_at_the_finetune_rate(monkeypatch, tiny_overrides, tmp_path):
    calls = _fake_adapter(monkeypatch, iterations=2)
    cfg = load_config("quick", {**tiny_overrides, "train.lr0": 0.01, "train.finetune-lr0": 0.002})
    site = LocalSite(cfg, resolve_site(cfg, {"partition-id": 1}), tmp_path)
    trained = site.build_model().state_dict()

    site.train_round(server_round=1, epochs=1, weights=None)
    site.train_round(server_round=2, epochs=1, weights=trained)

    assert [c[-1] for c in calls if c[0] == "train"] == [0.01, 0.002]


def test_num_examples_is_the_number_of_training_images(monkeypatch, tiny_overrides, tmp_path):
    # 8 train images, batch 3 -> ceil(8 / 3) = 3 iterations in 1 epoch
    _fake_adapter(monkeypatch, iterations=3)
    cfg = load_config("quick", {**tiny_overrides, "train.batch": 3})
    site = LocalSite(cfg, resolve_site(cfg, {"partition-id": 1}), tmp_path)

    res = site.train_round(server_round=1, epochs=1, weights=None)

    assert res.metrics[P.NUM_EXAMPLES] == 8


def _labels_detector(site, conf: float, split: str = "test"):
    """A stand-in for the site's edge detector: on an image of ``split``, that image's labelled boxes (true
    classes), all at confidence ``conf``. Returns the predictor, the images' paths and their pixel ground truth."""
    import cv2
    import numpy as np

    from common.detections import Detections, image_labels
    from common.sites import split_dir

    paths = sorted(split_dir(site.spec.data_yaml, split).glob("*.png"))
    images = [cv2.imread(str(p)) for p in paths]
    gts = [image_labels(p, im.shape[1], im.shape[0]) for p, im in zip(paths, images)]

    def labels(image):
        gt = next(g for im, g in zip(images, gts) if np.array_equal(im, image))
        return Detections(gt[:, 1:], np.full(len(gt), conf), gt[:, 0].astype(int))

    return labels, paths, gts


def test_collab_metrics_with_a_detector_that_returns_the_ground_truth(site1, monkeypatch):
    """Paper section 4.2 (b): a perfect detector at conf 0.9 still offloads every box under t_size px².

    Expected from the labels themselves: recall 1, FNR 0; the confident boxes are those with area >= 256 px²,
    so confident recall = offload complement = (#GT with area >= 256) / #GT; each offloaded box is 'small'.
    """
    import numpy as np

    perfect, _, gts = _labels_detector(site1, 0.9)
    monkeypatch.setattr(site1, "edge_predictor", lambda model: perfect)
    all_boxes = np.concatenate(gts)[:, 1:]
    small = (all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1]) < 256

    m = site1.collab_round(model=None)[0]

    assert m[P.EDGE_RECALL] == 1.0 and m[P.EDGE_FNR] == 0.0
    assert m[P.EDGE_MAP50] == pytest.approx(0.995)  # every class ranked perfectly: Ultralytics' 101-point AP
    assert m[P.CONFIDENT_RECALL] == pytest.approx(1 - small.mean())
    assert m[P.OFFLOAD_FRACTION] == pytest.approx(small.mean())
    assert (m[P.OFFLOAD_SMALL], m[P.OFFLOAD_LOW_CONF], m[P.OFFLOAD_UNSTABLE], m[P.OFFLOAD_CANDIDATES]) == (
        small.sum(), 0, 0, 0)
    assert 0 < small.mean() < 1  # the tiny benchmark has both kinds, so the check is not vacuous
    assert not set(P.COLLAB_KEYS) & set(m)  # no cloud configured


class _FakeCloud:
    """Answers each offload with the boxes it was sent (``perfect``), nothing, or an outage."""

    def __init__(self, answer: str):
        self.answer, self.entries, self.closed = answer, [], False

    def send(self, entry):
        from clients.offload import CloudAnswer, CloudUnavailable
        from common.detections import Detections

        self.entries.append(entry)
        if self.answer == "down":
            raise CloudUnavailable("connection refused")
        offloaded = [d for d, off in zip(entry.edge, entry.offloaded) if off]
        dets = Detections.from_list(offloaded if self.answer == "perfect" else [])
        return CloudAnswer(dets, rtt_ms=10.0, request_bytes=entry.payload_bytes + 100)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("answer", ["perfect", "empty", "down"])
def test_collab_metrics_merge_the_cloud_answer(site1, monkeypatch, answer):
    """Paper section 4.2: offloaded boxes are merged with the cloud's answer; metrics of the merged output.

    With the perfect detector at conf 0.9, exactly the boxes under t_size (256 px²) are offloaded. A cloud
    that returns them gives collaborative recall 1; one that returns nothing leaves the edge's own recall
    (routing.keep-unanswered, the default: unanswered offloaded boxes stay); an unreachable one drops only
    the collaborative metrics.
    """
    perfect, paths, _ = _labels_detector(site1, 0.9)
    cloud = _FakeCloud(answer)
    monkeypatch.setattr(site1, "edge_predictor", lambda model: perfect)
    monkeypatch.setattr(site1, "cloud_client", lambda: cloud)

    m = site1.collab_round(model=None)[0]

    assert cloud.closed
    assert m[P.EDGE_RECALL] == 1.0  # the edge metrics never depend on the cloud
    if answer == "down":
        assert len(cloud.entries) == 1 and not set(P.COLLAB_KEYS) & set(m)
        return
    assert len(cloud.entries) > 0 and all(any(e.offloaded) for e in cloud.entries)  # only images to offload
    assert site1.cfg.routing.keep_unanswered
    assert m[P.COLLAB_RECALL] == 1.0 and m[P.COLLAB_FNR] == 0.0
    assert m[P.UPLOAD_BYTES] == pytest.approx(sum(e.payload_bytes for e in cloud.entries) / len(paths))
    assert m[P.COLLAB_LATENCY_MS] >= m[P.EDGE_LATENCY_MS]


@pytest.mark.parametrize("answer", ["perfect", "empty"])
def test_candidates_count_only_where_the_cloud_confirms_them(site1, monkeypatch, answer):
    """Every true box found at conf 0.1 only: below routing.det_conf (0.25), so all are candidates and none
    is the edge's answer (edge recall 0). Every image with an object is offloaded; a cloud that confirms
    the candidates gives collaborative recall 1, a silent one 0 (candidates are never kept unanswered)."""
    import numpy as np

    faint, _, gts = _labels_detector(site1, 0.1)
    cloud = _FakeCloud(answer)
    monkeypatch.setattr(site1, "edge_predictor", lambda model: faint)
    monkeypatch.setattr(site1, "cloud_client", lambda: cloud)

    m = site1.collab_round(model=None)[0]

    assert site1.collab_settings().detector_conf == site1.cfg.routing.candidate_conf == 0.05
    assert m[P.EDGE_RECALL] == 0.0 and all(all(e.offloaded) for e in cloud.entries) and cloud.entries
    assert m[P.OFFLOAD_CANDIDATES] == sum(len(g) for g in gts)
    assert m[P.COLLAB_RECALL] == (1.0 if answer == "perfect" else 0.0)
    assert m[P.COLLAB_MAP50] == (pytest.approx(0.995) if answer == "perfect" else 0.0)
    assert np.isfinite(m[P.EDGE_MAP50])


def test_collab_round_gallery_gives_plain_boxes_offloaded_images_first(site1, monkeypatch, tmp_path):
    perfect, paths, gts = _labels_detector(site1, 0.9)
    cloud = _FakeCloud("perfect")
    monkeypatch.setattr(site1, "edge_predictor", lambda model: perfect)
    monkeypatch.setattr(site1, "cloud_client", lambda: cloud)

    metrics, items = site1.collab_round(model=None, gallery=3)

    assert len(items) == 3 and cloud.closed
    timed = (P.EDGE_LATENCY_MS, P.COLLAB_LATENCY_MS)
    again = site1.collab_round(model=None)[0]
    assert {k: v for k, v in metrics.items() if k not in timed} == {k: v for k, v in again.items() if k not in timed}
    offloaded = [e.frame for e in cloud.entries]
    first = items[0]
    index = [str(p) for p in paths].index(first["image"])
    assert index == offloaded[0]
    assert first["gt"] == {"xyxy": gts[index][:, 1:].tolist(), "conf": [1.0] * len(gts[index]),
                           "cls": gts[index][:, 0].astype(int).tolist()}
    assert first["edge"]["xyxy"] == first["gt"]["xyxy"] and first["edge"]["conf"] == [0.9] * len(gts[index])
    assert first["cloud"] is not None and len(first["merged"]["xyxy"]) == len(gts[index])
    assert all(isinstance(v, list) for item in items for k in ("gt", "edge", "merged") for v in item[k].values())
    # the report's gallery takes the items as they are
    from server.report import write_gallery

    written = json.loads(write_gallery(tmp_path, "site-1", items).read_text())
    assert [w["merged"]["xyxy"] for w in written] == [i["merged"]["xyxy"] for i in items]


def test_cloud_settings_from_node_config_override_the_run_config(tiny_cfg, tmp_path):
    from clients.site import LocalSite

    cfg = load_config("quick", {"routing.cloud-url": "https://cloud:8443"})
    site = LocalSite(cfg, resolve_site(cfg, {"partition-id": 0}), tmp_path)
    assert site.cloud["url"] == "https://cloud:8443"
    site = LocalSite.from_context({"preset": "quick", "overrides": "routing.cloud-url=https://a:1"},
                                  {"partition-id": 0, "cloud-url": "https://b:2", "cloud-token-file": "/nope"})
    assert site.cloud == {"url": "https://b:2", "token-file": "/nope", "cafile": ""}
    assert site.cloud_client() is None  # the token file cannot be read: edge metrics only, no crash
    assert LocalSite(tiny_cfg, resolve_site(tiny_cfg, {"partition-id": 0}), tmp_path).cloud_client() is None


def test_the_runs_own_cloud_service_comes_in_the_train_message(tiny_overrides, tmp_path):
    run_config = {"preset": "quick", "overrides": _overrides_string(tiny_overrides)}
    message = {P.CLOUD_URL: "http://127.0.0.1:5001", P.CLOUD_TOKEN: "tok-1", P.SERVER_ROUND: 1}

    # Execute: the message names the run's service; a node-config URL (the node's own service) wins over it
    site = LocalSite.from_context(run_config, {"partition-id": 0}, message)
    own = LocalSite.from_context(run_config, {"partition-id": 0, "cloud-url": "https://b:2",
                                              "cloud-token-file": str(tmp_path / "none")}, message)

    # Assert: a client of that service with that token; the node's own service without the message's token
    client = site.cloud_client()
    assert client.url == "http://127.0.0.1:5001"
    assert client.client.headers["Authorization"] == "Bearer tok-1" and client.client.headers["X-Cedar-Site"] == "site-0"
    client.close()
    assert own.cloud["url"] == "https://b:2" and "token" not in own.cloud and own.cloud_client() is None


def test_student_check_keeps_only_teachers_better_by_more_than_the_margin(monkeypatch, tiny_cfg, tmp_path):
    """Own val mAP50 0.30; teachers a 0.40, b 0.33, c 0.10, margin 0.05 -> only a is kept, weight 1.0.
    Two untrained models (0.001 vs 0.000) do not count as better."""
    from types import SimpleNamespace

    import torch

    site = LocalSite(tiny_cfg, resolve_site(tiny_cfg, {"partition-id": 1}), tmp_path)
    student = torch.nn.Linear(1, 1)
    teachers = {name: torch.nn.Linear(1, 1) for name in "abc"}
    scores = {id(student): 0.30, id(teachers["a"]): 0.40, id(teachers["b"]): 0.33, id(teachers["c"]): 0.10}
    monkeypatch.setattr(site, "build_model", lambda weights, arch=None: teachers[weights])
    monkeypatch.setattr(site, "evaluate", lambda model, split: SimpleNamespace(map50=scores[id(model)]))
    kd = P.KDRequest(tuple("abc"), (0.2, 0.5, 0.3), ("yolo11n",) * 3, alpha=0.5, temperature=1.0, fg_threshold=0.25,
                     student_check=True, check_margin=0.05)

    ensemble, metrics = site.distiller(student, kd, list("abc"))

    assert ensemble.teachers == [teachers["a"]] and ensemble.weights == [1.0]
    assert metrics == {P.START_VAL_MAP50: 0.30, P.TEACHER_VAL_MAP50: [0.40, 0.33, 0.10], P.TEACHERS_KEPT: [1, 0, 0]}
    scores.update({id(student): 0.0, id(teachers["a"]): 0.001, id(teachers["b"]): 0.0, id(teachers["c"]): 0.0})
    assert site.distiller(student, kd, list("abc"))[0] is None  # nobody kept: plain training
    unchecked = dataclasses.replace(kd, student_check=False)
    assert site.distiller(student, unchecked, list("abc"))[0].weights == [0.2, 0.5, 0.3]


def test_the_answer_threshold_is_calibrated_on_val_stored_with_the_weights_and_used_on_test(
        monkeypatch, tiny_cfg, tmp_path):
    """A val detector with known scores: each labelled box at 0.3 (objects 0, 2, 4, ... of the split, in
    label order) or 0.2 (the others), plus one false alarm at 0.25 per image (class-aware matches at IoU 0.5).
    With G objects, G3 of them at 0.3 and N images, F1 = 2m/(k + G) from each threshold on: 0.3: 2·G3/(G3 + G);
    0.25: 2·G3/(G3 + N + G); 0.2: 2·G/(G + N + G). The round stores the best one in the weights' metadata,
    reports it (edge-det-conf) and scores the test split at it: a box at 0.2 is in the edge's answer only
    when 0.2 is the threshold."""
    import numpy as np

    from common import yolo
    from common.detections import Detections

    _fake_adapter(monkeypatch, iterations=2)
    site = LocalSite(tiny_cfg, resolve_site(tiny_cfg, {"partition-id": 1}), tmp_path)
    labels_val, val_paths, val_gts = _labels_detector(site, 1.0, "val")
    labels_test, test_paths, test_gts = _labels_detector(site, 1.0, "test")
    alarm = [[0, 0, 3, 3]]  # 3x3 px in the corner: no label there is that small (checked below)

    def scored(labels):
        def detect(image):
            try:
                found = labels(image)
            except StopIteration:
                return None
            conf = np.where(np.arange(len(found)) % 2 == 0, 0.3, 0.2)
            return Detections.concat([Detections(found.xyxy, conf, found.cls), Detections(alarm, [0.25], [2])])
        return detect

    val, test = scored(labels_val), scored(labels_test)
    detector = lambda image: val(image) if val(image) is not None else test(image)  # noqa: E731
    monkeypatch.setattr(site, "edge_predictor", lambda model, conf=None: detector)
    every = np.concatenate(val_gts)
    assert not ((every[:, 1] < 3) & (every[:, 2] < 3)).any()
    g, n = len(every), len(val_paths)
    g3 = sum((len(gt) + 1) // 2 for gt in val_gts)
    f1 = {0.3: 2 * g3 / (g3 + g), 0.25: 2 * g3 / (g3 + n + g), 0.2: 2 * g / (g + n + g)}
    best = max(f1, key=f1.get)
    assert best == 0.2 < tiny_cfg.routing.det_conf  # on this split (G 34, G3 18, N 4): the calibration matters

    res = site.train_round(server_round=1, epochs=1, weights=None)

    meta = yolo.load_weights(tmp_path / "model.pt").cedar_meta
    assert meta["det_conf"] == res.metrics[P.EDGE_DET_CONF] == best
    assert meta["f1"] == pytest.approx(f1[best]) and meta["round"] == 1
    # the test split scored at that threshold: at 0.2 every labelled box is in the answer, at 0.3 every other one
    # (the rest and the alarms below it are candidates)
    g_test = sum(len(gt) for gt in test_gts)
    at_03 = sum((len(gt) + 1) // 2 for gt in test_gts)
    recall, candidates = {0.2: (1.0, 0), 0.25: (at_03 / g_test, g_test - at_03),
                          0.3: (at_03 / g_test, g_test - at_03 + len(test_paths))}[best]
    assert res.metrics[P.EDGE_RECALL] == pytest.approx(recall) and res.metrics[P.OFFLOAD_CANDIDATES] == candidates
    P.parse_train_metrics(res.metrics, nc=8)


def test_collab_metrics_with_a_cloud_but_nothing_to_offload_equal_the_edge(site1, monkeypatch):
    """A site whose edge finds nothing ambiguous sends nothing: its collaborative answer is the edge's own."""
    from common.detections import Detections

    cloud = _FakeCloud("perfect")
    monkeypatch.setattr(site1, "edge_predictor", lambda model, conf=None: lambda image: Detections.empty())
    monkeypatch.setattr(site1, "cloud_client", lambda: cloud)

    m = site1.collab_round(model=None)[0]

    assert cloud.entries == []
    assert (m[P.COLLAB_RECALL], m[P.COLLAB_FNR], m[P.UPLOAD_BYTES]) == (m[P.EDGE_RECALL], m[P.EDGE_FNR], 0.0) == (
        0.0, 1.0, 0.0)


def test_offload_options_are_measured_on_val_stored_and_the_budget_runs_on_test(monkeypatch, tiny_cfg, tmp_path):
    """The edge finds every other labelled object (conf 0.9); the cloud finds every object on a whole keyframe
    and answers crops with the boxes sent. Calibration measures every option of OFFLOAD_GRID on val: the edge
    alone uploads nothing at its own recall, the cloud alone reaches recall 1 at a whole frame's bytes. On test a
    budget of a whole frame buys recall 1 from the whole keyframe; a budget of 0 bytes runs the edge alone."""
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from clients.collab import OFFLOAD_GRID
    from clients.offload import CloudAnswer
    from common.detections import Detections

    site = LocalSite(tiny_cfg, resolve_site(tiny_cfg, {"partition-id": 1}), tmp_path)
    labels_val, _, val_gts = _labels_detector(site, 0.9, "val")
    labels_test, _, test_gts = _labels_detector(site, 0.9, "test")

    def half(image):
        for labels in (labels_val, labels_test):
            try:
                found = labels(image)
            except StopIteration:
                continue
            return found[np.arange(len(found)) % 2 == 0]

    class Cloud:
        def send(self, entry):
            if entry.mode == "crops":
                dets = Detections.from_list([d for d, off in zip(entry.edge, entry.offloaded) if off])
            else:
                gt = (val_gts if entry.run == "budget" else test_gts)[entry.frame]
                dets = Detections(gt[:, 1:], np.full(len(gt), 0.8), gt[:, 0].astype(int))
            return CloudAnswer(dets, rtt_ms=1.0)

        def close(self):
            pass

    monkeypatch.setattr(site, "edge_predictor", lambda model, conf=None: half)
    monkeypatch.setattr(site, "cloud_client", Cloud)

    found = site.calibrate(model=None)

    measured = found["offload"]
    options = {(o["settings"]["offload"], o["settings"]["jpeg_quality"]): o for o in measured["options"]}
    assert len(measured["options"]) == len(OFFLOAD_GRID)
    every = sum(len(gt) for gt in val_gts)
    assert options["none", 90]["bytes"] == 0
    assert options["none", 90]["recall"] == pytest.approx(sum((len(gt) + 1) // 2 for gt in val_gts) / every)
    assert options["cloud", 90]["recall"] == 1.0 and options["cloud", 90]["bytes"] == measured["frame_bytes"] > 0
    model = SimpleNamespace(cedar_meta=found)
    whole = replace(site.cfg, routing=replace(site.cfg.routing, budget="frame:1"))
    site.cfg = whole
    m = site.collab_round(model)[0]
    assert site.collab_settings(model).offload_source == "budget"
    assert site.collab_settings(model).offload in ("frame", "cloud")
    assert m[P.COLLAB_RECALL] == 1.0 and m[P.UPLOAD_BYTES] > 0
    site.cfg = replace(whole, routing=replace(whole.routing, budget="bytes:0"))
    m = site.collab_round(model)[0]
    assert site.collab_settings(model).offload == "none"
    assert m[P.UPLOAD_BYTES] == 0 and m[P.COLLAB_RECALL] == m[P.EDGE_RECALL] < 1.0


def test_the_video_goes_to_the_cloud_as_hard_samples_and_the_splits_never_do(site1, monkeypatch):
    """Section 4.2 (2): the site's video (its production traffic) runs through the edge runtime's keyframe rule and
    collaboration step with uploads the cloud keeps; scoring val and test asks for answers only (X-Cedar-Keep 0)."""
    import cv2

    from clients.edge import EdgeSettings
    from common.detections import Detections
    from common.keyframes import KeyframeSelector

    faint = Detections([[10, 10, 14, 14]], [0.1], [2])  # a candidate on every frame: every keyframe uploads
    monkeypatch.setattr(site1, "edge_predictor", lambda model, conf=None: lambda image: faint)
    cloud, asked = _FakeCloud("perfect"), []
    monkeypatch.setattr(site1, "cloud_client", lambda keep=False: asked.append(keep) or cloud)

    counts = site1.video_offloads(model=None, server_round=2)

    # the keyframes the runtime's own rule picks on the same video, independently
    e, cap, expected, n = EdgeSettings(), cv2.VideoCapture(str(site1.spec.unlabelled)), [], 0
    selector = KeyframeSelector(beta=e.beta, warmup=e.warmup, cut_threshold=e.cut_threshold, max_gap=e.max_gap)
    while True:
        ok, image = cap.read()
        if not ok:
            break
        if selector.update(image) or not expected:  # the first frame is always one
            expected.append(n)
        n += 1
    cap.release()
    assert asked == [True] and cloud.closed
    assert [e.frame for e in cloud.entries] == expected and {e.run for e in cloud.entries} == {"r2"}
    assert 0 < len(expected) < n
    assert counts == {"frames": n, "keyframes": len(expected), "offloads": len(expected),
                      "bytes": sum(e.payload_bytes for e in cloud.entries)}
    asked.clear()
    site1.collab_round(model=None)
    assert asked == [False]


def test_the_transfer_set_adds_evenly_spaced_unlabelled_frames_with_the_teachers_pseudo_labels(
        monkeypatch, tiny_overrides, tmp_path):
    """kd.unlabelled-frames=4 of the 12-frame video: stride 3, frames 0, 3, 6, 9. Two fake teachers (weights 0.75
    and 0.25 of one ensemble): A sees [10,10,30,30] class 1 at 0.9, B [12,10,32,30] class 1 at 0.95 (scaled 0.32)
    and [60,60,70,70] class 0 at 0.6 (0.2, below pseudo-conf 0.3). Each frame's label: A's box alone, in YOLO
    form on the 128 px frame. Ultralytics' loader takes the data.yaml: 8 labelled + 4 transfer images."""
    from types import SimpleNamespace

    from common import yolo

    cfg = load_config("quick", {**tiny_overrides, "kd.unlabelled-frames": 4, "kd.pseudo-conf": 0.3})
    site = LocalSite(cfg, resolve_site(cfg, {"partition-id": 0}), tmp_path)
    seen = {"a": ([[10, 10, 30, 30]], [0.9], [1]), "b": ([[12, 10, 32, 30], [60, 60, 70, 70]], [0.95, 0.6], [1, 0])}
    made = []

    class FakePredictor:
        def __init__(self, model, *, imgsz, conf, device):
            made.append((model, round(conf, 6)))
            self.boxes = seen[model]

        def __call__(self, images):
            xyxy, conf, cls = self.boxes
            return [{"xyxy": np.array(xyxy, np.float32), "conf": np.array(conf, np.float32), "cls": np.array(cls)}
                    for _ in images]

    monkeypatch.setattr(yolo, "Predictor", FakePredictor)
    ensemble = SimpleNamespace(teachers=["a", "b"], weights=[0.75, 0.25])

    data, metrics = site.transfer_set(ensemble, server_round=2)

    # each teacher answers from the lowest confidence that can still pass once scaled by its weight
    assert made == [("a", 0.3), ("b", 0.9)]
    images = sorted(p.name for p in (tmp_path / "transfer" / "images").iterdir())
    assert images == ["r2-000000.png", "r2-000003.png", "r2-000006.png", "r2-000009.png"]
    for name in images:
        label = (tmp_path / "transfer" / "labels" / name).with_suffix(".txt").read_text()
        assert label == "1 0.156250 0.156250 0.156250 0.156250\n"  # centre 20/128, side 20/128
    assert metrics == {P.TRANSFER_FRAMES: 4, P.PSEUDO_BOXES: 4}
    loader, _ = yolo.make_train_loader(data, imgsz=128, batch=4)
    assert len(loader.dataset) == 8 + 4
    assert len(yolo.split_images(data, "val")) == 4  # validation stays the site's own split
