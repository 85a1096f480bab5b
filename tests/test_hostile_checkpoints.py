"""Hostile checkpoints: crafted files (a few kB; 200 kB for 100,000 levels of nesting) that used to hang
the loader, exhaust memory, resolve a secret or crash with an error naming nothing. Each is now refused
by ``load_policy`` with a one-line ``ValueError`` naming the key, before anything in it is resolved,
built or allocated (docs/reliability.md, "Hostile checkpoints").

``python tests/test_hostile_checkpoints.py`` writes every crafted file and times ``load_policy`` on
each in a fresh process (10 s timeout, 6 GB address-space cap): the figures in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
LEROBOT_CONFIG = FIXTURES / "lerobot_diffusion_A" / "config.json"
LOWDIM_TARGET = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
UNET_TARGET = "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"
SCHEDULER = {"_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler", "num_train_timesteps": 100,
             "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2"}
SECRET = "hunter2-do-not-print"


# ---- crafting ---------------------------------------------------------------------------

def tiny_config(**changes) -> dict:
    """A valid para_policy config of a tiny network, ``changes`` applied (``section__key`` for a nested key)."""
    config = {"horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "obs_dim": 2, "action_dim": 2,
              "num_inference_steps": 10,
              "model": {"input_dim": 2, "global_cond_dim": 4, "diffusion_step_embed_dim": 4, "down_dims": [8],
                        "kernel_size": 3, "n_groups": 4, "cond_predict_scale": False},
              "noise_scheduler": dict(SCHEDULER)}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section] = {**config[section], field: value}
        else:
            config[key] = value
    return config


def write_safetensors(path: Path, config: object, weights: bool = False) -> Path:
    """A para_policy ``.safetensors`` whose metadata is ``config`` (JSON-encoded unless a string)."""
    tensors = {"model.dummy": torch.zeros(1)}
    if weights:
        from para_policy import LowdimPolicy

        tensors = LowdimPolicy(tiny_config()).state_dict()
    if isinstance(config, dict):
        config = json.dumps({"kind": "para_policy.lowdim_diffusion_policy", "version": 1, **config})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"para_policy": config})
    return path


def dp_policy(**changes) -> dict:
    """A DiffusionPolicy low-dim workspace cfg (plain data), its ``policy`` section updated by ``changes``."""
    policy = {"_target_": LOWDIM_TARGET, "horizon": 16, "obs_dim": 2, "action_dim": 2, "n_action_steps": 8,
              "n_obs_steps": 2, "num_inference_steps": 10, "obs_as_global_cond": True,
              "model": {"_target_": UNET_TARGET, "input_dim": 2, "global_cond_dim": 4, "diffusion_step_embed_dim": 4,
                        "down_dims": [8], "kernel_size": 3, "n_groups": 4, "cond_predict_scale": False},
              "noise_scheduler": dict(SCHEDULER), **changes}
    return {"policy": policy, "training": {"use_ema": False}}


def write_ckpt(path: Path, cfg: object) -> Path:
    """A DiffusionPolicy workspace ``.ckpt`` (torch.save of ``{'cfg', 'state_dicts'}``) holding ``cfg``."""
    torch.save({"cfg": cfg, "state_dicts": {"model": {}}}, path)
    return path


def write_raw_ckpt(path: Path, cfg_opcodes: bytes) -> Path:
    """A ``.ckpt`` whose pickle is written by hand: ``{'cfg': <cfg_opcodes>, 'state_dicts': {}}`` (protocol 2)."""
    data = (b"\x80\x02}(X\x03\x00\x00\x00cfg" + cfg_opcodes + b"X\x0b\x00\x00\x00state_dicts}u.")
    buffer = io.BytesIO()
    torch.save({}, buffer)
    template = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in template.infolist():
            out.writestr(info.filename, data if info.filename.endswith("data.pkl") else template.read(info.filename))
    return path


def shared_references(depth: int) -> dict:
    """``depth`` levels of a dict holding the level below twice: 2**depth leaves in a few hundred bytes."""
    level: object = 1
    for _ in range(depth):
        level = {"a": level, "b": level}
    return level


def doubling_interpolations(depth: int) -> dict:
    """``l{i}: '${l{i-1}}${l{i-1}}'``: resolving ``l{depth}`` expands 2**depth interpolations."""
    levels = {"l0": "1"}
    for i in range(1, depth + 1):
        levels[f"l{i}"] = f"${{l{i - 1}}}${{l{i - 1}}}"
    return levels


def lerobot_config_text() -> str:
    """The fixture's LeRobot ``config.json`` (the test skips where the shared fixtures are absent)."""
    if not LEROBOT_CONFIG.exists():
        pytest.skip(f"{LEROBOT_CONFIG} is absent (the shared fixtures sit beside the checkout)")
    return LEROBOT_CONFIG.read_text()


def lerobot_dir(path: Path, **changes) -> Path:
    """A LeRobot directory holding the fixture's ``config.json`` with ``changes`` (no weights: refused before)."""
    path.mkdir(parents=True)
    config = json.loads(lerobot_config_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _bytearray_cfg() -> bytes:
    """``builtins.bytearray(3_000_000_000)``: 3 GB from 40 bytes of pickle."""
    return b"cbuiltins\nbytearray\n\x8a\x05\x00\x5e\xd0\xb2\x00\x85R"


def _deep_list(depth: int) -> bytes:
    """``{'policy': [[[...]]]}``, ``depth`` levels deep, as opcodes (the pickler itself would recurse)."""
    return b"}X\x06\x00\x00\x00policy" + b"]" * depth + b"a" * (depth - 1) + b"s"


def _symlinked(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").symlink_to("/etc/passwd")
    return path


#: name → (writes the file under a temporary folder, what the one-line error must say)
CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "dp_shared_references_40": (lambda d: write_ckpt(d / "a.ckpt", {**dp_policy(), "x": shared_references(40)}),
                                r"cfg.*more than \d+ nodes"),
    "dp_interpolations_40": (
        lambda d: write_ckpt(d / "a.ckpt", {**dp_policy(horizon="${l40}"), **doubling_interpolations(40)}),
        r"cfg.policy.horizon.*interpolations"),
    "dp_eval_power": (
        lambda d: write_ckpt(d / "a.ckpt", dp_policy(horizon="${eval:'((((10**64)**64)**64)**64)**64'}")),
        r"cfg.policy.horizon.*eval.*too large"),
    "dp_oc_env": (lambda d: write_ckpt(d / "a.ckpt", dp_policy(horizon="${oc.env:PARA_POLICY_TEST_SECRET}")),
                  r"cfg.policy.horizon.*oc.env"),
    "dp_bytearray_3gb": (lambda d: write_raw_ckpt(d / "a.ckpt", _bytearray_cfg()), r"refusing bytearray\(3000000000\)"),
    "dp_deep_100k": (lambda d: write_raw_ckpt(d / "a.ckpt", _deep_list(100_000)), r"cfg.*deeper than \d+"),
    "dp_horizon_16.7": (lambda d: write_ckpt(d / "a.ckpt", dp_policy(horizon=16.7)), r"horizon.*integer.*16.7"),
    "dp_horizon_9**128": (lambda d: write_ckpt(d / "a.ckpt", dp_policy(horizon=9**128)), r"horizon.*<= \d+"),
    "st_train_timesteps_3e8": (
        lambda d: write_safetensors(d / "a.safetensors", tiny_config(noise_scheduler__num_train_timesteps=300_000_000)),
        r"num_train_timesteps.*<= \d+"),
    "st_horizon_2**22": (lambda d: write_safetensors(d / "a.safetensors", tiny_config(horizon=2**22), weights=True),
                         r"horizon.*<= \d+"),
    "st_deep_100k": (lambda d: write_safetensors(d / "a.safetensors", '{"horizon": ' + "[" * 100_000 + "]" * 100_000
                                                 + "}"), r"deeper than \d+"),
    "st_unknown_model_keyword": (lambda d: write_safetensors(d / "a.safetensors", tiny_config(model__dropout=0.1)),
                                 r"model.dropout"),
    "st_negative_down_dims": (lambda d: write_safetensors(d / "a.safetensors", tiny_config(model__down_dims=[-8])),
                              r"model.down_dims"),
    "st_n_groups_0": (lambda d: write_safetensors(d / "a.safetensors", tiny_config(model__n_groups=0)),
                      r"model.n_groups"),
    "st_bad_beta_schedule": (
        lambda d: write_safetensors(d / "a.safetensors", tiny_config(noise_scheduler__beta_schedule="cosine")),
        r"beta_schedule.*cosine"),
    "st_unknown_scheduler_keyword": (
        lambda d: write_safetensors(d / "a.safetensors", tiny_config(noise_scheduler__betas=[0.1])),
        r"noise_scheduler.betas"),
    "st_config_is_a_list": (lambda d: write_safetensors(d / "a.safetensors", "[1, 2]"),
                            r"JSON object \(a mapping.*got list"),
    "st_config_not_json": (lambda d: write_safetensors(d / "a.safetensors", "{horizon: 16"), r"not valid JSON"),
    "lerobot_train_timesteps_3e8": (lambda d: lerobot_dir(d / "p", num_train_timesteps=300_000_000),
                                    r"num_train_timesteps.*<= \d+"),
    "lerobot_deep_100k": (lambda d: _deep_lerobot(d / "p"), r"deeper than \d+"),
    "lerobot_config_is_a_list": (lambda d: _list_lerobot(d / "p"), r"JSON object \(a mapping.*got list"),
    "lerobot_symlink_to_etc_passwd": (lambda d: _symlinked(d / "p"), r"config.json.*symlink.*outside"),
}


def _deep_lerobot(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"type": "diffusion", "horizon": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return path


def _list_lerobot(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("[1, 2]")
    return path


# ---- the tests --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_checkpoint_is_refused_quickly_in_one_line_naming_the_key(name, tmp_path, monkeypatch):
    from para_policy import load_policy

    monkeypatch.setenv("PARA_POLICY_TEST_SECRET", SECRET)
    write, message = CASES[name]
    path = write(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as error:
        load_policy(path)
    assert time.perf_counter() - start < 5, "a hostile file must be refused, not worked through"
    text = str(error.value)
    assert "\n" not in text and len(text) < 600 and SECRET not in text


@pytest.mark.parametrize("name", ["dp_eval_power", "dp_bytearray_3gb", "st_n_groups_0",
                                  "lerobot_symlink_to_etc_passwd"])
def test_eval_py_reports_a_hostile_checkpoint_as_a_usage_error(name, tmp_path, monkeypatch, capsys):
    from hydra.core.hydra_config import HydraConfig
    from test_eval import compose_eval

    from para_policy import evaluation

    path = CASES[name][0](tmp_path)
    cfg = compose_eval([f"checkpoint={path}", "logger=none", "progress=false"])
    runtime = type("Runtime", (), {"output_dir": str(tmp_path / "run"), "cwd": str(tmp_path)})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: type("HC", (), {
        "runtime": runtime, "overrides": type("O", (), {"task": []})})))
    with pytest.raises(SystemExit) as exit_:
        evaluation.main(cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"eval.py: error: cannot load checkpoint {path}")
    assert not (tmp_path / "run" / "progress.json").exists()


def test_honest_interpolations_resolve_as_omegaconf_resolves_them():
    """The checked, pruned config resolves the policy exactly as OmegaConf resolves the original."""
    from omegaconf import OmegaConf

    from para_policy.integrations.diffusion_policy import _as_config, _resolved, register_eval_resolver

    raw = {"task": {"dims": [3, 5], "name": "t"}, "alias": "${task}", "steps": 4, "horizon": 16,
           "logging": {"name": "${now:%Y}_${oc.env:HOME}"},  # never reached: left alone
           "policy": {"horizon": "${horizon}", "obs_dim": "${alias.dims[1]}", "n_obs_steps": "${..steps}",
                      "model": {"input_dim": "${eval:'${task.dims[0]} * 2 if ${..n_obs_steps} > 1 else 0'}",
                                "width": "${.input_dim}", "label": "${task.name}-x-\\${kept}", "dims": "${task.dims}"}},
           "training": {"use_ema": "${eval:'1 == 1'}"}}
    register_eval_resolver()
    expected = OmegaConf.to_container(OmegaConf.create(raw).policy, resolve=True)
    checked = _as_config(raw)
    assert _resolved(checked, "policy", []) == expected
    assert _resolved(checked, "training.use_ema", []) is True
    assert "logging" not in checked  # only what the resolved keys reach is given to OmegaConf


def test_an_eval_resolver_registered_by_the_process_is_not_used_for_files():
    """DiffusionPolicy registers Python's eval as ``eval``; a file's ${eval:...} still gets safe_eval."""
    from omegaconf import OmegaConf

    from para_policy.integrations.diffusion_policy import _as_config, _resolved, register_eval_resolver

    OmegaConf.clear_resolver("eval")
    OmegaConf.register_new_resolver("eval", eval)
    try:
        checked = _as_config(dp_policy(horizon="${eval:'__import__(\"os\").getpid()'}"))
        problems: list[str] = []
        assert _resolved(checked, "policy", problems) is None
        assert "Call is not allowed" in problems[0]
    finally:
        OmegaConf.clear_resolver("eval")
        register_eval_resolver()


@pytest.mark.parametrize("cfg, message", [
    ({"policy": {"a": "${policy.b}", "b": "${policy.a}"}}, "refer back to it"),
    ({"policy": {"a": "${missing.key}"}}, r"refers to missing.key, which is not in the config"),
    ({"policy": {"a": "${${name}}"}, "name": "x"}, "computes a key"),
    ({"policy": {"a": "${oc.decode:'{a: 1}'}"}}, r"resolver \$\{oc.decode"),
    ({"policy": {"a": "${eval:'1+1'}" + " " * 1000}}, "MAX_INTERPOLATION_CHARS"),
    ({"policy": {"a": "${m}"}, "m": "${l}" * 16, "l": "${k}" * 16, "k": "${j}" * 16, "j": "y" * 900},
     r"about \d+ bytes"),
])
def test_interpolations_are_checked_before_anything_is_resolved(cfg, message):
    from para_policy.integrations.diffusion_policy import _as_config

    with pytest.raises(ValueError, match=message):
        _as_config(cfg)


@pytest.mark.parametrize("expression, message", [
    ("((((10**64)**64)**64)**64)**64", "too large"), ("9**64", "too large"), ("2**64", "65 bits"),
    ("1e308 * 10", "not a finite"), ("1 // 0", "ZeroDivisionError"), ("(-8) ** 0.5", "not a finite real"),
    ("(" * 400 + "1" + ")" * 400, "cannot parse"), ("-" * 60 + "1", "nested more than"),
    ("1 + " * 400 + "1", "characters|nested"),
])
def test_safe_eval_bounds_its_work(expression, message):
    from para_policy.integrations import safe_eval

    with pytest.raises(ValueError, match=message):
        safe_eval(expression)
    assert safe_eval("2**63") == 2**63 and safe_eval("16 * 4 if True else 0") == 64


def test_the_unpickler_counts_what_calls_copy(tmp_path, monkeypatch):
    """One string held in the memo, copied into a new bytes object again and again."""
    from para_policy import load_policy
    from para_policy.integrations import restricted_pickle

    monkeypatch.setattr(restricted_pickle, "MAX_REBUILT_BYTES", 1 << 20)
    copies = b"(" + b"cbuiltins\nlist\nh\x00\x85R" * 300 + b"l"  # [list(memo 0) for _ in range(300)]
    path = write_raw_ckpt(tmp_path / "a.ckpt", b"X\x00\x10\x00\x00" + b"x" * 4096 + b"q\x00" + b"0" + copies)
    with pytest.raises(ValueError, match="MAX_REBUILT_BYTES"):
        load_policy(path)


def test_an_array_of_a_crafted_shape_is_refused_before_allocating(tmp_path):
    import numpy as np

    from para_policy import load_policy

    class Array:
        def __reduce__(self):
            return np.ndarray, ((10**12,), "u1")

    path = write_ckpt(tmp_path / "a.ckpt", Array())
    with pytest.raises(ValueError, match=r"ndarray of shape \(1000000000000,\)"):
        load_policy(path)


def test_integral_floats_are_integers_and_the_limits_are_inclusive():
    from para_policy import PolicyConfig
    from para_policy.integrations import diffusion_policy_config
    from para_policy.policy_config import MAX_HORIZON

    config = PolicyConfig.from_dict(diffusion_policy_config(dp_policy(horizon=16.0)))
    assert config.horizon == 16 and isinstance(config.horizon, int)
    assert PolicyConfig.from_dict(tiny_config(horizon=MAX_HORIZON)).horizon == MAX_HORIZON
    with pytest.raises(ValueError, match="MAX_HORIZON"):
        PolicyConfig.from_dict(tiny_config(horizon=MAX_HORIZON + 1))


@pytest.mark.parametrize("change, message", [({"n_groups": 0}, "n_groups must be >= 1"),
                                            ({"down_dims": [-8]}, "each of >= 1 channels")])
def test_the_unet_refuses_sizes_it_cannot_build_by_name(change, message):
    from para_policy.models import ConditionalUnet1D

    with pytest.raises(ValueError, match=message):
        ConditionalUnet1D(**{"input_dim": 2, "down_dims": [8], "n_groups": 4, **change})


def test_symlinks_that_a_checkpoint_directory_may_hold(tmp_path):
    """A link into the Hugging Face cache's blobs is how downloads are stored: it is read."""
    from para_policy.integrations.lerobot_checkpoint import read_lerobot_directory

    snapshot = tmp_path / "models--x" / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--x" / "blobs").mkdir()
    (tmp_path / "models--x" / "blobs" / "abc").write_text(lerobot_config_text())
    (snapshot / "config.json").symlink_to("../../blobs/abc")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):  # config.json was read
        read_lerobot_directory(snapshot)
    (snapshot / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match="model.safetensors is a symlink to .*outside the checkpoint"):
        read_lerobot_directory(snapshot)




# ---- timing (python tests/test_hostile_checkpoints.py) --------------------------------------

_CHILD = """
import sys, time
from para_policy import load_policy
print("imported", flush=True)
start = time.perf_counter()
try:
    load_policy(sys.argv[1])
    outcome = "loaded"
except BaseException as e:
    outcome = f"{type(e).__name__}: {str(e)[:300]}"
print(f"{time.perf_counter() - start:.3f}s {outcome!r}", flush=True)
"""


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def time_case(path: Path, timeout: float = 10.0) -> str:
    """``load_policy(path)``'s time and outcome in a fresh process, or ``> {timeout} s`` when it runs on."""
    env = {**os.environ, "PARA_POLICY_TEST_SECRET": SECRET, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=_limit_memory)
    assert proc.stdout is not None
    while (line := proc.stdout.readline()) and line.strip() != "imported":
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"> {timeout:g} s"
    return proc.stdout.read().strip().splitlines()[-1]


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, (write, _) in CASES.items():
            folder = Path(tmp) / name
            folder.mkdir()
            path = write(folder)
            size = sum(f.lstat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
            print(f"{name} ({size} bytes): {time_case(path)}", flush=True)


if __name__ == "__main__":
    main()
