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

RGB, LOW_DIM = "rgb", "low_dim"


class ImagePolicy(LowdimPolicy):
    """A UNet diffusion policy whose conditioning comes from an image observation encoder.

    Config (``LowdimPolicy``'s, plus): ``obs_keys`` ``{key: {'shape': [...], 'type': 'rgb' |
    'low_dim'}}`` (the observation of one step), ``obs_encoder`` (the encoder's spec,
    :func:`para_policy.models.vision.build_obs_encoder`), ``normalizer`` ``{field: {'shape',
    'mode'}}`` (every observation key and ``'action'``), optionally ``normalizer_fields``
    ``{key: field}`` (LeRobot's keys hold dots, which module names cannot), and ``obs_dim``
    = the encoder's feature size per step.

    ``predict_action({'image': (B, To, 3, H, W), 'agent_pos': (B, To, 2)})`` takes float
    images in [0, 1], channels first, as DiffusionPolicy and LeRobot do. For LeRobot
    checkpoints, :meth:`select_action` and :meth:`predict_action_chunk` keep LeRobot's queue
    semantics on raw (unnormalized) observations.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        missing = [k for k in ("obs_keys", "obs_encoder", "normalizer") if k not in config]
        if missing:
            raise ValueError(f"image policy config is missing {missing}")
        if str(config.get("model_type", "unet")) != "unet" or not config.get("obs_as_global_cond", True):
            raise ValueError("image policies condition a UNet globally (model_type 'unet', obs_as_global_cond "
                             "True); inpainting image features is not supported")
        if config.get("pred_action_steps_only", False):
            raise ValueError("pred_action_steps_only is not supported for image policies")
        keys = config["obs_keys"]
        if not isinstance(keys, Mapping) or not keys:
            raise ValueError(f"obs_keys must be a non-empty mapping of key -> {{shape, type}}, got {keys!r}")
        self.obs_keys: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, meta in keys.items():
            kind = str(meta.get("type", LOW_DIM))
            if kind not in (RGB, LOW_DIM):
                raise ValueError(f"obs_keys[{key!r}].type must be 'rgb' or 'low_dim', got {kind!r}")
            self.obs_keys[str(key)] = (tuple(int(s) for s in meta["shape"]), kind)
        fields = dict(config.get("normalizer_fields") or {k: k for k in self.obs_keys})
        self.normalizer_fields = {k: str(fields.get(k, k)) for k in self.obs_keys}
        absent = sorted({*self.normalizer_fields.values(), "action"} - set(config["normalizer"]))
        if absent:
            raise ValueError(f"normalizer config has no field for {absent}")
        super().__init__(config)
        from para_policy.models.vision import build_obs_encoder

        self.obs_encoder = build_obs_encoder(dict(config["obs_encoder"]))
        if int(self.obs_encoder.feature_dim) != self.obs_dim:
            raise ValueError(f"obs_dim is {self.obs_dim} but the observation encoder gives "
                             f"{self.obs_encoder.feature_dim} features per step")
        self._queues: dict[str, deque] | None = None

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

    def check_obs(self, obs: Any) -> dict[str, torch.Tensor]:
        """``{key: (B, To, *shape)}`` on the policy's device in :attr:`sample_dtype`; ``ValueError`` if wrong.

        Normalized at that precision; :meth:`conditioning` casts the encoder's input to its dtype.
        """
        expected = {k: f"(B, To, {', '.join(map(str, s))})" for k, (s, _) in self.obs_keys.items()}
        if not isinstance(obs, Mapping):
            raise ValueError(f"observations must be a dict {expected}, got {type(obs).__name__}")
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise ValueError(f"observation is missing {missing}; this policy takes {expected} (got keys "
                             f"{sorted(obs)})")
        out: dict[str, torch.Tensor] = {}
        batch = None
        for key, (shape, kind) in self.obs_keys.items():
            x = obs[key]
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            if kind == RGB and not x.is_floating_point():
                raise ValueError(f"{key} is {x.dtype}; expected float images in [0, 1] of shape "
                                 f"{expected[key]}, channels first (divide uint8 images by 255)")
            if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or x.dtype in (
                    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
                raise ValueError(f"{key} must hold real numbers, got {x.dtype}")
            if x.dim() != 2 + len(shape) or tuple(x.shape[2:]) != shape or x.shape[0] < 1 \
                    or x.shape[1] < self.n_obs_steps:
                what = "image size" if kind == RGB else "shape"
                raise ValueError(f"{key} has the wrong {what}: expected {expected[key]} with To >= "
                                 f"{self.n_obs_steps}, got {tuple(x.shape)}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"observation keys disagree on the batch size: {key} has {x.shape[0]}, "
                                 f"others {batch}")
            batch = x.shape[0]
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{key} contains NaN or inf")
            out[key] = x.to(device=self.device, dtype=self.sample_dtype)
        return out

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
        to :meth:`predict_action` then) and its ``n_action_steps`` actions are queued.
        """
        step = {}
        for key in self.obs_keys:
            if key not in observation:
                raise ValueError(f"observation is missing {key!r}; this policy takes {list(self.obs_keys)}")
            x = observation[key]
            step[key] = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
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
