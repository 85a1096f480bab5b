"""The checkpoint reader registry: which reader takes a path, unknown formats, a registered format."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_policy import tiny_policy

from para_policy import PolicyConfig, load_policy, loading, save_checkpoint
from para_policy.checkpoints import read_policy_checkpoint
from para_policy.loading import CheckpointReader, reader_for, register_reader

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so readers a test registers are gone after it."""
    monkeypatch.setattr(loading, "_READERS", list(loading._READERS))


@pytest.fixture
def ckpt(tmp_path) -> Path:
    policy = tiny_policy()
    return save_checkpoint(tmp_path / "p.safetensors", policy.state_dict(), policy.config)


def test_dispatch_on_what_the_path_is(tmp_path, ckpt):
    assert reader_for(ckpt).name == "para_policy"
    renamed = shutil.copy(ckpt, tmp_path / "policy.bin")  # a safetensors file by its header, not its name
    assert reader_for(renamed).name == "para_policy"
    (tmp_path / "run.ckpt").write_bytes(b"not a pickle")
    assert reader_for(tmp_path / "run.ckpt").name == "diffusion_policy"
    (tmp_path / "lerobot").mkdir()
    (tmp_path / "lerobot" / "config.json").write_text("{}")
    assert reader_for(tmp_path / "lerobot").name == "lerobot"
    state_dict, config = loading.read_checkpoint(renamed)
    assert isinstance(config, PolicyConfig) and config.horizon == 8 and "model.final_conv.1.bias" in state_dict


@pytest.mark.skipif(not (FIXTURES / "lerobot_diffusion_A").is_dir(), reason="shared fixtures not available")
def test_fixture_formats_read_as_policy_configs():
    for name, reader in [("lerobot_diffusion_A", "lerobot"), ("dp_transformer_lowdim_A.ckpt", "diffusion_policy")]:
        path = FIXTURES / name
        if reader == "diffusion_policy":
            pytest.importorskip("dill")
        assert reader_for(path).name == reader
        _, config = loading.read_checkpoint(path)
        assert isinstance(config, PolicyConfig) and config.source["format"].startswith(reader.split("_")[0])


def test_unknown_and_missing_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no checkpoint reader takes .*notes.txt, a file \(.txt\); the known formats "
                                         r"are para_policy \(a para_policy .safetensors policy\), diffusion_policy"):
        load_policy(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a directory"):
        reader_for(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        reader_for(tmp_path / "absent.safetensors")


def test_a_registered_reader_is_used(registry, tmp_path, ckpt):
    calls = []

    def read(path: Path, **kwargs):
        calls.append(kwargs)
        return read_policy_checkpoint(path)

    path = shutil.copy(ckpt, tmp_path / "policy.mine")
    reader = register_reader(CheckpointReader("mine", "a .mine file", lambda p: p.suffix == ".mine", read))
    assert reader_for(path) is reader and reader_for(ckpt).name == "para_policy"
    assert loading.readers()[0] is reader and "or a .mine file" in loading.describe_formats()
    policy = load_policy(path, sampler="sequential", backend="eager")
    assert calls == [{"trust_pickle": False}]
    bias = "model.final_conv.1.bias"
    assert torch.equal(policy.state_dict()[bias], tiny_policy().state_dict()[bias])
    register_reader(CheckpointReader("mine", "a .mine file", lambda p: False, read))  # same name: replaced
    assert [r.name for r in loading.readers()].count("mine") == 1 and reader_for(path).name == "para_policy"


def test_a_reader_must_return_a_policy_config(registry, tmp_path, ckpt):
    register_reader(CheckpointReader("dicts", "a .dict file", lambda p: p.suffix == ".dict",
                                     lambda p, **kw: (read_policy_checkpoint(p)[0], {"horizon": 8})))
    with pytest.raises(TypeError, match="the dicts reader returned a dict config"):
        load_policy(shutil.copy(ckpt, tmp_path / "x.dict"))
