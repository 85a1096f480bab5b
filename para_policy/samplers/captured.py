"""Sampling replayed from CUDA graphs: the sequential loop captured whole, a Picard round per graph.

On a GPU the small DiffusionPolicy networks are launch-bound: a model call is a few hundred
short kernels, and an eager Picard round adds its own hundred-odd small operations. A CUDA
graph launches a whole captured sequence at once. Two captures, each the honest form of its
sampler:

* :class:`CapturedSequential`: all S steps of :func:`~para_policy.samplers.sequential_sample`
  in one graph, the baseline a latency-minded GPU user would run (no host involvement at all
  between the chunk's first and last kernel).
* :class:`CapturedPicard`: one fixed-shape round (:func:`~para_policy.samplers.picard.picard_round`
  with ``round_shape='fixed'``: every window slot, model and bookkeeping) per graph; the host
  replays it and reads each sample's window start once per round (the stop test).

A graph reads and writes fixed addresses, so each object owns static buffers made on its
first call; every call builds its inputs as the eager sampler would and copies them in
(:func:`copy_into`), so a replay computes what the eager code computes on the same inputs.
Graphs are keyed by the call's shapes and options and captured on the first call with that
key (capture it before a control loop starts, in the thread that will sample: capturing
while another thread allocates on the device fails). A graph reads the weights at the
addresses they had at capture: pass ``weights_changed`` (e.g.
``para_policy.cuda_graphs.WeightsWatch(model).changed``) and every graph is dropped and
captured again after the weights are replaced or written.

``capture=False`` runs the same static buffers eagerly instead of replaying a graph: the
buffer plumbing, which is what could go wrong here, is then checkable on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from para_policy.samplers.common import (
    Denoiser,
    Inpaint,
    SampleStats,
    apply_inpaint,
    check_inputs,
    check_options,
)
from para_policy.samplers.picard import (
    RoundSetup,
    WindowState,
    initial_window_state,
    make_round_setup,
    picard_round,
    run_rounds,
)
from para_policy.schedule import Schedule, require_single_step


def copy_into(static: Any, fresh: Any) -> None:
    """Copy every tensor of ``fresh`` into the same place in ``static`` (same structure and shapes).

    Walks dataclasses, tuples (NamedTuples included), lists, dicts and plain objects' attributes;
    other values must be equal (they are baked into a captured graph).
    """
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif dataclasses.is_dataclass(static) and not isinstance(static, type):
        for f in dataclasses.fields(static):
            if f.name != "denoiser":
                copy_into(getattr(static, f.name), getattr(fresh, f.name))
    elif isinstance(static, (tuple, list)):
        for s, f in zip(static, fresh, strict=True):
            copy_into(s, f)
    elif isinstance(static, dict):
        for name, value in static.items():
            copy_into(value, fresh[name])
    elif hasattr(static, "__dict__") and not isinstance(static, (Schedule, torch.nn.Module)) and not callable(static):
        for name, value in vars(static).items():
            copy_into(value, getattr(fresh, name))
    elif static is not None and not isinstance(static, (Schedule, torch.nn.Module)) and not callable(static) \
            and static != fresh:
        raise ValueError(f"a captured sampler's constant changed between calls: {static!r} -> {fresh!r}")


def _key(*tensors: torch.Tensor | None, **options: Any) -> tuple:
    """Shapes, dtypes and devices of a call's inputs, and its options: what a graph is specific to."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype, str(t.device)) for t in tensors) + tuple(
        sorted((k, repr(v)) for k, v in options.items()))


class _Graph:
    """``body()`` on static buffers, replayed from a CUDA graph (or called eagerly with ``capture=False``)."""

    def __init__(self, body: Callable[[], Any], device: torch.device, capture: bool) -> None:
        self.body = body
        self.graph = None
        self.out = None
        if capture:
            if device.type != "cuda":
                raise ValueError(f"capture=True needs a CUDA device, the inputs are on {device}; "
                                 "use capture=False to run the static buffers eagerly")
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                body()  # warm-up on a side stream, as torch.cuda.graphs requires (inputs are re-copied after)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = body()

    def __call__(self) -> Any:
        if self.graph is None:
            return self.body()
        self.graph.replay()
        return self.out


class CapturedSequential:
    """:func:`~para_policy.samplers.sequential_sample`, all S steps captured as one CUDA graph.

    Args:
        denoiser: the model call to capture (plain PyTorch: not itself a graph replay).
        schedule: the schedule; ``capture``: False runs the static buffers eagerly (CPU checks).
    Call: ``(x_T (B,T,D), noise (B,S,T,D) | None, condition=None, inpaint=None) -> (sample, stats)``.
    """

    def __init__(self, denoiser: Denoiser, schedule: Schedule, capture: bool = True,
                 weights_changed: Callable[[], bool] | None = None) -> None:
        require_single_step(schedule, "the captured sequential loop")
        self.denoiser, self.schedule, self.capture = denoiser, schedule, capture
        self.weights_changed = weights_changed
        self.graphs: dict[tuple, tuple[_Graph, dict[str, Any]]] = {}

    def _body(self, static: dict[str, Any]) -> Callable[[], torch.Tensor]:
        sched = self.schedule.to(static["x_T"].device)

        def body() -> torch.Tensor:
            x, inpaint, cond = static["x_T"], static["inpaint"], static["condition"]
            steps = static["steps"]
            for k in range(sched.num_steps):
                x = apply_inpaint(x, inpaint, k)
                out = self.denoiser(x, sched.timesteps[steps[k]], cond).to(x.dtype)
                x = sched.step_mean(x, steps[k], out) + sched.noise_std[k] * static["noise"][:, k]
            return apply_inpaint(x, inpaint, None)

        return body

    @torch.inference_mode()
    def __call__(self, x_T: torch.Tensor, noise: torch.Tensor | None = None, *, condition: torch.Tensor | None = None,
                 inpaint: Inpaint | None = None) -> tuple[torch.Tensor, SampleStats]:
        noise = check_inputs(self.schedule, x_T, noise, condition, inpaint)
        B, S = x_T.shape[0], self.schedule.num_steps
        fresh = {"x_T": x_T, "noise": noise, "condition": condition, "inpaint": inpaint,
                 "steps": torch.arange(S, device=x_T.device).repeat_interleave(B).view(S, B)}
        key = _key(x_T, noise, condition, *(inpaint or (None, None)))
        if self.weights_changed is not None and self.weights_changed():
            self.graphs.clear()
        if key not in self.graphs:
            static = {k: _clone(v) for k, v in fresh.items()}
            self.graphs[key] = (_Graph(self._body(static), x_T.device, self.capture), static)
        graph, static = self.graphs[key]
        copy_into(static, fresh)
        sample = graph().clone()
        return sample, SampleStats(rounds=S, model_evals=S * B, converged=torch.ones(B, dtype=torch.bool),
                                   rounds_per_sample=torch.full((B,), S, dtype=torch.long), rows_per_round=[B] * S)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


class CapturedPicard:
    """:func:`~para_policy.samplers.picard_sample` with fixed-shape rounds, each replayed from a CUDA graph.

    One graph per call signature (batch, shapes, inpaint kind): the whole round, the model's
    ``B·W`` rows and the bookkeeping, in one launch; the host reads the window starts once
    per round. Same options as ``picard_sample`` (no accelerator: ParaTAA's ring buffer is not
    captured), same results as its ``round_shape='fixed'``.

    Args:
        denoiser: the model call to capture (plain PyTorch: not itself a graph replay); its
            output is cast to the state's dtype.
        schedule: the schedule; ``capture``: False runs the static buffers eagerly (CPU checks);
        weights_changed: as :class:`CapturedSequential`'s.
    Call: ``(x_T, noise, condition=, inpaint=, init=, init_rows=, deadline_at=) -> (sample, stats)``.
    """

    def __init__(self, denoiser: Denoiser, schedule: Schedule, *, window: int = 16, tolerance: float = 0.1,
                 max_iterations: int | None = None, per_sample_windows: bool = True, linear_solve: bool = False,
                 secant: bool = False, jacobian: torch.Tensor | None = None, capture: bool = True,
                 weights_changed: Callable[[], bool] | None = None) -> None:
        self.max_iterations = check_options(schedule, window, tolerance, max_iterations)
        self.schedule, self.capture = schedule, capture
        self.options = dict(window=window, tolerance=tolerance, per_sample_windows=per_sample_windows,
                            linear_solve=linear_solve, secant=secant)
        self.jacobian = jacobian
        self.weights_changed = weights_changed
        self.denoiser = lambda x, t, c: denoiser(x, t, c).to(x.dtype)
        self.graphs: dict[tuple, tuple[_Graph, RoundSetup, WindowState]] = {}

    def _fresh(self, x_T: torch.Tensor, noise: torch.Tensor, condition: torch.Tensor | None,
               inpaint: Inpaint | None, init: torch.Tensor | None, init_rows: torch.Tensor | None
               ) -> tuple[RoundSetup, WindowState]:
        o = self.options
        setup = make_round_setup(self.denoiser, self.schedule, x_T, noise, o["window"], o["tolerance"], condition,
                                 inpaint, None, o["per_sample_windows"], o["linear_solve"], o["secant"], self.jacobian)
        return setup, initial_window_state(x_T, self.schedule.num_steps, init, init_rows)

    def _graph(self, setup: RoundSetup, state: WindowState, key: tuple) -> tuple[_Graph, RoundSetup, WindowState]:
        if self.weights_changed is not None and self.weights_changed():
            self.graphs.clear()
        if key not in self.graphs:
            keep = {id(setup.denoiser): setup.denoiser, id(setup.schedule): setup.schedule}
            static_setup, static_state = copy.deepcopy(setup, keep), copy.deepcopy(state)
            graph = _Graph(lambda: picard_round(static_setup, static_state, None), state.traj.device, self.capture)
            self.graphs[key] = (graph, static_setup, static_state)
        return self.graphs[key]

    @torch.inference_mode()
    def __call__(self, x_T: torch.Tensor, noise: torch.Tensor | None = None, *, condition: torch.Tensor | None = None,
                 inpaint: Inpaint | None = None, init: torch.Tensor | None = None,
                 init_rows: torch.Tensor | None = None, deadline_at: float | None = None
                 ) -> tuple[torch.Tensor, SampleStats]:
        noise = check_inputs(self.schedule, x_T, noise, condition, inpaint)
        setup, state = self._fresh(x_T, noise, condition, inpaint, init, init_rows)
        levels = None if setup.keep is None else tuple(v for v, _ in setup.keep.levels)
        key = _key(x_T, condition, *(inpaint or (None, None)), init=init is not None, levels=levels)
        graph, static_setup, static_state = self._graph(setup, state, key)
        copy_into(static_setup, setup)
        copy_into(static_state, state)
        sample, stats = run_rounds(static_setup, static_state, lambda setup, state, rows: graph(), True,
                                   self.max_iterations, deadline_at)
        return sample.clone(), stats  # nothing of the static buffers leaves


#: the per-call arguments a captured Picard sampler takes (the rest of a spec's options are baked in)
CALL_OPTIONS = ("init", "init_rows", "deadline_at")


def captured_sampler(spec: Any, schedule: Schedule, denoiser: Denoiser, *, capture: bool = True,
                     weights_changed: Callable[[], bool] | None = None
                     ) -> CapturedSequential | CapturedPicard | None:
    """The captured form of a sampler spec (:class:`~para_policy.samplers.SamplerConfig`), or None if it has none.

    ``sequential`` → :class:`CapturedSequential`; the Picard family with ``round_shape='fixed'``
    (and not ``compile_round``) → :class:`CapturedPicard` with the spec's options. Others
    (compacting rounds, whose row count changes every round; ParaTAA) have no captured form.
    """
    from para_policy.samplers.picard import picard_sample
    from para_policy.samplers.sequential import sequential_sample

    if spec.family.sample is sequential_sample:
        return CapturedSequential(denoiser, schedule, capture=capture, weights_changed=weights_changed)
    o = spec.options
    if spec.family.sample is not picard_sample or o.get("round_shape") != "fixed" or o.get("compile_round"):
        return None
    return CapturedPicard(denoiser, schedule, window=o["window"], tolerance=o["tolerance"],
                          max_iterations=o["max_iterations"], per_sample_windows=o["per_sample_windows"],
                          linear_solve=o["linear_solve"], secant=o["secant"], capture=capture,
                          weights_changed=weights_changed)


def run_captured(sampler: CapturedSequential | CapturedPicard, x_T: torch.Tensor, noise: torch.Tensor | None,
                 condition: torch.Tensor | None, inpaint: Inpaint | None, options: dict[str, Any]
                 ) -> tuple[torch.Tensor, SampleStats]:
    """Call a :func:`captured_sampler` with a plain sampler's arguments (``options``: the spec's and per-call ones)."""
    if isinstance(sampler, CapturedSequential):
        return sampler(x_T, noise, condition=condition, inpaint=inpaint)
    return sampler(x_T, noise, condition=condition, inpaint=inpaint,
                   **{k: options[k] for k in CALL_OPTIONS if options.get(k) is not None})
