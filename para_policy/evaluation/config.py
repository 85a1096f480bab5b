"""Reading and checking the evaluator's Hydra config before anything expensive runs.

Every check here runs before the checkpoint is loaded or an env is stepped, so a typo
(negative tolerance, an option the sampler does not take, a checkpoint for another task)
stops the run in a second with a message naming the config key, not after 50 rollouts.

Config shape (``configs/eval.yaml`` composes it)::

    checkpoint   path of a para_policy .safetensors policy (default: the task's shipped policy,
                 ``para_policy/assets/<task.checkpoint_asset>``)
    task         env_id, obs_type, obs_dim, action_dim, episodes, seed_start, max_steps, fps
    sampler      name (a preset), scheduler, num_inference_steps, warm_start and the
                 preset's options (window, tolerance, ...); null = the preset's value
    compare      also evaluate the sequential baseline on the same starts and noise
    num_envs, seed, device, threads, latency.*, video.*, resume_dir, logger.*
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from para_policy.samplers import SamplerConfig, SamplerOptionError, sampler_spec

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSET_RESOLVER = "para_policy.asset"
#: ``task.env_id`` prefix of robosuite tasks (``robosuite/Lift``), made by ``para_policy.tasks.lift.env``
ROBOSUITE_PREFIX = "robosuite/"


class EvalConfigError(ValueError):
    """A configuration the evaluator refuses, found before any rollout."""


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in ``para_policy/assets`` (the ``${para_policy.asset:...}`` resolver)."""
    return str(ASSET_DIR / name)


def register_resolvers() -> None:
    """Register ``${para_policy.asset:NAME}``: configs point at shipped files wherever the package is installed."""
    if not OmegaConf.has_resolver(ASSET_RESOLVER):
        OmegaConf.register_new_resolver(ASSET_RESOLVER, asset_path)


register_resolvers()


@dataclass(frozen=True)
class TaskSettings:
    """What the evaluator needs from ``cfg.task``.

    ``seeds`` are the env reset seeds, ``seed_start … seed_start + episodes - 1``
    (DiffusionPolicy's PushT test seeds start at 100000).
    """

    name: str
    env_id: str
    obs_type: str
    obs_dim: int
    action_dim: int
    episodes: int
    seed_start: int
    max_steps: int
    fps: int
    action_unit: str = "px"

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.episodes))


def _get(node: Any, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(node, key, default=default) if isinstance(node, DictConfig) else default
    return default if value is None else value


def _int(value: Any, key: str, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise EvalConfigError(f"{key} must be an integer, got {value!r}")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise EvalConfigError(f"{key} must be an integer, got {value!r}") from None
    if out != value and not (isinstance(value, str) and str(out) == value.strip()):
        raise EvalConfigError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and out < minimum:
        raise EvalConfigError(f"{key} must be >= {minimum}, got {out}")
    return out


def task_settings(cfg: DictConfig) -> TaskSettings:
    """Read and check the task group (``cfg.task``); raise :class:`EvalConfigError` naming the bad key."""
    task = cfg.get("task")
    if not isinstance(task, DictConfig):
        raise EvalConfigError("no task config: choose one with task=pusht or task=lift")
    env_id = _get(task, "env_id")
    if not env_id:
        raise EvalConfigError("task.env_id is not set: the evaluator needs the gymnasium env id")
    robosuite = str(env_id).startswith(ROBOSUITE_PREFIX)
    obs_type = str(_get(task, "obs_type", "lowdim" if robosuite else "keypoints"))
    allowed = ("lowdim",) if robosuite else ("keypoints", "state")
    if obs_type not in allowed:
        raise EvalConfigError(f"task.obs_type must be {' or '.join(map(repr, allowed))} for {env_id}, got {obs_type!r}")
    return TaskSettings(
        name=str(_get(task, "name", "task")),
        env_id=str(env_id),
        obs_type=obs_type,
        obs_dim=_int(_get(task, "obs_dim", 20 if obs_type == "keypoints" else 5), "task.obs_dim", 1),
        action_dim=_int(_get(task, "action_dim", 2), "task.action_dim", 1),
        episodes=_int(_get(task, "episodes", 50), "task.episodes", 1),
        seed_start=_int(_get(task, "seed_start", 100000), "task.seed_start", 0),
        max_steps=_int(_get(task, "max_steps", 300), "task.max_steps", 1),
        fps=_int(_get(task, "fps", 10), "task.fps", 1),
        action_unit=str(_get(task, "action_unit", "px")),
    )


def sampler_config(node: DictConfig | dict) -> SamplerConfig:
    """``cfg.sampler`` → :class:`SamplerConfig` through the one constructor (:func:`sampler_spec`).

    Keys left at ``null`` take the preset's values; errors name the config key.
    """
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if not isinstance(node, dict):
        raise EvalConfigError(f"sampler must be a mapping with a name, got {node!r}")
    try:
        return sampler_spec(node)
    except SamplerOptionError as e:
        if e.key is not None and e.detail.startswith(e.key):
            raise EvalConfigError(f"sampler.{e.detail}") from None
        raise EvalConfigError(f"sampler: {e}") from None


def baseline_config(candidate: SamplerConfig, schedule_kind: str, num_steps: int) -> SamplerConfig:
    """The sequential sampler on the candidate's schedule (same scheduler kind and step count).

    Comparing ParaDDIM with 100-step DDPM would measure the schedule, not the sampler.
    """
    return sampler_spec("sequential", scheduler=schedule_kind, num_inference_steps=num_steps)


def resolve_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """``path`` made absolute against ``base`` (the directory the user launched from), ``~`` expanded."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    return p


def file_fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint file: size and a hash of its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (1 << 20):
            f.seek(max(size - (1 << 20), 0))
            h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()[:16]}"


def spec_dict(spec: SamplerConfig) -> dict[str, Any]:
    """JSON form of a sampler configuration."""
    return spec.as_dict()
