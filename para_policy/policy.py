"""A low-dimensional diffusion policy with DiffusionPolicy's interface and a choice of sampler.

The only place where observations become conditioning and sampled trajectories become
actions. Data flow: obs (B, To, Do) → normalize → conditioning → sampler → trajectory
(B, horizon, Da) → unnormalize → actions (B, n_action_steps, Da).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from para_policy.models import ConditionalUnet1D
from para_policy.normalizer import LinearNormalizer
from para_policy.samplers import SampleStats, draw_noise, picard_sample, sequential_sample, taa_sample, warm_start_init
from para_policy.schedule import Schedule, build_scheduler, ddim_from, make_schedule

# sampler name → (sampling function, scheduler kind; None = the checkpoint's own)
SAMPLERS: dict[str, tuple[Any, str | None]] = {
    "sequential": (sequential_sample, None),
    "paradigms": (picard_sample, None),
    "paraddpm": (picard_sample, "ddpm"),
    "paraddim": (picard_sample, "ddim"),
    "parataa": (taa_sample, None),
}
PICARD_OPTIONS = ("window", "tolerance", "max_iterations", "per_sample_windows", "linear_solve", "secant")
TAA_OPTIONS = PICARD_OPTIONS + ("memory", "ridge")
# the iterative samplers and their options; only these take init / warm_start / deadline
SAMPLER_OPTIONS: dict[Any, tuple[str, ...]] = {picard_sample: PICARD_OPTIONS, taa_sample: TAA_OPTIONS}
# The fastest setting measured for the shipped PushT policy on a 2-core CPU
# (eval/results/bench_latency/): what `sampler=paradigms` and `Controller(policy)` run.
# The window is this machine's choice from its cost curve; on a GPU use window=100.
RECOMMENDED_SAMPLER = {"name": "paradigms", "window": 100, "tolerance": 0.02, "linear_solve": True, "secant": True}
CONFIG_KEYS = ("horizon", "n_obs_steps", "n_action_steps", "obs_dim", "action_dim", "model", "noise_scheduler")


@dataclass
class SamplerConfig:
    """Which sampler a policy uses and with what options.

    name: one of ``SAMPLERS``; scheduler: ``'ddpm'`` / ``'ddim'`` or None for the name's
    default; num_inference_steps: None for the checkpoint's; options: Picard options
    (window, tolerance, max_iterations, per_sample_windows, linear_solve, secant; ParaTAA
    also memory, ridge);
    ``window='auto'`` is resolved by :func:`para_policy.window.tune_window` (the evaluator
    does it before its rollouts).
    warm_start: callers that run a control loop (the controller, the evaluator) start
    each chunk from the previous chunk's trajectory shifted by the executed actions
    (``predict_action(warm_start=...)``); Picard samplers only.
    """

    name: str = "sequential"
    scheduler: str | None = None
    num_inference_steps: int | None = None
    options: dict = field(default_factory=dict)
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; expected one of {sorted(SAMPLERS)}")
        if self.scheduler not in (None, "ddpm", "ddim"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected 'ddpm' or 'ddim'")
        fn = SAMPLERS[self.name][0]
        allowed = SAMPLER_OPTIONS.get(fn, ())
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"sampler {self.name!r} does not take options {unknown}; it takes {list(allowed)}")
        tolerance = self.options.get("tolerance")
        if tolerance is not None and not float(tolerance) >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        window = self.options.get("window")
        if window is not None and window != "auto" and (isinstance(window, bool) or not isinstance(window, int)
                                                        or window < 1):
            raise ValueError(f"window must be an integer >= 1 or 'auto', got {window!r}")
        if self.warm_start and fn not in SAMPLER_OPTIONS:
            iterative = sorted(n for n, (f, _) in SAMPLERS.items() if f in SAMPLER_OPTIONS)
            raise ValueError(f"warm_start needs a Picard sampler {iterative}, not {self.name!r}")


class LowdimPolicy(nn.Module):
    """DiffusionPolicy's low-dim UNet policy (``DiffusionUnetLowdimPolicy``) with pluggable sampling.

    Modes, as DiffusionPolicy has them: observations as global conditioning
    (``obs_as_global_cond``, optionally ``pred_action_steps_only``), or inpainting (the
    trajectory holds action and observation, the first ``n_obs_steps`` observations
    imposed as known entries).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"policy config is missing {missing}; expected keys {list(CONFIG_KEYS)}")
        self.config = dict(config)
        c = self.config
        self.horizon = int(c["horizon"])
        self.n_obs_steps = int(c["n_obs_steps"])
        self.n_action_steps = int(c["n_action_steps"])
        self.obs_dim = int(c["obs_dim"])
        self.action_dim = int(c["action_dim"])
        self.obs_as_global_cond = bool(c.get("obs_as_global_cond", True))
        self.pred_action_steps_only = bool(c.get("pred_action_steps_only", False))
        self.oa_step_convention = bool(c.get("oa_step_convention", True))
        self.num_inference_steps = int(c.get("num_inference_steps") or c["noise_scheduler"].get(
            "num_train_timesteps", 100))
        if c.get("obs_as_local_cond", False):
            raise ValueError("obs_as_local_cond=True policies are not supported; expected global "
                             "conditioning or inpainting")
        if self.pred_action_steps_only and not self.obs_as_global_cond:
            raise ValueError("pred_action_steps_only requires obs_as_global_cond (as in DiffusionPolicy)")
        expected_in = self.action_dim if self.obs_as_global_cond else self.action_dim + self.obs_dim
        expected_cond = self.obs_dim * self.n_obs_steps if self.obs_as_global_cond else None
        model_cfg = dict(c["model"])
        if int(model_cfg.get("input_dim", -1)) != expected_in:
            raise ValueError(f"model.input_dim is {model_cfg.get('input_dim')}, expected {expected_in} "
                             f"for this policy's mode and dims")
        if model_cfg.get("global_cond_dim") != expected_cond:
            raise ValueError(f"model.global_cond_dim is {model_cfg.get('global_cond_dim')}, expected "
                             f"{expected_cond} (obs_dim × n_obs_steps with global conditioning)")
        self.model = ConditionalUnet1D(**model_cfg)
        self.normalizer = LinearNormalizer({"obs": self.obs_dim, "action": self.action_dim})
        self.noise_scheduler = build_scheduler(c["noise_scheduler"])
        self.sampler = SamplerConfig()
        self.last_stats: SampleStats | None = None
        self.last_trajectory: torch.Tensor | None = None  # normalized (B, T, D) of the last call
        self._schedules: dict[tuple[str, int], Schedule] = {}

    # ---- sampler choice -------------------------------------------------------------
    def set_sampler(self, name: str = "sequential", scheduler: str | None = None,
                    num_inference_steps: int | None = None, **options: Any) -> LowdimPolicy:
        """Choose the sampler used by :meth:`predict_action` (validated now, not at call time)."""
        self.sampler = SamplerConfig(name, scheduler, num_inference_steps, dict(options))
        self.schedule_for(self.sampler)
        return self

    def schedule_for(self, sampler: SamplerConfig) -> Schedule:
        """The (cached) schedule a sampler configuration runs on."""
        own = "ddim" if type(self.noise_scheduler).__name__ == "DDIMScheduler" else "ddpm"
        kind = sampler.scheduler or SAMPLERS[sampler.name][1] or own
        steps = int(sampler.num_inference_steps or self.num_inference_steps)
        key = (kind, steps)
        if key not in self._schedules:
            if kind == own:
                scheduler = build_scheduler(self.config["noise_scheduler"])
            elif kind == "ddim":
                scheduler = ddim_from(self.noise_scheduler)
            else:
                raise ValueError("a DDPM schedule cannot be derived from a DDIM-trained checkpoint's scheduler")
            self._schedules[key] = make_schedule(scheduler, steps)
        return self._schedules[key]

    # ---- observations → conditioning ------------------------------------------------
    def _check_obs(self, obs: torch.Tensor) -> torch.Tensor:
        if not isinstance(obs, torch.Tensor):
            obs = torch.as_tensor(obs, dtype=torch.float32)
        if obs.dim() != 3 or obs.shape[1] < self.n_obs_steps or obs.shape[2] != self.obs_dim:
            raise ValueError(
                f"obs must have shape (B, n_obs_steps={self.n_obs_steps}, obs_dim={self.obs_dim}), "
                f"got {tuple(obs.shape)}"
            )
        if not bool(torch.isfinite(obs).all()):
            raise ValueError("obs contains NaN or inf")
        return obs.to(device=self.device, dtype=self.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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
        """``(global_cond (B, To·Do) | None, inpaint (data, mask) | None)`` for raw obs (B, To, Do)."""
        nobs = self.normalizer.normalize("obs", obs[:, : self.n_obs_steps])
        B = obs.shape[0]
        if self.obs_as_global_cond:
            return nobs.reshape(B, -1), None
        shape = self.trajectory_shape(B)
        data = torch.zeros(shape, device=obs.device, dtype=obs.dtype)
        mask = torch.zeros(shape, device=obs.device, dtype=torch.bool)
        data[:, : self.n_obs_steps, self.action_dim:] = nobs
        mask[:, : self.n_obs_steps, self.action_dim:] = True
        return None, (data, mask)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, global_cond: torch.Tensor | None) -> torch.Tensor:
        """The denoiser callable handed to samplers."""
        return self.model(x, t, global_cond=global_cond)

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
        warm_start: torch.Tensor | None = None,
        warm_rows: torch.Tensor | None = None,
        deadline: float | None = None,
        sampler: str | SamplerConfig | None = None,
        **options: Any,
    ) -> dict[str, torch.Tensor]:
        """DiffusionPolicy's ``predict_action``: ``{'obs': (B, To, Do)}`` → actions.

        Args:
            generator: draws ``x_T`` and the step noise in DiffusionPolicy's order.
            x_T, noise: explicit initial and per-step noise instead (both or neither).
            init: initial Picard iterate of the whole trajectory, (B, S, T, D).
            warm_start: a guess of the clean normalized trajectory (B, T, D), e.g. the
                previous chunk's ``last_trajectory`` shifted by the executed actions;
                Picard samplers start from it rebuilt with this call's noise
                (:func:`para_policy.samplers.warm_start_init`).
            warm_rows: ``(B,)`` bool, the rows of ``warm_start`` that hold a guess; the
                others start cold (default: all rows).
            deadline: a ``time.perf_counter()`` instant after which Picard samplers stop
                and return their current iterate (``last_stats.converged`` False).
            sampler: override the policy's sampler for this call (a name plus
                ``options``, or a :class:`SamplerConfig`).
        Returns:
            ``{'action': (B, n_action_steps, Da), 'action_pred': (B, T, Da)}``; the
            sampling stats of the call are in ``self.last_stats``.
        """
        if "obs" not in obs_dict:
            raise ValueError(f"obs_dict must contain 'obs', got keys {list(obs_dict)}")
        obs = self._check_obs(obs_dict["obs"])
        spec = self.sampler
        if isinstance(sampler, SamplerConfig):
            spec = sampler
        elif sampler is not None or options:
            name = sampler or self.sampler.name
            opts = {**(self.sampler.options if name == self.sampler.name else {}), **options}
            sched_kind = opts.pop("scheduler", None)
            steps = opts.pop("num_inference_steps", None)
            spec = SamplerConfig(name, sched_kind, steps, opts)
        schedule = self.schedule_for(spec)
        global_cond, inpaint = self.conditioning(obs)
        shape = self.trajectory_shape(obs.shape[0])
        if x_T is None:
            if noise is not None:
                raise ValueError("pass x_T together with noise")
            x_T, noise = draw_noise(schedule, shape, generator, device=self.device, dtype=self.dtype)
        fn = SAMPLERS[spec.name][0]
        kwargs = dict(spec.options)
        if fn in SAMPLER_OPTIONS:
            if warm_start is not None:
                if init is not None:
                    raise ValueError("pass init or warm_start, not both")
                init = warm_start_init(schedule, warm_start.to(x_T), x_T, noise)
            elif warm_rows is not None:
                raise ValueError("warm_rows needs warm_start")
            kwargs.update(init=init, deadline=deadline)
            if warm_rows is not None:
                kwargs.update(init_rows=warm_rows.to(torch.bool))
        elif init is not None or warm_start is not None or deadline is not None or warm_rows is not None:
            raise ValueError(f"init, warm_start and deadline need a Picard sampler, not {spec.name!r}")
        sample, stats = fn(self.denoise, schedule, x_T, noise, condition=global_cond, inpaint=inpaint, **kwargs)
        self.last_stats = stats
        self.last_trajectory = sample
        action_pred = self.normalizer.unnormalize("action", sample[..., : self.action_dim])
        start = self.action_start
        return {"action": action_pred[:, start: start + self.n_action_steps], "action_pred": action_pred}

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
            global_cond = nobs[:, : self.n_obs_steps].reshape(B, -1)
            trajectory = nact
            if self.pred_action_steps_only:
                start = self.n_obs_steps - 1 if self.oa_step_convention else self.n_obs_steps
                trajectory = nact[:, start: start + self.n_action_steps]
            known = torch.zeros_like(trajectory, dtype=torch.bool)
        else:
            trajectory = torch.cat([nact, nobs], dim=-1)
            known = torch.zeros_like(trajectory, dtype=torch.bool)
            known[:, : self.n_obs_steps, self.action_dim:] = True
        eps = torch.randn(trajectory.shape, generator=generator, device=trajectory.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (B,), generator=generator,
                          device=trajectory.device).long()
        noisy = self.noise_scheduler.add_noise(trajectory, eps, t)
        noisy = torch.where(known, trajectory, noisy)
        pred = self.model(noisy, t, global_cond=global_cond)
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = eps
        elif kind == "sample":
            target = trajectory
        else:
            target = self.noise_scheduler.get_velocity(trajectory, eps, t)
        loss = F.mse_loss(pred, target, reduction="none") * (~known)
        return loss.mean()


def load_policy(path: str | os.PathLike, sampler: str = "sequential", device: str | torch.device = "cpu",
                **options: Any) -> LowdimPolicy:
    """Load a policy checkpoint and choose its sampler.

    Reads para_policy's own ``.safetensors`` checkpoints (no pickled code) and
    DiffusionPolicy workspace ``.ckpt`` files (low-dim UNet policies; EMA weights when the
    run used EMA). A ``.ckpt`` is a pickle: loading one runs code chosen by whoever wrote
    it, so load only files you trust.
    ``options`` go to :meth:`LowdimPolicy.set_sampler` (``window``, ``tolerance``, …).
    """
    from para_policy.checkpoints import load_checkpoint

    if str(path).endswith(".ckpt"):
        from para_policy.integrations.diffusion_policy import read_diffusion_policy_checkpoint

        state_dict, config = read_diffusion_policy_checkpoint(path)
    else:
        state_dict, config = load_checkpoint(path)
    policy = LowdimPolicy(config)
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
    return policy.set_sampler(sampler, **options)
