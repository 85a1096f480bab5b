"""The robot side of the policy server: :class:`RemoteController`, the Controller's loop over the network.

Imports numpy, grpcio and safetensors only (no torch), so it runs on the robot's small computer
while the policy runs on a machine with a GPU (``para-policy serve``). :class:`PolicyClient` is
one connection and the server's five calls; :class:`RemoteController` is
:class:`~para_policy.chunk_loop.ChunkLoop`'s schedule (``sync``, ``async``, ``rtc`` with soft
masking and ``extend_plan``) with each chunk sampled by the server, its delay measured from the
round trip. Faults: a chunk that fails (server gone, hung past ``timeout_s``, restarted) is
counted, the loop runs on along the current plan (``extend_plan``) and then holds the last action
instead of blocking, and the next chunk is requested again after a backoff, on a new session when
the server forgot the old one. docs/serving.md has the walkthrough.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from para_policy.chunk_loop import (
    CONTROLLER_OPTIONS,
    ChunkLoop,
    ChunkRecord,
    ChunkResult,
    ControllerConfig,
    ControllerConfigError,
    by_key,
)
from para_policy.extras import require
from para_policy.serving.protocol import AUTH_HEADER, DEFAULT_MAX_MESSAGE_BYTES, OBS_PREFIX, TOKEN_ENV, method_path
from para_policy.serving.wire import decode, encode
from para_policy.stats import percentile_summary

#: gRPC codes after which the next chunk is simply requested again (after a backoff)
RETRY_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "NOT_FOUND", "INTERNAL", "CANCELLED",
               "UNKNOWN")
BACKOFF_S = (0.05, 2.0)  # after a failed chunk: the first wait before the next and the longest, doubling
RETRY_WAIT_S = (0.005, 0.1)  # within one chunk's timeout: waits before asking a busy server again, doubling
ERRORS_KEPT = 20


class RemoteError(RuntimeError):
    """A call to the policy server failed; ``code`` is the gRPC status name (``'UNAVAILABLE'``, ...)."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method} failed: {code}: {details}")
        self.method, self.code, self.details = method, code, details


class PolicyClient:
    """One connection to a policy server and its calls (``Health``, ``Metadata``, ``Open``, ``Chunk``,
    ``Close``; :mod:`para_policy.serving.protocol`). Every failure is a :class:`RemoteError`.

    Args:
        address: ``'host:port'``.
        token: the shared secret (None: the ``PARA_POLICY_TOKEN`` environment variable, if set).
        root_certificates: PEM bytes (or a file path) of the server's certificate authority: TLS.
            None: a plain channel (loopback, or a network you trust).
        timeout_s: each call's deadline.
    """

    def __init__(self, address: str, *, token: str | None = None, root_certificates: bytes | str | None = None,
                 timeout_s: float = 5.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.grpc = require("grpc", "client", "the policy server's client (RemoteController)")
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"address must be 'host:port', got {address!r}")
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self.address, self.timeout_s, self.max_message_bytes = address, float(timeout_s), int(max_message_bytes)
        self._metadata = ((AUTH_HEADER, f"Bearer {token.strip()}"),) if token else ()
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        if root_certificates is None:
            self.channel = self.grpc.insecure_channel(address, options=options)
        else:
            if isinstance(root_certificates, str):
                with open(root_certificates, "rb") as f:
                    root_certificates = f.read()
            creds = self.grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = self.grpc.secure_channel(address, creds, options=options)
        self._stubs = {}

    def call(self, method: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None,
             timeout_s: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One call: ``(reply arrays, reply metadata)``."""
        stub = self._stubs.get(method)
        if stub is None:
            stub = self._stubs[method] = self.channel.unary_unary(method_path(method))
        try:
            reply = stub(encode(arrays or {}, meta), timeout=self.timeout_s if timeout_s is None else timeout_s,
                         metadata=self._metadata)
        except self.grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            raise RemoteError(method, getattr(code, "name", "UNKNOWN"), e.details() if hasattr(e, "details") else str(e)
                              ) from None
        return decode(reply, max_bytes=self.max_message_bytes)

    def health(self) -> dict[str, Any]:
        return self.call("Health", {})[1]

    def metadata(self) -> dict[str, Any]:
        return self.call("Metadata", {})[1]

    def open(self, seed: int | None = None) -> str:
        return str(self.call("Open", {"seed": seed})[1]["session"])

    def close_session(self, session: str) -> None:
        self.call("Close", {"session": session}, timeout_s=min(self.timeout_s, 1.0))

    def close(self) -> None:
        self.channel.close()


def _observation_arrays(observation: Any, shapes: Mapping[str, tuple[int, ...]], lead: tuple[int, ...] = ()
                        ) -> dict[str, np.ndarray]:
    """``observation`` (a dict, or a bare array for one key) as checked float32 arrays ``{key: (*lead, *shape)}``."""
    observation = by_key(observation, list(shapes))
    out = {}
    for key, shape in shapes.items():
        x = np.asarray(observation[key])
        if x.dtype.kind not in "fiub":
            raise ValueError(f"observation {key!r} must be numbers, got dtype {x.dtype}")
        x = x.astype(np.float32)
        if x.shape != (*lead, *shape):
            raise ValueError(f"observation {key!r} must have shape {(*lead, *shape)}, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"observation {key!r} contains NaN or inf")
        out[key] = x
    return out


class RemoteController(ChunkLoop):
    """The :class:`~para_policy.controller.Controller`'s interface with the policy on a server.

    Args:
        address: the server's ``'host:port'`` (``para-policy serve`` prints it).
        token, root_certificates, timeout_s: the connection (:class:`PolicyClient`); ``timeout_s`` is
            each chunk's deadline: a hung server costs at most that before the chunk counts as failed.
        config: a :class:`~para_policy.chunk_loop.ControllerConfig`, or None to build one from ``options``
            (``mode='rtc'``, ``period_s=0.1``, ``delay_steps``, ``extend_plan``, ``seed``, ...). The
            sampler is the server's; ``devices`` is the server's business and refused here.

    Shapes: ``act(observation (obs_dim,) or {key: (*shape)}) -> (action_dim,)`` float32;
    ``predict_chunk(observations (n_obs_steps, ...)) -> (n_action_steps, action_dim)``.

    What happens on faults (async / rtc on the wall clock): a chunk that fails is counted
    (``stats()['failures']``); the loop runs the current plan on (``extend_plan``), then holds the
    last action (``held_steps``) rather than block, and asks again after a backoff
    (0.05 s doubling to 2 s), opening a new session when the server was restarted
    (``reconnects``). ``sync`` mode and the ``steps`` clock wait for each chunk, so there a failed
    chunk raises :class:`RemoteError` from :meth:`act`.
    """

    def __init__(self, address: str, *, token: str | None = None, root_certificates: bytes | str | None = None,
                 timeout_s: float = 5.0, config: ControllerConfig | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(CONTROLLER_OPTIONS))
        if unknown:
            raise ValueError(f"RemoteController does not take {unknown}: its options are ControllerConfig fields "
                             f"({', '.join(CONTROLLER_OPTIONS)}); the sampler is chosen by the server")
        if config is not None and options:
            raise ValueError(f"{sorted(options)} are ControllerConfig fields: pass them in config or as keywords, "
                             "not both")
        config = ControllerConfig(**options) if config is None else config
        if config.devices is not None:
            raise ControllerConfigError("devices", "devices: the server chooses its devices; RemoteController "
                                                   "takes no devices")
        self.client = PolicyClient(address, token=token, root_certificates=root_certificates, timeout_s=timeout_s)
        self.address = address
        try:
            self.server = meta = self.client.metadata()
        except BaseException:
            self.client.close()
            raise
        self.shapes = {k: tuple(v["shape"]) for k, v in meta["observations"].items()}
        self.sampler = meta["sampler"]  # {"name", "iterative", "warm_start", "options"}
        config.check_sampler(_SpecView(self.sampler))
        self._start_loop(config, meta["n_obs_steps"], meta["n_action_steps"])
        self._lock = threading.Lock()  # the session id and the counters: the worker thread changes them
        self.session = self.client.open(config.seed)
        self.round_trip_ms: deque[float] = deque(maxlen=config.max_records)
        self.server_ms: deque[float] = deque(maxlen=config.max_records)
        self.failures = self.reconnects = self.held_steps = 0
        self.errors: deque[str] = deque(maxlen=ERRORS_KEPT)
        self._backoff_s, self._retry_at, self._last_action = BACKOFF_S[0], 0.0, None
        self._last_chunk: int | None = None  # predict_chunk's warm start
        self.noise_key: tuple[int, ...] | None = None
        self._chunk_index = 0
        self.reset()

    @property
    def warm_start(self) -> bool:
        """Whether each chunk starts from the previous one (the config's, else the server sampler's setting)."""
        own = self.config.warm_start
        return bool(self.sampler.get("warm_start", False)) if own is None else own

    def act(self, observation: np.ndarray | Mapping[str, Any]) -> np.ndarray:
        """One control step: ``observation`` in, the next action (action_dim,) out (see :meth:`Controller.act`)."""
        action = self._next_action(observation)
        self._last_action = action
        return action

    def predict_chunk(self, observations: np.ndarray | Mapping[str, Any]) -> np.ndarray:
        """``(n_action_steps, action_dim)`` actions from ``(n_obs_steps, ...)`` observations, warm-started from the
        previous call's chunk shifted by ``n_action_steps`` (as :meth:`Controller.predict_chunk`)."""
        self._settle()
        history = _observation_arrays(observations, self.shapes, (self.n_obs_steps,))
        warm = (self._last_chunk, self.n_action_steps) if self.warm_start and self._last_chunk is not None else False
        result = self._sample(history, warm, None, None)
        self.records.append(result.record)
        self._last_chunk = result.source
        return result.actions

    def reset(self) -> None:
        """Start a new episode (history, queue, current chunk; the server session and its noise stream stay)."""
        super().reset()
        self._last_chunk = None
        self._chunk_index = 0

    def reset_stats(self) -> None:
        """Forget the loop's records and the network's figures (round trips, failures, reconnects, held steps)."""
        super().reset_stats()
        with self._lock:
            self.round_trip_ms.clear()
            self.server_ms.clear()
            self.errors.clear()
            self.failures = self.reconnects = self.held_steps = 0

    def key_noise(self, key: tuple[int, ...] | None) -> None:
        """Draw each chunk's noise from ``key + (chunk index since reset,)`` instead of the session's stream.

        The server seeds a generator with :func:`~para_policy.bench.noise.seed_for` of the key for each
        chunk, so a run is reproducible chunk by chunk, and the evaluator gives a served episode the
        very noise its in-process episode gets. None: the session's stream again.
        """
        if key is not None and not (isinstance(key, tuple) and all(isinstance(k, int) and k >= 0 for k in key)):
            raise ValueError(f"key must be a tuple of non-negative ints (or None), got {key!r}")
        self.noise_key = key

    def close(self) -> None:
        """Stop the worker, end the server session (if the server still answers) and close the channel."""
        super().close()
        try:
            self.client.close_session(self.session)
        except RemoteError:
            pass
        self.client.close()

    def __enter__(self) -> RemoteController:
        return self

    # ---- ChunkLoop's hooks -------------------------------------------------------------
    def _step_observation(self, observation: Any) -> dict[str, np.ndarray]:
        return _observation_arrays(observation, self.shapes)

    def _history(self) -> dict[str, np.ndarray]:
        return {k: np.stack([o[k] for o in self.observations]) for k in self.shapes}

    def _sample(self, history: Mapping[str, np.ndarray], warm: tuple[int, int] | bool | None,
                prefix: np.ndarray | None, guide: np.ndarray | None) -> ChunkResult:
        """One ``Chunk`` call; a session the server no longer knows (it restarted) is opened again, once."""
        arrays = {OBS_PREFIX + k: v for k, v in history.items()}
        meta: dict[str, Any] = {"warm": {"chunk": int(warm[0]), "shift": int(warm[1])} if isinstance(warm, tuple)
                                else None, "deadline_ms": self.deadline_ms}
        if self.noise_key is not None:
            meta["noise_key"] = [*self.noise_key, self._chunk_index]
        self._chunk_index += 1
        if prefix is not None:
            arrays["prefix"], meta["prefix_mode"] = prefix.astype(np.float32), self.prefix_mode
        if guide is not None:
            arrays["guide"] = guide.astype(np.float32)
        try:
            return self._call_chunk(arrays, meta)
        except RemoteError as e:
            if e.code != "NOT_FOUND":
                raise
            with self._lock:
                self.session = self.client.open(self.config.seed)
                self.reconnects += 1
            return self._call_chunk(arrays, {**meta, "warm": None})

    def _call_chunk(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ChunkResult:
        """One ``Chunk`` call, asked again while the server is busy or unreachable (``RESOURCE_EXHAUSTED``,
        ``UNAVAILABLE``: a full queue, a restart) until ``timeout_s`` from the first try has passed."""
        start = time.perf_counter()
        end, wait = start + self.client.timeout_s, RETRY_WAIT_S[0]
        while True:
            try:
                reply, info = self.client.call("Chunk", {**meta, "session": self.session}, arrays,
                                               timeout_s=max(end - time.perf_counter(), 0.001))
                break
            except RemoteError as e:
                if e.code not in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") or time.perf_counter() + wait >= end:
                    raise
                time.sleep(wait)
                wait = min(2 * wait, RETRY_WAIT_S[1])
        rtt = (time.perf_counter() - start) * 1000
        with self._lock:
            self.round_trip_ms.append(rtt)
            self.server_ms.append(float(info["server_ms"]))
            self._backoff_s = BACKOFF_S[0]
        d = self.deadline_ms
        record = ChunkRecord(latency_ms=rtt, rounds=int(info["rounds"]), model_evals=int(info["model_evals"]),
                             converged=bool(info["converged"]), deadline_hit=bool(info["deadline_hit"]),
                             overrun=d is not None and rtt > d, warm=bool(info["warm"]))
        return ChunkResult(actions=reply["action"], plan=reply["plan"], source=int(info["chunk"]), record=record)

    def _failed(self, job: Any) -> None:
        """Count the failed chunk and wait out a backoff before the next; raise what is not a server fault."""
        try:
            job.output()
        except RuntimeError as e:
            cause = e.__cause__
            if not isinstance(cause, RemoteError) or cause.code not in RETRY_CODES:
                raise
            with self._lock:
                self.failures += 1
                self.errors.append(str(cause))
                self._retry_at = time.perf_counter() + self._backoff_s
                self._backoff_s = min(2 * self._backoff_s, BACKOFF_S[1])

    def _may_launch(self) -> bool:
        return time.perf_counter() >= self._retry_at

    def _hold(self) -> bool:
        """Wall clock: the next chunk is late and the plan ran out: repeat the last action instead of blocking."""
        if self.clock != "wall" or self._last_action is None:
            return False
        self.actions.append(self._last_action)
        self.held_steps += 1
        return True

    def stats(self) -> dict[str, Any]:
        """The Controller's statistics (:meth:`Controller.stats`) plus the network's: ``round_trip_ms`` (a
        chunk's call as the robot saw it), ``server_ms`` (its sampling on the server), ``overhead_ms``
        (their difference: encoding, the network, the server's queue), ``failures``, ``reconnects``,
        ``held_steps`` and the last ``errors``."""
        rtt, srv = list(self.round_trip_ms), list(self.server_ms)
        return {"sampler": self.sampler.get("name"), "options": dict(self.sampler.get("options", {})),
                "warm_start": self.warm_start, **self.loop_stats(), "server": self.address,
                "round_trip_ms": percentile_summary(rtt), "server_ms": percentile_summary(srv),
                "overhead_ms": percentile_summary([a - b for a, b in zip(rtt, srv, strict=True)]),
                "failures": self.failures, "reconnects": self.reconnects, "held_steps": self.held_steps,
                "errors": list(self.errors)}


class _SpecView:
    """What :meth:`ControllerConfig.check_sampler` reads of a sampler spec, from the server's metadata."""

    def __init__(self, sampler: Mapping[str, Any]) -> None:
        self.name = sampler.get("name")
        self.iterative = bool(sampler.get("iterative", False))
