"""Shared test fixtures: small deterministic denoisers and DiffusionPolicy's scheduler configs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

# Tiny test models run fastest on one thread, and far slower on two when the cores are busy.
torch.set_num_threads(1)

DP_BETAS = dict(num_train_timesteps=100, beta_start=0.0001, beta_end=0.02, beta_schedule="squaredcos_cap_v2")


def dp_ddpm(**overrides) -> DDPMScheduler:
    """DiffusionPolicy's PushT low-dim DDPM scheduler."""
    cfg = dict(DP_BETAS, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon")
    return DDPMScheduler(**{**cfg, **overrides})


def dp_ddim(**overrides) -> DDIMScheduler:
    """DiffusionPolicy's DDIM scheduler config (same betas, set_alpha_to_one, steps_offset 0)."""
    cfg = dict(DP_BETAS, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")
    return DDIMScheduler(**{**cfg, **overrides})


def dp_dpm(**overrides) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ on DiffusionPolicy's PushT betas, diffusers' defaults otherwise (order 2, dpmsolver++)."""
    return DPMSolverMultistepScheduler(**{**DP_BETAS, **overrides})


class MLPDenoiser(torch.nn.Module):
    """A small per-row network over (x, t, condition): rows are independent, like the UNet."""

    def __init__(self, dim: int = 3, cond_dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cond_dim = cond_dim
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1 + cond_dim, 64), torch.nn.Tanh(),
                                       torch.nn.Linear(64, dim))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, t, condition=None):
        B, T, _ = x.shape
        c = torch.zeros(B, self.cond_dim) if condition is None else condition
        h = torch.cat([x, (t.float() / 100)[:, None, None].expand(B, T, 1), c[:, None, :].expand(B, T, -1)], -1)
        return self.net(h)


class CleanDenoiser(torch.nn.Module):
    """An :class:`MLPDenoiser` made to behave like a trained model: its clean sample is bounded.

    ``x0 = tanh(net(x, t, c))``, returned as the scheduler's ``prediction_type`` expects with
    ``ᾱ_t`` (epsilon ``(x − √ᾱ x0)/√(1 − ᾱ)``, v ``(√ᾱ x − x0)/√(1 − ᾱ)``). A raw network's
    epsilon at ``ᾱ ≈ 1e-7`` implies clean samples in the thousands; unclipped solvers
    (DPM-Solver) then compare float32 roundoff of such values, not their arithmetic.
    """

    def __init__(self, scheduler, seed: int = 0) -> None:
        super().__init__()
        self.net = MLPDenoiser(seed=seed)
        self.alphas_cumprod = scheduler.alphas_cumprod.clone()
        self.prediction_type = scheduler.config.prediction_type

    def forward(self, x, t, condition=None):
        x0 = torch.tanh(self.net(x, t, condition))
        if self.prediction_type == "sample":
            return x0
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x - a**0.5 * x0) / (1 - a) ** 0.5
        return (a**0.5 * x - x0) / (1 - a) ** 0.5


@pytest.fixture
def denoiser() -> MLPDenoiser:
    return MLPDenoiser()


@pytest.fixture(scope="session", autouse=True)
def _window_cache_outside_home(tmp_path_factory):
    """No test (module-scoped fixtures and subprocesses included) writes the user's ~/.cache window file."""
    from para_policy import window

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(window.CACHE_ENV, str(tmp_path_factory.mktemp("session_window_cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _eager_by_default():
    """``backend='default'`` is eager in tests (and their subprocesses): the fastest runtime's export and timing
    would add seconds to every ``load_policy``; tests/test_default_backend.py unsets it to test that default."""
    from para_policy import inference

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(inference.BACKEND_ENV, "eager")
        yield


@pytest.fixture(autouse=True)
def isolated_window_cache(tmp_path, monkeypatch):
    """Every test resolves window='auto' afresh, into its own cache file."""
    from para_policy import window

    monkeypatch.setenv(window.CACHE_ENV, str(tmp_path / "para_policy_cache"))
    window._MEMORY.clear()
    yield
    window._MEMORY.clear()
