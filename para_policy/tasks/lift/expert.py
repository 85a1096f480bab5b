"""Scripted Lift expert: hover above the cube, descend, close the gripper, lift.

A four-phase proportional controller on the robomimic observation dict (cube pose, end-effector
pose). Actions are OSC_POSE deltas in [-1, 1] (position: 1 = 5 cm, rotation: 1 = 0.5 rad), so a
proportional step is ``error / scale * gain``, clipped.

* ``approach``: gripper open, end effector to ``hover`` above the cube, turned about the vertical
  by the smallest angle that lines the fingers up with the cube's faces (the cube is square in
  plan, so that angle is within ±45°; its diagonal would not fit the open gripper as comfortably).
* ``descend``: down to the cube's centre height, still tracking the cube in the plane.
* ``grasp``: hold position and close the gripper for ``close_steps`` steps.
* ``lift``: gripper closed, straight up to ``lift`` above the grasp height; the env's success
  (cube 4 cm above the table) ends the episode long before that height.

The orientation target is fixed at the first step; each step corrects the remaining rotation
(world frame, as OSC applies rotation deltas). Optional Gaussian ``noise`` on the position command,
drawn from the expert's own generator, varies the demonstrations (default off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .env import LiftEnv, make_env

POS_SCALE = 0.05  # metres per unit action (OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per unit action


def quat_to_matrix(quat: np.ndarray) -> np.ndarray:
    """(3, 3) rotation matrix of a unit quaternion (4,) in robosuite's ``x, y, z, w`` order."""
    x, y, z, w = np.asarray(quat, dtype=np.float64) / np.linalg.norm(quat)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_vector(matrix: np.ndarray) -> np.ndarray:
    """(3,) axis-angle vector (axis × angle, angle in [0, π]) of a (3, 3) rotation matrix."""
    cos = np.clip((np.trace(matrix) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-9:
        return np.zeros(3)
    axis = np.array([matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0], matrix[1, 0] - matrix[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-9:  # angle ≈ π: the axis is the eigenvector of eigenvalue 1
        w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
        axis = v[:, int(np.argmax(w))]
        norm = 1.0
    return axis / norm * angle


def rot_z(angle: float) -> np.ndarray:
    """(3, 3) rotation about the world's vertical axis."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_to_align(eef_matrix: np.ndarray, cube_matrix: np.ndarray) -> float:
    """Smallest turn about the vertical (radians, in [-π/4, π/4]) that lines the gripper up with the cube's faces."""
    gripper_yaw = math.atan2(eef_matrix[1, 0], eef_matrix[0, 0])
    cube_yaw = math.atan2(cube_matrix[1, 0], cube_matrix[0, 0])
    quarter = math.pi / 2
    return (cube_yaw - gripper_yaw + quarter / 2) % quarter - quarter / 2


@dataclass
class LiftExpert:
    """The scripted policy; call :meth:`act` once per step with the robomimic observation dict.

    Args:
        hover: height above the cube centre to line up at (m).
        grasp_offset: end-effector height relative to the cube centre when closing (m).
        lift: height to lift to above the grasp height (m).
        close_steps: steps spent closing the gripper.
        gain: proportional gain on position and rotation errors.
        xy_tol, z_tol, rot_tol: phase switch tolerances (m, m, rad).
        noise: std of Gaussian noise added to the position command (action units).
        seed: seed of the noise generator.
    """

    hover: float = 0.06
    grasp_offset: float = -0.005
    lift: float = 0.15
    close_steps: int = 10
    gain: float = 0.8
    xy_tol: float = 0.005
    z_tol: float = 0.01
    rot_tol: float = 0.06
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.reset()

    def reset(self) -> None:
        """Forget the episode (phase, orientation target, grasp point)."""
        self.phase = "approach"
        self.target_rot: np.ndarray | None = None
        self.grasp_pos: np.ndarray | None = None
        self.closed_for = 0

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """(7,) float64 action in [-1, 1] for the robomimic observation dict ``obs``."""
        cube = np.asarray(obs["object"][:3], dtype=np.float64)
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        eef_rot = quat_to_matrix(obs["robot0_eef_quat"])
        if self.target_rot is None:
            yaw = yaw_to_align(eef_rot, quat_to_matrix(obs["object"][3:7]))
            self.target_rot = rot_z(yaw) @ eef_rot
        rot_err = rotation_vector(self.target_rot @ eef_rot.T)
        gripper = -1.0

        if self.phase == "approach":
            target = cube + np.array([0.0, 0.0, self.hover])
            err = target - eef
            if np.linalg.norm(err[:2]) < self.xy_tol and abs(err[2]) < self.z_tol \
                    and np.linalg.norm(rot_err) < self.rot_tol:
                self.phase = "descend"
        if self.phase == "descend":
            target = cube + np.array([0.0, 0.0, self.grasp_offset])
            if abs(target[2] - eef[2]) < self.z_tol / 2 and np.linalg.norm(target[:2] - eef[:2]) < 2 * self.xy_tol:
                self.phase = "grasp"
                self.grasp_pos = eef.copy()
        if self.phase == "grasp":
            target = self.grasp_pos
            gripper = 1.0
            self.closed_for += 1
            if self.closed_for >= self.close_steps:
                self.phase = "lift"
        if self.phase == "lift":
            target = self.grasp_pos + np.array([0.0, 0.0, self.lift])
            gripper = 1.0

        pos_cmd = (target - eef) / POS_SCALE * self.gain
        if self.noise > 0:
            pos_cmd = pos_cmd + self.rng.normal(0.0, self.noise, size=3)
        rot_cmd = rot_err / ROT_SCALE * self.gain
        action = np.concatenate([np.clip(pos_cmd, -1, 1), np.clip(rot_cmd, -1, 1), [gripper]])
        return action


def run_expert_episode(
    seed: int,
    max_steps: int = 400,
    env: LiftEnv | None = None,
    expert_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the expert from the start state of ``env.reset(seed=seed)`` until success or ``max_steps``.

    Records robomimic's pairing: ``obs[t]`` and ``states[t]`` are seen before ``actions[t]``,
    ``next_obs[t]`` after it. The episode stops at the first success (the env terminates).

    Args:
        env: a :class:`LiftEnv` to reuse (creating one takes seconds); a new one by default.
    Returns:
        dict with ``obs`` and ``next_obs`` (key -> (T, d) float64), ``actions`` (T, 7) float64,
        ``states`` (T, S) float64, ``rewards`` (T,), ``dones`` (T,) (1 at the last step),
        ``model_xml`` (str), ``success`` (bool), ``length`` (T), ``seed``.
    """
    own = env is None
    env = env if env is not None else LiftEnv(terminate_on_success=True)
    try:
        expert = LiftExpert(seed=seed, **(expert_kwargs or {}))
        env.reset(seed=seed)
        model_xml = env.model_xml()
        obs_list, next_list, actions, states, rewards = [], [], [], [], []
        success = False
        for _ in range(max_steps):
            obs = env.observation_dict()
            action = expert.act(obs)
            obs_list.append(obs)
            states.append(env.get_state())
            actions.append(action)
            _, reward, terminated, _, info = env.step(action)
            next_list.append(env.observation_dict())
            rewards.append(reward)
            if info["is_success"]:
                success = True
            if terminated:
                break
    finally:
        if own:
            env.close()
    length = len(actions)
    dones = np.zeros(length, dtype=np.int64)
    dones[-1] = 1
    return {
        "obs": {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]},
        "next_obs": {k: np.stack([o[k] for o in next_list]) for k in next_list[0]},
        "actions": np.asarray(actions, dtype=np.float64),
        "states": np.asarray(states, dtype=np.float64),
        "rewards": np.asarray(rewards, dtype=np.float64),
        "dones": dones,
        "model_xml": model_xml,
        "success": success,
        "length": length,
        "seed": int(seed),
    }


__all__ = ["LiftExpert", "make_env", "quat_to_matrix", "rotation_vector", "run_expert_episode", "yaw_to_align"]
