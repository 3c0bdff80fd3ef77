"""events.canonical.loads decodes with orjson first: the same values as json.loads for everything, including what
orjson refuses (then the standard decoder decides, and raises what it raises)."""

from __future__ import annotations

import json

import pytest

from events.canonical import canonical_json, loads

CASES = [
    b'{"a":[1,2.5,null,true,false],"b":{"c":"\\u00e9\\u2028"},"d":-0.0,"e":1e300}',
    b'{"big":123456789012345678901234567890,"neg":-98765432109876543210}',  # beyond 64 bits: orjson refuses
    b'{"nan":NaN,"inf":Infinity,"minf":-Infinity}',  # json.loads accepts these, orjson does not
    b'{"dup":1,"dup":2}',
    b' {"spaced" : [ 1 , 2 ] } ',
    b'"\\ud800"',  # a lone surrogate escape
    b'[0.1,0.2,0.30000000000000004,5e-324,1.7976931348623157e308,123456789.123456789]',
    '["é"]'.encode("utf-16"),  # not UTF-8: json.loads detects the encoding
]


@pytest.mark.parametrize("raw", CASES)
def test_the_same_values_as_json_loads(raw: bytes) -> None:
    want = json.loads(raw)
    got = loads(raw)
    assert repr(got) == repr(want)  # repr: NaN != NaN, -0.0 == 0.0
    if raw[:2] != b"\xff\xfe":
        assert repr(loads(raw.decode("utf-8"))) == repr(want)  # text as well as bytes


def test_canonical_json_round_trips() -> None:
    value = {"z": [1, {"y": "ü"}], "a": 2**70, "f": 0.1}
    assert loads(canonical_json(value)) == value


@pytest.mark.parametrize("raw", [b'{"a":', b"\xff", b"", b"[1,]", b'{"a":1}x'])
def test_what_is_not_json_raises_as_json_loads_does(raw: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        loads(raw)
