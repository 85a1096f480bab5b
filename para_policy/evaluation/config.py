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
                 prefix_mode (rtc: clean | noised), soft_masking (rtc: true | false), extend_plan,
                 deadline_ms: how each env's chunks are scheduled (:class:`ControllerSettings`,
                 checked by the Controller's own :class:`~para_policy.controller.ControllerConfig`);
                 remote (null | local | HOST:PORT): the candidate's chunks sampled by a policy server
    num_envs, seed, device, threads, latency.*, video.*, resume_dir, logger.*
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from para_policy.controller import ControllerConfig, ControllerConfigError
from para_policy.samplers import SamplerConfig, SamplerOptionError, sampler_spec
from para_policy.samplers.registry import DPM_SCHEDULERS

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSET_RESOLVER = "para_policy.asset"
#: ``${para_policy.run_id:}``: the random part of the default run folder's name (configs/eval.yaml)
RUN_ID_RESOLVER = "para_policy.run_id"
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


@functools.cache
def _run_id(pid: int) -> str:
    return secrets.token_hex(3)


def run_id() -> str:
    """Six random hex digits, the same for the whole process (``${para_policy.run_id:}``).

    The default run folder is named by its start time; two runs started in the same microsecond
    still get two folders through this suffix. Fixed per process (a forked child draws its own)
    because Hydra may resolve the run folder's name more than once.
    """
    return _run_id(os.getpid())


def register_resolvers() -> None:
    """Register ``${para_policy.asset:NAME}`` (configs point at shipped files wherever the package is installed)
    and ``${para_policy.run_id:}`` (:func:`run_id`)."""
    if not OmegaConf.has_resolver(ASSET_RESOLVER):
        OmegaConf.register_new_resolver(ASSET_RESOLVER, asset_path)
    if not OmegaConf.has_resolver(RUN_ID_RESOLVER):
        OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id)


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


def checked_int(value: Any, key: str, minimum: int | None = None) -> int:
    """``value`` as an int (an int or a string of one) of at least ``minimum``, else :class:`EvalConfigError`.

    Shared by every config reader of the evaluator (task, controller, cluster, the runner's own keys),
    so a bad number reads the same wherever it is given.
    """
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


def checked_device(value: Any) -> str:
    """``cfg.device`` as a torch device string that this machine has, else :class:`EvalConfigError`.

    Checked with the config rather than when the policy moves there, where torch's own error
    (``Torch not compiled with CUDA enabled``) came out as a traceback.
    """
    name = str(value)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvalConfigError(f"device {name!r} is not a torch device: use cpu, cuda, cuda:<index> or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise EvalConfigError(f"device {name!r} requested but CUDA is not available: {why}; use device=cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise EvalConfigError(f"device {name!r} requested but this machine has {count} CUDA device(s): "
                                  f"use cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise EvalConfigError(f"device {name!r} requested but MPS is not available on this machine; use device=cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise EvalConfigError(f"device {name!r} is not supported by the evaluator: use cpu, cuda, cuda:<index> or mps")
    return name


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
        shapes[str(key)] = tuple(checked_int(d, f"task.obs_shapes.{key}", 1) for d in shape)
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
        obs_dim = checked_int(_get(task, "obs_dim", 20 if obs_type == "keypoints" else 5), "task.obs_dim", 1)
    asset = OmegaConf.select(task, "checkpoint_asset", default=None)
    return TaskSettings(
        name=str(_get(task, "name", "task")),
        env_id=str(env_id),
        obs_type=obs_type,
        obs_dim=obs_dim,
        action_dim=checked_int(_get(task, "action_dim", 2), "task.action_dim", 1),
        episodes=checked_int(_get(task, "episodes", 50), "task.episodes", 1),
        seed_start=checked_int(_get(task, "seed_start", 100000), "task.seed_start", 0),
        max_steps=checked_int(_get(task, "max_steps", 300), "task.max_steps", 1),
        fps=checked_int(_get(task, "fps", 10), "task.fps", 1),
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


CONTROLLER_KEYS = ("mode", "delay_steps", "clock", "control_hz", "prefix_mode", "soft_masking", "deadline_ms",
                   "extend_plan", "remote")
#: ``controller.remote``'s value that starts a policy server on loopback for the run
REMOTE_LOCAL = "local"
_REMOTE_HINT = "null (in process), 'local' (a policy server this run starts on loopback) or 'HOST:PORT' (a running one)"


def checked_remote(value: Any) -> str | None:
    """``controller.remote`` checked: None, ``'local'`` or ``'host:port'`` (port 1-65535); else :class:`EvalConfigError`
    naming the key.

    An IPv6 host is written in brackets (``'[::1]:50051'``, quoted on Hydra's command line), as gRPC reads it.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise EvalConfigError(f"controller.remote must be {_REMOTE_HINT}, got {value!r}")
    text = value.strip()
    if text == REMOTE_LOCAL:
        return text
    host, sep, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not bare or any(c.isspace() or c in "/[]" for c in bare) or (":" in bare and bare == host):
        raise EvalConfigError(f"controller.remote must be {_REMOTE_HINT} (an IPv6 host in brackets: '[::1]:50051'), "
                              f"got {value!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise EvalConfigError(f"controller.remote={text!r}: the port must be a number in 1..65535, got {port!r}")
    return text


@contextlib.contextmanager
def _controller_errors() -> Iterator[None]:
    """A Controller option refused by :class:`ControllerConfig` as an :class:`EvalConfigError` naming its key."""
    try:
        yield
    except ControllerConfigError as e:
        raise EvalConfigError(f"controller.{e}") from None


@dataclass(frozen=True)
class ControllerSettings:
    """``cfg.controller``: when each env's chunks are computed and when they take over.

    ``mode='sync'`` on the steps clock is today's protocol (the robot waits for every chunk)
    and runs through the batched rollout loop, bit for bit as before. Anything else runs each
    episode through a :class:`~para_policy.controller.Controller`, so the evaluator measures
    the very schedule a robot loop runs. The settings are checked by the Controller's own
    :class:`~para_policy.controller.ControllerConfig` (:meth:`controller_config`, built when the
    settings are), so they mean and are refused the same in both; what is the evaluator's own is
    the config's spelling (``control_hz``) and the defaults :func:`controller_settings` fills in.

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
        past its ``n_action_steps`` instead of waiting (the Controller's ``extend_plan``). False
        here by default, where the Controller's default runs the plan on: an evaluation measures
        the waiting schedule unless told, so its stall counts mean what they meant and earlier
        run folders resume.
    deadline_ms: ``clock='wall'`` only: the candidate's time budget per chunk (the Controller's
        ``deadline_ms``: no new round starts after it, and the chunk is the clean-sample estimate
        of its first unfinished step). A Picard candidate only; the sequential baseline has no
        partial answer to return and runs without one. None: no deadline.
    remote: None (in process), ``'local'`` (the run starts ``para-policy serve`` on loopback with the
        candidate's sampler) or ``'host:port'`` (a running server): the candidate's episodes run
        through a :class:`~para_policy.serving.client.RemoteController`, the same loop over the
        network. The baseline runs in process either way. A remote candidate always runs through
        the Controller's loop, so ``sync`` on the steps clock is then not the batched loop.
    """

    mode: str = "sync"
    delay_steps: int | None = 0
    clock: str = "steps"
    control_hz: float | None = None
    prefix_mode: str | None = None
    soft_masking: bool | None = None
    deadline_ms: float | None = None
    extend_plan: bool = False
    remote: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "deadline_ms", self.controller_config().deadline_ms)  # checked; a float
        object.__setattr__(self, "remote", checked_remote(self.remote))

    def controller_config(self, seed: int | None = None, with_deadline: bool = True) -> ControllerConfig:
        """The :class:`~para_policy.controller.ControllerConfig` these settings run with.

        ``seed``: the Controller's noise seed; ``with_deadline=False`` drops ``deadline_ms`` (for the
        sequential baseline). A refused setting raises an :class:`EvalConfigError` naming its key.
        """
        with _controller_errors():
            return ControllerConfig(mode=self.mode, delay_steps=self.delay_steps, clock=self.clock,
                                    period_s=self.period_s, extend_plan=self.extend_plan,
                                    prefix_mode=self.prefix_mode, soft_masking=self.soft_masking,
                                    deadline_ms=self.deadline_ms if with_deadline else None, seed=seed)

    @property
    def batched(self) -> bool:
        """Whether the episodes run through the batched loop (:func:`~.rollout.run_rollouts`): sync, steps clock,
        in process (a remote candidate needs the Controller's loop, and both samplers run the same loop)."""
        return self.mode == "sync" and self.clock == "steps" and self.remote is None

    @property
    def remote_kind(self) -> str | None:
        """``'local'`` (a server this run starts), ``'server'`` (a running one at ``remote``) or None (in process)."""
        return None if self.remote is None else (REMOTE_LOCAL if self.remote == REMOTE_LOCAL else "server")

    @property
    def deterministic(self) -> bool:
        """Whether the same config gives the same episodes on any machine (the steps clock)."""
        return self.clock == "steps"

    @property
    def period_s(self) -> float | None:
        """The wall clock's control period in seconds (``1 / control_hz``); None on the steps clock."""
        return None if self.control_hz is None else 1.0 / self.control_hz

    def as_dict(self) -> dict[str, Any]:
        """JSON form: the settings, ``period_s``, whether the run is deterministic (``remote`` only where set)."""
        out = {**asdict(self), "period_s": self.period_s, "deterministic": self.deterministic}
        if self.remote is None:
            del out["remote"]
        return out

    def fingerprint(self, with_remote: bool = True) -> dict[str, Any] | None:
        """What a resumed run must share; None for today's protocol, so earlier run folders still resume.

        ``prefix_mode`` and ``soft_masking`` only where they apply (rtc), ``deadline_ms``,
        ``extend_plan`` and ``remote`` only where set, so earlier run folders resume too. ``remote``
        is fingerprinted by its kind (:attr:`remote_kind`), not its address: a server restarted on
        another port serves the same run. ``with_remote=False``: the baseline's part, which runs in
        process either way.
        """
        if self.batched:
            return None
        out = {k: v for k, v in asdict(self).items()
               if (v is not None and v is not False) or k not in ("prefix_mode", "soft_masking", "deadline_ms",
                                                                  "extend_plan", "remote")}
        if "remote" in out:
            out["remote"] = self.remote_kind
        if not with_remote:
            out.pop("remote", None)
        return out

    def label(self, served: bool = True) -> str:
        """Short name for progress bars and tables: ``sync``, ``rtc d=2``, ``rtc wall 10 Hz``,
        ``rtc d=2 remote=local`` (``served=False``: without ``remote``, for the baseline, which runs in process)."""
        suffix = "" if self.remote is None or not served else f" remote={self.remote}"
        if self.clock == "wall":
            delay = "" if self.mode == "sync" else (" d measured" if self.delay_steps is None
                                                    else f" d={self.delay_steps}")
            deadline = "" if self.deadline_ms is None else f" deadline {self.deadline_ms:g} ms"
            return f"{self.mode}{self._prefix_label()} wall {self.control_hz:g} Hz{delay}{deadline}{suffix}"
        steps = self.mode if self.mode == "sync" else f"{self.mode}{self._prefix_label()} d={self.delay_steps}"
        return steps + suffix

    def _prefix_label(self) -> str:
        """Where it is not the default: `` hard`` (no soft masking), `` noised``, `` extend`` (extend_plan)."""
        return ((" hard" if self.soft_masking is False else "") + (" noised" if self.prefix_mode == "noised" else "")
                + (" extend" if self.extend_plan else ""))

    def check_sampler(self, spec: SamplerConfig) -> None:
        """Refuse a deadline for a candidate that cannot stop early (before anything is loaded)."""
        with _controller_errors():
            self.controller_config().check_sampler(spec)

    def check_policy(self, n_action_steps: int) -> None:
        """Refuse a delay the policy's chunks cannot absorb (before any env is stepped)."""
        with _controller_errors():
            self.controller_config().check_policy(n_action_steps)


def _control_hz(hz: Any, clock: Any, task: TaskSettings | None) -> float | None:
    """``controller.control_hz``, the evaluator's own key: the wall clock's rate (null: the task's ``fps``)."""
    if hz is None:
        return (float(task.fps) if task is not None else 10.0) if clock == "wall" else None
    if clock != "wall":
        raise EvalConfigError(f"controller.control_hz={hz} applies to controller.clock=wall only; the steps clock "
                              "simulates the latency as controller.delay_steps control steps")
    if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not math.isfinite(hz) or hz <= 0:
        raise EvalConfigError(f"controller.control_hz must be a number > 0 (control steps per second), got {hz!r}")
    return float(hz)


def controller_settings(cfg: DictConfig, task: TaskSettings | None = None) -> ControllerSettings:
    """Read ``cfg.controller`` (absent: today's sync protocol), checked by the Controller's checks; errors name the key.

    The evaluator's defaults: ``delay_steps: null`` is 0 in sync and on the steps clock, and
    "measured" on the wall clock; ``control_hz: null`` on the wall clock is the task's ``fps``;
    ``prefix_mode`` / ``soft_masking: null`` are rtc's clean / true; ``extend_plan: null`` is
    false; ``remote: null`` runs in process. The delay is checked against the policy's
    ``n_action_steps`` later (:meth:`ControllerSettings.check_policy`).
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
    mode, clock = raw.get("mode") or "sync", raw.get("clock") or "steps"
    delay = raw.get("delay_steps")
    delay = None if delay is None else checked_int(delay, "controller.delay_steps", 0)
    if delay is None and (mode == "sync" or clock == "steps"):
        delay = 0
    prefix, soft, extend = raw.get("prefix_mode"), raw.get("soft_masking"), raw.get("extend_plan")
    if mode == "rtc":
        prefix, soft = prefix or "clean", True if soft is None else soft
    return ControllerSettings(mode, delay, clock, _control_hz(raw.get("control_hz"), clock, task), prefix, soft,
                              raw.get("deadline_ms"), False if extend is None else extend, raw.get("remote"))


def resolve_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """``path`` made absolute against ``base`` (the directory the user launched from), ``~`` expanded."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    return p


#: what :func:`file_fingerprint` values start with; a run folder's fingerprint without it is from before
FINGERPRINT_PREFIX = "sha256:"
_BLOCK = 1 << 20  # bytes read at a time: the whole file is hashed without holding it in memory


def _hash_file(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)


def file_fingerprint(path: Path) -> str:
    """Identity of a checkpoint: the SHA-256 of every byte of it, ``sha256:<hex>``.

    Every byte because a run resumed (``resume_dir``) or a score reused (``eval/bench_latency.py``)
    on a checkpoint that differs anywhere mixes two policies' episodes: the earlier fingerprint
    (size and first and last MiB) took a checkpoint changed in the middle for the same one. A
    checkpoint directory (LeRobot's) hashes the files its reader reads, the top-level ones, in
    sorted order with their names and sizes, so a renamed or moved file changes it too.
    """
    h = hashlib.sha256()
    if not path.is_dir():
        _hash_file(path, h)
        return FINGERPRINT_PREFIX + h.hexdigest()
    h.update(b"para_policy checkpoint directory\0")
    for p in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        _hash_file(p, h)
    return FINGERPRINT_PREFIX + "dir:" + h.hexdigest()


def spec_dict(spec: SamplerConfig) -> dict[str, Any]:
    """JSON form of a sampler configuration."""
    return spec.as_dict()
