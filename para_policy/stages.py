"""The UNet's stages run at once on worker threads: what the AsyncDiff sampler drives.

Why threads and one ONNX Runtime session per stage: at batch 1 on a CPU the whole network
gains nothing from a second core (its layers are too small to split across threads), but two
*stages* of it can run at the same time, one per core, if each stage is one call that releases
the GIL. An ONNX Runtime session's ``run`` does (with one intra-op thread, the stage keeps to its
core); an eager PyTorch stage does not (per-operator Python dispatch holds the GIL), so the eager
runner is the fallback where onnxruntime is missing or the network is not CPU float32, and for
exactness tests.

:class:`StagePipeline` holds one runner per stage (:func:`stage_runners`) and one worker
thread per stage after the first; the first stage runs in the caller's thread. It offers the
two calls the sampler needs:

* :meth:`StagePipeline.run_stages`: the stages one after the other on current inputs (the whole
  network; warm-up steps), returning every cut's state (the *carries*);
* :meth:`StagePipeline.stale_rounds`: AsyncDiff's parallel rounds, stage ``i`` of each round on
  stage ``i-1``'s carry from the round before, streamed from stage to stage through queues;
* :meth:`StagePipeline.step_runner` (ONNX Runtime stages only): the sampler's step after each
  round as one session call (:class:`OnnxStep`).

A runner is ``runner((x, t, condition | None, *skips)) -> (x, *skips)`` over torch tensors
(a stage module's signature, :data:`Stage`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_stages import split_unet
from para_policy.onnx_backend import as_feed, check_exportable, export_graph, make_session
from para_policy.schedule import Schedule

#: a torch tensor or, between ONNX Runtime stages, the numpy array a session returned
Array = Tensor | np.ndarray
#: ``runner((x, t, condition | None, *skips)) -> (x, *skips)``
StageRunner = Callable[[tuple[Tensor | None, ...]], tuple[Tensor, ...]]
#: the state at each cut: ``carries[i]`` is stage ``i``'s output ``(x, *skips)``
Carries = list[tuple[Tensor, ...]]
#: a stage module: :class:`~para_policy.models.unet_stages.UnetStage` or
#: :class:`~para_policy.models.transformer_stages.TransformerStage` (``forward(x, t, condition, *skips)``)
Stage = nn.Module
#: a tensor or an array, kept as it came (:func:`repeat_rows`)
ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)
STAGE_BACKENDS = ("onnxruntime", "eager", "default")


class StageFailed(RuntimeError):
    """A stage raised in its worker thread; the original exception is the ``__cause__``."""


class EagerStage:
    """A :data:`Stage` called in eager PyTorch (holds the GIL between operators: for exactness, fallbacks)."""

    def __init__(self, stage: nn.Module) -> None:
        self.stage = stage

    def __call__(self, inputs: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return tuple(self.stage(*inputs))


class StageGraph(nn.Module):
    """What one stage's ONNX graph computes: positional ``(x, t[, condition], *skips)`` -> ``(x, *skips)``."""

    def __init__(self, stage: Stage, conditioned: bool) -> None:
        super().__init__()
        self.stage = stage
        self.conditioned = conditioned

    def forward(self, x: Tensor, t: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        condition = rest[0] if self.conditioned else None
        return tuple(self.stage(x, t, condition, *rest[1 if self.conditioned else 0:]))


class OnnxStage:
    """A :data:`Stage` exported to ONNX and run by its own ONNX Runtime session (releases the GIL).

    ``example``: one call's inputs ``(x, t, condition | None, *skips)`` at 2 rows or more (a 1-row
    example would trace the UNet's batch-1 fast path); rows are dynamic. ``threads``: intra-op
    threads of the session (1: the stage keeps to one core, the others are the other stages').
    """

    def __init__(self, stage: Stage, example: tuple[Tensor | None, ...], threads: int = 1) -> None:
        check_exportable(stage)
        conditioned = example[2] is not None
        args = tuple(a for a in example if a is not None)
        names = ["x", "t", *(["condition"] if conditioned else []), *(f"skip{i}" for i in range(stage.skips_in))]
        outputs = ["out", *(f"skip{i}" + "_out" for i in range(stage.skips_out))]
        graph = StageGraph(stage, conditioned).eval()
        training = stage.training
        with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
            warnings.simplefilter("ignore")  # tracer warnings about the shape checks
            try:
                onnx = export_graph(graph, args, names, outputs)
            finally:
                stage.train(training)
        self.stage = stage
        self.session = make_session(onnx, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]  # an unused input may be dropped by the exporter
        self.names = names

    def __call__(self, inputs: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(o) for o in self.run_arrays(inputs))

    def run_arrays(self, inputs: tuple[Array | None, ...]) -> list[np.ndarray]:
        """The stage on tensors or numpy arrays, returning the session's numpy outputs: what the streamed
        rounds hand from stage to stage (no torch call, so no GIL hand-over, between two sessions)."""
        given = [a for a in inputs if a is not None]
        feeds = {name: as_feed(a) for name, a in zip(self.names, given, strict=True) if name in self.inputs}
        return self.session.run(None, feeds)


class StepGraph(nn.Module):
    """The sampler's step after a streamed round as one graph: ``(x, out, prev, z, k) -> x_next`` (all (B, T, D)
    but ``k`` (B,), the step index).

    ``x_next = step_mean(x, k, ε̂) + σ_k z`` with ``ε̂ = out + lag (out − prev)`` (``lag`` 0: ``out``), made
    by :meth:`~para_policy.schedule.Schedule.step_mean` itself on the schedule's coefficient table, so
    it is the step :func:`~para_policy.samplers.sequential.schedule_step` takes (order-1 schedules).
    """

    def __init__(self, schedule: Schedule, lag: int) -> None:
        super().__init__()
        self.schedule, self.lag = schedule, lag

    def forward(self, x: Tensor, out: Tensor, prev: Tensor, z: Tensor, k: Tensor) -> Tensor:
        served = out + self.lag * (out - prev) if self.lag else out
        return self.schedule.step_mean(x, k, served) + self.schedule.noise_std[k].view(-1, 1, 1) * z


class OnnxStep:
    """:class:`StepGraph` exported to ONNX and run by its own ONNX Runtime session (one intra-op thread).

    Why: in the streamed rounds the caller's step (about twenty small torch operations) runs while
    the stage worker runs its own Python between sessions, and every torch operation hands the GIL
    over; one session call takes the GIL once. ``sample_shape``: ``(T, D)``.
    """

    def __init__(self, schedule: Schedule, lag: int, sample_shape: Sequence[int]) -> None:
        g = torch.Generator().manual_seed(0)
        x, out, prev, z = (torch.randn(2, *sample_shape, generator=g) for _ in range(4))
        names = ["x", "out", "prev", "z", "k"]
        with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
            warnings.simplefilter("ignore")
            graph = export_graph(StepGraph(schedule, lag).eval(), (x, out, prev, z, torch.tensor([3, 7])), names,
                                 ["x_next"])
        self.session = make_session(graph, 1)
        self.inputs = {i.name for i in self.session.get_inputs()}  # prev is dropped when lag is 0

    def __call__(self, x: Array, out: Array, prev: Array, noise: Array, k: int) -> np.ndarray:
        """``x_next`` (B, T, D), a numpy array, after step ``k`` from ``x``, the round's output ``out``, the round
        before's ``prev``, and the per-step noise ``noise`` (B, S, T, D) (indexed here, in numpy: a torch call
        would pass the GIL); tensors or the stages' numpy arrays."""
        feeds = {"x": as_feed(x), "out": as_feed(out), "prev": as_feed(prev), "z": as_feed(noise)[:, k],
                 "k": np.full(x.shape[0], k, dtype=np.int64)}
        return self.session.run(None, {n: v for n, v in feeds.items() if n in self.inputs})[0]


def stage_backend(model: nn.Module, backend: str = "default") -> str:
    """``'onnxruntime'`` or ``'eager'``: what ``backend='default'`` runs the stages on (ONNX Runtime where it can)."""
    if backend not in STAGE_BACKENDS:
        raise ValueError(f"stage backend must be one of {list(STAGE_BACKENDS)}, got {backend!r}")
    if backend != "default":
        return backend
    try:
        check_exportable(model)
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except (ValueError, ImportError):
        return "eager"
    return "onnxruntime"


def stage_examples(stages: Sequence[Stage], sample_shape: Sequence[int], condition: Tensor | None
                   ) -> list[tuple[Tensor | None, ...]]:
    """Each stage's example inputs ``(x, t, condition | None, *skips)`` at 2 rows (what ONNX export traces).

    The chain run once on a seeded (2, T, D) sample at timesteps (3, 7); ``condition``: one row's
    (1, ...) or None. Two rows, not one: a 1-row example would trace the UNet's batch-1 fast path.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *sample_shape, generator=g)
    t = torch.tensor([3.0, 7.0])
    cond = None if condition is None else condition.detach().float().cpu()[:1].expand(2, *condition.shape[1:])
    examples: list[tuple[Tensor | None, ...]] = []
    carry: tuple[Tensor, ...] = (x,)
    for stage in stages:
        examples.append((carry[0], t, None if cond is None else cond.contiguous(), *carry[1:]))
        with torch.inference_mode():
            carry = tuple(c.clone() for c in stage(*examples[-1]))
    return examples


def stage_runners(stages: Sequence[Stage], sample_shape: Sequence[int], condition: Tensor | None, *,
                  backend: str = "default", threads: int = 1) -> list[StageRunner]:
    """One runner per stage: ONNX Runtime sessions (exported now, on :func:`stage_examples`) or eager calls.

    ``sample_shape``: ``(T, D)``; ``condition``: one row's conditioning (1, ...) or None.
    """
    if stage_backend(stages[0].network, backend) == "eager":
        return [EagerStage(s) for s in stages]
    return [OnnxStage(stage, example, threads)
            for stage, example in zip(stages, stage_examples(stages, sample_shape, condition), strict=True)]


def _worker(runner: StageRunner, jobs: queue.SimpleQueue, deliver: Callable[[int, int, bool, Any], None]) -> None:
    """A stage's thread: run each job ``(call, round, inputs)`` and deliver its result or exception; None ends it."""
    while True:
        job = jobs.get()
        if job is None:
            return
        call, j, inputs = job
        try:
            out, ok = runner(inputs), True
        except BaseException as e:  # noqa: BLE001 - delivered to the caller, who raises it
            out, ok = e, False
        deliver(call, j, ok, out)


def _deliverer(pipeline: weakref.ref, i: int) -> Callable[[int, int, bool, Any], None]:
    """Stage ``i``'s worker's ``deliver``, holding its pipeline weakly: a pipeline nobody holds is
    collected (its finalizer ends the workers) even while they wait for jobs."""
    def deliver(call: int, j: int, ok: bool, value: Any) -> None:
        owner = pipeline()
        if owner is not None:
            owner._deliver(i, call, j, ok, value)

    return deliver


def _close_workers(workers: list[tuple[threading.Thread, queue.SimpleQueue]]) -> None:
    for _, jobs in workers:
        jobs.put(None)
    for thread, _ in workers:
        thread.join(timeout=10.0)
    workers.clear()


def repeat_rows(t: ArrayT | None, times: int) -> ArrayT | None:
    """``t`` (B, ...) stacked ``times`` times along rows: (times·B, ...) (a stride's several timesteps)."""
    if t is None or times == 1:
        return t
    if isinstance(t, np.ndarray):
        return np.tile(t, (times, *([1] * (t.ndim - 1))))
    return t.repeat(times, *([1] * (t.dim() - 1)))


#: anything with ``close()`` that :func:`cached_pipeline` keeps (a pipeline, a patch runner)
Closable = TypeVar("Closable", bound="SupportsClose")


class SupportsClose(Protocol):
    def close(self) -> None: ...


#: ``advance(j, out (r·B, T, D)) -> x (B, T, D) | None``: the caller's steps of round ``j``, returning
#: stage 0's input for round ``j + 1`` (None after the last round); numpy arrays between ONNX Runtime stages
Advance = Callable[[int, Array], Array | None]


class StagePipeline:
    """The stages of one network, the first in the caller's thread, each later one on its own worker thread.

    Args:
        runners: one per stage (:func:`stage_runners`), in network order.
        time_in_every_stage: whether every stage embeds the timestep it is given (the UNet's do;
            a transformer's later stages read it from the carried memory): what a stride needs.
    A denoiser itself (``pipeline(x (N, T, D), t (N,), condition (N, G) | None) -> (N, T, D)``, the
    stages in order), and the staged form :func:`~para_policy.samplers.asyncdiff_sample` looks for
    (:meth:`run_stages`, :meth:`stale_rounds`). :meth:`close` (or ``with``, or garbage collection)
    ends the worker threads. Calls from several threads at once are not supported.

    Why the rounds are streamed, not run in lock step: round ``j+1``'s stage ``i`` needs only
    stage ``i-1``'s output of round ``j``, so each stage hands its output straight to the next
    stage's queue and that stage starts as soon as it is free, while the caller, once it has run
    stage 0, waits only for the last stage and steps the sample. The caller's step then overlaps
    the workers' next stage instead of following a barrier, and a worker finds its next job queued
    (no wake-up). The arithmetic is that of lock-step rounds, so the results are the same.
    """

    def __init__(self, runners: Sequence[StageRunner], *, time_in_every_stage: bool = True) -> None:
        if not runners:
            raise ValueError("a StagePipeline needs at least one stage")
        self.runners = list(runners)
        self.time_in_every_stage = time_in_every_stage
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.workers: list[tuple[threading.Thread, queue.SimpleQueue]] = []
        self._calls = itertools.count()
        #: the call being streamed: (call id, rounds' timesteps, condition); None between calls
        self._active: tuple[int, Sequence[Sequence[Array]], Array | None] | None = None
        #: ONNX Runtime stages only: the streamed rounds pass the sessions' numpy arrays on as they are
        self.arrays = all(isinstance(r, OnnxStage) for r in self.runners)
        for i, runner in enumerate(self.runners[1:], start=1):
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            run = runner.run_arrays if self.arrays else runner
            thread = threading.Thread(target=_worker, args=(run, jobs, _deliverer(weakref.ref(self), i)),
                                      daemon=True, name=f"para_policy-stage-{i}")
            thread.start()
            self.workers.append((thread, jobs))
        self._finalizer = weakref.finalize(self, _close_workers, self.workers)

    @property
    def num_stages(self) -> int:
        return len(self.runners)

    def close(self) -> None:
        """End the worker threads (joined); later :meth:`stale_rounds` calls raise. Idempotent."""
        self._finalizer()

    def __enter__(self) -> StagePipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __call__(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.run_stages(x, t, condition)[0]

    def run_stages(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Carries]:
        """The stages one after the other in this thread on current inputs: ``(out (N, T, D), carries)``.

        ``carries[i]``: stage ``i``'s output ``(x, *skips)`` (N−1 of them), which the next
        :meth:`stale_rounds` hands to stage ``i+1``.
        """
        t = t.reshape(-1).expand(x.shape[0]).to(torch.float32)
        carries: Carries = []
        carry: tuple[Tensor, ...] = (x,)
        for runner in self.runners:
            carry = runner((carry[0], t, condition, *carry[1:]))
            carries.append(carry)
        return carry[0], carries[:-1]

    def step_runner(self, schedule: Schedule, lag: int, sample_shape: Sequence[int]
                    ) -> Callable[..., np.ndarray] | None:
        """The step after each streamed round as one ONNX Runtime call (:class:`OnnxStep`), kept per schedule and
        ``lag``; None where a stage is not an ONNX Runtime session, or the schedule is multistep (its step
        reads earlier steps' predictions) or not on the CPU.
        """
        if schedule.order != 1 or schedule.timesteps.device.type != "cpu" or not self.arrays:
            return None
        table = torch.cat([*(c.flatten() for c in schedule.coeffs.values()), schedule.noise_std])
        key = (schedule.kind, schedule.prediction_type, schedule.clip_sample, schedule.clip_sample_range, lag,
               tuple(sample_shape), table.numpy().tobytes())
        steps = vars(self).setdefault("_steps", {})
        if key not in steps:
            steps[key] = OnnxStep(schedule, lag, sample_shape)
        return steps[key]

    def stale_rounds(self, x: Tensor, rounds: Sequence[Sequence[Tensor]], condition: Tensor | None,
                     carries: Carries, advance: Advance) -> Carries:
        """AsyncDiff's parallel rounds: in round ``j`` stage 0 runs on the current sample and stage ``i``
        on stage ``i-1``'s output of round ``j-1`` (of the given ``carries`` in round 0), streamed
        (class docstring).

        Args:
            x: (B, T, D) stage 0's input in round 0.
            rounds: per round, one float32 timestep tensor per stage: (B,) for all but the last,
                (r·B,) for the last, which then runs its input once per block of B rows (a stride
                of r steps).
            condition: (B, G) or None, repeated for the last stage's r blocks.
            carries: what :meth:`run_stages` (or the previous call) returned.
            advance: ``advance(j, out (r·B, T, D))`` takes round ``j``'s last-stage output and
                returns stage 0's input for round ``j+1`` (:data:`Advance`); called in this thread.
                With ONNX Runtime stages (:attr:`arrays`) ``out`` is the session's numpy array, and the
                rounds run on numpy arrays throughout: a torch call in the loop hands the GIL to the
                worker thread and back.
        Returns:
            the last round's carries, as :meth:`run_stages` returns them.
        Raises:
            StageFailed: a worker's stage raised (what it was running when this call stopped is
                left to finish and dropped; the pipeline stays usable).
        """
        N = self.num_stages
        if len(carries) != N - 1 or any(len(ts) != N for ts in rounds):
            raise ValueError(f"stale_rounds takes {N} timestep tensors per round and {N - 1} carries, got "
                             f"{sorted({len(ts) for ts in rounds})} and {len(carries)}")
        if not self._finalizer.alive:
            raise RuntimeError("this StagePipeline is closed")
        if N == 1:
            for j, (t,) in enumerate(rounds):
                reps = t.shape[0] // x.shape[0]
                x = advance(j, self.runners[0]((repeat_rows(x, reps), t, repeat_rows(condition, reps)))[0])
            return []
        if self.arrays:  # converted once, before the loop
            x, condition = as_feed(x), None if condition is None else as_feed(condition)
            rounds = [[as_feed(t) for t in ts] for ts in rounds]
            carries = [tuple(as_feed(c) for c in carry) for carry in carries]
        call = next(self._calls)
        self._active = (call, rounds, condition)
        try:
            # last stage first: stage i's round-0 job must be queued before stage i-1 can hand it round 1
            for i in range(N - 1, 0, -1):
                self._submit(i, call, 0, carries[i - 1])
            final = self._stream(call, x, rounds, condition, advance)
        finally:
            self._active = None
        return [tuple(torch.as_tensor(c) for c in carry) for carry in final]

    def _stream(self, call: int, x: Array, rounds: Sequence[Sequence[Array]], condition: Array | None,
                advance: Advance) -> list[tuple[Array, ...]]:
        """:meth:`stale_rounds`' loop in the caller's thread: stage 0, hand on, await the last stage, step."""
        N, J = self.num_stages, len(rounds)
        first = self.runners[0].run_arrays if self.arrays else self.runners[0]  # type: ignore[attr-defined]
        final: list[tuple[Array, ...] | None] = [None] * (N - 1)
        for j in range(J):
            carry = first((x, rounds[j][0], condition))
            if j + 1 < J:
                self._submit(1, call, j + 1, carry)
            else:
                final[0] = carry
            out: Tensor | None = None
            while out is None or (j + 1 == J and any(c is None for c in final)):
                c, i, jj, ok, value = self.results.get()
                if c != call:
                    continue  # a result of a call that stopped at an error
                if not ok:
                    raise StageFailed(f"stage {i} of {N} failed in its worker thread: {value!r}") from value
                if i == N - 1 and jj == j:
                    out = value[0]
                else:
                    final[i] = value
            x = advance(j, out)
        return [c for c in final if c is not None]

    def _submit(self, i: int, call: int, j: int, carry: Sequence[Array]) -> None:
        """Queue stage ``i`` of round ``j`` of call ``call`` on ``carry`` (stage ``i-1``'s output)."""
        active = self._active
        if active is None or active[0] != call:
            return
        ts, condition = active[1][j][i], active[2]
        n = ts.shape[0] // carry[0].shape[0] if i == self.num_stages - 1 else 1
        self.workers[i - 1][1].put((call, j, (repeat_rows(carry[0], n), ts, repeat_rows(condition, n),
                                              *(repeat_rows(s, n) for s in carry[1:]))))

    def _deliver(self, i: int, call: int, j: int, ok: bool, value: Any) -> None:
        """Stage ``i``'s worker is done with round ``j``: the output to the caller (last stage, last round,
        error), the carry on to stage ``i+1``'s round ``j+1``."""
        active = self._active
        if active is None or active[0] != call:
            return
        last_round = j + 1 == len(active[1])
        if not ok or i == self.num_stages - 1 or last_round:
            self.results.put((call, i, j, ok, value))
        if ok and i < self.num_stages - 1 and not last_round:
            self._submit(i + 1, call, j + 1, value)

    def stale_step(self, x: Tensor, ts: Sequence[Tensor], condition: Tensor | None, carries: Carries
                   ) -> tuple[Tensor, Carries]:
        """One round of :meth:`stale_rounds`: ``(out (r·B, T, D), carries)``; ``ts`` as one round's timesteps."""
        outs: list[Tensor] = []

        def keep(j: int, out: Array) -> None:
            outs.append(torch.as_tensor(out))

        carries = self.stale_rounds(x, [[t.reshape(-1).to(torch.float32) for t in ts]], condition, carries, keep)
        return outs[0], carries


def cached_pipeline(cache: dict[int, tuple[Any, Closable]], num_stages: int, identity: Any,
                    build: Callable[[], Closable]) -> Closable:
    """``cache[num_stages]``'s pipeline while it was built for ``identity``, else ``build()`` (the old one closed).

    Why: a pipeline (a :class:`StagePipeline`, a patch runner) holds worker threads and sessions
    exported from one network's weights, device, dtype and call shapes (what ``identity`` stands
    for), so it is built once per worker count and again only when those change.
    """
    entry = cache.get(num_stages)
    if entry is None or entry[0] != identity:
        if entry is not None:
            entry[1].close()
        entry = cache[num_stages] = (identity, build())
    return entry[1]


def split_network(model: nn.Module, num_stages: int, *, costs: Sequence[float] | None = None,
                  cuts: Sequence[int] | None = None, sample_shape: Sequence[int] | None = None,
                  condition: Tensor | None = None) -> list[Stage]:
    """``model`` cut into ``num_stages`` stages: :func:`~para_policy.models.unet_stages.split_unet` for a
    ConditionalUnet1D, :func:`~para_policy.models.transformer_stages.split_transformer` for a
    TransformerForDiffusion (``condition``: its ``global_cond`` (1, G) or ``cond`` tokens (1, To, Dc))."""
    from para_policy.models.transformer import TransformerForDiffusion
    from para_policy.models.transformer_stages import split_transformer

    if isinstance(model, TransformerForDiffusion):
        return list(split_transformer(model, num_stages, costs=costs, cuts=cuts, sample_shape=sample_shape,
                                      cond=condition))
    if not isinstance(model, ConditionalUnet1D):
        raise TypeError(f"the asyncdiff stages cut a ConditionalUnet1D or a TransformerForDiffusion, "
                        f"got {type(model).__name__}")
    return list(split_unet(model, num_stages, costs=costs, cuts=cuts, sample_shape=sample_shape,
                           global_cond=condition))


def stage_pipeline(model: nn.Module, num_stages: int, sample_shape: Sequence[int], condition: Tensor | None = None,
                   *, backend: str = "default", threads: int = 1, costs: Sequence[float] | None = None,
                   cuts: Sequence[int] | None = None) -> StagePipeline:
    """``model`` (a ConditionalUnet1D or a TransformerForDiffusion) as a :class:`StagePipeline` of ``num_stages``.

    Cut where the stages balance (:func:`split_network`: ``cuts``, or ``costs`` per unit, or each
    unit timed now on ``sample_shape`` ``(T, D)`` and ``condition`` (1, ...)); run on ``backend``
    (:func:`stage_backend`: ``'default'`` is ONNX Runtime where it can, one intra-op thread per
    stage, ``threads``).
    """
    cond = None if condition is None else condition.detach()[:1].float().cpu()
    stages = split_network(model, num_stages, costs=costs, cuts=cuts, sample_shape=sample_shape, condition=cond)
    return StagePipeline(stage_runners(stages, sample_shape, cond, backend=backend, threads=threads),
                         time_in_every_stage=all(s.reads_time for s in stages))
