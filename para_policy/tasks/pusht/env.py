"""PushT observation adapter: gym-pusht state -> DiffusionPolicy's 20-d keypoint observation.

gym-pusht (0.1.8) returns the raw state ``[agent_x, agent_y, block_x, block_y, block_angle]``.
DiffusionPolicy's low-dim PushT policy instead observes 9 keypoints on the T-block (18 numbers)
followed by the agent position (2 numbers).  This module converts between the two, wraps the
env so it emits the 20-d observation, and provides ``set_state`` to put the env in an exact pose
(gym-pusht's own ``reset_to_state`` sets the position before the angle, and the angle turns about
the block's centre of gravity, so the pose you get is not the pose you asked for).

Geometry (checked against ``gym_pusht/envs/pusht.py``): the T is two boxes in the block's local
frame, the bar ``x in [-60, 60], y in [0, 30]`` and the stem ``x in [-15, 15], y in [30, 120]``;
a local point ``v`` is at ``position + R(angle) v`` in the world (``body.position`` is the local
origin, not the centre of gravity).  The keypoints below are DiffusionPolicy's; most lie inside
the T, four lie within 1.8 px outside its outline (e.g. ``(-60.98, -1.19)``), as in the original.

``make_env(obs_type="pixels_agent_pos")`` gives DiffusionPolicy's image observation instead
(:class:`PushTImageObs`, ``PushTImageEnv``'s ``{'image', 'agent_pos'}``).
"""

from __future__ import annotations

from typing import Any

import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
import gymnasium
import numpy as np

ENV_ID = "gym_pusht/PushT-v0"
KEYPOINT_ENV_ID = "para_policy/PushTKeypoints-v0"
#: gym-pusht's ``obs_type`` of the image observation (rendered frame + agent position)
PIXELS_OBS_TYPE = "pixels_agent_pos"
#: DiffusionPolicy's PushT image size (``PushTImageEnv(render_size=96)``)
IMAGE_SIZE = 96
#: the arena's size in pixels (DiffusionPolicy's ``window_size``): agent positions lie in [0, 512]
ARENA_SIZE = 512.0

#: (9, 2) DiffusionPolicy's block keypoints in the block's local frame (pixels).
KEYPOINTS_LOCAL = np.array(
    [
        [9.2698, 90.0410],
        [-60.9835, -1.1867],
        [60.9128, -1.3934],
        [-0.2705, 25.5436],
        [-14.0649, 122.8159],
        [39.0027, 32.8574],
        [-39.9664, 32.7297],
        [-16.8243, 62.8632],
        [23.5415, -1.7003],
    ],
    dtype=np.float64,
)

#: Goal pose of the block (x, y, angle), as in gym-pusht.
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])

#: The T's two boxes in the local frame: (xmin, xmax, ymin, ymax).
T_BOXES = ((-60.0, 60.0, 0.0, 30.0), (-15.0, 15.0, 30.0, 120.0))

#: Block centre of gravity in the local frame (mean of the two boxes' centroids, as gym-pusht sets it).
BLOCK_COG_LOCAL = np.array([0.0, (15.0 + 75.0) / 2.0])


def block_keypoints(state: np.ndarray) -> np.ndarray:
    """Keypoints of the block in world coordinates.

    Args:
        state: (..., 5) ``[agent_x, agent_y, block_x, block_y, block_angle]``.
    Returns:
        (..., 9, 2) ``position + R(angle) @ KEYPOINTS_LOCAL``.
    """
    state = np.asarray(state, dtype=np.float64)
    ang = state[..., 4]
    c, s = np.cos(ang)[..., None], np.sin(ang)[..., None]
    lx, ly = KEYPOINTS_LOCAL[:, 0], KEYPOINTS_LOCAL[:, 1]
    x = c * lx - s * ly + state[..., 2:3]
    y = s * lx + c * ly + state[..., 3:4]
    return np.stack([x, y], axis=-1)


def keypoint_obs(state: np.ndarray) -> np.ndarray:
    """DiffusionPolicy's low-dim PushT observation.

    Args:
        state: (..., 5) raw gym-pusht state.
    Returns:
        (..., 20): the 9 keypoints flattened as ``x0, y0, x1, y1, ...`` (18) then ``agent_x, agent_y``.
    """
    state = np.asarray(state, dtype=np.float64)
    kp = block_keypoints(state)
    flat = kp.reshape(*kp.shape[:-2], 18)
    return np.concatenate([flat, state[..., 0:2]], axis=-1)


def points_in_t(points_local: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """Whether local-frame points (..., 2) lie in the T (boxes grown by ``tol`` px). Returns (...,) bool."""
    p = np.asarray(points_local, dtype=np.float64)
    inside = np.zeros(p.shape[:-1], dtype=bool)
    for x0, x1, y0, y1 in T_BOXES:
        inside |= (
            (p[..., 0] >= x0 - tol)
            & (p[..., 0] <= x1 + tol)
            & (p[..., 1] >= y0 - tol)
            & (p[..., 1] <= y1 + tol)
        )
    return inside


class PushTKeypointObs(gymnasium.ObservationWrapper):
    """Wraps a ``obs_type="state"`` gym-pusht env to emit the 20-d keypoint observation (float32).

    ``info`` is passed through unchanged: gym-pusht 0.1.8 puts ``is_success`` (False) in the reset
    info and ``is_success`` / ``coverage`` (plus ``pos_agent``, ``vel_agent``, ``block_pose``,
    ``goal_pose``, ``n_contacts``) in every step info.  The raw 5-d state is also exposed as
    ``self.last_state``.
    """

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self.observation_space = gymnasium.spaces.Box(low=-np.inf, high=np.inf, shape=(20,), dtype=np.float32)
        self.last_state: np.ndarray | None = None

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self.last_state = np.asarray(observation, dtype=np.float64)
        return keypoint_obs(self.last_state).astype(np.float32)


class PushTImageObs(gymnasium.ObservationWrapper):
    """Wraps a ``obs_type="pixels_agent_pos"`` gym-pusht env to emit DiffusionPolicy's ``PushTImageEnv`` observation.

    ``{'image': float32 (3, H, W) in [0, 1], 'agent_pos': float32 (2,)}``: the frame channels
    first and divided by 255 (``np.moveaxis(img.astype(np.float32) / 255, -1, 0)``, as DP's
    ``_get_obs`` computes it), the agent position in arena pixels.

    The frame is the same picture DP renders: gym-pusht 0.1.8 draws the same scene (white
    512 px canvas, light-green goal T, ``pymunk_override.DrawOptions`` with the same colours)
    and shrinks it with the same ``cv2.resize`` (bilinear), without the action marker, as
    ``PushTImageEnv`` (``render_action=False``) does for its observation. ``agent_pos`` is
    float32, as DP's policies receive it (its env returns pymunk's float64 position, and its
    ``AsyncVectorEnv`` stores it in the float32 buffers of its observation space). Where it
    differs from DP: the start state of a seed is gym-pusht's (``np_random``), not DP's
    ``RandomState`` draw, as for the keypoint observation. ``render()`` still gives
    gym-pusht's visualisation frame (larger, with the action marker) for videos.
    """

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        u = env.unwrapped
        if getattr(u, "obs_type", None) != PIXELS_OBS_TYPE:
            raise ValueError(f"PushTImageObs wraps a gym-pusht env made with obs_type={PIXELS_OBS_TYPE!r}, "
                             f"got obs_type={getattr(u, 'obs_type', None)!r}")
        height, width = int(u.observation_height), int(u.observation_width)
        self.observation_space = gymnasium.spaces.Dict({
            "image": gymnasium.spaces.Box(low=0.0, high=1.0, shape=(3, height, width), dtype=np.float32),
            "agent_pos": gymnasium.spaces.Box(low=0.0, high=ARENA_SIZE, shape=(2,), dtype=np.float32),
        })

    def observation(self, observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = np.asarray(observation["pixels"])  # (H, W, 3) uint8
        image = np.ascontiguousarray(np.moveaxis(pixels.astype(np.float32) / 255, -1, 0))
        return {"image": image, "agent_pos": np.asarray(observation["agent_pos"], dtype=np.float32)}


def make_env(render_mode: str | None = None, keypoints: bool = True, **kw: Any) -> gymnasium.Env:
    """Make a PushT env (300-step TimeLimit from gym-pusht's registration).

    Args:
        render_mode: passed to gym-pusht (``"rgb_array"`` for videos / image observations).
        keypoints: with ``obs_type="state"`` (the default): wrap with :class:`PushTKeypointObs`
            (20-d obs) if True, else raw 5-d state.
        **kw: forwarded to ``gymnasium.make`` (e.g. ``max_episode_steps``). ``obs_type=
            "pixels_agent_pos"`` gives DiffusionPolicy's image observation (:class:`PushTImageObs`,
            ``observation_width`` / ``observation_height`` default 96); it renders every step, so
            it always runs with ``render_mode="rgb_array"``.
    """
    obs_type = kw.setdefault("obs_type", "state")
    if obs_type == PIXELS_OBS_TYPE:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"obs_type={PIXELS_OBS_TYPE!r} renders its observations off-screen: render_mode must "
                             f"be 'rgb_array' (or None), got {render_mode!r}")
        kw.setdefault("observation_width", IMAGE_SIZE)
        kw.setdefault("observation_height", IMAGE_SIZE)
        return PushTImageObs(gymnasium.make(ENV_ID, render_mode="rgb_array", **kw))
    env = gymnasium.make(ENV_ID, render_mode=render_mode, **kw)
    return PushTKeypointObs(env) if keypoints and obs_type == "state" else env


def _make_keypoint_env(**kw: Any) -> gymnasium.Env:
    return make_env(**kw)


if KEYPOINT_ENV_ID not in gymnasium.registry:
    gymnasium.register(id=KEYPOINT_ENV_ID, entry_point=f"{__name__}:_make_keypoint_env")


def _block_cog_local(env: gymnasium.Env) -> np.ndarray:
    cog = getattr(env.unwrapped, "block_cog", None)
    return BLOCK_COG_LOCAL.copy() if cog is None else np.asarray(cog, dtype=np.float64)


def set_state(env: gymnasium.Env, state5: np.ndarray, seed: int | None = None) -> tuple[np.ndarray, dict]:
    """Reset ``env`` to exactly ``state5 = [agent_x, agent_y, block_x, block_y, block_angle]``.

    gym-pusht's ``reset(options={"reset_to_state": s})`` sets the block position first and the angle
    second, and pymunk turns the body about its centre of gravity ``c`` (local (0, 45)), so the block
    origin ends at ``p + c - R(a) c``.  We pass ``p' = p - c + R(a) c`` so it lands at ``p``.

    Returns:
        ``(obs, info)`` from the reset (obs in the env's own observation format).
    """
    s = np.asarray(state5, dtype=np.float64).copy()
    c = _block_cog_local(env)
    a = s[4]
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    s[2:4] = s[2:4] - c + rot @ c
    return env.reset(seed=seed, options={"reset_to_state": s.tolist()})


def get_state(env: gymnasium.Env) -> np.ndarray:
    """Raw (5,) state of the env's block and agent (angle not wrapped), float64."""
    u = env.unwrapped
    return np.array([*u.agent.position, *u.block.position, u.block.angle], dtype=np.float64)


def keypoint_error(state: np.ndarray, goal: np.ndarray = GOAL_POSE) -> np.ndarray:
    """Mean distance (px) between the block's keypoints and the goal's. state (..., 5) -> (...,)."""
    goal_state = np.array([0.0, 0.0, goal[0], goal[1], goal[2]])
    return np.linalg.norm(block_keypoints(state) - block_keypoints(goal_state), axis=-1).mean(-1)
