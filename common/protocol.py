"""Record keys of the messages between the ServerApp and the ClientApps.

Defined once here (kebab-case, as Flower records use) and validated at the
boundary: a reply that lacks a key or carries a value of the wrong kind raises
:class:`ProtocolError` naming the key, and the strategy drops that reply.
This module is plain Python (no flwr) so both sides and the tests can use it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# record names inside a message's RecordDict
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# ConfigRecord "config" (server -> client)
SERVER_ROUND = "server-round"
EPOCHS = "epochs"
# ... of a distillation message: the student's teachers travel as ArrayRecords "teacher-<i>"
KD_ALPHA = "kd-alpha"
KD_TEMPERATURE = "kd-temperature"
KD_FG_THRESHOLD = "kd-fg-threshold"
KD_SELECTIONS = ("teacher-fg", "teacher-better")
KD_SELECT = "kd-select"  # which anchors are distilled on: "teacher-fg" or "teacher-better" (common.distill)
TEACHER_IDS = "teacher-ids"
TEACHER_WEIGHTS = "teacher-weights"
TEACHER_ARCHS = "teacher-archs"
KD_STUDENT_CHECK = "kd-student-check"  # the student keeps only teachers better than itself on its own val split
KD_CHECK_MARGIN = "kd-check-margin"  # ... by more than this (val mAP50)

# ... the run's own cloud detection service (cloud.serve; server.cloud_process), in every train message:
# the sites' collaboration step offloads to it
CLOUD_URL = "cloud-url"
CLOUD_TOKEN = "cloud-token"


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
# ambiguity routing on the site's test split (paper section 4.2), optional
OFFLOAD_FRACTION = "offload-fraction"  # share of edge detections that would go to the cloud
EDGE_RECALL = "edge-recall"  # recall (IoU 0.5, class-agnostic) of all edge detections
CONFIDENT_RECALL = "confident-recall"  # ... of the confident ones only (edge output without the cloud)
EDGE_LATENCY_MS = "edge-latency-ms"  # per image, batch 1
ROUTING_KEYS = (OFFLOAD_FRACTION, EDGE_RECALL, CONFIDENT_RECALL, EDGE_LATENCY_MS)
# collaboration with the cloud detection service (only when the node knows the service), optional
COLLAB_RECALL = "collab-recall"  # recall of the merged edge + cloud answer
COLLAB_LATENCY_MS = "collab-latency-ms"  # per image: edge + cloud round trip when offloaded
UPLOAD_BYTES = "upload-bytes"  # JPEG bytes sent per test image
COLLAB_KEYS = (COLLAB_RECALL, COLLAB_LATENCY_MS, UPLOAD_BYTES)

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
    for key in (KD_LOSS, START_VAL_MAP50, *ROUTING_KEYS, *COLLAB_KEYS):
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


def parse_kd_config(config: Mapping[str, Any], teacher_records: list) -> dict[str, Any] | None:
    """The distillation part of a train message: ``None`` for plain local training.

    Returns ``{"teachers": [(record, arch, weight)], "alpha", "temperature", "fg_threshold", "select", ...}``.
    """
    ids = config.get(TEACHER_IDS)
    if not ids:
        return None
    where = "config"
    weights, archs = config.get(TEACHER_WEIGHTS), config.get(TEACHER_ARCHS)
    if not isinstance(weights, list) or len(weights) != len(ids):
        raise ProtocolError(f"{where}: '{TEACHER_WEIGHTS}'={weights!r} must have one weight per teacher {ids}")
    if not isinstance(archs, list) or len(archs) != len(ids):
        raise ProtocolError(f"{where}: '{TEACHER_ARCHS}'={archs!r} must name one model per teacher {ids}")
    missing = [teacher_record(i) for i, rec in enumerate(teacher_records) if rec is None]
    if missing:
        raise ProtocolError(f"message has no weights for teacher record(s) {missing}")
    out = {"teachers": list(zip(teacher_records, archs, [float(w) for w in weights])), "ids": list(ids),
           "student_check": bool(config.get(KD_STUDENT_CHECK, False)),
           "check_margin": float(config.get(KD_CHECK_MARGIN, 0.0)), "select": config.get(KD_SELECT, "teacher-fg")}
    if out["select"] not in KD_SELECTIONS:
        raise ProtocolError(f"{where}: '{KD_SELECT}'={out['select']!r} must be one of {KD_SELECTIONS}")
    for key, name in ((KD_ALPHA, "alpha"), (KD_TEMPERATURE, "temperature"), (KD_FG_THRESHOLD, "fg_threshold")):
        out[name] = _number(config, key, where)
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
