"""DiffusionPolicy .ckpt files are read without running code: crafted files are refused before anything
runs; real checkpoints written by DiffusionPolicy (../shared/fixtures) still load, identical to torch's
full unpickler; trust_pickle=True is the explicit opt-in."""

from __future__ import annotations

import builtins
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_dp_checkpoint import DPStandIn, dp_cfg, write_dp_checkpoint

from para_policy import load_policy
from para_policy.integrations import read_diffusion_policy_checkpoint, restricted_pickle

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


class Payload:
    """An object whose unpickling calls ``fn(*args)`` (what a malicious checkpoint does)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def crafted(marker: Path) -> dict:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("name", ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec"])
@pytest.mark.parametrize("where", ["top", "cfg", "state_dict"])
def test_crafted_checkpoints_run_nothing(tmp_path, name, where):
    marker = tmp_path / "pwned"
    evil = crafted(marker)[name]
    sd = DPStandIn(True).dp_state_dict()
    path = tmp_path / "evil.ckpt"
    if where == "top":
        torch.save(evil, path)
    elif where == "cfg":
        torch.save({"cfg": evil, "state_dicts": {"model": sd}, "pickles": {}}, path)
    else:
        write_dp_checkpoint(path, dp_cfg(use_ema=False), {**sd, "model.evil": evil})
    named = {"os.system": "(os|posix).system", "subprocess.Popen": "subprocess.Popen"}.get(name, name)
    with pytest.raises(ValueError, match=rf"refusing to load global {named}") as err:
        load_policy(path)
    assert "Nothing was run" in str(err.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load global"):
        read_diffusion_policy_checkpoint(path)
    assert not marker.exists()


def test_trust_pickle_is_an_explicit_opt_in_with_a_warning(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "trusted.ckpt"
    torch.save(crafted(marker)["builtins.exec"], path)
    with pytest.warns(UserWarning, match="trust_pickle=True runs any code"), pytest.raises(ValueError):
        load_policy(path, trust_pickle=True)
    assert marker.exists()  # the opt-in unpickles fully: that is what it is for


def test_honest_checkpoints_written_with_dill_still_load(tmp_path):
    policy = DPStandIn(True)
    path = tmp_path / "ok.ckpt"
    write_dp_checkpoint(path, dp_cfg(use_ema=False), policy.dp_state_dict())
    sd, config = read_diffusion_policy_checkpoint(path)
    assert config["source"]["weights"] == "model" and set(sd) >= {k for k in policy.dp_state_dict()
                                                                  if k.startswith("model.")}


@pytest.mark.parametrize("name", ["dp_image_A", "dp_hybrid_A", "dp_transformer_lowdim_A"])
def test_checkpoints_written_by_diffusion_policy_load_as_with_full_unpickling(name):
    path = FIXTURES / f"{name}.ckpt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared fixtures sit beside the checkout)")
    from omegaconf import OmegaConf

    safe = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    full = torch.load(path, map_location="cpu", weights_only=False)
    assert OmegaConf.to_container(safe["cfg"]) == OmegaConf.to_container(full["cfg"])
    for role, sd in full["state_dicts"].items():
        assert sd.keys() == safe["state_dicts"][role].keys()
        assert all(torch.equal(v, safe["state_dicts"][role][k]) for k, v in sd.items() if torch.is_tensor(v))
    assert safe["pickles"] == full["pickles"]  # dill bytes, never unpickled
