"""A low-dimensional diffusion policy with DiffusionPolicy's interface and a choice of sampler.

The only place where observations become conditioning and sampled trajectories become
actions. Data flow: obs (B, To, Do) → normalize → conditioning → sampler → trajectory
(B, horizon, Da) → unnormalize → actions (B, n_action_steps, Da).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from para_policy.models import ConditionalUnet1D, TransformerForDiffusion
from para_policy.normalizer import LinearNormalizer
from para_policy.samplers import SampleStats, diffuse_known, draw_noise, shift_trajectory, warm_start_init
from para_policy.samplers.captured import captured_sampler, run_captured
from para_policy.samplers.common import known_mask
from para_policy.samplers.registry import SamplerConfig, build_schedule, sampler_spec, schedule_key
from para_policy.schedule import Schedule, build_scheduler

#: how ``predict_action`` imposes frozen ``prefix_actions``: clean, or at each step's noise level
PREFIX_MODES = ("clean", "noised")
CONFIG_KEYS = ("horizon", "n_obs_steps", "n_action_steps", "obs_dim", "action_dim", "model", "noise_scheduler")
log = logging.getLogger("para_policy.policy")


class PolicyOutput(dict):
    """``predict_action``'s result: DiffusionPolicy's dict of tensors, plus the call's sampling record.

    Items: ``'action'`` (B, n_action_steps, Da), ``'action_pred'`` (B, T, Da), both in the
    policy's :attr:`~LowdimPolicy.sample_dtype` (float32 whatever the network's dtype). Attributes:
    ``stats`` (:class:`~para_policy.samplers.SampleStats`), ``trajectory`` (the normalized
    clean sample, (B, T, D)), ``spec`` (the :class:`SamplerConfig` it ran, window resolved),
    ``warm`` (whether it started from a warm-start guess).
    """

    stats: SampleStats
    trajectory: torch.Tensor
    spec: SamplerConfig
    warm: bool


class _Refused:
    """The denoiser of a policy moved where its inference settings cannot run: every call raises why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, *args: Any) -> torch.Tensor:
        raise ValueError(self.reason)


def _runs_sequentially(spec: SamplerConfig, schedule: Schedule, deadline: float | None) -> bool:
    """Whether ``picard_sample`` runs ``spec`` as the sequential loop (window 1, no deadline, no round cap)."""
    from para_policy.samplers import picard_sample

    cap = spec.options.get("max_iterations")
    return (spec.family.sample is picard_sample and spec.options.get("window") == 1 and deadline is None
            and (cap is None or cap >= schedule.num_steps))


def _with_prefix(inpaint: tuple | None, prefix: tuple, prefix_mode: str, schedule: Schedule,
                 x_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The known entries of a call with frozen ``prefix`` actions, merged with an inpainting policy's observations.

    The observation entries are imposed clean, as DiffusionPolicy imposes them; the frozen actions
    clean or (``prefix_mode='noised'``) at each step's noise level; a guide pulls toward the clean plan.
    """
    imposed = prefix[1] if prefix[1].dtype == torch.bool else prefix[1] > 0
    known = prefix
    if inpaint is not None:
        mask = prefix[1] | inpaint[1] if prefix[1].dtype == torch.bool else \
            torch.maximum(prefix[1], inpaint[1].to(prefix[1]))
        known = (torch.where(imposed, prefix[0], inpaint[0]), mask)
    if prefix_mode == "noised":
        known = (diffuse_known(schedule, known[0], known_mask(prefix[1]), x_T.to(known[0])), known[1])
    return known


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    """``config[key]`` as an int >= 1, or a ``ValueError`` naming the key."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"policy config {key} must be an integer >= 1, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"policy config {key} must be an integer >= 1, got {value!r}")
    return int(value)


class LowdimPolicy(nn.Module):
    """DiffusionPolicy's low-dim policies with pluggable sampling.

    ``model_type='unet'``: ``DiffusionUnetLowdimPolicy`` (``ConditionalUnet1D``);
    ``model_type='transformer'``: ``DiffusionTransformerLowdimPolicy`` (``TransformerForDiffusion``).
    Modes, as DiffusionPolicy has them: observations as conditioning (``obs_as_global_cond``:
    the UNet's flat ``global_cond``, the transformer's ``cond`` tokens; optionally
    ``pred_action_steps_only``), or inpainting (the trajectory holds action and observation, the
    first ``n_obs_steps`` observations imposed as known entries).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"policy config is missing {missing}; expected keys {list(CONFIG_KEYS)}")
        self.config = dict(config)
        c = self.config
        for key in ("model", "noise_scheduler"):
            if not isinstance(c[key], Mapping):
                raise ValueError(f"policy config {key} must be a mapping, got {type(c[key]).__name__}")
        self.horizon = _positive_int(c, "horizon")
        self.n_obs_steps = _positive_int(c, "n_obs_steps")
        self.n_action_steps = _positive_int(c, "n_action_steps")
        self.obs_dim = _positive_int(c, "obs_dim")
        self.action_dim = _positive_int(c, "action_dim")
        self.obs_as_global_cond = bool(c.get("obs_as_global_cond", True))
        self.pred_action_steps_only = bool(c.get("pred_action_steps_only", False))
        self.oa_step_convention = bool(c.get("oa_step_convention", True))
        self.num_inference_steps = _positive_int(c, "num_inference_steps") if c.get("num_inference_steps") \
            is not None else int(c["noise_scheduler"].get("num_train_timesteps", 100))
        if not self.pred_action_steps_only and self.action_start + self.n_action_steps > self.horizon:
            raise ValueError(
                f"horizon={self.horizon} is too short for n_obs_steps={self.n_obs_steps} and n_action_steps="
                f"{self.n_action_steps}: the executed actions start at index {self.action_start}, so horizon must "
                f"be >= {self.action_start + self.n_action_steps}")
        if c.get("obs_as_local_cond", False):
            raise ValueError("obs_as_local_cond=True policies are not supported; expected global "
                             "conditioning or inpainting")
        if self.pred_action_steps_only and not self.obs_as_global_cond:
            raise ValueError("pred_action_steps_only requires obs_as_global_cond (as in DiffusionPolicy)")
        expected_in = self.action_dim if self.obs_as_global_cond else self.action_dim + self.obs_dim
        model_cfg = dict(c["model"])
        if int(model_cfg.get("input_dim", -1)) != expected_in:
            raise ValueError(f"model.input_dim is {model_cfg.get('input_dim')}, expected {expected_in} "
                             f"for this policy's mode and dims")
        self.model_type = str(c.get("model_type", "unet"))
        if self.model_type == "unet":
            expected_cond = self.obs_dim * self.n_obs_steps if self.obs_as_global_cond else None
            if model_cfg.get("global_cond_dim") != expected_cond:
                raise ValueError(f"model.global_cond_dim is {model_cfg.get('global_cond_dim')}, expected "
                                 f"{expected_cond} (obs_dim × n_obs_steps with global conditioning)")
            self.condition_kw = "global_cond"
            self.model = ConditionalUnet1D(**model_cfg)
        elif self.model_type == "transformer":
            expected = {"cond_dim": self.obs_dim if self.obs_as_global_cond else 0,
                        "horizon": self.trajectory_shape(1)[1], "output_dim": expected_in}
            for key, value in expected.items():
                if model_cfg.get(key, 0 if key == "cond_dim" else None) != value:
                    raise ValueError(f"model.{key} is {model_cfg.get(key)}, expected {value} for this policy")
            self.condition_kw = "cond"
            self.model = TransformerForDiffusion(**model_cfg)
        else:
            raise ValueError(f"model_type must be 'unet' or 'transformer', got {self.model_type!r}")
        self.normalizer = LinearNormalizer(self._normalizer_fields())
        self.noise_scheduler = build_scheduler(c["noise_scheduler"])
        self.sampler = sampler_spec("sequential")
        self.last_stats: SampleStats | None = None  # of the last call (also on its PolicyOutput)
        self.last_trajectory: torch.Tensor | None = None  # normalized (B, T, D) of the last call
        self.inference: dict[str, Any] = {}  # how the denoiser runs (set_inference)
        self._denoiser: Any = None  # the wrapped denoiser, None = the plain model
        self.backend_choice: tuple[str, str] | None = None  # (backend, why) when backend='default' picked it
        self._schedules: dict[tuple[str, int], Schedule] = {}
        self._captured: dict[str, Any] = {}  # captured_sampler's, per spec and schedule
        self._warm: tuple[tuple, torch.Tensor] | None = None  # (call key, next guess (B, T, D))
        self._fingerprint: str | None = None
        self._resolved: dict[tuple[int, int], tuple[SamplerConfig, SamplerConfig]] = {}  # resolve()'s memo

    def _normalizer_fields(self) -> dict[str, Any]:
        """The normalizer's fields and their shapes (:class:`~para_policy.normalizer.LinearNormalizer`)."""
        return {"obs": self.obs_dim, "action": self.action_dim}

    # ---- sampler choice -------------------------------------------------------------
    def set_sampler(self, sampler: str | SamplerConfig = "paradigms", **options: Any) -> LowdimPolicy:
        """Choose the sampler :meth:`predict_action` uses: a preset name plus options (:func:`sampler_spec`).

        Everything is validated now, the schedule included; the warm-start memory is cleared.
        """
        spec = sampler_spec(sampler, **options)
        self.schedule_for(spec)
        self.sampler = spec
        self.reset()
        return self

    def schedule_for(self, spec: SamplerConfig) -> Schedule:
        """The (cached) schedule a sampler spec runs on."""
        key = schedule_key(spec, self.noise_scheduler, self.num_inference_steps)
        if key not in self._schedules:
            self._schedules[key] = build_schedule(spec, self.noise_scheduler, self.num_inference_steps,
                                                  own=lambda: build_scheduler(self.config["noise_scheduler"]))
        return self._schedules[key]

    def reset(self) -> None:
        """Forget the previous call's trajectory (DiffusionPolicy's ``reset()``): the next call starts cold."""
        self._warm = None

    # ---- window='auto' ------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Digest of the denoiser's weights (the key the window cache uses); recomputed after ``load_state_dict``.

        The UNet alone, so a patched DiffusionPolicy object with the same network shares its window.
        """
        if self._fingerprint is None:
            from para_policy.window import model_fingerprint

            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._fingerprint = None
        self._resolved.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _window_key(self, spec: SamplerConfig, batch_size: int) -> str:
        from para_policy.window import window_key

        return window_key(self.fingerprint(), spec, self.schedule_for(spec), batch_size, self.device,
                          json.dumps(self.inference, sort_keys=True, default=str))

    def resolve(self, spec: SamplerConfig | None = None, obs: Any = None, batch_size: int = 1) -> SamplerConfig:
        """``spec`` (default: the policy's) with ``window='auto'`` replaced by this machine's window.

        Resolved once per (policy, sampler options, schedule, batch size, device) and cached
        (:func:`para_policy.window.resolve_window`); the first time it is measured on
        ``obs``: a batch or a list of observations (each as :meth:`observation_batch` takes it),
        or zero observations when None. Specs with an integer window come back unchanged.
        """
        spec = self.sampler if spec is None else spec
        if not spec.window_is_auto:
            return spec
        from para_policy.window import resolve_window, tuned_spec

        single = obs is not None and (torch.is_tensor(obs) or isinstance(obs, Mapping))
        if obs is None or single:  # this spec object resolved before at this batch size: skip building its key
            memo = self._resolved.get((id(spec), self.batch_size(obs) if single else batch_size))
            if memo is not None and memo[0] is spec:
                return memo[1]
        observations = None if obs is None else [self.observation_batch(o) for o in ([obs] if single else obs)]
        if observations:
            batch_size = self.batch_size(observations[0])
        window, info = resolve_window(self._window_key(spec, batch_size),
                                      lambda: self._tune(spec, observations, batch_size))
        resolved = tuned_spec(spec, window, info)
        if obs is None or single:
            if len(self._resolved) > 64:
                self._resolved.clear()
            self._resolved[(id(spec), batch_size)] = (spec, resolved)
        return resolved

    def window_tuning(self, spec: SamplerConfig | None = None, batch_size: int = 1) -> dict[str, Any] | None:
        """What resolving ``spec``'s ``window='auto'`` measured (window, cost curve, rounds), or None if not yet."""
        from para_policy.window import cached_window

        spec = self.sampler if spec is None else spec
        return cached_window(self._window_key(spec.with_options(window="auto"), batch_size))

    def calibrate(self, observations: Sequence[Any], spec: SamplerConfig | None = None, reps: int = 10
                  ) -> tuple[int, dict[str, Any]]:
        """Measure the window for ``spec`` (default: the policy's) now, on ``observations``, and cache it.

        ``observations``: a few observations as :meth:`observation_batch` takes them, e.g.
        arrays of ``(n_obs_steps, obs_dim)`` (batch 1) or ``(B, n_obs_steps, obs_dim)``.
        Replaces any cached window for the same key.
        Returns ``(window, info)`` (cost curve, predicted ms and rounds per window).
        """
        from para_policy.window import resolve_window

        spec = self.sampler if spec is None else spec
        if not spec.iterative:
            raise ValueError(f"calibrate needs a Picard sampler, not {spec.name!r}")
        if len(observations) == 0:
            raise ValueError("calibrate needs at least one (n_obs_steps, obs_dim) observation")
        obs = [self.observation_batch(o) for o in observations]
        auto = spec.with_options(window="auto")
        self._resolved.clear()
        return resolve_window(self._window_key(auto, self.batch_size(obs[0])),
                              lambda: self._tune(auto, obs, None, reps), recalibrate=True)

    def _tune(self, spec: SamplerConfig, obs: list[Any] | None, batch_size: int | None,
              reps: int = 10) -> tuple[int, dict[str, Any]]:
        from para_policy.window import tune_window

        if obs is None:
            obs = [self.zero_observation(batch_size or 1)]
        log.info("window='auto': measuring this machine's cost curve and each window's rounds "
                 "(once per policy, sampler options, batch size and device; cached)")
        return tune_window(self, spec.with_options(warm_start=False), obs, reps=reps)

    # ---- how the denoiser runs ------------------------------------------------------------
    def set_inference(self, **settings: Any) -> LowdimPolicy:
        """Change how the UNet runs: ``precision``, ``compile``, ``cuda_graphs``, ``devices``, ``backend``.

        Settings not given keep their value; all defaults (fp32, eager, one device) restore
        the plain model. The wrappers are composed in one place,
        :func:`para_policy.inference.make_denoiser`. ``backend='onnxruntime'`` / ``'auto'``
        export (and ``'auto'`` times) the network now, on this policy's call shapes.
        ``backend='default'`` (:func:`~para_policy.inference.default_backend`) stays the request:
        later settings and moves (``.to(device)``) pick again; :attr:`backend_choice` says what it picked.
        """
        from para_policy.inference import DEFAULT_BACKEND, default_backend, make_denoiser

        merged = {**self.inference, **settings}
        self._resolved.clear()  # the window cache key holds the inference settings
        choice = None
        if settings.get("backend", DEFAULT_BACKEND if self.backend_choice else None) == DEFAULT_BACKEND:
            choice = default_backend(self.model, **{k: v for k, v in merged.items() if k != "backend"})
            merged["backend"] = choice[0]
            log.info("backend='default' -> %r: %s", *choice)
        self.backend_choice = choice
        example = None
        # the shapes of one call, ((T, D), condition (1, ...)): ONNX exports and CUDA graphs are made now
        if merged.get("backend", "eager") != "eager" or merged.get("cuda_graphs"):
            with torch.inference_mode():
                example = (self.trajectory_shape(1)[1:], self.conditioning(self.zero_observation(1))[0])
        # CUDA graphs up front for the widest call of one sample: a window of every step
        rows = max(self.num_inference_steps, self.schedule_for(self.sampler).num_steps)
        self._denoiser = make_denoiser(self.model, condition_kw=self.condition_kw, example=example,
                                       capture_rows=rows, **merged)
        self.inference = {k: v for k, v in merged.items() if v not in (None, False, "fp32", "eager")}
        self._captured = {}
        if not self.inference and self.device.type != "cuda":  # on CUDA: the TF32-off wrapper (make_denoiser)
            self._denoiser = None
        return self

    def captured_sampler(self, spec: SamplerConfig, schedule: Schedule) -> Any:
        """On CUDA with ``cuda_graphs``: the captured form of ``spec`` (None: it has none, or not on CUDA).

        The sequential loop captured whole, or Picard's ``round_shape='fixed'`` rounds captured one
        graph per (B, W), model and bookkeeping together
        (:func:`~para_policy.samplers.captured.captured_sampler`), over the plain network with this
        policy's precision (a graph cannot hold the denoiser's own graphs); captured on the first
        call of each shape, so call once before a control loop starts; recaptured when the weights change.
        """
        if not self.inference.get("cuda_graphs") or self.device.type != "cuda":
            return None
        key = json.dumps([spec.as_dict(), schedule.kind, schedule.num_steps], sort_keys=True, default=str)
        if key not in self._captured:
            from para_policy.cuda_graphs import WeightsWatch
            from para_policy.inference import make_denoiser

            plain = make_denoiser(self.model, precision=self.inference.get("precision", "fp32"),
                                  condition_kw=self.condition_kw)
            self._captured[key] = captured_sampler(spec, schedule, plain,
                                                   weights_changed=WeightsWatch(self.model).changed)
        return self._captured[key]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> LowdimPolicy:
        """``.to()``, ``.cuda()``, ``.half()`` and the like; then a backend ``'default'`` picked is picked
        again where it no longer fits (ONNX Runtime for a model moved to a GPU), and a denoiser built for
        another device is built again for this one (CUDA graphs captured, TF32 off on CUDA; settings that
        cannot run here raise on the next call, naming them)."""
        params = self._modules.get("model")
        first = None if params is None else next(params.parameters(), None)
        before = None if first is None else (first.device, first.dtype)
        super()._apply(fn, *args, **kwargs)
        stale = False
        choice = getattr(self, "backend_choice", None)
        if choice is not None:
            from para_policy.inference import default_backend

            stale = default_backend(self.model, **{k: v for k, v in self.inference.items() if k != "backend"})[0] \
                != choice[0]
        moved = before is not None and (self.device, self.dtype) != before and (
            bool(getattr(self, "inference", None)) or getattr(self, "_denoiser", None) is not None
            or self.device.type == "cuda")
        if stale or moved:
            self._rebuild_denoiser(before)
        return self

    def _rebuild_denoiser(self, before: tuple[torch.device, torch.dtype] | None) -> None:
        """:meth:`set_inference` with the current settings after a move; what cannot run here is refused per call."""
        try:
            self.set_inference()
        except ValueError as e:
            where = "" if before is None else f" from {before[0]} ({before[1]})"
            reason = (f"the policy moved{where} to {self.device} ({self.dtype}), where its inference settings "
                      f"{self.inference} cannot run: {e}")
            warnings.warn(reason, stacklevel=3)
            self._denoiser = _Refused(reason)

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and pickle keep: all but the denoiser wrappers, which :meth:`__setstate__`
        builds again (ONNX Runtime sessions do not pickle, and a copied closure would run the original's network)."""
        state = super().__getstate__()
        state["_denoiser"] = None
        state["_captured"] = {}  # CUDA graphs do not copy; captured again on the first call
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.inference or self.device.type == "cuda":
            self.set_inference()

    # ---- observations → conditioning ------------------------------------------------
    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        """The observation keys of one control step and their shapes: ``{'obs': (obs_dim,)}``."""
        return {"obs": (self.obs_dim,)}

    def observation(self, obs_dict: Mapping[str, Any]) -> torch.Tensor:
        """The checked observations of a ``predict_action`` dict: ``obs_dict['obs']`` as (B, To, Do)."""
        if not isinstance(obs_dict, Mapping) or "obs" not in obs_dict:
            got = list(obs_dict) if isinstance(obs_dict, Mapping) else type(obs_dict).__name__
            raise ValueError(f"obs_dict must be a mapping with key 'obs' of shape (B, To, Do), got {got}")
        return self.check_obs(obs_dict["obs"])

    def observation_batch(self, obs: Any) -> torch.Tensor:
        """One observation set for calibration: (To, Do) (batch 1) or (B, To, Do), or ``{'obs': ...}``; checked."""
        if isinstance(obs, Mapping):
            obs = obs.get("obs")
        obs = obs if torch.is_tensor(obs) else torch.as_tensor(np.asarray(obs, dtype=np.float32))
        return self.check_obs(obs[None] if obs.dim() == 2 else obs)

    def zero_observation(self, batch_size: int) -> torch.Tensor:
        """Zero observations of ``batch_size`` (what the window is tuned on when no observation is given)."""
        return torch.zeros((batch_size, self.n_obs_steps, self.obs_dim), device=self.device, dtype=self.sample_dtype)

    @staticmethod
    def batch_size(obs: Any) -> int:
        """B of checked observations (a tensor, or a dict of tensors)."""
        first = next(iter(obs.values())) if isinstance(obs, Mapping) else obs
        return int(first.shape[0])

    def check_obs(self, obs: Any) -> torch.Tensor:
        """``obs`` as a (B, To, Do) tensor on the policy's device in :attr:`sample_dtype`; ``ValueError`` if wrong.

        Not the network's dtype: observations are normalized at float32 (the normalizer keeps its
        statistics there), and :meth:`conditioning` casts the network's input to its own dtype.
        """
        if not isinstance(obs, torch.Tensor):
            obs = torch.as_tensor(np.asarray(obs))
        if obs.dtype == torch.bool or obs.is_complex() or not (obs.is_floating_point() or obs.dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise ValueError(f"obs must hold real numbers (a float or integer dtype), got {obs.dtype}")
        if obs.dim() != 3 or obs.shape[0] < 1 or obs.shape[1] < self.n_obs_steps or obs.shape[2] != self.obs_dim:
            raise ValueError(
                f"obs must have shape (B >= 1, n_obs_steps={self.n_obs_steps}, obs_dim={self.obs_dim}), "
                f"got {tuple(obs.shape)}"
            )
        if not bool(torch.isfinite(obs).all()):
            raise ValueError("obs contains NaN or inf")
        return obs.to(device=self.device, dtype=self.sample_dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The network's parameter dtype (what the denoiser casts its input to)."""
        return next(self.model.parameters()).dtype

    @property
    def sample_dtype(self) -> torch.dtype:
        """The dtype of everything around the network: observations, ``x_T`` and noise, known entries, actions.

        float32 for a bfloat16, float16 or float32 network (float64 for a float64 one): the
        samplers keep their iterate, trajectory and convergence test in it, and only the
        denoiser's calls run in :attr:`dtype`, so ``policy.to(torch.bfloat16)`` rounds the
        network's arithmetic, not the sampler's.
        """
        return torch.promote_types(self.dtype, torch.float32)

    @property
    def action_start(self) -> int:
        """Index of the first executed action in the predicted trajectory."""
        if self.pred_action_steps_only:
            return 0
        return self.n_obs_steps - 1 if self.oa_step_convention else self.n_obs_steps

    def trajectory_shape(self, batch_size: int) -> tuple[int, int, int]:
        """Shape of the denoised trajectory: (B, T, D)."""
        T = self.n_action_steps if self.pred_action_steps_only else self.horizon
        D = self.action_dim if self.obs_as_global_cond else self.action_dim + self.obs_dim
        return (batch_size, T, D)

    def conditioning(self, obs: torch.Tensor) -> tuple[torch.Tensor | None, tuple | None]:
        """``(condition | None, inpaint (data, mask) | None)`` for raw obs (B, To, Do).

        The condition is the UNet's ``global_cond`` (B, To·Do) or the transformer's ``cond`` (B, To, Do),
        in the network's :attr:`dtype` (it goes only to the network); the inpainting data, which
        the sampler imposes on its iterate, stays in the observations' dtype (:attr:`sample_dtype`).
        """
        nobs = self.normalizer.normalize("obs", obs[:, : self.n_obs_steps])
        B = obs.shape[0]
        if self.obs_as_global_cond:  # the UNet's flat global_cond, the transformer's (B, To, Do) tokens
            return (nobs.reshape(B, -1) if self.model_type == "unet" else nobs).to(self.dtype), None
        shape = self.trajectory_shape(B)
        data = torch.zeros(shape, device=obs.device, dtype=obs.dtype)
        mask = torch.zeros(shape, device=obs.device, dtype=torch.bool)
        data[:, : self.n_obs_steps, self.action_dim:] = nobs
        mask[:, : self.n_obs_steps, self.action_dim:] = True
        return None, (data, mask)

    def prefix_inpaint(self, prefix_actions: Any, shape: tuple[int, int, int], guide_actions: Any = None
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Known entries ``(data, mask)``, both ``shape`` (B, T, D), for raw frozen actions (B, d, Da); None if d = 0.

        The actions go to the action dims at positions ``action_start .. action_start + d``,
        normalized; ``d < n_action_steps`` so the chunk still has actions of its own to sample.
        ``guide_actions`` (B, m, Da), raw, continue them at the next positions (as far as the
        trajectory reaches) with real-time chunking's soft mask: weights ``c (e^c - 1) / (e - 1)``,
        ``c = (m - i) / (m + 1)`` at the i-th, decaying from about 1 to about 0 (Black et al. 2025);
        ``mask`` then holds float weights (1 on the frozen actions) instead of a bool mask.
        """
        p = self._raw_actions(prefix_actions, "prefix_actions", shape[0], "d", below_n_action_steps=True)
        d = p.shape[1]
        if d == 0:
            if guide_actions is not None:
                raise ValueError("guide_actions continue frozen prefix_actions: pass d >= 1 prefix actions")
            return None
        start, Da = self.action_start, self.action_dim
        data = torch.zeros(shape, device=self.device, dtype=self.sample_dtype)
        mask = torch.zeros(shape, device=self.device, dtype=torch.bool)
        data[:, start: start + d, :Da] = self.normalizer.normalize("action", p)
        mask[:, start: start + d, :Da] = True
        if guide_actions is None:
            return data, mask
        guide = self._raw_actions(guide_actions, "guide_actions", shape[0], "m")
        first, m = start + d, guide.shape[1]
        n = max(0, min(m, shape[1] - first))
        weights = mask.to(self.sample_dtype)
        if n:
            c = (m - torch.arange(n, device=self.device, dtype=self.sample_dtype)) / (m + 1)
            data[:, first: first + n, :Da] = self.normalizer.normalize("action", guide[:, :n])
            weights[:, first: first + n, :Da] = (c * torch.expm1(c) / math.expm1(1.0)).view(1, n, 1)
        return data, weights

    def _raw_actions(self, actions: Any, name: str, batch_size: int, length: str,
                     below_n_action_steps: bool = False) -> torch.Tensor:
        """``actions`` as a (B, length, Da) tensor on the policy's device; an error naming ``name`` if it is not one."""
        a = actions if isinstance(actions, torch.Tensor) else torch.as_tensor(np.asarray(actions))
        limit = f" with {length} < n_action_steps={self.n_action_steps}" if below_n_action_steps else ""
        if a.dim() != 3 or a.shape[0] != batch_size or a.shape[2] != self.action_dim \
                or (below_n_action_steps and a.shape[1] >= self.n_action_steps):
            raise ValueError(f"{name} must have shape (B={batch_size}, {length}, action_dim={self.action_dim}){limit}, "
                             f"got {tuple(a.shape)}")
        if not (a.is_floating_point() or a.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                     torch.uint8)):
            raise ValueError(f"{name} must hold real numbers, got {a.dtype}")
        a = a.to(device=self.device, dtype=self.sample_dtype)
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return a

    def denoise(self, x: torch.Tensor, t: torch.Tensor, global_cond: torch.Tensor | None) -> torch.Tensor:
        """The denoiser callable handed to samplers (through the wrappers of :meth:`set_inference`).

        ``x`` (N, T, D) in the sampler's dtype (float32) → the network's prediction (N, T, D) in
        ``x``'s dtype: ``x`` and the conditioning are cast to the network's :attr:`dtype` for the
        call, and its output (that dtype, or autocast's) back, so a network cast to bfloat16 or
        run under ``torch.autocast`` never sees, nor returns, another dtype than its own. Both
        casts are no-ops when the dtypes already match.
        """
        if self._denoiser is not None:  # make_denoiser's wrappers cast the same way
            return self._denoiser(x, t, global_cond)
        dtype = self.dtype
        if global_cond is not None and global_cond.is_floating_point():
            global_cond = global_cond.to(dtype)
        return self.model(x.to(dtype), t, **{self.condition_kw: global_cond}).to(x.dtype)

    def _initial_noise(self, schedule: Schedule, shape: tuple[int, int, int], generator: torch.Generator | None,
                       x_T: torch.Tensor | None, noise: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x_T (B, T, D), noise (B, S, T, D) | None)`` in :attr:`sample_dtype`: drawn, or the caller's cast.

        Drawn from ``generator`` in DiffusionPolicy's order when ``x_T`` is None; a caller's tensors
        (e.g. drawn in the network's dtype) join the sampler's dtype, so a warm-start guess built on
        them is not rounded to it.
        """
        if x_T is None:
            if noise is not None:
                raise ValueError("pass x_T together with noise")
            return draw_noise(schedule, shape, generator, device=self.device, dtype=self.sample_dtype)
        cast = {"device": self.device, "dtype": self.sample_dtype}
        return x_T.to(**cast), None if noise is None else noise.to(**cast)

    # ---- inference ----------------------------------------------------------------
    @torch.inference_mode()
    def predict_action(
        self,
        obs_dict: Mapping[str, torch.Tensor],
        *,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        warm_start: torch.Tensor | bool | None = None,
        warm_rows: torch.Tensor | None = None,
        deadline: float | None = None,
        sampler: str | SamplerConfig | None = None,
        prefix_actions: torch.Tensor | None = None,
        guide_actions: torch.Tensor | None = None,
        prefix_mode: str = "clean",
        **options: Any,
    ) -> PolicyOutput:
        """DiffusionPolicy's ``predict_action``: ``{'obs': (B, To, Do)}`` → actions.

        Args:
            generator: draws ``x_T`` and the step noise in DiffusionPolicy's order.
            x_T, noise: explicit initial and per-step noise instead (both or neither).
            init: initial Picard iterate of the whole trajectory, (B, S, T, D).
            warm_start: ``None`` (default): when the spec has ``warm_start`` and the previous
                call had the same batch size and schedule, start from that call's clean
                trajectory shifted by ``n_action_steps`` (a caller in a loop executes the
                actions in between; :meth:`reset` forgets it). ``False``: start cold. A
                tensor (B, T, D): this guess of the clean normalized trajectory. Either
                guess is rebuilt with this call's noise (:func:`~para_policy.samplers.warm_start_init`);
                the converged result does not depend on it (at tolerance 0 it is the cold one).
            warm_rows: ``(B,)`` bool, the rows of a ``warm_start`` tensor that hold a guess;
                the others start cold (default: all rows).
            deadline: a ``time.perf_counter()`` instant after which Picard samplers stop
                and return their current iterate (``stats.converged`` False).
            sampler: this call's sampler instead of the policy's: a preset name (with
                ``options``, :func:`sampler_spec`) or a :class:`SamplerConfig`; options
                alone change the policy's sampler for this call.
            prefix_actions: ``(B, d, Da)`` raw (unnormalized) actions, ``0 <= d < n_action_steps``,
                that will run before this chunk is ready (real-time chunking): normalized and
                imposed as known entries of the action dims at positions ``action_start ..
                action_start + d`` at every step (merged with the observation entries of an
                inpainting policy), so the rest of the chunk is sampled to continue them. They
                also overwrite those entries of a warm-start guess. At tolerance 0 a Picard
                sampler gives :func:`~para_policy.samplers.sequential_sample` with the same
                inpainting.
            guide_actions: ``(B, m, Da)`` raw actions that continue ``prefix_actions`` (the previous
                chunk's plan after them): real-time chunking's soft masking, the entries at the
                next positions pulled toward them before each step with weights decaying from
                about 1 to about 0 (:meth:`prefix_inpaint`), so the new chunk bends away from the
                old plan gradually instead of at once. Needs ``prefix_actions``.
            prefix_mode: how the frozen actions are imposed before each step: ``'clean'``
                (default; the clean values at every step, as DiffusionPolicy imposes observations)
                or ``'noised'`` (RePaint's imposition, :func:`~para_policy.samplers.diffuse_known`:
                at the step's noise level, with ``x_T``'s entries as the noise, what a model
                trained without inpainting sees of its own trajectories; it helps hard masking,
                not soft, on the shipped PushT policy: docs/benchmarks.md). The result holds them clean either
                way; an inpainting policy's observation entries are imposed clean as DiffusionPolicy does.
                ``guide_actions`` pull toward the clean plan in both modes (a partial pull toward a
                noised value would shrink the entry's noise below its step's level).
        Returns:
            :class:`PolicyOutput`: ``{'action': (B, n_action_steps, Da), 'action_pred': (B, T, Da)}``
            with ``.stats``, ``.trajectory``, ``.spec``, ``.warm``.
        """
        obs = self.observation(obs_dict)
        spec = self.sampler if sampler is None else sampler_spec(sampler)
        if options:
            spec = sampler_spec(spec, **options)
        schedule = self.schedule_for(spec)
        spec = self.resolve(spec, obs)
        global_cond, inpaint = self.conditioning(obs)
        shape = self.trajectory_shape(self.batch_size(obs))
        if prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")
        if guide_actions is not None and prefix_actions is None:
            raise ValueError("guide_actions continue frozen prefix_actions: pass both")
        prefix = None if prefix_actions is None else self.prefix_inpaint(prefix_actions, shape, guide_actions)
        x_T, noise = self._initial_noise(schedule, shape, generator, x_T, noise)
        if prefix is not None:
            inpaint = _with_prefix(inpaint, prefix, prefix_mode, schedule, x_T)
        call_key = (shape, schedule.kind, schedule.num_steps, str(self.device))
        kwargs, warm = self._iterate_options(spec, schedule, x_T, noise, prefix, call_key, init=init,
                                             warm_start=warm_start, warm_rows=warm_rows, deadline=deadline)
        captured = self.captured_sampler(spec, schedule)
        if captured is not None:
            sample, stats = run_captured(captured, x_T, noise, global_cond, inpaint, kwargs)
        else:
            sample, stats = spec.family.sample(self.denoise, schedule, x_T, noise, condition=global_cond,
                                               inpaint=inpaint, **kwargs)
        if not bool(torch.isfinite(sample).all()):
            ranges = ", ".join(f"{k} {v.min().item():.3g} to {v.max().item():.3g}" for k, v in
                               (obs.items() if isinstance(obs, Mapping) else [("obs", obs)]))
            raise ValueError("sampling produced non-finite actions (NaN or inf); check the observations' scale "
                             f"against the normalizer (range: {ranges})")
        if spec.warm_start:
            self._warm = (call_key, shift_trajectory(sample, self.n_action_steps))
        self.last_stats = stats
        self.last_trajectory = sample
        action_pred = self.normalizer.unnormalize("action", sample[..., : self.action_dim])
        start = self.action_start
        out = PolicyOutput(action=action_pred[:, start: start + self.n_action_steps], action_pred=action_pred)
        out.stats, out.trajectory, out.spec, out.warm = stats, sample, spec, warm
        return out

    def _iterate_options(self, spec: SamplerConfig, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
                         prefix: tuple | None, call_key: tuple, *, init: torch.Tensor | None, warm_start: Any,
                         warm_rows: torch.Tensor | None, deadline: float | None) -> tuple[dict[str, Any], bool]:
        """The sampler's keyword arguments and whether it starts warm (:meth:`predict_action`'s arguments).

        A Picard spec gets ``init`` (from a ``warm_start`` tensor, or the previous call's trajectory
        when the spec warm-starts and the call matches ``call_key``), ``init_rows`` and ``deadline``;
        the sequential loop refuses them.
        """
        kwargs = dict(spec.options)
        if not spec.iterative:
            if init is not None or isinstance(warm_start, torch.Tensor) or deadline is not None \
                    or warm_rows is not None:
                raise ValueError(f"init, warm_start and deadline need a Picard sampler, not {spec.name!r}")
            return kwargs, False
        guess = None
        if isinstance(warm_start, torch.Tensor):
            if init is not None:
                raise ValueError("pass init or warm_start, not both")
            guess = warm_start.to(x_T)
        elif warm_rows is not None:
            raise ValueError("warm_rows needs a warm_start tensor")
        elif (warm_start is None and init is None and spec.warm_start and self._warm is not None
              and self._warm[0] == call_key):
            guess = self._warm[1]
        if guess is not None and _runs_sequentially(spec, schedule, deadline):
            guess = None  # window 1 is the sequential loop, which never reads an initial iterate
        if guess is not None:
            if prefix is not None:  # the frozen actions are known: the guess holds them exactly
                guess = torch.where(known_mask(prefix[1]), prefix[0], guess)
            init = warm_start_init(schedule, guess, x_T, noise)
        kwargs.update(init=init, deadline=deadline)
        if warm_rows is not None:
            kwargs.update(init_rows=warm_rows.to(device=x_T.device, dtype=torch.bool))
        return kwargs, guess is not None

    # ---- training -----------------------------------------------------------------
    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """DiffusionPolicy's low-dim training loss.

        ``batch = {'obs': (B, horizon, Do), 'action': (B, horizon, Da)}``: noise the
        normalized trajectory at a random train timestep and regress the scheduler's
        target (epsilon, sample or v) with MSE over the entries not imposed as known.
        """
        nobs = self.normalizer.normalize("obs", batch["obs"])
        nact = self.normalizer.normalize("action", batch["action"])
        B = nact.shape[0]
        global_cond = None
        if self.obs_as_global_cond:
            global_cond = nobs[:, : self.n_obs_steps]
            global_cond = global_cond.reshape(B, -1) if self.model_type == "unet" else global_cond
            trajectory = nact
            if self.pred_action_steps_only:
                start = self.n_obs_steps - 1 if self.oa_step_convention else self.n_obs_steps
                trajectory = nact[:, start: start + self.n_action_steps]
            known = torch.zeros_like(trajectory, dtype=torch.bool)
        else:
            trajectory = torch.cat([nact, nobs], dim=-1)
            known = torch.zeros_like(trajectory, dtype=torch.bool)
            known[:, : self.n_obs_steps, self.action_dim:] = True
        return self.denoising_loss(trajectory, known, global_cond, generator)

    def denoising_loss(self, trajectory: torch.Tensor, known: torch.Tensor, condition: torch.Tensor | None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE of the denoiser's prediction at a random train timestep (DiffusionPolicy's loss).

        ``trajectory`` (B, T, D) normalized clean sample; ``known`` (B, T, D) bool entries
        imposed as known (kept clean, not in the loss); ``condition`` the denoiser's conditioning.
        """
        B = trajectory.shape[0]
        eps = torch.randn(trajectory.shape, generator=generator, device=trajectory.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (B,), generator=generator,
                          device=trajectory.device).long()
        noisy = self.noise_scheduler.add_noise(trajectory, eps, t)
        noisy = torch.where(known, trajectory, noisy)
        pred = self.model(noisy, t, **{self.condition_kw: condition})
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = eps
        elif kind == "sample":
            target = trajectory
        else:
            target = self.noise_scheduler.get_velocity(trajectory, eps, t)
        loss = F.mse_loss(pred, target, reduction="none") * (~known)
        return loss.mean()


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
    ``paradigms`` preset, the fastest measured setting). ``backend`` goes to
    :meth:`LowdimPolicy.set_inference`: ``'default'`` is the fastest runtime installed for the
    device (:func:`~para_policy.inference.default_backend`: ONNX Runtime per row count on a CPU
    with the ``[onnx]`` extra, eager PyTorch otherwise or with ``PARA_POLICY_BACKEND=eager``).
    """
    from para_policy.checkpoints import load_checkpoint
    from para_policy.inference import check_inference_options

    check_inference_options(backend=backend)

    if os.path.isdir(path):
        from para_policy.integrations.lerobot_checkpoint import read_lerobot_directory

        state_dict, config = read_lerobot_directory(path)
    elif str(path).endswith(".ckpt"):
        from para_policy.integrations.diffusion_policy import read_diffusion_policy_checkpoint

        state_dict, config = read_diffusion_policy_checkpoint(path, trust_pickle=trust_pickle)
    else:
        state_dict, config = load_checkpoint(path)
    if not isinstance(config, Mapping):
        raise ValueError(f"{path}: the checkpoint's config must be a mapping, got {type(config).__name__}")
    policy_class = LowdimPolicy
    if "obs_encoder" in config:
        from para_policy.image_policy import ImagePolicy

        policy_class = ImagePolicy
    # the config's shapes are checked against the file's weights on the meta device first, so a config
    # that asks for a huge network is refused without allocating it
    with torch.device("meta"):
        skeleton = policy_class(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    wrong = [(k, shape, tuple(state_dict[k].shape)) for k, shape in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != shape]
    if wrong:
        k, want, have = wrong[0]
        raise ValueError(f"{path}: checkpoint weights do not fit its config: the config makes {k} of shape {want}, "
                         f"the file holds {have} ({len(wrong)} tensors differ)")
    policy = policy_class(config)
    try:
        result = policy.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: checkpoint weights do not fit its config: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint does not match its config: missing keys {result.missing_keys[:10]}, "
            f"unexpected keys {result.unexpected_keys[:10]}"
        )
    policy.to(device).eval()
    policy.set_sampler(sampler, **options)
    return policy.set_inference(backend=backend) if backend != "eager" else policy
