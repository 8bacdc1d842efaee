"""common/cloud_api.py: the ids and the crop metadata both sides of the cloud HTTP API use."""

from __future__ import annotations

import pytest

from common.cloud_api import (
    META_MAX_BYTES,
    RequestError,
    check_ids,
    encode_crop_meta,
    json_depth,
    offload_id,
    parse_crop_meta,
)


def test_crop_meta_the_edge_encodes_is_what_the_service_parses():
    # regions [10,20,42,52] and [100,0,140,24] at atlas corners (0, 0) and (0, 32)
    regions, corners = [[10, 20, 42, 52], [100, 0, 140, 24]], [[0, 0], [0, 32]]
    assert parse_crop_meta(encode_crop_meta(regions, corners), None) == [
        {"x0": 10.0, "y0": 20.0, "scale": 1.0, "ax": 0, "ay": 0, "width": 32, "height": 32},
        {"x0": 100.0, "y0": 0.0, "scale": 1.0, "ax": 0, "ay": 32, "width": 40, "height": 24}]
    assert parse_crop_meta(encode_crop_meta(regions), 2) == [{"x0": 10.0, "y0": 20.0, "scale": 1.0},
                                                              {"x0": 100.0, "y0": 0.0, "scale": 1.0}]


def test_ids_follow_one_rule():
    assert offload_id("site-0", "run1", 17) == "site-0.run1.000017"
    assert check_ids("site-0", "run1.000017") == ("site-0", "run1.000017")
    for site, frame, message in [(None, None, "missing header X-Cedar-Site"), ("../etc", None, "bad X-Cedar-Site"),
                                 ("a" * 65, None, "bad X-Cedar-Site"), ("s", "a b", r"bad X-Cedar-Frame 'a b'")]:
        with pytest.raises(RequestError, match=message) as err:
            check_ids(site, frame)
        assert err.value.status == 400


def test_parse_crop_meta_names_the_bad_field():
    assert parse_crop_meta(b'{"crops": [{"x0": 1, "y0": 2}, {"x0": 0, "y0": 0, "scale": [2, 3]}]}', 2) == [
        {"x0": 1.0, "y0": 2.0, "scale": 1.0}, {"x0": 0.0, "y0": 0.0, "scale": [2.0, 3.0]}]
    cases = {
        b"not json": "meta is not valid JSON",
        b"[1, 2]": "list 'crops'",
        b'{"crops": [{"x0": 1, "y0": 2}]}': "lists 1 crops but the body has 2",
        b'{"crops": [{"x0": 1, "y0": 2}, {"y0": 3}]}': r"meta.crops\[1\].x0 is missing",
        b'{"crops": [{"x0": 1, "y0": 2}, {"x0": "abc", "y0": 3}]}':
            r"meta.crops\[1\].x0 must be a number in \[0, 1e\+06\]",
        b'{"crops": [{"x0": 1, "y0": -2}, {"x0": 0, "y0": 3}]}': r"meta.crops\[0\].y0 .* got -2",
        b'{"crops": [{"x0": 1, "y0": 2, "scale": 0}, {"x0": 0, "y0": 3}]}':
            r"meta.crops\[0\].scale must be a number in \[0.001, 1000\], got 0",
        b'{"crops": [{"x0": 1, "y0": 2, "zoom": 2}, {"x0": 0, "y0": 3}]}': r"unknown field\(s\) \['zoom'\]",
    }
    for text, message in cases.items():
        with pytest.raises(RequestError, match=message) as err:
            parse_crop_meta(text, 2)
        assert err.value.status == 422
    # on an atlas (n_crops None) every crop also names its cell, in whole pixels
    atlas = b'{"crops": [{"x0": 5, "y0": 6, "ax": 0, "ay": 16, "width": 30, "height": 20}]}'
    assert parse_crop_meta(atlas, None) == [
        {"x0": 5.0, "y0": 6.0, "scale": 1.0, "ax": 0, "ay": 16, "width": 30, "height": 20}]
    for text, message in {
        b'{"crops": [{"x0": 5, "y0": 6, "ax": 0, "ay": 16, "width": 30}]}': r"meta.crops\[0\].height is missing",
        b'{"crops": [{"x0": 5, "y0": 6, "ax": 0.5, "ay": 0, "width": 3, "height": 2}]}':
            r"meta.crops\[0\].ax must be a whole number of pixels in \[0, 1000000\], got 0.5",
        b'{"crops": [{"x0": 5, "y0": 6, "ax": 0, "ay": 0, "width": 0, "height": 2}]}':
            r"width .* in \[1, 1000000\], got 0",
        b'{"crops": []}': "meta.crops is empty",
    }.items():
        with pytest.raises(RequestError, match=message):
            parse_crop_meta(text, None)


def test_meta_size_nesting_and_magnitudes_are_bounded_before_use():
    """A 100,000-deep array (a RecursionError inside json.loads if decoded), a 300 KiB meta, a 5,000-digit
    integer (over Python's int-string limit), NaN, and coordinates or scales that would overflow float32
    frame boxes: each is a 4xx naming the problem."""
    assert json_depth(b'{"crops": [{"x0": 1, "scale": [2, 2]}]}') == 4
    assert json_depth(b'["[[[[", {"a": "]]\\"[["}]') == 2  # brackets in strings (and escaped quotes) do not count
    assert json_depth(b"") == 0
    deep = b"[" * 100_000 + b"]" * 100_000
    padded = b'{"crops": [{"x0": 1, "y0": 2}], "pad": "' + b"x" * META_MAX_BYTES + b'"}'
    cases = {
        deep: (422, "meta nests 100000 levels deep; the limit is 8"),
        b'{"crops": [{"x0": 1, "y0": 2, "scale": [[[[[[[1]]]]]]]}]}': (422, "meta nests 10 levels deep"),
        padded: (413, f"meta is {len(padded)} bytes; the limit is {META_MAX_BYTES} bytes"),
        b'{"crops": [{"x0": ' + b"9" * 5000 + b', "y0": 2}]}': (422, "meta is not valid JSON: .*digits"),
        b'{"crops": [{"x0": 1' + b"0" * 400 + b', "y0": 2}]}': (422, r"meta.crops\[0\].x0 must be a number in"),
        b'{"crops": [{"x0": NaN, "y0": 2}]}': (422, r"meta.crops\[0\].x0 must be a number in .* got nan"),
        b'{"crops": [{"x0": 1, "y0": Infinity}]}': (422, r"meta.crops\[0\].y0 .* got inf"),
        b'{"crops": [{"x0": 1, "y0": 1000001}]}': (422, r"meta.crops\[0\].y0 .* got 1000001"),
        b'{"crops": [{"x0": 1, "y0": 2, "scale": [1, 1e-300]}]}': (422, r"meta.crops\[0\].scale\[1\] .* got 1e-300"),
        b'{"crops": [{"x0": 1, "y0": 2, "scale": true}]}': (422, r"meta.crops\[0\].scale .* got True"),
        b'\xff\xfe{}': (422, "meta is not valid JSON"),
    }
    for text, (status, message) in cases.items():
        with pytest.raises(RequestError, match=message) as err:
            parse_crop_meta(text, 1)
        assert err.value.status == status, message
    # the bounds themselves are accepted
    assert parse_crop_meta(b'{"crops": [{"x0": 1000000, "y0": 0, "scale": [0.001, 1000]}]}', 1) == [
        {"x0": 1e6, "y0": 0.0, "scale": [0.001, 1000.0]}]
