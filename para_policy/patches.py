"""The 1-D UNet on patches of the horizon, the patches at once: what the ``patches`` sampler drives.

:class:`~para_policy.models.unet_patches.PatchUnet` runs the network on one of P slices of the
trajectory's time axis, reading its neighbours' halos and the group statistics from outside
(DistriFusion's split). The runners here call it the way
:func:`~para_policy.samplers.patches.patch_sample` needs (the :class:`PatchRunner` interface):

* :meth:`PatchRunner.full`: the whole network on the whole horizon, every patch's exchange
  emitted from it (exact; warm-up steps);
* :meth:`PatchRunner.displaced`: the P patches on their current inputs, each reading the
  exchange of the previous call (displaced patch parallelism), concatenated back.

Why one ONNX Runtime session per patch on worker threads (:class:`OnnxPatches`): as with the
stages (:mod:`para_policy.stages`), a session's ``run`` releases the GIL and keeps to one core
with one intra-op thread, so the patches overlap; an eager patch does not (per-operator Python
dispatch holds the GIL), so :class:`EagerPatches` is the fallback where onnxruntime is missing or
the network is not CPU float32, and the reference for exactness tests. Only a
:class:`~para_policy.models.unet1d.ConditionalUnet1D` with global (or no) conditioning splits:
:func:`check_patchable`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_patches import PatchExchange, PatchUnet, neighbour_inputs
from para_policy.onnx_backend import as_feed, export_graph, make_session
from para_policy.stages import StagePipeline, stage_backend

__all__ = ["EagerPatches", "FullGraph", "OnnxPatches", "PatchGraph", "PatchResult", "PatchRunner", "PatchSession",
           "check_patchable", "patch_runner"]

#: one patch's call result: ``(out (B, n, D), left_edge (B, H), right_edge (B, H), local (B, 2, S))``
PatchResult = tuple[Tensor, Tensor, Tensor, Tensor]


def check_patchable(model: nn.Module) -> None:
    """``TypeError`` / ``ValueError`` naming what the ``patches`` sampler supports, unless ``model`` splits.

    Supported: a :class:`ConditionalUnet1D` with global conditioning or none (the lowdim UNet
    policies, an image policy's UNet); not a transformer, not ``local_cond`` (its encoder would
    need halos too).
    """
    supported = ("sampler 'patches' splits a ConditionalUnet1D with global conditioning (or none) over its "
                 "horizon (the UNet policies)")
    if not isinstance(model, ConditionalUnet1D):
        raise TypeError(f"{supported}; this network is a {type(model).__name__}: use another sampler "
                        f"(asyncdiff cuts a transformer into stages)")
    if model.local_cond_encoder is not None:
        raise ValueError(f"{supported}; this one takes local_cond, whose encoder would need halos too: "
                         f"use another sampler")


class PatchRunner:
    """What :func:`~para_policy.samplers.patches.patch_sample` drives: the whole network with its exchange,
    and the P patches at once (:meth:`run_patches`, given by each runner). ``patches``: P."""

    patches: int

    def full(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, list[PatchExchange]]:
        """The whole network on ``x`` (B, T, D), ``t`` (B,): ``(out (B, T, D), every patch's exchange)``."""
        raise NotImplementedError

    def run_patches(self, xs: Sequence[Tensor], t: Tensor, cond: Tensor | None,
                    inputs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[PatchResult]:
        """Patch ``p`` on ``xs[p]`` (B, T/P, D) and ``inputs[p] = (left, right, others)``: one result each."""
        raise NotImplementedError

    def displaced(self, x: Tensor, t: Tensor, cond: Tensor | None, exchanges: Sequence[PatchExchange]
                  ) -> tuple[Tensor, list[PatchExchange]]:
        """One displaced step: ``x`` (B, T, D) cut into P patches, each run on the halos and statistics of
        ``exchanges`` (the previous call's); ``(out (B, T, D), the patches' new exchange)``."""
        results = self.run_patches(x.split(x.shape[1] // self.patches, dim=1), t, cond, neighbour_inputs(exchanges))
        return torch.cat([r[0] for r in results], dim=1), [tuple(r[1:]) for r in results]  # type: ignore[misc]

    def close(self) -> None:
        """End the worker threads, if any (idempotent)."""


class EagerPatches(PatchRunner):
    """:class:`PatchUnet` in eager PyTorch, the patches one after the other (exact arithmetic, no speed-up).

    Inputs are cast to the network's dtype, so a float32 sampler can drive a bf16 network.
    """

    def __init__(self, patched: PatchUnet) -> None:
        self.patched = patched
        self.patches = patched.patches
        self.dtype = next(patched.unet.parameters()).dtype

    def _cast(self, t: Tensor | None) -> Tensor | None:
        return t if t is None or not t.is_floating_point() else t.to(self.dtype)

    def full(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, list[PatchExchange]]:
        with torch.inference_mode():
            return self.patched.full(self._cast(x), t, self._cast(cond))  # type: ignore[arg-type]

    def run_patches(self, xs: Sequence[Tensor], t: Tensor, cond: Tensor | None,
                    inputs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[PatchResult]:
        with torch.inference_mode():
            return [self.patched(self._cast(x), t, self._cast(cond), *i)  # type: ignore[arg-type]
                    for x, i in zip(xs, inputs, strict=True)]


class PatchGraph(nn.Module):
    """One patch's ONNX graph: ``(x, t[, cond], left, right, others) -> (out, left_edge, right_edge, local)``."""

    def __init__(self, patched: PatchUnet, conditioned: bool) -> None:
        super().__init__()
        self.patched, self.conditioned = patched, conditioned

    def forward(self, x: Tensor, t: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        cond = rest[0] if self.conditioned else None
        return tuple(self.patched(x, t, cond, *rest[-3:]))


class FullGraph(nn.Module):
    """The whole network's ONNX graph: ``(x, t[, cond]) -> (out, then each patch's left_edge, right_edge, local)``."""

    def __init__(self, patched: PatchUnet) -> None:
        super().__init__()
        self.patched = patched

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> tuple[Tensor, ...]:
        out, exchanges = self.patched.full(x, t, cond)
        return (out, *(e for ex in exchanges for e in ex))


class PatchSession:
    """One ONNX Runtime session of :class:`PatchGraph`, a :class:`~para_policy.stages.StagePipeline` runner.

    Called with ``(x, t, cond, left, right, others)``, or with ``(x, t, cond)`` after :attr:`pending`
    was set to ``(left, right, others)`` (how the pipeline calls the patch in the caller's thread);
    keeps its latest result in :attr:`last` (the pipeline returns only part of it). ``session``: an
    ``onnxruntime.InferenceSession`` (its ``run`` may be called from several threads at once, so
    the patches share one copy of the weights).
    """

    def __init__(self, session: Any, names: Sequence[str]) -> None:
        self.session = session
        self.names = list(names)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.pending: tuple[Tensor, ...] = ()
        self.last: PatchResult | None = None

    def __call__(self, inputs: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        given = [a for a in (*inputs, *(self.pending if len(inputs) == 3 else ())) if a is not None]
        feeds = {n: as_feed(a) for n, a in zip(self.names, given, strict=True)
                 if n in self.inputs}
        self.last = tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))  # type: ignore[assignment]
        return self.last  # type: ignore[return-value]


class OnnxPatches(PatchRunner):
    """:class:`PatchUnet` on ONNX Runtime: one session per patch on worker threads, one for the whole network.

    ``sample_shape``: ``(T, D)``; ``cond_dim``: G or None. ``parallel``: the patches run at once
    (patch 0 in the caller's thread, each other one on a :class:`~para_policy.stages.StagePipeline`
    worker) or one after the other in the caller's thread. :meth:`close` ends the workers.
    """

    def __init__(self, patched: PatchUnet, sample_shape: Sequence[int], cond_dim: int | None, *,
                 parallel: bool = True) -> None:
        T, D = (int(s) for s in sample_shape)
        patched.check_horizon(T)
        self.patches, n = patched.patches, T // patched.patches
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, T, D, generator=g), torch.tensor([3.0, 7.0])  # 2 rows: not the batch-1 fast path
        cond = None if cond_dim is None else torch.randn(2, cond_dim, generator=g)
        base = (x, t) if cond is None else (x, t, cond)
        names = ["x", "t", *([] if cond is None else ["condition"])]
        ex_names = [f"{k}{p}" for p in range(self.patches) for k in ("left_edge", "right_edge", "local")]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings
            self.full_session = make_session(export_graph(FullGraph(patched).eval(), base, names,
                                                          ["out", *ex_names]), 1)
            _, exchanges = patched.full(x, t, cond)
            left, right, others = neighbour_inputs(exchanges)[0]
            patch_names = [*names, "left", "right", "others"]
            graph = export_graph(PatchGraph(patched, cond is not None).eval(),
                                 (x[:, :n], *base[1:], left, right, others), patch_names,
                                 ["out", "left_edge", "right_edge", "local"])
        self.full_names = names
        session = make_session(graph, 1)
        self.runners = [PatchSession(session, patch_names) for _ in range(self.patches)]
        self.pipeline = StagePipeline(self.runners) if parallel and self.patches > 1 else None

    def full(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, list[PatchExchange]]:
        given = [a for a in (x, t.reshape(-1).expand(x.shape[0]), cond) if a is not None]
        feeds = {n: as_feed(a) for n, a in zip(self.full_names, given, strict=True)}
        outs = [torch.from_numpy(o) for o in self.full_session.run(None, feeds)]
        return outs[0], [tuple(outs[1 + 3 * p: 4 + 3 * p]) for p in range(self.patches)]  # type: ignore[misc]

    def run_patches(self, xs: Sequence[Tensor], t: Tensor, cond: Tensor | None,
                    inputs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[PatchResult]:
        t = t.reshape(-1).expand(xs[0].shape[0]).float()
        if self.pipeline is None:
            return [r((x, t, cond, *i)) for r, x, i in zip(self.runners, xs, inputs, strict=True)]  # type: ignore
        self.runners[0].pending = tuple(inputs[0])
        carries = [(x, *i) for x, i in zip(xs[1:], inputs[1:], strict=True)]
        self.pipeline.stale_step(xs[0], [t] * self.patches, cond, carries)  # type: ignore[arg-type]
        return [r.last for r in self.runners]  # type: ignore[misc]

    def close(self) -> None:
        """End the worker threads (joined; idempotent)."""
        if self.pipeline is not None:
            self.pipeline.close()


def patch_runner(model: nn.Module, num_patches: int, sample_shape: Sequence[int], *, backend: str = "default",
                 parallel: bool = True) -> PatchRunner:
    """``model`` split into ``num_patches`` patches of the horizon ``sample_shape = (T, D)``, ready to run.

    :class:`OnnxPatches` where ``backend`` (:func:`~para_policy.stages.stage_backend`, the stages'
    decision: ``'default'`` is ONNX Runtime where the network is CPU float32 and onnxruntime is
    installed) says so, else :class:`EagerPatches`. Raises (:func:`check_patchable`) for a network
    that does not split, and ``ValueError`` naming the horizon when it does not split into
    ``num_patches``.
    """
    check_patchable(model)
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"patches must be an integer >= 1, got {num_patches!r}")
    patched = PatchUnet(model, num_patches)  # type: ignore[arg-type]
    patched.check_horizon(int(sample_shape[0]))
    if stage_backend(model, backend) == "eager":
        return EagerPatches(patched)
    return OnnxPatches(patched, sample_shape, model.global_cond_dim, parallel=parallel)  # type: ignore[arg-type]
