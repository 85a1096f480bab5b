"""Count what a sampler's rounds ask of the host: syncs, host-to-device copies, tensor operations.

On a GPU a sampler round is fast only if the host queues its kernels without waiting: every
device-to-host read (``.item()``, ``bool()`` of a tensor, ``.tolist()``, ``nonzero``, a boolean
mask index) stalls the host until the device has caught up, every tensor built from host data
is a copy queued behind the model's kernels, and every small operation is a kernel launch.
None of this is visible on a CPU, where all of them are cheap; counting them is. A
:class:`HostSyncCounter` is a ``TorchFunctionMode`` that sees every torch call, splits them at
the denoiser's calls (:meth:`HostSyncCounter.wrap`) and counts, between two model calls (one
Picard round's bookkeeping), the host syncs, the host-to-device copies and the operations.

The rules are conservative for a CPU run, where every tensor is a host tensor: any factory call
without an explicit ``device`` and any ``.to(device)`` / ``.cuda()`` counts as a copy, so code
that passes the test keeps its tensors on the denoiser's device by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: calls that read a device tensor's value on the host
SYNC_CALLS = {
    torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.unique, torch.unique, torch.unique_consecutive, torch.equal, torch.Tensor.equal,
    torch.masked_select, torch.Tensor.masked_select, torch.Tensor.allclose, torch.allclose,
}
#: factory functions: a copy from the host unless told the device
FACTORIES = {
    torch.tensor, torch.as_tensor, torch.from_numpy, torch.arange, torch.zeros, torch.ones, torch.full,
    torch.empty, torch.eye, torch.linspace, torch.randn, torch.rand, torch.randint, torch.tril_indices,
    torch.triu_indices,
}
#: metadata reads that launch nothing
METADATA = {"shape", "dtype", "device", "dim", "size", "numel", "is_floating_point", "requires_grad",
            "is_cuda", "layout", "ndim", "__len__", "stride", "is_contiguous", "data_ptr", "element_size",
            "storage_offset", "_version", "grad_fn", "is_leaf", "names", "is_sparse", "is_quantized",
            "is_meta", "is_complex", "__format__", "__repr__", "__hash__"}


@dataclass
class Counts:
    """What one stretch of sampler code asked of the host."""

    syncs: int = 0
    copies: int = 0
    ops: int = 0
    sync_calls: list[str] = field(default_factory=list)
    copy_calls: list[str] = field(default_factory=list)


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _bool_index(args: tuple) -> bool:
    """Whether an indexing call's index holds a bool tensor (its result's shape needs a host read)."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _is_copy(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in FACTORIES:
        return kwargs.get("device") is None
    if func is torch.Tensor.cuda:
        return True
    if func is torch.Tensor.to:
        targets = list(args[1:]) + [kwargs.get("device")]
        return any(isinstance(a, (str, torch.device)) for a in targets if a is not None)
    return False


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in SYNC_CALLS:
        return True
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
        return _bool_index(args)
    if func is torch.where:
        return len(args) + len(kwargs) == 1  # where(cond): nonzero
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


class HostSyncCounter(TorchFunctionMode):
    """Counts host syncs, copies and operations of sampler code, split at the denoiser's calls.

    Use::

        counter = HostSyncCounter()
        with counter:
            sampler(counter.wrap(denoiser), ...)
        counter.between   # Counts of the code between model call i and i+1, one per round
        counter.before, counter.after  # setup before the first call, finishing after the last

    Calls made inside the wrapped denoiser are the model's and are counted in ``model``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.segments: list[Counts] = [Counts()]
        self.model = Counts()
        self.model_calls = 0
        self._inside = 0

    def wrap(self, denoiser: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``denoiser`` with its calls marked as the boundaries between rounds."""

        def marked(*args: Any, **kwargs: Any) -> torch.Tensor:
            self._inside += 1
            try:
                return denoiser(*args, **kwargs)
            finally:
                self._inside -= 1
                if self._inside == 0:
                    self.model_calls += 1
                    self.segments.append(Counts())

        return marked

    @property
    def before(self) -> Counts:
        return self.segments[0]

    @property
    def after(self) -> Counts:
        return self.segments[-1]

    @property
    def between(self) -> list[Counts]:
        """The bookkeeping between consecutive model calls: one entry per round but the last."""
        return self.segments[1:-1]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name.rsplit(".", 1)[-1] not in METADATA and not name.endswith("__get__"):
            counts = self.model if self._inside else self.segments[-1]
            counts.ops += 1
            if _is_sync(func, args, kwargs):
                counts.syncs += 1
                counts.sync_calls.append(name)
            if _is_copy(func, args, kwargs):
                counts.copies += 1
                counts.copy_calls.append(name)
        return func(*args, **kwargs)
