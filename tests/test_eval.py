"""The evaluator (eval.py / para_policy.evaluation): config, side-by-side runs, files, errors, sweep.

Runs use a small random-weight policy (10 DDPM steps) whose normalizer is fitted on PushT
observations, 2 episodes of 16 steps: seconds, not minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from eval_fixtures import fresh_baseline_cache, one_torch_thread  # noqa: F401  (autouse fixtures)
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from para_policy import LowdimPolicy, save_checkpoint
from para_policy.evaluation import EvalConfigError, episodes, evaluate, flat_metrics, runner, sampler_config
from para_policy.evaluation import rollout as rollout_module
from para_policy.evaluation.config import task_settings
from para_policy.evaluation.rollout import call_noise, run_rollouts
from para_policy.evaluation.sweep import SweepSummary
from para_policy.tasks.pusht.env import make_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
FAST = ["task.episodes=2", "task.max_steps=16", "num_envs=2", "latency.calls=4", "latency.warmup=1",
        "logger=none", "progress=false", "threads=1"]  # 1 thread: 2 would fight over a busy machine


def compose_eval(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides or []))


def policy_config(obs_dim: int = 20, steps: int = 10) -> dict:
    return {
        "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "obs_dim": obs_dim, "action_dim": 2,
        "num_inference_steps": steps, "obs_as_global_cond": True, "oa_step_convention": True,
        "model": {"input_dim": 2, "global_cond_dim": obs_dim * 2, "diffusion_step_embed_dim": 16,
                  "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4, "cond_predict_scale": True},
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100,
                            "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
                            "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon"},
    }


def build_checkpoint(path: Path, obs_dim: int = 20) -> Path:
    """Random weights; normalizer fitted on env observations so actions land in the arena."""
    torch.manual_seed(0)
    policy = LowdimPolicy(policy_config(obs_dim))
    env = make_env()
    obs = np.stack([env.reset(seed=s)[0] for s in range(8)])
    env.close()
    actions = np.concatenate([obs[:, 18:20], [[20.0, 20.0], [490.0, 490.0]]])
    policy.normalizer.fit({"obs": obs[:, :obs_dim], "action": actions})
    save_checkpoint(path, policy.state_dict(), policy.config)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_eval([f"checkpoint={ckpt}", *FAST, *overrides])
    return evaluate(cfg, out, overrides=[*FAST, *overrides])


@pytest.fixture(scope="module")
def paradigms_run(ckpt, tmp_path_factory):
    runner._BASELINE_CACHE.clear()
    out = tmp_path_factory.mktemp("paradigms")
    return run_eval(ckpt, out), out


# ---- config composition -------------------------------------------------------------------

def test_default_config_composes_with_the_issue_defaults():
    cfg = compose_eval()
    assert cfg.task.name == "pusht"
    assert cfg.sampler.name == "paradigms"  # sampler=paradigms: the fastest measured setting
    assert cfg.logger.backend == "wandb"
    assert cfg.compare is True
    assert cfg.checkpoint.endswith("para_policy/assets/pusht_lowdim.safetensors")
    assert Path(cfg.checkpoint).is_absolute()
    task = task_settings(cfg)
    assert task.episodes == 50 and task.max_steps == 300
    assert task.seeds[0] == 100000 and task.seeds[-1] == 100049
    assert task.env_id == "gym_pusht/PushT-v0" and task.obs_type == "keypoints" and task.obs_dim == 20
    spec = sampler_config(cfg.sampler)
    assert spec.options["tolerance"] == pytest.approx(0.02) and spec.options["window"] == "auto"
    assert spec.options["linear_solve"] and spec.options["secant"] and spec.warm_start
    from para_policy.samplers import sampler_spec  # the library's preset: the same spec

    assert spec == sampler_spec("paradigms")
    published = sampler_config(compose_eval(["sampler=paradigms_published"]).sampler)
    assert published.name == "paradigms_published" and published.options == {
        "window": 16, "tolerance": 0.1, "max_iterations": None, "per_sample_windows": False, "linear_solve": False,
        "secant": False, "round_shape": "compact", "compile_round": False}
    assert not published.warm_start and published == sampler_spec("paradigms_published")


def test_overrides_and_sampler_groups():
    cfg = compose_eval(["sampler=paradigms_published", "sampler.scheduler=ddim", "sampler.num_inference_steps=16",
                        "sampler.tolerance=0.05", "sampler.window=4", "task.episodes=3", "logger=none", "num_envs=3"])
    spec = sampler_config(cfg.sampler)
    assert (spec.name, spec.scheduler, spec.num_inference_steps) == ("paradigms_published", "ddim", 16)
    assert spec.options["tolerance"] == 0.05 and spec.options["window"] == 4
    assert task_settings(cfg).seeds == [100000, 100001, 100002]
    assert cfg.logger.backend == "none" and cfg.num_envs == 3
    seq = sampler_config(compose_eval(["sampler=sequential"]).sampler)
    assert seq.name == "sequential" and seq.options == {}


def test_unknown_sampler_or_task_is_a_clear_hydra_error():
    with pytest.raises(MissingConfigException, match="sampler/nope"):
        compose_eval(["sampler=nope"])
    with pytest.raises(MissingConfigException, match="task/nope"):
        compose_eval(["task=nope"])


# ---- error paths: before any rollout ------------------------------------------------------

def test_negative_tolerance_stops_before_loading_anything(tmp_path, monkeypatch):
    def no_rollouts(*a, **k):
        raise AssertionError("rolled out despite a bad config")

    monkeypatch.setattr(episodes, "run_rollouts", no_rollouts)
    cfg = compose_eval(["sampler.tolerance=-0.1", f"checkpoint={tmp_path / 'missing.safetensors'}", *FAST])
    with pytest.raises(EvalConfigError, match=r"sampler\.tolerance must be a finite number >= 0"):
        evaluate(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_checkpoint_is_named(tmp_path):
    cfg = compose_eval([f"checkpoint={tmp_path / 'missing.safetensors'}", *FAST])
    with pytest.raises(EvalConfigError, match="checkpoint not found"):
        evaluate(cfg, tmp_path / "out")


def test_checkpoint_for_another_obs_size_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(episodes, "run_rollouts", lambda *a, **k: pytest.fail("rolled out"))
    small = build_checkpoint(tmp_path / "obs5.safetensors", obs_dim=5)
    cfg = compose_eval([f"checkpoint={small}", *FAST])
    with pytest.raises(EvalConfigError, match=r"obs_dim=5.*obs_dim=20"):
        evaluate(cfg, tmp_path / "out")


def test_picard_option_on_sequential_is_refused():
    with pytest.raises(EvalConfigError, match="does not take.*tolerance.*takes no options"):
        sampler_config({"name": "sequential", "tolerance": 0.1})
    with pytest.raises(EvalConfigError, match="sampler.window must be an integer >= 1"):
        sampler_config({"name": "paradigms", "window": 0})
    with pytest.raises(EvalConfigError, match="sampler.secant=True needs linear_solve=True"):
        sampler_config({"name": "paradigms", "secant": True, "linear_solve": False})
    with pytest.raises(EvalConfigError, match="sampler.secant must be true or false"):
        sampler_config({"name": "paradigms", "secant": "yes", "linear_solve": True})


# ---- a full run: schema and files ------------------------------------------------------

def test_run_writes_side_by_side_results(paradigms_run):
    results, out = paradigms_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["samplers"].keys() == results["samplers"].keys() == {"candidate", "baseline"}
    cand, base = results["samplers"]["candidate"], results["samplers"]["baseline"]
    assert cand["name"] == "paradigms" and base["name"] == "sequential"  # sampler=paradigms, the default
    # the baseline runs on the candidate's schedule
    assert base["schedule"] == cand["schedule"] == {"kind": "ddpm", "num_steps": 10}
    assert results["seeds"] == [100000, 100001]
    for s in (cand, base):
        assert [e["seed"] for e in s["episodes"]] == results["seeds"]
        assert s["n_episodes"] == 2 and s["n_failed"] == 0
        assert isinstance(s["mean_score"], float) and 0.0 <= s["mean_score"] <= 1.0
        assert isinstance(s["success_rate"], float) and isinstance(s["mean_length"], float)
        for e in s["episodes"]:
            assert set(e) >= {"seed", "max_reward", "success", "length", "n_chunks", "rounds_per_chunk", "error"}
            assert 1 <= e["length"] <= 16 and e["n_chunks"] == len(e["rounds_per_chunk"]) >= 1
            assert "chunk_obs" not in e and "chunk_guess" not in e
        lat = s["latency"]
        for key in ("ms_per_chunk", "ms_per_action"):
            assert lat[key]["n"] == 4
            assert 0 < lat[key]["p50"] <= lat[key]["p95"] <= lat[key]["p99"] <= lat[key]["max"]
        assert lat["ms_per_action"]["p50"] == pytest.approx(lat["ms_per_chunk"]["p50"] / 8)
    assert base["latency"]["rounds_per_chunk"]["mean"] == 10
    assert base["latency"]["model_evals_per_chunk"]["mean"] == 10
    assert 1 <= cand["latency"]["rounds_per_chunk"]["max"] <= 10
    comp = results["comparison"]
    assert comp["candidate"] == "paradigms" and comp["baseline"] == "sequential"
    ratios = comp["ratios"]
    assert set(ratios) >= {"mean_score", "success_rate", "mean_length", "latency_ms_per_chunk_p50",
                           "latency_ms_per_chunk_p99", "rounds_per_chunk", "model_evals_per_chunk"}
    assert ratios["rounds_per_chunk"] == pytest.approx(cand["latency"]["rounds_per_chunk"]["mean"] / 10)
    assert ratios["latency_ms_per_chunk_p50"] == pytest.approx(
        cand["latency"]["ms_per_chunk"]["p50"] / base["latency"]["ms_per_chunk"]["p50"])
    faith = comp["faithfulness"]
    assert faith["n_calls"] == 4 and 0 <= faith["mean_px"] <= faith["max_px"]
    assert on_disk["samplers"]["candidate"]["spec"]["options"]["tolerance"] == 0.02


def test_run_writes_its_files(paradigms_run):
    results, out = paradigms_run
    for name in ("results.json", "summary.md", "progress.json", "latency.png", "rewards.png", "rounds.png"):
        assert (out / name).stat().st_size > 0, name
    videos = {role: out / p for role, p in results["videos"].items()}
    assert set(videos) == {"candidate", "baseline"}
    for path in videos.values():
        assert path.suffix in (".mp4", ".gif") and path.stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "| mean score |" in summary and "paradigms" in summary and "sequential (baseline)" in summary
    assert "| action distance max (px) |" in summary
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["episodes"]["candidate"]) == 2 and "chunk_obs" in progress["episodes"]["candidate"][0]


def test_flat_metrics_name_what_the_sweep_optimises(paradigms_run):
    results, _ = paradigms_run
    metrics = flat_metrics(results)
    sweep = yaml.safe_load((CONFIG_DIR / "sweep" / "tolerance.yaml").read_text())
    assert sweep["metric"]["name"] in metrics
    assert {"candidate/latency_ms_per_chunk_p50", "baseline/mean_score", "ratio/latency_ms_per_chunk_p50",
            "faithfulness/mean_px", "comparison/speedup_p50"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())


# ---- same noise for both samplers -------------------------------------------------------

def test_sequential_against_itself_is_exactly_faithful(ckpt, tmp_path, monkeypatch):
    """Same starts and the same noise per call: identical actions, identical episodes (W&B offline on)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = run_eval(ckpt, tmp_path, "sampler=sequential", "logger=wandb", "video.enabled=false")
    comp = results["comparison"]
    assert comp["faithfulness"]["mean_px"] == 0.0 and comp["faithfulness"]["max_px"] == 0.0
    cand, base = results["samplers"]["candidate"], results["samplers"]["baseline"]
    strip = [{k: v for k, v in e.items() if k != "wall_time_s"} for e in cand["episodes"]]
    assert strip == [{k: v for k, v in e.items() if k != "wall_time_s"} for e in base["episodes"]]
    assert comp["ratios"]["rounds_per_chunk"] == 1.0
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B offline run missing"


def test_exact_picard_matches_sequential_with_shared_noise(ckpt, tmp_path):
    """tolerance 0 reproduces the sequential sampler only if both got the same x_T and step noise."""
    results = run_eval(ckpt, tmp_path, "sampler.tolerance=0.0", "sampler.window=4", "video.enabled=false")
    assert results["comparison"]["faithfulness"]["max_px"] < 1e-2
    cand, base = results["samplers"]["candidate"], results["samplers"]["baseline"]
    assert [e["max_reward"] for e in cand["episodes"]] == pytest.approx([e["max_reward"] for e in base["episodes"]],
                                                                          abs=1e-4)


def test_paraddim_runs_against_sequential_ddim(ckpt, tmp_path):
    results = run_eval(ckpt, tmp_path, "sampler=paradigms_published", "sampler.scheduler=ddim",
                       "sampler.num_inference_steps=8", "compare=true", "video.enabled=false")
    base = results["samplers"]["baseline"]
    assert base["schedule"] == {"kind": "ddim", "num_steps": 8} and base["spec"]["scheduler"] == "ddim"
    assert results["samplers"]["candidate"]["schedule"] == base["schedule"]
    assert results["comparison"]["faithfulness"]["n_calls"] == 4


def test_call_noise_depends_only_on_its_key(ckpt):
    from para_policy.loading import load_policy

    schedule = load_policy(ckpt).schedule_for(sampler_config({"name": "sequential"}))
    keys = [(0, 0, 100000, 3), (0, 0, 100001, 3)]
    x_T, noise = call_noise(schedule, (16, 2), keys)
    x1, n1 = call_noise(schedule, (16, 2), keys[1:])
    assert torch.equal(x_T[1:], x1) and torch.equal(noise[1:], n1)  # independent of the batch it is in
    assert not torch.equal(x_T[0], x_T[1])


# ---- robustness: failures and resume ------------------------------------------------------

class _BrokenEnv:
    """Wraps an env; ``step`` raises for one seed."""

    def __init__(self, env, bad_seed):
        self.env, self.bad_seed, self.seed = env, bad_seed, None
        self.observation_space = env.observation_space

    def reset(self, seed=None, **kw):
        self.seed = seed
        return self.env.reset(seed=seed, **kw)

    def step(self, action):
        if self.seed == self.bad_seed:
            raise RuntimeError("simulated physics blow-up")
        return self.env.step(action)

    def render(self):
        return self.env.render()

    def close(self):
        self.env.close()


def test_an_episode_that_raises_is_recorded_and_the_rest_go_on(ckpt, tmp_path, monkeypatch):
    real = rollout_module.make_task_env
    monkeypatch.setattr(rollout_module, "make_task_env", lambda task, **kw: _BrokenEnv(real(task, **kw), 100001))
    results = run_eval(ckpt, tmp_path, "task.episodes=3", "video.enabled=false", "compare=false")
    cand = results["samplers"]["candidate"]
    assert "baseline" not in results["samplers"] and results["comparison"] is None
    assert cand["n_episodes"] == 3 and cand["n_failed"] == 1
    assert cand["failures"] == [{"seed": 100001, "error": "RuntimeError: simulated physics blow-up"}]
    ok = [e for e in cand["episodes"] if e["error"] is None]
    assert [e["seed"] for e in ok] == [100000, 100002] and all(e["length"] >= 1 for e in ok)
    assert cand["mean_score"] == pytest.approx(np.mean([e["max_reward"] for e in ok]))


def test_resume_runs_only_the_missing_episodes_and_gives_the_same_results(ckpt, tmp_path, monkeypatch,
                                                                         paradigms_run):
    full, first = paradigms_run
    old = tmp_path / "interrupted"
    old.mkdir()
    progress = json.loads((first / "progress.json").read_text())
    progress["episodes"]["candidate"] = progress["episodes"]["candidate"][:1]  # killed after one episode
    progress["episodes"]["baseline"] = []
    (old / "progress.json").write_text(json.dumps(progress))
    shutil.copytree(first / "videos", old / "videos")

    ran: list[tuple[str, list[int]]] = []
    real = episodes.run_rollouts

    def spy(policy, spec, task, seeds, **kw):
        ran.append((spec.name, list(seeds)))
        return real(policy, spec, task, seeds, **kw)

    monkeypatch.setattr(episodes, "run_rollouts", spy)
    resumed = run_eval(ckpt, tmp_path / "new", f"resume_dir={old}")
    assert ran == [("paradigms", [100001]), ("sequential", [100000, 100001])]
    for role in ("candidate", "baseline"):
        a, b = resumed["samplers"][role]["episodes"], full["samplers"][role]["episodes"]
        assert [e["seed"] for e in a] == [e["seed"] for e in b] == [100000, 100001]
        # the resumed episode ran alone rather than in a batch of 2: equal up to float summation order
        for x, y in zip(a, b, strict=True):
            assert (x["length"], x["n_chunks"], x["error"]) == (y["length"], y["n_chunks"], y["error"])
            assert x["max_reward"] == pytest.approx(y["max_reward"], abs=1e-5)
    assert set(resumed["videos"]) == {"candidate", "baseline"}

    with pytest.raises(EvalConfigError, match="cannot resume.*samplers"):
        run_eval(ckpt, tmp_path / "other", f"resume_dir={old}", "sampler.tolerance=0.5")


def test_run_rollouts_batches_envs_without_changing_episodes(ckpt):
    from para_policy.loading import load_policy

    policy = load_policy(ckpt)
    task = task_settings(compose_eval(FAST))
    spec = sampler_config({"name": "paradigms", "tolerance": 0.1, "window": 4})
    one, _ = run_rollouts(policy, spec, task, [100000, 100001, 100002], num_envs=1, progress=False)
    three, _ = run_rollouts(policy, spec, task, [100000, 100001, 100002], num_envs=3, progress=False)
    assert [e["seed"] for e in three] == [100000, 100001, 100002]
    for a, b in zip(one, three, strict=True):
        assert a["length"] == b["length"] and a["max_reward"] == pytest.approx(b["max_reward"], abs=1e-3)


# ---- sweeps and launchers -----------------------------------------------------------------

def test_wandb_sweep_file_is_valid():
    text = (CONFIG_DIR / "sweep" / "tolerance.yaml").read_text()
    sweep = yaml.safe_load(text)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("maximize", "minimize") and sweep["metric"]["name"]
    assert "${args_no_hyphens}" in sweep["command"] and "${program}" in sweep["command"]
    assert sweep["program"] == "eval.py" and (ROOT / sweep["program"]).is_file()
    assert "sampler.tolerance" in sweep["parameters"]
    fixed = [c for c in sweep["command"] if not c.startswith("${")]
    cfg = compose_eval(fixed)  # the fixed overrides in the command compose too
    for key, spec in sweep["parameters"].items():
        assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", f"{key} is not a config key"
        values = spec.get("values") or [spec.get("min"), spec.get("max")]
        # PyYAML reads 1e-4 as a string; floats must be written like 1.0e-4
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), (key, values)
        # and each value composes as an override
        sampler_config(compose_eval([*fixed, f"{key}={values[0]}"]).sampler)
    assert all(isinstance(v, float) for v in sweep["parameters"]["sampler.tolerance"]["values"])


def test_sweep_summary_callback_collects_runs(paradigms_run, tmp_path):
    results, out = paradigms_run
    for i, tol in enumerate((0.01, 0.5)):
        job = tmp_path / str(i)
        job.mkdir()
        r = json.loads(json.dumps(results))
        r["overrides"] = [f"sampler.tolerance={tol}", "task.episodes=2"]
        r["samplers"]["candidate"]["mean_score"] = 0.5 + i * 0.25
        (job / "results.json").write_text(json.dumps(r))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "runtime": {"cwd": str(tmp_path)}}})
    SweepSummary().on_multirun_end(cfg)
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert summary["swept"] == ["sampler.tolerance"]
    assert [r["params"]["sampler.tolerance"] for r in summary["runs"]] == [0.01, 0.5]
    assert [r["score"] for r in summary["runs"]] == [0.5, 0.75]
    assert "| 0.5 |" in (tmp_path / "sweep_summary.md").read_text()
    assert (tmp_path / "sweep_summary.png").stat().st_size > 0


def test_multirun_callback_is_configured():
    text = (CONFIG_DIR / "eval.yaml").read_text()
    hydra_cfg = yaml.safe_load(text)["hydra"]
    assert hydra_cfg["callbacks"]["sweep_summary"]["_target_"] == "para_policy.evaluation.sweep.SweepSummary"
    assert hydra_cfg["job"]["chdir"] is False


@pytest.mark.parametrize("name,base", [("joblib_local", "joblib"), ("slurm", "submitit_slurm"),
                                       ("submitit_processes", "submitit_local"), ("ray_local", "ray"),
                                       ("ray_cluster", "ray")])
def test_launcher_configs_extend_the_plugin_configs(name, base):
    cfg = yaml.safe_load((CONFIG_DIR / "hydra" / "launcher" / f"{name}.yaml").read_text())
    assert cfg["defaults"] == [base]


def test_joblib_launcher_composes_when_installed():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["hydra/launcher=joblib_local"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 2 and "joblib" in cfg.hydra.launcher._target_.lower()


def test_warm_started_rollouts_stay_exact_and_record_their_guesses(ckpt):
    """Warm start changes where Picard starts, not where it ends: at tolerance 0 the episodes are
    the sequential ones; each chunk after the first is warm and its guess is recorded."""
    from para_policy.loading import load_policy

    policy = load_policy(ckpt)
    task = task_settings(compose_eval(FAST))
    seeds = [100000, 100001]
    seq, _ = run_rollouts(policy, sampler_config({"name": "sequential"}), task, seeds, num_envs=2,
                          progress=False)
    warm_spec = sampler_config({"name": "paradigms", "tolerance": 0.0, "window": 4, "warm_start": True})
    assert warm_spec.warm_start
    warm, _ = run_rollouts(policy, warm_spec, task, seeds, num_envs=2, progress=False, record_obs=True)
    for a, b in zip(seq, warm, strict=True):
        assert (a["length"], a["n_chunks"]) == (b["length"], b["n_chunks"])
        assert a["max_reward"] == pytest.approx(b["max_reward"], abs=1e-4)
        guesses = b["chunk_guess"]
        assert len(guesses) == b["n_chunks"] and guesses[0] is None
        assert all(np.asarray(g).shape == policy.trajectory_shape(1)[1:] for g in guesses[1:])


def test_warm_start_config_is_checked():
    with pytest.raises(EvalConfigError, match="warm_start must be true or false"):
        sampler_config({"name": "paradigms", "warm_start": "yes"})
    with pytest.raises(EvalConfigError, match="warm_start needs a Picard sampler"):
        sampler_config({"name": "sequential", "warm_start": True})


def test_window_auto_is_resolved_before_the_rollouts_and_recorded(ckpt, tmp_path):
    results = run_eval(ckpt, tmp_path, "sampler.window=auto", "sampler.linear_solve=true", "video.enabled=false")
    tuning = results["window_tuning"]
    window = results["samplers"]["candidate"]["spec"]["options"]["window"]
    assert isinstance(window, int) and tuning["predicted_ms"][window] == min(tuning["predicted_ms"].values())
    assert set(tuning["rounds"]) <= {1, 8, 10}  # candidates clipped to the checkpoint's 10 steps
    with pytest.raises(EvalConfigError, match="sampler.window"):
        run_eval(ckpt, tmp_path / "bad", "sampler.window=wide")


def test_window_auto_is_fingerprinted_resolved_and_reused_on_resume(ckpt, tmp_path, monkeypatch):
    """The fingerprint holds the window the episodes ran with; a resumed run reuses it without tuning,
    and a second fresh run on the same machine takes the cached window (reproducible)."""
    from para_policy import window as window_module

    first = run_eval(ckpt, tmp_path / "a", "sampler.window=auto", "video.enabled=false", "compare=false")
    window = first["samplers"]["candidate"]["spec"]["options"]["window"]
    progress = json.loads((tmp_path / "a" / "progress.json").read_text())
    assert progress["fingerprint"]["samplers"]["candidate"]["options"]["window"] == window
    assert progress["window_tuning"]["window"] == window

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned again")

    monkeypatch.setattr(window_module, "calibrate_window", no_tuning)
    resumed = run_eval(ckpt, tmp_path / "b", "sampler.window=auto", "video.enabled=false", "compare=false",
                       f"resume_dir={tmp_path / 'a'}", "task.episodes=3")
    assert resumed["samplers"]["candidate"]["spec"]["options"]["window"] == window
    assert resumed["window_tuning"]["source"].startswith("resumed from")
    with pytest.raises(EvalConfigError, match="the evaluation differs.*samplers"):  # refused at once, no tuning
        run_eval(ckpt, tmp_path / "d", "sampler.window=auto", "sampler.tolerance=0.3", "video.enabled=false",
                 "compare=false", f"resume_dir={tmp_path / 'a'}")
    window_module._MEMORY.clear()  # a new process: the window comes from the cache file
    again = run_eval(ckpt, tmp_path / "c", "sampler.window=auto", "video.enabled=false", "compare=false")
    assert again["samplers"]["candidate"]["spec"]["options"]["window"] == window
    assert again["window_tuning"]["source"].endswith("windows.json")


def test_inference_options_are_checked_and_recorded(ckpt, tmp_path):
    with pytest.raises(EvalConfigError, match="precision must be one of"):
        run_eval(ckpt, tmp_path / "bad", "+inference.precision=fp8")
    with pytest.raises(EvalConfigError, match="inference has unknown keys"):
        run_eval(ckpt, tmp_path / "bad2", "+inference.fast=true")
    results = run_eval(ckpt, tmp_path, "+inference.precision=bf16", "sampler.window=4", "video.enabled=false")
    assert results["config"]["inference"] == {"precision": "bf16"}
    assert results["samplers"]["candidate"]["n_failed"] == 0
