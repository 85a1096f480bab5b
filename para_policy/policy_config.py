"""The policy configuration: one typed, checked record of what a diffusion policy is.

Why: the policies, every checkpoint reader and training used to pass a plain dict around, and
each checked the part it read. :class:`PolicyConfig` is checked once, when it is made, so a
policy built from one never meets a bad value later. Checkpoints keep storing a plain mapping
(para_policy ``.safetensors`` files hold :meth:`PolicyConfig.to_dict` as JSON);
:meth:`PolicyConfig.from_dict` reads it back and refuses keys it does not know.

Modelled on LeRobot's ``DiffusionConfig`` (``configuration_diffusion.py``): a dataclass whose
``__post_init__`` validates, every field documented in the class docstring.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from para_policy.schedule import MAX_TRAIN_TIMESTEPS, check_scheduler_size

#: the observation types of an image policy's ``obs_keys``
RGB, LOW_DIM = "rgb", "low_dim"
MODEL_TYPES = ("unet", "transformer")
REQUIRED_KEYS = ("horizon", "n_obs_steps", "n_action_steps", "obs_dim", "action_dim", "model", "noise_scheduler")
#: an image policy has all three, a low-dim policy none
IMAGE_KEYS = ("obs_keys", "obs_encoder", "normalizer")
#: keys :func:`~para_policy.checkpoints.save_checkpoint` wraps around the config (the file's format and
#: version, checked when the file is read): :meth:`PolicyConfig.from_dict` skips them
ENVELOPE_KEYS = ("kind", "version")
#: DiffusionPolicy's local-conditioning flag: accepted when false, refused when true, never stored
LOCAL_COND_KEY = "obs_as_local_cond"
_FLAG_FIELDS = ("obs_as_global_cond", "pred_action_steps_only", "oa_step_convention")

# ---- limits on what a checkpoint may ask for ------------------------------------------------
# A checkpoint's weights fix most sizes (a layer's width, the transformer's horizon), but not the ones
# that only size the work done at run time: a horizon, a step count. A crafted file could ask for
# gigabytes with one number, so every integer field has a maximum, each far above any published
# diffusion policy (DiffusionPolicy and LeRobot: horizon 16, 100 train timesteps, widths <= 1024).

#: steps of the denoised trajectory (``horizon``; ``n_action_steps`` is at most the horizon)
MAX_HORIZON = 1024
#: observation steps the policy conditions on (``n_obs_steps``)
MAX_OBS_STEPS = 256
#: denoising steps per chunk (``num_inference_steps``)
MAX_INFERENCE_STEPS = MAX_TRAIN_TIMESTEPS  # (MAX_TRAIN_TIMESTEPS: para_policy.schedule)
#: features per step (``obs_dim``, ``action_dim``, conditioning sizes)
MAX_FEATURE_DIM = 65_536
#: a network's channel widths (UNet ``down_dims``, ``diffusion_step_embed_dim``, transformer ``n_emb``)
MAX_CHANNELS = 16_384
#: UNet resolution levels (``len(down_dims)``; each halves the horizon)
MAX_UNET_LEVELS = 8
#: a convolution's ``kernel_size``
MAX_KERNEL_SIZE = 63
#: transformer layers (``n_layer``, ``n_cond_layers``) and attention heads (``n_head``)
MAX_LAYERS = 256

# Limits on a config tree read from a file, checked before anything in it is resolved or built. A
# pickled config can hold one object in many places (or a JSON file nest brackets): a few kB could
# otherwise expand to billions of nodes or recurse past Python's stack. DiffusionPolicy's workspace
# configs have a few hundred nodes, 8 levels and 5 kB; para_policy's and LeRobot's are smaller.

#: levels of nesting
MAX_CONFIG_DEPTH = 64
#: nodes, a part reachable from several places counted each time (so shared references cannot multiply)
MAX_CONFIG_NODES = 20_000
#: bytes of text (strings, keys, numbers) in the whole tree, and in one file's config JSON
MAX_CONFIG_BYTES = 1 << 20
# A DiffusionPolicy config holds OmegaConf interpolations (``${horizon}``, ``${eval:...}``). OmegaConf
# resolves a reference each time it is reached, so ``l1: ${l0}${l0}``, ``l2: ${l1}${l1}``, ... doubles
# the work per level; it also builds its nodes slowly. Both are bounded before resolving.
#: interpolations resolved to read a config (each counted as often as OmegaConf would resolve it)
MAX_INTERPOLATIONS = 1_000
#: nodes of the part of a DiffusionPolicy config that is resolved (what its policy section reaches)
MAX_RESOLVED_NODES = 5_000
#: characters of one string holding interpolations, and of one ``${eval:...}`` expression
MAX_INTERPOLATION_CHARS = 1_000

#: the integer fields and their maxima, by name (errors name the constant)
_INT_FIELDS = {"horizon": "MAX_HORIZON", "n_obs_steps": "MAX_OBS_STEPS", "n_action_steps": "MAX_HORIZON",
               "obs_dim": "MAX_FEATURE_DIM", "action_dim": "MAX_FEATURE_DIM"}


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error names a bad value without echoing a huge one."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if not isinstance(value, (str, bytes)) or len(value) <= limit else repr(value[:limit])
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def config_int(key: str, value: Any, limit: str, minimum: int = 1, *, where: str = "policy config",
               floats: bool = True) -> int:
    """``value`` as an int from ``minimum`` to the constant named ``limit``, or a ``ValueError`` naming the key.

    An integral float (``16.0``, as YAML or JSON may write it) is accepted unless ``floats`` is
    False; ``16.7``, a bool or a string is refused rather than truncated or parsed. ``where``
    names the file or config the key is in.
    """
    maximum = globals()[limit]
    integral = isinstance(value, int) or floats and isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not integral or not minimum <= value <= maximum:
        raise ValueError(f"{where} {key} must be an integer >= {minimum} and <= {maximum} ({limit}), "
                         f"got {short_repr(value)}")
    return int(value)


def _flag(key: str, value: Any) -> bool:
    """``value`` as a bool: true/false, or the integers 0 and 1 (a string such as ``'false'`` is refused)."""
    if isinstance(value, bool) or isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"policy config {key} must be true or false, got {value!r}")


def _mapping(key: str, value: Any, optional: bool = False) -> dict[str, Any] | None:
    """A deep copy of ``value`` as a dict (so later edits of the caller's mapping cannot reach the config)."""
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"policy config {key} must be a mapping, got {type(value).__name__}")
    return copy.deepcopy(dict(value))


# ---- the network's and the scheduler's arguments ----------------------------------------------
#: ``ConditionalUnet1D``'s and ``TransformerForDiffusion``'s keyword arguments (DiffusionPolicy's names)
UNET_ARGS = ("input_dim", "local_cond_dim", "global_cond_dim", "diffusion_step_embed_dim", "down_dims",
             "kernel_size", "n_groups", "cond_predict_scale")
TRANSFORMER_ARGS = ("input_dim", "output_dim", "horizon", "n_obs_steps", "cond_dim", "n_layer", "n_head", "n_emb",
                    "p_drop_emb", "p_drop_attn", "causal_attn", "time_as_cond", "obs_as_cond", "n_cond_layers")
#: integer network arguments: (the limit's name, the minimum, whether None is allowed)
_NETWORK_INTS = {
    "input_dim": ("MAX_FEATURE_DIM", 1, False), "output_dim": ("MAX_FEATURE_DIM", 1, False),
    "local_cond_dim": ("MAX_FEATURE_DIM", 1, True), "global_cond_dim": ("MAX_FEATURE_DIM", 1, True),
    "cond_dim": ("MAX_FEATURE_DIM", 0, False), "diffusion_step_embed_dim": ("MAX_CHANNELS", 4, False),
    "kernel_size": ("MAX_KERNEL_SIZE", 1, False), "n_groups": ("MAX_CHANNELS", 1, False),
    "horizon": ("MAX_HORIZON", 1, False), "n_obs_steps": ("MAX_OBS_STEPS", 1, True),
    "n_layer": ("MAX_LAYERS", 1, False), "n_head": ("MAX_LAYERS", 1, False), "n_emb": ("MAX_CHANNELS", 4, False),
    "n_cond_layers": ("MAX_LAYERS", 0, False),
}
_NETWORK_FLAGS = ("cond_predict_scale", "causal_attn", "time_as_cond", "obs_as_cond")
_NETWORK_RATES = ("p_drop_emb", "p_drop_attn")


def _check_network_values(model: dict[str, Any], args: tuple[str, ...]) -> None:
    """Each of ``args`` present in ``model`` has its type and range (integral floats become ints, in place)."""
    for key in args:
        if key not in model:
            continue
        value = model[key]
        if key in _NETWORK_INTS:
            limit, minimum, optional = _NETWORK_INTS[key]
            if not (optional and value is None):
                model[key] = config_int(f"model.{key}", value, limit, minimum)
        elif key in _NETWORK_FLAGS:
            model[key] = _flag(f"model.{key}", value)
        elif key in _NETWORK_RATES:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"policy config model.{key} must be a probability in [0, 1], got {short_repr(value)}")
        elif key == "down_dims":
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_UNET_LEVELS:
                raise ValueError(f"policy config model.down_dims must be a list of 1 to {MAX_UNET_LEVELS} "
                                 f"(MAX_UNET_LEVELS) widths, got {short_repr(value)}")
            model[key] = [config_int(f"model.down_dims[{i}]", d, "MAX_CHANNELS") for i, d in enumerate(value)]


def _check_network_shapes(model: Mapping[str, Any], model_type: str) -> None:
    """What the network's layers need of its checked arguments (``ConditionalUnet1D``'s defaults when absent)."""
    if model_type == "unet":
        groups, dims = model.get("n_groups", 8), model.get("down_dims", [256, 512, 1024])
        bad = [d for d in dims if d % groups]
        if bad or dims[0] % 8:
            raise ValueError(f"policy config model.n_groups={groups} must divide every model.down_dims entry and "
                             f"8 must divide down_dims[0] (GroupNorm), got down_dims={list(dims)}")
        if model.get("kernel_size", 3) % 2 == 0:
            raise ValueError(f"policy config model.kernel_size must be odd (same padding), got {model['kernel_size']}")
        if model.get("diffusion_step_embed_dim", 256) % 2:
            raise ValueError("policy config model.diffusion_step_embed_dim must be even (sinusoidal embedding), "
                             f"got {model['diffusion_step_embed_dim']}")
    else:
        heads, width = model.get("n_head", 12), model.get("n_emb", 768)
        if width % heads or width % 2:
            raise ValueError(f"policy config model.n_emb={width} must be even and divisible by model.n_head={heads}")


# ---- config trees read from files -----------------------------------------------------------

def plain_config(value: Any, where: str, unwrap: Callable[[Any], Any] | None = None) -> Any:
    """A plain copy of a config tree (dicts, lists, str, bytes, numbers, bools, None), within bounds.

    Why: a file's config is walked once here, before anything reads, resolves or builds from it.
    More than :data:`MAX_CONFIG_DEPTH` levels, :data:`MAX_CONFIG_NODES` nodes (a part reachable
    from several places counted each time, so a pickle that shares one dict 40 levels deep is
    refused after 20,000 steps instead of expanded to 2**40), :data:`MAX_CONFIG_BYTES` of text or
    a value that is not config data is a one-line ``ValueError`` naming ``where`` and the key.
    ``unwrap`` maps a container or leaf object to its content first (OmegaConf nodes).
    """
    budget = {"nodes": 0, "bytes": 0}

    def charge(nodes: int, size: int, path: str) -> None:
        budget["nodes"] += nodes
        budget["bytes"] += size
        if budget["nodes"] > MAX_CONFIG_NODES:
            raise ValueError(f"{where} has more than {MAX_CONFIG_NODES} nodes (MAX_CONFIG_NODES; a part that is "
                             "referenced from several places counts each time)")
        if budget["bytes"] > MAX_CONFIG_BYTES:
            raise ValueError(f"{where} holds more than {MAX_CONFIG_BYTES} bytes (MAX_CONFIG_BYTES), at {path}")

    def walk(node: Any, path: str, depth: int) -> Any:
        if depth > MAX_CONFIG_DEPTH:
            shown = path if len(path) <= 80 else path[:80] + "..."
            raise ValueError(f"{shown} is nested deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)")
        node = unwrap(node) if unwrap is not None else node
        if node is None or isinstance(node, (bool, float)):
            charge(1, 8, path)
            return node
        if isinstance(node, int):
            charge(1, 8 + node.bit_length() // 8, path)
            return int(node)
        if isinstance(node, (str, bytes)):
            charge(1, len(node), path)
            return str(node) if isinstance(node, str) else bytes(node)
        if isinstance(node, Mapping):
            charge(1, 8, path)
            out = {}
            for key, item in node.items():
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise ValueError(f"{path} has a key of type {type(key).__name__}; config keys are strings "
                                     "or numbers")
                charge(0, len(key) if isinstance(key, str) else 8, path)
                out[key] = walk(item, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key!r}]", depth + 1)
            return out
        if isinstance(node, (list, tuple)):
            charge(1, 8, path)
            return [walk(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node)]
        raise ValueError(f"{path} is a {type(node).__name__}, which is not config data")

    return walk(value, where, 0)


def parse_json_config(text: str | bytes, where: str) -> dict[str, Any]:
    """The JSON object ``text`` holds, as :func:`plain_config`, or a one-line ``ValueError`` naming ``where``.

    Its size is checked before it is parsed, and nesting too deep for Python's JSON parser (which
    raises ``RecursionError``) is reported as such.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"{where} is {len(text)} bytes, more than {MAX_CONFIG_BYTES} (MAX_CONFIG_BYTES)")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"{where} is nested deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object (a mapping of keys to values), got {type(data).__name__}")
    return plain_config(data, where)


@dataclass(frozen=True)
class PolicyConfig:
    """What a diffusion policy is: shapes, network, noise schedule, observation encoding, provenance.

    Trajectory shapes: the network denoises ``(B, T, D)`` with ``T = horizon`` (``n_action_steps``
    with ``pred_action_steps_only``) and ``D = action_dim`` (observations as conditioning) or
    ``action_dim + obs_dim`` (inpainting). The executed actions are ``n_action_steps`` of those
    ``T`` steps from :attr:`action_start`.

    Shapes:
        horizon: steps of the denoised trajectory (DiffusionPolicy's ``horizon``).
        n_obs_steps: observation steps To the policy conditions on.
        n_action_steps: actions executed per chunk.
        obs_dim: features per observation step: the observation size of a low-dim policy, the
            encoder's output size F of an image policy.
        action_dim: action size Da.
    Network and schedule:
        model: keyword arguments of the network (``ConditionalUnet1D`` or
            ``TransformerForDiffusion``, DiffusionPolicy's names). ``input_dim`` must be D, the UNet's
            ``global_cond_dim`` ``obs_dim * n_obs_steps`` (None when inpainting), the transformer's
            ``cond_dim`` ``obs_dim`` (0 when inpainting), ``horizon`` T and ``output_dim`` D.
        noise_scheduler: the diffusers scheduler, a ``_target_`` mapping
            (:func:`para_policy.schedule.build_scheduler`).
        model_type: ``'unet'`` (``DiffusionUnetLowdimPolicy``) or ``'transformer'``
            (``DiffusionTransformerLowdimPolicy``).
        num_inference_steps: denoising steps of the policy's own schedule; None (absent) means
            the scheduler's ``num_train_timesteps`` (100 when it does not say), as DiffusionPolicy
            does. Always an int after construction.
    Mode (DiffusionPolicy's flags):
        obs_as_global_cond: observations condition the network (True) or are imposed on the
            trajectory as known entries (False: inpainting).
        pred_action_steps_only: the trajectory is the executed actions only (needs
            ``obs_as_global_cond``).
        oa_step_convention: the executed actions start at ``n_obs_steps - 1`` (True) or at
            ``n_obs_steps`` (False).
    Image policies (all three or none; :class:`~para_policy.image_policy.ImagePolicy`):
        obs_keys: ``{key: {'shape': [...], 'type': 'rgb' | 'low_dim'}}``, one step's observation, in
            the encoder's order.
        obs_encoder: the encoder spec (:func:`para_policy.models.vision.build_obs_encoder`).
        normalizer: ``{field: {'shape': [...], 'mode': ...}}`` for every observation key's field
            and ``'action'``.
        normalizer_fields: ``{key: field}`` where a field name differs from its key (LeRobot's
            keys hold dots, which module names cannot); None: every field is its key.
    Provenance (stored, never read by the policy):
        task: the task name a trained policy is for (e.g. ``'pusht'``).
        source: where a converted checkpoint came from (format, policy class, weights used).
        training: how the policy was trained (command, seed, dataset hash, losses, ...).
    """

    horizon: int
    n_obs_steps: int
    n_action_steps: int
    obs_dim: int
    action_dim: int
    model: dict[str, Any]
    noise_scheduler: dict[str, Any]
    model_type: str = "unet"
    num_inference_steps: int | None = None
    obs_as_global_cond: bool = True
    pred_action_steps_only: bool = False
    oa_step_convention: bool = True
    obs_keys: dict[str, Any] | None = None
    obs_encoder: dict[str, Any] | None = None
    normalizer: dict[str, Any] | None = None
    normalizer_fields: dict[str, str] | None = None
    task: str | None = None
    source: dict[str, Any] | None = None
    training: dict[str, Any] | None = None

    # ---- construction -------------------------------------------------------------
    def __post_init__(self) -> None:
        for key in ("model", "noise_scheduler"):
            self._set(key, _mapping(key, getattr(self, key)))
        for key, limit in _INT_FIELDS.items():
            self._set(key, config_int(key, getattr(self, key), limit))
        for key in _FLAG_FIELDS:
            self._set(key, _flag(key, getattr(self, key)))
        train_steps = check_scheduler_size(self.noise_scheduler)
        steps = self.num_inference_steps
        self._set("num_inference_steps", train_steps if steps is None
                  else config_int("num_inference_steps", steps, "MAX_INFERENCE_STEPS"))
        self._set("model_type", str(self.model_type))
        if self.obs_keys is not None and (not isinstance(self.obs_keys, Mapping) or not self.obs_keys):
            raise ValueError(f"obs_keys must be a non-empty mapping of key -> {{shape, type}}, got {self.obs_keys!r}")
        for key in ("obs_keys", "obs_encoder", "normalizer", "normalizer_fields", "source", "training"):
            self._set(key, _mapping(key, getattr(self, key), optional=True))
        if self.task is not None and not isinstance(self.task, str):
            raise ValueError(f"policy config task must be a task name (a string), got {self.task!r}")
        if any(getattr(self, key) is not None for key in IMAGE_KEYS):
            self._check_image()
        self._check_mode()
        self._check_model()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ normalizes values

    def _check_mode(self) -> None:
        """The horizon holds the executed actions; the mode is one DiffusionPolicy has."""
        end = self.action_start + self.n_action_steps
        if not self.pred_action_steps_only and end > self.horizon:
            raise ValueError(
                f"horizon={self.horizon} is too short for n_obs_steps={self.n_obs_steps} and n_action_steps="
                f"{self.n_action_steps}: the executed actions start at index {self.action_start}, so horizon must "
                f"be >= {end}")
        if self.pred_action_steps_only and not self.obs_as_global_cond:
            raise ValueError("pred_action_steps_only requires obs_as_global_cond (as in DiffusionPolicy)")

    def _check_model(self) -> None:
        """The network's arguments: known, of the right type and range, agreeing with the shapes and the mode.

        Checked before a network is built (even on the meta device), so a bad argument is a
        ``ValueError`` naming it rather than a ``TypeError`` or ``ZeroDivisionError`` from inside torch.
        """
        model, expected_in = self.model, self.trajectory_dim
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be 'unet' or 'transformer', got {self.model_type!r}")
        args = UNET_ARGS if self.model_type == "unet" else TRANSFORMER_ARGS
        _check_network_values(model, args)
        if model.get("input_dim", -1) != expected_in:
            raise ValueError(f"model.input_dim is {model.get('input_dim')}, expected {expected_in} "
                             f"for this policy's mode and dims")
        if self.model_type == "unet":
            expected_cond = self.obs_dim * self.n_obs_steps if self.obs_as_global_cond else None
            if model.get("global_cond_dim") != expected_cond:
                raise ValueError(f"model.global_cond_dim is {model.get('global_cond_dim')}, expected "
                                 f"{expected_cond} (obs_dim × n_obs_steps with global conditioning)")
        elif self.model_type == "transformer":
            expected = {"cond_dim": self.obs_dim if self.obs_as_global_cond else 0,
                        "horizon": self.trajectory_length, "output_dim": expected_in}
            for key, value in expected.items():
                if model.get(key, 0 if key == "cond_dim" else None) != value:
                    raise ValueError(f"model.{key} is {model.get(key)}, expected {value} for this policy")
        unknown = sorted(str(key) for key in model if key not in args)
        if unknown:
            network = "ConditionalUnet1D" if self.model_type == "unet" else "TransformerForDiffusion"
            raise ValueError(f"policy config model.{unknown[0]} is not an argument of {network} "
                             f"(unknown: {unknown}; it takes {list(args)})")
        _check_network_shapes(model, self.model_type)

    def _check_image(self) -> None:
        """An image policy's fields: all present, a globally conditioned UNet, every normalizer field there."""
        missing = [key for key in IMAGE_KEYS if getattr(self, key) is None]
        if missing:
            raise ValueError(f"image policy config is missing {missing}")
        if self.model_type != "unet" or not self.obs_as_global_cond:
            raise ValueError("image policies condition a UNet globally (model_type 'unet', obs_as_global_cond "
                             "True); inpainting image features is not supported")
        if self.pred_action_steps_only:
            raise ValueError("pred_action_steps_only is not supported for image policies")
        for key, meta in self.obs_keys.items():
            if not isinstance(meta, Mapping) or not isinstance(meta.get("shape"), (list, tuple)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in meta["shape"]):
                raise ValueError(f"obs_keys[{key!r}] must be {{'shape': [positive ints], 'type': ...}}, got {meta!r}")
            kind = str(meta.get("type", LOW_DIM))
            if kind not in (RGB, LOW_DIM):
                raise ValueError(f"obs_keys[{key!r}].type must be 'rgb' or 'low_dim', got {kind!r}")
        absent = sorted({*self.normalizer_field_map().values(), "action"} - set(self.normalizer))
        if absent:
            raise ValueError(f"normalizer config has no field for {absent}")

    # ---- reading and writing --------------------------------------------------------
    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> PolicyConfig:
        """The config a mapping describes (a checkpoint's JSON, a reader's or training's dict).

        Raises ``ValueError`` for a missing required key, a key this class does not know (naming
        the known ones) and every invalid value. ``kind`` / ``version`` (the checkpoint envelope)
        are skipped; DiffusionPolicy's ``obs_as_local_cond`` is accepted when false.
        """
        if not isinstance(mapping, Mapping):
            raise ValueError(f"policy config must be a mapping, got {type(mapping).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in mapping]
        if missing:
            raise ValueError(f"policy config is missing {missing}; expected keys {list(REQUIRED_KEYS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in mapping if key not in known | {*ENVELOPE_KEYS, LOCAL_COND_KEY})
        if unknown:
            raise ValueError(f"policy config has unknown keys {unknown}; known keys: {sorted(known)}")
        if mapping.get(LOCAL_COND_KEY, False):
            raise ValueError("obs_as_local_cond=True policies are not supported; expected global "
                             "conditioning or inpainting")
        return cls(**{key: value for key, value in mapping.items() if key in known})

    @classmethod
    def coerce(cls, config: PolicyConfig | Mapping[str, Any]) -> PolicyConfig:
        """``config`` itself, or :meth:`from_dict` of a mapping: what the policies' constructors accept."""
        return config if isinstance(config, cls) else cls.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable copy: every field, the optional ones (default None) only when set.

        What para_policy checkpoints store as JSON and ``policy.config`` holds; ``from_dict`` of it
        gives an equal config.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = copy.deepcopy(value)
        return out

    # ---- derived --------------------------------------------------------------------
    @property
    def is_image(self) -> bool:
        """Whether this is an image policy's config (it has an observation encoder)."""
        return self.obs_encoder is not None

    @property
    def action_start(self) -> int:
        """Index of the first executed action in the denoised trajectory."""
        if self.pred_action_steps_only:
            return 0
        return self.n_obs_steps - 1 if self.oa_step_convention else self.n_obs_steps

    @property
    def trajectory_length(self) -> int:
        """T of the denoised (B, T, D) trajectory."""
        return self.n_action_steps if self.pred_action_steps_only else self.horizon

    @property
    def trajectory_dim(self) -> int:
        """D of the denoised (B, T, D) trajectory: the actions, plus the observations when inpainting."""
        return self.action_dim if self.obs_as_global_cond else self.action_dim + self.obs_dim

    def observation_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """An image policy's ``{key: (shape of one step, 'rgb' | 'low_dim')}``, in ``obs_keys`` order."""
        return {str(key): (tuple(int(s) for s in meta["shape"]), str(meta.get("type", LOW_DIM)))
                for key, meta in (self.obs_keys or {}).items()}

    def normalizer_field_map(self) -> dict[str, str]:
        """An image policy's ``{observation key: normalizer field}`` (the key itself unless renamed)."""
        fields = dict(self.normalizer_fields or {})
        return {str(key): str(fields.get(key, key)) for key in (self.obs_keys or {})}
