"""The policy server: a loaded policy answering :mod:`~para_policy.serving.protocol`'s five methods over gRPC.

Why it is built this way:

* Safe by default. It binds 127.0.0.1; beyond loopback it needs a token, checked in constant time
  before the payload is even parsed. Payloads are parsed by :func:`~para_policy.serving.wire.decode`
  (no pickle, no code), and every field of a request is checked against the policy (names, shapes,
  dtypes, finite values, lengths, the session) before anything reaches the model, so a bad request
  gets INVALID_ARGUMENT / NOT_FOUND naming the field instead of an exception deep in the sampler.
* Isolated sessions. Each session has its own noise generator and its own recent trajectories
  (warm start), and every model call passes an explicit ``guess=`` or ``warm_start=False``, so the
  policy's own warm-start memory, shared by all clients, never carries one client's chunk into
  another's. With the same seed and inputs a served chunk is the in-process
  :class:`~para_policy.controller.Controller`'s chunk: the same ``predict_action`` call.
* Bounded work. One model call at a time (a lock); one request in flight per session; at most
  ``max_pending`` Chunk requests holding or waiting for the model, and gRPC's own limit on
  concurrent calls: the excess is refused RESOURCE_EXHAUSTED at once instead of queueing. A failed
  sampling call is INTERNAL for that request only.

:class:`PolicyServer` holds the handlers (callable without a network: ``handle(method, bytes, context)``);
:func:`serve` puts them on a gRPC port.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.bench.noise import chunk_noise, seed_for
from para_policy.controller import generator_on
from para_policy.extras import require
from para_policy.image_policy import ImagePolicy, check_image_range
from para_policy.policy_config import RGB
from para_policy.samplers import SamplerConfig, sampler_spec, shift_trajectory
from para_policy.serving.protocol import (
    AUTH_HEADER,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PORT,
    METHODS,
    OBS_PREFIX,
    SERVICE,
)
from para_policy.serving.wire import WireError, decode, encode
from para_policy.session import PREFIX_MODES

grpc = require("grpc", "serve")

log = logging.getLogger("para_policy.serving")
#: the longest status message sent back (and logged): a hostile name cannot make it large
MAX_DETAIL_CHARS = 400
#: the longest session id accepted (ids this server hands out are 32 hex characters)
MAX_SESSION_ID_CHARS = 64
#: the largest ``deadline_ms`` a request may ask for
MAX_DEADLINE_MS = 60_000.0
#: the largest seed ``Open`` accepts (a torch generator seed)
MAX_SEED = 2 ** 63 - 1
LOOPBACK_NAMES = ("localhost",)


class Refused(Exception):
    """A request refused with a gRPC status ``code`` and a ``message`` naming what was wrong."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message[:MAX_DETAIL_CHARS]


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the port on this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname may resolve anywhere


def check_keys(meta: Mapping[str, Any], allowed: tuple[str, ...], method: str,
               arrays: Mapping[str, Any] | None = None) -> None:
    """INVALID_ARGUMENT for metadata keys outside ``allowed`` or (``arrays`` given) any array: ``method`` takes none."""
    unknown = sorted(set(meta) - set(allowed))
    if unknown:
        raise invalid(f"{method}: unknown metadata keys {[str(u)[:40] for u in unknown[:5]]}; expected only "
                      f"{list(allowed)}")
    if arrays:
        raise invalid(f"{method} takes no arrays, got {[str(a)[:40] for a in sorted(arrays)[:5]]}")


def checked_int(value: Any, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` if it is a JSON integer in ``[minimum, maximum]``, else INVALID_ARGUMENT naming ``name``."""
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise invalid(f"{name} must be an integer >= {minimum}{upper}, got {value!r}")
    return value


def checked_session(meta: Mapping[str, Any], method: str) -> str:
    sid = meta.get("session")
    if not isinstance(sid, str) or not 0 < len(sid) <= MAX_SESSION_ID_CHARS:
        raise invalid(f"{method}: 'session' must be the id string Open returned, got {str(sid)[:80]!r}")
    return sid


@dataclass(frozen=True)
class PolicyShape:
    """What a request is checked against, read once from the policy: observation keys and shapes, sizes."""

    observations: dict[str, tuple[int, ...]]
    rgb_keys: frozenset[str]
    n_obs_steps: int
    n_action_steps: int
    horizon: int
    action_dim: int
    action_start: int
    kind: str

    @classmethod
    def of(cls, policy: Any) -> PolicyShape:
        image = isinstance(policy, ImagePolicy)
        rgb = frozenset(k for k, (_, kind) in policy.obs_keys.items() if kind == RGB) if image else frozenset()
        return cls(observations={k: tuple(int(s) for s in v) for k, v in policy.observation_shapes().items()},
                   rgb_keys=rgb, n_obs_steps=int(policy.n_obs_steps), n_action_steps=int(policy.n_action_steps),
                   horizon=int(policy.horizon), action_dim=int(policy.action_dim),
                   action_start=int(policy.action_start), kind="image" if image else "lowdim")


@dataclass(frozen=True)
class ChunkRequest:
    """A checked Chunk request: ``obs`` ``{key: (n_obs_steps, *shape)}`` float32, ``prefix`` (F, Da) and
    ``guide`` (G, Da) float32 or None, ``warm`` ``(chunk, shift)`` or None."""

    session: str
    obs: dict[str, np.ndarray]
    prefix: np.ndarray | None
    guide: np.ndarray | None
    prefix_mode: str
    warm: tuple[int, int] | None
    deadline_ms: float | None
    noise_key: tuple[int, ...] | None = None


def checked_observation(shape: PolicyShape, key: str, x: np.ndarray) -> np.ndarray:
    """One observation array as float32 (n_obs_steps, *shape): the right shape, dtype and values, or INVALID_ARGUMENT.

    Camera images (``rgb`` keys) may come as uint8 0..255 (a quarter of the bytes) and are divided by 255;
    float images must lie in 0..1 as the policy wants them.
    """
    name, want = OBS_PREFIX + key, (shape.n_obs_steps, *shape.observations[key])
    if tuple(x.shape) != want:
        raise invalid(f"array {name!r} has shape {tuple(x.shape)}, expected (n_obs_steps, *shape) = {want}")
    rgb = key in shape.rgb_keys
    if rgb and x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255)
    if x.dtype != np.float32:
        also = " (or uint8 0..255 images)" if rgb else ""
        raise invalid(f"array {name!r} is {x.dtype}, expected float32{also}")
    if not np.isfinite(x).all():
        raise invalid(f"array {name!r} contains NaN or inf; observations must be finite")
    if rgb:
        try:
            check_image_range(name, torch.from_numpy(x))
        except ValueError as e:
            raise invalid(str(e)) from None
    return x


def checked_actions(shape: PolicyShape, name: str, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``prefix`` / ``guide``: float32 (L, action_dim), ``lo <= L <= hi``, finite; else INVALID_ARGUMENT."""
    if x.ndim != 2 or x.shape[1] != shape.action_dim or not lo <= x.shape[0] <= hi:
        raise invalid(f"array {name!r} has shape {tuple(x.shape)}, expected (L, action_dim={shape.action_dim}) "
                      f"with {lo} <= L <= {hi}")
    if x.dtype != np.float32:
        raise invalid(f"array {name!r} is {x.dtype}, expected float32")
    if not np.isfinite(x).all():
        raise invalid(f"array {name!r} contains NaN or inf; actions must be finite")
    return x


def checked_warm(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"chunk", "shift"}:
        raise invalid(f"Chunk: 'warm' must be null or {{'chunk': int, 'shift': int}}, got {str(value)[:80]}")
    return checked_int(value["chunk"], "warm.chunk"), checked_int(value["shift"], "warm.shift")


def checked_deadline(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 < value <= MAX_DEADLINE_MS:
        raise invalid(f"Chunk: 'deadline_ms' must be null or a number in (0, {MAX_DEADLINE_MS:g}], got {value!r}")
    return float(value)


def checked_noise_key(value: Any) -> tuple[int, ...] | None:
    """``noise_key``: null or 1..8 integers in [0, 2**32), the chunk's noise seed key (:func:`seed_for`)."""
    if value is None:
        return None
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_NOISE_KEY
            or not all(type(k) is int and 0 <= k < 2 ** 32 for k in value)):
        raise invalid(f"Chunk: 'noise_key' must be null or a list of 1 to {MAX_NOISE_KEY} integers in [0, 2**32), "
                      f"got {str(value)[:80]}")
    return tuple(value)


MAX_NOISE_KEY = 8
CHUNK_KEYS = ("session", "warm", "deadline_ms", "prefix_mode", "noise_key")


def parse_chunk(shape: PolicyShape, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ChunkRequest:
    """A Chunk request's arrays and metadata checked against the policy (every field), or INVALID_ARGUMENT."""
    check_keys(meta, CHUNK_KEYS, "Chunk")
    expected = [OBS_PREFIX + k for k in shape.observations]
    unknown = sorted(set(arrays) - {*expected, "prefix", "guide"})
    if unknown:
        raise invalid(f"Chunk: unknown arrays {[u[:60] for u in unknown[:5]]}; expected {expected} and optionally "
                      "'prefix', 'guide'")
    missing = [n for n in expected if n not in arrays]
    if missing:
        raise invalid(f"Chunk: missing observation arrays {missing}; this policy takes {expected}")
    obs = {k: checked_observation(shape, k, arrays[OBS_PREFIX + k]) for k in shape.observations}
    prefix = arrays.get("prefix")
    if prefix is not None:
        prefix = checked_actions(shape, "prefix", prefix, 0, shape.n_action_steps - 1)
    guide = arrays.get("guide")
    if guide is not None:
        if prefix is None or prefix.shape[0] == 0:
            raise invalid("Chunk: 'guide' continues frozen actions: send a 'prefix' of at least one action with it")
        guide = checked_actions(shape, "guide", guide, 1, shape.horizon)
    mode = meta.get("prefix_mode", "clean")
    if mode not in PREFIX_MODES:
        raise invalid(f"Chunk: 'prefix_mode' must be one of {list(PREFIX_MODES)}, got {str(mode)[:40]!r}")
    return ChunkRequest(session=checked_session(meta, "Chunk"), obs=obs, prefix=prefix, guide=guide,
                        prefix_mode=mode, warm=checked_warm(meta.get("warm")),
                        deadline_ms=checked_deadline(meta.get("deadline_ms")),
                        noise_key=checked_noise_key(meta.get("noise_key")))


@dataclass
class Session:
    """One client's state: its noise stream and its recent chunks' trajectories ``(chunk, (1, T, D))``."""

    generator: torch.Generator
    recent: deque = field(default_factory=lambda: deque(maxlen=4))
    next_chunk: int = 0
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def trajectory(self, chunk: int) -> torch.Tensor | None:
        return next((t for c, t in self.recent if c == chunk), None)


def json_safe(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (a tuple, an enum, a path) made a list or a string."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return str(value)


def bearer_token(context: Any) -> bytes | None:
    """The token of the call's single ``authorization: Bearer <token>`` metadata entry, as bytes; None if absent."""
    values = [v for k, v in (context.invocation_metadata() or ()) if k.lower() == AUTH_HEADER]
    if len(values) != 1:
        return None
    value = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
    return value[len(b"Bearer "):] if value.startswith(b"Bearer ") else None


class PolicyServer:
    """The five handlers of :mod:`~para_policy.serving.protocol` for one policy, and their sessions.

    Args:
        policy: a loaded :class:`~para_policy.policy.LowdimPolicy` or :class:`~para_policy.image_policy.ImagePolicy`.
        token: the shared secret every request must carry (``authorization: Bearer <token>``); None: no check.
        sampler: the spec every chunk is sampled with (:func:`~para_policy.samplers.sampler_spec`'s input);
            None: the policy's own.
        control_hz: the robot's control rate, reported by Metadata (None: unknown).
        max_sessions, idle_timeout_s: the most open sessions; a session unused this long is dropped.
        max_pending: the most Chunk requests holding or waiting for the model; beyond it RESOURCE_EXHAUSTED.
        max_message_bytes: the largest request accepted (gRPC's limit too, in :func:`serve`).
    """

    def __init__(self, policy: Any, *, token: str | None = None, sampler: str | SamplerConfig | None = None,
                 control_hz: float | None = None, max_sessions: int = 16, idle_timeout_s: float = 600.0,
                 max_pending: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if token is not None and not token.strip():
            raise ValueError("token is empty: give a non-empty shared secret, or None for no authentication")
        for name, value in (("max_sessions", max_sessions), ("max_pending", max_pending),
                            ("max_message_bytes", max_message_bytes)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.policy, self.shape = policy, PolicyShape.of(policy)
        self.spec = sampler_spec(policy.sampler if sampler is None else sampler)
        self.control_hz = None if control_hz is None else float(control_hz)
        self.max_sessions, self.idle_timeout_s, self.max_pending = max_sessions, float(idle_timeout_s), max_pending
        self.max_message_bytes = max_message_bytes
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._sessions: dict[str, Session] = {}
        self._pending = 0
        self._state = threading.Lock()  # sessions and counters
        self._model = threading.Lock()  # one model call at a time
        self._handlers: dict[str, Callable[[dict, dict], tuple[dict, dict]]] = {
            "Health": self._health, "Metadata": self._metadata, "Open": self._open, "Chunk": self._chunk,
            "Close": self._close}

    @property
    def sessions(self) -> int:
        with self._state:
            return len(self._sessions)

    def handle(self, method: str, request: bytes, context: Any) -> bytes:
        """Answer one call: authenticate, parse, check, run; a refusal is ``context.abort(code, message)``."""
        try:
            self._authenticate(context)
            if len(request) > self.max_message_bytes:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{method}: message of {len(request)} bytes is "
                              f"over the limit of {self.max_message_bytes}")
            try:
                arrays, meta = decode(request, max_bytes=self.max_message_bytes)
            except WireError as e:
                raise invalid(f"{method}: malformed message: {e}") from None
            return encode(*self._handlers[method](arrays, meta))
        except Refused as r:
            log.warning("refused %s: %s: %s", method, r.code.name, r.message)
            context.abort(r.code, r.message)
        except Exception as e:  # a bug, not the client's fault: that request only
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: {type(e).__name__}: {e}"[:MAX_DETAIL_CHARS])
        raise AssertionError("context.abort returned")  # pragma: no cover

    def method_handlers(self) -> dict[str, Any]:
        """``{method: grpc unary-unary handler}``, bytes in and out, for ``grpc.method_handlers_generic_handler``."""
        def bind(method: str) -> Any:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: self.handle(method, request, context))
        return {method: bind(method) for method in METHODS}

    def _authenticate(self, context: Any) -> None:
        if self._expected is None:
            return
        given = bearer_token(context)
        if given is None or not hmac.compare_digest(b"Bearer " + given, self._expected):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token: send the call metadata "
                          f"'{AUTH_HEADER}: Bearer <token>' with the server's token")

    def _expire(self) -> None:
        """Drop sessions idle longer than ``idle_timeout_s`` (call with ``_state`` held)."""
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if not v.busy and now - v.last_used > self.idle_timeout_s]:
            del self._sessions[sid]
            log.info("session %s expired after %.0f s idle", sid[:8], self.idle_timeout_s)

    def _health(self, arrays: dict, meta: dict) -> tuple[dict, dict]:
        check_keys(meta, (), "Health", arrays)
        import para_policy

        with self._state:
            self._expire()
            return {}, {"status": "serving", "sessions": len(self._sessions), "version": para_policy.__version__}

    def _metadata(self, arrays: dict, meta: dict) -> tuple[dict, dict]:
        check_keys(meta, (), "Metadata", arrays)
        s, spec = self.shape, self.spec.as_dict()
        observations = {k: {"shape": list(v), "dtype": "float32", "type": RGB if k in s.rgb_keys else "low_dim"}
                        for k, v in s.observations.items()}
        return {}, json_safe({
            "policy_kind": s.kind, "observations": observations, "n_obs_steps": s.n_obs_steps,
            "n_action_steps": s.n_action_steps, "horizon": s.horizon, "action_dim": s.action_dim,
            "action_start": s.action_start, "sampler": {"name": spec.pop("name"), "iterative": self.spec.iterative,
                        "warm_start": self.spec.warm_start, "options": spec},
            "control_hz": self.control_hz, "max_message_bytes": self.max_message_bytes})

    def _open(self, arrays: dict, meta: dict) -> tuple[dict, dict]:
        check_keys(meta, ("seed",), "Open", arrays)
        seed = meta.get("seed")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(checked_int(seed, "Open: 'seed'", 0, MAX_SEED))
        with self._state:
            self._expire()
            if len(self._sessions) >= self.max_sessions:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Open: {len(self._sessions)} sessions are open, "
                              f"the server's limit is {self.max_sessions}; close one or wait for one to expire")
            sid = secrets.token_hex(16)
            self._sessions[sid] = Session(generator)
        return {}, {"session": sid}

    def _close(self, arrays: dict, meta: dict) -> tuple[dict, dict]:
        check_keys(meta, ("session",), "Close", arrays)
        sid = checked_session(meta, "Close")
        with self._state:
            if self._sessions.pop(sid, None) is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"Close: unknown session {sid[:16]!r} (closed or expired)")
        return {}, {}

    def _claim(self, sid: str) -> Session:
        """Mark session ``sid`` busy and count a pending chunk, or refuse: NOT_FOUND, RESOURCE_EXHAUSTED."""
        with self._state:
            session = self._sessions.get(sid)
            if session is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"Chunk: unknown session {sid[:16]!r}; Open one first "
                              "(it may have expired or been closed)")
            if session.busy:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "Chunk: this session already has a request in "
                              "flight; send one at a time")
            if self._pending >= self.max_pending:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Chunk: the server's queue is full "
                              f"({self._pending} chunks pending, limit {self.max_pending}); retry later")
            session.busy, session.last_used = True, time.monotonic()
            self._pending += 1
            return session

    def _chunk(self, arrays: dict, meta: dict) -> tuple[dict, dict]:
        request = parse_chunk(self.shape, arrays, meta)
        session = self._claim(request.session)
        try:
            return self._sample(session, request)
        finally:
            with self._state:
                session.busy, session.last_used = False, time.monotonic()
                self._pending -= 1

    def _sample(self, session: Session, request: ChunkRequest) -> tuple[dict, dict]:
        """One ``predict_action`` call, as the Controller makes it, under the model lock; the reply."""
        policy, spec = self.policy, self.spec
        guess = session.trajectory(request.warm[0]) if request.warm and spec.iterative and spec.warm_start else None
        kwargs: dict[str, Any] = {"warm_start": False} if guess is None else {
            "guess": shift_trajectory(guess, request.warm[1])}
        if request.prefix is not None:
            kwargs.update(prefix_actions=torch.from_numpy(request.prefix)[None], prefix_mode=request.prefix_mode)
        if request.guide is not None:
            kwargs["guide_actions"] = torch.from_numpy(request.guide)[None]
        obs = {k: torch.from_numpy(v)[None] for k, v in request.obs.items()}
        with self._model:
            start = time.perf_counter()  # server_ms: the sampling, noise draws included (as in process)
            if request.noise_key is not None:  # this chunk's own noise, as the evaluator draws it in process
                kwargs["x_T"], kwargs["noise"] = chunk_noise(policy, spec, seed_for(*request.noise_key))
            deadline = (None if request.deadline_ms is None or not spec.iterative
                        else start + request.deadline_ms / 1000)
            session.generator = generator_on(session.generator, policy.device)
            try:
                out = policy.predict_action(obs, generator=session.generator, sampler=spec, deadline_at=deadline,
                                            **kwargs)
            except Exception as e:
                log.exception("sampling failed")
                raise Refused(grpc.StatusCode.INTERNAL, f"Chunk: sampling failed: {type(e).__name__}: {e}") from None
            server_ms = (time.perf_counter() - start) * 1000
        chunk, session.next_chunk = session.next_chunk, session.next_chunk + 1
        session.recent.append((chunk, out.trajectory.detach()))
        stats = out.stats
        reply = {"action": out["action"][0].detach().to("cpu", torch.float32).numpy(),
                 "plan": out["action_pred"][0, self.shape.action_start:].detach().to("cpu", torch.float32).numpy()}
        return reply, {"chunk": chunk, "rounds": int(stats.rounds), "model_evals": int(stats.model_evals),
                       "converged": bool(stats.all_converged), "deadline_hit": bool(stats.deadline_hit),
                       "warm": bool(out.warm), "server_ms": server_ms}


@dataclass
class ServerHandle:
    """A running server: ``port`` (the bound one), ``address`` ``host:port``, :meth:`stop`, :meth:`wait`."""

    server: Any
    policy_server: PolicyServer
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop taking calls; let calls in flight finish for up to ``grace`` seconds."""
        self.server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` passes: then False)."""
        return bool(self.server.wait_for_termination(timeout))


def server_credentials(tls_cert: str | Path | None, tls_key: str | Path | None) -> Any:
    """gRPC server credentials from PEM certificate and key files; None for plain text (neither given)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key (PEM files), or neither for plain text")
    if tls_cert is None:
        return None
    pair = []
    for what, path in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{what} {str(path)!r} is not a readable file (expected a PEM file)")
        pair.append(path.read_bytes())
    return grpc.ssl_server_credentials([(pair[1], pair[0])])


def serve(policy: Any, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          sampler: str | SamplerConfig | None = None, control_hz: float | None = None, max_workers: int = 16,
          max_sessions: int = 16, max_pending: int = 8, idle_timeout_s: float = 600.0,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ServerHandle:
    """Serve ``policy`` on ``host:port`` (port 0: a free one) and return at once; :class:`PolicyServer` for the rest.

    Refuses (``ValueError``) a host beyond loopback without a ``token``, and a ``max_pending`` not below
    ``max_workers`` (a thread must stay free for Health, Open and Close while chunks wait for the model).
    """
    if not is_loopback(host) and token is None:
        raise ValueError(f"refusing to serve on {host!r} without a token: anyone who reaches the port could use the "
                         "policy. Give a token (--token-file or PARA_POLICY_TOKEN), or bind 127.0.0.1")
    if type(max_workers) is not int or not 0 < max_pending < max_workers:
        raise ValueError(f"max_pending ({max_pending!r}) must be at least 1 and below max_workers ({max_workers!r})")
    credentials = server_credentials(tls_cert, tls_key)
    handlers = PolicyServer(policy, token=token, sampler=sampler, control_hz=control_hz, max_sessions=max_sessions,
                            idle_timeout_s=idle_timeout_s, max_pending=max_pending,
                            max_message_bytes=max_message_bytes)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="para-policy-serve"),
                         options=options, maximum_concurrent_rpcs=max_workers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers.method_handlers()),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        raise ValueError(f"cannot bind {address}: {e}") from None
    if not bound:
        raise ValueError(f"cannot bind {address} (in use, or not an address of this machine)")
    server.start()
    log.info("serving %s on %s:%d (%s)", handlers.shape.kind, host, bound, "TLS" if credentials else "plain text")
    return ServerHandle(server=server, policy_server=handlers, host=host, port=int(bound))


__all__ = ["ChunkRequest", "PolicyServer", "PolicyShape", "Refused", "ServerHandle", "is_loopback", "parse_chunk",
           "serve"]
