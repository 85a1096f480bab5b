"""Checkpoint formats and :func:`load_policy`: one registry of readers, one loader on top.

Why a registry: ``load_policy`` reads para_policy's ``.safetensors``, DiffusionPolicy's ``.ckpt``
and LeRobot's directories, and more formats will come. Each format is a
:class:`CheckpointReader`: a name, a cheap ``can_read(path)`` test of what the file is, and
``read(path, **kwargs) -> (state_dict, PolicyConfig)``. Adding a format is one reader module (its
two functions) and one :func:`register_reader` call; ``load_policy`` and the evaluator ask
:func:`reader_for` which reader takes a path.

The loader is here, not in :mod:`para_policy.policy`, because it picks between
:class:`~para_policy.policy.LowdimPolicy` and :class:`~para_policy.image_policy.ImagePolicy`:
the policy module does not depend on its subclass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from para_policy import checkpoints
from para_policy.image_policy import ImagePolicy
from para_policy.integrations import diffusion_policy, lerobot_checkpoint
from para_policy.policy import LowdimPolicy
from para_policy.policy_config import PolicyConfig
from para_policy.samplers.registry import SamplerConfig

#: what a reader's ``read`` returns: the policy's state dict in para_policy's names, and its config
ReadResult = tuple[dict[str, torch.Tensor], PolicyConfig]


@dataclass(frozen=True)
class CheckpointReader:
    """One checkpoint format.

    Attributes:
        name: short identifier (``'para_policy'``); registering a name again replaces that reader.
        description: what it reads, as error messages list it (``'a DiffusionPolicy .ckpt'``).
        can_read: ``can_read(path: Path) -> bool``, whether this reader takes an existing path:
            cheap (a suffix, a directory's marker file, a few header bytes), never loading it.
        read: ``read(path: Path, **kwargs) -> (state_dict, PolicyConfig)``; ``load_policy`` passes
            ``trust_pickle``, which a reader of pickle-free files ignores. Raises
            ``FileNotFoundError`` / ``ValueError`` naming what is wrong with the file.
    """

    name: str
    description: str
    can_read: Callable[[Path], bool]
    read: Callable[..., ReadResult]


_READERS: list[CheckpointReader] = []


def register_reader(reader: CheckpointReader) -> CheckpointReader:
    """Add ``reader`` to the registry (replacing one of the same name); returns it.

    :func:`reader_for` asks the most recently registered reader first, so a format registered
    later can take paths a built-in reader would also accept.
    """
    _READERS[:] = [r for r in _READERS if r.name != reader.name]
    _READERS.append(reader)
    return reader


def readers() -> tuple[CheckpointReader, ...]:
    """The registered readers, in the order :func:`reader_for` asks them (newest first)."""
    return tuple(reversed(_READERS))


def describe_formats() -> str:
    """The known formats in words: ``'a para_policy .safetensors policy, ... or a LeRobot policy directory'``."""
    names = [r.description for r in reversed(readers())]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def reader_for(path: str | os.PathLike) -> CheckpointReader:
    """The reader that takes ``path``.

    Raises ``FileNotFoundError`` (``'checkpoint not found: ...'``) for a path that does not
    exist, ``ValueError`` listing the known formats when no reader takes it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for reader in readers():
        if reader.can_read(path):
            return reader
    what = "a directory" if path.is_dir() else f"a file ({path.suffix or 'no suffix'})"
    known = ", ".join(f"{r.name} ({r.description})" for r in reversed(readers()))
    raise ValueError(f"no checkpoint reader takes {path}, {what}; the known formats are {known}")


#: what a reader raises for a file it could not make sense of, short of a named ``ValueError``: turned into
#: one, naming the file, so that a caller (``eval.py``) can report every bad checkpoint the same way
MALFORMED_FILE_ERRORS = (TypeError, KeyError, IndexError, AttributeError, ArithmeticError, NotImplementedError,
                         RecursionError, RuntimeError, UnicodeError)


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:300]}"


def read_checkpoint(path: str | os.PathLike, **kwargs: Any) -> ReadResult:
    """``(state_dict, PolicyConfig)`` of any known format: :func:`reader_for`'s reader, ``kwargs`` to it.

    The readers check what they read and raise a ``ValueError`` naming the key; anything else a
    malformed file provokes (:data:`MALFORMED_FILE_ERRORS`) is raised as a ``ValueError`` naming
    the file too, the original chained.
    """
    path = Path(path)
    reader = reader_for(path)
    try:
        state_dict, config = reader.read(path, **kwargs)
    except MALFORMED_FILE_ERRORS as e:
        raise ValueError(f"{path} is not a usable {reader.description} ({_first_line(e)})") from e
    if not isinstance(config, PolicyConfig):
        raise TypeError(f"the {reader.name} reader returned a {type(config).__name__} config, expected a PolicyConfig")
    return state_dict, config


register_reader(CheckpointReader("para_policy", "a para_policy .safetensors policy",
                                 checkpoints.can_read_checkpoint, checkpoints.read_policy_checkpoint))
register_reader(CheckpointReader("diffusion_policy", "a DiffusionPolicy .ckpt",
                                 diffusion_policy.can_read_diffusion_policy, diffusion_policy.read_diffusion_policy))
register_reader(CheckpointReader("lerobot", "a LeRobot policy directory",
                                 lerobot_checkpoint.can_read_lerobot, lerobot_checkpoint.read_lerobot))


# ---- the loader ------------------------------------------------------------------------

def _checked_skeleton(path: Path, policy_class: type[LowdimPolicy], config: PolicyConfig,
                      state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights whose shapes differ from what the config builds, built on the meta device first.

    A config that asks for a huge network is refused without allocating it, and one that describes
    no network the class can build is a ``ValueError`` naming the file.
    """
    try:
        with torch.device("meta"):
            skeleton = policy_class(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except MALFORMED_FILE_ERRORS as e:
        raise ValueError(f"{path}: its config describes no network that can be built ({_first_line(e)})") from e
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    wrong = [(k, shape, tuple(state_dict[k].shape)) for k, shape in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != shape]
    if wrong:
        k, want, have = wrong[0]
        raise ValueError(f"{path}: checkpoint weights do not fit its config: the config makes {k} of shape {want}, "
                         f"the file holds {have} ({len(wrong)} tensors differ)")


def _load_weights(path: Path, policy: LowdimPolicy, state_dict: dict[str, torch.Tensor]) -> None:
    """``policy.load_state_dict``, every key accounted for, errors naming the file."""
    try:
        result = policy.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: checkpoint weights do not fit its config: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint does not match its config: missing keys {result.missing_keys[:10]}, "
            f"unexpected keys {result.unexpected_keys[:10]}"
        )


def load_policy(path: str | os.PathLike, sampler: str | SamplerConfig = "paradigms",
                device: str | torch.device = "cpu", *, trust_pickle: bool = False, backend: str = "default",
                **options: Any) -> LowdimPolicy:
    """Load a policy checkpoint and choose its sampler.

    Reads para_policy's own ``.safetensors`` checkpoints (no pickled code), DiffusionPolicy
    workspace ``.ckpt`` files (low-dim UNet and transformer policies, image and hybrid-image
    policies; EMA weights when the run used EMA; the ``[diffusion-policy]`` extra) and
    LeRobot saved diffusion-policy directories (``config.json``, ``model.safetensors`` and the
    normalization statistics). Image policies come back as :class:`~para_policy.image_policy.ImagePolicy`.
    A ``.ckpt`` is a pickle: it is read with
    a restricted unpickler that refuses any global beyond tensors, the OmegaConf config and
    plain data, before it runs; ``trust_pickle=True`` unpickles fully (files you trust only).
    ``sampler`` and ``options`` go to :meth:`LowdimPolicy.set_sampler` (default: the
    ``paradigms`` preset, the fastest measured setting; a ``LowdimPolicy(config)`` built directly
    starts with ``sequential``, the policy as trained). ``backend`` goes to
    :meth:`LowdimPolicy.set_inference`: ``'default'`` is the fastest runtime installed for the
    device (:func:`~para_policy.inference.default_backend`: ONNX Runtime per row count on a CPU
    with the ``[onnx]`` extra, eager PyTorch otherwise or with ``PARA_POLICY_BACKEND=eager``).
    """
    from para_policy.inference import check_inference_options

    check_inference_options(backend=backend)
    path = Path(path)
    state_dict, config = read_checkpoint(path, trust_pickle=trust_pickle)
    policy_class = ImagePolicy if config.is_image else LowdimPolicy
    _checked_skeleton(path, policy_class, config, state_dict)
    policy = policy_class(config)
    _load_weights(path, policy, state_dict)
    policy.to(device).eval()
    policy.set_sampler(sampler, **options)
    return policy.set_inference(backend=backend) if backend != "eager" else policy


__all__ = ["CheckpointReader", "describe_formats", "load_policy", "read_checkpoint", "reader_for", "readers",
           "register_reader"]
