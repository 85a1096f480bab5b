"""LeRobot's diffusion-policy observation encoder, written here (LeRobot is not needed).

Why: a LeRobot ``DiffusionPolicy`` checkpoint conditions its UNet on the features that
``DiffusionModel._prepare_global_conditioning`` computes. To run such a checkpoint with
para_policy's samplers, those features have to be reproduced exactly, and its
``diffusion.rgb_encoder.*`` weights have to load as they are.

Per observation step the feature vector is (LeRobot's order, state FIRST, unlike
DiffusionPolicy's ``[image | low_dim]``)::

    [ observation.state | camera 0 features | camera 1 features | ... | observation.environment_state ]

Each camera's features come from LeRobot's ``DiffusionRgbEncoder``:

1. optional resize to ``resize_shape`` (torchvision ``Resize``: bilinear, antialiased);
2. optional crop to ``crop_shape``: torchvision ``CenterCrop`` in eval mode; in training
   mode ``RandomCrop`` when ``crop_is_random`` (ONE random offset for the whole batch,
   as torchvision applies it to a batched tensor), else the center crop;
3. ``backbone``: resnet18 without avgpool/fc (``backbone.0`` conv1, ``backbone.1`` bn1,
   ``backbone.4..7`` layer1..4), with every BatchNorm replaced by ``GroupNorm(C // 16, C)``
   when ``use_group_norm`` (else BatchNorm2d, whose running stats are in the state dict);
4. ``pool``: SpatialSoftmax, a 1x1 conv ``pool.nets`` (512 → K) then the softmax-weighted
   mean of the pixel grid ``pool.pos_grid`` (h·w, 2), flattened to ``x0, y0, x1, y1, ...``;
5. ``out``: Linear(2K, 2K) and ReLU.

With ``separate_per_camera`` the encoders are a ModuleList ``rgb_encoder.<camera>``, else
one shared ``rgb_encoder`` sees all cameras in one batch (camera index innermost, as
LeRobot's ``"(b s n)"`` rearrangement). The submodule names equal LeRobot's minus the
``diffusion.`` prefix, so the checkpoint's ``diffusion.rgb_encoder.*`` tensors load
strictly as ``rgb_encoder.*``.

Images must already be normalized (LeRobot's preprocessor does it with the dataset's
per-channel mean/std); there is no ImageNet normalization in the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from para_policy.models.image_ops import center_crop, keypoint_grid, resize
from para_policy.models.resnet import resnet18_trunk

__all__ = ["LeRobotObsEncoder", "LeRobotRgbEncoder", "LeRobotSpatialSoftmax"]

SUPPORTED_BACKBONES = ("resnet18",)
RESNET18_CHANNELS = 512


def _trunk_output_size(n: int) -> int:
    """Spatial size after resnet18's trunk: conv1 (k7 s2 p3), maxpool (k3 s2 p1), three stride-2 3x3 convs."""
    n = (n + 2 * 3 - 7) // 2 + 1
    for _ in range(4):  # maxpool, layer2, layer3, layer4
        n = (n + 2 * 1 - 3) // 2 + 1
    return n


def _pair(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair [height, width] or None, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{name} must hold two positive integers, got {value!r}")
    return [int(v) for v in value]


class LeRobotSpatialSoftmax(nn.Module):
    """LeRobot's ``SpatialSoftmax`` with ``num_kp`` keypoints: (N, C, h, w) → (N, K, 2).

    The grid buffer ``pos_grid`` (h·w, 2) holds (x, y) per pixel in [-1, 1], built with numpy
    as LeRobot builds it (it is also stored in the checkpoint). The expectation is a matmul
    ``attention @ pos_grid``, LeRobot's operation, so the float rounding is the same.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_kp: int) -> None:
        super().__init__()
        self.height, self.width, self.num_kp = height, width, num_kp
        self.nets = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        pos_x, pos_y = keypoint_grid(height, width)
        self.register_buffer("pos_grid", torch.stack([pos_x, pos_y], dim=1))

    def forward(self, features: Tensor) -> Tensor:
        features = self.nets(features)
        attention = torch.softmax(features.reshape(-1, self.height * self.width), dim=-1)
        return (attention @ self.pos_grid).view(-1, self.num_kp, 2)


class LeRobotRgbEncoder(nn.Module):
    """LeRobot's ``DiffusionRgbEncoder``: images (N, 3, H, W) → features (N, 2K).

    ``image_hw`` is the input (H, W); ``resize_shape`` / ``crop_shape`` are (h, w) or None.
    """

    def __init__(self, image_hw: Sequence[int], resize_shape: Sequence[int] | None, crop_shape: Sequence[int] | None,
                 crop_is_random: bool, use_group_norm: bool, num_keypoints: int) -> None:
        super().__init__()
        self.resize_shape = None if resize_shape is None else (int(resize_shape[0]), int(resize_shape[1]))
        self.crop_shape = None if crop_shape is None else (int(crop_shape[0]), int(crop_shape[1]))
        self.crop_is_random = bool(crop_is_random)
        self.backbone = resnet18_trunk("group" if use_group_norm else "batch")
        h, w = self.crop_shape or self.resize_shape or (int(image_hw[0]), int(image_hw[1]))
        self.pool = LeRobotSpatialSoftmax(RESNET18_CHANNELS, _trunk_output_size(h), _trunk_output_size(w),
                                          num_keypoints)
        self.feature_dim = 2 * num_keypoints
        self.out = nn.Linear(2 * num_keypoints, self.feature_dim)
        self.relu = nn.ReLU()

    def _random_crop(self, x: Tensor) -> Tensor:
        # torchvision RandomCrop.get_params on a batched tensor: one (top, left) for all images.
        H, W = x.shape[-2:]
        th, tw = self.crop_shape
        if (H, W) == (th, tw):
            return x
        top = int(torch.randint(0, H - th + 1, size=(1,)).item())
        left = int(torch.randint(0, W - tw + 1, size=(1,)).item())
        return x[..., top: top + th, left: left + tw]

    def forward(self, x: Tensor) -> Tensor:
        if self.resize_shape is not None:
            x = resize(x, *self.resize_shape)
        if self.crop_shape is not None:
            x = self._random_crop(x) if self.training and self.crop_is_random else center_crop(x, *self.crop_shape)
        x = torch.flatten(self.pool(self.backbone(x)), start_dim=1)
        return self.relu(self.out(x))


class LeRobotObsEncoder(nn.Module):
    """Per-step observation features of a LeRobot diffusion policy: dict of (N, ...) → (N, feature_dim).

    Args (all JSON-able; :attr:`spec` returns them):
        image_keys: camera feature keys, in the config's ``input_features`` order.
        image_shape: ``[C, H, W]`` shared by all cameras (C must be 3), or None without cameras.
        state_key: the state key (``observation.state``), or None; state_dim: its size (0 without).
        env_state_key / env_state_dim: ``observation.environment_state`` and its size, optional.
        crop_shape: ``[h, w]`` or None; crop_is_random: random crop in training mode.
        use_group_norm: GroupNorm(C // 16) instead of BatchNorm2d in the backbone.
        spatial_softmax_num_keypoints: K; each camera yields 2K features.
        separate_per_camera: one encoder per camera (``rgb_encoder.<i>``) or one shared.
        vision_backbone: only ``"resnet18"``.
        pretrained_backbone_weights: recorded only (weights come from the checkpoint); refused
            with ``use_group_norm``, as LeRobot refuses it.
        resize_shape: ``[h, w]`` to resize to before cropping (LeRobot >= 0.6), or None.

    ``forward(nobs)``: ``nobs[key]`` already normalized, N = B·To rows (b-major); images
    (N, C, H, W) float, state (N, state_dim), environment state (N, env_state_dim).
    Returns (N, feature_dim) = ``[state | camera features ... | environment state]``.
    """

    def __init__(
        self,
        *,
        image_keys: Sequence[str],
        image_shape: Sequence[int] | None,
        state_key: str | None,
        state_dim: int,
        use_group_norm: bool,
        spatial_softmax_num_keypoints: int,
        separate_per_camera: bool,
        crop_shape: Sequence[int] | None = None,
        crop_is_random: bool = False,
        env_state_key: str | None = None,
        env_state_dim: int = 0,
        vision_backbone: str = "resnet18",
        pretrained_backbone_weights: str | None = None,
        resize_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(image_keys, str):
            raise ValueError(f"image_keys must be a list of keys, got the string {image_keys!r}")
        self.image_keys = [str(k) for k in image_keys]
        if len(set(self.image_keys)) != len(self.image_keys):
            raise ValueError(f"image_keys has duplicates: {self.image_keys}")
        self.state_key, self.state_dim = self._vector(state_key, state_dim, "state")
        self.env_state_key, self.env_state_dim = self._vector(env_state_key, env_state_dim, "env_state")
        self.crop_shape = _pair(crop_shape, "crop_shape")
        self.resize_shape = _pair(resize_shape, "resize_shape")
        self.crop_is_random = bool(crop_is_random)
        self.use_group_norm = bool(use_group_norm)
        self.separate_per_camera = bool(separate_per_camera)
        self.vision_backbone = str(vision_backbone)
        self.pretrained_backbone_weights = pretrained_backbone_weights
        if self.vision_backbone not in SUPPORTED_BACKBONES:
            raise ValueError(f"vision_backbone {vision_backbone!r} is not supported; expected one of "
                             f"{SUPPORTED_BACKBONES}")
        if self.use_group_norm and pretrained_backbone_weights:
            raise ValueError("use_group_norm with pretrained_backbone_weights is refused (as LeRobot refuses it): "
                             "replacing BatchNorm would ruin pretrained weights")
        num_kp = spatial_softmax_num_keypoints
        if isinstance(num_kp, bool) or not isinstance(num_kp, int) or num_kp < 1:
            raise ValueError(f"spatial_softmax_num_keypoints must be a positive integer, got "
                             f"{spatial_softmax_num_keypoints!r}")
        self.spatial_softmax_num_keypoints = int(spatial_softmax_num_keypoints)

        self.image_shape: list[int] | None = None
        camera_dim = 0
        if self.image_keys:
            if image_shape is None or len(image_shape) != 3 or any(int(s) <= 0 for s in image_shape):
                raise ValueError(f"image_shape must be [C, H, W] with cameras, got {image_shape!r}")
            self.image_shape = [int(s) for s in image_shape]
            if self.image_shape[0] != 3:
                raise ValueError(f"resnet18 takes RGB images: image_shape must have 3 channels, got {self.image_shape}")
            hw = self.resize_shape or self.image_shape[1:]
            if self.crop_shape is not None and (self.crop_shape[0] > hw[0] or self.crop_shape[1] > hw[1]):
                where = "resized image" if self.resize_shape else "image"
                raise ValueError(f"crop_shape {self.crop_shape} does not fit in the {where} of {hw[0]}x{hw[1]}")

            def make() -> LeRobotRgbEncoder:
                return LeRobotRgbEncoder(self.image_shape[1:], self.resize_shape, self.crop_shape, self.crop_is_random,
                                         self.use_group_norm, self.spatial_softmax_num_keypoints)

            if self.separate_per_camera:
                self.rgb_encoder: nn.Module = nn.ModuleList([make() for _ in self.image_keys])
            else:
                self.rgb_encoder = make()
            camera_dim = 2 * self.spatial_softmax_num_keypoints
        elif image_shape is not None:
            raise ValueError(f"image_shape {image_shape!r} given without image_keys")
        self.camera_feature_dim = camera_dim
        self.feature_dim = self.state_dim + camera_dim * len(self.image_keys) + self.env_state_dim
        if self.feature_dim == 0:
            raise ValueError("LeRobotObsEncoder needs a state, a camera or an environment state")

    @staticmethod
    def _vector(key: str | None, dim: int, name: str) -> tuple[str | None, int]:
        if key is None:
            if dim:
                raise ValueError(f"{name}_dim={dim} given without {name}_key")
            return None, 0
        if int(dim) < 1 or int(dim) != dim:
            raise ValueError(f"{name}_dim must be a positive integer with {name}_key={key!r}, got {dim!r}")
        return str(key), int(dim)

    @property
    def spec(self) -> dict[str, Any]:
        """``{"kind": "lerobot", **constructor args}``: JSON-serialisable, rebuilds this module."""
        return {
            "kind": "lerobot",
            "image_keys": list(self.image_keys),
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "state_key": self.state_key,
            "state_dim": self.state_dim,
            "env_state_key": self.env_state_key,
            "env_state_dim": self.env_state_dim,
            "crop_shape": None if self.crop_shape is None else list(self.crop_shape),
            "crop_is_random": self.crop_is_random,
            "use_group_norm": self.use_group_norm,
            "spatial_softmax_num_keypoints": self.spatial_softmax_num_keypoints,
            "separate_per_camera": self.separate_per_camera,
            "vision_backbone": self.vision_backbone,
            "pretrained_backbone_weights": self.pretrained_backbone_weights,
            "resize_shape": None if self.resize_shape is None else list(self.resize_shape),
        }

    @staticmethod
    def _fetch(nobs: Mapping[str, Tensor], key: str) -> Tensor:
        if key not in nobs:
            raise ValueError(f"observation {key!r} is missing; got keys {sorted(nobs)}")
        x = nobs[key]
        if not isinstance(x, Tensor):
            raise ValueError(f"observation {key!r} must be a tensor, got {type(x).__name__}")
        if x.dtype == torch.uint8:
            raise ValueError(f"observation {key!r} is uint8: expected a float tensor already normalized "
                             "(LeRobot's preprocessor maps [0, 1] images with the dataset mean/std)")
        if not x.is_floating_point():
            raise ValueError(f"observation {key!r} must be a float tensor, got {x.dtype}")
        return x

    def _vector_obs(self, nobs: Mapping[str, Tensor], key: str, dim: int) -> Tensor:
        x = self._fetch(nobs, key)
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"observation {key!r} must have shape (N, {dim}), got {tuple(x.shape)}")
        return x

    def _image_obs(self, nobs: Mapping[str, Tensor], key: str) -> Tensor:
        x = self._fetch(nobs, key)
        if x.ndim != 4 or list(x.shape[1:]) != self.image_shape:
            raise ValueError(f"image {key!r} must have shape (N, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")
        return x

    def forward(self, nobs: Mapping[str, Tensor]) -> Tensor:
        state = None if self.state_key is None else self._vector_obs(nobs, self.state_key, self.state_dim)
        images = [self._image_obs(nobs, key) for key in self.image_keys]
        env = None if self.env_state_key is None else self._vector_obs(nobs, self.env_state_key, self.env_state_dim)
        inputs = [x for x in (state, *images, env) if x is not None]
        rows = {x.shape[0] for x in inputs}
        if len(rows) != 1:
            raise ValueError(f"observations have different numbers of rows: {sorted(rows)}")
        parts = [] if state is None else [state]
        if images:
            if self.separate_per_camera:
                parts.extend(encoder(x) for encoder, x in zip(self.rgb_encoder, images, strict=True))
            else:
                stacked = torch.stack(images, dim=1).flatten(0, 1)  # (N * cameras, C, H, W), camera innermost
                parts.append(self.rgb_encoder(stacked).reshape(rows.pop(), -1))
        if env is not None:
            parts.append(env)
        return torch.cat(parts, dim=-1)
