"""The one place where scheduler arithmetic lives.

A :class:`Schedule` is built from a diffusers ``DDPMScheduler`` or ``DDIMScheduler`` (as
configured in a checkpoint) for a number of inference steps; a :class:`MultistepSchedule`
(a subclass) from a ``DPMSolverMultistepScheduler``, whose step also reads the clean-sample
predictions of earlier steps (see its docstring). It turns the scheduler's
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
from typing import Any

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
    _coeffs: dict = field(default_factory=dict, compare=False, repr=False)  # name -> (S, 1, 1), __post_init__

    def __post_init__(self) -> None:
        object.__setattr__(self, "_coeffs", self.step_coeffs())

    @property
    def coeffs(self) -> dict[str, torch.Tensor]:
        """The table :meth:`step_coeffs` made when the schedule was (name -> (S, 1, 1)); not to be changed."""
        return self._coeffs

    def step_coeffs(self) -> dict[str, torch.Tensor]:
        """The coefficients :meth:`step_mean` and :meth:`predict_x0` read, each ``(S, 1, 1)``, made once.

        Why a table: a step on a few rows is dominated by the twenty-odd small tensor operations
        that make its coefficients from ``alpha_t`` / ``alpha_prev``, on the host every step.
        Computed elementwise over all steps at once they are bitwise the values a row's own
        computation gives (IEEE sums, products, quotients and square roots), so a step indexes
        them and its result is unchanged. ``sqrt_a`` = √ᾱ_t, ``sqrt_beta`` = √(1−ᾱ_t); DDPM's
        posterior-mean weights ``x0`` and ``x``; DDIM's ``x0`` = √ᾱ_prev and ``eps`` = √(1−ᾱ_prev−σ²).
        """
        a_t, a_prev = self.alpha_t.view(-1, 1, 1), self.alpha_prev.view(-1, 1, 1)
        beta_t = 1 - a_t
        coeffs = {"sqrt_a": a_t**0.5, "sqrt_beta": beta_t**0.5}
        if self.kind == "ddpm":
            current_alpha = a_t / a_prev
            coeffs["x0"] = (a_prev**0.5 * (1 - current_alpha)) / beta_t
            coeffs["x"] = current_alpha**0.5 * (1 - a_prev) / beta_t
        else:
            coeffs["x0"] = a_prev**0.5
            coeffs["eps"] = (1 - a_prev - self.noise_std.view(-1, 1, 1) ** 2) ** 0.5
        return coeffs

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def order(self) -> int:
        """``m``: how many steps' clean-sample predictions one step reads (1: only its own)."""
        return 1

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

    def step_mean(self, x: torch.Tensor, k: torch.Tensor | int, model_output: torch.Tensor) -> torch.Tensor:
        """The scheduler's step without noise, for rows at any steps.

        Args:
            x: ``(N, T, D)`` current samples.
            k: ``(N,)`` step index of each row (long, on x's device), or one int for every row.
            model_output: ``(N, T, D)`` the denoiser's prediction for each row.
        Returns:
            ``(N, T, D)`` the mean of ``x_{k+1}`` given ``x_k``.
        """
        c = self._coeffs
        sqrt_a, sqrt_beta = c["sqrt_a"][k], c["sqrt_beta"][k]
        if self.prediction_type == "epsilon":
            x0 = (x - sqrt_beta * model_output) / sqrt_a
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x - sqrt_a * x0) / sqrt_beta
        else:  # v_prediction
            x0 = sqrt_a * x - sqrt_beta * model_output
            eps = sqrt_a * model_output + sqrt_beta * x
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        if self.kind == "ddpm":
            return c["x0"][k] * x0 + c["x"][k] * x
        return c["x0"][k] * x0 + c["eps"][k] * eps

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
        sqrt_a, sqrt_beta = self._coeffs["sqrt_a"][k], self._coeffs["sqrt_beta"][k]
        if self.prediction_type == "epsilon":
            x0 = (x - sqrt_beta * model_output) / sqrt_a
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = sqrt_a * x - sqrt_beta * model_output
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0


    def output_for_x0(self, x: torch.Tensor, k: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The model output that would make the scheduler predict ``x0`` from ``x`` at steps ``k``."""
        a_t = self.alpha_t[k].view(-1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        if self.prediction_type == "sample":
            return x0
        return (a_t**0.5 * x - x0) / (1 - a_t) ** 0.5  # v_prediction


@dataclass(frozen=True)
class MultistepSchedule(Schedule):
    """DPM-Solver++ (multistep, Lu et al. 2022) as per-step coefficients: one form for every order.

    diffusers' ``DPMSolverMultistepScheduler`` writes ``x_k = α_k x0 + σ_k ε`` (``α_k² = ᾱ_k``,
    ``σ_k² = 1 − ᾱ_k``, ``λ_k = log(α_k/σ_k)``, ``h_k = λ_{k+1} − λ_k``) and steps from the
    data predictions ``D_j = x0(x_j)`` of the last ``o_k ≤ m`` steps. Each of its updates is
    linear in ``x_k`` and in those predictions, so step ``k`` is

        x_{k+1} = a_k x_k + Σ_{j=0}^{m-1} b_{k,j} x0(x_{k−j}) + s_k z_k,

    with ``b_{k,j} = 0`` for ``j ≥ o_k`` (and so for ``j > k``). ``dpmsolver++``:
    ``a_k = σ_{k+1}/σ_k``, ``s_k = 0``; first order ``b_{k,0} = α_{k+1}(1 − e^{−h_k})`` (DDIM).
    ``sde-dpmsolver++``: ``a_k = σ_{k+1}/σ_k e^{−h_k}``, ``s_k = σ_{k+1} √(1 − e^{−2h_k})``;
    first order ``b_{k,0} = α_{k+1}(1 − e^{−2h_k})`` (DDPM's posterior step). Orders 2 and 3
    add the divided differences ``D1 = (D_0 − D_1)/r_0`` (``r_0 = h_{k−1}/h_k``) and, at order 3,
    ``D2``; their coefficients are expanded into ``b_{k,·}`` (:func:`_dpm_step`). DDPM and DDIM
    are ``m = 1``. Which order a step uses follows diffusers' warm-up (``o_k ≤ k + 1``) and its
    ``lower_order_final`` / ``euler_at_final`` / ``final_sigmas_type='zero'`` rules.

    The scalars ``α_k, σ_k, h_k, a_k`` are computed in float32 in diffusers' own operation
    order, so ``x0`` and ``a_k x_k`` round as its ``step`` does; the ``b_{k,j}`` are combined
    in float64 from them.

    Attributes (beside :class:`Schedule`'s; all ``(S,)`` unless said):
        kind: the ``algorithm_type``, ``"dpmsolver++"`` or ``"sde-dpmsolver++"``.
        sqrt_alpha, sigma: ``α_k``, ``σ_k`` of ``x_k`` (``predict_x0``'s conversion).
        x_coeff: ``a_k``.
        x0_weights: ``(S, m)`` ``b_{k,j}``, the weight of step ``k − j``'s clean-sample prediction.
        orders: ``o_k``, the solver order step ``k`` uses (long).
        ``alpha_t``/``alpha_prev`` are ``ᾱ_k``/``ᾱ_{k+1}`` (1 at a final zero sigma), ``variance`` the
        DDPM posterior variance between them (the SDE solver's first-order noise variance), the
        scale the convergence test measures in; ``clip_sample`` is False (DPM-Solver never clips).
    """

    sqrt_alpha: torch.Tensor = field(kw_only=True)
    sigma: torch.Tensor = field(kw_only=True)
    x_coeff: torch.Tensor = field(kw_only=True)
    x0_weights: torch.Tensor = field(kw_only=True)
    orders: torch.Tensor = field(kw_only=True)

    _TENSORS = ("timesteps", "alpha_t", "alpha_prev", "noise_std", "draws_noise", "variance",
                "sqrt_alpha", "sigma", "x_coeff", "x0_weights", "orders")

    @property
    def order(self) -> int:
        """``m``: the widest step's order (1 when every step reads only its own prediction)."""
        return int(self.x0_weights.shape[1])

    def to(self, device: torch.device | str) -> MultistepSchedule:
        """The same schedule with its tensors on ``device``; copied once per device, then cached."""
        device = torch.device(device)
        if device == self.timesteps.device:
            return self
        key = str(device)
        if key not in self._copies:
            moved = {name: getattr(self, name).to(device) for name in self._TENSORS}
            self._copies[key] = MultistepSchedule(**{**self.__dict__, **moved, "_copies": {}})
        return self._copies[key]

    def predict_x0(self, x: torch.Tensor, k: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """``(N, T, D)`` the data prediction ``x0(x_k)`` diffusers' ``convert_model_output`` makes.

        epsilon: ``(x − σ_k out)/α_k``; sample: ``out``; v_prediction: ``α_k x − σ_k out``.
        """
        if self.prediction_type == "sample":
            return model_output
        alpha, sigma = self.sqrt_alpha[k].view(-1, 1, 1), self.sigma[k].view(-1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x - sigma * model_output) / alpha
        return alpha * x - sigma * model_output  # v_prediction

    def output_for_x0(self, x: torch.Tensor, k: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The model output that would make :meth:`predict_x0` give ``x0`` from ``x`` at steps ``k``."""
        if self.prediction_type == "sample":
            return x0
        alpha, sigma = self.sqrt_alpha[k].view(-1, 1, 1), self.sigma[k].view(-1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x - alpha * x0) / sigma
        return (alpha * x - x0) / sigma  # v_prediction

    def linear_coeff(self) -> torch.Tensor:
        """``(S,)`` ``a_k``, the coefficient of ``x_k`` with the clean-sample predictions held fixed."""
        return self.x_coeff

    def step_from_x0(self, x: torch.Tensor, k: torch.Tensor, x0s: torch.Tensor) -> torch.Tensor:
        """The step without noise, from the clean-sample predictions of the last steps.

        Args:
            x: ``(N, T, D)`` ``x_k`` of each row.
            k: ``(N,)`` step index of each row (long, on x's device).
            x0s: ``(N, j, T, D)`` with ``x0s[:, i] = x0(x_{k−i})``, ``1 ≤ j ≤ m``; the weights
                of missing older steps must be 0 (``j ≥ o_k``; any ``j ≥ min(k + 1, m)`` is).
        Returns:
            ``(N, T, D)`` ``a_k x_k + Σ_i b_{k,i} x0s[:, i]``.
        """
        weights = self.x0_weights[k, : x0s.shape[1]].to(x.dtype)  # (N, j)
        drive = (weights[:, :, None, None] * x0s).sum(dim=1)
        return self.x_coeff[k].view(-1, 1, 1).to(x.dtype) * x + drive

    def x0_drive(self, x0s: torch.Tensor) -> torch.Tensor:
        """``(B, S, T, D)`` ``Σ_j b_{k,j} x0s[:, k−j]`` for every step ``k``, from all steps' predictions.

        ``x0s``: ``(B, S, T, D)``, ``x0s[:, k] = x0(x_k)``. With every prediction of a trajectory
        (or a guess of it) fixed, the steps are the linear recurrence
        ``x_{k+1} = a_k x_k + drive_k + s_k z_k``: what a Picard solve of this form works on.
        """
        weights = self.x0_weights.to(x0s.dtype)
        drive = weights[:, 0].view(1, -1, 1, 1) * x0s
        for j in range(1, self.order):
            drive[:, j:] += weights[j:, j].view(1, -1, 1, 1) * x0s[:, :-j]
        return drive

    def step_mean(self, x: torch.Tensor, k: torch.Tensor | int, model_output: torch.Tensor) -> torch.Tensor:
        """``a_k x_k + b_{k,0} x0(x_k)``: the whole step when ``m = 1``; refused when it reads earlier steps.

        A one-step consumer (Picard, the captured loop, the Jacobians) on an ``m > 1`` schedule
        would silently drop ``b_{k,j≥1}``; it gets this error instead.
        """
        require_single_step(self, "step_mean")
        if isinstance(k, int):
            k = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        return self.step_from_x0(x, k, self.predict_x0(x, k, model_output)[:, None])


def _check_common(config: dict, name: str) -> None:
    if config.get("thresholding", False):
        raise ValueError(f"{name} with thresholding=True is not supported; expected thresholding=False")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(f"{name}: prediction_type {prediction_type!r} not supported; expected one of "
                         f"{SUPPORTED_PREDICTION_TYPES}")


SUPPORTED_DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
SUPPORTED_DPM_SOLVER_TYPES = ("midpoint", "heun")
_DPM_REFUSED_FLAGS = {
    "use_lu_lambdas": "uniform-logSNR steps",
    "use_exponential_sigmas": "exponential sigmas",
    "use_beta_sigmas": "beta sigmas",
    "use_flow_sigmas": "flow-matching sigmas",
}


def check_dpm_config(config: dict) -> None:
    """Refuse a ``DPMSolverMultistepScheduler`` configuration :class:`MultistepSchedule` cannot express.

    Supported: ``algorithm_type`` dpmsolver++ / sde-dpmsolver++ (the data-prediction solvers,
    whose step is a weighted sum of clean-sample predictions), ``solver_order`` 1–3,
    ``solver_type`` midpoint / heun, prediction_type epsilon / sample / v_prediction,
    ``lower_order_final``, ``euler_at_final``, ``final_sigmas_type`` zero / sigma_min,
    ``use_karras_sigmas``, ``timestep_spacing``, ``lambda_min_clipped``, ``rescale_betas_zero_snr``.
    Raises ``ValueError`` naming the option and what is supported.
    """
    name = "DPMSolverMultistepScheduler"
    _check_common(config, name)
    algorithm = config.get("algorithm_type", "dpmsolver++")
    if algorithm not in SUPPORTED_DPM_ALGORITHMS:
        raise ValueError(f"{name} algorithm_type {algorithm!r} not supported; expected one of "
                         f"{SUPPORTED_DPM_ALGORITHMS} (the noise-prediction solvers are not)")
    order = config.get("solver_order", 2)
    if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
        raise ValueError(f"{name} solver_order {order!r} not supported; expected 1, 2 or 3")
    if config.get("solver_type", "midpoint") not in SUPPORTED_DPM_SOLVER_TYPES:
        raise ValueError(f"{name} solver_type {config.get('solver_type')!r} not supported; expected one of "
                         f"{SUPPORTED_DPM_SOLVER_TYPES}")
    for flag, what in _DPM_REFUSED_FLAGS.items():
        if config.get(flag, False):
            raise ValueError(f"{name} with {flag}=True ({what}) is not supported; expected {flag}=False "
                             "(supported step spacings: timestep_spacing linspace / leading / trailing, "
                             "use_karras_sigmas)")
    if config.get("variance_type") in ("learned", "learned_range"):
        raise ValueError(f"{name} variance_type {config.get('variance_type')!r} (a model that predicts its "
                         "variance) is not supported; expected None")
    if config.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise ValueError(f"{name} final_sigmas_type {config.get('final_sigmas_type')!r} not supported; "
                         "expected 'zero' or 'sigma_min'")


def _dpm_orders(steps: int, config: dict) -> list[int]:
    """The solver order of each step, as diffusers' ``step`` picks it.

    Order ``min(solver_order, k + 1)`` (the warm-up: only ``k + 1`` predictions exist), lowered
    to 1 at the last step (``euler_at_final``, ``final_sigmas_type='zero'``, or
    ``lower_order_final`` with fewer than 15 steps) and to at most 2 at the one before (the latter).
    """
    few = bool(config.get("lower_order_final", True)) and steps < 15
    final_euler = bool(config.get("euler_at_final", False)) or few or config.get("final_sigmas_type", "zero") == "zero"
    solver_order = int(config.get("solver_order", 2))
    orders = []
    for k in range(steps):
        if solver_order == 1 or k == 0 or (k == steps - 1 and final_euler):
            orders.append(1)
        elif solver_order == 2 or k == 1 or (k == steps - 2 and few):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _dpm_step(sigmas: torch.Tensor, k: int, order: int, sde: bool, heun: bool) -> tuple[float, list[float], float]:
    """``(a_k, [b_{k,0} … b_{k,order-1}], s_k)`` of one DPM-Solver++ step.

    ``sigmas`` is diffusers' ``(S + 1,)`` float32 ``σ/α`` ladder; the scalars are computed from it
    in float32 as ``scheduler.step`` computes them. The update there is
    ``x_{k+1} = a_k x_k + p_0 D0 + p_1 D1 + p_2 D2 + s_k z`` with ``D0 = x0_k``,
    ``D1 = (x0_k − x0_{k−1})/r_0`` at order 2, and at order 3 ``D1 = D1_0 + r_0/(r_0 + r_1)·(D1_0 − D1_1)``,
    ``D2 = (D1_0 − D1_1)/(r_0 + r_1)`` (``D1_0 = (x0_k − x0_{k−1})/r_0``,
    ``D1_1 = (x0_{k−1} − x0_{k−2})/r_1``, ``r_i = h_{k−1−i}/h_k``); the ``p`` are
    expanded here into weights of ``x0_{k−j}``.
    """
    def alpha_sigma(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = 1 / ((sigmas[i] ** 2 + 1) ** 0.5)
        return alpha, sigmas[i] * alpha

    def lam(i: int) -> torch.Tensor:
        alpha, sigma = alpha_sigma(i)
        return torch.log(alpha) - torch.log(sigma)

    alpha_t, sigma_t = alpha_sigma(k + 1)
    sigma_s0 = alpha_sigma(k)[1]
    h = lam(k + 1) - lam(k)
    if sde:
        a = sigma_t / sigma_s0 * torch.exp(-h)
        noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        p0 = alpha_t * (1 - torch.exp(-2.0 * h))
        p1 = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) if heun or order == 3 else 0.5 * p0
        p2 = alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    else:
        a, noise = sigma_t / sigma_s0, torch.zeros(())
        p0 = -(alpha_t * (torch.exp(-h) - 1.0))
        p1 = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) if heun or order == 3 else 0.5 * p0
        p2 = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
    if order == 1:
        return float(a), [float(p0)], float(noise)
    p0, p1, p2 = float(p0), float(p1), float(p2)
    r0 = float((lam(k) - lam(k - 1)) / h)
    if order == 2:
        return float(a), [p0 + p1 / r0, -p1 / r0], float(noise)
    r1 = float((lam(k - 1) - lam(k - 2)) / h)
    d10, d11 = [1 / r0, -1 / r0, 0.0], [0.0, 1 / r1, -1 / r1]  # D1_0, D1_1 as weights of x0_k, x0_{k-1}, x0_{k-2}
    diff = [u - v for u, v in zip(d10, d11, strict=True)]
    d1 = [u + r0 / (r0 + r1) * d for u, d in zip(d10, diff, strict=True)]
    d2 = [d / (r0 + r1) for d in diff]
    return float(a), [p0 * e + p1 * u + p2 * v for e, u, v in zip([1.0, 0.0, 0.0], d1, d2, strict=True)], float(noise)


def _multistep_schedule(noise_scheduler) -> MultistepSchedule:
    """A :class:`MultistepSchedule` from a ``DPMSolverMultistepScheduler`` whose timesteps are set."""
    cfg = noise_scheduler.config
    timesteps = noise_scheduler.timesteps.to(torch.long).cpu()
    S = int(timesteps.shape[0])
    if S > 1 and int((timesteps == timesteps[0]).sum()) > 1:
        raise ValueError(f"DPMSolverMultistepScheduler's first timestep {int(timesteps[0])} repeats "
                         f"({timesteps.tolist()}): its step would start at the second one and skip a step; "
                         "choose another number of steps or spacing")
    sigmas = noise_scheduler.sigmas.cpu()  # (S + 1,) float32, σ/α of each step and of the end
    orders = _dpm_orders(S, cfg)
    repeats = (sigmas[1:] == sigmas[:-1]).nonzero().flatten().tolist()
    if repeats and max(orders) > 1:
        raise ValueError(f"DPMSolverMultistepScheduler at {S} steps repeats a noise level (steps {repeats} and "
                         "the next, timesteps rounded together): its higher-order steps divide by a zero step size "
                         "(diffusers returns NaN); choose fewer steps or solver_order=1")
    sde, heun = cfg.algorithm_type == "sde-dpmsolver++", cfg.solver_type == "heun"
    steps = [_dpm_step(sigmas, k, o, sde, heun) for k, o in enumerate(orders)]
    m = max(orders)
    weights = torch.zeros((S, m), dtype=torch.float64)
    for k, (_, b, _) in enumerate(steps):
        weights[k, : len(b)] = torch.tensor(b, dtype=torch.float64)
    sqrt_alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    alpha_bar = 1 / (sigmas.to(torch.float64) ** 2 + 1)  # ᾱ of each step and of the end
    alpha_t, alpha_prev = alpha_bar[:-1], alpha_bar[1:]
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return MultistepSchedule(
        kind=cfg.algorithm_type,
        timesteps=timesteps,
        alpha_t=alpha_t.to(torch.float32),
        alpha_prev=alpha_prev.to(torch.float32),
        noise_std=torch.tensor([s for _, _, s in steps], dtype=torch.float32),
        draws_noise=torch.full((S,), sde, dtype=torch.bool),
        variance=variance.clamp(min=0).to(torch.float32),
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        clip_sample_range=1.0,
        sqrt_alpha=sqrt_alpha[:-1],
        sigma=(sigmas * sqrt_alpha)[:-1],
        x_coeff=torch.tensor([a for a, _, _ in steps], dtype=torch.float32),
        x0_weights=weights.to(torch.float32),
        orders=torch.tensor(orders, dtype=torch.long),
    )


def require_single_step(schedule: Schedule, sampler: str) -> None:
    """Refuse a schedule whose step reads earlier steps' predictions (``order > 1``) in a one-step sampler.

    The Picard solves, the captured loop and the Jacobians treat step ``k`` as a function of
    ``x_k`` alone; on DPM-Solver++ of order 2 or 3 they would drop ``b_{k,j≥1}`` and compute
    another sampler's result. ``sequential_sample`` runs any order.
    """
    if schedule.order > 1:
        raise ValueError(
            f"not yet: {sampler} on a multistep schedule ({schedule.kind}, order {schedule.order}: each step "
            "reads the clean-sample predictions of earlier steps); use sampler='sequential', or solver_order=1"
        )


def make_schedule(noise_scheduler, num_inference_steps: int | None = None, eta: float = 0.0) -> Schedule:
    """Build a :class:`Schedule` from a diffusers ``DDPMScheduler`` or ``DDIMScheduler``, or a
    :class:`MultistepSchedule` from a ``DPMSolverMultistepScheduler``.

    ``noise_scheduler.set_timesteps(num_inference_steps)`` is called on the scheduler (as the
    sequential loop would). ``eta`` is DDIM's noise level (ignored for DDPM; DPM-Solver++
    takes none: its stochastic form is ``algorithm_type='sde-dpmsolver++'``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if isinstance(noise_scheduler, DPMSolverMultistepScheduler):
        check_dpm_config(noise_scheduler.config)
        if eta:
            raise ValueError(f"eta={eta} is DDIM's noise level; DPMSolverMultistepScheduler takes none "
                             "(for a stochastic solver use algorithm_type='sde-dpmsolver++')")
    if num_inference_steps is not None:
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        noise_scheduler.set_timesteps(int(num_inference_steps))
    elif noise_scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps set; pass num_inference_steps")
    if isinstance(noise_scheduler, DPMSolverMultistepScheduler):
        return _multistep_schedule(noise_scheduler)
    cfg = noise_scheduler.config
    timesteps = noise_scheduler.timesteps.to(torch.long).cpu()
    ac = noise_scheduler.alphas_cumprod.cpu()
    alpha_t = ac[timesteps]
    if isinstance(noise_scheduler, DDPMScheduler):
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
    elif isinstance(noise_scheduler, DDIMScheduler):
        _check_common(cfg, "DDIMScheduler")
        prev = timesteps - cfg.num_train_timesteps // noise_scheduler.num_inference_steps  # DDIM's own rule
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], noise_scheduler.final_alpha_cumprod.cpu())
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        noise_std = eta * variance**0.5
        draws_noise = torch.full_like(timesteps, eta > 0, dtype=torch.bool)
        kind = "ddim"
    else:
        raise ValueError(
            f"unsupported scheduler {type(noise_scheduler).__name__}; expected diffusers DDPMScheduler, DDIMScheduler "
            "or DPMSolverMultistepScheduler"
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


#: the noise schedule's ``num_train_timesteps``: diffusers builds tables of this length when it loads
MAX_TRAIN_TIMESTEPS = 10_000


def check_scheduler_size(scheduler: dict[str, Any]) -> int:
    """The schedule's ``num_train_timesteps`` (100 when absent, as diffusers' DDPM), bounded before diffusers
    builds its tables (an integral float is stored back as an int); ``trained_betas`` no longer than that bound.

    Here rather than with the other config limits (:mod:`para_policy.policy_config`) because
    :func:`build_scheduler` needs it and sits below the configs.
    """
    steps = scheduler.get("num_train_timesteps", 100)
    integral = isinstance(steps, int) or isinstance(steps, float) and steps.is_integer()
    if isinstance(steps, bool) or not integral or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        shown = f"an integer of {steps.bit_length()} bits" if integral and isinstance(steps, int) \
            and steps.bit_length() > 64 else repr(steps)[:60]
        raise ValueError(f"policy config noise_scheduler.num_train_timesteps must be an integer >= 1 and <= "
                         f"{MAX_TRAIN_TIMESTEPS} (MAX_TRAIN_TIMESTEPS), got {shown}")
    if "num_train_timesteps" in scheduler:
        scheduler["num_train_timesteps"] = int(steps)
    betas = scheduler.get("trained_betas")
    if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) > MAX_TRAIN_TIMESTEPS):
        raise ValueError(f"policy config noise_scheduler.trained_betas must be a list of at most "
                         f"{MAX_TRAIN_TIMESTEPS} (MAX_TRAIN_TIMESTEPS) numbers, got {type(betas).__name__}"
                         f"{' of ' + str(len(betas)) if isinstance(betas, (list, tuple)) else ''}")
    return int(steps)


def build_scheduler(config: dict):
    """A diffusers scheduler from a DiffusionPolicy-style dict with a ``_target_``.

    Accepts ``diffusers.DDPMScheduler`` / ``diffusers.schedulers.scheduling_ddpm.DDPMScheduler``
    (and the DDIM and ``DPMSolverMultistepScheduler`` equivalents). Anything else is refused
    with the names accepted; so is a DPM-Solver configuration :class:`MultistepSchedule` cannot
    run (:func:`check_dpm_config`), and a ``clip_sample`` key on it (diffusers' DPM-Solver has
    no such option and refuses it, as DiffusionPolicy's ``hydra.utils.instantiate`` would).

    A config comes from a checkpoint file, so it is checked before diffusers sees it: a keyword the
    class does not take, ``num_train_timesteps`` above ``MAX_TRAIN_TIMESTEPS`` (diffusers builds
    tables that long) and an unimplemented ``beta_schedule`` are a ``ValueError`` naming the key.
    """
    import inspect

    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    kwargs = dict(config)
    target = str(kwargs.pop("_target_", "diffusers.DDPMScheduler"))
    classes = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
               "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler}
    name = target.rsplit(".", 1)[-1]
    if not target.startswith("diffusers.") or name not in classes:
        raise ValueError(
            f"unknown noise scheduler _target_ {target!r}; expected diffusers.DDPMScheduler, "
            "diffusers.DDIMScheduler or diffusers.DPMSolverMultistepScheduler"
        )
    if name == "DPMSolverMultistepScheduler":
        if "clip_sample" in kwargs or "clip_sample_range" in kwargs:
            raise ValueError("DPMSolverMultistepScheduler has no clip_sample option (DPM-Solver never clips; "
                             "diffusers refuses the key): remove clip_sample / clip_sample_range from the "
                             "noise scheduler config")
    takes = [key for key in inspect.signature(classes[name].__init__).parameters if key != "self"]
    unknown = sorted(str(key) for key in kwargs if key not in takes)
    if unknown:
        raise ValueError(f"noise_scheduler.{unknown[0]} is not an argument of {name} (unknown: {unknown}; "
                         f"it takes {takes})")
    check_scheduler_size(kwargs)
    try:
        with torch.device("cpu"):  # a scheduler's tables are host data, also inside a meta-device skeleton
            scheduler = classes[name](**kwargs)
    except NotImplementedError as e:  # diffusers' word for an unknown beta_schedule
        raise ValueError(f"noise_scheduler.beta_schedule {str(kwargs.get('beta_schedule'))[:60]!r} is not "
                         f"implemented by {name}") from e
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise ValueError(f"noise_scheduler: {name} cannot be built from this config ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from e
    if name == "DPMSolverMultistepScheduler":
        check_dpm_config(scheduler.config)  # as diffusers registered it (it renames a few legacy options)
    return scheduler


def ddim_from(noise_scheduler):
    """The DDIM scheduler a DiffusionPolicy user would pair with a DDPM-trained model.

    Same betas and prediction type; ``set_alpha_to_one=True, steps_offset=0`` as in
    DiffusionPolicy's DDIM configs. From a DPM-Solver scheduler (which has no ``clip_sample``)
    the twin does not clip either.
    """
    from diffusers import DDIMScheduler

    cfg = noise_scheduler.config
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        trained_betas=cfg.get("trained_betas"),
        clip_sample=cfg.get("clip_sample", False),
        clip_sample_range=cfg.get("clip_sample_range", 1.0),
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type=cfg.prediction_type,
    )


#: ``lambda_min_clipped`` of the DPM-Solver++ twin of a cosine-schedule model (diffusers' value for it)
COSINE_LAMBDA_MIN_CLIPPED = -5.1


def dpm_from(noise_scheduler, solver_order: int = 2, algorithm_type: str = "dpmsolver++"):
    """The DPM-Solver++ scheduler a user would pair with a DDPM- or DDIM-trained model.

    Same betas and prediction type; diffusers' defaults otherwise (``linspace`` spacing,
    ``lower_order_final``, ``final_sigmas_type='zero'``), as RDT-1B and a DiffusionPolicy config
    with ``_target_: diffusers.DPMSolverMultistepScheduler`` build it, except one: on a cosine
    (``squaredcos_cap_v2``) schedule ``lambda_min_clipped`` is :data:`COSINE_LAMBDA_MIN_CLIPPED`,
    which diffusers documents as critical there. Why: DiffusionPolicy's cosine betas end at
    ᾱ ≈ 2e-7, so the first clean-sample prediction ``(x − σ ε) / α`` multiplies the network's
    error by about 2000; DPM-Solver does not clip it (a ``clip_sample`` of the source scheduler is
    not carried), and the unclipped solver's actions are far off (docs/benchmarks.md). A
    checkpoint that configures DPM-Solver itself is built as it says (:func:`build_scheduler`).
    """
    from diffusers import DPMSolverMultistepScheduler

    cfg = noise_scheduler.config
    kwargs = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        trained_betas=cfg.get("trained_betas"),
        prediction_type=cfg.prediction_type,
        solver_order=solver_order,
        algorithm_type=algorithm_type,
    )
    if cfg.beta_schedule == "squaredcos_cap_v2":
        kwargs["lambda_min_clipped"] = COSINE_LAMBDA_MIN_CLIPPED
    check_dpm_config(kwargs)
    return DPMSolverMultistepScheduler(**kwargs)
