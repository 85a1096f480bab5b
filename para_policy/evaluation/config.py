"""Reading and checking the evaluator's Hydra config before anything expensive runs.

Every check here runs before the checkpoint is loaded or an env is stepped, so a typo
(negative tolerance, an option the sampler does not take, a checkpoint for another task)
stops the run in a second with a message naming the config key, not after 50 rollouts.

Config shape (``configs/eval.yaml`` composes it)::

    checkpoint   path of a para_policy .safetensors policy (default: the task's shipped policy,
                 ``para_policy/assets/<task.checkpoint_asset>``)
    task         env_id, obs_type, obs_dim (flat observations) or obs_shapes (dict observations:
                 ``{key: shape}``, e.g. PushT's image task), action_dim, episodes, seed_start,
                 max_steps, fps, checkpoint_asset (null: the task ships no policy)
    sampler      name (a preset), scheduler, num_inference_steps, solver_order, warm_start and the
                 preset's options (window, tolerance, ...); null = the preset's value
    compare      also evaluate the sequential baseline on the same starts and noise
    controller   mode (sync | async | rtc), delay_steps, clock (steps | wall), control_hz,
                 prefix_mode (rtc: clean | noised), soft_masking (rtc: true | false): how each
                 env's chunks are scheduled (:class:`ControllerSettings`)
    num_envs, seed, device, threads, latency.*, video.*, resume_dir, logger.*
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from para_policy.policy import PREFIX_MODES
from para_policy.samplers import SamplerConfig, SamplerOptionError, sampler_spec
from para_policy.samplers.registry import DPM_SCHEDULERS

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSET_RESOLVER = "para_policy.asset"
#: ``task.env_id`` prefix of robosuite tasks (``robosuite/Lift``), made by ``para_policy.tasks.lift.env``
ROBOSUITE_PREFIX = "robosuite/"
#: ``task.obs_type`` of PushT's image task: gym-pusht's frame + agent position, as DP's ``PushTImageEnv``
PIXELS_OBS_TYPE = "pixels_agent_pos"
#: the observation keys and shapes PushT's image env gives (``image`` is (3, H, W): any H, W gym-pusht renders)
PUSHT_IMAGE_KEYS = ("image", "agent_pos")
#: the key a flat (low-dim) observation has in ``predict_action``'s dict
FLAT_KEY = "obs"


class EvalConfigError(ValueError):
    """A configuration the evaluator refuses, found before any rollout."""


def asset_path(name: str | None) -> str | None:
    """Absolute path of a file shipped in ``para_policy/assets`` (the ``${para_policy.asset:...}`` resolver).

    ``None`` (a task with ``checkpoint_asset: null``, which ships no policy) gives ``None``, so
    ``checkpoint`` stays unset and the run asks for one.
    """
    return None if name is None or name == "" else str(ASSET_DIR / name)


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
    obs_dim: int | None  # flat observations; None when obs_shapes is set
    action_dim: int
    episodes: int
    seed_start: int
    max_steps: int
    fps: int
    action_unit: str = "px"
    #: dict observations: key -> shape of one step (``{'image': (3, 96, 96), 'agent_pos': (2,)}``); None: flat
    obs_shapes: dict[str, tuple[int, ...]] | None = None
    #: ``task.checkpoint_asset``: the shipped policy's file name, None when the task ships none
    checkpoint_asset: str | None = None

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.episodes))

    @property
    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        """One step's keys and shapes, as a policy's ``observation_shapes()``: ``{'obs': (obs_dim,)}`` or obs_shapes."""
        return dict(self.obs_shapes) if self.obs_shapes is not None else {FLAT_KEY: (int(self.obs_dim or 0),)}

    def fingerprint(self) -> dict[str, Any]:
        """JSON form of what makes two runs the same evaluation (not the episode count, not the shipped asset).

        A flat task's fingerprint has exactly the keys it had before dict observations
        existed, so earlier run folders still resume.
        """
        out = {k: v for k, v in self.__dict__.items() if k not in ("episodes", "obs_shapes", "checkpoint_asset")}
        if self.obs_shapes is not None:
            out["obs_shapes"] = {k: list(v) for k, v in self.obs_shapes.items()}
        return out


def format_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """``{'image': (3, 96, 96), 'agent_pos': (2,)}`` as ``image (3, 96, 96), agent_pos (2,)`` for messages."""
    return ", ".join(f"{k} {tuple(int(d) for d in v)}" for k, v in shapes.items())


#: LeRobot's names of PushT's observations (its gym-pusht processor maps ``pixels`` and ``agent_pos`` to
#: these): a LeRobot policy's key → the env's.
LEROBOT_KEYS = {"observation.image": "image", "observation.state": "agent_pos"}


def env_key(key: str, given: Mapping[str, Any]) -> str:
    """The env's name for a policy's observation key: the key itself, or its LeRobot alias when only that is given."""
    return LEROBOT_KEYS[key] if key not in given and LEROBOT_KEYS.get(key) in given else key


def observation_mismatch(wanted: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]]) -> str | None:
    """What is wrong when a policy observing ``wanted`` meets observations ``given``, or None if they fit.

    Both map observation keys to the shape of one step. Every wanted key must be given with
    its shape (under its own name or, for LeRobot policies, the env's name: :data:`LEROBOT_KEYS`);
    keys given but not wanted are fine (the policy does not read them).
    """
    missing = [k for k in wanted if env_key(k, given) not in given]
    if missing:
        return (f"{', '.join(map(repr, missing))} {'is' if len(missing) == 1 else 'are'} missing (wanted: "
                f"{format_shapes(wanted)}; given: {format_shapes(given)})")
    for key, shape in wanted.items():
        have = given[env_key(key, given)]
        if tuple(int(d) for d in have) != tuple(int(d) for d in shape):
            return f"{key!r} has shape {tuple(have)} where {tuple(shape)} is wanted"
    return None


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


def _obs_shapes(node: Any, obs_type: str) -> dict[str, tuple[int, ...]]:
    """``task.obs_shapes`` of an image task, checked: PushT's ``{'image': [3, H, W], 'agent_pos': [2]}``."""
    example = "{image: [3, 96, 96], agent_pos: [2]}"
    if node is None:
        raise EvalConfigError(f"task.obs_shapes is not set: obs_type={obs_type} needs the observation's keys and "
                              f"shapes, {example}")
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(raw, Mapping):
        raise EvalConfigError(f"task.obs_shapes must map observation keys to shapes, e.g. {example}; got {raw!r}")
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shape in raw.items():
        if not isinstance(shape, (list, tuple)) or not shape:
            raise EvalConfigError(f"task.obs_shapes.{key} must be a list of sizes, got {shape!r}")
        shapes[str(key)] = tuple(_int(d, f"task.obs_shapes.{key}", 1) for d in shape)
    if sorted(shapes) != sorted(PUSHT_IMAGE_KEYS):
        raise EvalConfigError(f"task.obs_shapes has keys {sorted(shapes)}; PushT's {obs_type} env gives exactly "
                              f"{list(PUSHT_IMAGE_KEYS)} ({example})")
    if len(shapes["image"]) != 3 or shapes["image"][0] != 3:
        raise EvalConfigError(f"task.obs_shapes.image must be [3, height, width] (RGB, channels first), got "
                              f"{list(shapes['image'])}")
    if shapes["agent_pos"] != (2,):
        raise EvalConfigError(f"task.obs_shapes.agent_pos must be [2], got {list(shapes['agent_pos'])}")
    return {k: shapes[k] for k in PUSHT_IMAGE_KEYS}


def task_settings(cfg: DictConfig) -> TaskSettings:
    """Read and check the task group (``cfg.task``); raise :class:`EvalConfigError` naming the bad key."""
    task = cfg.get("task")
    if not isinstance(task, DictConfig):
        raise EvalConfigError("no task config: choose one with task=pusht, task=pusht_image or task=lift")
    env_id = _get(task, "env_id")
    if not env_id:
        raise EvalConfigError("task.env_id is not set: the evaluator needs the gymnasium env id")
    robosuite = str(env_id).startswith(ROBOSUITE_PREFIX)
    obs_type = str(_get(task, "obs_type", "lowdim" if robosuite else "keypoints"))
    allowed = ("lowdim",) if robosuite else ("keypoints", "state", PIXELS_OBS_TYPE)
    if obs_type not in allowed:
        raise EvalConfigError(f"task.obs_type must be {' or '.join(map(repr, allowed))} for {env_id}, got {obs_type!r}")
    obs_shapes, obs_dim = None, None
    if obs_type == PIXELS_OBS_TYPE:
        if _get(task, "obs_dim") is not None:
            raise EvalConfigError(f"task.obs_dim does not apply to obs_type={obs_type} (dict observations); the "
                                  "task gives task.obs_shapes instead")
        obs_shapes = _obs_shapes(OmegaConf.select(task, "obs_shapes", default=None), obs_type)
    else:
        if _get(task, "obs_shapes") is not None:
            raise EvalConfigError(f"task.obs_shapes applies to obs_type={PIXELS_OBS_TYPE} only; obs_type={obs_type} "
                                  "gives flat observations of task.obs_dim numbers")
        obs_dim = _int(_get(task, "obs_dim", 20 if obs_type == "keypoints" else 5), "task.obs_dim", 1)
    asset = OmegaConf.select(task, "checkpoint_asset", default=None)
    return TaskSettings(
        name=str(_get(task, "name", "task")),
        env_id=str(env_id),
        obs_type=obs_type,
        obs_dim=obs_dim,
        action_dim=_int(_get(task, "action_dim", 2), "task.action_dim", 1),
        episodes=_int(_get(task, "episodes", 50), "task.episodes", 1),
        seed_start=_int(_get(task, "seed_start", 100000), "task.seed_start", 0),
        max_steps=_int(_get(task, "max_steps", 300), "task.max_steps", 1),
        fps=_int(_get(task, "fps", 10), "task.fps", 1),
        action_unit=str(_get(task, "action_unit", "px")),
        obs_shapes=obs_shapes,
        checkpoint_asset=None if asset in (None, "") else str(asset),
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
    order = candidate.solver_order if schedule_kind in DPM_SCHEDULERS else None  # the same DPM-Solver++ order
    return sampler_spec("sequential", scheduler=schedule_kind, num_inference_steps=num_steps, solver_order=order)


CONTROLLER_MODES = ("sync", "async", "rtc")
CONTROLLER_CLOCKS = ("steps", "wall")
CONTROLLER_KEYS = ("mode", "delay_steps", "clock", "control_hz", "prefix_mode", "soft_masking", "deadline_ms",
                   "extend_plan")


@dataclass(frozen=True)
class ControllerSettings:
    """``cfg.controller``: when each env's chunks are computed and when they take over.

    ``mode='sync'`` on the steps clock is today's protocol (the robot waits for every chunk)
    and runs through the batched rollout loop, bit for bit as before. Anything else runs each
    episode through a :class:`~para_policy.controller.Controller`, so the evaluator measures
    the very schedule a robot loop runs.

    mode: ``'sync'``, ``'async'`` (the next chunk is sampled while the queue runs, then switched
        to, time-aligned) or ``'rtc'`` (the same, the actions that run meanwhile frozen into it).
    delay_steps: ``d``, the inference latency in control steps (``0 <= d < n_action_steps``); 0
        in sync; None on the wall clock: measured by the Controller from this machine's latency.
    clock: ``'steps'`` (the latency is simulated as exactly ``d`` steps: deterministic, the same
        on every machine) or ``'wall'`` (real time: the env is stepped every ``1 / control_hz``
        seconds and the real latency decides; not deterministic).
    control_hz: the wall clock's control rate; None on the steps clock.
    prefix_mode: ``mode='rtc'``: how the frozen actions are imposed (``'clean'``, the default, or
        ``'noised'``: :class:`~para_policy.controller.Controller`'s ``prefix_mode``); None otherwise.
    soft_masking: ``mode='rtc'``: the old chunk's plan guides the positions after the frozen
        actions (the Controller's ``soft_masking``, default True); None otherwise.
    extend_plan: ``mode='async'|'rtc'``: when the next chunk is late, run the current chunk's plan
        past its ``n_action_steps`` instead of waiting (the Controller's ``extend_plan``).
    deadline_ms: ``clock='wall'`` only: the candidate's time budget per chunk (the Controller's
        ``deadline_ms``: no new round starts after it, and the chunk is the clean-sample estimate
        of its first unfinished step). A Picard candidate only; the sequential baseline has no
        partial answer to return and runs without one. None: no deadline.
    """

    mode: str = "sync"
    delay_steps: int | None = 0
    clock: str = "steps"
    control_hz: float | None = None
    prefix_mode: str | None = None
    soft_masking: bool | None = None
    deadline_ms: float | None = None
    extend_plan: bool = False

    @property
    def batched(self) -> bool:
        """Whether the episodes run through the batched loop (:func:`~.rollout.run_rollouts`): sync, steps clock."""
        return self.mode == "sync" and self.clock == "steps"

    @property
    def deterministic(self) -> bool:
        """Whether the same config gives the same episodes on any machine (the steps clock)."""
        return self.clock == "steps"

    @property
    def period_s(self) -> float | None:
        """The wall clock's control period in seconds (``1 / control_hz``); None on the steps clock."""
        return None if self.control_hz is None else 1.0 / self.control_hz

    def as_dict(self) -> dict[str, Any]:
        """JSON form: the four keys, ``period_s``, whether the run is deterministic."""
        return {**asdict(self), "period_s": self.period_s, "deterministic": self.deterministic}

    def fingerprint(self) -> dict[str, Any] | None:
        """What a resumed run must share; None for today's protocol, so earlier run folders still resume.

        ``prefix_mode`` and ``soft_masking`` only where they apply (rtc), ``deadline_ms`` and
        ``extend_plan`` only where set, so earlier run folders resume too.
        """
        if self.batched:
            return None
        return {k: v for k, v in asdict(self).items()
                if (v is not None and v is not False) or k not in ("prefix_mode", "soft_masking", "deadline_ms",
                                                                   "extend_plan")}

    def label(self) -> str:
        """Short name for progress bars and tables: ``sync``, ``rtc d=2``, ``rtc wall 10 Hz``."""
        if self.clock == "wall":
            delay = "" if self.mode == "sync" else (" d measured" if self.delay_steps is None
                                                    else f" d={self.delay_steps}")
            deadline = "" if self.deadline_ms is None else f" deadline {self.deadline_ms:g} ms"
            return f"{self.mode}{self._prefix_label()} wall {self.control_hz:g} Hz{delay}{deadline}"
        return self.mode if self.mode == "sync" else f"{self.mode}{self._prefix_label()} d={self.delay_steps}"

    def _prefix_label(self) -> str:
        """Where it is not the default: `` hard`` (no soft masking), `` noised``, `` extend`` (extend_plan)."""
        return ((" hard" if self.soft_masking is False else "") + (" noised" if self.prefix_mode == "noised" else "")
                + (" extend" if self.extend_plan else ""))

    def check_sampler(self, spec: SamplerConfig) -> None:
        """Refuse a deadline for a candidate that cannot stop early (before anything is loaded)."""
        if self.deadline_ms is not None and not spec.iterative:
            raise EvalConfigError(f"controller.deadline_ms={self.deadline_ms:g} needs a Picard sampler (paradigms, "
                                  f"paradigms_published, parataa, ...), whose rounds can stop at a deadline; "
                                  f"sampler={spec.name} runs every step: drop controller.deadline_ms")

    def check_policy(self, n_action_steps: int) -> None:
        """Refuse a delay the policy's chunks cannot absorb (before any env is stepped)."""
        d = self.delay_steps
        if self.mode != "sync" and d is not None and d >= n_action_steps:
            raise EvalConfigError(
                f"controller.delay_steps={d} must be < the policy's n_action_steps={n_action_steps} (the actions "
                f"that run while a chunk is computed must leave it some of its own): use 0..{n_action_steps - 1}")
        if self.mode != "sync" and self.clock == "wall" and n_action_steps < 2:
            raise EvalConfigError(f"controller.mode={self.mode} with controller.clock=wall needs n_action_steps >= 2 "
                                  f"(one action to run while the next chunk is sampled); this policy has "
                                  f"{n_action_steps}")


def _choice(value: Any, key: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; else an error naming the key, the choices and the nearest one."""
    if isinstance(value, str) and value in allowed:
        return value
    near = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    choices = ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}"
    raise EvalConfigError(f"{key} must be {choices}, got {value!r}{hint}")


def controller_settings(cfg: DictConfig, task: TaskSettings | None = None) -> ControllerSettings:
    """Read and check ``cfg.controller`` (absent: today's sync protocol); errors name the key.

    ``delay_steps: null`` means 0 on the steps clock and "measured" on the wall clock;
    ``control_hz: null`` on the wall clock is the task's ``fps``. The delay is checked against
    the policy's ``n_action_steps`` later (:meth:`ControllerSettings.check_policy`).
    """
    node = cfg.get("controller") if isinstance(cfg, DictConfig) else None
    if node is None:
        return ControllerSettings()
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(raw, Mapping):
        raise EvalConfigError(f"controller must be a mapping of {list(CONTROLLER_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(CONTROLLER_KEYS))
    if unknown:
        raise EvalConfigError(f"controller has unknown keys {unknown}; known: {list(CONTROLLER_KEYS)}")
    mode = _choice(raw.get("mode") or "sync", "controller.mode", CONTROLLER_MODES)
    clock = _choice(raw.get("clock") or "steps", "controller.clock", CONTROLLER_CLOCKS)
    prefix = raw.get("prefix_mode")
    if prefix is not None and mode != "rtc":
        raise EvalConfigError(f"controller.prefix_mode={prefix} applies to controller.mode=rtc only (the frozen "
                              f"actions of real-time chunking); mode={mode} freezes none")
    prefix = _choice(prefix or "clean", "controller.prefix_mode", PREFIX_MODES) if mode == "rtc" else None
    soft = raw.get("soft_masking")
    if soft is not None and mode != "rtc":
        raise EvalConfigError(f"controller.soft_masking={soft} applies to controller.mode=rtc only (guidance by the "
                              f"old chunk after the frozen actions); mode={mode} freezes none")
    if soft is not None and not isinstance(soft, bool):
        raise EvalConfigError(f"controller.soft_masking must be true or false, got {soft!r}")
    soft = (True if soft is None else soft) if mode == "rtc" else None
    delay = raw.get("delay_steps")
    delay = None if delay is None else _int(delay, "controller.delay_steps", 0)
    hz = raw.get("control_hz")
    if hz is not None:
        if clock != "wall":
            raise EvalConfigError(f"controller.control_hz={hz} applies to controller.clock=wall only; the steps clock "
                                  "simulates the latency as controller.delay_steps control steps")
        if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not math.isfinite(hz) or hz <= 0:
            raise EvalConfigError(f"controller.control_hz must be a number > 0 (control steps per second), got {hz!r}")
        hz = float(hz)
    elif clock == "wall":
        hz = float(task.fps) if task is not None else 10.0
    extend = raw.get("extend_plan")
    if extend is not None and not isinstance(extend, bool):
        raise EvalConfigError(f"controller.extend_plan must be true or false, got {extend!r}")
    if extend and mode == "sync":
        raise EvalConfigError("controller.extend_plan=true applies to controller.mode=async or rtc (running the plan "
                              "on while the next chunk is sampled); mode=sync waits for every chunk")
    extend = bool(extend)
    deadline = raw.get("deadline_ms")
    if deadline is not None:
        if clock != "wall":
            raise EvalConfigError(f"controller.deadline_ms={deadline} applies to controller.clock=wall only: a "
                                  "deadline stops sampling by the wall clock, so steps-clock results would depend on "
                                  "the machine")
        if (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline)
                or deadline < 0):
            raise EvalConfigError(f"controller.deadline_ms must be a number >= 0 (ms per chunk), got {deadline!r}")
        deadline = float(deadline)
    if mode == "sync":
        if delay not in (None, 0):
            raise EvalConfigError(f"controller.delay_steps={delay} applies to controller.mode=async or rtc; "
                                  "mode=sync waits for every chunk (delay 0)")
        return ControllerSettings("sync", 0, clock, hz, deadline_ms=deadline)
    if clock == "steps":
        return ControllerSettings(mode, 0 if delay is None else delay, clock, None, prefix, soft,
                                  extend_plan=extend)
    if delay == 0:
        raise EvalConfigError("controller.delay_steps=0 on controller.clock=wall would wait for every chunk (that is "
                              "mode=sync): set controller.delay_steps=null to measure the delay from this machine's "
                              "latency, or a fixed delay >= 1")
    return ControllerSettings(mode, delay, clock, hz, prefix, soft, deadline, extend)


def resolve_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """``path`` made absolute against ``base`` (the directory the user launched from), ``~`` expanded."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    return p


def file_fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint file: size and a hash of its first and last MiB.

    A checkpoint directory (LeRobot's) is the fingerprints of its files, by name.
    """
    if path.is_dir():
        parts = [f"{p.name}={file_fingerprint(p)}" for p in sorted(path.iterdir()) if p.is_file()]
        return "dir:" + hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]
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
