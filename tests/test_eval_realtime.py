"""The evaluator's controller modes (issue 15): async inference and real-time chunking in eval.py.

Tiny random-weight policies (10 DDPM steps, 8 of 16 actions executed), 2 PushT episodes of 20
steps: seconds per run. The steps clock makes every run here deterministic except the wall-clock one.
"""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

import pytest
from eval_fixtures import fresh_baseline_cache, one_torch_thread  # noqa: F401  (autouse fixtures)
from test_eval import build_checkpoint, compose_eval

from para_policy.evaluation import EvalConfigError, evaluate, flat_metrics, realtime, runner
from para_policy.evaluation import episodes as episodes_module
from para_policy.evaluation.config import ControllerSettings, controller_settings

ROOT = Path(__file__).resolve().parents[1]
FAST = ["task.episodes=2", "task.max_steps=20", "num_envs=2", "latency.calls=2", "latency.warmup=0", "logger=none",
        "progress=false", "threads=1", "video.enabled=false"]
FIELDS = {"seed", "max_reward", "success", "length", "n_chunks", "rounds_per_chunk", "wall_time_s", "error",
          *realtime.CONTROLLER_FIELDS}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict:
    window = [] if "sampler=sequential" in overrides else ["sampler.window=4"]  # paradigms: no window tuning
    cfg = compose_eval([f"checkpoint={ckpt}", *FAST, *window, *overrides])
    return evaluate(cfg, out, overrides=list(overrides))


def episodes(results: dict, role: str = "candidate") -> list[dict]:
    return results["samplers"][role]["episodes"]


def same_episodes(a: list[dict], b: list[dict], abs_tol: float = 0.0) -> None:
    assert [e["seed"] for e in a] == [e["seed"] for e in b]
    for x, y in zip(a, b, strict=True):
        assert (x["length"], x["n_chunks"], x["success"], x["error"]) == (y["length"], y["n_chunks"], y["success"],
                                                                         y["error"])
        if abs_tol:
            assert x["max_reward"] == pytest.approx(y["max_reward"], abs=abs_tol)
        else:
            assert x["max_reward"] == y["max_reward"]  # bit for bit


@pytest.fixture(scope="module")
def rtc_run(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtc")
    runner._BASELINE_CACHE.clear()
    return run_eval(ckpt, out, "controller.mode=rtc", "controller.delay_steps=2"), out


# ---- results --------------------------------------------------------------------------------

def test_rtc_run_writes_the_controller_stats_per_episode_and_per_sampler(rtc_run):
    results, out = rtc_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["controller"] == results["controller"]
    assert results["controller"] | {"label": None} == {
        "mode": "rtc", "delay_steps": 2, "clock": "steps", "control_hz": None, "prefix_mode": "clean",
        "soft_masking": True, "deadline_ms": None, "extend_plan": False, "period_s": None, "deterministic": True,
        "label": None, "n_action_steps": 8}
    for role in ("candidate", "baseline"):
        s = results["samplers"][role]
        for e in s["episodes"]:
            assert set(e) >= FIELDS and e["error"] is None
            # 20 steps, 8 actions per chunk, the next one started 2 steps early: chunks at 0, 8 and 14
            assert e["n_chunks"] == len(e["rounds_per_chunk"]) == 3 and e["switches"] == 2
            assert e["stalls"] == 0 and e["idle_steps"] == 0  # d <= n_action_steps / 2: always ready in time
            assert e["steps_in_flight"] == 6 and e["delay_used_mean"] == 2 and e["delay_used_max"] == 2
            assert 0 <= e["switch_discontinuity_mean"] <= e["switch_discontinuity_max"]
        ctl = s["controller"]
        assert ctl["episodes"] == 2 and ctl["switches"] == 4 and ctl["stalls"] == 0 and ctl["idle_steps"] == 0
        assert ctl["steps_in_flight_fraction"] == pytest.approx(12 / 40)
        assert ctl["switch_discontinuity_max"] == max(e["switch_discontinuity_max"] for e in s["episodes"])
        assert "late_steps" not in ctl  # the steps clock has no ticks to miss
    summary = (out / "summary.md").read_text()
    assert "controller: `rtc d=2`" in summary and "| switch jump mean (px) |" in summary
    assert "| stalls/episode |" in summary and "## How chunks were scheduled" in summary
    progress = json.loads((out / "progress.json").read_text())
    assert progress["fingerprint"]["controller"] == {"mode": "rtc", "delay_steps": 2, "clock": "steps",
                                                     "control_hz": None, "prefix_mode": "clean", "soft_masking": True}
    assert "soft masking: the old chunk's plan guides the positions after them, imposed clean)" in summary
    metrics = flat_metrics(results)
    assert {"candidate/switch_discontinuity_mean", "candidate/stalls_per_episode", "baseline/idle_steps"} <= \
        set(metrics)
    assert results["config"]["controller"]["mode"] == "rtc"  # what W&B records as the run's config


def test_async_run_and_latency_inputs_from_the_controller(rtc_run, ckpt, tmp_path):
    results = run_eval(ckpt, tmp_path, "controller.mode=async", "controller.delay_steps=2", "compare=false")
    assert set(results["samplers"]) == {"candidate"}
    for e in episodes(results):
        assert set(e) >= FIELDS and e["stalls"] == 0 and e["switches"] == e["n_chunks"] - 1
    # the same schedule as rtc's, but a freely sampled chunk: other jumps at the switches
    rtc = episodes(rtc_run[0])
    assert [e["switch_discontinuity_max"] for e in episodes(results)] != [e["switch_discontinuity_max"] for e in rtc]
    assert results["samplers"]["candidate"]["latency"]["ms_per_chunk"]["n"] == 2  # replayed recorded chunks
    progress = json.loads((tmp_path / "progress.json").read_text())
    first = progress["episodes"]["candidate"][0]
    assert len(first["chunk_obs"]) == first["n_chunks"] == len(first["chunk_guess"])
    assert first["chunk_guess"][0] is None and first["chunk_guess"][1] is not None  # paradigms warm-starts


def test_sync_keeps_the_batched_loop_and_its_files(ckpt, tmp_path, monkeypatch):
    def no_controller(*a, **k):
        raise AssertionError("sync ran through the Controller")

    monkeypatch.setattr(episodes_module, "run_controller_rollouts", no_controller)
    results = run_eval(ckpt, tmp_path, "compare=false")
    assert results["controller"]["mode"] == "sync" and "controller" not in results["samplers"]["candidate"]
    assert not set(episodes(results)[0]) & set(realtime.CONTROLLER_FIELDS)
    assert "controller" not in json.loads((tmp_path / "progress.json").read_text())["fingerprint"]
    assert "How chunks were scheduled" not in (tmp_path / "summary.md").read_text()


# ---- the same episodes ---------------------------------------------------------------------

def test_rtc_at_delay_zero_gives_the_batched_sync_episodes(ckpt, tmp_path):
    """d = 0: each chunk is planned when the queue runs out and nothing is frozen, which is sync; and
    the Controller's chunks get the batched loop's noise per (episode, chunk), so the episodes are
    the batched loop's (one env at a time there, so the batch does not change the float sums).
    ``paradigms`` warm-starts, so the Controller's guesses must be the batched loop's too."""
    sync = run_eval(ckpt, tmp_path / "sync", "compare=false", "num_envs=1")
    rtc = run_eval(ckpt, tmp_path / "rtc", "compare=false", "controller.mode=rtc", "controller.delay_steps=0")
    a, b = episodes(sync), episodes(rtc)
    same_episodes(a, b)
    assert [e["rounds_per_chunk"] for e in a] == [e["rounds_per_chunk"] for e in b]
    assert all(e["steps_in_flight"] == 0 and e["stalls"] == 0 for e in b)


def test_baseline_and_candidate_under_rtc_at_tolerance_zero_give_the_same_episodes(ckpt, tmp_path):
    """Both samplers run under the same controller settings and the same noise: exact Picard
    (tolerance 0) with the frozen prefix is the sequential sampler with that inpainting."""
    results = run_eval(ckpt, tmp_path, "sampler.tolerance=0.0", "controller.mode=rtc", "controller.delay_steps=3",
                       "task.max_steps=14")
    cand, base = episodes(results, "candidate"), episodes(results, "baseline")
    same_episodes(cand, base, abs_tol=1e-4)
    for x, y in zip(cand, base, strict=True):
        assert x["switches"] == y["switches"]
        assert x["switch_discontinuity_max"] == pytest.approx(y["switch_discontinuity_max"], abs=1e-2)


@pytest.mark.parametrize("prefix_mode,soft", [("noised", False), ("clean", True)])
def test_rtc_prefix_mode_and_soft_masking_reach_the_controllers_calls(ckpt, tmp_path, monkeypatch, prefix_mode, soft):
    seen: list[tuple[str, bool]] = []
    real = realtime.KeyedNoisePolicy.predict_action

    def spy(self, obs_dict, **kwargs):
        if kwargs.get("prefix_actions") is not None:
            seen.append((kwargs["prefix_mode"], kwargs.get("guide_actions") is not None))
        return real(self, obs_dict, **kwargs)

    monkeypatch.setattr(realtime.KeyedNoisePolicy, "predict_action", spy)
    results = run_eval(ckpt, tmp_path, "compare=false", "controller.mode=rtc", "controller.delay_steps=2",
                       f"controller.prefix_mode={prefix_mode}", f"controller.soft_masking={str(soft).lower()}")
    assert seen and set(seen) == {(prefix_mode, soft)}
    assert (results["controller"]["prefix_mode"], results["controller"]["soft_masking"]) == (prefix_mode, soft)


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["controller.mode=rct"], r"controller.mode must be 'sync', 'async' or 'rtc', got 'rct' \(did you mean 'rtc'\?\)"),
    (["controller.clock=wal"], r"controller.clock must be 'wall' or 'steps', got 'wal'"),
    (["controller.mode=rtc", "controller.delay_steps=8"],
     r"controller.delay_steps must be an integer in \[0, n_action_steps - 1\] = \[0, 7\].*got 8"),
    (["controller.delay_steps=2"], r"controller.delay_steps=2 applies to mode='async' or 'rtc'"),
    (["controller.mode=async", "controller.delay_steps=-1"], r"controller.delay_steps must be >= 0, got -1"),
    (["controller.mode=async", "controller.delay_steps=1.5"], r"controller.delay_steps must be an integer"),
    (["controller.mode=rtc", "controller.clock=wall", "controller.delay_steps=0"],
     r"controller.delay_steps=0 with clock='wall'.*None \(null in a config\) to measure it"),
    (["controller.control_hz=10"], r"controller.control_hz=10 applies to controller.clock=wall only"),
    (["controller.clock=wall", "controller.control_hz=0"], r"controller.control_hz must be a number > 0"),
    (["+controller.delay=1"], r"controller has unknown keys \['delay'\]"),
    (["controller.mode=async", "controller.delay_steps=1", "controller.prefix_mode=clean"],
     r"controller.prefix_mode='clean' applies to mode='rtc' only"),
    (["controller.mode=sync", "controller.soft_masking=false"],
     r"controller.soft_masking=False applies to mode='rtc' only"),
    (["controller.mode=rtc", "controller.soft_masking=maybe"], r"controller.soft_masking must be true or false"),
    (["controller.mode=rtc", "controller.prefix_mode=noisy"],
     r"controller.prefix_mode must be 'clean' or 'noised', got 'noisy' \(did you mean 'noised'\?\)"),
    (["controller.mode=rtc", "controller.delay_steps=2", "controller.deadline_ms=100"],
     r"controller.deadline_ms=100 applies to clock='wall' only"),
    (["controller.mode=rtc", "controller.clock=wall", "controller.deadline_ms=-5"],
     r"controller.deadline_ms must be a number >= 0 \(ms per chunk\), got -5"),
    (["controller.mode=rtc", "controller.clock=wall", "controller.deadline_ms=soon"],
     r"controller.deadline_ms must be a number >= 0"),
    (["controller.extend_plan=true"], r"controller.extend_plan=True applies to mode='async' or 'rtc'"),
    (["controller.mode=rtc", "controller.extend_plan=maybe"], r"controller.extend_plan must be true or false"),
    (["sampler=sequential", "controller.mode=rtc", "controller.clock=wall", "controller.deadline_ms=100"],
     r"controller.deadline_ms=100 needs a Picard sampler.*sampler=sequential runs every step"),
])
def test_bad_controller_settings_stop_before_any_rollout(ckpt, tmp_path, monkeypatch, overrides, message):
    def no_rollouts(*a, **k):
        raise AssertionError("rolled out despite a bad config")

    monkeypatch.setattr(episodes_module, "run_rollouts", no_rollouts)
    monkeypatch.setattr(episodes_module, "run_controller_rollouts", no_rollouts)
    with pytest.raises(EvalConfigError, match=message):
        run_eval(ckpt, tmp_path / "out", *overrides)
    assert not (tmp_path / "out" / "progress.json").exists()


def test_settings_defaults_and_labels():
    cfg = compose_eval()
    assert dict(cfg.controller) == {"mode": "sync", "delay_steps": None, "clock": "steps", "control_hz": None,
                                    "prefix_mode": None, "soft_masking": None, "deadline_ms": None,
                                    "extend_plan": None, "remote": None}
    assert controller_settings(cfg) == ControllerSettings() and ControllerSettings().batched
    wall = controller_settings(compose_eval(["controller.mode=rtc", "controller.clock=wall"]))
    assert (wall.delay_steps, wall.control_hz, wall.period_s) == (None, 10.0, 0.1)  # PushT's fps
    assert wall.label() == "rtc wall 10 Hz d measured" and not wall.deterministic
    timed = controller_settings(compose_eval(["controller.mode=rtc", "controller.clock=wall",
                                              "controller.deadline_ms=250"]))
    assert timed.deadline_ms == 250.0 and timed.label() == "rtc wall 10 Hz d measured deadline 250 ms"
    assert timed.fingerprint() != wall.fingerprint() and "deadline_ms" not in wall.fingerprint()
    assert controller_settings(compose_eval(["controller.mode=async", "controller.delay_steps=4"])).label() == \
        "async d=4"
    rtc = controller_settings(compose_eval(["controller.mode=rtc", "controller.delay_steps=2"]))
    assert (rtc.prefix_mode, rtc.soft_masking, rtc.label()) == ("clean", True, "rtc d=2")
    hard = controller_settings(compose_eval(["controller.mode=rtc", "controller.delay_steps=2",
                                             "controller.soft_masking=false"]))
    assert (hard.soft_masking, hard.label()) == (False, "rtc hard d=2") and hard.fingerprint() != rtc.fingerprint()
    noised = controller_settings(compose_eval(["controller.mode=rtc", "controller.delay_steps=2",
                                               "controller.prefix_mode=noised"]))
    assert (noised.prefix_mode, noised.label()) == ("noised", "rtc noised d=2")
    assert rtc.fingerprint() != noised.fingerprint()
    # async has no prefix: its fingerprint is the one earlier run folders hold
    assert not {"prefix_mode", "soft_masking"} & set(controller_settings(compose_eval(["controller.mode=async"]))
                                                     .fingerprint())


# ---- resume -------------------------------------------------------------------------------

def test_resume_needs_the_same_controller_settings(ckpt, tmp_path, monkeypatch):
    first = run_eval(ckpt, tmp_path / "a", "controller.mode=rtc", "controller.delay_steps=1", "compare=false",
                     "task.episodes=1")
    with pytest.raises(EvalConfigError, match=r"cannot resume.*controller.*'delay_steps': 1.*'delay_steps': 2"):
        run_eval(ckpt, tmp_path / "b", "controller.mode=rtc", "controller.delay_steps=2", "compare=false",
                 f"resume_dir={tmp_path / 'a'}")
    with pytest.raises(EvalConfigError, match=r"cannot resume.*controller"):  # a sync run folder under rtc
        run_eval(ckpt, tmp_path / "c", "compare=false", f"resume_dir={tmp_path / 'a'}")

    ran: list[list[int]] = []
    real = episodes_module.run_controller_rollouts

    def spy(policy, spec, task, seeds, settings, **kw):
        ran.append(list(seeds))
        return real(policy, spec, task, seeds, settings, **kw)

    monkeypatch.setattr(episodes_module, "run_controller_rollouts", spy)
    resumed = run_eval(ckpt, tmp_path / "d", "controller.mode=rtc", "controller.delay_steps=1", "compare=false",
                       f"resume_dir={tmp_path / 'a'}")
    assert ran == [[100001]]  # only the missing episode
    assert episodes(resumed)[0] == episodes(first)[0]


# ---- real time -----------------------------------------------------------------------------

def test_wall_clock_run_at_a_generous_period_never_stalls(ckpt, tmp_path):
    """Sequential DDIM-4 on the tiny policy takes a few ms per chunk; at 10 Hz every chunk is ready in time."""
    results = run_eval(ckpt, tmp_path, "sampler=sequential", "sampler.scheduler=ddim", "sampler.num_inference_steps=4",
                       "compare=false", "task.max_steps=10", "controller.mode=rtc", "controller.clock=wall",
                       "controller.control_hz=10", "latency.calls=0")
    assert results["controller"]["deterministic"] is False and results["controller"]["period_s"] == 0.1
    ctl = results["samplers"]["candidate"]["controller"]
    assert ctl["stalls"] == 0 and ctl["idle_steps"] is None and ctl["late_steps"] is not None
    assert ctl["delay_used_mean"] >= 1 and ctl["chunk_latency_ms_p50"] > 0
    for e in episodes(results):
        assert e["error"] is None and e["length"] == 10 and e["stalls"] == 0
        assert e["wall_time_s"] >= 0.9 * 9 * 0.1  # stepped on the 10 Hz grid, not as fast as it can
    assert "real time, not deterministic" in (tmp_path / "summary.md").read_text()
    assert not [t for t in threading.enumerate() if t.name.startswith("para_policy-controller")]


def test_wall_clock_deadline_stops_the_candidates_chunks_and_not_the_baselines(ckpt, tmp_path):
    """A deadline of 0 ms: every candidate chunk stops after its first round (the Controller's minimum) and
    is counted; the sequential baseline, which has no partial answer, runs every step without one."""
    results = run_eval(ckpt, tmp_path, "sampler.tolerance=0", "task.episodes=1", "task.max_steps=12",
                       "controller.mode=rtc", "controller.clock=wall", "controller.control_hz=10",
                       "controller.deadline_ms=0", "latency.calls=0")
    assert results["controller"]["deadline_ms"] == 0.0
    cand, base = (results["samplers"][r] for r in ("candidate", "baseline"))
    (ep,) = episodes(results)
    assert ep["error"] is None and ep["n_chunks"] >= 2
    assert ep["deadline_misses"] == ep["n_chunks"] and set(ep["rounds_per_chunk"]) == {1}
    assert cand["controller"]["deadline_misses"] == ep["n_chunks"]
    (bep,) = episodes(results, "baseline")
    assert bep["deadline_misses"] == 0 and set(bep["rounds_per_chunk"]) == {10}  # the tiny policy's 10 steps
    assert base["controller"]["deadline_misses"] == 0
    assert "chunks stopped at the deadline" in (tmp_path / "summary.md").read_text()


def test_extend_plan_in_the_evaluator_runs_on_where_a_late_chunk_would_idle(ckpt, tmp_path):
    """Delay 6 of 8 on the steps clock: waiting idles the robot at every switch after the first; with
    controller.extend_plan=true the old plan runs on and nothing idles. Counted per episode and in total."""
    common = ["compare=false", "task.episodes=1", "task.max_steps=40", "controller.mode=rtc",
              "controller.delay_steps=6", "latency.calls=0"]
    waited = run_eval(ckpt, tmp_path / "wait", *common)
    extended = run_eval(ckpt, tmp_path / "extend", *common, "controller.extend_plan=true")
    w, e = waited["samplers"]["candidate"]["controller"], extended["samplers"]["candidate"]["controller"]
    assert w["idle_steps"] > 0 and w["extended_steps"] is None
    assert e["idle_steps"] == 0 and e["stalls"] == 0 and e["extended_steps"] > 0
    assert episodes(extended)[0]["extended_steps"] == e["extended_steps"]
    assert extended["controller"]["extend_plan"] is True
    assert "steps run past n_action_steps (extend_plan)" in (tmp_path / "extend" / "summary.md").read_text()
    settings = controller_settings(compose_eval(["controller.mode=rtc", "controller.delay_steps=6",
                                                 "controller.extend_plan=true"]))
    assert settings.label() == "rtc extend d=6" and settings.fingerprint()["extend_plan"] is True


def test_wait_for_tick_stays_on_the_grid():
    import time

    t0 = time.perf_counter()
    nxt, missed = realtime.wait_for_tick(t0 + 0.02, 0.02)
    assert not missed and time.perf_counter() >= t0 + 0.02 and nxt == pytest.approx(t0 + 0.04)
    t1 = time.perf_counter()
    nxt, missed = realtime.wait_for_tick(t1 - 0.05, 0.02)  # 2.5 periods late: run now, resume the grid
    assert missed and t1 < nxt <= time.perf_counter() + 0.02  # the next tick after now, no burst
    assert (nxt - (t1 - 0.05)) / 0.02 == pytest.approx(round((nxt - (t1 - 0.05)) / 0.02))  # on the grid


# ---- errors in one episode ---------------------------------------------------------------------

def test_an_episode_that_raises_under_rtc_is_recorded_and_the_rest_go_on(ckpt, tmp_path, monkeypatch):
    from test_eval import _BrokenEnv

    from para_policy.evaluation import rollout as rollout_module

    real = rollout_module.make_task_env
    monkeypatch.setattr(rollout_module, "make_task_env", lambda task, **kw: _BrokenEnv(real(task, **kw), 100001))
    results = run_eval(ckpt, tmp_path, "compare=false", "controller.mode=rtc", "controller.delay_steps=2",
                       "task.max_steps=12")
    cand = results["samplers"]["candidate"]
    assert cand["failures"] == [{"seed": 100001, "error": "RuntimeError: simulated physics blow-up"}]
    assert [e["seed"] for e in cand["episodes"] if e["error"] is None] == [100000]
    assert cand["controller"]["episodes"] == 1 and cand["n_failed"] == 1


# ---- the benchmark ---------------------------------------------------------------------------

def test_bench_realtime_smoke(ckpt, tmp_path, capsys, monkeypatch):
    """The grid's three kinds of point, one short episode each, in this process (no interpreter start)."""
    monkeypatch.syspath_prepend(str(ROOT / "eval"))
    bench = importlib.import_module("bench_realtime")
    bench.main(["--episodes", "1", "--delays", "2", "--checkpoint", str(ckpt), "--max-steps", "8", "--scheduler", "",
                "--steps", "0", "--quiet", "--out", str(tmp_path), "--also", "rtc-noised:1"])
    assert "[5/5] rtc-noised_d1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "bench_realtime.json").read_text())
    assert [(p["mode"], p["delay"]) for p in summary["points"]] == [("sync", 0), ("async", 2), ("rtc-hard", 2),
                                                                    ("rtc", 2), ("rtc-noised", 1)]
    hard = json.loads((tmp_path / "runs" / "rtc-hard_d2" / "results.json").read_text())["controller"]
    assert (hard["prefix_mode"], hard["soft_masking"]) == ("clean", False)
    with pytest.raises(SystemExit):
        bench.main(["--also", "rtc:x", "--out", str(tmp_path)])
    assert "expected MODE:DELAY" in capsys.readouterr().err
    assert all(p["mean_score"] is not None and p["episodes"] == 1 for p in summary["points"])
    md = (tmp_path / "bench_realtime.md").read_text()
    assert "| rtc | 2 |" in md and "switch jump mean (px)" in md
    assert (tmp_path / "bench_realtime.png").stat().st_size > 0
