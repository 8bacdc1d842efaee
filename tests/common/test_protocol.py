"""Tests for common.protocol: record keys, validation of node replies, the KD request."""

import math
import re

import pytest

from common import protocol as P
from common.protocol import ProtocolError, decode_ap, encode_ap, parse_site, parse_train_metrics

NAN = float("nan")


def _metrics(**changes):
    m = {P.NUM_EXAMPLES: 16, P.TRAIN_LOSS: 2.5, P.TRAIN_SECONDS: 3.0, P.VAL_MAP50: 0.25, P.TEST_MAP50: 0.5,
         P.TEST_MAP50_95: 0.2, P.TEST_AP50: [0.5, -1.0, 0.75]}
    m.update(changes)
    return {k: v for k, v in m.items() if v is not ...}


def _site(**changes):
    s = {P.SITE_ID: "site-1", P.POSITION_KM: [2.0, 0.0], P.CLASSES: [2, 0, 2]}
    s.update(changes)
    return {k: v for k, v in s.items() if v is not ...}


def test_keys_are_kebab_case():
    keys = [v for k, v in vars(P).items() if k.isupper() and isinstance(v, str)]
    assert keys and all(k == k.lower() and "_" not in k for k in keys)
    assert P.TEST_AP50 == "test-ap50" and P.NUM_EXAMPLES == "num-examples"


# --- AP encoding ----------------------------------------------------------------------------


def test_encode_ap_nan_becomes_absent():
    assert encode_ap([0.5, NAN, 0.0]) == [0.5, -1.0, 0.0]


def test_decode_ap_absent_becomes_nan():
    out = decode_ap([0.5, -1.0, 0.0])

    assert out[0] == 0.5 and math.isnan(out[1]) and out[2] == 0.0


def test_ap_round_trip():
    ap = [NAN, 0.125, 1.0, NAN]

    out = decode_ap(encode_ap(ap))

    assert [math.isnan(v) for v in out] == [True, False, False, True]
    assert out[1:3] == [0.125, 1.0]


def test_encode_decode_empty():
    assert encode_ap([]) == [] and decode_ap([]) == []


# --- train metrics --------------------------------------------------------------------------


def test_parse_train_metrics_valid():
    out = parse_train_metrics(_metrics(), nc=3)

    assert out[P.NUM_EXAMPLES] == 16.0 and isinstance(out[P.NUM_EXAMPLES], float)
    assert (out[P.TRAIN_LOSS], out[P.TRAIN_SECONDS], out[P.VAL_MAP50], out[P.TEST_MAP50]) == (2.5, 3.0, 0.25, 0.5)
    assert out[P.TEST_AP50][0] == 0.5 and math.isnan(out[P.TEST_AP50][1]) and out[P.TEST_AP50][2] == 0.75
    assert out[P.TEST_MAP50_95] == 0.2


def test_parse_train_metrics_map50_95_is_optional():
    out = parse_train_metrics(_metrics(**{P.TEST_MAP50_95: ...}), nc=3)

    assert math.isnan(out[P.TEST_MAP50_95])


@pytest.mark.parametrize("key", [P.NUM_EXAMPLES, P.TRAIN_LOSS, P.TRAIN_SECONDS, P.VAL_MAP50, P.TEST_MAP50])
def test_missing_number_is_named(key):
    with pytest.raises(ProtocolError, match=f"missing '{key}'"):
        parse_train_metrics(_metrics(**{key: ...}), nc=3)


@pytest.mark.parametrize("value", ["3", True, NAN, None, [1.0]])
@pytest.mark.parametrize("key", [P.NUM_EXAMPLES, P.TRAIN_LOSS, P.VAL_MAP50])
def test_non_number_is_named(key, value):
    with pytest.raises(ProtocolError) as info:
        parse_train_metrics(_metrics(**{key: value}), nc=3)

    assert f"'{key}'" in str(info.value) and "not a number" in str(info.value)


@pytest.mark.parametrize("key, value", [(P.NUM_EXAMPLES, 0), (P.NUM_EXAMPLES, -4), (P.VAL_MAP50, 1.5),
                                        (P.TEST_MAP50, -0.1)])
def test_out_of_range_is_named(key, value):
    with pytest.raises(ProtocolError) as info:
        parse_train_metrics(_metrics(**{key: value}), nc=3)

    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("ap", [[0.5, 0.5], [0.5, 0.5, 0.5, 0.5], None, 0.5, (0.5, 0.5, 0.5)])
def test_ap_of_wrong_length_or_kind_is_named(ap):
    with pytest.raises(ProtocolError) as info:
        parse_train_metrics(_metrics(**{P.TEST_AP50: ap}), nc=3)

    assert f"'{P.TEST_AP50}'" in str(info.value) and "3 values" in str(info.value)


def test_ap_missing_is_named():
    with pytest.raises(ProtocolError, match=f"'{P.TEST_AP50}'"):
        parse_train_metrics(_metrics(**{P.TEST_AP50: ...}), nc=3)


@pytest.mark.parametrize("key", [P.NUM_EXAMPLES, P.TRAIN_LOSS])
def test_infinite_number_is_rejected(key):
    with pytest.raises(ProtocolError, match=f"'{key}'"):
        parse_train_metrics(_metrics(**{key: math.inf}), nc=3)


@pytest.mark.parametrize("bad", [7.0, -0.5])
def test_ap_entry_out_of_range_is_rejected(bad):
    with pytest.raises(ProtocolError, match=f"'{P.TEST_AP50}'"):
        parse_train_metrics(_metrics(**{P.TEST_AP50: [0.5, bad, 0.25]}), nc=3)


# --- site -----------------------------------------------------------------------------------


def test_parse_site_valid_sorts_and_dedups_classes():
    out = parse_site(_site(), nc=8)

    assert out == {P.SITE_ID: "site-1", P.POSITION_KM: [2.0, 0.0], P.CLASSES: [0, 2]}


def test_parse_site_int_position_becomes_float():
    out = parse_site(_site(**{P.POSITION_KM: [1, 2]}), nc=8)

    assert out[P.POSITION_KM] == [1.0, 2.0] and all(isinstance(v, float) for v in out[P.POSITION_KM])


@pytest.mark.parametrize(
    "key, value",
    [
        (P.SITE_ID, ...), (P.SITE_ID, ""), (P.SITE_ID, 3),
        (P.POSITION_KM, ...), (P.POSITION_KM, [1.0]), (P.POSITION_KM, "1,2"), (P.POSITION_KM, [1.0, "x"]),
        (P.CLASSES, ...), (P.CLASSES, [8]), (P.CLASSES, [-1]), (P.CLASSES, [1.0]), (P.CLASSES, "0,1"),
    ],
)
def test_parse_site_bad_value_is_named(key, value):
    with pytest.raises(ProtocolError) as info:
        parse_site(_site(**{key: value}), nc=8)

    assert f"'{key}'" in str(info.value)


# --- KDRequest ------------------------------------------------------------------------------


def _kd(**changes) -> P.KDRequest:
    kw = dict(teacher_ids=("site-1", "cloud"), teacher_weights=(0.25, 0.75), teacher_archs=("yolo11n", "yolo11s"),
              alpha=0.5, temperature=2.0, fg_threshold=0.3, select="teacher-better", student_check=True,
              check_margin=0.05)
    return P.KDRequest(**{**kw, **changes})


def test_kd_request_round_trip():
    kd = _kd()

    config = kd.encode()

    assert config == {P.TEACHER_IDS: ["site-1", "cloud"], P.TEACHER_WEIGHTS: [0.25, 0.75],
                      P.TEACHER_ARCHS: ["yolo11n", "yolo11s"], P.KD_ALPHA: 0.5, P.KD_TEMPERATURE: 2.0,
                      P.KD_FG_THRESHOLD: 0.3, P.KD_SELECT: "teacher-better", P.KD_STUDENT_CHECK: True,
                      P.KD_CHECK_MARGIN: 0.05}
    assert P.KDRequest.parse(config) == kd
    assert P.KDRequest.parse({P.EPOCHS: 1}) is None  # no teachers: plain local training


@pytest.mark.parametrize("key, value", [
    (P.TEACHER_WEIGHTS, [1.0]), (P.TEACHER_WEIGHTS, "0.25,0.75"), (P.TEACHER_ARCHS, ["yolo11n"]),
    (P.KD_ALPHA, 1.5), (P.KD_TEMPERATURE, 0.0), (P.KD_FG_THRESHOLD, "high"), (P.KD_SELECT, "teacher-worse"),
    (P.KD_STUDENT_CHECK, "yes"), (P.KD_CHECK_MARGIN, math.inf), (P.TEACHER_WEIGHTS, [True, 0.5]),
])
def test_malformed_kd_request_names_the_key(key, value):
    config = {**_kd().encode(), key: value}

    with pytest.raises(ProtocolError, match=f"'{key}'"):
        P.KDRequest.parse(config)


@pytest.mark.parametrize("key", [P.TEACHER_WEIGHTS, P.TEACHER_ARCHS, P.KD_ALPHA, P.KD_TEMPERATURE,
                                 P.KD_FG_THRESHOLD, P.KD_SELECT])
def test_kd_request_missing_key_is_named(key):
    config = {k: v for k, v in _kd().encode().items() if k != key}

    with pytest.raises(ProtocolError, match=f"'{key}'"):
        P.KDRequest.parse(config)


def test_kd_request_teacher_records_in_order_and_missing_ones_named():
    kd = _kd()

    assert kd.teacher_records({P.teacher_record(0): "a", P.teacher_record(1): "b", P.ARRAYS: "own"}) == ["a", "b"]
    with pytest.raises(ProtocolError, match="teacher-1"):
        kd.teacher_records({P.teacher_record(0): "a"})


# --- the report's gallery in a reply ----------------------------------------------------------


def test_gallery_round_trip_keeps_items_and_image_bytes():
    items = [{"gt": {"xyxy": [[1.0, 2.0, 3.0, 4.0]], "cls": [0]}, "edge": None}, {"gt": None}]

    record = P.encode_gallery(items, [b"\x89PNG", b"\xff\xd8"])

    assert P.parse_gallery(record) == [{**items[0], "image": b"\x89PNG"}, {**items[1], "image": b"\xff\xd8"}]


@pytest.mark.parametrize("record, named", [
    ({P.GALLERY_IMAGES: []}, f"no '{P.GALLERY_ITEMS}'"),
    ({P.GALLERY_ITEMS: "[{", P.GALLERY_IMAGES: []}, "is not JSON"),
    ({P.GALLERY_ITEMS: '{"gt": null}', P.GALLERY_IMAGES: []}, "must be a list of objects"),
    ({P.GALLERY_ITEMS: "[{}, {}]", P.GALLERY_IMAGES: [b"x"]}, "one bytes value per item (2)"),
    ({P.GALLERY_ITEMS: "[{}]", P.GALLERY_IMAGES: ["x"]}, "one bytes value per item (1)"),
])
def test_malformed_gallery_is_named(record, named):
    with pytest.raises(ProtocolError, match=re.escape(named)):
        P.parse_gallery(record)


def test_encode_gallery_needs_one_image_per_item():
    with pytest.raises(ValueError, match="2 items but 1 images"):
        P.encode_gallery([{}, {}], [b"x"])
