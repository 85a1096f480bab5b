"""PushT task: keypoint observation adapter, scripted expert, zarr replay buffer, data generator."""

from .env import (
    GOAL_POSE,
    KEYPOINT_ENV_ID,
    KEYPOINTS_LOCAL,
    PushTKeypointObs,
    block_keypoints,
    get_state,
    keypoint_error,
    keypoint_obs,
    make_env,
    set_state,
)
from .expert import PushTExpert, run_expert_episode
from .replay_buffer import ReplayBuffer

__all__ = [
    "GOAL_POSE",
    "KEYPOINT_ENV_ID",
    "KEYPOINTS_LOCAL",
    "PushTExpert",
    "PushTKeypointObs",
    "ReplayBuffer",
    "block_keypoints",
    "get_state",
    "keypoint_error",
    "keypoint_obs",
    "make_env",
    "run_expert_episode",
    "set_state",
]
