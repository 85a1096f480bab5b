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
* :meth:`StagePipeline.stale_step`: all stages at once, stage ``i`` on stage ``i-1``'s carry from
  the previous call (AsyncDiff's step), handed over through queues.

A runner is ``runner((x, t, condition | None, *skips)) -> (x, *skips)`` over torch tensors
(:class:`~para_policy.models.unet_stages.UnetStage`'s signature).
"""

from __future__ import annotations

import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from para_policy.models.unet_stages import UnetStage, split_unet
from para_policy.onnx_backend import check_exportable, export_graph, make_session

#: ``runner((x, t, condition | None, *skips)) -> (x, *skips)``
StageRunner = Callable[[tuple[Tensor | None, ...]], tuple[Tensor, ...]]
#: the state at each cut: ``carries[i]`` is stage ``i``'s output ``(x, *skips)``
Carries = list[tuple[Tensor, ...]]
STAGE_BACKENDS = ("onnxruntime", "eager", "default")


class StageFailed(RuntimeError):
    """A stage raised in its worker thread; the original exception is the ``__cause__``."""


class EagerStage:
    """A :class:`UnetStage` called in eager PyTorch (holds the GIL between operators: for exactness, fallbacks)."""

    def __init__(self, stage: nn.Module) -> None:
        self.stage = stage

    def __call__(self, inputs: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return tuple(self.stage(*inputs))


class StageGraph(nn.Module):
    """What one stage's ONNX graph computes: positional ``(x, t[, condition], *skips)`` -> ``(x, *skips)``."""

    def __init__(self, stage: UnetStage, conditioned: bool) -> None:
        super().__init__()
        self.stage = stage
        self.conditioned = conditioned

    def forward(self, x: Tensor, t: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        condition = rest[0] if self.conditioned else None
        return tuple(self.stage(x, t, condition, *rest[1 if self.conditioned else 0:]))


class OnnxStage:
    """A :class:`UnetStage` exported to ONNX and run by its own ONNX Runtime session (releases the GIL).

    ``example``: one call's inputs ``(x, t, condition | None, *skips)`` at 2 rows or more (a 1-row
    example would trace the UNet's batch-1 fast path); rows are dynamic. ``threads``: intra-op
    threads of the session (1: the stage keeps to one core, the others are the other stages').
    """

    def __init__(self, stage: UnetStage, example: tuple[Tensor | None, ...], threads: int = 1) -> None:
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
        given = [a for a in inputs if a is not None]
        feeds = {name: a.detach().to(torch.float32).contiguous().numpy()
                 for name, a in zip(self.names, given, strict=True) if name in self.inputs}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))


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


def stage_runners(stages: Sequence[UnetStage], sample_shape: Sequence[int], condition: Tensor | None, *,
                  backend: str = "default", threads: int = 1) -> list[StageRunner]:
    """One runner per stage: ONNX Runtime sessions (exported now) or eager calls.

    ``sample_shape``: ``(T, D)``; ``condition``: one row's conditioning (1, G) or None; the stages'
    example inputs are made by running the chain once on 2 rows.
    """
    backend = stage_backend(stages[0].unet, backend)
    if backend == "eager":
        return [EagerStage(s) for s in stages]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *sample_shape, generator=g)
    t = torch.tensor([3.0, 7.0])
    cond = None if condition is None else condition.detach().float().reshape(1, -1).expand(2, -1).contiguous()
    runners: list[StageRunner] = []
    carry: tuple[Tensor, ...] = (x,)
    for stage in stages:
        example = (carry[0], t, cond, *carry[1:])
        runners.append(OnnxStage(stage, example, threads))
        with torch.inference_mode():
            carry = tuple(t.clone() for t in stage(*example))
    return runners


def _worker(runner: StageRunner, jobs: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
    """A stage's thread: run each job, hand back its result or the exception it raised; None ends it."""
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            results.put((True, runner(job)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
            results.put((False, e))


def _close_workers(workers: list[tuple[threading.Thread, queue.SimpleQueue, queue.SimpleQueue]]) -> None:
    for _, jobs, _ in workers:
        jobs.put(None)
    for thread, _, _ in workers:
        thread.join(timeout=10.0)
    workers.clear()


def _repeat_rows(t: Tensor | None, times: int) -> Tensor | None:
    """``t`` (B, ...) stacked ``times`` times along rows: (times·B, ...) (a stride's several timesteps)."""
    return t if t is None or times == 1 else t.repeat(times, *([1] * (t.dim() - 1)))


class StagePipeline:
    """The stages of one network, the first in the caller's thread, each later one on its own worker thread.

    Args:
        runners: one per stage (:func:`stage_runners`), in network order.
    A denoiser itself (``pipeline(x (N, T, D), t (N,), condition (N, G) | None) -> (N, T, D)``, the
    stages in order), and the staged form :func:`~para_policy.samplers.asyncdiff_sample` looks for
    (:meth:`run_stages`, :meth:`stale_step`). :meth:`close` (or ``with``, or garbage collection)
    ends the worker threads. Calls from several threads at once are not supported.
    """

    def __init__(self, runners: Sequence[StageRunner]) -> None:
        if not runners:
            raise ValueError("a StagePipeline needs at least one stage")
        self.runners = list(runners)
        self.workers: list[tuple[threading.Thread, queue.SimpleQueue, queue.SimpleQueue]] = []
        for i, runner in enumerate(self.runners[1:], start=1):
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            results: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(target=_worker, args=(runner, jobs, results), daemon=True,
                                      name=f"para_policy-stage-{i}")
            thread.start()
            self.workers.append((thread, jobs, results))
        self._finalizer = weakref.finalize(self, _close_workers, self.workers)

    @property
    def num_stages(self) -> int:
        return len(self.runners)

    def close(self) -> None:
        """End the worker threads (joined); later :meth:`stale_step` calls raise. Idempotent."""
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
        :meth:`stale_step` hands to stage ``i+1``.
        """
        t = t.reshape(-1).expand(x.shape[0]).to(torch.float32)
        carries: Carries = []
        carry: tuple[Tensor, ...] = (x,)
        for runner in self.runners:
            carry = runner((carry[0], t, condition, *carry[1:]))
            carries.append(carry)
        return carry[0], carries[:-1]

    def stale_step(self, x: Tensor, ts: Sequence[Tensor], condition: Tensor | None, carries: Carries
                   ) -> tuple[Tensor, Carries]:
        """All stages at once: stage 0 on ``x``, stage ``i`` on ``carries[i-1]`` (the previous call's).

        Args:
            x: (B, T, D) the current sample.
            ts: one timestep tensor per stage: (B,) for all but the last, (r·B,) for the last, which
                then runs its carry once per block of B rows (a stride of r steps).
            condition: (B, G) or None, repeated for the last stage's r blocks.
            carries: the previous :meth:`run_stages` or :meth:`stale_step`'s.
        Returns:
            ``(out (r·B, T, D), carries)``: the last stage's output and this call's carries.
        Raises:
            StageFailed: a worker's stage raised (after every stage of the call has finished).
        """
        if len(carries) != self.num_stages - 1 or len(ts) != self.num_stages:
            raise ValueError(f"stale_step takes {self.num_stages} timestep tensors and {self.num_stages - 1} "
                             f"carries, got {len(ts)} and {len(carries)}")
        if not self._finalizer.alive:
            raise RuntimeError("this StagePipeline is closed")
        B = x.shape[0]
        ts = [t.reshape(-1).to(torch.float32) for t in ts]
        reps = ts[-1].shape[0] // B
        if self.num_stages == 1:
            return self.runners[0]((x.repeat(reps, 1, 1), ts[0], _repeat_rows(condition, reps)))[0], []
        for i, (_, jobs, _) in enumerate(self.workers, start=1):
            n = reps if i == self.num_stages - 1 else 1
            carry = carries[i - 1]
            jobs.put((_repeat_rows(carry[0], n), ts[i], _repeat_rows(condition, n),
                      *(_repeat_rows(s, n) for s in carry[1:])))
        first: tuple[Tensor, ...] | BaseException
        try:
            first = self.runners[0]((x, ts[0].expand(B), condition))
        except BaseException as e:  # collect the workers' results first, so the queues stay in step
            first = e
        outcomes = [results.get() for _, _, results in self.workers]
        if isinstance(first, BaseException):
            raise first
        for i, (ok, value) in enumerate(outcomes, start=1):
            if not ok:
                raise StageFailed(f"stage {i} of {self.num_stages} failed in its worker thread: {value!r}") from value
        outs = [first, *(value for _, value in outcomes)]
        return outs[-1][0], outs[:-1]


def stage_pipeline(model: nn.Module, num_stages: int, sample_shape: Sequence[int], condition: Tensor | None = None,
                   *, backend: str = "default", threads: int = 1, costs: Sequence[float] | None = None,
                   cuts: Sequence[int] | None = None) -> StagePipeline:
    """``model`` (a :class:`~para_policy.models.ConditionalUnet1D`) as a :class:`StagePipeline` of ``num_stages``.

    Cut where the stages balance (:func:`~para_policy.models.unet_stages.split_unet`: ``cuts``, or
    ``costs`` per unit, or each unit timed now on ``sample_shape`` ``(T, D)`` and ``condition``
    (1, G)); run on ``backend`` (:func:`stage_backend`: ``'default'`` is ONNX Runtime where it can,
    one intra-op thread per stage, ``threads``).
    """
    cond = None if condition is None else condition.detach()[:1].float().cpu()
    stages = split_unet(model, num_stages, costs=costs, cuts=cuts, sample_shape=sample_shape, global_cond=cond)
    return StagePipeline(stage_runners(stages, sample_shape, cond, backend=backend, threads=threads))
