"""The warm-started replay loop: every chunk of a stream through every variant, on the same noise.

What a robot waits for is one batch-1 call per chunk, each chunk from the observation the last
one led to. A benchmark replays a recorded stream (:mod:`para_policy.bench.stream`) that way:

- every variant of a chunk gets the chunk's noise (:class:`~para_policy.bench.noise.ChunkKeys`),
  so deviations measure samplers, never noise;
- a variant whose spec warm-starts starts each chunk from its *own* previous chunk of the
  episode, shifted by the executed actions (an episode's first chunk is cold, as in a control
  loop), so variants never share a guess;
- the variants' order alternates chunk by chunk, so drifting machine load biases none;
- the clock covers the call and copying its actions to the host (what a control loop waits
  for); the observation and the noise are on the device before it starts.

A variant is a sampler spec (:func:`~para_policy.samplers.sampler_spec`) on one of the
replay's policy objects; how a chunk is sampled is ``predict_action`` unless the variant
passes the sampling function options that ``predict_action`` does not take
(:func:`sampler_call`). Imports nothing from :mod:`para_policy.evaluation`, so a bare GPU
machine runs it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from para_policy.bench.noise import ChunkKeys, chunk_noise
from para_policy.samplers import SamplerConfig, SampleStats, shift_trajectory, warm_start_init

DEFAULT_POLICY = "default"


@dataclass
class Outcome:
    """One sampled chunk: executed actions (B, n_action_steps, Da), normalized trajectory (B, T, D), stats."""

    action: torch.Tensor
    trajectory: torch.Tensor
    stats: SampleStats
    warm: bool


#: ``(policy, spec, obs (1, To, Do) on the device, x_T, noise, guess (1, T, D) or False) -> Outcome``
Call = Callable[[Any, SamplerConfig, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | bool"], Outcome]
#: ``(variant, policy) -> context`` entered around a timed call; it yields a dict merged into the record
Instrument = Callable[["Variant", Any], contextlib.AbstractContextManager[dict[str, Any]]]


def predict_call(policy: Any, spec: SamplerConfig, obs: torch.Tensor, x_T: torch.Tensor, noise: torch.Tensor,
                 guess: torch.Tensor | bool) -> Outcome:
    """``policy.predict_action`` on ``{'obs': obs}`` with this noise and warm start: the library as a user calls it."""
    start = {"warm_start": False} if guess is False else {"guess": guess}
    out = policy.predict_action({"obs": obs}, x_T=x_T, noise=noise, sampler=spec, **start)
    return Outcome(out["action"], out.trajectory, out.stats, bool(out.warm))


def executed_actions(policy: Any, sample: torch.Tensor) -> torch.Tensor:
    """The actions a control loop executes, (B, n_action_steps, Da) unnormalized, of a normalized sample (B, T, D)."""
    actions = policy.normalizer.unnormalize("action", sample[..., : policy.action_dim])
    return actions[:, policy.action_start: policy.action_start + policy.n_action_steps]


def sampler_call(**extra: Any) -> Call:
    """A :data:`Call` that runs the spec's sampling function itself, with ``extra`` keyword arguments.

    For options a sampler function takes and ``predict_action`` does not (``jacobian=`` of
    :func:`~para_policy.samplers.picard_sample`): conditioning, the warm start
    (:func:`~para_policy.samplers.warm_start_init`), the spec's options plus ``extra``, the
    executed actions, as ``predict_action`` does around its sampler.
    """
    def call(policy: Any, spec: SamplerConfig, obs: torch.Tensor, x_T: torch.Tensor, noise: torch.Tensor,
             guess: torch.Tensor | bool) -> Outcome:
        with torch.inference_mode():
            cond, inpaint = policy.conditioning(policy.observation({"obs": obs}))
            schedule = policy.schedule_for(spec)
            kwargs = {**spec.options, **extra}
            if spec.iterative:
                kwargs["init"] = None if guess is False else warm_start_init(schedule, guess, x_T, noise)
            sample, stats = spec.family.sample(policy.denoise, schedule, x_T, noise, condition=cond, inpaint=inpaint,
                                               **kwargs)
            return Outcome(executed_actions(policy, sample), sample, stats, kwargs.get("init") is not None)

    return call


@dataclass
class Variant:
    """One row of a benchmark: a sampler spec run on one of the replay's policy objects.

    name: the row's label (unique within a replay); spec: what samples (its ``warm_start``
    decides whether the variant starts from its own previous chunk); policy: the key of its
    policy object (a runtime, a backend, a precision); call: how a chunk is sampled.
    ``records`` gets one dict per replayed chunk (:func:`replay`); ``previous`` holds the last
    normalized trajectory (1, T, D) per episode.
    """

    name: str
    spec: SamplerConfig
    policy: str = DEFAULT_POLICY
    call: Call = predict_call
    records: list[dict[str, Any]] = field(default_factory=list)
    previous: dict[int, torch.Tensor] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _nothing(variant: Variant, policy: Any) -> Iterator[dict[str, Any]]:
    yield {}


def run_chunk(policy: Any, v: Variant, chunk: Mapping[str, Any], seed: int, instrument: Instrument = _nothing
              ) -> dict[str, Any]:
    """One timed batch-1 call of ``v`` on ``chunk`` (noise from ``seed``); updates the variant's warm-start memory.

    Returns the record: episode, chunk, ms, rounds, model_evals, warm, converged,
    rows_per_round, action (n_action_steps, Da) float numpy, plus what ``instrument`` yielded.
    """
    obs = torch.as_tensor(np.asarray(chunk["obs"], dtype=np.float32))[None].to(policy.device)
    x_T, noise = chunk_noise(policy, v.spec, seed)
    episode = int(chunk["episode"])
    prev = v.previous.get(episode) if chunk["chunk"] > 0 else None
    guess: torch.Tensor | bool = False
    if v.spec.warm_start and prev is not None:
        guess = shift_trajectory(prev, policy.n_action_steps)
    with instrument(v, policy) as extra:
        _sync(policy.device)
        start = time.perf_counter()
        out = v.call(policy, v.spec, obs, x_T, noise, guess)
        action = out.action.cpu()
        ms = (time.perf_counter() - start) * 1e3
    v.previous[episode] = out.trajectory.clone()
    stats = out.stats
    rows = stats.rows_per_round or [1] * int(stats.rounds)  # the sequential loop: one row a step
    return {"episode": episode, "chunk": int(chunk["chunk"]), "ms": ms, "rounds": int(stats.rounds),
            "model_evals": int(stats.model_evals), "warm": bool(out.warm), "converged": stats.all_converged,
            "rows_per_round": [int(r) for r in rows], "action": action[0].float().numpy(), **extra}


def replay(policies: Mapping[str, Any] | Any, variants: Sequence[Variant], chunks: Sequence[Mapping[str, Any]],
           keys: ChunkKeys, *, warmup: int = 1, instrument: Instrument | None = None, progress: bool = False
           ) -> dict[str, list[dict[str, Any]]]:
    """Every chunk in order through every variant, their order alternating per chunk; returns ``{name: records}``.

    ``policies``: ``{key: policy}`` (a single policy is ``{'default': policy}``). ``warmup``:
    untimed calls per variant on the first chunks first (allocator, thread pool, compiled
    code, CUDA graphs), their warm-start memory then cleared. ``instrument``: a context
    around each timed call whose yielded dict joins the record (e.g. the model's own ms).
    """
    if not isinstance(policies, Mapping):
        policies = {DEFAULT_POLICY: policies}
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    for i, chunk in enumerate(chunks[:warmup]):
        for v in variants:
            run_chunk(policies[v.policy], v, chunk, keys.seed(chunk, i))
    for v in variants:
        v.previous.clear()
    stream: Any = chunks
    if progress:
        from tqdm import tqdm

        stream = tqdm(chunks, desc="replay", unit="chunk")
    for i, chunk in enumerate(stream):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            v.records.append(run_chunk(policies[v.policy], v, chunk, keys.seed(chunk, i), instrument or _nothing))
    return {v.name: v.records for v in variants}


def deviations(records: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]], how: str = "max_norm"
               ) -> list[float]:
    """Per chunk, how far the executed actions are from the reference's on the same chunk (PushT: pixels).

    how: ``'max_norm'`` the largest distance of an action; ``'mean_norm'`` the mean distance;
    ``'max_abs'`` the largest coordinate difference.
    """
    out = []
    for r, q in zip(records, reference, strict=True):
        d = np.asarray(r["action"], dtype=np.float64) - np.asarray(q["action"], dtype=np.float64)
        if how == "max_abs":
            out.append(float(np.abs(d).max()))
        elif how in ("max_norm", "mean_norm"):
            norm = np.linalg.norm(d, axis=-1)
            out.append(float(norm.max() if how == "max_norm" else norm.mean()))
        else:
            raise ValueError(f"how must be 'max_norm', 'mean_norm' or 'max_abs', got {how!r}")
    return out


def resolve_paradigms(policy: Any, spec: SamplerConfig, observations: Sequence[Any], recalibrate: bool = False,
                      reps: int = 10) -> tuple[SamplerConfig, dict[str, Any]]:
    """``spec`` with its ``window='auto'`` resolved by ``policy``'s own tuner, and how (the tuning info).

    Without ``recalibrate`` the window cache answers where it holds this policy, schedule,
    backend and machine (what ``eval.py`` would run); with it the window is measured now on
    ``observations``. Window 1, the sequential loop, is among the tuner's candidates.
    """
    if recalibrate:
        window, info = policy.calibrate(list(observations), spec, reps=reps)
        return spec.with_options(window=window), info
    resolved = policy.resolve(spec, list(observations))
    return resolved, policy.window_tuning(spec) or {"window": resolved.options["window"]}
