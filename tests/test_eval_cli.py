"""eval.py as users run it: --help, --cfg job, and a bad option failing with its message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_help_lists_groups_and_examples():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "eval.py" in out
    assert "sampler: asyncdiff, paradigms, paradigms_published, parataa, patches, sequential" in out
    assert "task: lift, pusht" in out and "logger: none, wandb" in out
    assert "python eval.py -m sampler.tolerance" in out
    assert "hydra/launcher=joblib_local" in out and "hydra/launcher=joblib " not in out  # the config that exists


def test_cfg_job_shows_the_composed_config(tmp_path):
    res = run_cli("--cfg", "job", "--resolve", "sampler=parataa", "sampler.tolerance=0.02", "task.episodes=5",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["sampler"]["name"] == "parataa" and cfg["sampler"]["tolerance"] == 0.02
    assert cfg["task"]["episodes"] == 5 and cfg["task"]["seed_start"] == 100000
    assert cfg["checkpoint"].endswith("para_policy/assets/pusht_lowdim.safetensors")
    assert not list(tmp_path.iterdir()), "--cfg job must not create a run folder"


def test_bad_option_exits_with_its_message(tmp_path):
    res = run_cli("sampler.tolerance=-1", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2  # a usage error, as argparse exits
    assert "sampler.tolerance must be a finite number >= 0" in res.stderr
    assert not (tmp_path / "run" / "progress.json").exists()


def test_multirun_sweep_writes_a_summary_across_runs(tmp_path):
    from test_eval import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "tiny.safetensors")
    sweep_dir = tmp_path / "sweep"
    res = run_cli("-m", f"checkpoint={ckpt}", "task.episodes=1", "task.max_steps=8", "num_envs=1", "latency.calls=2",
                  "latency.warmup=0", "threads=1", "logger=none", "progress=false", "video.enabled=false",
                  "sampler.tolerance=0.01,0.5", f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep_dir / job / "results.json").is_file()
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["swept"] == ["sampler.tolerance"]
    assert [r["params"]["sampler.tolerance"] for r in summary["runs"]] == [0.01, 0.5]
    assert all(r["score"] is not None and r["ms/chunk p50"] > 0 for r in summary["runs"])
    assert (sweep_dir / "sweep_summary.md").is_file() and (sweep_dir / "sweep_summary.png").is_file()
