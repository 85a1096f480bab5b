"""One policy-server message as bytes: a safetensors blob of named arrays plus one JSON object.

Why a parser of our own: the bytes come from the network, so :func:`decode` accepts exactly the
safetensors layout and nothing else (an 8-byte little-endian header length, a JSON header, the
data) and checks every field before it touches the data: a pickle, a truncated or padded frame,
overlapping tensors, a dtype outside :data:`DTYPES` or a giant header is refused with a
:class:`WireError` naming what was wrong. Nothing here unpickles or evaluates anything.

Imports only the standard library, numpy and ``safetensors.numpy``, so the robot side needs no torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save

from para_policy.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, META_KEY

#: safetensors dtype name → numpy dtype (little-endian): the only dtypes a message may hold
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}
#: the longest JSON header accepted (the arrays' descriptions and the metadata)
MAX_HEADER_BYTES = 64 * 1024
#: the most dimensions an array may have
MAX_DIMS = 8
#: the longest JSON text of the message's metadata object
MAX_META_BYTES = 32 * 1024
HEADER_LENGTH_BYTES = 8
SAFETENSORS_META = "__metadata__"


class WireError(ValueError):
    """A malformed message; the text names what was wrong and what was expected."""


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """``arrays`` (each C-contiguous, one of :data:`DTYPES`) and the JSON object ``meta`` as one safetensors blob."""
    if not isinstance(meta, Mapping):
        raise WireError(f"message metadata must be a mapping (a JSON object), got {type(meta).__name__}")
    text = json.dumps(dict(meta), allow_nan=False)
    out = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.newbyteorder("<") not in DTYPES.values() or array.ndim > MAX_DIMS:
            raise WireError(f"array {name!r} is {array.dtype} with {array.ndim} dims; a message holds "
                            f"{', '.join(str(d) for d in DTYPES.values())} arrays of at most {MAX_DIMS} dims")
        out[name] = array
    return save(out, metadata={META_KEY: text})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of every JSON object read here: a repeated key is an error, not "the last wins"."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireError(f"duplicate JSON key {key!r} in the message")
        out[key] = value
    return out


def _constant(name: str) -> None:
    raise WireError(f"JSON constant {name} is not allowed in a message (numbers must be finite)")


def _json_object(text: str | bytes, what: str) -> dict[str, Any]:
    """``text`` parsed as one JSON object (no duplicate keys, no NaN/Infinity), or a :class:`WireError`."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_constant)
    except WireError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError(f"{what} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _header(data: bytes, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The JSON header of ``data`` and where the data section starts."""
    if len(data) > max_bytes:
        raise WireError(f"message is {len(data)} bytes, over the limit of {max_bytes}")
    if len(data) < HEADER_LENGTH_BYTES + 2:
        raise WireError(f"message is {len(data)} bytes, too short for a safetensors blob (8-byte length + header)")
    (n,) = struct.unpack("<Q", data[:HEADER_LENGTH_BYTES])
    if n > MAX_HEADER_BYTES:
        raise WireError(f"header length {n} is over the limit of {MAX_HEADER_BYTES} bytes")
    if n < 2 or HEADER_LENGTH_BYTES + n > len(data):
        raise WireError(f"header length {n} does not fit the message of {len(data)} bytes "
                        "(truncated, or not a safetensors blob)")
    return _json_object(bytes(data[HEADER_LENGTH_BYTES: HEADER_LENGTH_BYTES + n]), "header"), HEADER_LENGTH_BYTES + n


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise WireError(f"array {name!r}: shape must be a list of at most {MAX_DIMS} sizes, got {shape!r}")
    if not all(type(s) is int and s >= 0 for s in shape):
        raise WireError(f"array {name!r}: shape must hold non-negative integers, got {shape!r}")
    return tuple(shape)


def _entry(name: str, entry: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """One array's header entry checked: ``(dtype, shape, start, end)``, its size matching its offsets."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise WireError(f"array {name!r}: expected exactly the keys dtype, shape, data_offsets, got {got}")
    if entry["dtype"] not in DTYPES:
        raise WireError(f"array {name!r}: dtype {entry['dtype']!r} is not allowed; expected one of {sorted(DTYPES)}")
    dtype, shape, offsets = DTYPES[entry["dtype"]], _shape(name, entry["shape"]), entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise WireError(f"array {name!r}: data_offsets must be two non-negative integers, got {offsets!r}")
    start, end = offsets
    if end - start != dtype.itemsize * math.prod(shape):
        raise WireError(f"array {name!r}: data_offsets {offsets} span {end - start} bytes, but {entry['dtype']} "
                        f"{list(shape)} needs {dtype.itemsize * math.prod(shape)}")
    return dtype, shape, start, end


def _meta(header: dict[str, Any]) -> dict[str, Any]:
    """The message's JSON object, from the header's ``__metadata__`` (a str → str dict) under :data:`META_KEY`."""
    stored = header.pop(SAFETENSORS_META, None)
    if not isinstance(stored, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in stored.items()):
        raise WireError(f"header {SAFETENSORS_META!r} must be an object of strings holding {META_KEY!r}, got "
                        f"{type(stored).__name__}")
    if META_KEY not in stored:
        raise WireError(f"header {SAFETENSORS_META!r} is missing the message key {META_KEY!r}")
    text = stored[META_KEY]
    if len(text) > MAX_META_BYTES:
        raise WireError(f"message metadata is {len(text)} characters, over the limit of {MAX_META_BYTES}")
    return _json_object(text, f"message metadata {META_KEY!r}")


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A message's ``(arrays, meta)``: writeable copies of its arrays and its JSON object; :class:`WireError` if
    the bytes are anything but a well-formed blob of :data:`DTYPES` arrays whose data tiles the data section."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    header, begin = _header(data, max_bytes)
    meta = _meta(header)
    entries = {name: _entry(name, entry) for name, entry in header.items()}
    size, at = len(data) - begin, 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if start != at:
            raise WireError(f"array {name!r} starts at {start}, expected {at}: tensors overlap or leave a gap")
        at = end
    if at != size:
        raise WireError(f"the arrays cover {at} bytes of a data section of {size}: truncated or padded message")
    arrays = {}
    for name, (dtype, shape, start, _) in entries.items():
        raw = np.frombuffer(data, dtype=np.uint8 if dtype == np.bool_ else dtype, count=math.prod(shape),
                            offset=begin + start).reshape(shape)
        arrays[name] = raw != 0 if dtype == np.bool_ else raw.copy()  # a bool byte other than 0/1 reads as True
    return arrays, meta


__all__ = ["DTYPES", "MAX_DIMS", "MAX_HEADER_BYTES", "MAX_META_BYTES", "WireError", "decode", "encode"]
