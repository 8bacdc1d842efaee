"""Record keys of the messages between the ServerApp and the ClientApps.

Defined once here (kebab-case, as Flower records use) and validated at the
boundary: a reply that lacks a key or carries a value of the wrong kind raises
:class:`ProtocolError` naming the key, and the strategy drops that reply.
This module is plain Python (no flwr) so both sides and the tests can use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

# record names inside a message's RecordDict
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# ConfigRecord "config" (server -> client)
SERVER_ROUND = "server-round"
EPOCHS = "epochs"
# ... of a distillation message (KDRequest): the student's teachers travel as ArrayRecords "teacher-<i>"
TEACHER_IDS = "teacher-ids"
TEACHER_WEIGHTS = "teacher-weights"
TEACHER_ARCHS = "teacher-archs"
KD_ALPHA = "kd-alpha"
KD_TEMPERATURE = "kd-temperature"
KD_FG_THRESHOLD = "kd-fg-threshold"
KD_SELECT = "kd-select"  # which anchors are distilled on: "teacher-fg" or "teacher-better" (common.distill)
KD_SELECTIONS = ("teacher-fg", "teacher-better")
KD_STUDENT_CHECK = "kd-student-check"  # the student keeps only teachers better than itself on its own val split
KD_CHECK_MARGIN = "kd-check-margin"  # ... by more than this (val mAP50)

# ... the run's own cloud detection service (cloud.serve; server.cloud_process), in every train message:
# the sites' collaboration step offloads to it
CLOUD_URL = "cloud-url"
CLOUD_TOKEN = "cloud-token"

# ... the round whose reply carries a gallery (the run's last): a few test keyframes with their boxes, for the
# run report (server.report.write_gallery); the reply's GALLERY record holds GALLERY_ITEMS (JSON: one
# {"gt", "edge", "cloud", "merged"} box-set dict per image) and GALLERY_IMAGES (the image files' bytes)
GALLERY_ROUND = "gallery-round"
GALLERY = "gallery"
GALLERY_ITEMS = "items"
GALLERY_IMAGES = "images"
GALLERY_FRAMES = 3  # keyframes per site


def teacher_record(i: int) -> str:
    """Name of the ArrayRecord holding the ``i``-th teacher's weights."""
    return f"teacher-{i}"

# MetricRecord "metrics" (client -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
VAL_MAP50 = "val-map50"
TEST_MAP50 = "test-map50"
TEST_MAP50_95 = "test-map50-95"
TEST_AP50 = "test-ap50"  # per class; NaN is sent as -1 (absent class)
KD_LOSS = "kd-loss"  # mean distillation loss of the last epoch (KD rounds only)
# the student-side check (KD rounds only): its own val mAP50 before training, each proposed
# teacher's val mAP50 on the student's val split, and 1/0 per teacher for kept/dropped
START_VAL_MAP50 = "start-val-map50"
TEACHER_VAL_MAP50 = "teacher-val-map50"
TEACHERS_KEPT = "teachers-kept"
# the KD transfer set's unlabelled part (kd.unlabelled_frames): frames added and the pseudo-label boxes on them
TRANSFER_FRAMES = "transfer-frames"
PSEUDO_BOXES = "pseudo-boxes"
# ambiguity routing on the site's test split (paper section 4.2), optional: every test image a keyframe through
# the collaboration step (clients.collab); recall, FNR and mAP50 class-aware at IoU 0.5 (common.detections.score)
EDGE_DET_CONF = "edge-det-conf"  # the edge's answer threshold: calibrated on val (F1-optimal), else routing.det_conf
OFFLOAD_FRACTION = "offload-fraction"  # share of the edge's answer boxes that are ambiguous (go to the cloud)
EDGE_RECALL = "edge-recall"  # recall of the edge's answer
CONFIDENT_RECALL = "confident-recall"  # ... of its confident boxes only (what the edge keeps without a cloud)
EDGE_LATENCY_MS = "edge-latency-ms"  # per image, batch 1
EDGE_MAP50 = "edge-map50"  # mAP50 of the edge's answer
EDGE_FNR = "edge-fnr"  # 1 - edge-recall
OFFLOAD_LOW_CONF = "offload-low-conf"  # answer boxes offloaded for low confidence (a box may have several reasons)
OFFLOAD_SMALL = "offload-small"  # ... for a small area
OFFLOAD_UNSTABLE = "offload-unstable"  # ... for an intermittent track (videos only)
OFFLOAD_CANDIDATES = "offload-candidates"  # boxes below routing.det_conf offloaded as candidates
REASON_KEYS = {"low_conf": OFFLOAD_LOW_CONF, "small": OFFLOAD_SMALL, "unstable": OFFLOAD_UNSTABLE,
               "candidate": OFFLOAD_CANDIDATES}
ROUTING_KEYS = (EDGE_DET_CONF, OFFLOAD_FRACTION, EDGE_RECALL, CONFIDENT_RECALL, EDGE_LATENCY_MS, EDGE_MAP50, EDGE_FNR,
                *REASON_KEYS.values())
# collaboration with the cloud detection service (only when the node knows the service and it answered), optional
COLLAB_RECALL = "collab-recall"  # recall of the merged edge + cloud answer
COLLAB_LATENCY_MS = "collab-latency-ms"  # per image: edge + cloud round trip when offloaded
UPLOAD_BYTES = "upload-bytes"  # JPEG bytes sent per test image
COLLAB_MAP50 = "collab-map50"  # mAP50 of the merged answer
COLLAB_FNR = "collab-fnr"  # 1 - collab-recall
COLLAB_KEYS = (COLLAB_RECALL, COLLAB_LATENCY_MS, UPLOAD_BYTES, COLLAB_MAP50, COLLAB_FNR)

# ConfigRecord "site" (client -> server)
SITE_ID = "site-id"
POSITION_KM = "position-km"
CLASSES = "classes"

ABSENT = -1.0  # per-class AP of a class with no labelled instance (MetricRecord has no NaN)


class ProtocolError(ValueError):
    """A message from a node is malformed; the message names the bad key."""


def encode_ap(ap: list[float]) -> list[float]:
    return [ABSENT if math.isnan(v) else float(v) for v in ap]


def decode_ap(ap: list[float]) -> list[float]:
    return [math.nan if v == ABSENT else float(v) for v in ap]


def _number(record: Mapping[str, Any], key: str, where: str) -> float:
    if key not in record:
        raise ProtocolError(f"{where}: missing '{key}'")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ProtocolError(f"{where}: '{key}'={value!r} is not a number")
    return float(value)


def parse_train_metrics(metrics: Mapping[str, Any], nc: int) -> dict[str, Any]:
    """Validate a train reply's metrics; return them as plain Python values."""
    where = "metrics"
    out = {k: _number(metrics, k, where) for k in (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, VAL_MAP50, TEST_MAP50)}
    if out[NUM_EXAMPLES] <= 0:
        raise ProtocolError(f"{where}: '{NUM_EXAMPLES}'={out[NUM_EXAMPLES]!r} must be > 0")
    for k in (VAL_MAP50, TEST_MAP50):
        if not 0.0 <= out[k] <= 1.0:
            raise ProtocolError(f"{where}: '{k}'={out[k]!r} outside [0, 1]")
    ap = metrics.get(TEST_AP50)
    if not isinstance(ap, list) or len(ap) != nc:
        raise ProtocolError(f"{where}: '{TEST_AP50}' must be a list of {nc} values, got {ap!r}")
    bad = [v for v in ap if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v == ABSENT or 0.0 <= v <= 1.0)]
    if bad:
        raise ProtocolError(f"{where}: '{TEST_AP50}' entries must be {ABSENT} (absent) or in [0, 1], got {bad[0]!r}")
    out[TEST_AP50] = decode_ap(ap)
    out[TEST_MAP50_95] = float(metrics.get(TEST_MAP50_95, math.nan))
    for key in (KD_LOSS, START_VAL_MAP50, TRANSFER_FRAMES, PSEUDO_BOXES, *ROUTING_KEYS, *COLLAB_KEYS):
        if key in metrics:
            out[key] = _number(metrics, key, where)
    for key in (TEACHER_VAL_MAP50, TEACHERS_KEPT):
        if key in metrics:
            values = metrics[key]
            if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                   or not math.isfinite(float(v)) for v in values):
                raise ProtocolError(f"{where}: '{key}'={values!r} must be a list of numbers")
            out[key] = [float(v) for v in values]
    return out


def parse_site(site: Mapping[str, Any], nc: int) -> dict[str, Any]:
    """Validate a reply's site identity (id, position in km, class ids)."""
    where = "site"
    site_id = site.get(SITE_ID)
    if not isinstance(site_id, str) or not site_id:
        raise ProtocolError(f"{where}: '{SITE_ID}'={site_id!r} must be a non-empty string")
    pos = site.get(POSITION_KM)
    if not isinstance(pos, list) or len(pos) != 2 or not all(isinstance(v, (int, float)) for v in pos):
        raise ProtocolError(f"{where}: '{POSITION_KM}'={pos!r} must be [x_km, y_km]")
    classes = site.get(CLASSES)
    if not isinstance(classes, list) or not all(isinstance(c, int) and 0 <= c < nc for c in classes):
        raise ProtocolError(f"{where}: '{CLASSES}'={classes!r} must be class ids in [0, {nc})")
    return {SITE_ID: site_id, POSITION_KM: [float(v) for v in pos], CLASSES: sorted(set(classes))}


@dataclass(frozen=True)
class KDRequest:
    """The distillation part of a train message (server -> client): who teaches, how much, with which loss.

    ``encode()`` gives the ConfigRecord entries, ``parse()`` reads them back (``None``:
    plain local training). The teachers' weights travel beside it as ArrayRecords
    ``teacher-<i>``, in the order of ``teacher_ids`` (:meth:`teacher_records`).
    A malformed request raises :class:`ProtocolError` naming the key, on either side.

    Example: ``KDRequest(("site-1", "cloud"), (0.5, 0.5), ("yolo11n", "yolo11s"), alpha=0.5,
    temperature=1.0, fg_threshold=0.25)`` is a student taught half by site-1's model, half by the cloud's.
    """

    teacher_ids: tuple[str, ...]
    teacher_weights: tuple[float, ...]  # mixing weights of the soft labels, one per teacher
    teacher_archs: tuple[str, ...]  # the model each teacher's weights load into
    alpha: float  # weight of the detection loss: alpha * det + (1 - alpha) * kd
    temperature: float
    fg_threshold: float
    select: str = "teacher-fg"
    student_check: bool = False
    check_margin: float = 0.0

    def __post_init__(self) -> None:
        where = "config"
        n = len(self.teacher_ids)
        if not n or not all(isinstance(t, str) and t for t in self.teacher_ids):
            raise ProtocolError(f"{where}: '{TEACHER_IDS}'={list(self.teacher_ids)!r} must name at least one teacher")
        if len(self.teacher_weights) != n or not all(_is_number(w) and w >= 0 for w in self.teacher_weights):
            raise ProtocolError(f"{where}: '{TEACHER_WEIGHTS}'={list(self.teacher_weights)!r} must have one weight "
                                f">= 0 per teacher {list(self.teacher_ids)}")
        if len(self.teacher_archs) != n or not all(isinstance(a, str) and a for a in self.teacher_archs):
            raise ProtocolError(f"{where}: '{TEACHER_ARCHS}'={list(self.teacher_archs)!r} must name one model per "
                                f"teacher {list(self.teacher_ids)}")
        for key, value, low, high in ((KD_ALPHA, self.alpha, 0.0, 1.0), (KD_FG_THRESHOLD, self.fg_threshold, 0.0, 1.0),
                                      (KD_CHECK_MARGIN, self.check_margin, 0.0, 1.0)):
            if not (_is_number(value) and low <= value <= high):
                raise ProtocolError(f"{where}: '{key}'={value!r} must be a number in [{low}, {high}]")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise ProtocolError(f"{where}: '{KD_TEMPERATURE}'={self.temperature!r} must be a number > 0")
        if self.select not in KD_SELECTIONS:
            raise ProtocolError(f"{where}: '{KD_SELECT}'={self.select!r} must be one of {KD_SELECTIONS}")
        if not isinstance(self.student_check, bool):
            raise ProtocolError(f"{where}: '{KD_STUDENT_CHECK}'={self.student_check!r} must be true or false")

    def encode(self) -> dict[str, Any]:
        """The ConfigRecord entries of this request."""
        return {TEACHER_IDS: list(self.teacher_ids), TEACHER_WEIGHTS: [float(w) for w in self.teacher_weights],
                TEACHER_ARCHS: list(self.teacher_archs), KD_ALPHA: float(self.alpha),
                KD_TEMPERATURE: float(self.temperature), KD_FG_THRESHOLD: float(self.fg_threshold),
                KD_SELECT: self.select, KD_STUDENT_CHECK: self.student_check,
                KD_CHECK_MARGIN: float(self.check_margin)}

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> KDRequest | None:
        """The request in a train message's config; ``None`` when it names no teachers (plain training)."""
        if not config.get(TEACHER_IDS):
            return None
        missing = [k for k in (TEACHER_WEIGHTS, TEACHER_ARCHS, KD_ALPHA, KD_TEMPERATURE, KD_FG_THRESHOLD, KD_SELECT)
                   if k not in config]
        if missing:
            raise ProtocolError(f"config: missing '{missing[0]}' in a distillation request")
        lists = {}
        for key in (TEACHER_IDS, TEACHER_WEIGHTS, TEACHER_ARCHS):
            if not isinstance(config[key], (list, tuple)):
                raise ProtocolError(f"config: '{key}'={config[key]!r} must be a list")
            lists[key] = tuple(config[key])
        return cls(lists[TEACHER_IDS], lists[TEACHER_WEIGHTS], lists[TEACHER_ARCHS], alpha=config[KD_ALPHA],
                   temperature=config[KD_TEMPERATURE], fg_threshold=config[KD_FG_THRESHOLD], select=config[KD_SELECT],
                   student_check=config.get(KD_STUDENT_CHECK, False), check_margin=config.get(KD_CHECK_MARGIN, 0.0))

    def teacher_records(self, content: Mapping[str, Any]) -> list:
        """The teachers' weight records (``teacher-<i>``) of a message's content, in ``teacher_ids`` order."""
        names = [teacher_record(i) for i in range(len(self.teacher_ids))]
        missing = [name for name in names if content.get(name) is None]
        if missing:
            raise ProtocolError(f"message has no weights for teacher record(s) {missing}")
        return [content[name] for name in names]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))


def encode_gallery(items: list[dict[str, Any]], images: list[bytes]) -> dict[str, Any]:
    """A gallery reply record: ``items`` (box sets per image, JSON-ready) and the encoded image files."""
    if len(items) != len(images):
        raise ValueError(f"gallery: {len(items)} items but {len(images)} images")
    return {GALLERY_ITEMS: json.dumps(items), GALLERY_IMAGES: list(images)}


def parse_gallery(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The gallery of a reply: each item's box sets plus ``"image"``, the image file's bytes.

    Only the shape is checked here (the boxes themselves by ``server.report.write_gallery``); a bad record
    raises :class:`ProtocolError` naming the key.
    """
    try:
        items = json.loads(record[GALLERY_ITEMS])
    except KeyError:
        raise ProtocolError(f"gallery: no '{GALLERY_ITEMS}'") from None
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"gallery: '{GALLERY_ITEMS}' is not JSON ({err})") from None
    images = record.get(GALLERY_IMAGES)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ProtocolError(f"gallery: '{GALLERY_ITEMS}' must be a list of objects")
    if not isinstance(images, list) or len(images) != len(items) or not all(isinstance(b, bytes) for b in images):
        raise ProtocolError(f"gallery: '{GALLERY_IMAGES}' must hold one bytes value per item ({len(items)})")
    return [{**item, "image": data} for item, data in zip(items, images)]
