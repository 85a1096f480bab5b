"""Read a LeRobot diffusion-policy directory (``save_pretrained`` output) without LeRobot.

Why: LeRobot users hold directories with ``config.json`` + ``model.safetensors`` (+ processor
files since LeRobot 0.4); para_policy runs them after converting to its own image-policy
``(state_dict, config)``. Nothing is unpickled and no code runs: JSON and safetensors only.

Two layouts of the normalization statistics are read:

* ``"processors"`` (LeRobot >= 0.4, e.g. 0.6.1): ``policy_preprocessor.json`` and
  ``policy_postprocessor.json`` list their steps; the ``normalizer_processor`` step (inputs)
  and the ``unnormalizer_processor`` step (action) name a ``state_file`` holding tensors
  ``<feature>.<stat>`` (stat in min, max, mean, std, count, q01 ... q99, for every dataset
  feature). Each step's config gives ``eps``, ``features`` (key → type) and ``norm_map``
  (type → mode); a feature whose type is not in ``norm_map`` is left as is (IDENTITY).
* ``"buffers"`` (LeRobot <= 0.3): the statistics are tensors of ``model.safetensors``:
  ``normalize_inputs.buffer_<key with . → _>.{mean,std}`` (MEAN_STD) or ``.{min,max}``
  (MIN_MAX), ``normalize_targets.buffer_action.*`` and ``unnormalize_outputs.buffer_action.*``;
  modes come from ``config.json``'s ``normalization_mapping``; IDENTITY features have none.

LeRobot's formulas (``x`` raw, ``y`` normalized; all in float32; visual stats have shape
(C, 1, 1), the others the feature's shape):

processors layout (``processor/normalize_processor.py``, ``eps`` from the step's config,
1e-8 as LeRobot writes it)::

    MEAN_STD  normalize:    y = (x - mean) / (std + eps)
              unnormalize:  x = y * std + mean                       (no eps)
    MIN_MAX   denom = max - min, with entries equal to 0 replaced by eps
              normalize:    y = 2 * (x - min) / denom - 1
              unnormalize:  x = (y + 1) / 2 * denom + min

buffers layout (``policies/normalize.py``, eps fixed at 1e-8)::

    MEAN_STD  normalize:    y = (x - mean) / (std + 1e-8)
              unnormalize:  x = y * std + mean
    MIN_MAX   normalize:    y = (x - min) / (max - min + 1e-8) * 2 - 1
              unnormalize:  x = (y + 1) / 2 * (max - min) + min

IDENTITY leaves values unchanged. The affine form given in the state dict is, per field,
``y = x * scale + offset``: MEAN_STD ``scale = 1 / (std + eps)``, ``offset = -mean * scale``;
MIN_MAX ``scale = 2 / denom``, ``offset = -1 - min * scale`` (``denom = max - min + 1e-8`` in
the buffers layout); IDENTITY ``scale = 1``, ``offset = 0``. It equals the formulas up to float
rounding; the policy's :class:`~para_policy.normalizer.LinearNormalizer` computes the exact
formulas from the statistics (modes ``mean_std``, ``min_max``, ``min_max_eps`` for the buffers
layout's min-max, ``identity``).

Everything the conversion needs is read from the files and nothing is filled in from
LeRobot's defaults (they changed between releases): a missing field is a ValueError naming
it. ``resize_shape`` / ``crop_ratio`` (LeRobot >= 0.6) may be absent: older releases had no
resizing. With ``resize_shape`` set, ``crop_shape`` is derived as LeRobot's ``__post_init__``
does on loading (``int(resize * crop_ratio)`` when ``crop_ratio < 1``, else no crop).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from para_policy.models.lerobot_keys import lerobot_to_diffusion_policy_keys
from para_policy.normalizer import LEROBOT_EPS
from para_policy.policy_config import (
    MAX_CHANNELS,
    MAX_CONFIG_BYTES,
    MAX_FEATURE_DIM,
    MAX_UNET_LEVELS,
    PolicyConfig,
    config_int,
    parse_json_config,
    short_repr,
)
from para_policy.schedule import build_scheduler

__all__ = ["can_read_lerobot", "read_lerobot", "read_lerobot_directory"]
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
ACTION_KEY = "action"
MODES = {"MEAN_STD": "mean_std", "MIN_MAX": "min_max", "IDENTITY": "identity"}
STAT_NAMES = ("min", "max", "mean", "std")
MODE_STATS = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "identity": ()}
# Placeholders for statistics a mode never reads and the files do not hold.
PLACEHOLDER = {"mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0}
BUFFER_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
PREPROCESSOR_STEPS = {"rename_observations_processor", "to_batch_processor", "device_processor",
                      "normalizer_processor"}
POSTPROCESSOR_STEPS = {"unnormalizer_processor", "device_processor"}
SCHEDULERS = {"DDPM": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler",
              "DDIM": "diffusers.schedulers.scheduling_ddim.DDIMScheduler"}
PREDICTION_TYPES = ("epsilon", "sample")

UNET_FIELDS = ("horizon", "n_obs_steps", "n_action_steps", "down_dims", "kernel_size", "n_groups",
               "diffusion_step_embed_dim", "use_film_scale_modulation")
SCHEDULER_FIELDS = ("noise_scheduler_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                    "prediction_type", "clip_sample", "clip_sample_range", "num_inference_steps")
IMAGE_FIELDS = ("vision_backbone", "crop_shape", "crop_is_random", "use_group_norm", "spatial_softmax_num_keypoints",
                "use_separate_rgb_encoder_per_camera")


# ---------------------------------------------------------------- LeRobot's formulas

def _affine(stats: Mapping[str, Tensor], mode: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(scale, offset)`` with ``normalize(x) ≈ x * scale + offset`` (kept in the state dict for inspection)."""
    if mode == "mean_std":
        scale = 1 / (stats["std"] + eps)
        return scale, -stats["mean"] * scale
    if mode in ("min_max", "min_max_eps"):
        span = stats["max"] - stats["min"]
        span = span + eps if mode == "min_max_eps" else torch.where(span == 0, torch.full_like(span, eps), span)
        scale = 2 / span
        return scale, -1 - stats["min"] * scale
    like = next(iter(stats.values()))
    return torch.ones_like(like), torch.zeros_like(like)


# ---------------------------------------------------------------- config.json

@dataclass
class _Features:
    images: dict[str, list[int]]
    state_dim: int
    env_dim: int
    action_dim: int
    types: dict[str, str]  # every input/output feature key → its LeRobot type
    shapes: dict[str, list[int]]


def _checked_file(directory: Path, name: str) -> Path:
    """``directory / name``, a regular file that stays in the checkpoint: a symlink out of it is refused.

    Why: a directory is the file's author's, and a link named ``config.json`` could point at
    ``/etc/passwd`` or a key. A link may leave the directory only to the file of the same name in
    another LeRobot directory (one holding a ``config.json``: a copy assembled from links to
    another checkpoint's files), or into the Hugging Face cache's ``blobs`` folder from a
    ``snapshots/<revision>`` folder (how ``huggingface_hub`` stores downloads).
    """
    path = directory / name
    if path.is_symlink():
        root, target = directory.resolve(), path.resolve()
        same_file_elsewhere = target.name == name and (target.parent / "config.json").is_file()
        hub_blob = root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"
        if not target.is_relative_to(root) and not same_file_elsewhere and not hub_blob:
            raise ValueError(f"{path} is a symlink to {target}, outside the checkpoint directory; refusing to "
                             "read it (copy the file into the directory if it belongs to the checkpoint)")
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found in {directory}")
    return path


def _read_json(directory: Path, name: str) -> dict:
    """A JSON object file of the checkpoint, its size, nesting and node count bounded before it is used."""
    path = _checked_file(directory, name)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size} bytes, more than {MAX_CONFIG_BYTES} (MAX_CONFIG_BYTES)")
    return parse_json_config(path.read_bytes(), str(path))


def _require(cfg: Mapping[str, Any], names: tuple[str, ...] | list[str], where: str = "config.json") -> None:
    missing = [n for n in names if n not in cfg]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing} needed for the conversion (nothing is filled in "
                         "from LeRobot's defaults, which changed between releases)")


#: config.json's integer fields and the policy_config limit each is held to (others: MAX_FEATURE_DIM)
INT_LIMITS = {"horizon": "MAX_HORIZON", "n_obs_steps": "MAX_OBS_STEPS", "n_action_steps": "MAX_HORIZON",
              "num_train_timesteps": "MAX_TRAIN_TIMESTEPS", "num_inference_steps": "MAX_INFERENCE_STEPS",
              "kernel_size": "MAX_KERNEL_SIZE", "n_groups": "MAX_CHANNELS", "diffusion_step_embed_dim": "MAX_CHANNELS",
              "spatial_softmax_num_keypoints": "MAX_CHANNELS"}


def _int(cfg: Mapping[str, Any], name: str, minimum: int = 1) -> int:
    """``cfg[name]`` as an int within its limit (:data:`INT_LIMITS`); JSON integers only, no floats."""
    return config_int(name, cfg[name], INT_LIMITS.get(name, "MAX_FEATURE_DIM"), minimum, where="config.json:",
                      floats=False)


def _bool(cfg: Mapping[str, Any], name: str) -> bool:
    if not isinstance(cfg[name], bool):
        raise ValueError(f"config.json: {name} must be true or false, got {cfg[name]!r}")
    return cfg[name]


def _float(cfg: Mapping[str, Any], name: str) -> float:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json: {name} must be a number, got {value!r}")
    return float(value)


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_FEATURE_DIM for v in value):
        raise ValueError(f"{where}: shape must be a list of positive integers of at most {MAX_FEATURE_DIM} "
                         f"(MAX_FEATURE_DIM), got {short_repr(value)}")
    return list(value)


def _feature_dict(cfg: Mapping[str, Any], name: str) -> dict[str, dict]:
    features = cfg[name]
    if not isinstance(features, dict) or not all(
            isinstance(f, dict) and "type" in f and "shape" in f for f in features.values()):
        raise ValueError(f"config.json: {name} must map keys to {{'type', 'shape'}}, got {features!r}")
    return features


def _read_features(cfg: Mapping[str, Any]) -> _Features:
    """The features LeRobot's DiffusionModel uses (as its config properties select them)."""
    inputs = _feature_dict(cfg, "input_features")
    outputs = _feature_dict(cfg, "output_features")
    types = {k: str(f["type"]) for k, f in {**inputs, **outputs}.items()}
    shapes = {k: _shape(f["shape"], f"config.json feature {k!r}") for k, f in {**inputs, **outputs}.items()}
    # image_features: every VISUAL input, in input_features order.
    images = {k: shapes[k] for k, f in inputs.items() if f["type"] == "VISUAL"}
    # robot_state_feature: the STATE input named observation.state; DiffusionModel requires it.
    if inputs.get(STATE_KEY, {}).get("type") != "STATE":
        raise ValueError(f"config.json: input_features must contain {STATE_KEY!r} of type STATE (LeRobot's "
                         f"DiffusionModel conditions on it); got {sorted(inputs)}")
    if len(shapes[STATE_KEY]) != 1:
        raise ValueError(f"config.json: {STATE_KEY} must be 1-D, got shape {shapes[STATE_KEY]}")
    # env_state_feature: the first ENV input; the model reads it as observation.environment_state.
    env = [k for k, f in inputs.items() if f["type"] == "ENV"]
    if len(env) > 1 or (env and env[0] != ENV_STATE_KEY):
        raise ValueError(f"config.json: the only ENV input LeRobot's DiffusionModel reads is {ENV_STATE_KEY!r}, "
                         f"got {env}")
    if env and len(shapes[ENV_STATE_KEY]) != 1:
        raise ValueError(f"config.json: {ENV_STATE_KEY} must be 1-D, got shape {shapes[ENV_STATE_KEY]}")
    if not images and not env:
        raise ValueError("config.json: a diffusion policy needs an image (VISUAL) or an environment-state (ENV) input")
    first = next(iter(images.values()), None)
    for key, shape in images.items():
        if len(shape) != 3:
            raise ValueError(f"config.json: image {key!r} must have shape [C, H, W], got {shape}")
        if shape != first:
            raise ValueError(f"config.json: all images must have the same shape (as LeRobot requires), got {images}")
    if outputs.get(ACTION_KEY, {}).get("type") != "ACTION" or len(shapes[ACTION_KEY]) != 1:
        raise ValueError(f"config.json: output_features must contain a 1-D {ACTION_KEY!r} of type ACTION, "
                         f"got {outputs}")
    return _Features(images=images, state_dim=shapes[STATE_KEY][0],
                     env_dim=shapes[ENV_STATE_KEY][0] if env else 0, action_dim=shapes[ACTION_KEY][0],
                     types=types, shapes=shapes)


def _crop_and_resize(cfg: Mapping[str, Any]) -> tuple[list[int] | None, list[int] | None]:
    """``(crop_shape, resize_shape)`` as LeRobot's ``DiffusionConfig.__post_init__`` leaves them."""
    resize = cfg.get("resize_shape")  # absent before LeRobot 0.6: no resizing then
    crop = cfg["crop_shape"]
    crop = None if crop is None else _shape(crop, "config.json crop_shape")
    if resize is None:
        return crop, None
    resize = _shape(resize, "config.json resize_shape")
    _require(cfg, ["crop_ratio"])
    ratio = _float(cfg, "crop_ratio")
    if not 0 < ratio <= 1:
        raise ValueError(f"config.json: crop_ratio must be in (0, 1], got {ratio}")
    if ratio < 1:
        return [int(resize[0] * ratio), int(resize[1] * ratio)], resize
    return None, resize


def _encoder_spec(cfg: Mapping[str, Any], feats: _Features) -> dict[str, Any]:
    """The :class:`LeRobotObsEncoder` spec; without cameras the image fields are inert placeholders."""
    spec: dict[str, Any] = {
        "kind": "lerobot", "image_keys": list(feats.images), "image_shape": None,
        "state_key": STATE_KEY, "state_dim": feats.state_dim,
        "env_state_key": ENV_STATE_KEY if feats.env_dim else None, "env_state_dim": feats.env_dim,
        "crop_shape": None, "crop_is_random": False, "use_group_norm": False, "spatial_softmax_num_keypoints": 1,
        "separate_per_camera": False, "vision_backbone": "resnet18", "pretrained_backbone_weights": None,
        "resize_shape": None,
    }
    if not feats.images:
        return spec
    _require(cfg, IMAGE_FIELDS)
    if cfg["vision_backbone"] != "resnet18":
        raise ValueError(f"config.json: vision_backbone {cfg['vision_backbone']!r} is not implemented; only "
                         "'resnet18' is")
    crop, resize = _crop_and_resize(cfg)
    weights = cfg.get("pretrained_backbone_weights")  # initialization only: the weights are in the file
    if weights is not None and not isinstance(weights, str):
        raise ValueError(f"config.json: pretrained_backbone_weights must be a string or null, got {weights!r}")
    spec.update(
        image_shape=list(next(iter(feats.images.values()))), crop_shape=crop, resize_shape=resize,
        crop_is_random=_bool(cfg, "crop_is_random"), use_group_norm=_bool(cfg, "use_group_norm"),
        spatial_softmax_num_keypoints=_int(cfg, "spatial_softmax_num_keypoints"),
        separate_per_camera=_bool(cfg, "use_separate_rgb_encoder_per_camera"),
        pretrained_backbone_weights=weights,
    )
    return spec


def _scheduler_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The diffusers kwargs LeRobot's ``_make_noise_scheduler`` passes, and the inference steps."""
    _require(cfg, SCHEDULER_FIELDS)
    kind = cfg["noise_scheduler_type"]
    if kind not in SCHEDULERS:
        raise ValueError(f"config.json: noise_scheduler_type {kind!r} is not implemented; expected one of "
                         f"{sorted(SCHEDULERS)}")
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"config.json: prediction_type {cfg['prediction_type']!r} is not implemented; expected one "
                         f"of {PREDICTION_TYPES}")
    if not isinstance(cfg["beta_schedule"], str):
        raise ValueError(f"config.json: beta_schedule must be a string, got {cfg['beta_schedule']!r}")
    scheduler: dict[str, Any] = {
        "_target_": SCHEDULERS[kind],
        "num_train_timesteps": _int(cfg, "num_train_timesteps"),
        "beta_start": _float(cfg, "beta_start"),
        "beta_end": _float(cfg, "beta_end"),
        "beta_schedule": cfg["beta_schedule"],
        "clip_sample": _bool(cfg, "clip_sample"),
        "clip_sample_range": _float(cfg, "clip_sample_range"),
        "prediction_type": cfg["prediction_type"],
    }
    # LeRobot passes none of these; they are diffusers' defaults, written out so a later change of
    # those defaults cannot change the schedule.
    if kind == "DDPM":
        scheduler["variance_type"] = "fixed_small"
    else:
        scheduler.update(set_alpha_to_one=True, steps_offset=0)
    try:  # diffusers rejects what it cannot build (e.g. an unknown beta_schedule): say so now
        build_scheduler(scheduler)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ValueError(f"config.json: the noise scheduler cannot be built from {scheduler}: {e}") from e
    steps = cfg["num_inference_steps"]
    steps = scheduler["num_train_timesteps"] if steps is None else _int(cfg, "num_inference_steps")
    return scheduler, steps


# ---------------------------------------------------------------- normalization statistics

@dataclass
class _Norm:
    mode: str
    stats: dict[str, Tensor]
    eps: float


def _mode(value: Any, where: str) -> str:
    if value not in MODES:
        raise ValueError(f"{where}: normalization mode {value!r} is not implemented; expected one of {sorted(MODES)}")
    return MODES[value]


def _checked_stats(key: str, mode: str, stats: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    needed = MODE_STATS[mode]
    missing = [s for s in needed if s not in stats]
    if missing:
        raise ValueError(f"{where}: {key!r} uses {mode} but its statistics {missing} are missing (LeRobot would "
                         "pass it through unnormalized, which a trained policy never expects)")
    out = {s: stats[s].to(torch.float32) for s in STAT_NAMES if s in stats}
    for s in needed:
        if not torch.isfinite(out[s]).all():
            raise ValueError(f"{where}: {key!r} statistic {s!r} is not finite (uninitialized buffers?)")
    return out


def _stats_by_feature(flat: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for name, tensor in flat.items():
        key, _, stat = name.rpartition(".")
        out.setdefault(key, {})[stat] = tensor
    return out


def _processor_steps(path: Path, filename: str, allowed: set[str], wanted: str) -> tuple[dict, dict, list]:
    """The one step named ``wanted`` of a processor JSON: ``(step config, its state tensors, all steps)``."""
    pipeline = _read_json(path, filename)
    steps = pipeline.get("steps")
    if not isinstance(steps, list):
        raise ValueError(f"{filename}: expected a 'steps' list")
    names = [s.get("registry_name", s.get("class")) if isinstance(s, dict) else None for s in steps]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"{filename}: steps {unknown} are not understood (known: {sorted(allowed)}); their effect "
                         "cannot be reproduced")
    found = [s for s, n in zip(steps, names, strict=True) if n == wanted]
    if len(found) != 1:
        raise ValueError(f"{filename}: expected exactly one {wanted!r} step, found {len(found)}")
    step = found[0]
    state_file = step.get("state_file")
    if not isinstance(state_file, str) or os.path.basename(state_file) != state_file or state_file in ("", ".", ".."):
        raise ValueError(f"{filename}: step {wanted!r} must name a state_file in the same directory, "
                         f"got {state_file!r}")
    if not (path / state_file).is_file() and not (path / state_file).is_symlink():
        raise FileNotFoundError(f"{filename}: state_file {state_file} of step {wanted!r} not found in {path}")
    config = step.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{filename}: step {wanted!r} has no config object")
    _require(config, ["eps", "features", "norm_map"], where=f"{filename} step {wanted!r}")
    return config, load_file(str(_checked_file(path, state_file))), steps


def _processor_norms(path: Path, used: list[str]) -> tuple[dict[str, _Norm], dict[str, Any]]:
    """Normalization of the used input features (preprocessor) and of the action (postprocessor)."""
    pre, pre_state, pre_steps = _processor_steps(path, "policy_preprocessor.json", PREPROCESSOR_STEPS,
                                                 "normalizer_processor")
    post, post_state, _ = _processor_steps(path, "policy_postprocessor.json", POSTPROCESSOR_STEPS,
                                        "unnormalizer_processor")
    norms: dict[str, _Norm] = {}
    observe = pre.get("normalize_observation_keys")
    for key in used:
        feature = pre["features"].get(key)
        where = "policy_preprocessor.json normalizer_processor"
        # LeRobot normalizes only the step's own features, by their type's mode; others pass through.
        if feature is None or (observe is not None and key not in observe):
            mode = "identity"
        else:
            mode = _mode(pre["norm_map"].get(feature["type"], "IDENTITY"), where)
        stats = _stats_by_feature(pre_state).get(key, {})
        norms[key] = _Norm(mode, _checked_stats(key, mode, stats, where), float(pre["eps"]))
    # The action: the postprocessor's stats are the ones inference uses; the preprocessor's (for
    # training targets) must agree, or the conversion would be ambiguous.
    where = "policy_postprocessor.json unnormalizer_processor"
    mode = _mode(post["norm_map"].get("ACTION", "IDENTITY"), where)
    action = _Norm(mode, _checked_stats(ACTION_KEY, mode, _stats_by_feature(post_state).get(ACTION_KEY, {}), where),
                   float(post["eps"]))
    pre_action = _stats_by_feature(pre_state).get(ACTION_KEY)
    if pre_action is not None:
        pre_mode = _mode(pre["norm_map"].get("ACTION", "IDENTITY"), "policy_preprocessor.json")
        if pre_mode != mode or any(not torch.equal(pre_action[s].float(), action.stats[s])
                                   for s in MODE_STATS[mode] if s in pre_action):
            raise ValueError("the action normalization of policy_preprocessor.json and policy_postprocessor.json "
                             "differ; refusing to guess which one the policy was trained with")
    norms[ACTION_KEY] = action
    # Raw observation keys → policy keys, applied before normalization (informational).
    rename = next((s.get("config", {}).get("rename_map", {}) for s in pre_steps
                   if s.get("registry_name") == "rename_observations_processor"), {})
    return norms, {"rename_map": dict(rename)}


def _buffer_norms(cfg: Mapping[str, Any], feats: _Features, used: list[str],
                  tensors: Mapping[str, Tensor]) -> tuple[dict[str, _Norm], set[str]]:
    """Statistics from LeRobot <= 0.3's ``Normalize`` buffers; returns them and the consumed tensor names."""
    _require(cfg, ["normalization_mapping"])
    mapping = cfg["normalization_mapping"]
    if not isinstance(mapping, dict):
        raise ValueError(f"config.json: normalization_mapping must be an object, got {mapping!r}")
    consumed: set[str] = set()

    def buffer(module: str, key: str) -> tuple[str, dict[str, Tensor]]:
        prefix = f"{module}.buffer_{key.replace('.', '_')}."
        names = {n for n in tensors if n.startswith(prefix) and n[len(prefix):] in STAT_NAMES}
        consumed.update(names)
        return prefix, {n[len(prefix):]: tensors[n] for n in names}

    for key in cfg["input_features"]:  # every input has buffers, used by the model or not
        buffer("normalize_inputs", key)
    norms: dict[str, _Norm] = {}
    for key in used:
        mode = _mode(mapping.get(feats.types[key], "IDENTITY"), "config.json normalization_mapping")
        prefix, stats = buffer("normalize_inputs", key)
        norms[key] = _Norm(mode, _checked_stats(key, mode, stats, f"model.safetensors {prefix}*"), LEROBOT_EPS)
    mode = _mode(mapping.get("ACTION", "IDENTITY"), "config.json normalization_mapping")
    prefix, stats = buffer("unnormalize_outputs", ACTION_KEY)
    action = _Norm(mode, _checked_stats(ACTION_KEY, mode, stats, f"model.safetensors {prefix}*"), LEROBOT_EPS)
    _, targets = buffer("normalize_targets", ACTION_KEY)
    if any(s in targets and not torch.equal(targets[s].float(), action.stats[s]) for s in MODE_STATS[mode]):
        raise ValueError("model.safetensors: normalize_targets.buffer_action and unnormalize_outputs.buffer_action "
                         "differ; refusing to guess which one the policy was trained with")
    norms[ACTION_KEY] = action
    return norms, consumed


def _normalizer_entries(norms: Mapping[str, _Norm], feats: _Features, layout: str
                        ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, str]]:
    """State-dict tensors ``normalizer.params_dict.<field>.*``, their config and the key → field map."""
    state: dict[str, Tensor] = {}
    config: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for key, norm in norms.items():
        field = key.replace(".", "_")
        if field in fields.values():
            raise ValueError(f"features {key!r} and {next(k for k, f in fields.items() if f == field)!r} both map "
                             f"to the normalizer field {field!r}")
        fields[key] = field
        if norm.stats:
            shape = list(next(iter(norm.stats[s] for s in STAT_NAMES if s in norm.stats)).shape)
        elif feats.types[key] == "VISUAL":
            shape = [feats.shapes[key][0], 1, 1]
        else:
            shape = list(feats.shapes[key])
        stats = {}
        for s in STAT_NAMES:
            if s in norm.stats:
                if list(norm.stats[s].shape) != shape:
                    raise ValueError(f"statistics of {key!r} have different shapes: "
                                     f"{ {k: list(v.shape) for k, v in norm.stats.items()} }")
                stats[s] = norm.stats[s].contiguous()
            else:
                stats[s] = torch.full(shape, PLACEHOLDER[s], dtype=torch.float32)
        # LeRobot <= 0.3's buffers add eps to every min-max range: para_policy's 'min_max_eps'
        mode = "min_max_eps" if norm.mode == "min_max" and layout == "buffers" else norm.mode
        scale, offset = _affine(stats, mode, norm.eps)
        prefix = f"normalizer.params_dict.{field}."
        state[prefix + "scale"] = scale
        state[prefix + "offset"] = offset
        for s in STAT_NAMES:
            state[f"{prefix}input_stats.{s}"] = stats[s]
        config[field] = {"shape": shape, "mode": mode, "eps": norm.eps}
    return state, config, fields


# ---------------------------------------------------------------- the directory

def _check_shapes(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> None:
    """Build the UNet and encoder on the meta device and compare names and shapes with the file's."""
    from para_policy.models.lerobot_vision import LeRobotObsEncoder
    from para_policy.models.unet1d import ConditionalUnet1D

    with torch.device("meta"):
        modules = {"model.": ConditionalUnet1D(**config["model"]),
                   "obs_encoder.": LeRobotObsEncoder(**{k: v for k, v in config["obs_encoder"].items()
                                                         if k != "kind"})}
    expected = {p + k: tuple(v.shape) for p, m in modules.items() for k, v in m.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(tuple(modules))}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {found[k]}, config {expected[k]}" for k in set(found) & set(expected)
                   if found[k] != expected[k])
    if missing or unexpected or wrong:
        raise ValueError("model.safetensors does not match its config.json: "
                         f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                         f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, "
                         f"wrong shapes {wrong[:10]}")


def _diffusion_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a LeRobot diffusion-policy directory, its UNet fields present and sane."""
    if not path.is_dir():
        raise FileNotFoundError(f"LeRobot policy directory not found: {path}")
    cfg = _read_json(path, "config.json")
    if "type" not in cfg:
        hint = " (this looks like a pre-0.3 LeRobot config with input_shapes, which is not supported)" \
            if "input_shapes" in cfg else ""
        raise ValueError(f"config.json has no 'type' field; expected a LeRobot diffusion policy config{hint}")
    if cfg["type"] != "diffusion":
        raise ValueError(f"config.json: type is {cfg['type']!r}; only LeRobot 'diffusion' policies are supported")
    _require(cfg, ["input_features", "output_features", *UNET_FIELDS])
    horizon = _int(cfg, "horizon")
    _int(cfg, "n_obs_steps")
    _int(cfg, "n_action_steps")
    down_dims = cfg["down_dims"]
    if not isinstance(down_dims, list) or not 0 < len(down_dims) <= MAX_UNET_LEVELS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_CHANNELS for d in down_dims):
        raise ValueError(f"config.json: down_dims must be a list of 1 to {MAX_UNET_LEVELS} (MAX_UNET_LEVELS) "
                         f"integers from 1 to {MAX_CHANNELS} (MAX_CHANNELS), got {short_repr(down_dims)}")
    if horizon % 2 ** len(down_dims):
        raise ValueError(f"config.json: horizon {horizon} must be a multiple of 2**len(down_dims) = "
                         f"{2 ** len(down_dims)} (LeRobot checks the same)")
    return cfg


def _read_norms(path: Path, cfg: Mapping[str, Any], feats: _Features, used: list[str],
                tensors: Mapping[str, Tensor]) -> tuple[dict[str, _Norm], set[str], dict[str, Any]]:
    """The statistics of either layout: ``(norms, tensor names they consumed, source)``."""
    source: dict[str, Any] = {"format": "lerobot", "version_layout": None, "path": str(path)}
    if any(k.startswith(BUFFER_PREFIXES) for k in tensors):
        if (path / "policy_preprocessor.json").exists() or (path / "policy_postprocessor.json").exists():
            raise ValueError(f"{path} has both normalization buffers in model.safetensors and processor files; "
                             "refusing to guess which statistics apply")
        source["version_layout"] = "buffers"
        norms, consumed = _buffer_norms(cfg, feats, used, tensors)
        return norms, consumed, source
    source["version_layout"] = "processors"
    norms, extra = _processor_norms(path, used)
    source.update(extra)
    return norms, set(), source


def _network_tensors(tensors: Mapping[str, Tensor], feats: _Features, consumed: set[str]) -> dict[str, Tensor]:
    """The UNet's tensors in DiffusionPolicy's names (``model.*``) and the encoder's (``obs_encoder.*``).

    Refuses a tensor nothing consumes (neither network nor the normalization buffers).
    """
    state_dict: dict[str, Tensor] = {}
    unet: dict[str, Tensor] = {}
    leftover: list[str] = []
    for name, tensor in tensors.items():
        if name.startswith("diffusion.unet."):
            # A torch.compile'd UNet (compile_model) saves its weights under _orig_mod.
            unet[name.replace("diffusion.unet._orig_mod.", "diffusion.unet.", 1)] = tensor
        elif name.startswith("diffusion.rgb_encoder.") and feats.images:
            state_dict["obs_encoder." + name[len("diffusion."):]] = tensor
        elif name not in consumed:
            leftover.append(name)
    if leftover:
        raise ValueError(f"model.safetensors holds tensors this conversion does not consume: {sorted(leftover)}")
    state_dict.update(lerobot_to_diffusion_policy_keys(unet, src_prefix="diffusion.unet.", dst_prefix="model."))
    return state_dict


def _image_policy_config(cfg: Mapping[str, Any], feats: _Features, used: list[str], encoder: dict[str, Any],
                         scheduler: tuple[dict[str, Any], int]) -> dict[str, Any]:
    """para_policy's image-policy config dict, without the normalizer entries (the caller adds them)."""
    n_obs_steps = _int(cfg, "n_obs_steps")
    camera_dim = 2 * encoder["spatial_softmax_num_keypoints"] if feats.images else 0
    obs_dim = feats.state_dim + len(feats.images) * camera_dim + feats.env_dim
    return {
        "horizon": _int(cfg, "horizon"),
        "n_obs_steps": n_obs_steps,
        "n_action_steps": _int(cfg, "n_action_steps"),
        "action_dim": feats.action_dim,
        "obs_dim": obs_dim,
        "num_inference_steps": scheduler[1],
        "obs_as_global_cond": True,
        "pred_action_steps_only": False,
        "oa_step_convention": True,
        "model_type": "unet",
        "model": {
            "input_dim": feats.action_dim,
            "local_cond_dim": None,
            "global_cond_dim": obs_dim * n_obs_steps,
            "diffusion_step_embed_dim": _int(cfg, "diffusion_step_embed_dim"),
            "down_dims": list(cfg["down_dims"]),
            "kernel_size": _int(cfg, "kernel_size"),
            "n_groups": _int(cfg, "n_groups"),
            "cond_predict_scale": _bool(cfg, "use_film_scale_modulation"),
        },
        "noise_scheduler": scheduler[0],
        "obs_encoder": encoder,
        "obs_keys": {k: {"shape": list(feats.shapes[k]), "type": "rgb" if k in feats.images else "low_dim"}
                     for k in used},
    }


def read_lerobot_directory(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Convert a LeRobot ``DiffusionPolicy`` directory to para_policy's ``(state_dict, config)``.

    ``path`` holds ``config.json`` and ``model.safetensors``, plus ``policy_preprocessor.json`` /
    ``policy_postprocessor.json`` and their state files unless the statistics are buffers in
    ``model.safetensors`` (LeRobot <= 0.3). The state dict has ``model.*`` (the UNet in
    DiffusionPolicy's names), ``obs_encoder.rgb_encoder.*`` and
    ``normalizer.params_dict.<field>.{scale, offset, input_stats.{min, max, mean, std}}`` (float32,
    shapes as LeRobot stores them, e.g. image (3, 1, 1)). The config is para_policy's image-policy
    config as a plain dict (:func:`read_lerobot` gives a ``PolicyConfig``): horizon, n_obs_steps,
    n_action_steps, action_dim, obs_dim (encoder features per step),
    num_inference_steps, ``model`` (ConditionalUnet1D kwargs), ``noise_scheduler`` (a ``_target_``
    dict for :func:`para_policy.schedule.build_scheduler`), ``obs_encoder`` (a
    :class:`LeRobotObsEncoder` spec), ``obs_keys`` (in global-conditioning order: state, cameras,
    environment state), ``normalizer`` (field → shape, mode and eps), ``normalizer_fields``
    (LeRobot key → field) and ``source`` (format, version_layout, path; ``rename_map`` of the
    preprocessor's rename step in the processors layout).

    Raises FileNotFoundError for missing files and ValueError for anything not understood: a
    config that is not a diffusion policy, a missing field, an unimplemented option, or a tensor
    in ``model.safetensors`` that nothing consumes.
    """
    path = Path(path)
    cfg = _diffusion_config(path)
    feats = _read_features(cfg)
    encoder = _encoder_spec(cfg, feats)
    scheduler = _scheduler_config(cfg)
    tensors = load_file(str(_checked_file(path, "model.safetensors")))

    used = [STATE_KEY, *feats.images, *([ENV_STATE_KEY] if feats.env_dim else [])]  # global_cond order
    norms, consumed, source = _read_norms(path, cfg, feats, used, tensors)
    norm_state, norm_config, norm_fields = _normalizer_entries(norms, feats, source["version_layout"])
    state_dict = _network_tensors(tensors, feats, consumed)
    state_dict.update(norm_state)
    config = {**_image_policy_config(cfg, feats, used, encoder, scheduler),
              "normalizer": norm_config, "normalizer_fields": norm_fields, "source": source}
    PolicyConfig.from_dict(config)  # every value checked (naming it) before a network is built, even on meta
    _check_shapes(state_dict, config)
    return state_dict, config


# ---------------------------------------------------------------- the reader load_policy uses

def can_read_lerobot(path: Path) -> bool:
    """Whether ``path`` is a directory holding ``config.json`` (what LeRobot's ``save_pretrained`` writes)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def read_lerobot(path: str | os.PathLike, **kwargs: Any) -> tuple[dict[str, Tensor], PolicyConfig]:
    """:func:`read_lerobot_directory` with the config as a :class:`PolicyConfig` (``kwargs`` unused: no pickle)."""
    state_dict, config = read_lerobot_directory(path)
    try:
        return state_dict, PolicyConfig.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
