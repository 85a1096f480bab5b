"""eval.py's ``controller.remote`` (issue 30, item 5): the candidate's episodes through a policy server.

The tiny random-weight policy of test_eval_realtime.py (10 DDPM steps, 8 of 16 actions executed), 2 PushT
episodes of 20 steps, one real ``para-policy serve`` child process for the whole module (its start, torch's
import and the checkpoint's load, is most of the time here).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from eval_fixtures import fresh_baseline_cache, one_torch_thread  # noqa: F401  (autouse fixtures)
from test_eval import build_checkpoint, compose_eval

from para_policy.evaluation import EvalConfigError, evaluate, flat_metrics, realtime, runner
from para_policy.evaluation import episodes as episodes_module
from para_policy.evaluation.config import ControllerSettings, controller_settings

pytest.importorskip("grpc")

FAST = ["task.episodes=2", "task.max_steps=20", "num_envs=2", "latency.calls=2", "latency.warmup=0", "logger=none",
        "progress=false", "threads=1", "video.enabled=false", "sampler.window=4"]
RTC = ["controller.mode=rtc", "controller.clock=steps", "controller.delay_steps=2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_eval([f"checkpoint={ckpt}", *FAST, *overrides])
    return evaluate(cfg, out, overrides=list(overrides))


def children() -> set[int]:
    """This process's live child processes (Linux /proc), zombies left out."""
    me, out = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


@pytest.fixture(scope="module")
def served(ckpt, tmp_path_factory):
    """The same rtc run in process and with ``controller.remote=local`` (baseline off: it runs in process anyway)."""
    base = tmp_path_factory.mktemp("remote")
    before = children()
    local = run_eval(ckpt, base / "in_process", *RTC, "compare=false")
    remote = run_eval(ckpt, base / "served", *RTC, "compare=false", "controller.remote=local")
    return local, remote, base, before, children()


def test_a_served_episode_is_its_in_process_episode(served):
    """The key check: on the steps clock, the server's chunks (same keyed noise, same warm starts, same frozen
    prefix) give the very episodes of the in-process Controller: the served loop is the in-process loop."""
    local, remote, *_ = served
    a, b = local["samplers"]["candidate"]["episodes"], remote["samplers"]["candidate"]["episodes"]
    assert [e["error"] for e in b] == [None, None], [e.get("traceback") for e in b]
    for x, y in zip(a, b, strict=True):
        same = ("seed", "max_reward", "success", "length", "n_chunks", "rounds_per_chunk", *realtime.CONTROLLER_FIELDS)
        assert {k: x[k] for k in same} == {k: y[k] for k in same}
        assert set(realtime.REMOTE_FIELDS) <= set(y) and not set(realtime.REMOTE_FIELDS) & set(x)
        assert y["round_trip_ms_p50"] > 0 and y["failures"] == y["reconnects"] == y["held_steps"] == 0
    assert a[0]["n_chunks"] == 3 and a[0]["switches"] == 2


def test_the_served_run_reports_round_trips_and_its_server(served):
    _, remote, base, *_ = served
    out = base / "served"
    ctl = remote["samplers"]["candidate"]["controller"]
    assert ctl["round_trip_ms_p50"] > 0 and ctl["round_trip_ms_p95"] >= ctl["round_trip_ms_p50"]
    assert ctl["failures"] == 0 and ctl["reconnects"] == 0 and ctl["held_steps"] == 0
    assert remote["controller"]["remote"] == "local" and remote["samplers"]["candidate"]["latency"] is None
    summary = (out / "summary.md").read_text()
    assert "| round trip ms/chunk p50 (server) |" in summary and "remote=local" in summary
    assert "policy server this run started on loopback" in summary
    assert "candidate/round_trip_ms_p50" in flat_metrics(remote)
    log = (out / realtime.SERVER_LOG).read_text()
    assert "para_policy server listening on 127.0.0.1:" in log and "para_policy server stopped" in log
    progress = json.loads((out / "progress.json").read_text())
    assert progress["fingerprint"]["controller"]["remote"] == "local"
    assert "chunk_obs" not in progress["episodes"]["candidate"][0]


def test_the_local_server_is_gone_after_the_run(served):
    *_, before, after = served
    assert after <= before  # no child left behind (the server was stopped and reaped)


def test_a_server_that_fails_to_start_stops_the_run_with_its_error(ckpt, tmp_path, monkeypatch):
    """Its stderr's last lines in the message, nothing rolled out, no child left behind."""
    calls = []
    monkeypatch.setattr(episodes_module, "run_controller_rollouts", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(realtime, "server_command",
                        lambda *a: [sys.executable, "-c", "import sys; print('para-policy serve: error: no', "
                                    "file=sys.stderr); sys.exit(2)"])
    before = children()
    with pytest.raises(EvalConfigError, match=r"controller.remote=local: the policy server exited with status 2 "
                                              r"before it listened: para-policy serve: error: no"):
        run_eval(ckpt, tmp_path / "a", "controller.remote=local", "task.episodes=1")
    assert calls == [] and children() <= before
    assert "para-policy serve: error: no" in (tmp_path / "a" / realtime.SERVER_LOG).read_text()


def test_remote_needs_the_controller_loop():
    """sync on the steps clock is the batched loop in process; a served candidate runs the Controller's loop."""
    assert ControllerSettings().batched and not ControllerSettings(remote="local").batched
    assert ControllerSettings(remote="local").fingerprint(with_remote=False) == {
        "mode": "sync", "delay_steps": 0, "clock": "steps", "control_hz": None}


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value,message", [
    ("remote", r"controller.remote must be null \(in process\), 'local'.*got 'remote'"),
    ("localhost:99999", r"controller.remote='localhost:99999': the port must be a number in 1..65535"),
    ("localhost:0", r"the port must be a number in 1..65535, got '0'"),
    ("50051", r"controller.remote must be null.*got 50051"),
    ("::1:50051", r"an IPv6 host in brackets"),
])
def test_bad_remote_values_are_refused_naming_the_key(ckpt, tmp_path, monkeypatch, value, message):
    def no_rollouts(*a, **k):
        raise AssertionError("rolled out despite a bad config")

    monkeypatch.setattr(episodes_module, "run_controller_rollouts", no_rollouts)
    monkeypatch.setattr(episodes_module, "run_rollouts", no_rollouts)
    with pytest.raises(EvalConfigError, match=message):
        run_eval(ckpt, tmp_path / "out", *RTC, f"controller.remote='{value}'" if ":" in value
                 else f"controller.remote={value}")
    assert not (tmp_path / "out" / "progress.json").exists()


def test_remote_settings_parse_label_and_fingerprint():
    ok = controller_settings(compose_eval([*RTC, "controller.remote=127.0.0.1:50051"]))
    assert ok.remote == "127.0.0.1:50051" and ok.label() == "rtc d=2 remote=127.0.0.1:50051"
    assert ok.label(served=False) == "rtc d=2" and ok.fingerprint()["remote"] == "server"
    assert "remote" not in ok.fingerprint(with_remote=False)
    assert controller_settings(compose_eval(["controller.remote='[::1]:50051'"])).remote == "[::1]:50051"
    plain = controller_settings(compose_eval(RTC))
    assert plain.remote is None and "remote" not in plain.fingerprint() and "remote" not in plain.as_dict()
    assert controller_settings(compose_eval()).fingerprint() is None  # sync in process: earlier folders resume


def test_a_running_server_with_another_sampler_is_refused(ckpt, tmp_path):
    """``HOST:PORT``: the server's Metadata must name the candidate's sampler."""
    from para_policy.loading import load_policy
    from para_policy.serving.server import serve

    policy = load_policy(ckpt, backend="eager")
    handle = serve(policy, host="127.0.0.1", port=0, sampler="sequential")
    try:
        with pytest.raises(EvalConfigError, match=r"controller.remote=127.0.0.1:\d+: the policy server at .* does "
                                                  r"not serve the candidate: it serves sampler 'sequential' and the "
                                                  r"candidate is 'paradigms'"):
            run_eval(ckpt, tmp_path, *RTC, "compare=false", "task.episodes=1", f"controller.remote={handle.address}")
    finally:
        handle.stop(grace=0)


def test_a_running_server_with_a_token_serves_the_candidate(ckpt, tmp_path, monkeypatch):
    """``HOST:PORT`` with the token from ``$PARA_POLICY_TOKEN``: a wrong one is refused before any episode, the
    right one runs the candidate's episodes there."""
    from para_policy.loading import load_policy
    from para_policy.samplers import sampler_spec
    from para_policy.serving.server import serve

    policy = load_policy(ckpt, backend="eager")
    handle = serve(policy, host="127.0.0.1", port=0, token="right", sampler=sampler_spec("paradigms", window=4))
    args = (*RTC, "compare=false", "task.episodes=1", "+inference.backend=eager", f"controller.remote={handle.address}")
    try:
        monkeypatch.setenv("PARA_POLICY_TOKEN", "wrong")
        with pytest.raises(EvalConfigError, match=r"UNAUTHENTICATED.*the token comes from \$PARA_POLICY_TOKEN"):
            run_eval(ckpt, tmp_path / "wrong", *args)
        monkeypatch.setenv("PARA_POLICY_TOKEN", "right")
        results = run_eval(ckpt, tmp_path / "right", *args)
    finally:
        handle.stop(grace=0)
    (ep,) = results["samplers"]["candidate"]["episodes"]
    assert ep["error"] is None and ep["round_trip_ms_p50"] > 0 and results["controller"]["remote"] == handle.address
    assert json.loads((tmp_path / "right" / "progress.json").read_text())["fingerprint"]["controller"]["remote"] \
        == "server"


def test_remote_with_a_ray_cluster_is_refused(ckpt, tmp_path):
    with pytest.raises(EvalConfigError, match=r"controller.remote=local .* does not combine with \+cluster=ray"):
        run_eval(ckpt, tmp_path, *RTC, "controller.remote=local", "+cluster=ray")


def test_server_command_carries_the_resolved_sampler_and_inference(ckpt):
    from para_policy.samplers import sampler_spec
    from para_policy.serve import parse_overrides

    spec = sampler_spec("paradigms", window=4, tolerance=0.05, scheduler="ddim", num_inference_steps=8)
    cmd = realtime.server_command(ckpt, spec, {"device": "cpu", "threads": 1, "inference": {"precision": "fp32"}})
    assert cmd[:4] == [sys.executable, "-m", "para_policy.serve", "serve"] and "--port" in cmd and "1" in cmd
    overrides = [c for c in cmd if "=" in c]
    node, inference = parse_overrides(overrides, None)
    assert sampler_spec(node) == spec and inference["backend"] == "eager"
    assert runner.KNOWN_KEYS  # the runner imports realtime's server helpers (no circle)
