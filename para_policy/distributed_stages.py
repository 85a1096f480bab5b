"""The UNet's stages in worker *processes*, handing over through ``torch.distributed`` send/recv.

Why processes: :class:`~para_policy.stages.StagePipeline` runs its later stages on threads, which
overlap only where a stage's call releases the GIL (an ONNX Runtime session's ``run``). An eager
PyTorch stage holds the GIL between operators, so eager stages on threads take turns; in separate
processes they run at once. On several GPUs one process per device is also the usual layout.

:class:`DistributedStagePipeline` has :class:`~para_policy.stages.StagePipeline`'s interface and
semantics (``run_stages``, ``stale_rounds``, ``stale_step``, ``__call__``, ``close``, ``with``, ``num_stages``), so the
AsyncDiff sampler takes either. Rank 0 is the caller: it runs stage 0 in its own thread and does
all the hand-offs (every carry goes through rank 0, as with the thread pipeline). Ranks 1 … N-1
are worker processes (``spawn``), each holding one stage's runner: ``EagerStage`` with one torch
thread, or an ``OnnxStage`` session with one intra-op thread, exported in the worker.

The process group is private: a ``TCPStore`` on 127.0.0.1 at a free port and a
``ProcessGroupGloo`` (or ``ProcessGroupNCCL``) built on it directly, so a default process group the
caller may have (torchrun, Ray) is neither needed nor touched.

A message is two sends: a fixed int64 header ``[kind, dtype code, payload elements, items, then per
item its ndim (-1 for None) and shape]`` and, when it has elements, one flat payload of every item
concatenated in the header's dtype (the first item's). Kinds: a job (stage inputs
``(x, t, condition | None, *skips)``), a result (``(x, *skips)``), an error (the worker's traceback
as UTF-8 bytes) and close.

NCCL (``comm='nccl'``, one CUDA ``device`` per stage) is written the simple way (headers and
payloads on each rank's device, ``torch.cuda.set_device`` per worker) and has not been run: it
needs GPUs this code was not tested on. Gloo works on CPU tensors only.
"""

from __future__ import annotations

import datetime
import io
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch import Tensor, nn

from para_policy.stages import (
    Carries,
    EagerStage,
    OnnxStage,
    StageFailed,
    StageRunner,
    repeat_rows,
    split_network,
    stage_backend,
    stage_examples,
)

__all__ = ["DistributedStagePipeline", "distributed_stage_pipeline"]

HEADER_LEN = 64
JOB, RESULT, ERROR, CLOSE = 1, 2, 3, 4
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8)
_HEADER_TAG, _PAYLOAD_TAG = 0, 1
#: how long an idle worker waits for its next message (its caller's death ends the wait sooner)
_IDLE_WAIT = datetime.timedelta(days=365)

Inputs = tuple[Tensor | None, ...]


# --- messages -------------------------------------------------------------------------------------

def _encode(kind: int, items: Sequence[Tensor | None], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """``(header (HEADER_LEN,) int64, payload (n,) | None)`` on ``device`` (module docstring)."""
    present = [a for a in items if a is not None]
    dtype = present[0].dtype if present else torch.float32
    if dtype not in _DTYPES:
        raise TypeError(f"cannot send {dtype} tensors (one of {_DTYPES})")
    fields = [kind, _DTYPES.index(dtype), sum(a.numel() for a in present), len(items)]
    for a in items:
        fields += [-1] if a is None else [a.dim(), *a.shape]
    if len(fields) > HEADER_LEN:
        raise ValueError(f"a message of {len(items)} tensors needs a header of {len(fields)} > {HEADER_LEN} fields")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[:len(fields)] = torch.tensor(fields, dtype=torch.int64)
    payload = None
    if fields[2]:
        payload = torch.cat([a.detach().to(device=device, dtype=dtype).reshape(-1) for a in present])
    return header.to(device), payload


def _decode_items(fields: list[int], payload: Tensor | None) -> list[Tensor | None]:
    """The items a header describes, as views of ``payload``."""
    items: list[Tensor | None] = []
    pos, offset = 4, 0
    for _ in range(fields[3]):
        ndim = fields[pos]
        if ndim < 0:
            items.append(None)
            pos += 1
            continue
        shape = fields[pos + 1: pos + 1 + ndim]
        pos += 1 + ndim
        n = 1
        for s in shape:
            n *= s
        assert payload is not None
        items.append(payload[offset: offset + n].view(shape))
        offset += n
    return items


def _send(pg: Any, dst: int, kind: int, items: Sequence[Tensor | None], device: torch.device) -> list[Any]:
    """Post one message to ``dst``; returns the send works (wait on them before reusing the buffers)."""
    return _post(pg, dst, *_encode(kind, items, device))


def _post(pg: Any, dst: int, header: Tensor, payload: Tensor | None) -> list[Any]:
    """Post an encoded message to ``dst``: the send works."""
    works = [pg.send([header], dst, _HEADER_TAG)]
    if payload is not None:
        works.append(pg.send([payload], dst, _PAYLOAD_TAG))
    return works


def _recv(pg: Any, src: int, device: torch.device, timeout: datetime.timedelta) -> tuple[int, list[Tensor | None]]:
    """One message from ``src``: ``(kind, items)``; raises where none comes within ``timeout``."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    pg.recv([header], src, _HEADER_TAG).wait(timeout)
    fields = header.tolist()
    payload = None
    if fields[2]:
        payload = torch.empty(fields[2], dtype=_DTYPES[fields[1]], device=device)
        pg.recv([payload], src, _PAYLOAD_TAG).wait(timeout)
    return fields[0], _decode_items(fields, payload)


def _error_items(text: str) -> list[Tensor | None]:
    return [torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)]


def _error_text(items: list[Tensor | None]) -> str:
    return bytes(items[0].cpu().numpy()).decode(errors="replace") if items and items[0] is not None else ""


# --- process group and worker ---------------------------------------------------------------------

def _make_group(store: Any, rank: int, world: int, comm: str, device: torch.device,
                timeout: datetime.timedelta) -> Any:
    """This pipeline's own process group (not registered as, nor needing, the default group)."""
    prefixed = dist.PrefixStore(f"para_policy/{comm}/", store)
    if comm == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._threads = 1
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        return dist.ProcessGroupGloo(prefixed, rank, world, options)
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None:
        raise RuntimeError("comm='nccl' needs a CUDA build of torch with NCCL")
    torch.cuda.set_device(device)
    options = nccl.Options()
    options._timeout = timeout
    return nccl(prefixed, rank, world, options)


def _make_runner(stage: nn.Module, example: Inputs | None, backend: str, device: torch.device) -> StageRunner:
    if backend == "onnxruntime":
        if example is None:
            raise ValueError("backend='onnxruntime' needs the stage's example inputs (stage_examples)")
        return OnnxStage(stage, example, threads=1)
    return EagerStage(stage.to(device))


def _serve(pg: Any, runner: StageRunner, device: torch.device) -> None:
    """A worker's loop: run each job and send back its result, or the traceback it raised; close ends it."""
    while True:
        kind, items = _recv(pg, 0, device, _IDLE_WAIT)
        if kind == CLOSE:
            return
        try:
            header_kind, out = RESULT, list(runner(tuple(items)))
            _encode(RESULT, out, device)  # fails here, not half-sent, where it cannot be sent
        except Exception:  # noqa: BLE001 - sent to the caller, who raises StageFailed
            header_kind, out = ERROR, _error_items(traceback.format_exc())
        for work in _send(pg, 0, header_kind, out, device):
            work.wait(_IDLE_WAIT)


def _worker_main(rank: int, world: int, port: int, blob: bytes, backend: str, comm: str, device: str,
                 timeout_s: float) -> None:
    """A worker process: build the stage's runner, report ready (or the error) in the store, then serve."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dev = torch.device(device)
    try:
        stage, example = torch.load(io.BytesIO(blob), weights_only=False)  # our own bytes, from our parent
        runner = _make_runner(stage, example, backend, dev)
    except BaseException:  # noqa: BLE001 - reported to the caller
        store.set(f"ready/{rank}", "error\n" + traceback.format_exc())
        return
    store.set(f"ready/{rank}", "ok")
    pg = _make_group(store, rank, world, comm, dev, timeout)
    try:
        _serve(pg, runner, dev)
    except RuntimeError:
        return  # the caller went away (connection closed): nothing left to serve


# --- the caller's side ----------------------------------------------------------------------------

@dataclass
class _Workers:
    """What :func:`_shutdown` needs (no reference to the pipeline itself, for ``weakref.finalize``)."""

    procs: list[Any] = field(default_factory=list)
    store: Any = None
    pg: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    healthy: bool = True


def _shutdown(workers: _Workers, join_s: float = 5.0) -> None:
    """Ask each worker to stop (when the group still works) and join; terminate, then kill, what is left."""
    asked = workers.pg is not None and workers.healthy
    if asked:
        try:
            works = [w for rank in range(1, len(workers.procs) + 1)
                     for w in _send(workers.pg, rank, CLOSE, [], workers.device)]
            for work in works:
                work.wait(datetime.timedelta(seconds=join_s))
        except RuntimeError:
            pass
    deadline = time.monotonic() + (join_s if asked else 0.0)  # not asked: terminate at once
    for proc in workers.procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for stop in ("terminate", "kill"):
        alive = [p for p in workers.procs if p.is_alive()]
        for proc in alive:
            getattr(proc, stop)()
        for proc in alive:
            proc.join(timeout=1.0)
    for proc in workers.procs:
        if not proc.is_alive():
            proc.close()
    workers.procs.clear()
    workers.pg = workers.store = None
    workers.healthy = False


def _await_ready(workers: _Workers, deadline: float) -> None:
    """Wait until every worker has built its runner; raise StageFailed with a worker's error or death."""
    pending = dict(enumerate(workers.procs, start=1))
    while pending:
        for rank, proc in list(pending.items()):
            key = f"ready/{rank}"
            if workers.store.check([key]):
                status = workers.store.get(key).decode()
                if status != "ok":
                    raise StageFailed(f"stage {rank} failed to start in its worker process:\n{status[6:]}")
                del pending[rank]
            elif not proc.is_alive():
                raise StageFailed(f"stage {rank}'s worker process exited (code {proc.exitcode}) before it was ready")
        if pending and time.monotonic() > deadline:
            raise StageFailed(f"stages {sorted(pending)} were not ready in time")
        time.sleep(0.005)


def _start_workers(stages: Sequence[nn.Module], examples: Sequence[Inputs] | None, backend: str, comm: str,
                   devices: Sequence[torch.device], timeout_s: float) -> _Workers:
    """Spawn one process per stage after the first and build the group with them (rank 0: this one)."""
    world = len(stages)
    timeout = datetime.timedelta(seconds=timeout_s)
    workers = _Workers(device=devices[0])
    workers.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
    ctx = torch_mp.get_context("spawn")
    try:
        for rank in range(1, world):
            buffer = io.BytesIO()  # plain bytes: sharing the caller's weights through shared memory is not wanted
            torch.save((stages[rank], None if examples is None else examples[rank]), buffer)
            proc = ctx.Process(target=_worker_main, daemon=True, name=f"para_policy-stage-{rank}",
                               args=(rank, world, workers.store.port, buffer.getvalue(), backend, comm,
                                     str(devices[rank]), timeout_s))
            proc.start()
            workers.procs.append(proc)
        _await_ready(workers, time.monotonic() + timeout_s)
        workers.pg = _make_group(workers.store, 0, world, comm, devices[0], timeout)
    except BaseException:
        workers.healthy = False
        _shutdown(workers, join_s=1.0)
        raise
    return workers


class DistributedStagePipeline:
    """The stages of one network, the first in the caller's thread, each later one in its own process.

    Args:
        stages: the network's stages in order (:func:`~para_policy.models.unet_stages.split_unet`):
            modules ``(x, t, condition | None, *skips) -> (x, *skips)``, picklable (each worker gets
            a copy, made now: later changes to the caller's weights do not reach the workers).
        examples: each stage's example inputs (:func:`stage_examples`); needed by
            ``backend='onnxruntime'`` (the export traces them), unused by ``'eager'``.
        backend: ``'eager'``, ``'onnxruntime'`` or ``'default'`` (:func:`~para_policy.stages.stage_backend`).
        comm: ``'gloo'`` (CPU) or ``'nccl'`` (CUDA ``devices``; untested, module docstring).
        devices: one per stage (default all CPU); a worker moves its copy of the stage there.
        timeout: seconds to wait for the workers to start, and for any one answer of a worker.

    A denoiser itself (``pipeline(x (N, T, D), t (N,), condition (N, G) | None) -> (N, T, D)``) and
    the staged form :func:`~para_policy.samplers.asyncdiff_sample` takes (:meth:`run_stages`,
    :meth:`stale_rounds`, :meth:`stale_step`), as :class:`~para_policy.stages.StagePipeline`. A stage that raises in its
    worker surfaces as :class:`~para_policy.stages.StageFailed` carrying the worker's traceback as
    text, and the pipeline stays usable. A worker that dies or does not answer within ``timeout``
    also raises :class:`StageFailed`, and then the pipeline is closed. :meth:`close` (or ``with``,
    or garbage collection) ends every worker process. Calls from several threads at once are not
    supported.
    """

    def __init__(self, stages: Sequence[nn.Module], examples: Sequence[Inputs] | None = None, *,
                 backend: str = "eager", comm: str = "gloo",
                 devices: Sequence[str | torch.device] | None = None, timeout: float = 60.0) -> None:
        if not stages:
            raise ValueError("a DistributedStagePipeline needs at least one stage")
        backend = stage_backend(getattr(stages[0], "network", stages[0]), backend)
        devs = [torch.device(d) for d in (devices if devices is not None else ["cpu"] * len(stages))]
        if comm not in ("gloo", "nccl"):
            raise ValueError(f"comm must be 'gloo' or 'nccl', got {comm!r}")
        if len(devs) != len(stages) or (examples is not None and len(examples) != len(stages)):
            raise ValueError(f"give one device and one example per stage ({len(stages)})")
        if comm == "gloo" and any(d.type != "cpu" for d in devs):
            raise ValueError("comm='gloo' hands over CPU tensors: use comm='nccl' for CUDA devices")
        if backend == "onnxruntime" and examples is None:
            raise ValueError("backend='onnxruntime' needs examples= (stage_examples) to export the stages")
        self.backend, self.comm, self.devices = backend, comm, devs
        #: whether every stage embeds the timestep it is given (what a stride needs; StagePipeline's)
        self.time_in_every_stage = all(getattr(s, "reads_time", True) for s in stages)
        self.timeout = datetime.timedelta(seconds=timeout)
        first = stages[0]
        self.first: StageRunner = (OnnxStage(first, examples[0], threads=1) if backend == "onnxruntime"
                                   else EagerStage(first))
        self._count = len(stages)
        self._workers = (_start_workers(stages, examples, backend, comm, devs, timeout) if len(stages) > 1
                         else _Workers(device=devs[0]))
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    @property
    def num_stages(self) -> int:
        return self._count

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (ranks 1 … N-1); empty once closed."""
        return [p.pid for p in self._workers.procs]

    def close(self) -> None:
        """End the worker processes (asked, joined, else terminated); later calls raise. Idempotent."""
        self._finalizer()

    def __enter__(self) -> DistributedStagePipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __call__(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.run_stages(x, t, condition)[0]

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this DistributedStagePipeline is closed")

    def _broken(self, rank: int, error: BaseException) -> StageFailed:
        """Close the pipeline after a hand-off failed (the group is out of step) and say why."""
        procs = self._workers.procs
        if rank - 1 < len(procs):
            procs[rank - 1].join(timeout=0.5)  # a killed worker: let its exit be seen
        code = procs[rank - 1].exitcode if rank - 1 < len(procs) else None
        self._workers.healthy = False
        self.close()
        state = (f"exited with code {code}" if code is not None
                 else f"lost contact or did not answer within {self.timeout}")
        return StageFailed(f"stage {rank} of {self.num_stages}: its worker process {state} ({error}); "
                           f"the pipeline is closed")

    def _post(self, messages: list[tuple[int, Tensor, Tensor | None]]) -> list[tuple[int, Any]]:
        works = []
        for rank, header, payload in messages:
            try:
                works += [(rank, w) for w in _post(self._workers.pg, rank, header, payload)]
            except RuntimeError as e:
                raise self._broken(rank, e) from e
        return works

    def _collect(self, rank: int) -> tuple[int, list[Tensor | None]]:
        try:
            return _recv(self._workers.pg, rank, self._workers.device, self.timeout)
        except RuntimeError as e:
            raise self._broken(rank, e) from e

    def _finish(self, works: list[tuple[int, Any]], outcomes: list[tuple[int, list[Tensor | None]]]
                ) -> list[tuple[Tensor, ...]]:
        """Wait for the sends; raise StageFailed for the first worker that sent an error; else the results."""
        for rank, work in works:
            try:
                work.wait(self.timeout)
            except RuntimeError as e:
                raise self._broken(rank, e) from e
        for rank, (kind, items) in enumerate(outcomes, start=1):
            if kind == ERROR:
                raise StageFailed(f"stage {rank} of {self.num_stages} failed in its worker process:\n"
                                  f"{_error_text(items)}")
        return [tuple(t for t in items if t is not None) for _, items in outcomes]

    def run_stages(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Carries]:
        """The stages one after the other on current inputs: ``(out (N, T, D), carries)``.

        ``carries[i]``: stage ``i``'s output ``(x, *skips)`` (N−1 of them), which the next
        :meth:`stale_step` hands to stage ``i+1``. Each stage's inputs go to its worker and its
        output comes back here.
        """
        self._check_open()
        t = t.reshape(-1).expand(x.shape[0]).to(torch.float32)
        carry = self.first((x, t, condition))
        carries: Carries = [carry]
        for rank in range(1, self.num_stages):
            works = self._post([(rank, *_encode(JOB, (carry[0], t, condition, *carry[1:]), self._workers.device))])
            carry = self._finish(works, [self._collect(rank)])[0]
            carries.append(carry)
        return carry[0], carries[:-1]

    def stale_step(self, x: Tensor, ts: Sequence[Tensor], condition: Tensor | None, carries: Carries
                   ) -> tuple[Tensor, Carries]:
        """All stages at once: stage 0 on ``x``, stage ``i`` on ``carries[i-1]`` (the previous call's).

        Args and returns as :meth:`para_policy.stages.StagePipeline.stale_step`: ``x`` (B, T, D);
        ``ts`` one timestep tensor per stage, (B,) but the last's (r·B,); ``condition`` (B, G) or
        None; ``carries`` the previous call's. Returns ``(out (r·B, T, D), carries)``.
        Raises:
            StageFailed: a worker's stage raised (after every stage of the call has finished), or a
                worker died or timed out (then the pipeline is closed).
        """
        if len(carries) != self.num_stages - 1 or len(ts) != self.num_stages:
            raise ValueError(f"stale_step takes {self.num_stages} timestep tensors and {self.num_stages - 1} "
                             f"carries, got {len(ts)} and {len(carries)}")
        self._check_open()
        B = x.shape[0]
        ts = [t.reshape(-1).to(torch.float32) for t in ts]
        reps = ts[-1].shape[0] // B
        if self.num_stages == 1:
            return self.first((x.repeat(reps, 1, 1), ts[0], repeat_rows(condition, reps)))[0], []
        messages = []
        for rank in range(1, self.num_stages):
            n = reps if rank == self.num_stages - 1 else 1
            carry = carries[rank - 1]
            items = (repeat_rows(carry[0], n), ts[rank], repeat_rows(condition, n),
                     *(repeat_rows(s, n) for s in carry[1:]))
            messages.append((rank, *_encode(JOB, items, self._workers.device)))
        works = self._post(messages)
        first: tuple[Tensor, ...] | BaseException
        try:
            first = self.first((x, ts[0].expand(B), condition))
        except BaseException as e:  # collect the workers' results first, so the group stays in step
            first = e
        outs = self._finish(works, [self._collect(rank) for rank in range(1, self.num_stages)])
        if isinstance(first, BaseException):
            raise first
        outs = [first, *outs]
        return outs[-1][0], outs[:-1]

    def stale_rounds(self, x: Tensor, rounds: Sequence[Sequence[Tensor]], condition: Tensor | None,
                     carries: Carries, advance: Callable[[int, Tensor], Tensor | None]) -> Carries:
        """AsyncDiff's parallel rounds (as :meth:`para_policy.stages.StagePipeline.stale_rounds`): round
        ``j`` is one :meth:`stale_step` on ``rounds[j]``'s timesteps, whose last-stage output
        ``advance(j, out (r·B, T, D))`` turns into stage 0's input for round ``j+1`` (None: stop).

        Returns the last round's carries. The rounds go in lock step (each waits for every stage);
        stage ``i`` of round ``j`` reads stage ``i-1``'s output of round ``j-1``, as streamed.
        """
        N = self.num_stages
        if len(carries) != N - 1 or any(len(ts) != N for ts in rounds):
            raise ValueError(f"stale_rounds takes {N} timestep tensors per round and {N - 1} carries, got "
                             f"{sorted({len(ts) for ts in rounds})} and {len(carries)}")
        current: Tensor | None = x
        for j, ts in enumerate(rounds):
            if current is None:
                break
            out, carries = self.stale_step(current, ts, condition, carries)
            current = advance(j, out)
        return carries


def distributed_stage_pipeline(model: nn.Module, num_stages: int, sample_shape: Sequence[int],
                               condition: Tensor | None = None, *, backend: str = "default", comm: str = "gloo",
                               devices: Sequence[str | torch.device] | None = None,
                               costs: Sequence[float] | None = None, cuts: Sequence[int] | None = None,
                               timeout: float = 60.0) -> DistributedStagePipeline:
    """``model`` (a ConditionalUnet1D or a TransformerForDiffusion) as a :class:`DistributedStagePipeline`.

    As :func:`para_policy.stages.stage_pipeline`: cut at ``cuts``, or balanced by ``costs`` per unit,
    or by each unit timed now on ``sample_shape`` ``(T, D)`` and ``condition`` (1, G); ``backend``
    ``'default'`` is ONNX Runtime where it can (one intra-op thread per worker).
    """
    cond = None if condition is None else condition.detach()[:1].float().cpu()
    stages = split_network(model, num_stages, costs=costs, cuts=cuts, sample_shape=sample_shape, condition=cond)
    backend = stage_backend(model, backend)
    examples = stage_examples(stages, sample_shape, cond) if backend == "onnxruntime" else None
    return DistributedStagePipeline(stages, examples, backend=backend, comm=comm, devices=devices, timeout=timeout)
