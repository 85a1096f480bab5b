"""What a process needs to roll out an evaluation's episodes: the checked policy, the checked env, the loop.

Why a module of its own: the evaluator (:mod:`.runner`) and its Ray workers (:mod:`.cluster`) run
the very same steps, so both import them from here; neither imports the other (the runner hands
episodes to the workers, the workers never call back into the runner).

* :func:`load_checked_policy` loads a checkpoint and refuses one made for another observation or
  action size, before any env is stepped.
* :func:`check_env` checks that the task's env gives the observation the task (and so the policy) says.
* :func:`roll_out_seeds` runs seeds with one sampler under the controller settings: the batched loop
  (:func:`~.rollout.run_rollouts`) in ``sync`` on the steps clock, else one Controller per env
  (:func:`~.realtime.run_controller_rollouts`), or a RemoteController on a policy server
  (``controller.remote``, the candidate only).
* :func:`read_progress` reads a run folder's ``progress.json`` (its finished episode records) and
  refuses one that is cut short, mistyped or holds an episode twice, naming the file and the fault.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from para_policy.evaluation.config import (
    FLAT_KEY,
    ControllerSettings,
    EvalConfigError,
    TaskSettings,
    format_shapes,
    observation_mismatch,
)
from para_policy.evaluation.realtime import RemoteEndpoint, run_controller_rollouts
from para_policy.evaluation.rollout import make_task_env, run_rollouts
from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig


def load_checked_policy(path: Path, task: TaskSettings, device: str, trust_pickle: bool = False) -> LowdimPolicy:
    """Load the checkpoint and refuse one made for another observation or action size."""
    from para_policy.loading import describe_formats, load_policy, reader_for

    try:  # the checkpoint readers say what a path is (para_policy/loading.py)
        reader_for(path)
    except FileNotFoundError:
        raise EvalConfigError(
            f"checkpoint not found: {path}. Pass checkpoint=<path to {describe_formats()}> "
            f"(train one with `python train.py task={task.name}`)") from None
    except ValueError as e:
        raise EvalConfigError(f"cannot load checkpoint {path}: {e}") from None
    try:  # eager until the run's inference settings are applied (runner._configure_inference), under its threads
        policy = load_policy(path, device=device, trust_pickle=trust_pickle, backend="eager")
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise EvalConfigError(f"cannot load checkpoint {path}: {e}") from None
    wanted = policy.observation_shapes()
    flat_policy = set(wanted) == {FLAT_KEY}
    if task.obs_shapes is None and flat_policy:  # low-dim policy, low-dim task
        if policy.obs_dim != task.obs_dim or policy.action_dim != task.action_dim:
            raise EvalConfigError(
                f"checkpoint {path.name} has obs_dim={policy.obs_dim}, action_dim={policy.action_dim} but task "
                f"{task.name!r} has obs_dim={task.obs_dim}, action_dim={task.action_dim}: a policy for another task "
                "or observation type")
        return policy
    given = task.observation_shapes
    if flat_policy:
        raise EvalConfigError(
            f"checkpoint {path.name} is a low-dim policy (observation {FLAT_KEY!r} of shape {wanted[FLAT_KEY]}) but "
            f"task {task.name!r} gives dict observations ({format_shapes(given)}): pass an image policy checkpoint, "
            "or evaluate this one on a low-dim task (task=pusht)")
    if task.obs_shapes is None:
        raise EvalConfigError(
            f"checkpoint {path.name} is an image policy observing {format_shapes(wanted)} but task {task.name!r} "
            f"gives flat observations of shape {given[FLAT_KEY]} (obs_type={task.obs_type}): evaluate it on an image "
            "task (task=pusht_image)")
    problem = observation_mismatch(wanted, given)
    if problem is not None:
        raise EvalConfigError(f"checkpoint {path.name} does not fit task {task.name!r}'s observation: {problem}")
    if policy.action_dim != task.action_dim:
        raise EvalConfigError(f"checkpoint {path.name} has action_dim={policy.action_dim} but task {task.name!r} has "
                              f"action_dim={task.action_dim}: a policy for another task")
    return policy


def env_observation_shapes(env: Any) -> dict[str, tuple[int, ...]]:
    """The observation keys and shapes an env declares: ``{key: shape}`` (a Dict space) or ``{'obs': shape}``."""
    space = env.observation_space
    sub = getattr(space, "spaces", None)
    if isinstance(sub, dict):
        return {str(k): tuple(v.shape or ()) for k, v in sub.items()}
    return {FLAT_KEY: tuple(space.shape or ())}


def check_env(task: TaskSettings) -> None:
    """The env's observation must be what the task (and so the policy) says.

    A task whose optional dependencies are missing (Lift without the ``[lift]`` extra) stops
    here with the install hint.
    """
    from para_policy.tasks.lift import MissingExtraError

    try:
        env = make_task_env(task)
    except MissingExtraError as e:
        raise EvalConfigError(str(e)) from e
    try:
        shapes = env_observation_shapes(env)
    finally:
        env.close()
    if task.obs_shapes is None:
        shape = shapes.get(FLAT_KEY)
        if shape != (task.obs_dim,):
            raise EvalConfigError(f"env {task.env_id} (obs_type={task.obs_type}) gives observations of shape "
                                  f"{shape if shape is not None else format_shapes(shapes)}, but task.obs_dim is "
                                  f"{task.obs_dim}")
        return
    # the task's shapes are what the policy was checked against (load_checked_policy): the env must give them
    problem = observation_mismatch(task.obs_shapes, shapes)
    if problem is not None:
        raise EvalConfigError(f"env {task.env_id} (obs_type={task.obs_type}) does not give task.obs_shapes: {problem}")


def roll_out_seeds(policy: LowdimPolicy, spec: SamplerConfig, task: TaskSettings, seeds: list[int],
                   ctl: ControllerSettings, opts: dict[str, Any], *, role: str,
                   on_episode: Callable[[dict[str, Any]], None], video_seed: int | None,
                   remote: RemoteEndpoint | None = None) -> list[np.ndarray] | None:
    """Run ``seeds`` with ``spec`` under the controller settings; return the video frames (or None).

    ``sync`` on the steps clock is the batched loop, exactly as before the controller modes
    existed; the others run one Controller per env (:func:`run_controller_rollouts`), with
    the batched loop's noise per (episode, chunk). ``opts`` are the runner's checked settings
    (``seed``, ``num_envs``, ``video_size``, ``progress``); ``role`` (``'candidate'`` or
    ``'baseline'``) names the progress bar, and the candidate records its chunk observations.
    ``remote``: the policy server that samples these episodes' chunks (``controller.remote``; the
    runner gives it to the candidate only), through the same Controller loop.
    """
    common = dict(noise_seed=opts["seed"], video_seed=video_seed, video_size=opts["video_size"],
                  record_obs=(role == "candidate"), on_episode=on_episode, progress=opts["progress"])
    if ctl.batched and remote is None:
        _, frames = run_rollouts(policy, spec, task, seeds, num_envs=opts["num_envs"], desc=f"{role} ({spec.name})",
                                 **common)
    else:
        _, frames = run_controller_rollouts(policy, spec, task, seeds, ctl, desc=f"{role} ({spec.name}, "
                                            f"{ctl.label(served=remote is not None)})", remote=remote, **common)
    return frames


#: the roles a run folder's episodes are saved under (the runner's ``specs`` keys)
ROLES = ("candidate", "baseline")
#: fields of a finished episode record the report reads, with the JSON types they must have
_FINISHED_FIELDS: dict[str, tuple[type, ...]] = {"max_reward": (int, float), "length": (int,), "n_chunks": (int,)}
#: optional fields and their JSON types
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "success": (bool,), "rounds_per_chunk": (list,), "wall_time_s": (int, float), "chunk_obs": (list,),
    "chunk_guess": (list,), "chunk_obs_file": (str,), "traceback": (str,)}


def _typed(value: Any, types: tuple[type, ...]) -> bool:
    """Whether ``value`` is one of ``types``: a JSON bool is no number, a number must be finite."""
    if isinstance(value, bool) and bool not in types:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, types)


def _episode_fault(rec: Any) -> str | None:
    """What is wrong with one saved episode record, or None."""
    if not isinstance(rec, dict):
        return f"is {type(rec).__name__}, not an object"
    if "seed" not in rec or not _typed(rec["seed"], (int,)):
        return f"has seed {rec.get('seed')!r}, not an integer"
    if rec.get("error") is not None and not isinstance(rec["error"], str):
        return f"has error {rec['error']!r}, neither null nor text"
    required = _FINISHED_FIELDS if rec.get("error") is None else {}
    for key, types in [*required.items(), *_OPTIONAL_FIELDS.items()]:
        if (key in rec or key in required) and not _typed(rec.get(key), types):
            return f"has {key} {rec.get(key)!r}, not {' or '.join(t.__name__ for t in types)}"
    rel = rec.get("chunk_obs_file")
    if rel is not None and (PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts):
        return f"has chunk_obs_file {rel!r}, outside the run folder"
    return None


def _episodes_fault(episodes: Any) -> str | None:
    """What is wrong with ``progress.json``'s ``episodes`` (``{role: [record, ...]}``), or None."""
    if not isinstance(episodes, dict):
        return f"'episodes' is {type(episodes).__name__}, not an object of {list(ROLES)}"
    for role, records in episodes.items():
        if role not in ROLES:
            return f"'episodes' has role {role!r}; known: {list(ROLES)}"
        if not isinstance(records, list):
            return f"episodes[{role!r}] is {type(records).__name__}, not a list"
        seen: set[int] = set()
        for i, rec in enumerate(records):
            fault = _episode_fault(rec)
            if fault is not None:
                return f"episodes[{role!r}][{i}] {fault}"
            if rec["seed"] in seen:  # summed twice into the score if kept
                return f"episodes[{role!r}] holds seed {rec['seed']} twice"
            seen.add(rec["seed"])
    return None


def read_progress(path: Path) -> dict[str, Any]:
    """A run folder's ``progress.json``, checked; :class:`EvalConfigError` naming ``path`` and the fault.

    Checked before it is trusted because a resumed run keeps these episodes as its own: a
    duplicated episode would count twice in the scores, and a file cut short by a full disk or
    edited by hand used to stop the run with a raw ``JSONDecodeError`` or ``KeyError``. The
    ``fingerprint`` is only checked to be an object here; the runner compares it with its own.
    """
    def refuse(problem: str) -> EvalConfigError:
        return EvalConfigError(f"cannot resume from {path}: {problem} (eval.py writes this file whole after every "
                               "episode: it was cut short or edited; resume from another run folder)")

    try:
        saved = json.loads(path.read_text())
    except OSError as e:
        raise refuse(f"it cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise refuse(f"it is not valid JSON{where}") from None
    if not isinstance(saved, dict):
        raise refuse(f"it holds a JSON {type(saved).__name__}, not an object with 'fingerprint' and 'episodes'")
    if not isinstance(saved.get("fingerprint"), dict):
        raise refuse("'fingerprint' is missing or not an object")
    fault = _episodes_fault(saved["episodes"]) if "episodes" in saved else "'episodes' is missing"
    if fault is not None:
        raise refuse(fault)
    if saved.get("window_tuning") is not None and not isinstance(saved["window_tuning"], dict):
        raise refuse(f"'window_tuning' is {type(saved['window_tuning']).__name__}, not an object")
    return saved
