"""The policy server (para_policy/serving/server.py, para_policy/serve.py) over real gRPC on loopback.

One module-scoped server with a token serves the shipped PushT policy (a cheap 8-step DDIM Picard
sampler); the calls are raw (bytes through ``channel.unary_unary``), so these tests do not depend on
the client. The reference for served actions is the in-process ``predict_action`` call.
"""

from __future__ import annotations

import _pickle
import concurrent.futures as cf
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

grpc = pytest.importorskip("grpc")

from para_policy import load_policy  # noqa: E402
from para_policy.image_policy import ImagePolicy  # noqa: E402
from para_policy.samplers import shift_trajectory  # noqa: E402
from para_policy.serve import main  # noqa: E402
from para_policy.serving.protocol import method_path  # noqa: E402
from para_policy.serving.server import PolicyServer, serve  # noqa: E402
from para_policy.serving.wire import decode, encode  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "para_policy" / "assets" / "pusht_lowdim.safetensors"
TOKEN = "s3cret-token"
LIMIT = 1 << 20  # the module server's message limit
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def policy():
    return load_policy(ASSET, sampler="paradigms", scheduler="ddim", num_inference_steps=8, window=4, backend="eager")


@pytest.fixture(scope="module")
def server(policy):
    handle = serve(policy, port=0, token=TOKEN, max_message_bytes=LIMIT)
    yield handle
    handle.stop(0)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def raw(channel, method, request: bytes, token=TOKEN, timeout=30.0):
    metadata = None if token is None else [("authorization", f"Bearer {token}")]
    return channel.unary_unary(method_path(method))(request, metadata=metadata, timeout=timeout)


def call(channel, method, arrays=None, meta=None, **kw):
    return decode(raw(channel, method, encode(arrays or {}, meta or {}), **kw))


def refused(channel, method, request: bytes, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        raw(channel, method, request, **kw)
    return info.value


def observation(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(50, 450, (2, 20)).astype(np.float32)  # PushT pixels


def chunk_request(session, obs, **meta):
    return encode({"obs.obs": obs}, {"session": session, **meta})


def test_served_chunks_equal_in_process_calls(channel, server, policy):
    """Cold, warm-started and real-time-chunked (prefix + soft-masking guide) chunks, bit for bit."""
    session = call(channel, "Open", meta={"seed": 7})[1]["session"]
    prefix, guide = np.full((3, 2), 250, np.float32), np.full((5, 2), 260, np.float32)
    a = call(channel, "Chunk", {"obs.obs": observation(0)}, {"session": session})
    b = call(channel, "Chunk", {"obs.obs": observation(1)}, {"session": session, "warm": {"chunk": 0, "shift": 8}})
    c = call(channel, "Chunk", {"obs.obs": observation(2), "prefix": prefix, "guide": guide},
             {"session": session, "warm": {"chunk": 1, "shift": 8}, "prefix_mode": "clean"})
    call(channel, "Close", meta={"session": session})

    spec, g = server.policy_server.spec, torch.Generator().manual_seed(7)
    def run(obs, **kw):
        return policy.predict_action({"obs": torch.from_numpy(obs)[None]}, generator=g, sampler=spec, **kw)
    ra = run(observation(0), warm_start=False)
    rb = run(observation(1), guess=shift_trajectory(ra.trajectory, 8))
    rc = run(observation(2), guess=shift_trajectory(rb.trajectory, 8), prefix_actions=torch.from_numpy(prefix)[None],
             prefix_mode="clean", guide_actions=torch.from_numpy(guide)[None])
    for (arrays, meta), ref, number in ((a, ra, 0), (b, rb, 1), (c, rc, 2)):
        np.testing.assert_array_equal(arrays["action"], ref["action"][0].numpy())
        np.testing.assert_array_equal(arrays["plan"], ref["action_pred"][0, policy.action_start:].numpy())
        assert meta["chunk"] == number and meta["warm"] == bool(ref.warm) and meta["rounds"] == ref.stats.rounds
    assert (b[1]["warm"], c[1]["warm"]) == (True, True)
    np.testing.assert_array_equal(c[0]["action"][:3], prefix)  # the frozen actions run as given

    again = call(channel, "Open", meta={"seed": 7})[1]["session"]  # a fresh session: the same noise stream
    np.testing.assert_array_equal(call(channel, "Chunk", {"obs.obs": observation(0)}, {"session": again})[0]["action"],
                                  a[0]["action"])
    call(channel, "Close", meta={"session": again})


def test_token_is_checked_first(channel):
    for token in (None, "wrong", TOKEN + "x", ""):
        err = refused(channel, "Health", encode({}, {}), token=token)
        assert err.code() == Code.UNAUTHENTICATED and "token" in err.details()
    assert refused(channel, "Chunk", pickle.dumps(object), token=None).code() == Code.UNAUTHENTICATED  # before parsing
    assert call(channel, "Health")[1]["status"] == "serving"
    meta = call(channel, "Metadata")[1]
    assert meta["policy_kind"] == "lowdim" and meta["observations"]["obs"]["shape"] == [20]
    assert (meta["n_obs_steps"], meta["n_action_steps"], meta["action_dim"]) == (2, 8, 2)


def test_hostile_requests_get_clear_statuses_and_the_server_keeps_serving(channel, policy, caplog, monkeypatch):
    session = call(channel, "Open", meta={"seed": 1})[1]["session"]
    good = observation(3)
    bad_values = good.copy()
    bad_values[0, 0] = np.nan
    inf_values = good.copy()
    inf_values[1, 3] = np.inf
    cases = {
        "pickle": (pickle.dumps({"obs": good}), Code.INVALID_ARGUMENT, "malformed"),
        "truncated": (chunk_request(session, good)[:-5], Code.INVALID_ARGUMENT, "malformed"),
        "oversized": (b"\0" * (LIMIT + 1), Code.RESOURCE_EXHAUSTED, ""),
        "wrong shape": (chunk_request(session, good[:1]), Code.INVALID_ARGUMENT, "shape"),
        "wrong dtype": (chunk_request(session, good.astype(np.float64)), Code.INVALID_ARGUMENT, "float32"),
        "NaN": (chunk_request(session, bad_values), Code.INVALID_ARGUMENT, "NaN"),
        "inf": (chunk_request(session, inf_values), Code.INVALID_ARGUMENT, "inf"),
        "unknown array": (encode({"obs.obs": good, "evil": good}, {"session": session}), Code.INVALID_ARGUMENT,
                          "evil"),
        "unknown key": (chunk_request(session, good, run="os.system"), Code.INVALID_ARGUMENT, "run"),
        "negative shift": (chunk_request(session, good, warm={"chunk": 0, "shift": -1}), Code.INVALID_ARGUMENT,
                           "warm.shift"),
        "long prefix": (encode({"obs.obs": good, "prefix": np.zeros((8, 2), np.float32)}, {"session": session}),
                        Code.INVALID_ARGUMENT, "prefix"),
        "unknown session": (chunk_request("0" * 32, good), Code.NOT_FOUND, "session"),
    }
    for name, (request, code, words) in cases.items():
        err = refused(channel, "Chunk", request)
        assert err.code() == code, (name, err.code(), err.details())
        assert words in err.details(), (name, err.details())
    assert refused(channel, "Open", encode({"x": good}, {})).code() == Code.INVALID_ARGUMENT
    with monkeypatch.context() as patch:  # a sampling failure: INTERNAL for that request only
        patch.setattr(policy, "predict_action", lambda *a, **k: 1 / 0)
        err = refused(channel, "Chunk", chunk_request(session, good))
        assert err.code() == Code.INTERNAL and "ZeroDivisionError" in err.details()
    arrays, meta = call(channel, "Chunk", {"obs.obs": good}, {"session": session})
    assert arrays["action"].shape == (8, 2) and np.isfinite(arrays["action"]).all() and meta["chunk"] == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "para_policy.serving"]
    assert sum(m.startswith("refused Chunk: INVALID_ARGUMENT") for m in logged) >= 9, logged
    assert max(map(len, logged)) < 600  # statuses, not payloads
    call(channel, "Close", meta={"session": session})
    assert refused(channel, "Close", encode({}, {"session": session})).code() == Code.NOT_FOUND


class SlowPolicy:
    """The policy with every sampling call made to take ``delay`` seconds longer (a loaded GPU)."""

    def __init__(self, policy, delay: float) -> None:
        self._policy, self._delay = policy, delay

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def predict_action(self, *args, **kwargs):
        time.sleep(self._delay)
        return self._policy.predict_action(*args, **kwargs)


def test_a_flood_is_refused_at_once_and_another_client_still_gets_its_chunk(policy):
    handle = serve(SlowPolicy(policy, 0.5), port=0, max_pending=2, max_workers=8)
    try:
        with grpc.insecure_channel(handle.address) as ch:
            sessions = [call(ch, "Open", token=None)[1]["session"] for _ in range(4)]
            other = call(ch, "Open", token=None)[1]["session"]
            requests = [chunk_request(s, observation(0)) for s in sessions for _ in range(6)]

            def timed(request):
                start = time.perf_counter()
                try:
                    raw(ch, "Chunk", request, token=None)
                    return None, time.perf_counter() - start
                except grpc.RpcError as e:
                    return e.code(), time.perf_counter() - start

            with cf.ThreadPoolExecutor(len(requests)) as pool:
                flood = [pool.submit(timed, r) for r in requests]
                deadline, got = time.monotonic() + 20, None
                while got is None and time.monotonic() < deadline:  # the other client, retrying politely
                    code, _ = timed(chunk_request(other, observation(1)))
                    got = code is None or None
                    time.sleep(0.05)
                results = [f.result() for f in flood]
        assert got, "another client never got its chunk during the flood"
        codes = [code for code, _ in results]
        assert set(codes) <= {None, Code.RESOURCE_EXHAUSTED}, codes
        assert codes.count(Code.RESOURCE_EXHAUSTED) >= len(requests) - 8, codes
        slowest_refusal = max(t for code, t in results if code is not None)
        assert slowest_refusal < 0.5, f"a refusal took {slowest_refusal:.2f} s: refused requests were queued"
    finally:
        handle.stop(0)


class PickleLoaded(AssertionError):
    pass


FIND_CLASS = {"on": False, "count": 0}


def _audit(event, args):
    if FIND_CLASS["on"] and event == "pickle.find_class":
        FIND_CLASS["count"] += 1


sys.addaudithook(_audit)  # audit hooks cannot be removed: it counts only while FIND_CLASS["on"]


def test_no_pickle_load_on_the_serving_path(channel, monkeypatch):
    FIND_CLASS.update(on=True, count=0)
    try:
        pickle.loads(pickle.dumps(cf.Future))  # the hook works: a global looked up while unpickling
        assert FIND_CLASS["count"] == 1
        FIND_CLASS["count"] = 0

        def refuse(*args, **kwargs):
            raise PickleLoaded("a pickle load on the serving path")
        for module in (pickle, _pickle):
            for name in ("loads", "load", "Unpickler"):
                monkeypatch.setattr(module, name, refuse)
        call(channel, "Health")
        call(channel, "Metadata")
        session = call(channel, "Open", meta={"seed": 3})[1]["session"]
        for k in range(2):
            warm = None if k == 0 else {"chunk": 0, "shift": 8}
            arrays, meta = call(channel, "Chunk", {"obs.obs": observation(k)}, {"session": session, "warm": warm})
            assert np.isfinite(arrays["action"]).all() and meta["chunk"] == k
        call(channel, "Close", meta={"session": session})
        assert refused(channel, "Chunk", pickle.dumps([1])).code() == Code.INVALID_ARGUMENT
    finally:
        FIND_CLASS["on"] = False
    assert FIND_CLASS["count"] == 0


def test_beyond_loopback_needs_a_token_and_tls_round_trip(policy, tmp_path):
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ValueError, match="without a token"):
            serve(policy, host=host, port=0)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with pytest.raises(ValueError, match="both"):
        serve(policy, port=0, tls_cert=cert)
    handle = serve(policy, port=0, token=TOKEN, tls_cert=cert, tls_key=key)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{handle.port}", credentials) as ch:
            assert call(ch, "Health")[1]["status"] == "serving"
            session = call(ch, "Open", meta={"seed": 0})[1]["session"]
            assert call(ch, "Chunk", {"obs.obs": observation(0)}, {"session": session})[0]["action"].shape == (8, 2)
        with grpc.insecure_channel(f"localhost:{handle.port}") as plain:  # plain text to a TLS port: no answer
            with pytest.raises(grpc.RpcError):
                raw(plain, "Health", encode({}, {}), timeout=3)
    finally:
        handle.stop(0)


def test_cli_help_and_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0 and "--token-file" in capsys.readouterr().out
    assert main(["serve", str(tmp_path / "missing.safetensors")]) == 2
    assert "para-policy serve: error: checkpoint" in capsys.readouterr().err
    assert main([str(ASSET), "sampler.windw=3"]) == 2
    assert "windw" in capsys.readouterr().err
    empty = tmp_path / "token"
    empty.write_text(" \n")
    assert main([str(ASSET), "--token-file", str(empty)]) == 2
    assert "empty token" in capsys.readouterr().err


def test_cli_serves_until_sigterm():
    env = {**os.environ, "PARA_POLICY_TOKEN": " cli-token\n", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "para_policy.serve", "serve", str(ASSET), "--port", "0", "sampler=sequential",
           "sampler.scheduler=ddim", "sampler.num_inference_steps=4", "inference.backend=eager"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 90
        while not any("listening on" in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        line = next(line for line in lines if "listening on" in line)
        address = line.split("listening on ")[1].strip()
        with grpc.insecure_channel(address) as ch:
            assert refused(ch, "Health", encode({}, {}), token=None).code() == Code.UNAUTHENTICATED
            assert call(ch, "Health", token="cli-token")[1]["status"] == "serving"
            assert call(ch, "Metadata", token="cli-token")[1]["sampler"]["name"] == "sequential"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Aborted(Exception):
    pass


class FakeContext:
    """What a handler reads of a gRPC call context: its metadata, and ``abort`` (which raises)."""

    def __init__(self, token: str | None = None) -> None:
        self.metadata = [] if token is None else [("authorization", f"Bearer {token}")]

    def invocation_metadata(self):
        return self.metadata

    def abort(self, code, details):
        raise Aborted(code, details)


def handled(server: PolicyServer, method: str, arrays=None, meta=None, token=None):
    return decode(server.handle(method, encode(arrays or {}, meta or {}), FakeContext(token)))


def tiny_image_policy() -> ImagePolicy:
    """A random-weight image policy (ResNet-18 on 3x32x32 images, a small UNet, 4 DDPM steps)."""
    obs = {"image": {"shape": [3, 32, 32], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}
    torch.manual_seed(0)
    return ImagePolicy({
        "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4, "obs_dim": 514, "action_dim": 2, "num_inference_steps": 4,
        "model": {"input_dim": 2, "global_cond_dim": 514 * 2, "diffusion_step_embed_dim": 8, "down_dims": [8, 16],
                  "kernel_size": 3, "n_groups": 4},
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100},
        "obs_keys": obs,
        "obs_encoder": {"kind": "dp_multi_image", "shape_meta": {"obs": obs}, "resize_shape": None,
                        "crop_shape": [28, 28], "random_crop": True, "use_group_norm": True,
                        "share_rgb_model": False, "imagenet_norm": False},
        "normalizer": {"image": {"shape": [1]}, "agent_pos": {"shape": [2]}, "action": {"shape": [2]}},
    }).eval()


def test_image_policy_sessions_and_limits_without_a_network():
    """uint8 frames are served as the float frames /255 in process; 0..255 floats refused; session limit, expiry."""
    policy = tiny_image_policy()
    server = PolicyServer(policy, max_sessions=2, token=TOKEN)
    meta = handled(server, "Metadata", token=TOKEN)[1]
    assert meta["policy_kind"] == "image" and meta["observations"]["image"] == {
        "shape": [3, 32, 32], "dtype": "float32", "type": "rgb"}
    with pytest.raises(Aborted) as info:
        handled(server, "Metadata")
    assert info.value.args[0] == Code.UNAUTHENTICATED

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    pos = rng.uniform(0, 1, (2, 2)).astype(np.float32)
    session = handled(server, "Open", meta={"seed": 5}, token=TOKEN)[1]["session"]
    served = handled(server, "Chunk", {"obs.image": frames, "obs.agent_pos": pos}, {"session": session}, token=TOKEN)
    floats = frames.astype(np.float32) / np.float32(255)
    ref = policy.predict_action({"image": torch.from_numpy(floats)[None], "agent_pos": torch.from_numpy(pos)[None]},
                                generator=torch.Generator().manual_seed(5), sampler=server.spec, warm_start=False)
    np.testing.assert_array_equal(served[0]["action"], ref["action"][0].numpy())
    with pytest.raises(Aborted, match="0..255"):
        handled(server, "Chunk", {"obs.image": floats * 255, "obs.agent_pos": pos}, {"session": session},
                token=TOKEN)

    handled(server, "Open", token=TOKEN)
    with pytest.raises(Aborted) as info:
        handled(server, "Open", token=TOKEN)
    assert info.value.args[0] == Code.RESOURCE_EXHAUSTED and "limit is 2" in info.value.args[1]
    server.idle_timeout_s = 0.0
    assert handled(server, "Health", token=TOKEN)[1]["sessions"] == 0  # idle sessions expired
    with pytest.raises(Aborted) as info:
        handled(server, "Chunk", {"obs.image": frames, "obs.agent_pos": pos}, {"session": session}, token=TOKEN)
    assert info.value.args[0] == Code.NOT_FOUND
