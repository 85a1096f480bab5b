"""Policy checkpoints: our own pickle-free format, and its reader for :mod:`para_policy.loading`.

A para_policy checkpoint is one ``.safetensors`` file. Its tensors are the policy's
state dict in DiffusionPolicy's naming (``model.*`` for the UNet,
``normalizer.params_dict.{obs,action}.*`` for the normalizer), and its metadata holds
the policy configuration as JSON under the key ``para_policy``. Loading it runs no
code, unlike a pickled ``.ckpt``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from para_policy.policy_config import PolicyConfig, parse_json_config

FORMAT_KIND = "para_policy.lowdim_diffusion_policy"
FORMAT_VERSION = 1
METADATA_KEY = "para_policy"


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` and move the result over ``path`` in one rename.

    A crash halfway leaves the previous file intact: readers see the old file or
    the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                    config: dict | PolicyConfig) -> Path:
    """Write ``state_dict`` and the JSON-serialisable ``config`` (a dict or a :class:`PolicyConfig`) atomically."""
    if isinstance(config, PolicyConfig):
        config = config.to_dict()
    config = {"kind": FORMAT_KIND, "version": FORMAT_VERSION, **config}
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()  # safetensors stores no aliases (robomimic's encoder names its modules twice)
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    metadata = {METADATA_KEY: json.dumps(config)}  # key order kept: encoders concatenate in shape_meta order
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a para_policy checkpoint: returns ``(state_dict, config)``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file
    that is not a para_policy checkpoint (naming what was found instead).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises several kinds for a bad file
        raise ValueError(
            f"{path} is not a safetensors file ({type(e).__name__}: {e}); expected a para_policy "
            "checkpoint (.safetensors)"
        ) from e
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{path} has no '{METADATA_KEY}' metadata: it is a safetensors file but not a "
            f"para_policy checkpoint (metadata keys: {sorted(metadata)[:20]})"
        )
    # the config is checked (size, nesting, node count) before the weights are read
    config = parse_json_config(metadata[METADATA_KEY], f"{path}: the checkpoint's config")
    if config.get("kind") != FORMAT_KIND:
        raise ValueError(f"{path}: unknown checkpoint kind {str(config.get('kind'))[:80]!r}, expected {FORMAT_KIND!r}")
    version = config.get("version", -1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: the checkpoint's format version must be an integer, got {str(version)[:80]!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version} is newer than this "
            f"para_policy understands ({FORMAT_VERSION}); upgrade para_policy"
        )
    try:
        state_dict = load_file(str(path))
    except Exception as e:  # a header that promised more than the file holds, ...
        raise ValueError(f"{path}: its tensors cannot be read ({type(e).__name__}: {e})") from e
    return state_dict, config


# ---- the reader :func:`para_policy.loading.load_policy` uses ------------------------------

SUFFIX = ".safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def can_read_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a file named ``*.safetensors`` or one that starts like a safetensors file.

    A safetensors file starts with the little-endian u64 size of its JSON header, then ``{``.
    The suffix alone is enough, so a damaged ``.safetensors`` file reaches
    :func:`load_checkpoint` and its error.
    """
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == SUFFIX:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= min(_MAX_HEADER, path.stat().st_size - 8) and head[8:9] == b"{"


def read_policy_checkpoint(path: str | os.PathLike, **kwargs: Any) -> tuple[dict[str, torch.Tensor], PolicyConfig]:
    """:func:`load_checkpoint`'s state dict and its metadata as a :class:`PolicyConfig` (``kwargs`` unused).

    The envelope (``kind``, ``version``) is checked by :func:`load_checkpoint` and skipped by
    :meth:`PolicyConfig.from_dict`; a bad config raises ``ValueError`` naming the file.
    """
    state_dict, config = load_checkpoint(path)
    try:
        return state_dict, PolicyConfig.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
