"""Sweeps on Ray and submitit, and one evaluation sharded over Ray workers: run for real, on this machine.

* ``eval.py -m`` with ``hydra/launcher=ray_local`` (a local Ray instance: 2 CPUs, loopback only, no
  dashboard) and ``hydra/launcher=submitit_processes`` (submitit's local executor) runs the same 2-job
  sweep as Hydra's basic launcher; the sweep summaries and every episode must agree with the basic
  launcher's (latency aside).
* ``+cluster=ray`` (``para_policy.evaluation.cluster``) runs an evaluation's episodes on Ray actors: the
  results must equal a single-process run's, episode for episode, even when a worker is killed with
  ``ray.kill`` while it runs a unit; a bad cluster config is refused before anything runs.

Everything uses the tiny random-weight policy of test_eval.py. Needs the ``[cluster]`` extra (part of
``[test]``); the tests that run Ray or submitit skip without it, and the Ray ones where a local instance
does not start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import fresh_baseline_cache, one_torch_thread  # noqa: F401  (autouse fixtures)
from test_eval import build_checkpoint, compose_eval

from para_policy.evaluation import EvalConfigError, evaluate, runner

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["task.episodes=2", "task.max_steps=16", "num_envs=2", "latency.calls=2", "latency.warmup=0", "threads=1",
         "logger=none", "progress=false", "video.enabled=false", "sampler.window=4",  # auto is measured: it may differ
         "sampler.tolerance=0.01,0.5"]
#: the summary's columns that are wall-clock measurements, and so differ from run to run
TIMED = {"ms/chunk p50", "baseline ms/chunk p50", "speedup p50"}
EPISODE_KEYS = ("seed", "max_reward", "success", "length", "n_chunks", "rounds_per_chunk", "error")


def ray_env() -> dict[str, str]:
    """Ray's settings for a test instance: on the loopback address only (on Linux Ray replaces 127.0.0.1 by
    the machine's address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), hence without token authentication
    (Ray 2.60's default for a new instance writes ~/.ray/auth_token, and its GCS accepted no connection
    with it in the sandbox these tests were written in), and without usage reports."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def run_sweep(ckpt: Path, cwd: Path, *overrides: str, env: dict[str, str] | None = None
              ) -> tuple[Path, subprocess.CompletedProcess]:
    """``eval.py -m`` from ``cwd``, into its default (relative) sweep folder: the jobs must find it from
    wherever their launcher starts them. Returns the sweep folder and the finished process."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "WANDB_MODE": "disabled", **(env or {})}
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "-m", f"checkpoint={ckpt}", *SWEEP, *overrides],
                         cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    (sweep_dir,) = (cwd / "multirun" / "eval").glob("*/*")
    return sweep_dir, res


def sweep_results(sweep_dir: Path) -> tuple[dict, dict[str, dict]]:
    """The sweep summary without its timed columns, and each job's episodes per role."""
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert (sweep_dir / "sweep_summary.md").is_file() and (sweep_dir / "sweep_summary.png").is_file()
    runs = [{k: v for k, v in r.items() if k not in TIMED} for r in summary["runs"]]
    episodes = {}
    for job in ("0", "1"):
        res = json.loads((sweep_dir / job / "results.json").read_text())
        episodes[job] = {role: [{k: e[k] for k in EPISODE_KEYS} for e in s["episodes"]]
                         for role, s in res["samplers"].items()}
    return {"swept": summary["swept"], "runs": runs}, episodes


PROBE = """
import ray
ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
assert ray.get(ray.remote(lambda: 1).remote()) == 1
ray.shutdown()
"""


@pytest.fixture(scope="module")
def local_ray() -> None:
    """Skip where Ray is not installed, or where a local Ray instance cannot start (a sandbox whose GCS
    never accepts a connection): probed once, in a subprocess with a time limit, not hung on."""
    pytest.importorskip("ray")
    try:
        res = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **ray_env()}, capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("a local Ray instance did not start within 60 s on this machine")
    if res.returncode != 0:
        pytest.skip(f"a local Ray instance does not start on this machine: {res.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def basic_sweep(ckpt, tmp_path_factory):
    """The reference: the same sweep on Hydra's basic launcher (one job after the other, in one process)."""
    sweep_dir, _ = run_sweep(ckpt, tmp_path_factory.mktemp("basic"))
    summary, episodes = sweep_results(sweep_dir)
    assert summary["swept"] == ["sampler.tolerance"]
    assert [r["params"]["sampler.tolerance"] for r in summary["runs"]] == [0.01, 0.5]
    assert all(r["score"] is not None and r["baseline score"] is not None for r in summary["runs"])
    return summary, episodes


def test_ray_launcher_sweep_matches_the_basic_launcher(local_ray, ckpt, basic_sweep, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    sweep_dir, res = run_sweep(ckpt, tmp_path, "hydra/launcher=ray_local", "hydra.launcher.ray.init.num_cpus=2",
                               env=ray_env())
    assert "Ray Launcher is launching 2 jobs" in res.stdout + res.stderr
    summary, episodes = sweep_results(sweep_dir)
    assert summary == basic_sweep[0]
    assert episodes == basic_sweep[1]


def test_submitit_local_sweep_matches_the_basic_launcher(ckpt, basic_sweep, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir, _ = run_sweep(ckpt, tmp_path, "hydra/launcher=submitit_processes")
    assert list((sweep_dir / ".submitit").iterdir()), "the jobs did not go through submitit"
    summary, episodes = sweep_results(sweep_dir)
    assert summary == basic_sweep[0]
    assert episodes == basic_sweep[1]


# ---- one evaluation on Ray workers ---------------------------------------------------------------
FAST = ["task.max_steps=32", "num_envs=1", "latency.calls=4", "latency.warmup=0", "logger=none", "progress=false",
        "threads=1", "video.enabled=false", "sampler=paradigms_published", "sampler.window=4"]


def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_eval([f"checkpoint={ckpt}", *FAST, *overrides])
    return evaluate(cfg, out, overrides=[*FAST, *overrides])


def episodes_of(results: dict) -> dict[str, list[dict]]:
    return {role: [{k: e[k] for k in EPISODE_KEYS} for e in s["episodes"]] for role, s in results["samplers"].items()}


@pytest.mark.parametrize("override,message", [
    ("cluster.workers=0", "cluster.workers must be >= 1, got 0"),
    ("cluster.workers=two", "cluster.workers must be an integer, got 'two'"),
    ("cluster.name=rey", "cluster.name must be 'ray', got 'rey' (did you mean 'ray'?)"),
    ("+cluster.nodes=2", "cluster has unknown keys ['nodes']"),
    ("cluster.address=''", "cluster.address must be null"),
    ("cluster.max_restarts=-1", "cluster.max_restarts must be >= 0, got -1"),
    ("cluster.episodes_per_task=0", "cluster.episodes_per_task must be >= 1, got 0"),
])
def test_bad_cluster_config_is_refused_before_anything_runs(ckpt, tmp_path, override, message):
    with pytest.raises(EvalConfigError, match=re.escape(message)):
        run_eval(ckpt, tmp_path, "+cluster=ray", override)
    assert not (tmp_path / "progress.json").exists()


def test_sharded_run_equals_one_process_and_survives_a_killed_worker(local_ray, ckpt, tmp_path, monkeypatch):
    """4 episodes per sampler, one per unit, on 2 workers of a local Ray instance; the first worker to get its
    second unit is killed as it gets it. Every seed is recorded once, and every episode, the latency-call
    rounds and the faithfulness equal the single-process run's."""
    ray = pytest.importorskip("ray")
    from para_policy.evaluation import cluster

    for key, value in ray_env().items():
        monkeypatch.setenv(key, value)
    reference = run_eval(ckpt, tmp_path / "one", "task.episodes=4")
    runner._BASELINE_CACHE.clear()  # the sharded run rolls its baseline out on the workers too
    pools, dispatched = [], []

    def kill_the_third(self, actor, unit):
        dispatched.append(unit)
        if self not in pools:
            pools.append(self)
        if len(dispatched) == 3:  # each worker has had one unit: this one is running its second
            ray.kill(actor)

    monkeypatch.setattr(cluster.ShardedRollouts, "_dispatched", kill_the_third)
    out = tmp_path / "sharded"
    sharded = run_eval(ckpt, out, "task.episodes=4", "+cluster=ray", "cluster.workers=2", "cluster.episodes_per_task=1")
    (pool,) = pools
    assert pool.restarts == 1, "the killed worker was not replaced"
    # the candidate's 4 units and the killed one again, then the baseline's 4
    assert len(dispatched) == 9 and dispatched[:5].count(dispatched[2]) == 2, dispatched
    assert not ray.is_initialized(), "the local Ray instance was left running"
    seeds = reference["seeds"]
    progress = json.loads((out / "progress.json").read_text())
    for role in ("candidate", "baseline"):
        assert [e["seed"] for e in sharded["samplers"][role]["episodes"]] == seeds
        assert sorted(e["seed"] for e in progress["episodes"][role]) == seeds
    assert episodes_of(sharded) == episodes_of(reference)
    for role in ("candidate", "baseline"):
        for key in ("mean_score", "success_rate"):
            assert sharded["samplers"][role][key] == reference["samplers"][role][key]
        assert (sharded["samplers"][role]["latency"]["rounds_per_chunk"]
                == reference["samplers"][role]["latency"]["rounds_per_chunk"])
    assert sharded["comparison"]["faithfulness"] == reference["comparison"]["faithfulness"]
    assert sharded["config"]["cluster"]["workers"] == 2


def test_sharded_run_resumes_and_gives_up_when_every_worker_dies(local_ray, ckpt, tmp_path, monkeypatch):
    """A resumed sharded run runs only the missing seeds; a run whose only worker dies with no restarts
    left stops with an error naming cluster.max_restarts, its finished episodes kept in progress.json."""
    ray = pytest.importorskip("ray")
    from para_policy.evaluation import cluster

    for key, value in ray_env().items():
        monkeypatch.setenv(key, value)
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address=cluster.LOOPBACK)  # one instance, every run
    try:
        sharded = ["+cluster=ray", "cluster.workers=1", "compare=false"]
        run_eval(ckpt, tmp_path / "a", "task.episodes=2", *sharded)
        ran = []
        monkeypatch.setattr(cluster.ShardedRollouts, "_dispatched", lambda self, actor, unit: ran.extend(unit))
        resumed = run_eval(ckpt, tmp_path / "b", "task.episodes=4", f"resume_dir={tmp_path / 'a'}", *sharded)
        assert sorted(ran) == resumed["seeds"][2:]
        assert [e["seed"] for e in resumed["samplers"]["candidate"]["episodes"]] == resumed["seeds"]

        def kill_the_second(self, actor, unit):
            ran.append(unit)
            if len(ran) == 2:
                ray.kill(actor)

        ran = []
        monkeypatch.setattr(cluster.ShardedRollouts, "_dispatched", kill_the_second)
        with pytest.raises(RuntimeError, match=r"every Ray worker died.*cluster.max_restarts=0"):
            run_eval(ckpt, tmp_path / "c", "task.episodes=3", *sharded, "cluster.max_restarts=0",
                     "cluster.episodes_per_task=1")
        progress = json.loads((tmp_path / "c" / "progress.json").read_text())
        assert [e["seed"] for e in progress["episodes"]["candidate"]] == resumed["seeds"][:1]
        assert ray.is_initialized(), "a Ray instance the run did not start was stopped"
    finally:
        ray.shutdown()
