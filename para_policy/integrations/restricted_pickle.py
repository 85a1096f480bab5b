"""Unpickling DiffusionPolicy ``.ckpt`` files without running code chosen by whoever wrote them.

A DiffusionPolicy workspace checkpoint is ``torch.save(payload, pickle_module=dill)`` of
``{'cfg': DictConfig, 'state_dicts': {...}, 'pickles': {name: dill bytes}}``. Unpickling
calls whatever callable the file names (``GLOBAL`` + ``REDUCE``), so a crafted file can run
``os.system`` before any check of ours. :class:`RestrictedUnpickler` resolves only the
globals such a file legitimately holds: torch's tensor rebuilding, OmegaConf containers and
nodes, plain builtins and collections, numpy arrays and scalars, and dill's ``_load_type``
for built-in type names. Anything else stops with :class:`UnsafeCheckpointError` naming the
global, before it is called. The ``pickles`` entries stay bytes (they are never unpickled).

Use it as torch's ``pickle_module``: ``torch.load(path, pickle_module=restricted_pickle,
weights_only=False)``; torch keeps reading tensor storages through its own persistent loads.

Allowed globals can still allocate: ``bytearray(3_000_000_000)`` is 40 bytes of pickle, and one
list held in the memo can be copied into a new list a million times. Every call the file makes
(``REDUCE``, ``NEWOBJ``, ``INST``/``OBJ``) is therefore checked before it runs: a buffer or
storage sized by an integer is refused, an array's shape and every copy of a container are
counted against :data:`MAX_REBUILT_BYTES`. That needs the pure-Python unpickler (the C one calls
without asking); the pickled part of a checkpoint is its structure and config, so it stays fast
(torch reads the tensor data itself).
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import copyreg
import functools
import importlib
import math
import pickle
from typing import Any

#: module → names that may be resolved (anything under these names is data, not behaviour)
ALLOWED: dict[str, frozenset[str]] = {
    "builtins": frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                           "bytearray", "bool", "slice", "object", "NoneType", "range"}),
    "collections": frozenset({"OrderedDict", "defaultdict", "deque", "Counter"}),
    "copyreg": frozenset({"_reconstructor"}),
    "typing": frozenset({"Any"}),
    "torch": frozenset({"Size", "device", "dtype", "float32", "float64", "float16", "bfloat16", "int64", "int32",
                        "int16", "int8", "uint8", "bool", "FloatStorage", "DoubleStorage", "HalfStorage",
                        "BFloat16Storage", "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage",
                        "BoolStorage"}),
    "torch._utils": frozenset({"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                               "_rebuild_parameter_with_state"}),
    "torch.storage": frozenset({"UntypedStorage", "TypedStorage"}),
    "numpy": frozenset({"ndarray", "dtype"}),
    "numpy.core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy._core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy.dtypes": frozenset({"Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"}),
    "omegaconf.dictconfig": frozenset({"DictConfig"}),
    "omegaconf.listconfig": frozenset({"ListConfig"}),
    "omegaconf.base": frozenset({"ContainerMetadata", "Metadata"}),
    "omegaconf.nodes": frozenset({"AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode",
                                  "PathNode", "EnumNode", "ValueNode"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "Path", "PurePosixPath"}),
}
#: what dill's ``_load_type(name)`` may return: built-in types only
DILL_TYPES = frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                        "bool", "NoneType", "object", "type", "slice", "range", "bytearray"})


#: bytes of data the file's calls may build beyond what it holds (copies of containers, bytes, arrays)
MAX_REBUILT_BYTES = 128 << 20
#: containers whose construction copies its argument (8 bytes counted per item, 1 per byte or character)
_COPYING = (bytes, bytearray, str, list, tuple, set, frozenset, dict, collections.OrderedDict, collections.deque,
            collections.Counter)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file names a global that a DiffusionPolicy checkpoint does not need, or asks one to allocate
    more than a checkpoint's structure needs; nothing was run."""


def _load_type(name: str) -> type:
    """dill's ``_load_type`` for built-in type names (``'NoneType'``, ``'dict'``, ...), nothing else."""
    if name not in DILL_TYPES:
        raise UnsafeCheckpointError(f"the file asks dill for type {name!r}; only built-in types are allowed")
    return type(None) if name == "NoneType" else getattr(builtins, name)


def _encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: a str to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafeCheckpointError(f"_codecs.encode of a {type(text).__name__} with {encoding!r} is not allowed")
    return text.encode(encoding, errors)


@functools.cache
def _sized_types() -> tuple[type, ...]:
    """torch's storage classes: built from a count they allocate it (a checkpoint's storages are persistent loads)."""
    import torch

    return (torch.storage.UntypedStorage, torch.storage.TypedStorage,
            *(getattr(torch, n) for n in sorted(ALLOWED["torch"]) if n.endswith("Storage")))


def _array_shape(func: Any, args: tuple) -> Any:
    """The shape argument of ``numpy.ndarray(shape, ...)`` / ``_reconstruct(cls, shape, dtype)``, else None."""
    try:
        import numpy
    except ImportError:
        return None
    if func is numpy.ndarray:
        return args[0] if args else None
    if getattr(func, "__name__", "") == "_reconstruct" and "numpy" in str(getattr(func, "__module__", "")):
        return args[1] if len(args) > 1 else None
    return None


class RestrictedUnpickler(pickle._Unpickler):
    """A pure-Python unpickler whose ``find_class`` resolves only :data:`ALLOWED` globals and whose calls are checked.

    A call that would allocate from a number (``bytearray(n)``, a storage of ``n`` elements) is
    refused; the data its calls build is counted against :data:`MAX_REBUILT_BYTES`.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rebuilt = 0

    def _charge(self, what: str, size: int) -> None:
        self._rebuilt += size
        if self._rebuilt > MAX_REBUILT_BYTES:
            raise UnsafeCheckpointError(
                f"refusing {what}: the file's calls would build more than {MAX_REBUILT_BYTES} bytes "
                "(MAX_REBUILT_BYTES) beyond the data it holds. Nothing was run.")

    def _check_call(self, func: Any, args: tuple) -> None:
        """Refuse (before it runs) a call of an allowed global that allocates from a number; count copies."""
        name = getattr(func, "__qualname__", type(func).__name__)
        base, sized = func, args[:1]
        if func is copyreg._reconstructor and len(args) == 3:  # base.__new__(cls, state); base.__init__(obj, state)
            base, sized = args[1], args[2:]
        if base in (bytes, bytearray) or isinstance(base, type) and issubclass(base, _sized_types()):
            count = next((a for a in sized if isinstance(a, int) and not isinstance(a, bool)), None)
            if count is not None:
                raise UnsafeCheckpointError(
                    f"refusing {name}({_number(count)}): a checkpoint's pickle holds data, not sizes of buffers "
                    "to allocate. Nothing was run.")
        shape = _array_shape(func, args)
        if shape is not None:
            dims = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (tuple, list)) else ()
            if not all(isinstance(d, int) and d >= 0 for d in dims):
                raise UnsafeCheckpointError(f"refusing {name} with shape {str(shape)[:80]}. Nothing was run.")
            self._charge(f"{name} of shape {str(shape)[:80]}", 8 * math.prod(dims))
        if isinstance(base, type) and issubclass(base, _COPYING):
            for arg in sized:
                if hasattr(arg, "__len__") and not isinstance(arg, type):
                    per_item = 1 if issubclass(base, (str, bytes, bytearray)) else 8
                    self._charge(f"{name}(<{type(arg).__name__} of {len(arg)}>)", per_item * len(arg))

    def load_reduce(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_reduce()

    def load_newobj(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check_call(self.stack[-3], self.stack[-2])
        super().load_newobj_ex()

    def _instantiate(self, klass: Any, args: list) -> None:
        self._check_call(klass, tuple(args))
        super()._instantiate(klass, args)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) name some modules as Python 2 did
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module in ("dill._dill", "dill") and name == "_load_type":
            return _load_type
        if module in ("_codecs", "codecs") and name == "encode":
            return self._encode
        if name in ALLOWED.get(module, ()):
            if module == "builtins" and name == "NoneType":
                return type(None)
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpointError(
            f"refusing to load global {module}.{name}: a DiffusionPolicy checkpoint holds only tensors, its "
            "OmegaConf config and plain data, so this file may run code when unpickled. Nothing was run. Load it "
            "with trust_pickle=True only if you trust whoever wrote it.")


    def _encode(self, text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """:func:`_encode`, its result counted against :data:`MAX_REBUILT_BYTES` (a memo can repeat it)."""
        if isinstance(text, str):
            self._charge(f"_codecs.encode(<str of {len(text)}>)", len(text))
        return _encode(text, encoding, errors)


def _number(value: int) -> str:
    """An int for a message: its digits, or its size in bits when it is huge."""
    return str(value) if value.bit_length() <= 128 else f"<an integer of {value.bit_length()} bits>"


Unpickler = RestrictedUnpickler


def load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()
