"""A low-dimensional diffusion policy with DiffusionPolicy's interface and a choice of sampler.

The only place where observations become conditioning and sampled trajectories become
actions. Data flow: obs (B, To, Do) → normalize → conditioning → sampler → trajectory
(B, horizon, Da) → unnormalize → actions (B, n_action_steps, Da).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from para_policy.inference import InferenceRuntime, StagedNetwork
from para_policy.models import ConditionalUnet1D, TransformerForDiffusion
from para_policy.normalizer import LinearNormalizer
from para_policy.policy_config import PolicyConfig
from para_policy.samplers import SampleStats, draw_noise
from para_policy.samplers.common import Inpaint, refuse_renamed
from para_policy.samplers.registry import SamplerConfig, sampler_spec
from para_policy.schedule import Schedule, build_scheduler
from para_policy.session import PREFIX_MODES as PREFIX_MODES  # how prefix_actions are imposed (re-exported)
from para_policy.session import SamplingSession, WindowIdentity, check_actions, check_prefix_mode, frozen_actions
from para_policy.window import model_fingerprint, tune_window

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


def check_obs_tensor(obs: Any, n_obs_steps: int, obs_dim: int) -> torch.Tensor:
    """``obs`` as a (B, To, Do) tensor (an array converted), or a ``ValueError`` saying what is wrong with it.

    Real numbers (a float or integer dtype), ``B >= 1``, ``To >= n_obs_steps``, ``Do == obs_dim``, all finite.
    """
    if not isinstance(obs, torch.Tensor):
        obs = torch.as_tensor(np.asarray(obs))
    if obs.dtype == torch.bool or obs.is_complex() or not (obs.is_floating_point() or obs.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"obs must hold real numbers (a float or integer dtype), got {obs.dtype}")
    if obs.dim() != 3 or obs.shape[0] < 1 or obs.shape[1] < n_obs_steps or obs.shape[2] != obs_dim:
        raise ValueError(f"obs must have shape (B >= 1, n_obs_steps={n_obs_steps}, obs_dim={obs_dim}), "
                         f"got {tuple(obs.shape)}")
    if not bool(torch.isfinite(obs).all()):
        raise ValueError("obs contains NaN or inf")
    return obs


def initial_noise(schedule: Schedule, shape: tuple[int, int, int], generator: torch.Generator | None,
                  x_T: torch.Tensor | None, noise: torch.Tensor | None, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x_T (B, T, D), noise (B, S, T, D) | None)`` on ``device`` in the sampler's ``dtype``: drawn, or the caller's.

    Drawn from ``generator`` in DiffusionPolicy's order when ``x_T`` is None; a caller's tensors
    (e.g. drawn in the network's dtype) join the sampler's dtype, so a warm-start guess built on
    them is not rounded to it.
    """
    if x_T is None:
        if noise is not None:
            raise ValueError("pass x_T together with noise")
        return draw_noise(schedule, shape, generator, device=device, dtype=dtype)
    return x_T.to(device=device, dtype=dtype), None if noise is None else noise.to(device=device, dtype=dtype)


def scale_hint(obs: torch.Tensor | Mapping[str, torch.Tensor]) -> str:
    """What to check when actions come out non-finite: the observations' range against the normalizer's."""
    ranges = ", ".join(f"{k} {v.min().item():.3g} to {v.max().item():.3g}" for k, v in
                       (obs.items() if isinstance(obs, Mapping) else [("obs", obs)]))
    return (f"check the observations' scale against the normalizer (range: {ranges}) and the action "
            "normalizer's statistics")


def denoising_mse(model: nn.Module, noise_scheduler: Any, condition_kw: str, trajectory: torch.Tensor,
                  known: torch.Tensor, condition: torch.Tensor | None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE of the denoiser's prediction at a random train timestep (DiffusionPolicy's loss).

    ``trajectory`` (B, T, D) normalized clean sample; ``known`` (B, T, D) bool entries
    imposed as known (kept clean, not in the loss); ``condition`` the network's conditioning,
    passed as ``condition_kw``. The target is the scheduler's ``prediction_type``: epsilon, sample or v.
    """
    B = trajectory.shape[0]
    eps = torch.randn(trajectory.shape, generator=generator, device=trajectory.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (B,), generator=generator,
                      device=trajectory.device).long()
    noisy = noise_scheduler.add_noise(trajectory, eps, t)
    noisy = torch.where(known, trajectory, noisy)
    pred = model(noisy, t, **{condition_kw: condition})
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = eps
    elif kind == "sample":
        target = trajectory
    else:
        target = noise_scheduler.get_velocity(trajectory, eps, t)
    loss = F.mse_loss(pred, target, reduction="none") * (~known)
    return loss.mean()

class LowdimPolicy(StagedNetwork, nn.Module):
    """DiffusionPolicy's low-dim policies with pluggable sampling.

    ``model_type='unet'``: ``DiffusionUnetLowdimPolicy`` (``ConditionalUnet1D``);
    ``model_type='transformer'``: ``DiffusionTransformerLowdimPolicy`` (``TransformerForDiffusion``).
    Modes, as DiffusionPolicy has them: observations as conditioning (``obs_as_global_cond``:
    the UNet's flat ``global_cond``, the transformer's ``cond`` tokens; optionally
    ``pred_action_steps_only``), or inpainting (the trajectory holds action and observation, the
    first ``n_obs_steps`` observations imposed as known entries).
    Built directly it samples with ``sequential`` (the policy as trained); ``load_policy`` picks ``paradigms``.
    """

    def __init__(self, config: PolicyConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = PolicyConfig.coerce(config)  # every check of the config is there (para_policy/policy_config.py)
        self.policy_config = cfg  # the typed config: shapes derived from it (action_start, trajectory_shape)
        self.config = cfg.to_dict()  # the plain mapping checkpoints store, which callers index
        c = self.config
        self.horizon, self.n_obs_steps, self.n_action_steps = cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps
        self.obs_dim, self.action_dim = cfg.obs_dim, cfg.action_dim
        self.obs_as_global_cond = cfg.obs_as_global_cond
        self.pred_action_steps_only = cfg.pred_action_steps_only
        self.oa_step_convention = cfg.oa_step_convention
        self.num_inference_steps = cfg.num_inference_steps
        self.model_type = cfg.model_type
        if self.model_type == "unet":
            self.condition_kw = "global_cond"
            self.model = ConditionalUnet1D(**cfg.model)
        else:
            self.condition_kw = "cond"
            self.model = TransformerForDiffusion(**cfg.model)
        self.normalizer = LinearNormalizer(self._normalizer_fields())
        self.noise_scheduler = build_scheduler(c["noise_scheduler"])
        # the sampler, its schedules, window='auto' and the warm-start memory (set_sampler chooses)
        self.session = SamplingSession("sequential", self.n_action_steps)
        self.runtime = InferenceRuntime()  # how the denoiser runs (set_inference), kept right across moves
        self._fingerprint: str | None = None

    def _normalizer_fields(self) -> dict[str, Any]:
        """The normalizer's fields and their shapes (:class:`~para_policy.normalizer.LinearNormalizer`)."""
        return {"obs": self.obs_dim, "action": self.action_dim}

    # ---- sampler choice (the session holds it) ----------------------------------------
    @property
    def sampler(self) -> SamplerConfig:
        """The sampler :meth:`predict_action` uses (:meth:`set_sampler` chooses it)."""
        return self.session.spec

    @property
    def last_stats(self) -> SampleStats | None:
        """The :class:`~para_policy.samplers.SampleStats` of the last call (also on its :class:`PolicyOutput`)."""
        return self.session.last_stats

    @property
    def last_trajectory(self) -> torch.Tensor | None:
        """The normalized clean trajectory (B, T, D) of the last call."""
        return self.session.last_trajectory

    def set_sampler(self, sampler: str | SamplerConfig = "paradigms", **options: Any) -> LowdimPolicy:
        """Choose the sampler :meth:`predict_action` uses: a preset name plus options (:func:`sampler_spec`).

        Everything is validated now, the schedule included; the warm-start memory is cleared.
        """
        spec = sampler_spec(sampler, **options)
        self.schedule_for(spec)
        self.session.set_spec(spec)
        return self

    def schedule_for(self, spec: SamplerConfig) -> Schedule:
        """The (cached) schedule a sampler spec runs on."""
        return self.session.schedule_for(spec, self.noise_scheduler, self.num_inference_steps,
                                         own=lambda: build_scheduler(self.config["noise_scheduler"]))

    def reset(self) -> None:
        """Forget the previous call's trajectory (DiffusionPolicy's ``reset()``): the next call starts cold."""
        self.session.reset()

    # ---- window='auto' ------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Digest of the denoiser's weights (the key the window cache uses); recomputed after ``load_state_dict``.

        The UNet alone, so a patched DiffusionPolicy object with the same network shares its window.
        """
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._fingerprint = None
        super()._load_from_state_dict(*args, **kwargs)

    def window_identity(self) -> WindowIdentity:
        """What a window measured for this policy is specific to: its weights, device and inference settings."""
        return WindowIdentity(self.fingerprint(), self.device, self.runtime.identity())

    def resolve(self, spec: SamplerConfig | None = None, obs: Any = None, batch_size: int = 1) -> SamplerConfig:
        """``spec`` (default: the policy's) with ``window='auto'`` replaced by this machine's window.

        Resolved once per (policy, sampler options, schedule, batch size, device) and cached
        (:meth:`SamplingSession.resolve <para_policy.session.SamplingSession.resolve>`); the first
        time it is measured on ``obs``: a batch or a list of observations (each as
        :meth:`observation_batch` takes it), or zero observations when None. Specs with an
        integer window come back unchanged.
        """
        spec = self.sampler if spec is None else spec
        if not spec.window_is_auto:
            return spec
        single = obs is not None and (torch.is_tensor(obs) or isinstance(obs, Mapping))
        observations = None if obs is None else [self.observation_batch(o) for o in ([obs] if single else obs)]
        if observations:
            batch_size = self.batch_size(observations[0])
        return self.session.resolve(spec, self.schedule_for(spec), batch_size, self.window_identity,
                                    lambda auto: self._tune(auto, observations, batch_size),
                                    remember=obs is None or single)

    def window_tuning(self, spec: SamplerConfig | None = None, batch_size: int = 1) -> dict[str, Any] | None:
        """What resolving ``spec``'s ``window='auto'`` measured (window, cost curve, rounds), or None if not yet."""
        spec = self.sampler if spec is None else spec
        return self.session.window_tuning(spec, self.schedule_for(spec), batch_size, self.window_identity())

    def calibrate(self, observations: Sequence[Any], spec: SamplerConfig | None = None, reps: int = 10
                  ) -> tuple[int, dict[str, Any]]:
        """Measure the window for ``spec`` (default: the policy's) now, on ``observations``, and cache it.

        ``observations``: a few observations as :meth:`observation_batch` takes them, e.g.
        arrays of ``(n_obs_steps, obs_dim)`` (batch 1) or ``(B, n_obs_steps, obs_dim)``.
        Replaces any cached window for the same key.
        Returns ``(window, info)`` (cost curve, predicted ms and rounds per window).
        """
        spec = self.sampler if spec is None else spec
        if len(observations) == 0:
            raise ValueError("calibrate needs at least one (n_obs_steps, obs_dim) observation")
        obs = [self.observation_batch(o) for o in observations]
        return self.session.calibrate(spec, self.schedule_for(spec), self.batch_size(obs[0]), self.window_identity(),
                                      lambda auto: self._tune(auto, obs, None, reps))

    def _tune(self, spec: SamplerConfig, obs: list[Any] | None, batch_size: int | None,
              reps: int = 10) -> tuple[int, dict[str, Any]]:
        """The session's ``tune``: :func:`~para_policy.window.tune_window` on ``obs`` (None: zero observations)."""
        if obs is None:
            obs = [self.zero_observation(batch_size or 1)]
        log.info("window='auto': measuring this machine's cost curve and each window's rounds "
                 "(once per policy, sampler options, batch size and device; cached)")
        return tune_window(self, spec, obs, reps=reps)

    # ---- how the denoiser runs (para_policy.inference.InferenceRuntime) ------------------
    @property
    def inference(self) -> dict[str, Any]:
        """The inference settings that differ from the defaults (:meth:`set_inference`); ``{}``: the plain network."""
        return self.runtime.settings

    @property
    def backend_choice(self) -> tuple[str, str] | None:
        """``(backend, why)`` while ``backend='default'`` is the request (:func:`~.inference.default_backend`)."""
        return self.runtime.backend_choice

    def set_inference(self, **settings: Any) -> LowdimPolicy:
        """Change how the UNet runs: ``precision``, ``compile``, ``cuda_graphs``, ``devices``, ``backend``.

        Settings not given keep their value; all defaults (fp32, eager, one device) restore
        the plain model. The wrappers are composed in one place,
        :func:`para_policy.inference.make_denoiser`. ``backend='onnxruntime'`` / ``'auto'``
        export (and ``'auto'`` times) the network now, on this policy's call shapes.
        ``backend='default'`` (:func:`~para_policy.inference.default_backend`) stays the request:
        later settings and moves (``.to(device)``) pick again; :attr:`backend_choice` says what it picked.
        """
        self.runtime.configure(self, **settings)
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> LowdimPolicy:
        """``.to()``, ``.cuda()``, ``.half()`` and the like, then the denoiser made right for where the network
        is now (:meth:`InferenceRuntime.moved <para_policy.inference.InferenceRuntime.moved>`)."""
        runtime = self.__dict__.get("runtime")
        before = None if runtime is None else runtime.placement(self)
        super()._apply(fn, *args, **kwargs)
        if runtime is not None:
            runtime.moved(self, before)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Copies and pickles hold no denoiser (:class:`~para_policy.inference.InferenceRuntime`): built again here."""
        super().__setstate__(state)
        self.runtime.restore(self)

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
        return check_obs_tensor(obs, self.n_obs_steps, self.obs_dim).to(device=self.device, dtype=self.sample_dtype)

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
        """Index of the first executed action in the predicted trajectory (:attr:`PolicyConfig.action_start`)."""
        return self.policy_config.action_start

    def trajectory_shape(self, batch_size: int) -> tuple[int, int, int]:
        """Shape of the denoised trajectory: (B, T, D) (``trajectory_length``, ``trajectory_dim`` of the config)."""
        return (batch_size, self.policy_config.trajectory_length, self.policy_config.trajectory_dim)

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
                       ) -> Inpaint | None:
        """Known entries ``(data, mask)``, both ``shape`` (B, T, D), for raw frozen actions (B, d, Da); None if d = 0.

        The actions go to the action dims at positions ``action_start .. action_start + d``,
        normalized; ``d < n_action_steps`` so the chunk still has actions of its own to sample.
        ``guide_actions`` (B, m, Da), raw, continue them at the next positions with real-time
        chunking's soft mask (float weights; :func:`~para_policy.session.frozen_actions`).
        """
        check = functools.partial(check_actions, batch_size=shape[0], action_dim=self.action_dim,
                                  device=self.device, dtype=self.sample_dtype)
        p = check(prefix_actions, "prefix_actions", length="d", below=self.n_action_steps)
        if p.shape[1] == 0:
            if guide_actions is not None:
                raise ValueError("guide_actions continue frozen prefix_actions: pass d >= 1 prefix actions")
            return None
        guide = None if guide_actions is None else check(guide_actions, "guide_actions", length="m")
        normalize = functools.partial(self.normalizer.normalize, "action")
        return frozen_actions(shape, self.action_start, normalize(p).to(self.sample_dtype),
                              None if guide is None else normalize(guide))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, global_cond: torch.Tensor | None) -> torch.Tensor:
        """The denoiser handed to samplers: ``x`` (N, T, D), ``t`` (N,) → prediction (N, T, D) in ``x``'s dtype.

        The plain network or the wrappers of :meth:`set_inference`, each with the network's own
        dtype inside (:meth:`InferenceRuntime.denoise <para_policy.inference.InferenceRuntime.denoise>`).
        """
        return self.runtime.denoise(self, x, t, global_cond)

    # ---- observations → conditioning → session → actions --------------------------
    @refuse_renamed("deadline", "warm_rows", "warm_start")
    @torch.inference_mode()
    def predict_action(self, obs_dict: Mapping[str, torch.Tensor], *, generator: torch.Generator | None = None,
                       x_T: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       init: torch.Tensor | None = None, warm_start: bool | None = None,
                       guess: torch.Tensor | None = None, guess_rows: torch.Tensor | None = None,
                       deadline_at: float | None = None, sampler: str | SamplerConfig | None = None,
                       prefix_actions: torch.Tensor | None = None, guide_actions: torch.Tensor | None = None,
                       prefix_mode: str = "clean", **options: Any) -> PolicyOutput:
        """DiffusionPolicy's ``predict_action``: ``{'obs': (B, To, Do)}`` → actions.

        Args:
            generator: draws ``x_T`` and the step noise in DiffusionPolicy's order.
            x_T, noise: explicit initial and per-step noise instead (both or neither).
            init: initial Picard iterate of the whole trajectory, (B, S, T, D).
            warm_start: a flag. ``None`` (default): the previous call's clean trajectory shifted by
                ``n_action_steps`` when the spec warm-starts and the call shape matches (:meth:`reset`
                forgets it); ``True``: the same, the spec must warm-start; ``False``: cold.
            guess, guess_rows: ``(B, T, D)``, a guess of the clean normalized trajectory to start from,
                and ``(B,)`` bool, the rows holding one (default all; :meth:`SamplingSession.run
                <para_policy.session.SamplingSession.run>`). The converged result does not depend on it.
            deadline_at: a ``time.perf_counter()`` instant after which Picard samplers start no new round
                and return a clean estimate (``stats.deadline_hit``); the Controller's ``deadline_ms`` sets it.
            sampler: this call's sampler instead of the policy's: a preset name (with
                ``options``, :func:`sampler_spec`) or a :class:`SamplerConfig`; options
                alone change the policy's sampler for this call.
            prefix_actions: ``(B, d, Da)`` raw actions, ``0 <= d < n_action_steps``, that will run
                before this chunk is ready (real-time chunking): imposed as known entries from
                ``action_start`` on at every step (:meth:`prefix_inpaint`; merged with an inpainting
                policy's observations, and over a warm-start guess), so the chunk continues them.
            guide_actions: ``(B, m, Da)`` raw actions that continue ``prefix_actions`` (the previous
                chunk's plan after them): soft masking, the next positions pulled toward them with
                weights decaying from about 1 to about 0, so the new chunk bends away from the old
                plan gradually instead of at once. Needs ``prefix_actions``.
            prefix_mode: how the frozen actions are imposed before each step: ``'clean'``
                (default, as DiffusionPolicy imposes observations) or ``'noised'`` (RePaint's, at
                the step's noise level, :func:`~para_policy.samplers.diffuse_known`; it helps hard
                masking, not soft, on the shipped PushT policy: docs/benchmarks.md). The result
                holds them clean either way; ``guide_actions`` pull toward the clean plan in both
                (a partial pull toward a noised value would shrink the entry's noise below its level).
        Returns:
            :class:`PolicyOutput`: ``{'action': (B, n_action_steps, Da), 'action_pred': (B, T, Da)}``
            with ``.stats``, ``.trajectory``, ``.spec``, ``.warm``; ``ValueError`` if the actions are
            not finite.
        """
        obs = self.observation(obs_dict)
        spec = self.sampler if sampler is None else sampler_spec(sampler)
        if options:
            spec = sampler_spec(spec, **options)
        schedule, batch_size = self.schedule_for(spec), self.batch_size(obs)
        spec = self.session.resolve(spec, schedule, batch_size, self.window_identity,
                                    lambda auto: self._tune(auto, [obs], batch_size))
        condition, inpaint = self.conditioning(obs)
        shape = self.trajectory_shape(batch_size)
        check_prefix_mode(prefix_mode)
        if guide_actions is not None and prefix_actions is None:
            raise ValueError("guide_actions continue frozen prefix_actions: pass both")
        prefix = None if prefix_actions is None else self.prefix_inpaint(prefix_actions, shape, guide_actions)
        x_T, noise = initial_noise(schedule, shape, generator, x_T, noise, self.device, self.sample_dtype)
        sample, action_pred, stats, warm = self.session.run(
            self.denoise, spec, schedule, x_T, noise, condition=condition, inpaint=inpaint, prefix=prefix,
            prefix_mode=prefix_mode, init=init, warm_start=warm_start, guess=guess, guess_rows=guess_rows,
            deadline_at=deadline_at, captured=self.runtime.captured(self, spec, schedule), hint=lambda: scale_hint(obs),
            to_actions=lambda trajectory: self.normalizer.unnormalize("action", trajectory[..., : self.action_dim]))
        start = self.action_start
        out = PolicyOutput(action=action_pred[:, start: start + self.n_action_steps], action_pred=action_pred)
        out.stats, out.trajectory, out.spec, out.warm = stats, sample, spec, warm
        return out

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
        """DiffusionPolicy's loss on this policy's network and noise scheduler (:func:`denoising_mse`, shapes there)."""
        return denoising_mse(self.model, self.noise_scheduler, self.condition_kw, trajectory, known, condition,
                             generator)
