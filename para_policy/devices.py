"""Spread each Picard round's batched model call over model replicas on several devices.

Why: a Picard round evaluates ``window × batch`` rows in one call; with more than one
device the rows can be split across replicas of the model and evaluated at the same time.
The rounds stay the same, only each round's wall time shrinks.

How: one replica per device (a copy of the model moved there, made once), rows split
into contiguous chunks, one thread per device, each under its own CUDA stream and device
context when the device is a GPU. ``torch.nn.parallel.parallel_apply`` is not used
because it requires an accelerator (it refuses CPU devices), and ``replicate`` copies
the weights on every call (it is built for training). Rows are independent in the
DiffusionPolicy UNet (GroupNorm and convolutions act per row), so the split gives the
same result as one device, up to floating-point differences of batch size in kernels.

The tests run it on CPU devices only (``['cpu', 'cpu']``, for correctness); on GPUs it is untested.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn


class ReplicatedDenoiser:
    """``denoiser(x (N,T,D), t (N,), condition (N,G) | None) -> (N,T,D)`` over replicas of ``model``.

    Args:
        model: the network, called as ``model(x, t, global_cond=condition)`` (DiffusionPolicy's
            and LeRobot's UNet signature; pass ``condition_kw`` for another keyword).
        devices: e.g. ``['cuda:0', 'cuda:1']`` or ``['cpu', 'cpu']``. The first replica is
            ``model`` itself when it already lives on ``devices[0]``; the others are copies.
            After changing the model's weights call :meth:`refresh`.
        min_rows_per_device: do not split calls smaller than this per device (a tiny call
            is faster on one device than split).
        wrap: turns a replica into its ``(x, t, condition) -> out`` call (precision,
            compile: :func:`para_policy.inference.make_denoiser`); default a plain call.

    The result is returned on the device of ``x``. Plain object, not an ``nn.Module``, so
    assigning it as ``policy.denoise`` adds nothing to the policy's ``state_dict``.
    """

    def __init__(self, model: nn.Module, devices: Sequence[str | torch.device], condition_kw: str = "global_cond",
                 min_rows_per_device: int = 1,
                 wrap: Callable[[nn.Module], Callable[..., torch.Tensor]] | None = None) -> None:
        if not devices:
            raise ValueError("devices must name at least one device")
        self.model = model
        self.devices = [torch.device(d) for d in devices]
        self.condition_kw = condition_kw
        self.min_rows_per_device = max(1, int(min_rows_per_device))
        self.wrap = wrap
        self.replicas: list[nn.Module] = []
        self.calls: list[Callable[..., torch.Tensor]] = []
        self.refresh()
        self._streams = [torch.cuda.Stream(device=d) if d.type == "cuda" else None for d in self.devices]
        self._pool: ThreadPoolExecutor | None = None

    def refresh(self) -> None:
        """(Re)build the replicas from the model's current weights."""
        home = next(self.model.parameters()).device
        self.replicas = []
        for i, device in enumerate(self.devices):
            if i == 0 and device == home:
                self.replicas.append(self.model)
            else:
                self.replicas.append(copy.deepcopy(self.model).to(device).eval())
        kw = self.condition_kw

        def plain(net: nn.Module) -> Callable[..., torch.Tensor]:
            return lambda x, t, c: net(x, t, **({} if c is None else {kw: c}))

        self.calls = [(self.wrap or plain)(r) for r in self.replicas]

    def close(self) -> None:
        """Stop the worker threads (they are started again on the next call)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def _run(self, i: int, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None,
             out_device: torch.device, inference: bool, ready: Any) -> torch.Tensor:
        device, stream = self.devices[i], self._streams[i]
        with torch.inference_mode(inference):
            if stream is None:
                c = None if condition is None else condition.to(device)
                return self.calls[i](x.to(device), t.to(device), c).to(out_device)
            with torch.cuda.device(device), torch.cuda.stream(stream):
                if ready is not None:
                    stream.wait_event(ready)
                c = None if condition is None else condition.to(device, non_blocking=True)
                out = self.calls[i](x.to(device, non_blocking=True), t.to(device, non_blocking=True), c)
                out = out.to(out_device, non_blocking=True)
                stream.synchronize()
                return out

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        parts = max(1, min(len(self.devices), n // self.min_rows_per_device))
        inference = torch.is_inference_mode_enabled()
        ready = None
        if x.device.type == "cuda" and any(s is not None for s in self._streams):
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(x.device))
        bounds = torch.linspace(0, n, parts + 1).round().long().tolist()
        chunks = [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]

        def job(i: int) -> torch.Tensor:
            a, b = chunks[i]
            return self._run(i, x[a:b], t[a:b], None if condition is None else condition[a:b], x.device,
                             inference, ready)

        if len(chunks) == 1:
            return job(0)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=len(self.devices) - 1, thread_name_prefix="para_replica")
        futures = [self._pool.submit(job, i) for i in range(1, len(chunks))]
        outputs = [job(0)] + [f.result() for f in futures]  # replica 0 runs in the calling thread
        return torch.cat(outputs, dim=0)


def use_devices(policy: Any, devices: Sequence[str | torch.device] | None) -> Any:
    """Make a :class:`~para_policy.policy.LowdimPolicy` evaluate its UNet on ``devices``; returns the policy.

    The same as ``policy.set_inference(devices=devices)``: composed with the policy's
    precision / compile / CUDA-graph settings; ``devices=None`` restores one device. The
    policy's own device (inputs, normalizer, sampler state) stays where it is; rows are
    moved to the replicas and back every round.
    """
    return policy.set_inference(devices=None if devices is None else list(devices))
