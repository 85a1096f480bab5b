"""The one place where scheduler arithmetic lives.

A :class:`Schedule` is built from a diffusers ``DDPMScheduler`` or ``DDIMScheduler`` (as
configured in a checkpoint) for a number of inference steps. It turns the scheduler's
``step`` into tensors indexed by *step index* ``k = 0 … S-1`` (``k = 0`` is the noisiest
step, timestep ``timesteps[0]``), so that a sampler can apply any set of steps at once:

    x_{k+1} = step_mean(x_k, k, model_output) + noise_std[k] * z_k

``step_mean`` is the scheduler's ``step`` without its noise term, for a batch of rows that
may each sit at a different step. The coefficients are computed in the scheduler's own
dtype and operation order, and the tests check ``step_mean + noise_std * z`` against the
scheduler's ``step`` at every timestep.

We do not use diffusers' ``batch_step_no_noise`` of the parallel schedulers: the DDIM one
uses ``alpha_prev = 1`` at the final step instead of ``final_alpha_cumprod``, and spacing
other than ``leading`` is mishandled there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
SUPPORTED_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class Schedule:
    """Per-step coefficients of one scheduler at one number of inference steps.

    All tensors have shape ``(S,)``, indexed by step index ``k``.

    Attributes:
        kind: ``"ddpm"`` or ``"ddim"``.
        timesteps: the model's timestep at step ``k`` (long).
        alpha_t, alpha_prev: cumulative alphas of the current and the previous timestep.
        noise_std: standard deviation of the noise step ``k`` adds (0 where it adds none).
        draws_noise: whether the scheduler's ``step`` draws a noise tensor at step ``k``
            (it may draw one and scale it by 0): keeps a generator's stream in the same
            order as the sequential loop.
        variance: the DDPM posterior variance of step ``k`` (``t_k → t_{k+1}``), the scale
            the convergence test measures errors in; 0 at a final step into ``alpha = 1``.
    """

    kind: str
    timesteps: torch.Tensor
    alpha_t: torch.Tensor
    alpha_prev: torch.Tensor
    noise_std: torch.Tensor
    draws_noise: torch.Tensor
    variance: torch.Tensor
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    eta: float = 0.0
    _copies: dict = field(default_factory=dict, compare=False, repr=False)  # device -> Schedule, by to()

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device | str) -> Schedule:
        """The same schedule with its tensors on ``device``; copied once per device, then cached.

        Samplers call this on every call: a copy per call would be several host-to-device
        transfers before every chunk.
        """
        device = torch.device(device)
        if device == self.timesteps.device:
            return self
        key = str(device)
        if key not in self._copies:
            moved = {
                name: getattr(self, name).to(device)
                for name in ("timesteps", "alpha_t", "alpha_prev", "noise_std", "draws_noise", "variance")
            }
            self._copies[key] = Schedule(**{**self.__dict__, **moved, "_copies": {}})
        return self._copies[key]

    def step_mean(self, x: torch.Tensor, k: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The scheduler's step without noise, for rows at any steps.

        Args:
            x: ``(N, T, D)`` current samples.
            k: ``(N,)`` step index of each row (long, on x's device).
            model_output: ``(N, T, D)`` the denoiser's prediction for each row.
        Returns:
            ``(N, T, D)`` the mean of ``x_{k+1}`` given ``x_k``.
        """
        a_t = self.alpha_t[k].view(-1, 1, 1)
        a_prev = self.alpha_prev[k].view(-1, 1, 1)
        beta_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (x - beta_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x - a_t**0.5 * x0) / beta_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * x - beta_t**0.5 * model_output
            eps = a_t**0.5 * model_output + beta_t**0.5 * x
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        if self.kind == "ddpm":
            current_alpha = a_t / a_prev
            current_beta = 1 - current_alpha
            x0_coeff = (a_prev**0.5 * current_beta) / beta_t
            x_coeff = current_alpha**0.5 * (1 - a_prev) / beta_t
            return x0_coeff * x0 + x_coeff * x
        std = self.noise_std[k].view(-1, 1, 1)
        return a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps

    def test_variance(self) -> torch.Tensor:
        """``(S,)`` the variance convergence tests measure a step's change in.

        The posterior variance, except that a final step into ``alpha = 1`` (variance 0)
        uses the smallest positive one: a test against 0 would demand a bit-exact repeat
        and cost one more round for nothing.
        """
        positive = self.variance[self.variance > 0]
        floor = positive.min() if positive.numel() else torch.ones((), dtype=self.variance.dtype)
        return self.variance.clamp(min=float(floor))

    def linear_coeff(self) -> torch.Tensor:
        """``(S,)`` the coefficient of ``x`` in :meth:`step_mean` when the predicted ``x0`` is held fixed.

        Every step is ``x_{k+1} = a_k · x_k + c_k · x0(x_k) + σ_k z_k`` with ``a_k`` this
        coefficient (DDPM: the posterior mean's ``x`` coefficient; DDIM: the direction
        term's, through ``eps = (x − √ᾱ_t x0) / √(1 − ᾱ_t)``). The samplers solve this
        linear part exactly and iterate only on ``x0(x)``, which varies slowly with ``x``.
        """
        a_t, a_prev = self.alpha_t.to(torch.float64), self.alpha_prev.to(torch.float64)
        if self.kind == "ddpm":
            coeff = (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)
        else:
            coeff = (1 - a_prev - self.noise_std.to(torch.float64) ** 2).clamp(min=0) ** 0.5 / (1 - a_t) ** 0.5
        return coeff.to(self.alpha_t.dtype)

    def predict_x0(self, x: torch.Tensor, k: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The clean sample the scheduler predicts from ``(x, k, model_output)``, clipped as it clips."""
        a_t = self.alpha_t[k].view(-1, 1, 1)
        if self.prediction_type == "epsilon":
            x0 = (x - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * model_output
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0


    def output_for_x0(self, x: torch.Tensor, k: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The model output that would make the scheduler predict ``x0`` from ``x`` at steps ``k``."""
        a_t = self.alpha_t[k].view(-1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        if self.prediction_type == "sample":
            return x0
        return (a_t**0.5 * x - x0) / (1 - a_t) ** 0.5  # v_prediction


def _check_common(config: dict, name: str) -> None:
    if config.get("thresholding", False):
        raise ValueError(f"{name} with thresholding=True is not supported; expected thresholding=False")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(f"{name}: prediction_type {prediction_type!r} not supported; expected one of "
                         f"{SUPPORTED_PREDICTION_TYPES}")


def make_schedule(scheduler, num_inference_steps: int | None = None, eta: float = 0.0) -> Schedule:
    """Build a :class:`Schedule` from a diffusers ``DDPMScheduler`` or ``DDIMScheduler``.

    ``scheduler.set_timesteps(num_inference_steps)`` is called on the scheduler (as the
    sequential loop would). ``eta`` is DDIM's noise level (ignored for DDPM).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if num_inference_steps is not None:
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        scheduler.set_timesteps(int(num_inference_steps))
    elif scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps set; pass num_inference_steps")
    cfg = scheduler.config
    timesteps = scheduler.timesteps.to(torch.long).cpu()
    ac = scheduler.alphas_cumprod.cpu()
    alpha_t = ac[timesteps]
    if isinstance(scheduler, DDPMScheduler):
        _check_common(cfg, "DDPMScheduler")
        if cfg.variance_type not in SUPPORTED_VARIANCE_TYPES:
            raise ValueError(f"DDPMScheduler variance_type {cfg.variance_type!r} not supported; expected one "
                             f"of {SUPPORTED_VARIANCE_TYPES}")
        prev = torch.cat([timesteps[1:], torch.tensor([-1])])  # DDPM's previous_timestep
        one = torch.ones((), dtype=ac.dtype)
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], one)
        current_beta = 1 - alpha_t / alpha_prev
        variance = (1 - alpha_prev) / (1 - alpha_t) * current_beta
        if cfg.variance_type == "fixed_large":
            noise_var = current_beta
        else:
            noise_var = variance.clamp(min=1e-20)
        draws_noise = timesteps > 0
        noise_std = torch.where(draws_noise, noise_var**0.5, torch.zeros_like(noise_var))
        kind = "ddpm"
    elif isinstance(scheduler, DDIMScheduler):
        _check_common(cfg, "DDIMScheduler")
        prev = timesteps - cfg.num_train_timesteps // scheduler.num_inference_steps  # DDIM's own rule
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], scheduler.final_alpha_cumprod.cpu())
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        noise_std = eta * variance**0.5
        draws_noise = torch.full_like(timesteps, eta > 0, dtype=torch.bool)
        kind = "ddim"
    else:
        raise ValueError(
            f"unsupported scheduler {type(scheduler).__name__}; expected diffusers DDPMScheduler or DDIMScheduler"
        )
    return Schedule(
        kind=kind,
        timesteps=timesteps,
        alpha_t=alpha_t,
        alpha_prev=alpha_prev,
        noise_std=noise_std,
        draws_noise=draws_noise,
        variance=variance,
        prediction_type=cfg.prediction_type,
        clip_sample=bool(cfg.clip_sample),
        clip_sample_range=float(getattr(cfg, "clip_sample_range", 1.0)),
        eta=float(eta),
    )


def build_scheduler(config: dict):
    """A diffusers scheduler from a DiffusionPolicy-style dict with a ``_target_``.

    Accepts ``diffusers.DDPMScheduler`` / ``diffusers.schedulers.scheduling_ddpm.DDPMScheduler``
    (and the DDIM equivalents). Anything else is refused with the names accepted.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(config)
    target = str(kwargs.pop("_target_", "diffusers.DDPMScheduler"))
    classes = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
    name = target.rsplit(".", 1)[-1]
    if not target.startswith("diffusers.") or name not in classes:
        raise ValueError(
            f"unknown noise scheduler _target_ {target!r}; expected diffusers.DDPMScheduler or "
            "diffusers.DDIMScheduler"
        )
    return classes[name](**kwargs)


def ddim_from(scheduler):
    """The DDIM scheduler a DiffusionPolicy user would pair with a DDPM-trained model.

    Same betas and prediction type; ``set_alpha_to_one=True, steps_offset=0`` as in
    DiffusionPolicy's DDIM configs.
    """
    from diffusers import DDIMScheduler

    cfg = scheduler.config
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        trained_betas=cfg.get("trained_betas"),
        clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.get("clip_sample_range", 1.0),
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type=cfg.prediction_type,
    )
