"""Latency as a control loop sees it, and faithfulness, from batch-1 policy calls.

Rollouts batch many envs into one call, so their timings say nothing about the delay a
robot waits for its next chunk. Here every sampler is timed on the same observations
(chunk observations recorded during the rollouts) with the same noise per call: one
``predict_action`` at batch 1, wall-clock, after ``warmup`` untimed calls. The samplers
alternate which goes first on each observation so that drifting machine load biases
neither. The same calls give faithfulness: how far the parallel sampler's actions are
from the sequential ones for identical inputs (0 means exactly the sequential policy).

A call is the whole ``predict_action``: normalizing, the observation encoder of an image
policy (its ResNet runs once per call, before sampling), the sampler and unnormalizing, so
an image policy's latency includes its encoder. The observation is on the policy's device
before the clock starts (for a GPU policy the host-to-device copy is not timed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from para_policy.evaluation.config import FLAT_KEY
from para_policy.evaluation.rollout import LATENCY_STREAM, call_noise
from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig
from para_policy.stats import percentile_summary


def select_observations(pool: Sequence[Any], k: int) -> list[Any]:
    """``k`` observations spread evenly over ``pool`` (all of it when ``k >= len(pool)``).

    The pool is ordered by episode then chunk, so even spacing covers early and late
    phases of several episodes instead of the first episode's opening moves.
    """
    if k <= 0 or not pool:
        return []
    if k >= len(pool):
        return list(pool)
    idx = np.unique(np.linspace(0, len(pool) - 1, k).round().astype(int))
    return [pool[i] for i in idx]


def batch_one(observation: np.ndarray | Mapping[str, np.ndarray], device: torch.device | str | None = None
              ) -> dict[str, torch.Tensor]:
    """A recorded chunk observation as a batch-1 ``predict_action`` dict.

    ``observation``: (To, Do) (flat, → ``{'obs': (1, To, Do)}``) or ``{key: (To, *shape)}``
    (→ ``{key: (1, To, *shape)}``), float32; moved to ``device`` when given.
    """
    items = observation.items() if isinstance(observation, Mapping) else [(FLAT_KEY, observation)]
    out = {k: torch.from_numpy(np.asarray(v, dtype=np.float32))[None] for k, v in items}
    return out if device is None else {k: v.to(device) for k, v in out.items()}


def time_samplers(
    policy: LowdimPolicy,
    specs: Mapping[str, SamplerConfig],
    observations: Sequence[np.ndarray],
    *,
    guesses: Sequence[np.ndarray | None] | None = None,
    noise_seed: int = 0,
    warmup: int = 3,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Time batch-1 ``predict_action`` calls of every sampler on the same inputs.

    Args:
        specs: role → sampler, e.g. ``{'candidate': paradigms, 'baseline': sequential}``;
            all must share one schedule (same noise shapes), as the baseline is built.
        observations: each (n_obs_steps, obs_dim), or for dict observations (images)
            ``{key: (n_obs_steps, *shape)}``.
        guesses: per observation, the warm-start guess (T, D) a control loop would have
            (the previous chunk's normalized trajectory shifted by the executed actions),
            or None (an episode's first chunk: cold). Used by the specs with ``warm_start``.
        warmup: untimed calls per sampler first (allocator, thread pool, caches).
        threads: ``torch.set_num_threads`` during timing (restored after); None keeps it.
    Returns:
        role → ``{'ms': [...], 'rounds': [...], 'model_evals': [...], 'actions': (K, Na, Da)
        array}`` in the order of ``observations``.
    """
    from tqdm.auto import tqdm

    roles = list(specs)
    schedules = {role: policy.schedule_for(spec) for role, spec in specs.items()}
    first = schedules[roles[0]]
    for role in roles[1:]:
        s = schedules[role]
        if s.kind != first.kind or s.num_steps != first.num_steps:
            raise ValueError(f"samplers {roles[0]!r} and {role!r} run on different schedules "
                             f"({first.kind}/{first.num_steps} vs {s.kind}/{s.num_steps}); they cannot share noise")
    sample_shape = policy.trajectory_shape(1)[1:]
    out: dict[str, dict[str, Any]] = {role: {"ms": [], "rounds": [], "model_evals": [], "actions": []}
                                      for role in roles}
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if observations:
            obs0 = batch_one(observations[0])
            x_T, noise = call_noise(first, sample_shape, [(LATENCY_STREAM, noise_seed, -1, 0)],
                                    policy.device, policy.sample_dtype)
            for _ in range(max(0, int(warmup))):
                for role in roles:
                    policy.predict_action(obs0, x_T=x_T, noise=noise, sampler=specs[role], warm_start=False)
        bar = tqdm(observations, desc="latency (batch 1)", unit="obs", disable=not progress, leave=False)
        for i, obs in enumerate(bar):
            o = batch_one(obs, policy.device)
            x_T, noise = call_noise(first, sample_shape, [(LATENCY_STREAM, noise_seed, i, 0)],
                                    policy.device, policy.sample_dtype)
            guess = None if guesses is None or guesses[i] is None else torch.as_tensor(guesses[i])[None]
            order = roles if i % 2 == 0 else roles[::-1]
            for role in order:
                warm = {"guess": guess.to(x_T)} if guess is not None and specs[role].warm_start else \
                    {"warm_start": False}
                if policy.device.type == "cuda":
                    torch.cuda.synchronize(policy.device)
                t0 = time.perf_counter()
                result = policy.predict_action(o, x_T=x_T, noise=noise, sampler=specs[role], **warm)
                action = result["action"].cpu()  # a control loop needs the actions on the host
                elapsed = time.perf_counter() - t0
                stats = result.stats
                rec = out[role]
                rec["ms"].append(elapsed * 1e3)
                rec["rounds"].append(int(stats.rounds))
                rec["model_evals"].append(int(stats.model_evals))
                rec["actions"].append(action[0].numpy())
        bar.close()
    finally:
        torch.set_num_threads(old_threads)
    for rec in out.values():
        rec["actions"] = np.stack(rec["actions"]) if rec["actions"] else np.zeros((0,))
    return out


def latency_summary(timing: Mapping[str, Any], n_action_steps: int) -> dict[str, Any]:
    """Distributions of ms per chunk, ms per executed action, rounds and model evals per chunk."""
    ms = list(timing["ms"])
    return {
        "ms_per_chunk": percentile_summary(ms),
        "ms_per_action": percentile_summary([m / n_action_steps for m in ms]),
        "rounds_per_chunk": percentile_summary(timing["rounds"]),
        "model_evals_per_chunk": percentile_summary(timing["model_evals"]),
    }


def faithfulness(candidate: np.ndarray, baseline: np.ndarray) -> dict[str, float | int | None]:
    """Distance between two samplers' action chunks on the same inputs, in action units.

    Args:
        candidate, baseline: (K, Na, Da) actions of the same K calls.
    Returns:
        ``mean_px`` / ``max_px`` (pixels for PushT; ``task.action_unit`` names the unit):
        Euclidean distance per action, averaged / maximised over
        all K·Na actions; ``n_calls`` = K.
    """
    if candidate.size == 0:
        return {"mean_px": None, "max_px": None, "n_calls": 0}
    d = np.linalg.norm(np.asarray(candidate, np.float64) - np.asarray(baseline, np.float64), axis=-1)
    return {"mean_px": float(d.mean()), "max_px": float(d.max()), "n_calls": int(d.shape[0])}


def machine_info() -> dict[str, Any]:
    """What the latency numbers were measured on (they mean little without it)."""
    import platform

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_avg"] = None
    return info
