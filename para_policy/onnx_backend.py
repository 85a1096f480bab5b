"""The denoiser exported to ONNX and run by ONNX Runtime on the CPU (``backend='onnxruntime'``).

Why: at one row per call (sequential sampling) an eager PyTorch forward of the small
DiffusionPolicy networks is mostly per-operator dispatch overhead; ONNX Runtime runs the same
graph with far less of it. At many rows per call (Picard rounds) eager PyTorch's kernels win
again, which is why :mod:`para_policy.inference` also offers ``backend='auto'``, choosing per
row count. Imported lazily: ``import para_policy`` never needs onnxruntime, which comes with the
``[onnx]`` extra.

The graph is exported with PyTorch's TorchScript-based exporter (``dynamo=False``): the same
outputs as the ``torch.export``-based one (``dynamo=True``) on the shipped UNet, and a quicker
export; the latter is the fallback where the former fails. The row dimension is dynamic; one
graph is exported per trajectory shape ``(T, D)`` and condition shape, and again after the
weights change in place (``load_state_dict``, an optimizer step), so the session never runs
stale weights.
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from para_policy.extras import require

#: ONNX opset of the exported graph
OPSET = 17
#: onnxruntime graph optimization level names (``ORT_ENABLE_<level>``)
OPTIMIZATION_LEVELS = ("basic", "extended", "all")
_PURPOSE = "backend='onnxruntime' (ONNX Runtime on the CPU)"


def import_onnxruntime() -> Any:
    """``onnxruntime``, or :class:`~para_policy.extras.MissingExtraError` naming the ``[onnx]`` extra."""
    return require("onnxruntime", "onnx", purpose=_PURPOSE)


def as_feed(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """``a`` as the float32, contiguous CPU numpy array a session's ``run`` takes; no copy and no torch call
    where it already is one (an ONNX Runtime output passed on, the usual case).

    Why no torch call: each releases and takes back the GIL, so a worker thread converting a
    stage's inputs while the caller steps the sample hands the GIL back and forth at every one.
    """
    if isinstance(a, np.ndarray):
        return a if a.dtype == np.float32 and a.flags.c_contiguous else np.ascontiguousarray(a, dtype=np.float32)
    if a.dtype is not torch.float32 or a.requires_grad or a.device.type != "cpu" or not a.is_contiguous():
        a = a.detach().to("cpu", torch.float32).contiguous()
    return a.numpy()


def check_exportable(model: nn.Module) -> None:
    """``ValueError`` unless every parameter and buffer of ``model`` is a CPU tensor and its floats float32."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    devices = sorted({str(p.device) for p in tensors if p.device.type != "cpu"})
    if devices:
        raise ValueError(f"backend='onnxruntime' runs the model on the CPU, but it is on {', '.join(devices)}: "
                         "move the policy to the CPU (policy.to('cpu')) or use backend='eager'")
    dtypes = sorted({str(p.dtype) for p in tensors if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:
        raise ValueError(f"backend='onnxruntime' runs float32 models only; this one holds {', '.join(dtypes)}")


class _Graph(nn.Module):
    """What is exported: ``(x (N,T,D), t (N,) float32[, condition (N,...)]) -> (N,T,D)``."""

    def __init__(self, model: nn.Module, condition_kw: str) -> None:
        super().__init__()
        self.model = model
        self.condition_kw = condition_kw

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, **({} if condition is None else {self.condition_kw: condition}))


def export_onnx(model: nn.Module, sample_shape: Sequence[int], condition_shape: Sequence[int] | None,
                condition_kw: str = "global_cond") -> bytes:
    """The serialized ONNX graph of ``model`` for trajectories ``(N, *sample_shape)``, rows dynamic.

    ``condition_shape``: the trailing shape of one row's condition, or None for an unconditioned
    model. The timestep input is float32, as the models' sinusoidal embedding casts it.
    Exported from 2 example rows: a 1-row example would trace the UNet's batch-1 fast path.
    """
    g = torch.Generator().manual_seed(0)
    args: tuple[torch.Tensor, ...] = (torch.randn(2, *sample_shape, generator=g), torch.tensor([3.0, 7.0]))
    names = ["x", "t"]
    if condition_shape is not None:
        args += (torch.randn(2, *condition_shape, generator=g),)
        names.append("condition")
    graph = _Graph(model, condition_kw)
    training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    graph.eval()  # inference graph (no dropout); the exporters restore the wrapper's mode, this the model's
    # PyTorch's fused transformer-layer kernels have no ONNX form: trace the plain layers
    torch.backends.mha.set_fastpath_enabled(False)
    # the graph ONNX Runtime runs is float32: a caller's torch.autocast (predict_action under autocast
    # exports on a new shape) would trace half-precision casts into it, which the runtime refuses
    with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about the model's shape checks
        try:
            return export_graph(graph, args, names)
        finally:
            model.train(training)
            torch.backends.mha.set_fastpath_enabled(fastpath)


def export_graph(graph: nn.Module, args: tuple[torch.Tensor, ...], names: Sequence[str],
                 outputs: Sequence[str] = ("out",)) -> bytes:
    """The TorchScript-based exporter's ONNX bytes, or the ``torch.export``-based one's where it fails.

    ``names``: one per tensor of ``args``; ``outputs``: one per output tensor. Dimension 0 of every
    input and output is dynamic (rows). Call under ``torch.no_grad()`` with ``graph`` in eval mode.
    """
    names, outputs = list(names), list(outputs)
    try:
        buf = io.BytesIO()
        torch.onnx.export(graph, args, buf, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=outputs, dynamic_axes={k: {0: "rows"} for k in [*names, *outputs]})
        return buf.getvalue()
    except Exception as legacy_error:  # the legacy exporter may be gone, or refuse the model
        try:
            rows = torch.export.Dim("rows", min=1)
            program = torch.onnx.export(graph, args, dynamo=True, input_names=names, output_names=outputs,
                                        dynamic_shapes=tuple({0: rows} for _ in names), verbose=False)
        except Exception as e:
            raise RuntimeError(f"exporting the denoiser to ONNX failed (TorchScript exporter: {legacy_error}; "
                               f"torch.export exporter: {e})") from e
        return program.model_proto.SerializeToString()


def make_session(graph: bytes, threads: int, optimization: str = "all") -> Any:
    """An ``onnxruntime.InferenceSession`` of the serialized ``graph`` on the CPU with ``threads`` intra-op threads.

    One inter-op thread, sequential execution, passive waiting (as ``OMP_WAIT_POLICY=PASSIVE`` for
    torch: spinning workers slow a busy machine); ``optimization``: one of :data:`OPTIMIZATION_LEVELS`.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {list(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{optimization.upper()}")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _weights_version(tensors: Sequence[torch.Tensor]) -> int:
    """Sum of the in-place version counters of the weights: changes when any weight is written in place."""
    return sum(p._version for p in tensors)


class OnnxDenoiser:
    """A denoiser run by an ``onnxruntime.InferenceSession`` on the CPU, with eager's signature.

    ``(x (N,T,D) float32, t (N,) int or float, condition (N,...) | None) -> (N,T,D)`` float32
    CPU tensor, within float rounding of ``model(x, t, **{condition_kw: condition})`` (timesteps
    are fed as float32, which is what the models' timestep embedding computes with in eager mode).

    Args:
        model: a CPU float32 network (``ConditionalUnet1D``, ``TransformerForDiffusion``).
        condition_kw: the keyword the model takes its condition by.
        example: ``((T, D), condition (1, ...) | None)`` of one call, to export now rather than
            on the first call of that shape.
        threads: intra-op threads (default ``torch.get_num_threads()`` now).
        optimization: onnxruntime graph optimizations, ``'basic'``, ``'extended'`` or ``'all'``.
    Raises:
        ValueError: the model is not on the CPU or not float32.
        MissingExtraError: onnxruntime is not installed (``pip install 'para_policy[onnx]'``).
    """

    def __init__(self, model: nn.Module, *, condition_kw: str = "global_cond",
                 example: tuple[Sequence[int], torch.Tensor | None] | None = None,
                 threads: int | None = None, optimization: str = "all") -> None:
        check_exportable(model)
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {list(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.ort = import_onnxruntime()
        self.model = model
        self.condition_kw = condition_kw
        self.threads = int(threads or torch.get_num_threads())
        self.optimization = optimization
        self.sessions: dict[tuple, Any] = {}
        self.weights = list(itertools.chain(model.parameters(), model.buffers()))  # listed once: cheap per call
        self.version = _weights_version(self.weights)
        if example is not None:
            sample_shape, condition = example
            self.session(tuple(sample_shape), None if condition is None else tuple(condition.shape[1:]))

    def session(self, sample_shape: tuple[int, ...], condition_shape: tuple[int, ...] | None) -> Any:
        """The inference session for one trajectory and condition shape (exported on first use)."""
        version = _weights_version(self.weights)
        if version != self.version:
            self.sessions.clear()
            self.version = version
        key = (sample_shape, condition_shape)
        if key not in self.sessions:
            graph = export_onnx(self.model, sample_shape, condition_shape, self.condition_kw)
            self.sessions[key] = make_session(graph, self.threads, self.optimization)
        return self.sessions[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or (condition is not None and condition.device.type != "cpu"):
            raise ValueError(f"backend='onnxruntime' takes CPU tensors, got x on {x.device}")
        if x.dtype != torch.float32:
            raise ValueError(f"backend='onnxruntime' runs float32 only, got x of {x.dtype}")
        n = x.shape[0]
        t = torch.as_tensor(t).reshape(-1).expand(n).to(torch.float32)
        feeds = {"x": as_feed(x), "t": as_feed(t)}
        cond_shape = None
        if condition is not None:
            feeds["condition"] = as_feed(condition)
            cond_shape = tuple(condition.shape[1:])
        out = self.session(tuple(x.shape[1:]), cond_shape).run(None, feeds)[0]
        return torch.from_numpy(out)
