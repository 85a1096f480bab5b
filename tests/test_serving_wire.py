"""The policy server's message format (para_policy/serving/wire.py): a round trip, and hostile bytes refused.

Every refusal must be a :class:`WireError` (never another exception, never a pickle load), since the
bytes come from whoever reaches the port.
"""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from para_policy.serving.protocol import META_KEY
from para_policy.serving.wire import MAX_HEADER_BYTES, WireError, decode, encode


def blob(header: dict, data: bytes = b"") -> bytes:
    """A hand-made safetensors blob: 8-byte length, the JSON ``header``, ``data``."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


META = {"__metadata__": {META_KEY: "{}"}}


def test_round_trip_keeps_arrays_dtypes_and_metadata():
    arrays = {"obs.obs": np.arange(40, dtype=np.float32).reshape(2, 20),
              "image": np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5),
              "f64": np.linspace(0, 1, 3), "i32": np.array([1, -2], np.int32), "i64": np.array([7], np.int64),
              "mask": np.array([True, False]), "empty": np.zeros((0, 2), np.float32),
              "strided": np.arange(10, dtype=np.float32)[::2]}
    meta = {"session": "abc", "warm": {"chunk": 3, "shift": 8}, "deadline_ms": None, "x": [1.5, "y"]}
    out, got = decode(encode(arrays, meta))
    assert got == meta and set(out) == set(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape, name
        np.testing.assert_array_equal(out[name], a)
        assert out[name].flags.writeable
    assert decode(encode({}, {})) == ({}, {})


def test_encode_refuses_what_decode_would():
    with pytest.raises(WireError, match="float16"):
        encode({"x": np.zeros(2, np.float16)}, {})
    with pytest.raises(ValueError):
        encode({}, {"x": float("nan")})


GOOD = encode({"a": np.ones((2, 2), np.float32)}, {"k": 1})
HOSTILE = {
    "a pickle": (pickle.dumps({"obs": np.ones(3)}), "header length|too short|not a safetensors|fit"),
    "empty": (b"", "too short"),
    "truncated": (GOOD[:-3], "cover"),
    "padded": (GOOD + b"\0", "cover"),
    "header past the end": (struct.pack("<Q", 4000) + b"{}", "does not fit"),
    "huge header": (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{" * (MAX_HEADER_BYTES + 1), "over the limit"),
    "non-object JSON": (blob([1, 2]), "JSON object"),  # type: ignore[arg-type]
    "not JSON": (struct.pack("<Q", 4) + b"\xff{}x", "JSON"),
    "duplicate key": (struct.pack("<Q", 40) + b'{"__metadata__":{},"__metadata__":{}}   ', "duplicate"),
    "missing META_KEY": (blob({"__metadata__": {"other": "{}"}}), META_KEY),
    "no __metadata__": (blob({}), "__metadata__"),
    "metadata not strings": (blob({"__metadata__": {META_KEY: {"a": 1}}}), "strings"),
    "metadata not an object": (blob({"__metadata__": {META_KEY: "[1]"}}), "JSON object"),
    "metadata NaN": (blob({"__metadata__": {META_KEY: '{"a": NaN}'}}), "NaN"),
    "bad dtype": (blob({**META, "x": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0"), "F16"),
    "object dtype": (blob({**META, "x": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "'O'"),
    "negative shape": (blob({**META, "x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}), "non-negative"),
    "too many dims": (blob({**META, "x": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}, b"\0"), "8"),
    "offsets not size": (blob({**META, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
                         "needs 8"),
    "overlap": (blob({**META, "x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                      "y": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6), "overlap"),
    "gap": (blob({**META, "x": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4), "overlap"),
    "extra entry key": (blob({**META, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "code": "rm"}},
                             b"\0"), "exactly the keys"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bytes_are_refused_with_a_wire_error(name):
    data, message = HOSTILE[name]
    with pytest.raises(WireError, match=message):
        decode(data)


def test_size_limit_and_a_real_safetensors_file():
    with pytest.raises(WireError, match="over the limit"):
        decode(GOOD, max_bytes=len(GOOD) - 1)
    arrays, meta = decode(save({"a": np.ones(3, np.float32)}, metadata={META_KEY: json.dumps({"x": 1})}))
    assert meta == {"x": 1} and arrays["a"].tolist() == [1, 1, 1]
    with pytest.raises(WireError, match="__metadata__"):
        decode(save({"a": np.ones(3, np.float32)}))  # a plain safetensors file is not a message
