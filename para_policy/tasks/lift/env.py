"""robosuite Panda Lift as a gymnasium env with DiffusionPolicy's 19-d low-dim observation.

What matches what (robosuite 1.4.1, mujoco 2.3.7; robomimic's ``EnvRobosuite`` and
DiffusionPolicy's ``RobomimicLowdimWrapper`` / ``RobomimicLowdimRunner`` were read for this):

* **Environment.** ``robosuite.make("Lift", robots=["Panda"], controller_configs=OSC_POSE,
  control_freq=20, reward_shaping=False, ignore_done=True, use_object_obs=True,
  use_camera_obs=False)``: the kwargs of robomimic's Lift datasets, with robomimic's overrides
  (no renderer, object observations, robosuite's own horizon ignored). Built from a dataset's
  ``env_args`` (:meth:`LiftEnv.from_env_args`) the same overrides apply.
* **Observation** (19,) float32, DiffusionPolicy's ``obs_keys`` concatenated in this order:
  ``object`` (10: cube position 3, cube quaternion xyzw 4, end effector minus cube 3; robosuite's
  ``object-state``, which robomimic renames ``object``), ``robot0_eef_pos`` (3),
  ``robot0_eef_quat`` (4, xyzw), ``robot0_gripper_qpos`` (2).
* **Action** (7,) in [-1, 1]: OSC_POSE deltas (position scaled to ±5 cm, axis-angle rotation to
  ±0.5 rad, in the world frame) and the gripper (-1 open, +1 close); DiffusionPolicy's Lift
  low-dim task uses these relative actions (``abs_action: false``). robosuite clips to [-1, 1].
* **Seeding.** ``reset(seed=s)`` does what DiffusionPolicy's wrapper does for test seed ``s``:
  ``np.random.seed(s)`` then robosuite's reset, which draws the cube's size, position and yaw and
  the arm's joint noise from numpy's global generator. The global generator's state is restored
  afterwards, so callers' numpy randomness is untouched. Same seed, same start state.
* **Reward** robosuite's sparse reward: 1.0 on steps where the cube is more than 4 cm above the
  table, else 0. ``info['is_success']`` is the same test.
* **Termination.** DiffusionPolicy runs every Lift episode for ``max_steps`` (400) and scores it
  by its max reward. Here the episode terminates at the first success (``terminate_on_success``):
  the max reward (1.0) is already reached then, so the score is the same and an evaluation takes
  a fraction of the env steps. Pass ``terminate_on_success=False`` for DiffusionPolicy's behaviour.
* **Observations are a function of the sim state.** robosuite's ``step`` returns positions
  computed before its last physics substep (``mj_step`` integrates after computing them: one
  substep stale); robomimic's datasets instead hold observations re-extracted from the stored states
  (``dataset_states_to_obs``: set state, ``forward``, observe). Here every step ends with
  ``mj_forward`` (which changes no state, so the physics is the same) and a fresh read of every
  observable, so the env, the generated demos and ``reset_to`` agree.
* **States.** :meth:`get_state` is ``sim.get_state().flatten()`` (what robomimic stores in
  ``states``) and :meth:`reset_to` is robomimic's ``reset_to``: optionally rebuild the model from
  its XML, set the flattened state, forward, observe.
* **Rendering.** ``render_mode="rgb_array"`` renders the ``agentview`` camera with
  ``mujoco.Renderer``, created on the first ``render()``. It needs an OpenGL backend (EGL or
  OSMesa, chosen by ``MUJOCO_GL``); on a machine without one ``render()`` raises, and the
  evaluator records no video.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import gymnasium
import numpy as np

from . import require

ENV_NAME = "Lift"
ENV_ID = "robosuite/Lift"
#: DiffusionPolicy's ``obs_keys`` for robomimic low-dim tasks, in concatenation order.
OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
OBS_DIM = 19
ACTION_DIM = 7
#: robomimic's ``EnvType.ROBOSUITE_TYPE``: the ``type`` field of ``env_args``.
ROBOSUITE_TYPE = 1
#: robomimic forces these whatever a dataset's ``env_kwargs`` say (see ``EnvRobosuite.__init__``).
FORCED_KWARGS = {
    "has_renderer": False,
    "has_offscreen_renderer": False,
    "ignore_done": True,
    "use_object_obs": True,
    "use_camera_obs": False,
    "camera_depths": False,
}


def default_env_kwargs() -> dict[str, Any]:
    """robosuite kwargs of robomimic's Lift datasets: Panda, OSC_POSE (robosuite's default config), 20 Hz."""
    controllers = require("robosuite.controllers")
    return {
        "robots": ["Panda"],
        "controller_configs": controllers.load_controller_config(default_controller="OSC_POSE"),
        "control_freq": 20,
        "reward_shaping": False,
        **FORCED_KWARGS,
    }


def make_env_args(env_kwargs: dict[str, Any] | None = None, env_name: str = ENV_NAME) -> dict[str, Any]:
    """robomimic's env metadata (``EnvRobosuite.serialize``) without building a sim.

    Returns:
        ``{'env_name', 'env_version' (robosuite's), 'type': 1, 'env_kwargs'}`` with
        :data:`FORCED_KWARGS` applied to ``env_kwargs`` (default :func:`default_env_kwargs`).
    """
    suite = require("robosuite")
    kwargs = copy.deepcopy(env_kwargs) if env_kwargs is not None else default_env_kwargs()
    kwargs.update(FORCED_KWARGS)
    return {"env_name": env_name, "env_version": suite.__version__, "type": ROBOSUITE_TYPE, "env_kwargs": kwargs}


def robomimic_observation(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    """robomimic's observation dict from robosuite's: ``object`` plus every ``robot0_*`` key.

    Args:
        raw: robosuite's observation dict (``object-state``, ``robot0_eef_pos``, ...).
    Returns:
        ``{'object': (10,), 'robot0_eef_pos': (3,), ...}`` float64 arrays, without the
        ``*proprio-state`` concatenations (robomimic leaves those out too).
    """
    out = {"object": np.asarray(raw["object-state"], dtype=np.float64)}
    for key, value in raw.items():
        if key.startswith("robot0_") and not key.endswith("proprio-state"):
            out[key] = np.asarray(value, dtype=np.float64)
    return out


def lowdim_vector(obs: dict[str, np.ndarray], obs_keys: tuple[str, ...] = OBS_KEYS) -> np.ndarray:
    """The policy's observation: ``obs_keys`` of a robomimic observation dict, concatenated.

    Args:
        obs: key -> (..., d_key) arrays (one step, or T steps as stored in a dataset).
    Returns:
        (..., sum d_key) float32; (19,) or (T, 19) for DiffusionPolicy's Lift keys.
    """
    return np.concatenate([np.asarray(obs[k]) for k in obs_keys], axis=-1).astype(np.float32)


class LiftEnv(gymnasium.Env):
    """robosuite Lift with a flat low-dim observation, robomimic state access and per-seed resets.

    Args:
        env_kwargs: robosuite kwargs (default :func:`default_env_kwargs`); :data:`FORCED_KWARGS`
            are applied on top, as robomimic does.
        env_name: robosuite env name (the observation keys are Lift's).
        obs_keys: keys of the robomimic observation dict concatenated into the observation.
        terminate_on_success: end the episode at the first success (see the module notes).
        render_mode: None or ``"rgb_array"``.
        render_size: (height, width) of rendered frames.
        camera_name: camera rendered by ``render()``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        env_kwargs: dict[str, Any] | None = None,
        env_name: str = ENV_NAME,
        obs_keys: tuple[str, ...] = OBS_KEYS,
        terminate_on_success: bool = True,
        render_mode: str | None = None,
        render_size: tuple[int, int] = (256, 256),
        camera_name: str = "agentview",
    ) -> None:
        suite = require("robosuite")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.metadata_args = make_env_args(env_kwargs, env_name)
        kwargs = self.metadata_args["env_kwargs"]
        self.env_name = env_name
        self.env_kwargs = kwargs
        self.obs_keys = tuple(obs_keys)
        self.terminate_on_success = bool(terminate_on_success)
        self.render_mode = render_mode
        self.render_size = (int(render_size[0]), int(render_size[1]))
        self.camera_name = camera_name
        self.env = suite.make(env_name, **copy.deepcopy(kwargs))
        # robomimic turns these on, so its datasets hold robot0_joint_pos and robot0_eef_vel_* too
        for name in self.env.observation_names:
            if "joint_pos" in name or "eef_vel" in name:
                self.env.modify_observable(observable_name=name, attribute="active", modifier=True)
        self._renderer = None
        self._renderer_model = None
        self._last_raw: dict[str, Any] | None = None
        low, high = self.env.action_spec
        self.action_space = gymnasium.spaces.Box(
            low=np.asarray(low, dtype=np.float32), high=np.asarray(high, dtype=np.float32), dtype=np.float32
        )
        dim = len(lowdim_vector(robomimic_observation(self.env._get_observations(force_update=True)), self.obs_keys))
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env_args(cls, env_args: dict[str, Any] | str, **kwargs: Any) -> LiftEnv:
        """The env a robomimic dataset was recorded in, from its ``data.attrs['env_args']`` (dict or JSON)."""
        if isinstance(env_args, str):
            env_args = json.loads(env_args)
        if int(env_args.get("type", ROBOSUITE_TYPE)) != ROBOSUITE_TYPE:
            raise ValueError(f"env_args type {env_args.get('type')} is not robosuite ({ROBOSUITE_TYPE})")
        return cls(env_kwargs=env_args["env_kwargs"], env_name=env_args["env_name"], **kwargs)

    def env_args(self) -> dict[str, Any]:
        """robomimic's env metadata of this env (see :func:`make_env_args`), for ``data.attrs['env_args']``."""
        return copy.deepcopy(self.metadata_args)

    # ------------------------------------------------------------------ observations and state
    def observation_dict(self) -> dict[str, np.ndarray]:
        """robomimic's observation dict of the current sim state (see :func:`robomimic_observation`)."""
        if self._last_raw is None:
            self._last_raw = self.env._get_observations(force_update=True)
        return robomimic_observation(self._last_raw)

    def _obs(self) -> np.ndarray:
        return lowdim_vector(self.observation_dict(), self.obs_keys)

    def get_state(self) -> np.ndarray:
        """(S,) float64 flattened MuJoCo state ``[time, qpos, qvel]`` (robomimic's ``states`` row)."""
        return np.array(self.env.sim.get_state().flatten())

    def model_xml(self) -> str:
        """The MuJoCo model XML of the current episode (robomimic's ``model_file`` demo attribute)."""
        return self.env.sim.model.get_xml()

    def is_success(self) -> bool:
        """The cube is more than 4 cm above the table (robosuite's ``_check_success``)."""
        return bool(self.env._check_success())

    def reset_to(self, state: np.ndarray, model_xml: str | None = None) -> np.ndarray:
        """Put the sim in a stored state (robomimic's ``reset_to``) and return the observation there.

        Args:
            state: (S,) flattened state, a row of a demo's ``states``.
            model_xml: the demo's ``model_file``; the model is rebuilt from it first (needed when the
                episode's cube size differs from the current one).
        Returns:
            (obs_dim,) float32 observation.
        """
        if model_xml is not None:
            self.env.reset_from_xml_string(self.env.edit_model_xml(model_xml))
            self.env.sim.reset()
        self.env.sim.set_state_from_flattened(np.asarray(state, dtype=np.float64))
        self.env.sim.forward()
        self._last_raw = None
        return self._obs()

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode; ``seed`` picks the start state exactly as DiffusionPolicy's test seeds do.

        Returns:
            (obs (obs_dim,) float32, info ``{'seed': the numpy seed used}``).
        """
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(0, 2**32 - 1))
        saved = np.random.get_state()
        try:
            np.random.seed(seed)
            self._last_raw = self.env.reset()
        finally:
            np.random.set_state(saved)
        return self._obs(), {"seed": int(seed)}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply one OSC_POSE action (7,); returns (obs (obs_dim,), reward, terminated, truncated, info)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"Lift takes actions of shape ({ACTION_DIM},), got {action.shape}")
        _, reward, _, info = self.env.step(action)
        # observe the state the step ended in (see the module notes); mj_forward changes no state
        self.env.sim.forward()
        self._last_raw = None
        success = self.is_success()
        info = {**info, "is_success": success}
        return self._obs(), float(reward), bool(success and self.terminate_on_success), False, info

    def render(self) -> np.ndarray:
        """(H, W, 3) uint8 frame of ``camera_name`` (``render_mode='rgb_array'``; needs EGL or OSMesa)."""
        if self.render_mode != "rgb_array":
            raise RuntimeError("LiftEnv was made without render_mode='rgb_array'")
        model = self.env.sim.model._model  # a new object after every hard reset (robosuite rebuilds the sim)
        if self._renderer is None or self._renderer_model is not model:
            mujoco = require("mujoco")
            self.close_renderer()
            height, width = self.render_size
            self._renderer = mujoco.Renderer(model, height=height, width=width)
            self._renderer_model = model
        self._renderer.update_scene(self.env.sim.data._data, camera=self.camera_name)
        return np.asarray(self._renderer.render(), dtype=np.uint8)

    def close_renderer(self) -> None:
        """Free the offscreen renderer (a new one is made by the next ``render()``)."""
        if self._renderer is not None:
            close = getattr(self._renderer, "close", None)
            if close is not None:
                close()
        self._renderer = None
        self._renderer_model = None

    def close(self) -> None:
        self.close_renderer()
        self.env.close()


def make_env(
    max_episode_steps: int | None = 400,
    render_mode: str | None = None,
    render_size: int = 256,
    terminate_on_success: bool = True,
    env_args: dict[str, Any] | str | None = None,
) -> gymnasium.Env:
    """A :class:`LiftEnv` (from a dataset's ``env_args`` if given) in a gymnasium ``TimeLimit``.

    ``max_episode_steps`` defaults to DiffusionPolicy's Lift evaluation length (400); None = no limit.
    """
    kwargs: dict[str, Any] = {
        "render_mode": render_mode,
        "render_size": (render_size, render_size),
        "terminate_on_success": terminate_on_success,
    }
    env = LiftEnv.from_env_args(env_args, **kwargs) if env_args is not None else LiftEnv(**kwargs)
    if max_episode_steps is not None:
        env = gymnasium.wrappers.TimeLimit(env, max_episode_steps=int(max_episode_steps))
    return env
