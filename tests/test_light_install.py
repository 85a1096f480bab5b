"""The core installs light: ``pip install .`` (no extras) in a clean venv samples with ``paradigms``.

A real install into a fresh virtual environment (no system site-packages): torch 2.13.0 first, as
the README says, then the package without extras. It must import, load the shipped checkpoint and
sample with the ``paradigms`` preset, without wandb, Hydra or gym-pusht being installed, and the
entry points must say which extra is missing. Takes about a minute (pip, mostly from its cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.util, json, sys
import torch
import para_policy
from para_policy import Controller, load_policy, sampler_spec
from para_policy.extras import MissingExtraError

policy = load_policy(para_policy.__file__.rsplit("/", 1)[0] + "/assets/pusht_lowdim.safetensors")
assert policy.sampler == sampler_spec("paradigms"), policy.sampler
obs = torch.full((1, 2, 20), 256.0)
out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0))
chunk = Controller(policy, seed=0).predict_chunk(obs[0].numpy())
try:
    import para_policy.evaluation
    hint = None
except MissingExtraError as e:
    hint = str(e)
print(json.dumps({
    "action_shape": list(out["action"].shape), "finite": bool(torch.isfinite(out["action"]).all()),
    "rounds": out.stats.rounds, "window": out.spec.options["window"], "chunk_shape": list(chunk.shape),
    "absent": {m: importlib.util.find_spec(m) is None for m in ("wandb", "hydra", "gym_pusht", "zarr", "dill")},
    "hint": hint,
}))
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_core_install_has_no_eval_dependencies_and_samples(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PARA_POLICY_CACHE_DIR"] = str(tmp_path / "cache")
    run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], env=env)
    run([py, "-m", "pip", "install", "-q", str(ROOT)], env=env)
    res = run([py, "-c", SCRIPT], env=env, cwd=tmp_path)
    import json

    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["action_shape"] == [1, 8, 2] and report["finite"] and report["chunk_shape"] == [8, 2]
    assert 1 <= report["rounds"] <= 100 and isinstance(report["window"], int)
    assert all(report["absent"].values()), report["absent"]
    assert report["hint"] and "[eval]" in report["hint"] and "pip install" in report["hint"]
    # the entry point says which extra is missing, without a traceback
    res = subprocess.run([py, str(ROOT / "eval.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert res.returncode != 0 and "[eval]" in res.stderr and "Traceback" not in res.stderr
