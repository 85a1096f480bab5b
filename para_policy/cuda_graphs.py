"""The denoiser replayed from CUDA graphs (``cuda_graphs=True``), and IEEE fp32 on CUDA (TF32 off).

Why graphs: a Picard round of the small DiffusionPolicy networks is a few hundred short
kernels, and on a GPU their launch cost dominates; a captured graph launches them at once.
One graph per row-count bucket (powers of two); a call is padded to its bucket (rows are
independent in the denoisers, so padding rows change nothing).

What keeps a replay correct:

* captured when inference is configured (:func:`para_policy.inference.make_denoiser` with the
  shapes of one call), in the configuring thread, not lazily in whatever thread first meets a
  row count: a :class:`~para_policy.controller.Controller`'s worker capturing while ``act()``
  allocates on the same device fails with "operation not permitted when stream is capturing".
  A call shape that was not captured is captured on the spot as a fallback, with a warning,
  in thread-local capture mode (other threads' CUDA calls stay legal meanwhile);
* a graph reads the weights at the addresses they had at capture: :class:`WeightsWatch`
  compares the weights' identity (:func:`weights_identity`: data pointers and version
  counters) before every replay, and a change (``load_state_dict(assign=True)``, an EMA swap
  of ``.data``, a dtype cast, an in-place write) recaptures every graph; weights that left
  the graphs' device raise instead of replaying freed memory;
* one call at a time (a lock): the graphs' static input and output tensors are shared.

Why TF32 off (:func:`exact_fp32`): PyTorch runs "fp32" cuDNN convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32``), whose rounding depends on the rows per call, so a Picard
round of many rows and the sequential loop's one-row calls would differ by far more than fp32
rounding and tolerance 0 would no longer reproduce the sequential sample.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger("para_policy.cuda_graphs")
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
#: the largest bucket captured when nothing says how many rows a call can have
MAX_BUCKET = 4096


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``rows`` (buckets sorted ascending); ``rows`` itself past the largest."""
    for b in buckets:
        if b >= rows:
            return int(b)
    return int(rows)


def pad_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` (n, ...) padded to ``size`` rows by repeating its last row (rows are independent in the UNet)."""
    n = t.shape[0]
    if n == size:
        return t
    return torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])], dim=0)


def power_buckets(max_rows: int) -> list[int]:
    """Powers of two from 1 up to the first that holds ``max_rows`` rows: ``power_buckets(100) == [1, 2, ..., 128]``."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    return [2 ** i for i in range(int(max_rows - 1).bit_length() + 1)]


# ---- the weights' identity ------------------------------------------------------------------
_REGISTRATIONS = [0]  # parameters, buffers and submodules registered on any module since the hooks
_HOOKS: list[Any] = []


def _count_registration(*args: Any) -> None:
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    """Count every parameter, buffer and submodule (re)registration in the process (``setattr``,
    ``load_state_dict(assign=True)``): a :class:`WeightsWatch` then lists its model's tensors again."""
    if not _HOOKS:
        from torch.nn.modules import module

        _HOOKS.extend([module.register_module_parameter_registration_hook(_count_registration),
                       module.register_module_buffer_registration_hook(_count_registration),
                       module.register_module_module_registration_hook(_count_registration)])


def _version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter; -1 for an inference tensor, which has none."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1


def weights_identity(tensors: Iterable[torch.Tensor | None]) -> tuple[int, ...]:
    """``(data_ptr, version, data_ptr, version, ...)`` of ``tensors`` (None skipped): what a captured graph reads.

    A new tensor or new storage (``assign=True``, ``p.data = ...``, ``.to()``) changes a data
    pointer; an in-place write (``copy_``, an optimizer step) changes a version counter.
    """
    out: list[int] = []
    for t in tensors:
        if t is not None:
            out.append(t.data_ptr())
            out.append(_version(t))
    return tuple(out)


class WeightsWatch:
    """Says whether ``model``'s parameters and buffers moved or changed since the last look.

    Cheap per call: the tensors are read from the submodules' own parameter and buffer
    tables (which ``load_state_dict(assign=True)`` and ``.to()`` update in place), and the
    submodules are listed again only after some module registered a submodule, parameter or
    buffer (global registration hooks, installed on first use).
    """

    def __init__(self, model: nn.Module) -> None:
        _watch_registrations()
        self.model = model
        self._seen = -1
        self._tables: list[dict[str, Any]] = []
        self.identity = self._identity()

    def _identity(self) -> tuple[int, ...]:
        if self._seen != _REGISTRATIONS[0]:
            self._seen = _REGISTRATIONS[0]
            self._tables = [d for m in self.model.modules() for d in (m._parameters, m._buffers) if d]
        return weights_identity(itertools.chain.from_iterable(d.values() for d in self._tables))

    def changed(self) -> bool:
        """True once after each change of the weights' identity (and then remembers the new one)."""
        now = self._identity()
        if now == self.identity:
            return False
        self.identity = now
        return True

    @property
    def device(self) -> torch.device | None:
        """The device of the model's first tensor (None without tensors)."""
        first = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return None if first is None else first.device


# ---- IEEE fp32 on CUDA ------------------------------------------------------------------------
_TF32_LOCK = threading.Lock()
_TF32: dict[str, Any] = {"depth": 0, "restore": []}


def _turn_tf32_off() -> list[Callable[[], None]]:
    """Set cuDNN and CUDA matmuls to IEEE fp32; the calls that restore what was changed."""
    restore: list[Callable[[], None]] = []
    cudnn = torch.backends.cudnn
    try:
        if cudnn.allow_tf32:
            cudnn.allow_tf32 = False
            restore.append(lambda: setattr(cudnn, "allow_tf32", True))
    except RuntimeError:  # flags set through the per-operator API (``fp32_precision``), which the legacy one refuses
        for holder in (cudnn.conv, cudnn.rnn):
            saved = holder.fp32_precision
            if saved != "ieee":
                holder.fp32_precision = "ieee"
                restore.append(lambda h=holder, s=saved: setattr(h, "fp32_precision", s))
    matmul = torch.get_float32_matmul_precision()
    if matmul != "highest":
        torch.set_float32_matmul_precision("highest")
        restore.append(lambda: torch.set_float32_matmul_precision(matmul))
    return restore


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off (cuDNN convolutions, CUDA matmuls) inside; the process-global flags restored on the way out.

    Nested and concurrent uses share one change: the first to enter saves the flags and the
    last to leave restores them.
    """
    with _TF32_LOCK:
        if _TF32["depth"] == 0:
            _TF32["restore"] = _turn_tf32_off()
        _TF32["depth"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32["depth"] -= 1
            if _TF32["depth"] == 0:
                for undo in reversed(_TF32["restore"]):
                    undo()
                _TF32["restore"] = []


class ExactFp32Denoiser:
    """``fn`` called under :func:`exact_fp32`: a CUDA fp32 denoiser whose rounding does not depend on its row count."""

    def __init__(self, fn: DenoiseFn) -> None:
        self.fn = fn

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        with exact_fp32():
            return self.fn(x, t, condition)


# ---- the graphs ---------------------------------------------------------------------------------
def _key(x: torch.Tensor, c: torch.Tensor | None) -> tuple:
    """A graph's identity: rows, trajectory shape and dtype, device, condition shape."""
    return (x.shape[0], tuple(x.shape[1:]), x.dtype, x.device, None if c is None else tuple(c.shape[1:]))


class CudaGraphDenoiser:
    """Replay ``fn`` from CUDA graphs captured per row-count bucket (inputs padded to the bucket).

    Args:
        fn: the denoiser to capture; called with static tensors during capture.
        buckets: row counts to capture (default powers of two up to :data:`MAX_BUCKET`);
            calls with more rows than the largest bucket run eagerly (warned once).
        model: the network ``fn`` runs: its weights are watched (:class:`WeightsWatch`) and
            every graph is recaptured when they change.
        example: ``((T, D), condition (1, ...) | None)``, the shapes of one call: the buckets
            up to ``capture_rows`` rows are captured now, for each of ``dtypes`` (default
            float32). Any other graph is captured on the first call of its shape, with a
            warning (another thread's work on the device may interfere).
        capture_rows: how many rows the calls made up front reach (e.g. the sampler's steps
            times the batch size); default all buckets.
        device: where to capture (default the model's device, else the condition's).
    """

    def __init__(self, fn: DenoiseFn, buckets: Sequence[int] | None = None, *, model: nn.Module | None = None,
                 example: tuple[Sequence[int], torch.Tensor | None] | None = None, capture_rows: int | None = None,
                 dtypes: Sequence[torch.dtype] = (torch.float32,), device: torch.device | str | None = None) -> None:
        self.fn = fn
        self.buckets = sorted(int(b) for b in (buckets or power_buckets(MAX_BUCKET)))
        self.graphs: dict[tuple, tuple[Any, tuple[torch.Tensor | None, ...], torch.Tensor]] = {}
        self.watch = None if model is None else WeightsWatch(model)
        self.captures = 0  # graphs captured so far, recaptures included
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        if example is not None:
            where = device or (self.watch.device if self.watch is not None else None) or \
                (example[1].device if example[1] is not None else None)
            if where is None:
                raise ValueError("capturing CUDA graphs needs a device: pass model= or device=")
            self.capture(example, dtypes, torch.device(where), capture_rows)

    def capture(self, example: tuple[Sequence[int], torch.Tensor | None], dtypes: Sequence[torch.dtype],
                device: torch.device, rows: int | None = None) -> None:
        """Capture the buckets up to ``rows`` rows (default all) for trajectories ``(rows, *example[0])`` of each
        of ``dtypes``, on ``device``; buckets already captured are kept."""
        shape, condition = tuple(example[0]), example[1]
        top = self.buckets[-1] if rows is None else bucket_for(rows, self.buckets)
        with self._lock:
            for dtype in dict.fromkeys(dtypes):
                for size in (b for b in self.buckets if b <= top):
                    x = torch.zeros((size, *shape), dtype=dtype, device=device)
                    t = torch.zeros(size, dtype=torch.long, device=device)
                    c = None if condition is None else pad_rows(condition[:1].to(device), size)
                    if _key(x, c) not in self.graphs:
                        self._capture(x, t, c)

    def _capture(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> None:
        with torch.inference_mode(False):  # plain tensors: calls in and out of inference mode copy into them
            static = (x.clone(), t.clone(), None if c is None else c.clone())
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs requires
                    self.fn(*static)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread-local: another thread's CUDA calls during this capture are legal, not an error
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.fn(*static)
        self.graphs[_key(x, c)] = (graph, static, out)
        self.captures += 1

    def _check_weights(self) -> None:
        """Recapture every graph after the model's weights changed; raise if they left the graphs' device."""
        if self.watch is None or not self.watch.changed():
            return
        device, captured = self.watch.device, {key[3] for key in self.graphs}
        if captured and device not in captured:
            raise ValueError(f"the model's weights moved to {device} after its CUDA graphs were captured on "
                             f"{', '.join(map(str, captured))}: move the policy with policy.to(...), which builds "
                             "its denoiser again, or call policy.set_inference() after moving the network")
        log.info("the network's weights changed since its CUDA graphs were captured: recapturing %d graphs",
                 len(self.graphs))
        old, self.graphs = self.graphs, {}
        for _, (sx, st, sc), _ in old.values():
            self._capture(sx, st, sc)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        size = bucket_for(n, self.buckets)
        if size > self.buckets[-1]:
            self._warn_once("rows", f"a denoiser call of {n} rows is larger than the largest captured CUDA graph "
                                    f"({self.buckets[-1]} rows): such calls run eagerly")
            return self.fn(x, t, condition)
        xp, tp = pad_rows(x, size), pad_rows(t, size)
        cp = None if condition is None else pad_rows(condition, size)
        key = _key(xp, cp)
        with self._lock:
            self._check_weights()
            if key not in self.graphs:
                self._warn_once(f"lazy {key[1:]}", f"capturing a CUDA graph on the first call of shape {key[1:]}: "
                                "another thread's work on this device may interfere; configure inference with "
                                "this call's shapes (LowdimPolicy.set_inference does) to capture them up front")
                self._capture(xp, tp, cp)
            graph, (sx, st, sc), out = self.graphs[key]
            sx.copy_(xp)
            st.copy_(tp)
            if sc is not None:
                sc.copy_(cp)
            graph.replay()
            return out[:n].clone()
