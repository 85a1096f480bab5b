"""Rename ConditionalUnet1D weights between DiffusionPolicy and LeRobot naming.

Why: LeRobot (``lerobot/common/policies/diffusion/modeling_diffusion.py``) ships the same UNet as
Diffusion Policy, with identical shapes but different module names, so its checkpoints (e.g. the
``model.safetensors`` of a LeRobot diffusion policy) can run in :class:`ConditionalUnet1D` after a
pure key rename. Inside a residual block / UNet level the differences are::

    DiffusionPolicy                              LeRobot
    <block>.blocks.0.<rest>                      <block>.conv1.<rest>
    <block>.blocks.1.<rest>                      <block>.conv2.<rest>
    {down,up}_modules.<L>.2.conv.{weight,bias}   {down,up}_modules.<L>.2.{weight,bias}

where ``<block>`` is ``{down,up}_modules.<L>.{0,1}``, ``mid_modules.<i>`` or
``local_cond_encoder.<i>``. Everything else (``diffusion_step_encoder.*``, ``cond_encoder.*``,
``residual_conv.*``, ``final_conv.*``) is named alike. LeRobot has no local conditioning;
``local_cond_encoder`` keys are renamed by the same rule only so that a round trip is lossless.

Prefixes: only keys starting with ``src_prefix`` are treated as UNet weights; that prefix is
replaced by ``dst_prefix``. The defaults fit whole-policy state dicts: ``"model."`` for
DiffusionPolicy (``payload["state_dicts"]["model"]`` or ``["ema_model"]`` of a workspace
checkpoint) and ``"diffusion.unet."`` for a LeRobot ``DiffusionPolicy``. Pass ``""`` for a bare
UNet state dict (e.g. ``dst_prefix=""`` to get keys for ``ConditionalUnet1D.load_state_dict``).
All other keys (observation encoders, normalizers, ...) are passed through unchanged. Values are
never copied or modified.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["diffusion_policy_to_lerobot_keys", "lerobot_to_diffusion_policy_keys"]

V = TypeVar("V")

_BLOCK = r"(?P<block>(?:down|up)_modules\.\d+\.[01]|mid_modules\.\d+|local_cond_encoder\.\d+)"
_RESAMPLE = r"(?P<level>(?:down|up)_modules\.\d+\.2)"

_DP_CONV = re.compile(rf"^{_BLOCK}\.blocks\.(?P<i>[01])\.")
_DP_RESAMPLE = re.compile(rf"^{_RESAMPLE}\.conv\.(?P<param>weight|bias)$")
_LR_CONV = re.compile(rf"^{_BLOCK}\.conv(?P<i>[12])\.")
_LR_RESAMPLE = re.compile(rf"^{_RESAMPLE}\.(?P<param>weight|bias)$")


def _dp_to_lr(key: str) -> str:
    key = _DP_CONV.sub(lambda m: f"{m['block']}.conv{int(m['i']) + 1}.", key)
    return _DP_RESAMPLE.sub(lambda m: f"{m['level']}.{m['param']}", key)


def _lr_to_dp(key: str) -> str:
    key = _LR_CONV.sub(lambda m: f"{m['block']}.blocks.{int(m['i']) - 1}.", key)
    return _LR_RESAMPLE.sub(lambda m: f"{m['level']}.conv.{m['param']}", key)


def _convert(
    state_dict: Mapping[str, V], src_prefix: str, dst_prefix: str, rename: Callable[[str], str]
) -> dict[str, V]:
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        if key.startswith(src_prefix):
            new_key = dst_prefix + rename(key[len(src_prefix) :])
        else:
            new_key = key
        if new_key in out:
            raise ValueError(f"key collision: {key!r} maps to {new_key!r}, which is already present")
        out[new_key] = value
    return out


def diffusion_policy_to_lerobot_keys(
    state_dict: Mapping[str, V], src_prefix: str = "model.", dst_prefix: str = "diffusion.unet."
) -> dict[str, V]:
    """Rename DiffusionPolicy UNet keys (under ``src_prefix``) to LeRobot's (under ``dst_prefix``).

    Returns a new dict with the same values in the same order; keys outside ``src_prefix`` are kept.
    Raises ValueError if two keys would end up with the same name.
    """
    return _convert(state_dict, src_prefix, dst_prefix, _dp_to_lr)


def lerobot_to_diffusion_policy_keys(
    state_dict: Mapping[str, V], src_prefix: str = "diffusion.unet.", dst_prefix: str = "model."
) -> dict[str, V]:
    """Rename LeRobot UNet keys (under ``src_prefix``) to DiffusionPolicy's (under ``dst_prefix``).

    Use ``dst_prefix=""`` and keep only the renamed keys to load into :class:`ConditionalUnet1D`.
    Returns a new dict with the same values in the same order; keys outside ``src_prefix`` are kept.
    Raises ValueError if two keys would end up with the same name.
    """
    return _convert(state_dict, src_prefix, dst_prefix, _lr_to_dp)
