"""The policy server's wire contract: one gRPC service, five unary methods, every message one safetensors blob.

Why this shape: a message is data only. Each request and reply is the bytes of a safetensors file
(:mod:`para_policy.serving.wire`): named numpy arrays plus one JSON object stored under the
``__metadata__`` key :data:`META_KEY`. Nothing is pickled and nothing names code, so a stranger who
reaches the port can at worst send bytes that are refused. No ``.proto`` compilation is needed:
the methods are registered as generic handlers whose (de)serializers are the identity on bytes.

Imports nothing beyond the standard library, so the robot-side client needs no torch.

Methods (``/para_policy.PolicyServer/<name>``), with their JSON metadata and arrays:

``Health``    request ``{}``; reply ``{"status": "serving", "sessions": int, "version": str}``.
``Metadata``  request ``{}``; reply ``{"policy_kind": "lowdim" | "image", "observations": {key:
              {"shape": [...], "dtype": "float32"}}, "n_obs_steps", "n_action_steps", "horizon",
              "action_dim", "action_start", "sampler": {"name", "iterative",
              "warm_start", "options"}, "control_hz": float | None,
              "max_message_bytes": int}``. ``observations`` gives one step's shape (without n_obs_steps).
``Open``      request ``{"seed": int | None}``; reply ``{"session": str}`` (a random hex id). A session
              holds its noise generator and the trajectories of its recent chunks (warm start).
``Chunk``     request ``{"session": str, "warm": {"chunk": int, "shift": int} | None,
              "deadline_ms": float | None}`` with arrays ``"obs.<key>"`` (n_obs_steps, *shape) float32 for
              each observation key, optional ``"prefix"`` (F, action_dim) float32 (real-time chunking's
              frozen actions, raw units) with ``{"prefix_mode": "clean" | "noised"}`` in the metadata,
              optional ``"guide"`` (G, action_dim) float32 (soft masking). ``warm`` asks for the
              trajectory of that earlier chunk of this session shifted by ``shift`` steps as the warm
              start (a chunk the server no longer holds means a cold start, reported as ``warm: false``).
              Optional ``"noise_key": [int, ...]`` (1 to 8 integers in [0, 2**32)): draw this chunk's noise
              from a generator seeded by ``seed_for(*noise_key)`` (:mod:`para_policy.bench.noise`, the
              evaluator's scheme) instead of the session's stream: reproducible chunk by chunk.
              Reply arrays ``"action"`` (n_action_steps, action_dim) and ``"plan"`` (horizon -
              action_start, action_dim) float32 (raw units); metadata ``{"chunk": int, "rounds": int,
              "model_evals": int, "converged": bool, "deadline_hit": bool, "warm": bool,
              "server_ms": float}`` (``server_ms``: the sampling call's wall time on the server).
``Close``     request ``{"session": str}``; reply ``{}``.

Authentication: the call metadata ``authorization: Bearer <token>``. Errors are gRPC status codes
with a message that names what was wrong: UNAUTHENTICATED (no or wrong token), INVALID_ARGUMENT
(a malformed message: not safetensors, bad JSON, unknown keys, wrong shape, dtype, NaN/inf),
NOT_FOUND (unknown session), RESOURCE_EXHAUSTED (too large, too many sessions, a session's second
request in flight, the server's queue full), INTERNAL (sampling failed; that session only).
"""

from __future__ import annotations

SERVICE = "para_policy.PolicyServer"
METHODS = ("Health", "Metadata", "Open", "Chunk", "Close")
META_KEY = "para_policy"  # the safetensors __metadata__ key holding the message's JSON object
AUTH_HEADER = "authorization"  # gRPC metadata keys are lower case
TOKEN_ENV = "PARA_POLICY_TOKEN"
DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
OBS_PREFIX = "obs."


def method_path(name: str) -> str:
    """The full gRPC method path of ``name`` (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the service has {', '.join(METHODS)}")
    return f"/{SERVICE}/{name}"
