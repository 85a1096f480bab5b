"""What the network costs: the policy server's overhead per chunk, and how many 10 Hz robots one server carries.

Two measurements over a real ``para-policy serve`` process on loopback
(:class:`~para_policy.serving.launch.ServerProcess`):

* **Overhead** (:func:`overhead_rows`): the same chunk (same observation history, same keyed
  noise, cold) sampled in this process by ``policy.predict_action`` and by the server through a
  ``Chunk`` call, alternating call by call. The overhead is the round trip minus the in-process
  latency (p50 of each), and per call the round trip minus the server's own sampling time
  (``server_ms``: encoding, the kernel's loopback, gRPC, the server's validation).
* **Load** (:func:`load_level`): ``n`` :class:`~para_policy.serving.client.RemoteController` s in
  ``rtc`` mode on the wall clock, each on its own thread and its own tick grid, against one
  server; per level: stalls (a chunk later than the queue), held steps, failed chunks, late
  ticks (the client process itself falling behind) and the chunks' round trips.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from para_policy.bench.noise import chunk_noise, seed_for
from para_policy.samplers import SamplerConfig
from para_policy.serving.client import PolicyClient, RemoteController
from para_policy.serving.protocol import OBS_PREFIX
from para_policy.stats import percentile_summary

#: the noise-key stream of this benchmark (:func:`~para_policy.bench.noise.seed_for`)
SERVING_STREAM = 31


def walk_observations(shapes: Mapping[str, tuple[int, ...]], n: int, seed: int = 0,
                      image_keys: Sequence[str] = ()) -> list[dict[str, np.ndarray]]:
    """``n`` steps of observations ``{key: (*shape,)}`` float32: low-dim keys a random walk around 256 (PushT's
    pixel coordinates), image keys uniform in [0, 1]."""
    rng = np.random.default_rng(seed)
    walks = {k: 256 + np.cumsum(rng.normal(0, 4, (n, *s)), axis=0) for k, s in shapes.items() if k not in image_keys}
    out = []
    for i in range(n):
        step = {k: w[i].astype(np.float32) for k, w in walks.items()}
        step.update({k: rng.random(shapes[k], dtype=np.float32) for k in image_keys})
        out.append(step)
    return out


def history(steps: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The ``n_obs_steps`` observations ``steps`` as ``{key: (n_obs_steps, *shape)}``."""
    return {k: np.stack([s[k] for s in steps]) for k in steps[0]}


def _local_ms(policy: Any, spec: SamplerConfig, obs: dict[str, torch.Tensor], key: tuple[int, ...]) -> float:
    """``predict_action`` in this process, its keyed noise drawn inside the timing (as the server draws it)."""
    start = time.perf_counter()
    x_T, noise = chunk_noise(policy, spec, seed_for(*key))
    policy.predict_action(obs, sampler=spec, x_T=x_T, noise=noise, warm_start=False)
    return (time.perf_counter() - start) * 1000


def _remote_ms(client: PolicyClient, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[float, float]:
    start = time.perf_counter()
    _, info = client.call("Chunk", meta, arrays)
    return (time.perf_counter() - start) * 1000, float(info["server_ms"])


def overhead_rows(policy: Any, spec: SamplerConfig, client: PolicyClient, histories: Sequence[dict[str, np.ndarray]],
                  uint8_keys: Sequence[str] = ()) -> list[dict[str, float]]:
    """One row per history: ``local_ms`` (``predict_action`` here), ``round_trip_ms`` and ``server_ms`` (a ``Chunk``
    call), the same chunk (cold, noise keyed by the row), the order alternating row by row.

    ``uint8_keys``: camera keys sent as uint8 (what a robot's camera gives; the server scales them).
    """
    session = client.open(0)
    rows = []
    for i, h in enumerate(histories):
        key = (SERVING_STREAM, i, 0)
        obs = {k: torch.from_numpy(v)[None] for k, v in h.items()}
        arrays = {OBS_PREFIX + k: (np.round(v * 255).astype(np.uint8) if k in uint8_keys else v) for k, v in h.items()}
        meta = {"session": session, "warm": None, "deadline_ms": None, "noise_key": list(key)}
        if i % 2:
            rtt, server = _remote_ms(client, meta, arrays)
            local_ms = _local_ms(policy, spec, obs, key)
        else:
            local_ms = _local_ms(policy, spec, obs, key)
            rtt, server = _remote_ms(client, meta, arrays)
        rows.append({"local_ms": local_ms, "round_trip_ms": rtt, "server_ms": server})
    client.close_session(session)
    return rows


def idle_round_trips(client: PolicyClient, idles_s: Sequence[float] = (0.0, 0.025), calls: int = 60
                     ) -> dict[str, dict[str, Any]]:
    """``Health`` round trips (ms) after each idle gap: what gRPC's own wake-up costs, apart from any sampling
    (a chunk call always follows an idle gap: the robot's control period)."""
    out = {}
    for idle in idles_s:
        times = []
        for _ in range(calls):
            time.sleep(idle)
            start = time.perf_counter()
            client.health()
            times.append((time.perf_counter() - start) * 1000)
        out[f"{idle * 1000:g} ms idle"] = percentile_summary(times[5:])
    return out


def overhead_summary(rows: Sequence[Mapping[str, float]], warmup: int = 3) -> dict[str, Any]:
    """Percentiles of :func:`overhead_rows` (the first ``warmup`` rows dropped) and the two overheads, in ms."""
    rows = rows[warmup:]
    out = {k: percentile_summary([r[k] for r in rows]) for k in ("local_ms", "round_trip_ms", "server_ms")}
    out["overhead_p50_ms"] = out["round_trip_ms"]["p50"] - out["local_ms"]["p50"]
    out["overhead_p95_ms"] = out["round_trip_ms"]["p95"] - out["local_ms"]["p95"]
    out["transport_ms"] = percentile_summary([r["round_trip_ms"] - r["server_ms"] for r in rows])
    return out


def _client_loop(make: Callable[[], RemoteController], steps: Sequence[Mapping[str, np.ndarray]], period_s: float,
                 start_at: float, out: dict[str, Any]) -> None:
    """One robot: ``act`` on each step at ``period_s`` on its own grid from ``start_at``; its stats into ``out``."""
    try:
        with make() as ctl:
            next_tick, late = start_at, 0
            for obs in steps:
                now = time.perf_counter()
                if now < next_tick:
                    time.sleep(next_tick - now)
                elif now - next_tick > period_s:  # a missed tick: run now, resume the grid after
                    late += 1
                    next_tick += period_s * int((now - next_tick) // period_s)
                ctl.act(obs)
                next_tick += period_s
            out.update(stats=ctl.stats(), late_ticks=late, round_trip_ms=list(ctl.round_trip_ms),
                       server_ms=list(ctl.server_ms))
    except Exception as e:  # reported in the level's row
        out["error"] = f"{type(e).__name__}: {e}"


def load_level(make: Callable[[], RemoteController], shapes: Mapping[str, tuple[int, ...]], clients: int,
               seconds: float, period_s: float) -> dict[str, Any]:
    """``clients`` robots at ``1 / period_s`` Hz for ``seconds`` against one server: the level's figures."""
    n = int(round(seconds / period_s))
    outs: list[dict[str, Any]] = [{} for _ in range(clients)]
    start_at = time.perf_counter() + 0.5
    threads = [threading.Thread(target=_client_loop, args=(make, walk_observations(shapes, n, seed=c),
                                                           period_s, start_at + c * period_s / clients, outs[c]))
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [o for o in outs if "stats" in o]
    total = lambda key: int(sum(o["stats"][key] for o in ok))  # noqa: E731
    return {
        "clients": clients, "seconds": seconds, "errors": [o["error"] for o in outs if "error" in o],
        "chunks": total("chunks"), "stalls": total("stalls"), "held_steps": total("held_steps"),
        "failures": total("failures"), "late_ticks": sum(o["late_ticks"] for o in ok),
        "round_trip_ms": percentile_summary([x for o in ok for x in o["round_trip_ms"]]),
        "server_ms": percentile_summary([x for o in ok for x in o["server_ms"]]),
        "delay_used_max": max((o["stats"]["delay_used"]["max"] or 0) for o in ok) if ok else None,
    }
