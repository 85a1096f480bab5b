"""Diffusion policies that see camera images: dict observations through an observation encoder.

What DiffusionPolicy's ``DiffusionUnetImagePolicy`` (``MultiImageObsEncoder``),
``DiffusionUnetHybridImagePolicy`` (robomimic's encoder) and LeRobot's ``DiffusionPolicy``
(its RGB encoder, state first) compute, with para_policy's samplers. The encoder runs once
per chunk: its per-step features (B, To, F) flatten into the UNet's ``global_cond``
(B, To·F), and the sampler sees only that, so every sampler and preset applies unchanged.

Data flow: ``{key: (B, To, *shape)}`` → per-key normalizer → (B·To, *shape) →
encoder → (B·To, F) → ``global_cond`` (B, To·F) → sampler → trajectory (B, T, Da) →
unnormalize → actions (B, n_action_steps, Da).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from para_policy.policy import LowdimPolicy
from para_policy.policy_config import IMAGE_KEYS, RGB, PolicyConfig
from para_policy.policy_config import LOW_DIM as LOW_DIM  # the observation types, re-exported

#: the range of the float images every supported image policy takes: DiffusionPolicy's image and hybrid
#: policies and LeRobot's diffusion policy all take frames divided by 255
IMAGE_RANGE = (0.0, 1.0)
#: how far outside :data:`IMAGE_RANGE` an image may reach (a resampling filter's overshoot) and still pass
IMAGE_RANGE_SLACK = 0.05


def check_image_range(key: str, image: torch.Tensor) -> None:
    """A ``ValueError`` naming ``key`` unless the float ``image`` lies in 0..1 (:data:`IMAGE_RANGE`, give or take
    :data:`IMAGE_RANGE_SLACK`).

    Why: the policy's normalizer maps 0..1 to the encoder's range, so a 0..255 frame (the common
    mistake) or a frame already normalized gives the encoder inputs it never saw, and actions far off
    with no error at all. Any shape; one device sync.
    """
    lo, hi = torch.stack(torch.aminmax(image.detach())).tolist()
    low, high = IMAGE_RANGE
    if lo >= low - IMAGE_RANGE_SLACK and hi <= high + IMAGE_RANGE_SLACK:
        return
    if lo >= low - IMAGE_RANGE_SLACK and hi <= 255 + IMAGE_RANGE_SLACK:
        raise ValueError(f"observation {key!r} looks like 0..255 (max {hi:.1f}), expected 0..1 floats "
                         "(divide by 255)")
    raise ValueError(f"observation {key!r} is outside 0..1 (min {lo:.3g}, max {hi:.3g}), expected 0..1 floats, "
                     "not normalized (the policy normalizes them itself)")


class ImagePolicy(LowdimPolicy):
    """A UNet diffusion policy whose conditioning comes from an image observation encoder.

    Config (``LowdimPolicy``'s, plus): ``obs_keys`` ``{key: {'shape': [...], 'type': 'rgb' |
    'low_dim'}}`` (the observation of one step), ``obs_encoder`` (the encoder's spec,
    :func:`para_policy.models.vision.build_obs_encoder`), ``normalizer`` ``{field: {'shape',
    'mode'}}`` (every observation key and ``'action'``), optionally ``normalizer_fields``
    ``{key: field}`` (LeRobot's keys hold dots, which module names cannot), and ``obs_dim``
    = the encoder's feature size per step (the on-disk key; the attribute is :attr:`obs_feature_dim`,
    DiffusionPolicy's name, since a low-dim policy's ``obs_dim`` is the raw observation width).

    ``predict_action({'image': (B, To, 3, H, W), 'agent_pos': (B, To, 2)})`` takes float
    images in [0, 1], channels first, as DiffusionPolicy and LeRobot do. For LeRobot
    checkpoints, :meth:`select_action` and :meth:`predict_action_chunk` keep LeRobot's queue
    semantics on raw (unnormalized) observations.
    """

    def __init__(self, config: PolicyConfig | Mapping[str, Any]) -> None:
        config = PolicyConfig.coerce(config)  # checks the image fields too (para_policy/policy_config.py)
        if not config.is_image:
            raise ValueError(f"image policy config is missing {list(IMAGE_KEYS)}")
        self.obs_keys: dict[str, tuple[tuple[int, ...], str]] = config.observation_spec()
        self.normalizer_fields = config.normalizer_field_map()
        super().__init__(config)
        from para_policy.models.vision import build_obs_encoder

        self.obs_encoder = build_obs_encoder(dict(config.obs_encoder))
        #: the encoder's feature width per step (F of global_cond (B, To·F)); the config's ``obs_dim``
        self.obs_feature_dim: int = config.obs_dim
        del self.obs_dim  # LowdimPolicy's raw observation width: an image policy has none (__getattr__ says so)
        if int(self.obs_encoder.feature_dim) != self.obs_feature_dim:
            raise ValueError(f"obs_dim (the encoder's feature width per step) is {self.obs_feature_dim} but the "
                             f"observation encoder gives {self.obs_encoder.feature_dim} features per step")
        self._queues: dict[str, deque] | None = None

    def __getattr__(self, name: str) -> Any:
        """``obs_dim`` is refused naming :attr:`obs_feature_dim`; other names as ``nn.Module`` finds them.

        Why: ``obs_dim`` is a low-dim policy's raw observation width; here the same number would be the
        encoder's feature width, which code written for ``LowdimPolicy`` would misread.
        """
        if name == "obs_dim":
            raise AttributeError("ImagePolicy has no obs_dim (a LowdimPolicy's raw observation width): the "
                                 "encoder's feature width per step is obs_feature_dim, the observation keys "
                                 "and shapes are observation_shapes()")
        return super().__getattr__(name)

    def _normalizer_fields(self) -> dict[str, Any]:
        return dict(self.config["normalizer"])

    # ---- observations → conditioning ------------------------------------------------
    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: shape for key, (shape, _) in self.obs_keys.items()}

    def observation(self, obs_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.check_obs(obs_dict)

    def observation_batch(self, obs: Any) -> dict[str, torch.Tensor]:
        """One observation set for calibration: ``{key: (To, *shape)}`` (batch 1) or ``{key: (B, To, *shape)}``."""
        if not isinstance(obs, Mapping):
            raise ValueError(f"observations must be a dict with keys {list(self.obs_keys)}, got {type(obs).__name__}")
        first, (shape, _) = next(iter(self.obs_keys)), next(iter(self.obs_keys.values()))
        single = first in obs and np.ndim(obs[first]) == 1 + len(shape)
        return self.check_obs({k: (v[None] if single else v) for k, v in obs.items()})

    def zero_observation(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {key: torch.zeros((batch_size, self.n_obs_steps, *shape), device=self.device, dtype=self.sample_dtype)
                for key, (shape, _) in self.obs_keys.items()}

    def check_obs(self, obs: Any, *, one_step: bool = False) -> dict[str, torch.Tensor]:
        """``{key: (B, To, *shape)}`` on the policy's device in :attr:`sample_dtype`; ``ValueError`` if wrong.

        ``one_step``: one control step's ``{key: (B, *shape)}`` instead (:meth:`select_action`).
        Each key: real numbers of its shape, finite; images float and in 0..1
        (:func:`check_image_range`). Normalized at that precision; :meth:`conditioning` casts the
        encoder's input to its dtype.
        """
        lead = "(B, " if one_step else "(B, To, "
        expected = {k: f"{lead}{', '.join(map(str, s))})" for k, (s, _) in self.obs_keys.items()}
        if not isinstance(obs, Mapping):
            raise ValueError(f"observations must be a dict {expected}, got {type(obs).__name__}")
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise ValueError(f"observation is missing {missing}; this policy takes {expected} (got keys "
                             f"{sorted(obs)})")
        out: dict[str, torch.Tensor] = {}
        for key, (shape, kind) in self.obs_keys.items():
            x = self._check_key(key, obs[key], shape, kind, expected[key], one_step)
            batch = next(iter(out.values()), x).shape[0]
            if x.shape[0] != batch:
                raise ValueError(f"observation keys disagree on the batch size: {key} has {x.shape[0]}, "
                                 f"others {batch}")
            out[key] = x.to(device=self.device, dtype=self.sample_dtype)
        return out

    def _check_key(self, key: str, x: Any, shape: tuple[int, ...], kind: str, expected: str, one_step: bool
                   ) -> torch.Tensor:
        """One key's observation as a tensor (B, To, *shape), or (B, *shape) for ``one_step``; checked."""
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if kind == RGB and not x.is_floating_point():
            raise ValueError(f"{key} is {x.dtype}; expected float images in [0, 1] of shape "
                             f"{expected}, channels first (divide uint8 images by 255)")
        if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or x.dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise ValueError(f"{key} must hold real numbers, got {x.dtype}")
        lead = 1 if one_step else 2
        if x.dim() != lead + len(shape) or tuple(x.shape[lead:]) != shape or x.shape[0] < 1 \
                or (not one_step and x.shape[1] < self.n_obs_steps):
            what = "image size" if kind == RGB else "shape"
            steps = "" if one_step else f" with To >= {self.n_obs_steps}"
            raise ValueError(f"{key} has the wrong {what}: expected {expected}{steps}, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{key} contains NaN or inf")
        if kind == RGB:
            check_image_range(key, x)
        return x

    def conditioning(self, obs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        """``(global_cond (B, To·F), None)``: the encoder's features of each of the first To steps.

        Normalized in the observations' dtype, encoded in the encoder's parameter dtype, and
        handed on in the UNet's :attr:`dtype` (no-op casts when all are float32).
        """
        B, To = self.batch_size(obs), self.n_obs_steps
        encoder_dtype = next(self.obs_encoder.parameters(), torch.empty(0, dtype=self.dtype)).dtype
        flat = {}
        for key in self.obs_keys:
            x = self.normalizer.normalize(self.normalizer_fields[key], obs[key][:, :To])
            flat[key] = x.reshape(B * To, *x.shape[2:]).to(encoder_dtype)
        return self.obs_encoder(flat).reshape(B, -1).to(self.dtype), None

    # ---- LeRobot's queue semantics ----------------------------------------------------
    def reset(self) -> None:
        """Forget the warm-start trajectory and LeRobot's observation and action queues."""
        super().reset()
        self._queues = None

    @torch.inference_mode()
    def predict_action_chunk(self, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        """LeRobot's ``predict_action_chunk`` on raw observations ``{key: (B, To, *shape)}`` → (B, n_action_steps, Da).

        ``kwargs`` go to :meth:`predict_action` (``x_T``, ``noise``, ``generator``, ``sampler``, ...).
        """
        return self.predict_action(batch, **kwargs)["action"]

    @torch.inference_mode()
    def select_action(self, observation: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        """LeRobot's ``select_action``: one step's raw observation ``{key: (B, *shape)}`` → action (B, Da).

        The first call after :meth:`reset` fills the observation queue with ``n_obs_steps``
        copies of it; a chunk is predicted whenever the action queue is empty (``kwargs`` go
        to :meth:`predict_action` then) and its ``n_action_steps`` actions are queued. Each
        observation is checked when it arrives (:meth:`check_obs`), so a bad one fails the call
        that brings it and enters no queue.
        """
        step = self.check_obs(observation, one_step=True)  # as it arrives, not a chunk later when it leaves the queue
        if self._queues is not None:
            queued = self._queues[next(iter(self.obs_keys))][-1].shape[0]
            if self.batch_size(step) != queued:
                raise ValueError(f"observation batch size {self.batch_size(step)} differs from the queued "
                                 f"observations' {queued}; call reset() before changing it")
        if self._queues is None:
            self._queues = {key: deque([x] * self.n_obs_steps, maxlen=self.n_obs_steps) for key, x in step.items()}
            self._queues["action"] = deque()
        else:
            for key, x in step.items():
                self._queues[key].append(x)
        if not self._queues["action"]:
            window = {key: torch.stack(list(self._queues[key]), dim=1) for key in self.obs_keys}
            self._queues["action"].extend(self.predict_action_chunk(window, **kwargs).transpose(0, 1))
        return self._queues["action"].popleft()

    # ---- training -----------------------------------------------------------------
    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """DiffusionPolicy's image-policy loss; ``batch = {obs keys: (B, horizon, ...), 'action': (B, horizon, Da)}``.

        The encoder trains with the UNet (random crops in train mode).
        """
        obs = self.check_obs({k: batch[k] for k in self.obs_keys})
        global_cond, _ = self.conditioning(obs)
        trajectory = self.normalizer.normalize("action", batch["action"])
        return self.denoising_loss(trajectory, torch.zeros_like(trajectory, dtype=torch.bool), global_cond, generator)
