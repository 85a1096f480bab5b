"""robomimic's HDF5 dataset layout: writing demonstrations, reading them back for training.

The layout (robomimic's ``dataset_states_to_obs`` / ``SequenceDataset`` conventions)::

    data/                         attrs: total (steps in all demos), env_args (JSON string)
    data/demo_<i>/                attrs: num_samples (T), model_file (MuJoCo XML of the episode)
    data/demo_<i>/obs/<key>       (T, d_key)  observation before each action
    data/demo_<i>/next_obs/<key>  (T, d_key)  observation after it
    data/demo_<i>/actions         (T, 7)      float64
    data/demo_<i>/states          (T, S)      flattened MuJoCo states (robomimic's reset_to input)
    data/demo_<i>/rewards         (T,)
    data/demo_<i>/dones           (T,)

``env_args`` is robomimic's env metadata: ``{"env_name", "env_version", "type": 1 (robosuite),
"env_kwargs": {...robosuite.make kwargs...}}``. Demos are ordered by the number after ``demo_``
(as robomimic sorts them), not by HDF5's lexical order. robomimic's optional ``mask/`` filter
keys are not written and are ignored on reading: like DiffusionPolicy, training uses every demo
and holds out its own validation split.

Reading needs only h5py and the keys it uses (``obs/<key>`` for the requested keys, ``actions``),
so robomimic's published Lift datasets (``low_dim*.hdf5``) load as well as the generated ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from para_policy.checkpoints import atomic_write

from . import require


def demo_names(data: Any) -> list[str]:
    """Names of the ``demo_<i>`` groups of an open ``data`` group, in robomimic's order (by ``i``)."""
    names = [n for n in data.keys() if n.startswith("demo_")]
    return sorted(names, key=lambda n: int(n[len("demo_"):]))


def write_demos(
    path: str | os.PathLike,
    demos: Sequence[dict[str, Any]],
    env_args: dict[str, Any],
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write ``demos`` atomically as a robomimic HDF5 file (replacing ``path``).

    Args:
        demos: dicts with ``obs`` and ``next_obs`` (key -> (T, d)), ``actions`` (T, A), ``states`` (T, S),
            ``rewards`` (T,), ``dones`` (T,), and optionally ``model_xml`` (str) and ``seed`` (int, stored
            as a demo attribute).
        env_args: robomimic env metadata (``LiftEnv.env_args()``), stored as JSON in ``data.attrs``.
        attrs: extra JSON-serialisable attributes of ``data`` (e.g. how the file was generated).
    Returns:
        The path written.
    """
    h5py = require("h5py")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for i, demo in enumerate(demos):
                T = len(demo["actions"])
                group = data.create_group(f"demo_{i}")
                for name in ("obs", "next_obs"):
                    sub = group.create_group(name)
                    for key, value in demo[name].items():
                        value = np.asarray(value)
                        if len(value) != T:
                            raise ValueError(f"demo {i}: {name}/{key} has {len(value)} steps, actions have {T}")
                        sub.create_dataset(key, data=value)
                for name in ("actions", "states", "rewards", "dones"):
                    value = np.asarray(demo[name])
                    if len(value) != T:
                        raise ValueError(f"demo {i}: {name} has {len(value)} steps, actions have {T}")
                    group.create_dataset(name, data=value)
                group.attrs["num_samples"] = T
                if demo.get("model_xml") is not None:
                    group.attrs["model_file"] = demo["model_xml"]
                if demo.get("seed") is not None:
                    group.attrs["seed"] = int(demo["seed"])
                total += T
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args)
            for key, value in (attrs or {}).items():
                data.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)

    return atomic_write(path, write)


def read_env_args(path: str | os.PathLike) -> dict[str, Any]:
    """``data.attrs['env_args']`` of a robomimic HDF5 file, parsed."""
    h5py = require("h5py")
    with h5py.File(path, "r") as f:
        return json.loads(f["data"].attrs["env_args"])


def read_lowdim(path: str | os.PathLike, obs_keys: Sequence[str]) -> dict[str, Any]:
    """Concatenated low-dim observations and actions of every demo, as training reads them.

    Args:
        obs_keys: ``obs/<key>`` datasets concatenated in this order (DiffusionPolicy's Lift keys give 19 dims).
    Returns:
        ``{'obs': (N, sum d_key) float32, 'action': (N, A) float32, 'episode_ends': (E,) int64
        cumulative ends, 'demos': [names in order], 'env_args': dict}``.
    Raises:
        KeyError naming the demo and key when a requested observation is missing.
    """
    h5py = require("h5py")
    obs, actions, ends = [], [], []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise KeyError(f"{path}: no 'data' group; not a robomimic dataset")
        data = f["data"]
        names = demo_names(data)
        total = 0
        for name in names:
            demo = data[name]
            missing = [k for k in obs_keys if k not in demo["obs"]]
            if missing:
                raise KeyError(f"{path}: {name}/obs has no {missing}; it has {sorted(demo['obs'].keys())}")
            o = np.concatenate([np.asarray(demo["obs"][k], dtype=np.float64).reshape(len(demo["actions"]), -1)
                                for k in obs_keys], axis=-1)
            obs.append(o.astype(np.float32))
            actions.append(np.asarray(demo["actions"], dtype=np.float32))
            total += len(o)
            ends.append(total)
        env_args = json.loads(data.attrs["env_args"]) if "env_args" in data.attrs else {}
    if not names:
        raise ValueError(f"{path}: no demo_<i> groups under data/")
    return {
        "obs": np.concatenate(obs),
        "action": np.concatenate(actions),
        "episode_ends": np.asarray(ends, dtype=np.int64),
        "demos": names,
        "env_args": env_args,
    }


__all__ = ["demo_names", "read_env_args", "read_lowdim", "write_demos"]
