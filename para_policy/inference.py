"""How the denoiser runs: precision, ``torch.compile``, CUDA graphs, ONNX Runtime, as one denoiser callable.

Samplers only see ``denoiser(x (N,T,D), t (N,), condition (N,G) | None) -> (N,T,D)``; what
makes one call cheap lives here, behind options that default to plain eager fp32:

* ``precision='bf16'``: the UNet under ``torch.autocast`` in bfloat16, outputs cast back
  to the input's dtype. Changes the actions by rounding, so measure the deviation from
  fp32 (``eval/bench_latency.py`` reports it) before using it.
* ``compile=True`` (or a mode string such as ``'max-autotune-no-cudagraphs'``):
  ``torch.compile(model, dynamic=True)``, compiled on first call (tens of seconds on CPU);
  dynamic shapes, so a new row count does not recompile.
* ``cuda_graphs=True``: on a CUDA device, each call is padded to a bucket of row counts
  (powers of two) and replayed from a CUDA graph captured once per bucket, which removes
  the per-kernel launch cost that dominates small Picard rounds on a GPU. On any other
  device it warns once and runs eagerly (nothing to capture).
* ``backend='onnxruntime'``: the model exported to ONNX and run by ONNX Runtime on the CPU
  (:class:`~para_policy.onnx_backend.OnnxDenoiser`, the ``[onnx]`` extra): far less
  per-call overhead than eager PyTorch at a few rows, the same outputs up to float rounding.
  ``backend='auto'``: per row count, whichever of eager and ONNX Runtime measured faster
  when the denoiser was built (:class:`RowDispatchDenoiser`), since ONNX Runtime wins at the
  one-row calls of sequential sampling and eager can win at the wide calls of Picard rounds.
  Both are CPU fp32 only, so they refuse ``precision='bf16'``, ``compile``, ``cuda_graphs``
  and ``devices``.

:func:`make_denoiser` composes them with several devices (:mod:`para_policy.devices`);
:func:`configure_inference` sets them on a policy (:meth:`LowdimPolicy.set_inference`).
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
BACKENDS = ("eager", "onnxruntime", "auto")
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
#: ``((T, D), condition (1, ...) | None)``: the shapes of one denoiser call
Example = tuple[Sequence[int], torch.Tensor | None]


def check_inference_options(compile: bool | str = False, precision: str = "fp32", cuda_graphs: bool = False,
                            backend: str = "eager", devices: Sequence[Any] | None = None) -> None:
    """Raise ``ValueError`` naming a bad option, or a combination the backend cannot run."""
    if not isinstance(compile, (bool, str)):
        raise ValueError(f"compile must be true/false or a torch.compile mode string, got {compile!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be true or false, got {cuda_graphs!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend != "eager":
        eager_only = {"precision='bf16'": precision != "fp32", "compile": bool(compile),
                      "cuda_graphs": cuda_graphs, "devices": devices is not None}
        clash = [name for name, on in eager_only.items() if on]
        if clash:
            raise ValueError(f"backend={backend!r} runs the fp32 model on the CPU and cannot be combined with "
                             f"{', '.join(clash)} (eager PyTorch features): use backend='eager' for them")


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


class CudaGraphDenoiser:
    """Replay ``fn`` from CUDA graphs captured per row-count bucket (inputs padded to the bucket).

    Args:
        fn: the denoiser to capture; called with static tensors during capture.
        buckets: row counts to capture (default powers of two up to 4096); calls with more
            rows than the largest bucket run eagerly.
    """

    def __init__(self, fn: DenoiseFn, buckets: Sequence[int] | None = None) -> None:
        self.fn = fn
        self.buckets = sorted(int(b) for b in (buckets or [2 ** i for i in range(13)]))
        self.graphs: dict[tuple, tuple[Any, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def _capture(self, key: tuple, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> None:
        static = (x.clone(), t.clone(), None if c is None else c.clone())
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs requires
                self.fn(*static)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*static)
        self.graphs[key] = (graph, static, out)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        size = bucket_for(n, self.buckets)
        if size > self.buckets[-1]:
            return self.fn(x, t, condition)
        xp, tp = pad_rows(x, size), pad_rows(t, size)
        cp = None if condition is None else pad_rows(condition, size)
        key = (size, x.dtype, x.device, None if cp is None else tuple(cp.shape[1:]))
        if key not in self.graphs:
            self._capture(key, xp, tp, cp)
        graph, (sx, st, sc), out = self.graphs[key]
        sx.copy_(xp)
        st.copy_(tp)
        if sc is not None:
            sc.copy_(cp)
        graph.replay()
        return out[:n].clone()


class RowDispatchDenoiser:
    """Each call to the backend measured faster at its row count (``backend='auto'``).

    Rule: a call of ``n`` rows goes to the backend with the lowest cost at the smallest
    measured row count ``>= n`` (past the largest, the largest's); ties go to the first backend.

    Args:
        backends: ``{name: denoiser}``, e.g. ``{'eager': ..., 'onnxruntime': ...}``.
        curves: ``{name: {rows: ms}}`` over the same row counts for every backend
            (:func:`para_policy.window.batch_cost_curve`; :meth:`measure` measures them).
    Attributes:
        choice: ``{rows: name}`` for every measured row count; ``curves`` as given.
    """

    def __init__(self, backends: Mapping[str, DenoiseFn], curves: Mapping[str, Mapping[int, float]]) -> None:
        if not backends or set(curves) != set(backends):
            raise ValueError(f"need one cost curve per backend, got curves for {sorted(curves)} "
                             f"and backends {sorted(backends)}")
        sizes = {name: sorted(int(n) for n in c) for name, c in curves.items()}
        self.rows = next(iter(sizes.values()))
        if not self.rows or any(s != self.rows for s in sizes.values()):
            raise ValueError(f"the cost curves must cover the same row counts, got {sizes}")
        self.backends = dict(backends)
        self.curves = {name: {int(n): float(ms) for n, ms in c.items()} for name, c in curves.items()}
        self.choice = {n: min(self.backends, key=lambda b, n=n: self.curves[b][n]) for n in self.rows}

    @classmethod
    def measure(cls, backends: Mapping[str, DenoiseFn], example: Example, *, reps: int = 5, warmup: int = 1,
                batch_sizes: Sequence[int] | None = None) -> RowDispatchDenoiser:
        """Measure every backend's cost curve on ``example`` (:data:`Example`) now, then dispatch on them.

        ``batch_sizes``: default :data:`para_policy.window.DEFAULT_BATCHES`, the row counts the
        window tuner measures. The backends' calls alternate (one
        :func:`~para_policy.window.batch_cost_curve` call of one row count each), so a burst of
        machine load hits both alike; few ``reps``, since the curves only need to say which
        backend is faster.
        """
        from para_policy import window

        sizes = sorted({int(n) for n in (window.DEFAULT_BATCHES if batch_sizes is None else batch_sizes)})
        shape, condition = tuple(example[0]), example[1]
        names = list(backends)
        times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in names}
        for rep in range(warmup + reps):
            for n in sizes if rep % 2 == 0 else sizes[::-1]:
                for name in names if rep % 2 == 0 else names[::-1]:
                    ms = window.batch_cost_curve(backends[name], shape, condition, [n], reps=1, warmup=0)[n]
                    if rep >= warmup:
                        times[name][n].append(ms)
        return cls(backends, {name: {n: statistics.median(ts) for n, ts in t.items()} for name, t in times.items()})

    def backend_for(self, rows: int) -> str:
        """The backend a call of ``rows`` rows goes to."""
        return self.choice[bucket_for(min(rows, self.rows[-1]), self.rows)]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.backends[self.backend_for(x.shape[0])](x, t, condition)


def _non_eager(model: nn.Module, backend: str, eager: DenoiseFn, example: Example | None,
               condition_kw: str) -> DenoiseFn:
    """The ``'onnxruntime'`` or ``'auto'`` denoiser over ``model`` (``eager`` is the plain one)."""
    from para_policy.extras import MissingExtraError
    from para_policy.onnx_backend import OnnxDenoiser, check_exportable

    if backend == "auto" and example is None:
        raise ValueError("backend='auto' measures both backends on one call's shapes: pass "
                         "example=((T, D), condition (1, ...) | None)")
    check_exportable(model)
    try:
        onnx = OnnxDenoiser(model, condition_kw=condition_kw, example=example)
    except MissingExtraError as e:
        if backend == "onnxruntime":
            raise
        warnings.warn(f"backend='auto' runs eagerly: {e}", stacklevel=3)
        return eager
    if backend == "onnxruntime":
        return onnx
    assert example is not None
    return RowDispatchDenoiser.measure({"eager": eager, "onnxruntime": onnx}, example)


def make_denoiser(model: nn.Module, *, compile: bool | str = False, precision: str = "fp32",
                  cuda_graphs: bool = False, devices: Sequence[str | torch.device] | None = None,
                  backend: str = "eager", example: Example | None = None,
                  condition_kw: str = "global_cond") -> DenoiseFn:
    """The denoiser callable over ``model``: the one place where the inference wrappers are composed.

    From the inside out: the model (``torch.compile``'d when asked), called under bf16
    autocast when asked, on each of ``devices`` (:class:`~para_policy.devices.ReplicatedDenoiser`,
    each replica compiled and autocast in its own thread), and replayed from CUDA graphs
    outermost. ``(x (N,T,D), t (N,), condition (N,...) | None) -> (N,T,D)``.

    ``backend='onnxruntime'`` replaces all of that by the model exported to ONNX
    (:class:`~para_policy.onnx_backend.OnnxDenoiser`, exported now when ``example`` gives the
    shapes of one call, ``((T, D), condition (1, ...) | None)``, else on the first call);
    ``backend='auto'`` measures eager and ONNX Runtime on ``example`` now (a few seconds) and
    dispatches each call by its row count (:class:`RowDispatchDenoiser`); without onnxruntime
    installed it warns and returns the eager denoiser.
    """
    check_inference_options(compile, precision, cuda_graphs, backend, devices)
    dtype = PRECISIONS[precision]

    def single(net: nn.Module) -> DenoiseFn:
        if compile:
            net = torch.compile(net, dynamic=True, **({"mode": compile} if isinstance(compile, str) else {}))

        def denoise(x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
            kw = {} if condition is None else {condition_kw: condition}
            if dtype is None:
                return net(x, t, **kw)
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                out = net(x, t, **kw)
            return out.to(x.dtype)

        return denoise

    if backend != "eager":
        return _non_eager(model, backend, single(model), example, condition_kw)
    if devices is not None:
        from para_policy.devices import ReplicatedDenoiser

        fn: DenoiseFn = ReplicatedDenoiser(model, devices, wrap=single)
    else:
        fn = single(model)
    if cuda_graphs:
        dev = next(model.parameters()).device
        if dev.type != "cuda":
            warnings.warn(f"cuda_graphs needs a CUDA device; the model is on {dev}, so it runs eagerly",
                          stacklevel=2)
        else:
            return CudaGraphDenoiser(fn)
    return fn


def configure_inference(policy: Any, *, compile: bool | str = False, precision: str = "fp32",
                        cuda_graphs: bool = False, backend: str = "eager") -> Any:
    """Set how ``policy``'s UNet runs (:meth:`LowdimPolicy.set_inference`); all defaults restore the plain model.

    ``backend``: ``'eager'`` (PyTorch), ``'onnxruntime'`` or ``'auto'`` (per row count; see
    :func:`make_denoiser`). Keeps the policy's ``devices`` setting
    (:func:`para_policy.devices.use_devices`). Returns the policy.
    """
    check_inference_options(compile, precision, cuda_graphs, backend)
    return policy.set_inference(compile=compile, precision=precision, cuda_graphs=cuda_graphs, backend=backend)
