"""DiffusionPolicy (Chi et al.) integration: read its workspace ``.ckpt`` files, patch live policies.

Why: people who trained with DiffusionPolicy have ``.ckpt`` workspace checkpoints and
running ``DiffusionUnetLowdimPolicy`` objects. This module lets them keep both:

* :func:`read_diffusion_policy_checkpoint` turns a ``.ckpt`` into the ``(state_dict,
  config)`` pair of para_policy's own :class:`~para_policy.policy.LowdimPolicy`, without
  importing ``diffusion_policy`` (it is not on PyPI). ``load_policy('x.ckpt')`` uses it.
* :func:`patch_diffusion_policy` swaps the sampling loop of a live DiffusionPolicy policy
  object (``conditional_sample``) for para_policy's samplers; :func:`unpatch` restores it.

The ``.ckpt`` format (``BaseWorkspace.save_checkpoint``): ``torch.save(payload,
pickle_module=dill)`` of ``{'cfg': DictConfig (Hydra config, possibly unresolved),
'state_dicts': {'model', 'ema_model' (when training.use_ema), 'optimizer'}, 'pickles':
{'global_step', 'epoch'} (dill bytes)}``. Policy weights are ``model.*`` (the
ConditionalUnet1D) and ``normalizer.params_dict.{obs,action}.*``.

Security: a ``.ckpt`` is a pickle, and plain unpickling runs code chosen by whoever wrote
the file. It is read with a restricted unpickler (:mod:`.restricted_pickle`) that rebuilds
only tensors, the OmegaConf config and plain data and refuses any other global before it
runs; ``trust_pickle=True`` opts into full unpickling. para_policy's own ``.safetensors``
checkpoints hold no pickle at all; convert once with
``save_checkpoint(path, policy.state_dict(), policy.config)``.
"""

from __future__ import annotations

import ast
import operator
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from para_policy.samplers import SampleStats, draw_noise, sampler_spec, shift_trajectory, warm_start_init
from para_policy.schedule import Schedule

LOWDIM_TARGET = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
TRANSFORMER_LOWDIM_TARGET = ("diffusion_policy.policy.diffusion_transformer_lowdim_policy."
                             "DiffusionTransformerLowdimPolicy")
IMAGE_TARGET = "diffusion_policy.policy.diffusion_unet_image_policy.DiffusionUnetImagePolicy"
HYBRID_TARGET = "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"
UNET_TARGET = "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"
TRANSFORMER_TARGET = "diffusion_policy.model.diffusion.transformer_for_diffusion.TransformerForDiffusion"
UNET_ARGS = ("input_dim", "local_cond_dim", "global_cond_dim", "diffusion_step_embed_dim", "down_dims",
             "kernel_size", "n_groups", "cond_predict_scale")
TRANSFORMER_ARGS = ("input_dim", "output_dim", "horizon", "n_obs_steps", "cond_dim", "n_layer", "n_head", "n_emb",
                    "p_drop_emb", "p_drop_attn", "causal_attn", "time_as_cond", "obs_as_cond", "n_cond_layers")
REQUIRED_POLICY_KEYS = ("model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
                        "n_obs_steps")
OPTIONAL_POLICY_KEYS = ("num_inference_steps", "obs_as_local_cond", "obs_as_global_cond", "pred_action_steps_only",
                        "oa_step_convention", "obs_as_cond")
IMAGE_POLICY_KEYS = ("shape_meta", "noise_scheduler", "horizon", "n_action_steps", "n_obs_steps")
IMAGE_OPTIONAL_KEYS = ("num_inference_steps", "obs_as_global_cond", "diffusion_step_embed_dim", "down_dims",
                       "kernel_size", "n_groups", "cond_predict_scale")
IMAGE_ENCODER_KEYS = {IMAGE_TARGET: ("obs_encoder",),
                      HYBRID_TARGET: ("crop_shape", "obs_encoder_group_norm", "eval_fixed_crop")}
IGNORED_WEIGHTS = ("_dummy_variable", "mask_generator._dummy_variable", "model._dummy_variable")
WEIGHT_PREFIXES = ("model.", "normalizer.params_dict.obs.", "normalizer.params_dict.action.")
IMAGE_WEIGHT_PREFIXES = ("model.", "obs_encoder.", "normalizer.params_dict.")

# ---- a restricted evaluator for DiffusionPolicy's ${eval:...} expressions ---------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}


def safe_eval(expression: Any) -> Any:
    """Evaluate the arithmetic / conditional expressions DiffusionPolicy configs put in ``${eval:...}``.

    Why not Python's ``eval`` (which DiffusionPolicy registers): a config is data, and a
    resolver that runs arbitrary code would make loading one run that code. This accepts
    literals (numbers, strings, True/False/None), ``+ - * / // % **`` on numbers,
    ``not/and/or``, comparisons, ``a if c else b`` and tuples/lists of those, e.g.
    ``'2 if False or True else 20 + 2'``; anything else (names, calls, attributes,
    subscripts) raises ``ValueError``. Non-string values (an interpolation that resolved
    to a number) are returned unchanged.
    """
    if not isinstance(expression, str):
        return expression
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"${{eval:...}}: cannot parse {expression!r}: {e.msg}") from e

    def number(v: Any) -> Any:
        if isinstance(v, (int, float)):  # bool is an int
            return v
        raise ValueError(f"${{eval:...}}: arithmetic on a non-number {v!r} in {expression!r}")

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [ev(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            v = ev(node.operand)
            return _UNARY[type(node.op)](v if isinstance(node.op, ast.Not) else number(v))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = number(ev(node.left)), number(ev(node.right))
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise ValueError(f"${{eval:...}}: exponent {b} too large in {expression!r}")
            return _BINARY[type(node.op)](a, b)
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                value = True
                for e in node.values:
                    value = ev(e)
                    if not value:
                        return value
                return value
            value = False
            for e in node.values:
                value = ev(e)
                if value:
                    return value
            return value
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = ev(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = ev(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        raise ValueError(
            f"${{eval:...}}: {type(node).__name__} is not allowed in {expression!r}; only arithmetic, "
            "comparisons, and/or/not, conditionals and literals are evaluated"
        )

    return ev(tree)


def register_eval_resolver() -> bool:
    """Register :func:`safe_eval` as OmegaConf's ``eval`` resolver unless one is registered already.

    Returns True when it registered. An ``eval`` resolver registered earlier (e.g. by
    DiffusionPolicy's own training script) is left in place.
    """
    from omegaconf import OmegaConf

    if OmegaConf.has_resolver("eval"):
        return False
    OmegaConf.register_new_resolver("eval", safe_eval)
    return True


# ---- .ckpt → LowdimPolicy config and state dict ----------------------------------------

def _resolved(cfg: Any, key: str, problems: list[str]) -> Any:
    """``cfg[key]`` (a dotted key) resolved to plain Python, or None (absent, or a problem recorded)."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as e:  # omegaconf raises several kinds for bad interpolations
        problems.append(f"cfg.{key} cannot be resolved ({type(e).__name__}: {e})")
        return None


def _as_config(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.create(dict(cfg))
    raise ValueError(f"cfg must be an OmegaConf DictConfig or a dict, got {type(cfg).__name__}")


def _checked_scheduler(policy: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``cfg.policy.noise_scheduler`` as a dict, built once to check it (a failure is added to ``problems``)."""
    from para_policy.schedule import build_scheduler

    scheduler = dict(policy.get("noise_scheduler") or {})
    if "noise_scheduler" in policy:
        try:
            build_scheduler(scheduler)
        except Exception as e:  # unknown _target_, bad kwargs
            problems.append(f"cfg.policy.noise_scheduler: {e}")
    return scheduler


def diffusion_policy_config(cfg: Any) -> dict[str, Any]:
    """LowdimPolicy's config dict from a DiffusionPolicy workspace ``cfg`` (DictConfig or dict).

    Reads ``cfg.policy`` (its ``_target_``, ``model.*`` UNet arguments, ``noise_scheduler.*``
    and the policy arguments). Only ``DiffusionUnetLowdimPolicy`` with global conditioning
    or inpainting is supported. Raises ``ValueError`` listing every problem found.
    """

    register_eval_resolver()
    cfg = _as_config(cfg)
    problems: list[str] = []
    policy = _resolved(cfg, "policy", problems)
    if not isinstance(policy, Mapping):
        if not problems:
            problems.append("cfg has no 'policy' section")
        raise ValueError("not a usable DiffusionPolicy checkpoint config: " + "; ".join(problems))
    target = str(policy.get("_target_", ""))
    if target in (IMAGE_TARGET, HYBRID_TARGET):
        return _image_policy_config(policy, target)
    if target not in (LOWDIM_TARGET, TRANSFORMER_LOWDIM_TARGET):
        name = target.rsplit(".", 1)[-1] or "(none)"
        raise ValueError(
            f"unsupported DiffusionPolicy policy _target_ {target!r} ({name}); para_policy reads "
            + ", ".join(t.rsplit(".", 1)[-1] for t in SUPPORTED_TARGETS) + " checkpoints"
        )
    transformer = target == TRANSFORMER_LOWDIM_TARGET
    missing = [k for k in REQUIRED_POLICY_KEYS if k not in policy]
    if missing:
        problems.append(f"cfg.policy is missing {missing}")
    extra = sorted(set(policy) - {"_target_", *REQUIRED_POLICY_KEYS, *OPTIONAL_POLICY_KEYS})
    if extra:
        problems.append(f"cfg.policy has scheduler.step arguments {extra}, which para_policy does not support")
    if policy.get("obs_as_local_cond", False):
        problems.append("obs_as_local_cond=True (local conditioning) is not supported; expected global "
                        "conditioning or inpainting")
    model = dict(policy.get("model") or {})
    net_target, net_args = (TRANSFORMER_TARGET, TRANSFORMER_ARGS) if transformer else (UNET_TARGET, UNET_ARGS)
    model_target = str(model.pop("_target_", net_target))
    if model_target != net_target:
        problems.append(f"cfg.policy.model._target_ is {model_target!r}, expected {net_target}")
    unknown_args = sorted(set(model) - set(net_args))
    if unknown_args:
        problems.append(f"cfg.policy.model has arguments {net_target.rsplit('.', 1)[-1]} does not take: "
                        f"{unknown_args}")
    if "model" in policy and "input_dim" not in model:
        problems.append("cfg.policy.model is missing input_dim")
    if model.get("local_cond_dim") is not None:
        problems.append("cfg.policy.model.local_cond_dim is set (local conditioning is not supported)")
    model.pop("local_cond_dim", None)
    scheduler = _checked_scheduler(policy, problems)
    if problems:
        raise ValueError("cannot convert this DiffusionPolicy checkpoint: " + "; ".join(problems))
    return {
        "horizon": int(policy["horizon"]),
        "n_obs_steps": int(policy["n_obs_steps"]),
        "n_action_steps": int(policy["n_action_steps"]),
        "obs_dim": int(policy["obs_dim"]),
        "action_dim": int(policy["action_dim"]),
        # DiffusionPolicy's defaults (they differ from LowdimPolicy's), set explicitly; its transformer
        # policy calls it obs_as_cond and always starts the executed actions at n_obs_steps - 1
        "model_type": "transformer" if transformer else "unet",
        "num_inference_steps": policy.get("num_inference_steps"),
        "obs_as_global_cond": bool(policy.get("obs_as_cond" if transformer else "obs_as_global_cond", False)),
        "pred_action_steps_only": bool(policy.get("pred_action_steps_only", False)),
        "oa_step_convention": True if transformer else bool(policy.get("oa_step_convention", False)),
        "model": model,
        "noise_scheduler": scheduler,
        "source": {"format": "diffusion_policy.ckpt", "policy_target": target},
    }


SUPPORTED_TARGETS = (LOWDIM_TARGET, TRANSFORMER_LOWDIM_TARGET, IMAGE_TARGET, HYBRID_TARGET)


def _image_policy_config(policy: Mapping[str, Any], target: str) -> dict[str, Any]:
    """ImagePolicy's config from the resolved ``cfg.policy`` of an image or hybrid-image policy."""
    from para_policy.models.vision import multi_image_encoder_from_dp, robomimic_encoder_from_dp

    problems = []
    missing = [k for k in (*IMAGE_POLICY_KEYS, *IMAGE_ENCODER_KEYS[target][:1]) if k not in policy]
    if missing:
        problems.append(f"cfg.policy is missing {missing}")
    extra = sorted(set(policy) - {"_target_", *IMAGE_POLICY_KEYS, *IMAGE_OPTIONAL_KEYS, *IMAGE_ENCODER_KEYS[target]})
    if extra:
        problems.append(f"cfg.policy has scheduler.step arguments {extra}, which para_policy does not support")
    if not policy.get("obs_as_global_cond", True):
        problems.append("obs_as_global_cond=False (inpainting image features) is not supported")
    shape_meta = policy.get("shape_meta") or {}
    obs_meta = shape_meta.get("obs") if isinstance(shape_meta, Mapping) else None
    action_shape = list((shape_meta.get("action") or {}).get("shape", [])) if isinstance(shape_meta, Mapping) else []
    if not isinstance(obs_meta, Mapping) or not obs_meta:
        problems.append("cfg.policy.shape_meta.obs is missing or empty")
    if len(action_shape) != 1:
        problems.append(f"cfg.policy.shape_meta.action.shape must be [action_dim], got {action_shape}")
    scheduler = _checked_scheduler(policy, problems)
    encoder = None
    if not problems:
        try:
            with torch.device("meta"):  # the spec and feature size, without allocating the network
                if target == IMAGE_TARGET:
                    encoder = multi_image_encoder_from_dp(dict(policy["obs_encoder"]), dict(shape_meta))
                else:
                    encoder = robomimic_encoder_from_dp(dict(policy), dict(shape_meta))
        except ValueError as e:
            problems.append(f"cfg.policy observation encoder: {e}")
    if problems:
        raise ValueError("cannot convert this DiffusionPolicy checkpoint: " + "; ".join(problems))
    obs_keys = {str(k): {"shape": [int(d) for d in v["shape"]], "type": str(v.get("type", "low_dim"))}
                for k, v in obs_meta.items()}
    normalizer = {k: {"shape": [1] if v["type"] == "rgb" else v["shape"], "mode": "affine"}
                  for k, v in obs_keys.items()}
    normalizer["action"] = {"shape": action_shape, "mode": "affine"}
    n_obs_steps, feature_dim = int(policy["n_obs_steps"]), int(encoder.feature_dim)
    unet = {"input_dim": int(action_shape[0]), "local_cond_dim": None, "global_cond_dim": feature_dim * n_obs_steps,
            "diffusion_step_embed_dim": int(policy.get("diffusion_step_embed_dim", 256)),
            "down_dims": list(policy.get("down_dims", (256, 512, 1024))),
            "kernel_size": int(policy.get("kernel_size", 5)), "n_groups": int(policy.get("n_groups", 8)),
            "cond_predict_scale": bool(policy.get("cond_predict_scale", True))}
    return {
        "horizon": int(policy["horizon"]),
        "n_obs_steps": n_obs_steps,
        "n_action_steps": int(policy["n_action_steps"]),
        "obs_dim": feature_dim,
        "action_dim": int(action_shape[0]),
        "model_type": "unet",
        "num_inference_steps": policy.get("num_inference_steps"),
        "obs_as_global_cond": True,
        "pred_action_steps_only": False,
        "oa_step_convention": True,  # DiffusionUnet(Hybrid)ImagePolicy executes from n_obs_steps - 1
        "model": unet,
        "noise_scheduler": scheduler,
        "obs_keys": obs_keys,
        "obs_encoder": encoder.spec,
        "normalizer": normalizer,
        "source": {"format": "diffusion_policy.ckpt", "policy_target": target},
    }


def read_diffusion_policy_checkpoint(
    path: str | os.PathLike, use_ema: bool | None = None, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a DiffusionPolicy workspace ``.ckpt``: returns ``(state_dict, config)`` for LowdimPolicy.

    The file is unpickled by :class:`~para_policy.integrations.restricted_pickle.RestrictedUnpickler`:
    only tensors, the OmegaConf config and plain data are rebuilt; a file that names any other
    global (``os.system``, ``eval``, ...) is refused before anything runs.

    Args:
        trust_pickle: unpickle with torch's full unpickler instead (runs whatever the file
            says: only for files you trust that hold something the restricted reader refuses).
        use_ema: take ``state_dicts['ema_model']`` (True) or ``['model']`` (False); None
            follows ``cfg.training.use_ema`` as DiffusionPolicy's evaluation does (and, when the
            cfg does not say, takes ``ema_model`` if present).
    Returns:
        ``state_dict`` with ``model.*`` and ``normalizer.params_dict.{obs,action}.*`` tensors
        (DiffusionPolicy's names, which LowdimPolicy shares), and the config dict
        (:func:`diffusion_policy_config`).
    Raises:
        FileNotFoundError, or ValueError listing what is wrong with the file.
    """
    from para_policy.extras import require

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for module in ("dill", "omegaconf"):
        require(module, "diffusion-policy", "reading a DiffusionPolicy .ckpt")
    from para_policy.integrations import restricted_pickle

    try:
        if trust_pickle:
            warnings.warn(f"{path}: unpickling with trust_pickle=True runs any code the file holds", stacklevel=2)
            payload = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            payload = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except restricted_pickle.UnsafeCheckpointError as e:
        raise ValueError(f"{path}: {e}") from None
    except ModuleNotFoundError as e:
        raise ValueError(f"{path}: unpickling needs module {e.name!r}, which is not installed") from e
    except Exception as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    problems = []
    if not isinstance(payload, Mapping):
        raise ValueError(f"{path}: expected a DiffusionPolicy workspace payload dict, got {type(payload).__name__}")
    for key in ("cfg", "state_dicts"):
        if key not in payload:
            problems.append(f"payload has no {key!r} (keys: {sorted(map(str, payload))})")
    if problems:
        raise ValueError(f"{path} is not a DiffusionPolicy workspace checkpoint: " + "; ".join(problems))
    cfg = payload["cfg"]
    try:
        config = diffusion_policy_config(cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    state_dicts = payload["state_dicts"]
    if use_ema is None:
        register_eval_resolver()
        cfg_problems: list[str] = []
        flag = _resolved(_as_config(cfg), "training.use_ema", cfg_problems)
        use_ema = bool(flag) if flag is not None else "ema_model" in state_dicts
    source = "ema_model" if use_ema else "model"
    if source not in state_dicts or not isinstance(state_dicts[source], Mapping):
        raise ValueError(
            f"{path}: state_dicts has no {source!r} (use_ema={use_ema}); it has {sorted(state_dicts)}"
        )
    raw = state_dicts[source]
    state_dict: dict[str, torch.Tensor] = {}
    unexpected = []
    image = "obs_encoder" in config
    for key, value in raw.items():
        if key in IGNORED_WEIGHTS:
            continue
        if not key.startswith(IMAGE_WEIGHT_PREFIXES if image else WEIGHT_PREFIXES) \
                or not isinstance(value, torch.Tensor):
            unexpected.append(key)
            continue
        state_dict[key] = value
    if unexpected:
        raise ValueError(
            f"{path}: state_dicts[{source!r}] has entries a {config['source']['policy_target'].rsplit('.', 1)[-1]} "
            f"does not: {unexpected[:10]}"
            + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
        )
    if image:  # the normalizer's parameter shapes are the file's (DiffusionPolicy's image range is (1,))
        for field, meta in config["normalizer"].items():
            scale = state_dict.get(f"normalizer.params_dict.{field}.scale")
            if scale is None:
                raise ValueError(f"{path}: state_dicts[{source!r}] has no normalizer for {field!r}")
            meta["shape"] = list(scale.shape)
    config["source"]["weights"] = source
    return state_dict, config


# ---- patching live policy objects --------------------------------------------------------

class SamplingPatch:
    """What :func:`patch` installed on a policy object, and what it needs to undo it.

    Attributes:
        owner: the object given to ``patch`` (its ``para_stats`` is set after every call).
        target: the object whose ``conditional_sample`` was replaced (the policy itself for
            DiffusionPolicy, ``policy.diffusion`` for LeRobot).
        spec: the :class:`~para_policy.samplers.SamplerConfig` in use.
        stats: the :class:`SampleStats` of the last call; last_spec: the spec it ran (window resolved).
        n_action_steps: actions executed between calls (the warm start's shift).

    Warm start (``spec.warm_start``, on in the ``paradigms`` preset): each call keeps its
    clean trajectory shifted by ``n_action_steps``, and the next call with the same batch
    shape and schedule starts from it. The owner's ``reset()`` (DiffusionPolicy's, and
    LeRobot's, which clears its action queue) also forgets it; :meth:`reset` does it directly.
    """

    ATTRIBUTE = "_para_patch"

    def __init__(self, owner: Any, target: Any, spec: Any, kind: str, n_action_steps: int) -> None:
        self.owner = owner
        self.target = target
        self.spec = spec
        self.kind = kind
        self.n_action_steps = int(n_action_steps)
        self.saved: dict[tuple[Any, str], tuple[bool, Any]] = {}
        self.stats: SampleStats | None = None
        self.last_spec: Any = None
        self._schedules: dict[tuple, Schedule] = {}
        self._warm: tuple[tuple, torch.Tensor] | None = None
        self._model_id: str | None = None

    def set_spec(self, spec: Any) -> None:
        self.spec = spec
        self._schedules.clear()
        self.reset()

    def reset(self) -> None:
        """Forget the previous call's trajectory: the next call starts cold."""
        self._warm = None

    def schedule(self, scheduler: Any, steps: int, eta: float = 0.0) -> Schedule:
        """The schedule of the policy's scheduler (or its DDIM twin) at ``steps``; cached."""
        from para_policy.samplers.registry import build_schedule, schedule_key

        key = (id(scheduler), *schedule_key(self.spec, scheduler, steps), float(eta))
        if key not in self._schedules:
            self._schedules[key] = build_schedule(self.spec, scheduler, steps, eta)
        return self._schedules[key]

    def resolved_spec(self, denoiser: Any, model: torch.nn.Module, schedule: Schedule, shape: tuple[int, int, int],
                      condition: torch.Tensor | None, inpaint: tuple | None) -> Any:
        """The spec with ``window='auto'`` resolved for this model, schedule and batch (cached)."""
        if not self.spec.window_is_auto:
            return self.spec
        from para_policy.window import (
            Problem,
            calibrate_window,
            model_fingerprint,
            resolve_window,
            tuned_spec,
            window_key,
        )

        if self._model_id is None:
            self._model_id = model_fingerprint(model)
        device = next(model.parameters()).device
        key = window_key(self._model_id, self.spec, schedule, shape[0], device, "{}")  # "{}": the plain model
        problem = Problem(shape, condition, inpaint)
        window, info = resolve_window(key, lambda: calibrate_window(
            denoiser, schedule, self.spec.with_options(warm_start=False), [problem], device=device))
        return tuned_spec(self.spec, window, info)

    def run(self, denoiser: Any, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
            condition: torch.Tensor | None, inpaint: tuple | None, model: torch.nn.Module) -> torch.Tensor:
        """Run the configured sampler (warm-started when it can be); record its stats as ``owner.para_stats``."""
        spec = self.spec
        kwargs: dict[str, Any] = {}
        call_key = (tuple(x_T.shape), schedule.kind, schedule.num_steps, str(x_T.device))
        with torch.inference_mode():
            if spec.iterative:
                spec = self.resolved_spec(denoiser, model, schedule, tuple(x_T.shape), condition, inpaint)
                kwargs = dict(spec.options)
                if spec.warm_start and self._warm is not None and self._warm[0] == call_key:
                    kwargs["init"] = warm_start_init(schedule, self._warm[1], x_T, noise)
            sample, stats = spec.family.sample(denoiser, schedule, x_T, noise, condition=condition, inpaint=inpaint,
                                               **kwargs)
            if spec.warm_start:
                self._warm = (call_key, shift_trajectory(sample, self.n_action_steps))
        stats.warm = "init" in kwargs
        self.stats, self.last_spec = stats, spec
        vars(self.owner)["para_stats"] = stats
        # samplers run in inference mode; a clone made here is an ordinary tensor, so caller code
        # that edits the result in place (as the original loop's output allowed) keeps working
        return sample.clone() if not torch.is_inference_mode_enabled() else sample

    def _replace(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        self.saved[(obj, name)] = (name in vars(obj), vars(obj).get(name))
        vars(obj)[name] = fn  # an instance attribute shadows the method

    def install(self, fn: Callable[..., torch.Tensor]) -> None:
        self._replace(self.target, "conditional_sample", fn)
        reset = getattr(self.owner, "reset", None)
        if callable(reset):
            def patched_reset(*args: Any, **kwargs: Any) -> Any:
                self.reset()
                return reset(*args, **kwargs)

            self._replace(self.owner, "reset", patched_reset)
        vars(self.owner)[self.ATTRIBUTE] = self
        vars(self.owner)["para_stats"] = None

    def remove(self) -> None:
        for (obj, name), (had_own, original) in self.saved.items():
            if had_own:
                vars(obj)[name] = original
            else:
                vars(obj).pop(name, None)
        vars(self.owner).pop(self.ATTRIBUTE, None)
        vars(self.owner).pop("para_stats", None)


def in_model_dtype(denoiser: Callable[..., torch.Tensor], model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``denoiser`` with ``x`` (N, T, D) and a float condition in ``model``'s parameter dtype, its output in ``x``'s.

    The samplers keep their state in float32 while a patched object's network may be cast to
    bfloat16 or float16 (or run under autocast, whose output dtype is autocast's): the network
    sees only its own dtype, the sampler only its own. No-op casts at float32.
    """
    weights = next(model.parameters()).dtype

    def cast(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if c is not None and c.is_floating_point():
            c = c.to(weights)
        return denoiser(x.to(weights), t, c).to(x.dtype)

    return cast


def _step_kwargs(kwargs: Mapping[str, Any]) -> float:
    """DiffusionPolicy passes ``**kwargs`` on to ``scheduler.step``; only DDIM's ``eta`` is understood."""
    unknown = sorted(set(kwargs) - {"eta"})
    if unknown:
        raise TypeError(f"patched conditional_sample does not support scheduler.step arguments {unknown}; "
                        "it takes only eta (DDIM)")
    return float(kwargs.get("eta", 0.0))


def patch_diffusion_policy(policy: Any, sampler: str = "paradigms", **options: Any) -> Any:
    """Replace ``policy.conditional_sample`` of a DiffusionPolicy policy object with para_policy sampling.

    Duck-typed: any object with ``conditional_sample``, ``model``, ``noise_scheduler`` and
    ``num_inference_steps`` (``DiffusionUnetLowdimPolicy``, and the image/hybrid policies,
    whose ``conditional_sample`` has the same contract; ``DiffusionTransformerLowdimPolicy``,
    which passes ``cond=`` (B, To, Do) instead and calls ``model(x, t, cond)``). The replacement
    keeps the original's signature ``(condition_data (B,T,D), condition_mask (B,T,D) bool,
    local_cond=None, global_cond=None, generator=None, **kwargs) -> (B,T,D)``: it draws
    ``x_T`` and the step noise from ``generator`` (or torch's global RNG) in the original
    loop's order, so a seed gives the same sample as before patching (up to ``tolerance``).
    Precision: ``x_T``, the noise, the sampler's state and the returned sample are float32
    (float64 if ``condition_data`` is) whatever the network's dtype; each network call gets its
    input and conditioning in the network's parameter dtype (:func:`in_model_dtype`), so a
    policy cast to bfloat16 or run under ``torch.autocast`` samples with the sampler's
    arithmetic at float32. Stats of the last call are in ``policy.para_stats``. With the ``paradigms`` preset each
    call warm-starts from the previous one (same batch shape), shifted by
    ``policy.n_action_steps``; ``policy.reset()`` forgets it. Undo with :func:`unpatch`.
    """
    spec = sampler_spec(sampler, **options)
    existing = vars(policy).get(SamplingPatch.ATTRIBUTE)
    if existing is not None:  # re-patching changes the sampler, keeps the saved original
        existing.set_spec(spec)
        return policy
    state = SamplingPatch(policy, policy, spec, "diffusion_policy", getattr(policy, "n_action_steps", 0))

    def conditional_sample(condition_data: torch.Tensor, condition_mask: torch.Tensor,
                           local_cond: torch.Tensor | None = None, global_cond: torch.Tensor | None = None,
                           generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        transformer = "cond" in kwargs  # DiffusionTransformerLowdimPolicy passes cond=, its model takes it third
        cond = kwargs.pop("cond", None)
        eta = _step_kwargs(kwargs)
        model = policy.model
        schedule = state.schedule(policy.noise_scheduler, policy.num_inference_steps, eta)
        sample_dtype = torch.promote_types(condition_data.dtype, torch.float32)  # DP's dtype when it is float32
        x_T, noise = draw_noise(schedule, tuple(condition_data.shape), generator,
                                device=condition_data.device, dtype=sample_dtype)
        if transformer:
            condition = cond

            def denoiser(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
                return model(x, t, c)
        elif local_cond is None:
            condition = global_cond

            def denoiser(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
                return model(x, t, local_cond=None, global_cond=c)
        else:  # rows carry their batch index; both conditionings are gathered by it
            condition = torch.arange(condition_data.shape[0], device=condition_data.device)
            weights = next(model.parameters()).dtype
            local = local_cond.to(weights)
            glob = None if global_cond is None else global_cond.to(weights)

            def denoiser(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
                return model(x, t, local_cond=local[c], global_cond=None if glob is None else glob[c])
        inpaint = (condition_data.to(sample_dtype), condition_mask.to(torch.bool))
        return state.run(in_model_dtype(denoiser, model), schedule, x_T, noise, condition, inpaint, model)

    state.install(conditional_sample)
    return policy


def unpatch(policy: Any) -> Any:
    """Undo :func:`patch`: the object's ``conditional_sample`` is the one it had before, exactly."""
    state = vars(policy).get(SamplingPatch.ATTRIBUTE)
    if state is None:
        raise ValueError(f"{type(policy).__name__} object is not patched by para_policy")
    state.remove()
    return policy
