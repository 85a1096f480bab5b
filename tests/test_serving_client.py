"""RemoteController against a real gRPC server on loopback: the same actions as the in-process Controller,
no torch on the robot side, and the loop surviving a killed, hung or slow server (a loopback proxy)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grpc")

from loopback_proxy import LoopbackProxy  # noqa: E402

import para_policy  # noqa: E402
from para_policy import Controller, RemoteController, load_policy, sampler_spec  # noqa: E402
from para_policy.serving.client import RemoteError  # noqa: E402
from para_policy.serving.server import serve  # noqa: E402

ASSET = Path(para_policy.__file__).parent / "assets" / "pusht_lowdim.safetensors"
SPEC = sampler_spec("paradigms", scheduler="ddim", num_inference_steps=8, window=4)
CHEAP = sampler_spec("sequential", scheduler="ddim", num_inference_steps=2)


def observations(n: int, seed: int = 0) -> np.ndarray:
    """A PushT-like observation stream (n, 20): positions in [0, 512], drifting slowly."""
    rng = np.random.default_rng(seed)
    return (256 + np.cumsum(rng.normal(0, 4, (n, 20)), axis=0)).astype(np.float32)


@pytest.fixture(scope="module")
def cheap_server():
    handle = serve(load_policy(ASSET, sampler=CHEAP, backend="eager"), port=0, sampler=CHEAP)
    yield handle
    handle.stop(0)


@pytest.mark.parametrize("mode", ["sync", "rtc"])
def test_remote_actions_equal_the_in_process_controller(mode):
    """Same seed, same observations, the steps clock: the served loop hands out the in-process loop's actions
    (warm starts from the server's memory of the chunk, rtc's frozen prefix and soft-masking guide included)."""
    obs = observations(20)
    loop = dict(mode=mode, seed=3) | ({"clock": "steps", "delay_steps": 2} if mode == "rtc" else {})
    local = Controller(load_policy(ASSET, backend="eager"), sampler=SPEC, **loop)
    expected = np.stack([local.act(o) for o in obs])
    handle = serve(load_policy(ASSET, backend="eager"), port=0, sampler=SPEC)
    try:
        with RemoteController(handle.address, **loop) as remote:
            got = np.stack([remote.act(o) for o in obs])
            stats = remote.stats()
    finally:
        handle.stop(0)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert stats["chunks"] == local.stats()["chunks"] and stats["warm_chunks"] == local.stats()["warm_chunks"] > 0
    assert stats["failures"] == 0 and stats["round_trip_ms"]["n"] >= stats["chunks"]  # (+ one in flight)


def test_the_client_imports_and_runs_without_torch(cheap_server):
    """The robot side needs numpy, grpcio and safetensors only: torch blocked, it still runs a chunk."""
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this robot")
sys.meta_path.insert(0, NoTorch())
from para_policy import RemoteController
with RemoteController({cheap_server.address!r}, seed=0) as c:
    a = c.act([256.0] * 20)
assert a.shape == (2,) and "torch" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def run_steps(ctl: RemoteController, obs: np.ndarray, period_s: float) -> list[float]:
    """Act on each observation at ``period_s``; the wall time of each ``act``."""
    times = []
    for o in obs:
        start = time.perf_counter()
        action = ctl.act(o)
        times.append(time.perf_counter() - start)
        assert np.isfinite(action).all()
        time.sleep(max(0.0, period_s - times[-1]))
    return times


def test_killed_server_the_loop_runs_on_and_reconnects():
    """The server dies mid-episode: act never raises or blocks, the plan runs on, then the last action is held;
    a server started again on the same port is found, on a new session, and chunks resume."""
    period = 0.03
    handle = serve(load_policy(ASSET, backend="eager"), port=0, sampler=CHEAP)
    port = handle.address.rsplit(":", 1)[1]
    obs = observations(120)
    with RemoteController(handle.address, mode="rtc", period_s=period, timeout_s=0.5, seed=0) as ctl:
        run_steps(ctl, obs[:12], period)
        handle.stop(0)
        times = run_steps(ctl, obs[12:60], period)
        chunks = ctl.stats()["chunks"]
        assert ctl.failures >= 1 and ctl.extended_steps > 0 and ctl.held_steps > 0
        assert max(times) < 0.25  # the failed call runs on the worker: act does not wait for it
        handle = serve(load_policy(ASSET, backend="eager"), port=int(port), sampler=CHEAP)
        try:
            run_steps(ctl, obs[60:], period)
            stats = ctl.stats()
        finally:
            handle.stop(0)
    assert stats["reconnects"] >= 1 and stats["chunks"] > chunks and stats["errors"]


def test_hung_link_the_deadline_holds_and_the_loop_recovers(cheap_server):
    """A link that stops delivering (a hung server): each chunk fails at timeout_s, act keeps its period."""
    period = 0.03
    proxy = LoopbackProxy(cheap_server.port)
    try:
        with RemoteController(proxy.address, mode="async", period_s=period, timeout_s=0.3, seed=0) as ctl:
            obs = observations(90)
            run_steps(ctl, obs[:10], period)
            proxy.hang = True
            times = run_steps(ctl, obs[10:50], period)
            hung = ctl.stats()
            proxy.hang = False
            run_steps(ctl, obs[50:], period)
            after = ctl.stats()
    finally:
        proxy.close()
    assert hung["failures"] >= 1 and any("DEADLINE_EXCEEDED" in e for e in hung["errors"])
    assert max(times) < 0.25 and hung["held_steps"] > 0
    assert after["chunks"] > hung["chunks"]


def test_network_delay_is_measured_and_frozen_by_rtc(cheap_server):
    """40 ms each way: the round trip covers it, the measured delay d grows to cover it, and rtc freezes d actions."""
    period, one_way = 0.03, 0.04
    proxy = LoopbackProxy(cheap_server.port, delay_s=one_way)
    try:
        with RemoteController(proxy.address, mode="rtc", period_s=period, timeout_s=2.0, seed=0) as ctl:
            run_steps(ctl, observations(60), period)
            stats, records = ctl.stats(), list(ctl.records)
    finally:
        proxy.close()
    assert stats["round_trip_ms"]["p50"] >= 2 * one_way * 1000 * 0.9
    assert stats["overhead_ms"]["p50"] >= 2 * one_way * 1000 * 0.9
    d_min = math.ceil(1.25 * 2 * one_way / period)
    late = [r for r in records[2:] if r.start_step is not None]
    assert late and all(r.delay_steps >= d_min for r in late)
    assert all(r.frozen == r.delay_steps for r in late)


def test_bad_observations_are_refused_before_they_are_sent(cheap_server):
    with RemoteController(cheap_server.address, seed=0) as ctl:
        with pytest.raises(ValueError, match="shape"):
            ctl.act(np.zeros(19))
        with pytest.raises(ValueError, match="NaN or inf"):
            ctl.act(np.full(20, np.nan))
        assert not ctl.observations and ctl.act(np.full(20, 256.0)).shape == (2,)


def test_wrong_token_is_a_clear_error():
    handle = serve(load_policy(ASSET, backend="eager"), port=0, sampler=CHEAP, token="s3cret")
    try:
        with pytest.raises(RemoteError, match="UNAUTHENTICATED"):
            RemoteController(handle.address, token="wrong")
        with RemoteController(handle.address, token="s3cret", seed=0) as ctl:
            assert ctl.act(np.full(20, 256.0)).shape == (2,)
    finally:
        handle.stop(0)


def test_close_leaves_no_thread_behind(cheap_server):
    before = set(threading.enumerate())
    ctl = RemoteController(cheap_server.address, mode="async", period_s=0.03, seed=0)
    run_steps(ctl, observations(12), 0.03)
    ctl.close()
    time.sleep(0.1)
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("para_policy-controller")]


def test_keyed_noise_is_the_in_process_keyed_noise():
    """key_noise((7, 1)): the server draws the chunk's noise from seed_for(7, 1, 0), as the evaluator does in
    process (independent reference: predict_action with that x_T and noise)."""
    import torch

    from para_policy.bench.noise import chunk_noise, seed_for

    policy = load_policy(ASSET, backend="eager")
    hist = observations(2)
    x_T, noise = chunk_noise(policy, SPEC, seed_for(7, 1, 0))
    expected = policy.predict_action({"obs": torch.from_numpy(hist)[None]}, sampler=SPEC, x_T=x_T, noise=noise,
                                     warm_start=False)["action"][0].numpy()
    handle = serve(load_policy(ASSET, backend="eager"), port=0, sampler=SPEC)
    try:
        with RemoteController(handle.address, seed=123) as remote:
            remote.key_noise((7, 1))
            np.testing.assert_allclose(remote.predict_chunk(hist), expected, rtol=0, atol=1e-5)
            with pytest.raises(ValueError, match="non-negative ints"):
                remote.key_noise((-1,))
    finally:
        handle.stop(0)


def test_a_busy_server_is_asked_again_within_the_timeout():
    """max_pending=1 and a slow model: of two robots asking at once one is refused RESOURCE_EXHAUSTED by the
    server, and its client asks again until it gets its chunk (its round trip includes the wait)."""
    policy = load_policy(ASSET, backend="eager")
    slow = policy.predict_action

    def predict_action(*a, **k):
        time.sleep(0.3)
        return slow(*a, **k)

    policy.predict_action = predict_action
    handle = serve(policy, port=0, sampler=CHEAP, max_pending=1)
    out = {}
    try:
        robots = [RemoteController(handle.address, seed=i, timeout_s=5.0) for i in range(2)]
        threads = [threading.Thread(target=lambda r=r, i=i: out.setdefault(i, r.predict_chunk(observations(2))))
                   for i, r in enumerate(robots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rtts = sorted(r.round_trip_ms[0] for r in robots)
        for r in robots:
            r.close()
    finally:
        handle.stop(0)
    assert sorted(out) == [0, 1] and all(a.shape == (8, 2) for a in out.values())
    assert rtts[1] >= 550  # the second waited for the first (0.3 s each, one at a time)


def test_a_chunk_later_than_its_whole_plan_is_taken_over_and_the_loop_holds():
    """A slow server (0.6 s a chunk at 30 ms a step: 20 steps late, past the 15-step plan): act never raises,
    the loop holds the last action, and each late chunk still takes over (its jump measured at its last action)."""
    policy = load_policy(ASSET, backend="eager")
    fast = policy.predict_action
    slow = {"on": False}

    def predict_action(*a, **k):
        if slow["on"]:
            time.sleep(0.6)
        return fast(*a, **k)

    policy.predict_action = predict_action
    handle = serve(policy, port=0, sampler=CHEAP)
    try:
        with RemoteController(handle.address, mode="rtc", period_s=0.03, timeout_s=5.0, seed=0) as ctl:
            run_steps(ctl, observations(10), 0.03)
            slow["on"] = True
            run_steps(ctl, observations(80, seed=1), 0.03)
            stats = ctl.stats()
    finally:
        handle.stop(0)
    assert stats["held_steps"] > 0 and stats["failures"] == 0 and stats["switches"] >= 2
