"""How the denoiser runs: precision, ``torch.compile`` and CUDA graphs, as one denoiser callable.

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

:func:`make_denoiser` composes them with several devices (:mod:`para_policy.devices`);
:func:`configure_inference` sets them on a policy (:meth:`LowdimPolicy.set_inference`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def check_inference_options(compile: bool | str = False, precision: str = "fp32", cuda_graphs: bool = False) -> None:
    """Raise ``ValueError`` naming a bad option."""
    if not isinstance(compile, (bool, str)):
        raise ValueError(f"compile must be true/false or a torch.compile mode string, got {compile!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be true or false, got {cuda_graphs!r}")


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


def make_denoiser(model: nn.Module, *, compile: bool | str = False, precision: str = "fp32",
                  cuda_graphs: bool = False, devices: Sequence[str | torch.device] | None = None,
                  condition_kw: str = "global_cond") -> DenoiseFn:
    """The denoiser callable over ``model``: the one place where the inference wrappers are composed.

    From the inside out: the model (``torch.compile``'d when asked), called under bf16
    autocast when asked, on each of ``devices`` (:class:`~para_policy.devices.ReplicatedDenoiser`,
    each replica compiled and autocast in its own thread), and replayed from CUDA graphs
    outermost. ``(x (N,T,D), t (N,), condition (N,...) | None) -> (N,T,D)``.
    """
    check_inference_options(compile, precision, cuda_graphs)
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
                        cuda_graphs: bool = False) -> Any:
    """Set how ``policy``'s UNet runs (:meth:`LowdimPolicy.set_inference`); all defaults restore the plain model.

    Keeps the policy's ``devices`` setting (:func:`para_policy.devices.use_devices`). Returns the policy.
    """
    check_inference_options(compile, precision, cuda_graphs)
    return policy.set_inference(compile=compile, precision=precision, cuda_graphs=cuda_graphs)
