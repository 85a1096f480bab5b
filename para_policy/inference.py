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
  (powers of two) and replayed from a CUDA graph captured per bucket, which removes the
  per-kernel launch cost that dominates small Picard rounds on a GPU
  (:mod:`para_policy.cuda_graphs`: captured when configured, recaptured when the weights
  change). On any other device it warns once and runs eagerly (nothing to capture). Not
  with ``devices``. On CUDA, fp32 calls run with TF32 off (exactness does not depend on
  the rows per call).
* ``backend='onnxruntime'``: the model exported to ONNX and run by ONNX Runtime on the CPU
  (:class:`~para_policy.onnx_backend.OnnxDenoiser`, the ``[onnx]`` extra): far less
  per-call overhead than eager PyTorch at a few rows, the same outputs up to float rounding.
  ``backend='auto'``: per row count, whichever of eager and ONNX Runtime measured faster
  when the denoiser was built (:class:`RowDispatchDenoiser`), since ONNX Runtime wins at the
  one-row calls of sequential sampling and eager can win at the wide calls of Picard rounds.
  Both are CPU fp32 only, so they refuse ``precision='bf16'``, ``compile``, ``cuda_graphs``
  and ``devices``. ``auto``'s cost curves are cached per machine and network architecture
  (``backends.json`` beside the window cache), so only the first build on a machine times them.
* ``backend='default'``: what :func:`default_backend` picks for the model where it is, the one
  place that decides (``load_policy``'s default): ``auto`` for a CPU fp32 model with the
  ``[onnx]`` extra installed, eager otherwise; ``$PARA_POLICY_BACKEND`` overrides it per process.

:func:`make_denoiser` composes them with several devices (:mod:`para_policy.devices`);
:func:`configure_inference` sets them on a policy (:meth:`LowdimPolicy.set_inference`), whose
:class:`InferenceRuntime` keeps them, the denoiser built from them and its rebuilds after moves,
copies and pickles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

# CudaGraphDenoiser, bucket_for and pad_rows lived here first: importable from both modules
from para_policy.cuda_graphs import (  # noqa: F401
    CudaGraphDenoiser,
    ExactFp32Denoiser,
    WeightsWatch,
    bucket_for,
    pad_rows,
)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
BACKENDS = ("eager", "onnxruntime", "auto")
#: ``backend='default'``: resolved by :func:`default_backend` to one of :data:`BACKENDS`
DEFAULT_BACKEND = "default"
#: environment variable: what ``backend='default'`` resolves to in this process (one of :data:`BACKENDS`)
BACKEND_ENV = "PARA_POLICY_BACKEND"
#: file of ``backend='auto'``'s cost curves, in the window cache's folder (:func:`para_policy.window.cache_path`)
CURVES_FILE = "backends.json"
log = logging.getLogger("para_policy.inference")
#: where ``backend='default'``'s pick is logged: the policy's logger, as docs/library.md says
choice_log = logging.getLogger("para_policy.policy")
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
#: ``((T, D), condition (1, ...) | None)``: the shapes of one denoiser call
Example = tuple[Sequence[int], torch.Tensor | None]
#: ``cuda_graphs``: the rows up to which graphs are captured when the denoiser is built
#: (DiffusionPolicy's 100 steps in one window of one sample; a policy passes its own step count)
DEFAULT_CAPTURE_ROWS = 128


def check_inference_options(compile: bool | str = False, precision: str = "fp32", cuda_graphs: bool = False,
                            backend: str = "eager", devices: Sequence[Any] | None = None) -> None:
    """Raise ``ValueError`` naming a bad option, or a combination the backend cannot run."""
    if not isinstance(compile, (bool, str)):
        raise ValueError(f"compile must be true/false or a torch.compile mode string, got {compile!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be true or false, got {cuda_graphs!r}")
    if backend not in (*BACKENDS, DEFAULT_BACKEND):
        raise ValueError(f"backend must be one of {[*BACKENDS, DEFAULT_BACKEND]}, got {backend!r}")
    if cuda_graphs and devices is not None:  # the replicas' threads and streams cannot run inside one capture
        raise ValueError("cuda_graphs=True cannot be combined with devices=[...]: a CUDA graph is captured on one "
                         "device and stream, and the replicas run on their own streams and threads; use "
                         "cuda_graphs=True on one device, or devices=[...] without cuda_graphs")
    if backend not in ("eager", DEFAULT_BACKEND):  # 'default' picks eager for eager-only features
        eager_only = {"precision='bf16'": precision != "fp32", "compile": bool(compile),
                      "cuda_graphs": cuda_graphs, "devices": devices is not None}
        clash = [name for name, on in eager_only.items() if on]
        if clash:
            raise ValueError(f"backend={backend!r} runs the fp32 model on the CPU and cannot be combined with "
                             f"{', '.join(clash)} (eager PyTorch features): use backend='eager' for them")


def default_backend(model: nn.Module, *, compile: bool | str = False, precision: str = "fp32",
                    cuda_graphs: bool = False, devices: Sequence[Any] | None = None) -> tuple[str, str]:
    """``(backend, why)``: what ``backend='default'`` runs ``model`` on; the one place that decides.

    Why a default other than eager: at the one-row calls of sequential sampling ONNX Runtime is
    several times cheaper than eager PyTorch on a CPU, and ``'auto'`` keeps eager where it wins
    (wide Picard rounds), so a user who never heard of backends gets the fastest measured runtime.
    In order:

    1. eager where an eager-only setting is on (``precision='bf16'``, ``compile``, ``cuda_graphs``,
       ``devices``): the user asked for a PyTorch feature;
    2. ``$PARA_POLICY_BACKEND`` when set to one of :data:`BACKENDS` (a process-wide choice; the
       test suite pins ``eager``);
    3. on a CUDA device, eager (captured CUDA graphs are the candidate there: return them from
       this branch once measured faster);
    4. ``'auto'`` for a float32 model on the CPU when onnxruntime and onnx are importable;
    5. eager otherwise (another device or dtype, or the ``[onnx]`` extra missing).
    """
    eager_only = {"precision='bf16'": precision != "fp32", "compile": bool(compile), "cuda_graphs": bool(cuda_graphs),
                  "devices": devices is not None}
    clash = [name for name, on in eager_only.items() if on]
    if clash:
        return "eager", f"{', '.join(clash)} run on eager PyTorch only"
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", DEFAULT_BACKEND):
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: must be one of {list(BACKENDS)} (or unset)")
        return forced, f"{BACKEND_ENV}={forced}"
    param = next(model.parameters(), None)
    device = torch.device("cpu") if param is None else param.device
    if device.type == "cuda":  # the hook for captured CUDA graphs (CudaGraphDenoiser) once they are measured faster
        return "eager", "a CUDA model runs on eager PyTorch"
    from para_policy.onnx_backend import check_exportable

    try:
        check_exportable(model)
    except ValueError:
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        return "eager", f"ONNX Runtime runs CPU float32 models only; this one is on {device} in {', '.join(dtypes)}"
    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        return "eager", f"{' and '.join(missing)} not installed (pip install 'para_policy[onnx]' for ONNX Runtime)"
    return "auto", "a CPU float32 model with onnxruntime installed: per row count, the faster of eager and ONNX Runtime"


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
    curves = None
    if backend == "auto":
        assert example is not None
        key = _curves_key(model, example, condition_kw)
        curves = _cached_curves(key)
    try:  # with cached curves the graph is exported on its first call, not now
        onnx = OnnxDenoiser(model, condition_kw=condition_kw, example=example if curves is None else None)
    except MissingExtraError as e:
        if backend == "onnxruntime":
            raise
        warnings.warn(f"backend='auto' runs eagerly: {e}", stacklevel=3)
        return eager
    if backend == "onnxruntime":
        return onnx
    assert example is not None
    backends = {"eager": eager, "onnxruntime": onnx}
    if curves is not None:
        return RowDispatchDenoiser(backends, curves)
    t0 = time.perf_counter()
    dispatch = RowDispatchDenoiser.measure(backends, example)
    from para_policy import window

    path = window.cache_path(CURVES_FILE)
    window.store_cache_entry(path, key, dispatch.curves)
    log.info("backend='auto': eager and ONNX Runtime timed in %.1f s (ONNX Runtime for %s rows)%s",
             time.perf_counter() - t0, [n for n, b in dispatch.choice.items() if b == "onnxruntime"],
             "" if path is None else f"; cached in {path}")
    return dispatch


def _curves_key(model: nn.Module, example: Example, condition_kw: str) -> str:
    """The cache key of ``auto``'s cost curves: the architecture (weight names, shapes and dtypes; not
    their values, which do not change a call's cost), one call's shapes, the row counts timed, the
    machine and the onnxruntime version."""
    from importlib.metadata import PackageNotFoundError, version

    from para_policy import window

    arch = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        arch.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    try:
        ort = version("onnxruntime")
    except PackageNotFoundError:
        ort = None
    condition = example[1]
    return json.dumps({"model": arch.hexdigest()[:20], "sample": list(example[0]), "condition_kw": condition_kw,
                       "condition": None if condition is None else list(condition.shape[1:]),
                       "rows": sorted(int(n) for n in window.DEFAULT_BATCHES), "machine": window.machine_id(),
                       "onnxruntime": ort}, sort_keys=True)


def _cached_curves(key: str) -> dict[str, dict[int, float]] | None:
    """``{backend: {rows: ms}}`` stored under ``key`` in ``backends.json``, or None (absent or malformed)."""
    from para_policy import window

    path = window.cache_path(CURVES_FILE)
    entry = window.read_cache_entry(path, key)
    try:
        curves = {str(b): {int(n): float(ms) for n, ms in c.items()} for b, c in entry.items()}
    except (AttributeError, TypeError, ValueError):
        return None
    if set(curves) != {"eager", "onnxruntime"} or len({tuple(sorted(c)) for c in curves.values()}) != 1 \
            or not curves["eager"]:
        return None
    log.info("backend='auto': cost curves of this machine and architecture from %s", path)
    return curves


def make_denoiser(model: nn.Module, *, compile: bool | str = False, precision: str = "fp32",
                  cuda_graphs: bool = False, devices: Sequence[str | torch.device] | None = None,
                  backend: str = "eager", example: Example | None = None,
                  condition_kw: str = "global_cond", capture_rows: int = DEFAULT_CAPTURE_ROWS) -> DenoiseFn:
    """The denoiser callable over ``model``: the one place where the inference wrappers are composed.

    From the inside out: the model (``torch.compile``'d when asked), called under bf16
    autocast when asked, on each of ``devices`` (:class:`~para_policy.devices.ReplicatedDenoiser`,
    each replica compiled and autocast in its own thread), and replayed from CUDA graphs
    outermost. ``(x (N,T,D), t (N,), condition (N,...) | None) -> (N,T,D)``.

    ``backend='onnxruntime'`` replaces all of that by the model exported to ONNX
    (:class:`~para_policy.onnx_backend.OnnxDenoiser`, exported now when ``example`` gives the
    shapes of one call, ``((T, D), condition (1, ...) | None)``, else on the first call);
    ``backend='auto'`` measures eager and ONNX Runtime on ``example`` now (a few seconds) and
    dispatches each call by its row count (:class:`RowDispatchDenoiser`), or reads the curves
    this machine measured before for the same architecture and shapes (``backends.json``) and
    exports on the first call; without onnxruntime installed it warns and returns the eager
    denoiser. ``backend='default'``: the one :func:`default_backend` picks for ``model``.

    On a CUDA device: with ``precision='fp32'`` every call runs with TF32 off
    (:class:`~para_policy.cuda_graphs.ExactFp32Denoiser`), so its rounding does not depend on
    the rows per call and tolerance 0 reproduces the sequential sample. With ``cuda_graphs``
    and ``example``, the graphs of every row-count bucket up to ``capture_rows`` rows are
    captured now (:class:`~para_policy.cuda_graphs.CudaGraphDenoiser`), for trajectories in
    the sampler's dtype (float32, or float64 for a float64 network); larger buckets are
    captured on first use, with a warning.
    """
    check_inference_options(compile, precision, cuda_graphs, backend, devices)
    if backend == DEFAULT_BACKEND:
        backend = default_backend(model, compile=compile, precision=precision, cuda_graphs=cuda_graphs,
                                  devices=devices)[0]
    dtype = PRECISIONS[precision]

    def single(net: nn.Module) -> DenoiseFn:
        module = net  # its parameters' dtype, read per call: the network may be cast after this is built
        if compile:
            net = torch.compile(net, dynamic=True, **({"mode": compile} if isinstance(compile, str) else {}))

        def denoise(x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
            # the sampler's state (float32) in, the network's own dtype for the call, x's dtype out;
            # no-op casts when they match
            weights = next(module.parameters()).dtype
            if condition is not None and condition.is_floating_point():
                condition = condition.to(weights)
            kw = {} if condition is None else {condition_kw: condition}
            if dtype is None:
                return net(x.to(weights), t, **kw).to(x.dtype)
            with torch.autocast(device_type=x.device.type, dtype=dtype, cache_enabled=False):  # capturable
                out = net(x.to(weights), t, **kw)
            return out.to(x.dtype)

        return denoise

    if backend != "eager":
        return _non_eager(model, backend, single(model), example, condition_kw)
    if devices is not None:
        from para_policy.devices import ReplicatedDenoiser

        fn: DenoiseFn = ReplicatedDenoiser(model, devices, wrap=single)
    else:
        fn = single(model)
    param = next(model.parameters())
    if param.device.type == "cuda" and dtype is None:
        fn = ExactFp32Denoiser(fn)
    if cuda_graphs:
        if param.device.type != "cuda":
            warnings.warn(f"cuda_graphs needs a CUDA device; the model is on {param.device}, so it runs eagerly",
                          stacklevel=2)
        else:
            sample_dtype = torch.promote_types(param.dtype, torch.float32)
            return CudaGraphDenoiser(fn, model=model, example=example, dtypes=(sample_dtype,),
                                     capture_rows=capture_rows)
    return fn


def configure_inference(policy: Any, *, compile: bool | str = False, precision: str = "fp32",
                        cuda_graphs: bool = False, backend: str = "eager") -> Any:
    """Set how ``policy``'s UNet runs (:meth:`LowdimPolicy.set_inference`); all defaults restore the plain model.

    ``backend``: ``'eager'`` (PyTorch), ``'onnxruntime'``, ``'auto'`` (per row count; see
    :func:`make_denoiser`) or ``'default'`` (:func:`default_backend`'s pick, re-made when the
    policy moves to another device or dtype). Keeps the policy's ``devices`` setting
    (:func:`para_policy.devices.use_devices`). Returns the policy.
    """
    check_inference_options(compile, precision, cuda_graphs, backend)
    return policy.set_inference(compile=compile, precision=precision, cuda_graphs=cuda_graphs, backend=backend)


class Refused:
    """The denoiser of a policy moved where its inference settings cannot run: every call raises why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, *args: Any) -> torch.Tensor:
        raise ValueError(self.reason)


class InferenceOwner(Protocol):
    """What :class:`InferenceRuntime` reads of the policy it serves (:class:`~para_policy.policy.LowdimPolicy`).

    The network and its conditioning keyword; where it is; the step counts and the
    ``(T, D)`` / conditioning shapes of one call, which ONNX exports and CUDA graphs are built
    for; the sampling session whose captured samplers depend on the denoiser.
    """

    model: nn.Module
    condition_kw: str
    num_inference_steps: int
    session: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def sampler(self) -> Any: ...

    def schedule_for(self, spec: Any) -> Any: ...

    def trajectory_shape(self, batch_size: int) -> tuple[int, int, int]: ...

    def conditioning(self, obs: Any) -> tuple[torch.Tensor | None, Any]: ...

    def zero_observation(self, batch_size: int) -> Any: ...

    def set_inference(self, **settings: Any) -> Any: ...


class StagedNetwork:
    """Gives a policy :meth:`staged`: its network cut into stages that run at once, what the ``asyncdiff``
    sampler finds behind the policy's ``denoise`` (:func:`~para_policy.samplers.asyncdiff.find_staged`),
    and :meth:`patched`: its network on patches of the horizon at once, what the ``patches`` sampler
    finds there (:func:`~para_policy.samplers.patches.find_patched`)."""

    runtime: InferenceRuntime

    def staged(self, num_stages: int) -> Any:
        """:meth:`InferenceRuntime.staged` for this policy: a :class:`~para_policy.stages.StagePipeline`."""
        return self.runtime.staged(self, num_stages)  # type: ignore[arg-type]

    def patched(self, num_patches: int) -> Any:
        """:meth:`InferenceRuntime.patched` for this policy: a :class:`~para_policy.patches.PatchRunner`."""
        return self.runtime.patched(self, num_patches)  # type: ignore[arg-type]


class InferenceRuntime:
    """How one policy's network runs: its inference settings and the denoiser built from them, kept right.

    Why apart from the policy: the policy turns observations into actions; this object decides
    what one denoiser call ``(x (N, T, D), t (N,), condition (N, ...) | None) -> (N, T, D)`` runs
    on (:func:`make_denoiser`) and keeps that denoiser valid when the network moves (``.to()``,
    ``.half()``), is copied or pickled, and when sampling runs from captured CUDA graphs. It
    keeps no reference to its policy (each method is handed the :class:`InferenceOwner`), so a
    copy of the policy copies it as plain state.

    Attributes:
        settings: the settings that differ from the defaults (fp32, eager, one device), with
            ``backend='default'`` resolved to the backend picked; ``{}``: the plain network.
        denoiser: the wrapped denoiser; None: the policy calls its plain network itself.
        backend_choice: ``(backend, why)`` while ``backend='default'`` is the request
            (:func:`default_backend`), else None.
    """

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.denoiser: DenoiseFn | None = None
        self.backend_choice: tuple[str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and pickle keep: all but the denoiser, which :meth:`restore` builds again
        (ONNX Runtime sessions do not pickle, and a copied closure would run the original's network),
        and the stage pipelines and patch runners (worker threads; :meth:`staged`, :meth:`patched`
        build them again)."""
        return {**vars(self), "denoiser": None, "stage_pipelines": {}, "patch_runners": {}, "weights_watch": None}

    def network_identity(self, owner: InferenceOwner) -> tuple[Any, ...]:
        """``(device, dtype, weights)`` of the owner's network: what a stage pipeline or patch runner is
        built for. Read on every sampling call, so the weights' identity comes from a kept
        :class:`~para_policy.cuda_graphs.WeightsWatch` (a walk over the modules only after one registered
        a tensor), not from listing every parameter again."""
        model = owner.model
        watch = vars(self).get("weights_watch")
        if watch is None or watch.model is not model:
            watch = self.weights_watch = WeightsWatch(model)
        watch.changed()
        return str(owner.device), owner.dtype, watch.identity

    def staged(self, owner: InferenceOwner, num_stages: int) -> Any:
        """The owner's network as a :class:`~para_policy.stages.StagePipeline` of ``num_stages`` stages.

        What the ``asyncdiff`` sampler runs: built on first use (the units timed, each stage exported to
        ONNX Runtime where the network is CPU float32, else eager) on the owner's call shapes, and
        again when the weights, device or dtype change (the old pipeline's threads are ended).
        """
        from para_policy.stages import cached_pipeline, stage_pipeline

        model = owner.model
        identity = self.network_identity(owner)

        def build() -> Any:
            with torch.inference_mode():
                condition = owner.conditioning(owner.zero_observation(1))[0]
                return stage_pipeline(model, num_stages, owner.trajectory_shape(1)[1:], condition)

        return cached_pipeline(vars(self).setdefault("stage_pipelines", {}), num_stages, identity, build)

    def patched(self, owner: InferenceOwner, num_patches: int) -> Any:
        """The owner's network on ``num_patches`` patches of its horizon: a :class:`~para_policy.patches.PatchRunner`.

        What the ``patches`` sampler runs: built on first use on the owner's trajectory shape
        (:func:`~para_policy.patches.patch_runner`: ONNX Runtime, one session per patch on worker
        threads, where the network is CPU float32, else eager; the stages' backend decision), and
        again when the weights, device or dtype change (the old runner's threads are ended).
        Only a ConditionalUnet1D with global conditioning (or none) splits; anything else, and a
        horizon the patches do not divide, raises naming what is supported.
        """
        from para_policy.patches import patch_runner
        from para_policy.stages import cached_pipeline

        model = owner.model
        identity = self.network_identity(owner)
        shape = owner.trajectory_shape(1)[1:]
        return cached_pipeline(vars(self).setdefault("patch_runners", {}), num_patches, identity,
                               lambda: patch_runner(model, num_patches, shape))

    def identity(self) -> str:
        """The settings as JSON: how the network runs, one part of what a measured window is specific to."""
        return json.dumps(self.settings, sort_keys=True, default=str)

    def configure(self, owner: InferenceOwner, **settings: Any) -> None:
        """:meth:`LowdimPolicy.set_inference <para_policy.policy.LowdimPolicy.set_inference>`: merge ``settings``
        into the current ones and build the denoiser.

        ``backend='default'`` stays the request until another backend is given: every later call
        (a move's rebuild included) picks again. ONNX exports and CUDA graphs are made now, on the
        owner's call shapes; graphs up front for the widest call of one sample (a window of every step).
        """
        merged = {**self.settings, **settings}
        choice = None
        if settings.get("backend", DEFAULT_BACKEND if self.backend_choice else None) == DEFAULT_BACKEND:
            choice = default_backend(owner.model, **{k: v for k, v in merged.items() if k != "backend"})
            merged["backend"] = choice[0]
            choice_log.info("backend='default' -> %r: %s", *choice)
        self.backend_choice = choice
        example = None
        # the shapes of one call, ((T, D), condition (1, ...)): ONNX exports and CUDA graphs are made now
        if merged.get("backend", "eager") != "eager" or merged.get("cuda_graphs"):
            with torch.inference_mode():
                example = (owner.trajectory_shape(1)[1:], owner.conditioning(owner.zero_observation(1))[0])
        rows = max(owner.num_inference_steps, owner.schedule_for(owner.sampler).num_steps)
        self.denoiser = make_denoiser(owner.model, condition_kw=owner.condition_kw, example=example,
                                      capture_rows=rows, **merged)
        self.settings = {k: v for k, v in merged.items() if v not in (None, False, "fp32", "eager")}
        owner.session.forget_captured()
        if not self.settings and owner.device.type != "cuda":  # on CUDA: the TF32-off wrapper (make_denoiser)
            self.denoiser = None

    def denoise(self, owner: InferenceOwner, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None
                ) -> torch.Tensor:
        """One denoiser call for ``owner``: its wrapped :attr:`denoiser`, or its plain network.

        ``x`` (N, T, D) in the sampler's dtype (float32) → the network's prediction (N, T, D) in
        ``x``'s dtype: ``x`` and the conditioning are cast to the network's dtype for the call, and
        its output (that dtype, or autocast's) back, so a network cast to bfloat16 or run under
        ``torch.autocast`` never sees, nor returns, another dtype than its own. Both casts are
        no-ops when the dtypes already match.
        """
        if self.denoiser is not None:  # make_denoiser's wrappers cast the same way
            return self.denoiser(x, t, condition)
        dtype = owner.dtype
        if condition is not None and condition.is_floating_point():
            condition = condition.to(dtype)
        return owner.model(x.to(dtype), t, **{owner.condition_kw: condition}).to(x.dtype)

    def captured(self, owner: InferenceOwner, spec: Any, schedule: Any) -> Any:
        """On CUDA with ``cuda_graphs``: the captured form of ``spec`` (None: it has none, or not on CUDA).

        The sequential loop captured whole, or Picard's ``round_shape='fixed'`` rounds captured one
        graph per (B, W), model and bookkeeping together
        (:func:`~para_policy.samplers.captured.captured_sampler`), over the plain network at the
        owner's precision (a graph cannot hold the denoiser's own graphs); captured on the first
        call of each shape, so call once before a control loop starts; recaptured when the weights change.
        """
        if not self.settings.get("cuda_graphs") or owner.device.type != "cuda":
            return None

        def plain_network() -> tuple[DenoiseFn, Callable[[], bool]]:
            plain = make_denoiser(owner.model, precision=self.settings.get("precision", "fp32"),
                                  condition_kw=owner.condition_kw)
            return plain, WeightsWatch(owner.model).changed

        return owner.session.captured(spec, schedule, plain_network)

    @staticmethod
    def placement(owner: InferenceOwner) -> tuple[torch.device, torch.dtype] | None:
        """``(device, dtype)`` of the owner's network (None before it has one): read before a move."""
        model = getattr(owner, "model", None)
        first = None if model is None else next(model.parameters(), None)
        return None if first is None else (first.device, first.dtype)

    def moved(self, owner: InferenceOwner, before: tuple[torch.device, torch.dtype] | None) -> None:
        """After ``.to()``, ``.cuda()``, ``.half()`` and the like (``before``: :meth:`placement` before it).

        A backend ``'default'`` picked is picked again where it no longer fits (ONNX Runtime for a
        model moved to a GPU), and a denoiser built for another device or dtype is built again for
        this one (CUDA graphs captured, TF32 off on CUDA); settings that cannot run here warn now
        and raise on every call, naming them (:class:`Refused`).
        """
        stale = self.backend_choice is not None and self.backend_choice[0] != default_backend(
            owner.model, **{k: v for k, v in self.settings.items() if k != "backend"})[0]
        moved = before is not None and (owner.device, owner.dtype) != before and (
            bool(self.settings) or self.denoiser is not None or owner.device.type == "cuda")
        if not (stale or moved):
            return
        try:
            owner.set_inference()
        except ValueError as e:
            where = "" if before is None else f" from {before[0]} ({before[1]})"
            reason = (f"the policy moved{where} to {owner.device} ({owner.dtype}), where its inference settings "
                      f"{self.settings} cannot run: {e}")
            warnings.warn(reason, stacklevel=3)
            self.denoiser = Refused(reason)

    def restore(self, owner: InferenceOwner) -> None:
        """After a copy or unpickling: build the denoiser again where one ran (settings given, or CUDA's TF32 off)."""
        if self.settings or owner.device.type == "cuda":
            owner.set_inference()
