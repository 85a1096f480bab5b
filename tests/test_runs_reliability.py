"""Run folders the evaluator can trust (issue 31): what a resume takes from one, who writes it, where it runs.

* ``resume_dir`` resumes only on the very same checkpoint: every byte of it is hashed.
* ``progress.json`` is checked when it is read: cut short, mistyped or with an episode twice, it is
  refused with an error naming the file and the fault.
* Default run folders are unique, and a run holds ``eval.lock`` in its folder, so two runs never
  write one folder.
* ``device=cuda`` on a machine without CUDA is a config error, not a traceback.

The evaluations use the tiny random-weight policy of ``test_eval.py`` (widened to 2.5 MiB, past the
first and last MiB that the earlier fingerprint hashed), one episode of 16 steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import fresh_baseline_cache, one_torch_thread  # noqa: F401  (autouse fixtures)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_eval import CONFIG_DIR, FAST, compose_eval, policy_config
from test_eval_cli import run_cli

from para_policy import LowdimPolicy, save_checkpoint
from para_policy.evaluation import EvalConfigError, episodes, evaluate, runner
from para_policy.evaluation.config import file_fingerprint
from para_policy.tasks.pusht.env import make_env

MIB = 1 << 20
#: one sequential episode without video or baseline: the cheapest run that writes a progress.json
ONE_EPISODE = [*FAST, "task.episodes=1", "compare=false", "video.enabled=false", "sampler=sequential",
               "latency.calls=1", "latency.warmup=0"]


def build_wide_checkpoint(path: Path) -> Path:
    """``test_eval.build_checkpoint`` with wider layers: 2.5 MiB, its middle past its first and last MiB."""
    config = policy_config()
    config["model"]["down_dims"] = [64, 128]
    torch.manual_seed(0)
    policy = LowdimPolicy(config)
    env = make_env()
    obs = np.stack([env.reset(seed=s)[0] for s in range(8)])
    env.close()
    policy.normalizer.fit({"obs": obs, "action": np.concatenate([obs[:, 18:20], [[20.0, 20.0], [490.0, 490.0]]])})
    save_checkpoint(path, policy.state_dict(), policy.config)
    return path


def eval_in(ckpt: Path, out: Path, *overrides: str) -> dict:
    return evaluate(compose_eval([f"checkpoint={ckpt}", *ONE_EPISODE, *overrides]), out)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, run folder) of one finished evaluation."""
    root = tmp_path_factory.mktemp("finished")
    ckpt = build_wide_checkpoint(root / "wide.safetensors")
    eval_in(ckpt, root / "run")
    return ckpt, root / "run"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Refusals must come before the policy is loaded."""
    monkeypatch.setattr(runner, "load_checked_policy", lambda *a, **k: pytest.fail("the policy was loaded"))


@pytest.fixture
def nothing_runs(monkeypatch):
    """Refusals must come before any episode is rolled out."""
    monkeypatch.setattr(episodes, "run_rollouts", lambda *a, **k: pytest.fail("an episode was rolled out"))


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / runner.LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    return lock


# ---- the checkpoint fingerprint ------------------------------------------------------------------

def test_the_checkpoint_fingerprint_covers_every_byte(tmp_path):
    data = bytearray(np.random.default_rng(0).bytes(5_900_000))
    path = tmp_path / "policy.ckpt"
    path.write_bytes(data)
    before = file_fingerprint(path)
    data[len(data) // 2] ^= 1  # one bit, far from the first and last MiB
    path.write_bytes(data)
    assert file_fingerprint(path) != before

    lerobot = tmp_path / "pretrained_model"  # a directory checkpoint: its files, with their names
    lerobot.mkdir()
    (lerobot / "config.json").write_text("{}")
    (lerobot / "model.safetensors").write_bytes(bytes(data))
    before = file_fingerprint(lerobot)
    data[len(data) // 2] ^= 1
    (lerobot / "model.safetensors").write_bytes(bytes(data))
    changed = file_fingerprint(lerobot)
    assert changed != before
    (lerobot / "model.safetensors").rename(lerobot / "other.safetensors")
    assert file_fingerprint(lerobot) not in (before, changed)


def test_a_checkpoint_changed_in_the_middle_does_not_resume(finished, tmp_path, nothing_runs):
    ckpt, run = finished
    changed = tmp_path / "changed.safetensors"
    data = bytearray(ckpt.read_bytes())
    assert len(data) > 2 * MIB + 2
    data[len(data) // 2] ^= 1  # a weight's low bit, between the first and last MiB
    changed.write_bytes(data)
    with pytest.raises(EvalConfigError, match=r"cannot resume .*evaluation differs \(checkpoint: 'sha256:"):
        eval_in(changed, tmp_path / "new", f"resume_dir={run}", "task.episodes=2")
    assert not (tmp_path / "new" / "progress.json").exists()


def test_a_run_folder_from_the_partial_fingerprint_is_refused_with_why(finished, tmp_path, nothing_runs):
    ckpt, run = finished
    old = copy_run(run, tmp_path / "old")
    progress = json.loads((old / "progress.json").read_text())
    progress["fingerprint"]["checkpoint"] = "2609968:a16e06323c6e830f"  # what runs saved before
    (old / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(EvalConfigError, match="hashed only part of the file"):
        eval_in(ckpt, tmp_path / "new", f"resume_dir={old}")


# ---- progress.json ---------------------------------------------------------------------------

def _duplicate(p: dict) -> str:
    p["episodes"]["candidate"] = p["episodes"]["candidate"] * 2
    return json.dumps(p)


def _set(p: dict, key: str, value) -> str:
    p["episodes"]["candidate"][0][key] = value
    return json.dumps(p)


@pytest.mark.parametrize("damage, fault", [
    (_duplicate, r"episodes\['candidate'\] holds seed 100000 twice"),
    (lambda p: json.dumps(p)[:-40], r"it is not valid JSON at line 1 column \d+"),
    (lambda p: "", r"it is not valid JSON at line 1 column 1"),
    (lambda p: _set(p, "max_reward", "0.5"), r"episodes\['candidate'\]\[0\] has max_reward '0.5', not int or float"),
    (lambda p: _set(p, "seed", True), r"episodes\['candidate'\]\[0\] has seed True, not an integer"),
    (lambda p: _set(p, "length", None), r"episodes\['candidate'\]\[0\] has length None, not int"),
    (lambda p: _set(p, "chunk_obs_file", "../../elsewhere.npz"),
     r"episodes\['candidate'\]\[0\] has chunk_obs_file '\.\./\.\./elsewhere\.npz', outside the run folder"),
    (lambda p: json.dumps({**p, "episodes": []}), r"'episodes' is list, not an object"),
    (lambda p: json.dumps({**p, "episodes": {"candidate": {}}}), r"episodes\['candidate'\] is dict, not a list"),
    (lambda p: json.dumps({"episodes": p["episodes"]}), "'fingerprint' is missing or not an object"),
    (lambda p: json.dumps([p]), "it holds a JSON list, not an object"),
], ids=["duplicate", "truncated", "empty", "mistyped-reward", "bool-seed", "null-length", "escaping-path",
        "episodes-list", "role-not-list", "no-fingerprint", "not-an-object"])
def test_a_bad_progress_file_is_refused_naming_the_file_and_the_fault(finished, tmp_path, nothing_loads,
                                                                      damage, fault):
    ckpt, run = finished
    old = copy_run(run, tmp_path / "old")
    path = old / "progress.json"
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(EvalConfigError, match=re.escape(f"cannot resume from {path}: ") + fault):
        eval_in(ckpt, tmp_path / "new", f"resume_dir={old}")
    assert not (tmp_path / "new").exists()


# ---- run folders and their lock -----------------------------------------------------------------

def test_default_run_folders_are_unique_to_the_microsecond_and_a_random_suffix():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        dirs = [OmegaConf.select(compose(config_name="eval", return_hydra_config=True), "hydra.run.dir")
                for _ in range(2)]
    for d in dirs:
        assert re.fullmatch(r"outputs/eval/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}_[0-9a-f]{6}_pusht_paradigms", d), d
    assert dirs[0] != dirs[1]


def test_a_finished_run_leaves_no_lock(finished):
    _, run = finished
    assert (run / "results.json").is_file() and not (run / runner.LOCK_FILE).exists()


def test_a_run_folder_another_run_holds_is_refused_before_anything_loads(finished, tmp_path, nothing_loads):
    ckpt, _ = finished
    lock = write_lock(tmp_path / "busy", os.getppid())  # a live process: pytest's parent
    held = lock.read_text()
    with pytest.raises(EvalConfigError, match=rf"run folder {re.escape(str(tmp_path / 'busy'))} is in use by eval.py "
                                              rf"pid {os.getppid()} on {re.escape(socket.gethostname())}"):
        eval_in(ckpt, tmp_path / "busy")
    assert lock.read_text() == held and not (tmp_path / "busy" / "progress.json").exists()


def test_a_resume_dir_a_live_run_still_writes_is_refused(finished, tmp_path, nothing_loads):
    ckpt, run = finished
    old = copy_run(run, tmp_path / "old")
    write_lock(old, os.getppid())
    with pytest.raises(EvalConfigError, match=rf"run folder {re.escape(str(old))} is in use by eval.py"):
        eval_in(ckpt, tmp_path / "new", f"resume_dir={old}")


def test_of_simultaneous_runs_exactly_one_gets_the_folder(tmp_path):
    start = threading.Barrier(8)
    got, refused = [], []

    def take() -> None:
        start.wait()
        try:
            got.append(runner.lock_run_folder(tmp_path / "shared"))
        except EvalConfigError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 1 and len(refused) == 7
    assert all("is in use by" in e for e in refused)
    runner.release_run_folder(got[0])
    assert not got[0].exists()


def test_a_dead_runs_lock_is_taken_over_with_a_warning_and_another_hosts_is_not(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path / "crashed", pid)
    with pytest.warns(UserWarning, match=rf"taking over the lock of eval.py pid {pid} .* which no longer runs"):
        lock = runner.lock_run_folder(tmp_path / "crashed")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in lock.parent.iterdir()) == [runner.LOCK_FILE]  # nothing left beside it
    runner.release_run_folder(lock)
    assert not lock.exists()

    write_lock(tmp_path / "shared_fs", pid, host="another-host")  # its process cannot be checked from here
    with pytest.raises(EvalConfigError, match="in use by eval.py pid .* on another-host"):
        runner.lock_run_folder(tmp_path / "shared_fs")


# ---- device ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda' requested but CUDA is not available"),
    ("cuda:0", "device 'cuda:0' requested but CUDA is not available"),
    ("gpu", "device 'gpu' is not a torch device: use cpu, cuda, cuda:<index> or mps"),
])
def test_an_unavailable_device_is_a_config_error(finished, tmp_path, nothing_loads, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EvalConfigError, match=re.escape(message)):
        eval_in(finished[0], tmp_path / "out", f"device={device}")


def test_a_cuda_index_past_the_devices_is_a_config_error(finished, tmp_path, nothing_loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EvalConfigError, match=re.escape("device 'cuda:1' requested but this machine has 1 CUDA")):
        eval_in(finished[0], tmp_path / "out", "device=cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_eval_py_with_cuda_on_a_machine_without_it_prints_the_error_not_a_traceback(tmp_path):
    res = run_cli("device=cuda", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode != 0
    assert "eval.py: error: device 'cuda' requested but CUDA is not available" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
