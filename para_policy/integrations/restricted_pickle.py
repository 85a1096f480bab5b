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
"""

from __future__ import annotations

import _compat_pickle
import builtins
import importlib
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


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file names a global that a DiffusionPolicy checkpoint does not need; nothing was run."""


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


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` whose ``find_class`` resolves only :data:`ALLOWED` globals."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) name some modules as Python 2 did
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module in ("dill._dill", "dill") and name == "_load_type":
            return _load_type
        if module in ("_codecs", "codecs") and name == "encode":
            return _encode
        if name in ALLOWED.get(module, ()):
            if module == "builtins" and name == "NoneType":
                return type(None)
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpointError(
            f"refusing to load global {module}.{name}: a DiffusionPolicy checkpoint holds only tensors, its "
            "OmegaConf config and plain data, so this file may run code when unpickled. Nothing was run. Load it "
            "with trust_pickle=True only if you trust whoever wrote it.")


Unpickler = RestrictedUnpickler


def load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()
