"""DiffusionPolicy's two observation encoders, weight-compatible with its checkpoints (no torchvision, no robomimic).

Why: an image policy's denoiser is conditioned on per-frame observation features, so sampling a DP image
checkpoint needs the encoder it was trained with, numerically. Both are rebuilt here with DP's module names,
so the ``obs_encoder.*`` entries of a workspace checkpoint load with ``strict=True``:

* :class:`MultiImageObsEncoder` is ``diffusion_policy.model.vision.multi_image_obs_encoder.MultiImageObsEncoder``
  (DiffusionUnetImagePolicy): per camera resize → crop → ImageNet normalize → torchvision resnet18
  (fc = Identity, 512 features), then the low-dim observations as they are. Features:
  sorted rgb keys, then sorted low-dim keys. Weights: ``key_model_map.<key>.*`` (``key_model_map.rgb.*`` when
  one model is shared) and the zero-size ``_dummy_variable`` of DP's ``ModuleAttrMixin``, kept here as an
  empty buffer so that every ``obs_encoder.*`` key loads and a state dict saved here loads back into DP.
* :class:`RobomimicObsEncoder` is the robomimic 0.2.0 ``ObservationEncoder`` that DP's hybrid policies build
  (``DiffusionUnetHybridImagePolicy``, ``DiffusionTransformerHybridImagePolicy``): per camera crop →
  ``VisualCore`` (ResNet18Conv trunk → SpatialSoftmax(32 keypoints) → Flatten → Linear(64, 64)) → ReLU, low-dim
  observations flattened; features in shape_meta order. Weights: ``obs_nets.<key>.*``, with robomimic's aliases
  (``backbone`` ≡ ``nets.0``, ``pool`` ≡ ``nets.1``: the same modules registered twice, so both names appear).

Inputs are what DP's policies feed their encoders: a dict key → (N, *shape) float tensor, already normalized by
the policy's normalizer (DP's image range normalizer maps [0, 1] to [-1, 1]); N is batch × observation steps.
Both encoders reject missing keys, wrong shapes and integer images with a ValueError naming the key.

Random crops (training) draw their offsets as DP's and robomimic's ``CropRandomizer`` do, from the global torch
RNG (:func:`dp_random_crop`), so a seeded run crops where the original would.

:func:`build_obs_encoder` rebuilds an encoder from its JSON-serialisable ``spec``; :func:`multi_image_encoder_from_dp`
and :func:`robomimic_encoder_from_dp` build one from a DP config and refuse what is not implemented.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from para_policy.models.image_ops import center_crop, imagenet_normalize, keypoint_grid, resize, spatial_soft_argmax
from para_policy.models.resnet import ResNet18, resnet18_trunk

__all__ = [
    "MultiImageObsEncoder",
    "ResNet18Conv",
    "RobomimicObsEncoder",
    "SpatialSoftmax",
    "VisualCore",
    "build_obs_encoder",
    "dp_random_crop",
    "multi_image_encoder_from_dp",
    "robomimic_encoder_from_dp",
]

MULTI_IMAGE_TARGET = "diffusion_policy.model.vision.multi_image_obs_encoder.MultiImageObsEncoder"
GET_RESNET_TARGET = "diffusion_policy.model.vision.model_getter.get_resnet"
HYBRID_POLICY_TARGETS = (
    "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy",
    "diffusion_policy.policy.diffusion_transformer_hybrid_image_policy.DiffusionTransformerHybridImagePolicy",
)
RESNET18_FEATURES = 512

Shape = tuple[int, ...]
HW = tuple[int, int]


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces: shape_meta parsing, input checks, DP's random crop
# ---------------------------------------------------------------------------------------------------------------------


def _parse_shape_meta(shape_meta: Mapping[str, Any]) -> dict[str, tuple[Shape, str]]:
    """``shape_meta["obs"]`` → {key: (shape, type)} in its order; a missing type is ``'low_dim'``, as in DP."""
    if not isinstance(shape_meta, Mapping) or not isinstance(shape_meta.get("obs"), Mapping):
        raise ValueError("shape_meta must be a dict with an 'obs' dict: {'obs': {key: {'shape': [...], 'type': ...}}}")
    parsed = {}
    for key, attr in shape_meta["obs"].items():
        shape = tuple(int(s) for s in attr["shape"])
        obs_type = attr.get("type", "low_dim")
        if obs_type not in ("rgb", "low_dim"):
            raise ValueError(f"obs {key!r} has type {obs_type!r}; only 'rgb' and 'low_dim' are supported")
        if obs_type == "rgb" and len(shape) != 3:
            raise ValueError(f"rgb obs {key!r} must have a (C, H, W) shape, got {list(shape)}")
        parsed[str(key)] = (shape, obs_type)
    return parsed


def _obs_only(parsed: Mapping[str, tuple[Shape, str]]) -> dict[str, Any]:
    """The JSON form of a parsed shape_meta (what ``spec`` stores)."""
    return {"obs": {key: {"shape": list(shape), "type": obs_type} for key, (shape, obs_type) in parsed.items()}}


def _hw(value: Any, what: str) -> HW:
    """``[h, w]`` → (h, w) of positive ints, or a ValueError naming ``what``."""
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be [height, width], got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive, got {[h, w]}")
    return h, w


def _hw_option(value: Any, rgb_keys: list[str], what: str) -> dict[str, HW] | None:
    """DP's resize/crop argument (None, one [h, w] for every camera, or {key: [h, w]}) → per-key sizes."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        missing = [key for key in rgb_keys if key not in value]
        if missing:
            raise ValueError(f"{what} is per camera but lacks {missing} (rgb keys: {rgb_keys})")
        return {key: _hw(value[key], f"{what}[{key!r}]") for key in rgb_keys}
    size = _hw(value, what)
    return dict.fromkeys(rgb_keys, size)


def _hw_json(value: Any) -> Any:
    """A resize/crop argument in JSON form: None, [h, w] or {key: [h, w]}."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): [int(v) for v in hw] for k, hw in value.items()}
    return [int(v) for v in value]


def _check_obs(obs: Mapping[str, Tensor], key_shapes: Mapping[str, Shape], rgb_keys: list[str]) -> None:
    """Every key present, (N, *shape) per key with one N, float dtype; ValueErrors name the key."""
    batch = None
    for key, shape in key_shapes.items():
        if key not in obs:
            raise ValueError(f"observation {key!r} is missing: the encoder needs {list(key_shapes)}, got {list(obs)}")
        x = obs[key]
        if not isinstance(x, Tensor):
            raise ValueError(f"obs[{key!r}] must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"obs[{key!r}] has shape {list(x.shape)}; expected (N, {', '.join(map(str, shape))}) "
                             f"with batch and observation steps flattened into N")
        if not x.is_floating_point():
            if key in rgb_keys:
                raise ValueError(f"obs[{key!r}] is {x.dtype}; expected float images normalized by the policy's "
                                 f"normalizer (DP maps [0, 1] to [-1, 1])")
            raise ValueError(f"obs[{key!r}] is {x.dtype}; expected a float tensor normalized by the policy's "
                             f"normalizer")
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise ValueError(f"obs[{key!r}] has batch size {x.shape[0]}, other observations have {batch}")


def _check_crop(key: str, image_hw: HW, crop: HW) -> None:
    # Both CropRandomizers (DP's and robomimic's) assert a crop strictly smaller than the image.
    if crop[0] >= image_hw[0] or crop[1] >= image_hw[1]:
        raise ValueError(f"crop {list(crop)} for {key!r} must be smaller than its image {list(image_hw)}, "
                         f"as DP's CropRandomizer requires")


def dp_random_crop(images: Tensor, height: int, width: int) -> Tensor:
    """DP's (and robomimic's) training crop: one random crop per image, (N, C, H, W) → (N, C, height, width).

    Offsets are drawn as ``CropRandomizer`` draws them, ``((H - height) * torch.rand(N, 1)).long()`` for the
    tops and then the same for the lefts, on the CPU RNG.
    So a seeded run gets the original's crops, and (as there) an offset is never ``H - height`` itself.
    """
    n, _, h, w = images.shape
    tops = ((h - height) * torch.rand(n, 1)).long().view(n).tolist()
    lefts = ((w - width) * torch.rand(n, 1)).long().view(n).tolist()
    return torch.stack([images[i, :, tops[i]: tops[i] + height, lefts[i]: lefts[i] + width] for i in range(n)])


# ---------------------------------------------------------------------------------------------------------------------
# 1. DP's MultiImageObsEncoder
# ---------------------------------------------------------------------------------------------------------------------


class MultiImageObsEncoder(nn.Module):
    """DP's ``MultiImageObsEncoder`` with a resnet18 per camera (or one shared): obs dict → (N, feature_dim).

    Args (DP's names and defaults):
        shape_meta: ``{"obs": {key: {"shape": [...], "type": "rgb" | "low_dim"}}}``; rgb shapes are (3, H, W),
            low-dim shapes 1-D (DP concatenates them as they are).
        resize_shape: None, ``[h, w]`` or ``{key: [h, w]}``: bilinear antialiased resize first.
        crop_shape: None, ``[h, w]`` or ``{key: [h, w]}``: random crop in training, center crop in eval.
        random_crop: False disables cropping altogether (DP's quirk, see :meth:`transform`).
        use_group_norm: every BatchNorm of a per-camera resnet becomes ``GroupNorm(C // 16, C)``.
        share_rgb_model: one resnet for all cameras (``key_model_map.rgb``); it keeps BatchNorm whatever
            ``use_group_norm`` says, as in DP, which converts only the per-camera copies.
        imagenet_norm: ImageNet mean/std normalization last, applied to the already normalized image as in DP.
    """

    def __init__(self, shape_meta: Mapping[str, Any], resize_shape: Any = None, crop_shape: Any = None,
                 random_crop: bool = True, use_group_norm: bool = False, share_rgb_model: bool = False,
                 imagenet_norm: bool = False) -> None:
        super().__init__()
        parsed = _parse_shape_meta(shape_meta)
        self.key_shapes: dict[str, Shape] = {key: shape for key, (shape, _) in parsed.items()}
        self.rgb_keys = sorted(key for key, (_, t) in parsed.items() if t == "rgb")
        self.low_dim_keys = sorted(key for key, (_, t) in parsed.items() if t == "low_dim")
        for key in self.rgb_keys:
            if self.key_shapes[key][0] != 3:
                raise ValueError(f"rgb obs {key!r} has {self.key_shapes[key][0]} channels; DP's resnet18 takes 3")
        for key in self.low_dim_keys:
            if len(self.key_shapes[key]) != 1:
                raise ValueError(f"low-dim obs {key!r} has shape {list(self.key_shapes[key])}; DP's "
                                 f"MultiImageObsEncoder concatenates low-dim observations as they are, so they "
                                 f"must be 1-D")
        self.resize_shape = _hw_option(resize_shape, self.rgb_keys, "resize_shape")
        # DP's quirk: with random_crop=False its CenterCrop is assigned to a variable that the ImageNet
        # normalizer then overwrites, so no crop happens at all, in training or in eval.
        self.crop_shape = _hw_option(crop_shape, self.rgb_keys, "crop_shape")
        if not random_crop:
            self.crop_shape = None
        for key in self.rgb_keys if self.crop_shape else ():
            resized = self.resize_shape[key] if self.resize_shape else self.key_shapes[key][1:]
            _check_crop(key, resized, self.crop_shape[key])
        self.imagenet_norm = bool(imagenet_norm)
        self.share_rgb_model = bool(share_rgb_model)
        self._spec_args = {"shape_meta": _obs_only(parsed), "resize_shape": _hw_json(resize_shape),
                           "crop_shape": _hw_json(crop_shape), "random_crop": bool(random_crop),
                           "use_group_norm": bool(use_group_norm), "share_rgb_model": self.share_rgb_model,
                           "imagenet_norm": self.imagenet_norm}

        # ModuleAttrMixin's zero-size parameter, an empty buffer here: it only keeps the state-dict keys alike.
        self.register_buffer("_dummy_variable", torch.zeros(0))
        self.key_model_map = nn.ModuleDict()
        if self.share_rgb_model:
            self.key_model_map["rgb"] = ResNet18("batch")
        else:
            for key in self.rgb_keys:
                self.key_model_map[key] = ResNet18("group" if use_group_norm else "batch")
        low_dim = sum(self.key_shapes[k][0] for k in self.low_dim_keys)
        self.feature_dim = RESNET18_FEATURES * len(self.rgb_keys) + low_dim

    @property
    def obs_keys(self) -> list[str]:
        """The keys in feature order: sorted rgb keys, then sorted low-dim keys."""
        return self.rgb_keys + self.low_dim_keys

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments with ``kind``; :func:`build_obs_encoder` rebuilds the encoder."""
        return {"kind": "dp_multi_image", **copy.deepcopy(self._spec_args)}

    def transform(self, key: str, images: Tensor) -> Tensor:
        """DP's ``key_transform_map[key]``: resize, crop, ImageNet normalize. (N, 3, H, W) → (N, 3, h, w).

        The crop is random in training mode and central in eval; there is none without ``crop_shape`` or
        with ``random_crop=False`` (DP's quirk, kept: such checkpoints were trained on uncropped images).
        """
        if key not in self.rgb_keys:
            raise ValueError(f"{key!r} is not an rgb key of this encoder ({self.rgb_keys})")
        if self.resize_shape is not None:
            images = resize(images, *self.resize_shape[key])
        if self.crop_shape is not None:
            height, width = self.crop_shape[key]
            images = dp_random_crop(images, height, width) if self.training else center_crop(images, height, width)
        if self.imagenet_norm:
            images = imagenet_normalize(images)
        return images

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        """obs: key → (N, *shape) normalized float tensors → (N, feature_dim) = [rgb features | low-dim obs]."""
        _check_obs(obs, self.key_shapes, self.rgb_keys)
        features = []
        if self.share_rgb_model and self.rgb_keys:
            # One batch of all cameras (key-major), as DP runs it: BatchNorm sees them together in training.
            images = torch.cat([self.transform(key, obs[key]) for key in self.rgb_keys], dim=0)
            n = obs[self.rgb_keys[0]].shape[0]
            per_key = self.key_model_map["rgb"](images).reshape(len(self.rgb_keys), n, -1)
            features.append(per_key.transpose(0, 1).reshape(n, -1))
        else:
            features += [self.key_model_map[key](self.transform(key, obs[key])) for key in self.rgb_keys]
        features += [obs[key] for key in self.low_dim_keys]
        return torch.cat(features, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# 2. robomimic's ObservationEncoder as DP's hybrid policies build it
# ---------------------------------------------------------------------------------------------------------------------


def _resnet_feature_size(n: int) -> int:
    """ResNet-18 trunk output size for an input size n: conv1, maxpool and layer2..4 each map n → ceil(n / 2)."""
    return math.ceil(n / 32)


class ResNet18Conv(nn.Module):
    """robomimic's ``ResNet18Conv``: the trunk as ``nets``, (N, C, H, W) → (N, 512, ceil(H/32), ceil(W/32)).

    As there, a first conv for ``input_channels`` channels replaces torchvision's when they are not 3.
    """

    def __init__(self, input_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        self.nets = resnet18_trunk(norm)
        if input_channels != 3:
            self.nets[0] = nn.Conv2d(input_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.nets(x)


class SpatialSoftmax(nn.Module):
    """robomimic's ``SpatialSoftmax``: 1x1 conv to ``num_kp`` maps, then each map's expected (x, y).

    (N, C, H, W) → (N, num_kp, 2). State: ``nets`` (the conv), buffers ``temperature`` (1,), ``pos_x`` and
    ``pos_y`` (1, H·W). In training robomimic adds ``noise_std`` × Gaussian noise to the keypoints; the noise is
    drawn even when ``noise_std`` is 0 (DP's setting), and so it is here, to keep the RNG stream alike.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_kp: int = 32, temperature: float = 1.0,
                 noise_std: float = 0.0) -> None:
        super().__init__()
        self.nets = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        self.register_buffer("temperature", torch.ones(1) * temperature)
        pos_x, pos_y = keypoint_grid(height, width)
        self.register_buffer("pos_x", pos_x.reshape(1, height * width))
        self.register_buffer("pos_y", pos_y.reshape(1, height * width))
        self.noise_std = noise_std

    def forward(self, features: Tensor) -> Tensor:
        keypoints = spatial_soft_argmax(self.nets(features), self.pos_x, self.pos_y, self.temperature)
        if self.training:
            keypoints = keypoints + torch.randn_like(keypoints) * self.noise_std
        return keypoints


class VisualCore(nn.Module):
    """robomimic's ``VisualCore`` with DP's hybrid config: (N, C, H, W) → (N, feature_dimension), no activation.

    ``nets = Sequential(backbone, pool, Flatten, Linear(2·num_kp, feature_dimension))``; ``backbone`` and ``pool``
    are the same modules as ``nets.0`` and ``nets.1``, so the state dict has both names, as robomimic's has.
    """

    def __init__(self, input_shape: Shape, norm: str = "batch", num_kp: int = 32, feature_dimension: int = 64) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.backbone = ResNet18Conv(channels, norm)
        self.pool = SpatialSoftmax(RESNET18_FEATURES, _resnet_feature_size(height), _resnet_feature_size(width),
                                   num_kp=num_kp)
        self.nets = nn.Sequential(self.backbone, self.pool, nn.Flatten(start_dim=1),
                                  nn.Linear(2 * num_kp, feature_dimension))

    def forward(self, images: Tensor) -> Tensor:
        return self.nets(images)


class RobomimicObsEncoder(nn.Module):
    """The robomimic 0.2.0 ``ObservationEncoder`` of DP's hybrid image policies: obs dict → (N, feature_dim).

    Per rgb key: crop (DP's CropRandomizer), ``obs_nets[key]`` (:class:`VisualCore`, 64 features), ReLU; low-dim
    keys are flattened; everything is concatenated in shape_meta order (not sorted).

    Args (the hybrid policy's names):
        shape_meta: ``{"obs": {key: {"shape": [...], "type": "rgb" | "low_dim"}}}``.
        crop_shape: None (no crop) or ``[h, w]`` for every camera.
        use_group_norm: ``obs_encoder_group_norm``: BatchNorm → ``GroupNorm(C // 16, C)``.
        eval_fixed_crop: True: DP's CropRandomizer, a center crop in eval. False: robomimic's own, which crops at
            random in eval too.
    """

    def __init__(self, shape_meta: Mapping[str, Any], crop_shape: Any = (76, 76), use_group_norm: bool = False,
                 eval_fixed_crop: bool = False) -> None:
        super().__init__()
        parsed = _parse_shape_meta(shape_meta)
        self.key_shapes: dict[str, Shape] = {key: shape for key, (shape, _) in parsed.items()}
        self.rgb_keys = [key for key, (_, t) in parsed.items() if t == "rgb"]
        self.low_dim_keys = [key for key, (_, t) in parsed.items() if t == "low_dim"]
        self.crop_shape = None if crop_shape is None else _hw(crop_shape, "crop_shape")
        self.eval_fixed_crop = bool(eval_fixed_crop)
        self._spec_args = {"shape_meta": _obs_only(parsed), "crop_shape": _hw_json(crop_shape),
                           "use_group_norm": bool(use_group_norm), "eval_fixed_crop": self.eval_fixed_crop}

        norm = "group" if use_group_norm else "batch"
        self.obs_nets = nn.ModuleDict()
        for key in self.rgb_keys:
            channels, height, width = self.key_shapes[key]
            if self.crop_shape is not None:
                _check_crop(key, (height, width), self.crop_shape)
                height, width = self.crop_shape
            self.obs_nets[key] = VisualCore((channels, height, width), norm)
        self.activation = nn.ReLU()
        self.feature_dim = sum(self.obs_nets[k].nets[-1].out_features for k in self.rgb_keys) + sum(
            math.prod(self.key_shapes[k]) for k in self.low_dim_keys)

    @property
    def obs_keys(self) -> list[str]:
        """The keys in feature order: shape_meta's."""
        return list(self.key_shapes)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments with ``kind``; :func:`build_obs_encoder` rebuilds the encoder."""
        return {"kind": "robomimic", **copy.deepcopy(self._spec_args)}

    def crop(self, key: str, images: Tensor) -> Tensor:
        """``obs_randomizers[key].forward_in``: (N, C, H, W) → (N, C, h, w); central only in eval with a fixed crop."""
        if self.crop_shape is None:
            return images
        if self.training or not self.eval_fixed_crop:
            return dp_random_crop(images, *self.crop_shape)
        return center_crop(images, *self.crop_shape)

    def rgb_feature(self, key: str, images: Tensor) -> Tensor:
        """One camera's features: ReLU(VisualCore(crop(images))), (N, C, H, W) → (N, 64)."""
        # With one crop per image robomimic's forward_out (a mean over crops) is the identity.
        return self.activation(self.obs_nets[key](self.crop(key, images)))

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        """obs: key → (N, *shape) normalized float tensors → (N, feature_dim), keys in shape_meta order."""
        _check_obs(obs, self.key_shapes, self.rgb_keys)
        features = [self.rgb_feature(key, obs[key]) if key in self.obs_nets else obs[key].flatten(start_dim=1)
                    for key in self.key_shapes]
        return torch.cat(features, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# 3. From DP configs, and from a spec
# ---------------------------------------------------------------------------------------------------------------------


def _check_bool(cfg: Mapping[str, Any], name: str, default: bool) -> bool:
    value = cfg.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _check_same_obs(cfg: Mapping[str, Any], shape_meta: Mapping[str, Any], where: str) -> None:
    if cfg.get("shape_meta") is not None:
        if _obs_only(_parse_shape_meta(cfg["shape_meta"])) != _obs_only(_parse_shape_meta(shape_meta)):
            raise ValueError(f"{where}.shape_meta differs from the shape_meta given")


def multi_image_encoder_from_dp(obs_encoder_cfg: Mapping[str, Any], shape_meta: Mapping[str, Any]
                                ) -> MultiImageObsEncoder:
    """A :class:`MultiImageObsEncoder` from DP's resolved ``cfg.policy.obs_encoder`` (a dict with ``_target_``).

    Only ``rgb_model`` = ``get_resnet(name='resnet18', weights=None | 'IMAGENET1K_V1' | ...)`` is implemented (the
    weights come from the checkpoint); anything else (r3m, other networks) is refused with a ValueError, as are
    unknown fields.
    """
    cfg = obs_encoder_cfg
    known = {"_target_", "shape_meta", "rgb_model", "resize_shape", "crop_shape", "random_crop", "use_group_norm",
             "share_rgb_model", "imagenet_norm"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"obs_encoder has fields {unknown} that are not implemented (known: {sorted(known)})")
    if cfg.get("_target_", MULTI_IMAGE_TARGET) != MULTI_IMAGE_TARGET:
        raise ValueError(f"obs_encoder._target_ is {cfg['_target_']!r}; only {MULTI_IMAGE_TARGET} is implemented")
    _check_same_obs(cfg, shape_meta, "obs_encoder")
    rgb_model = cfg.get("rgb_model")
    if not isinstance(rgb_model, Mapping):
        raise ValueError(f"obs_encoder.rgb_model must be a get_resnet config, got {rgb_model!r}")
    supported = {"_target_": GET_RESNET_TARGET, "name": "resnet18"}
    wrong = {k: v for k, v in rgb_model.items() if k != "weights" and (k not in supported or v != supported[k])}
    wrong.update({k: "<absent>" for k in ("_target_", "name") if k not in rgb_model})
    # torchvision weights (IMAGENET1K_V1, ...) only initialise the same network, whose trained weights the
    # checkpoint holds; r3m is another network
    weights = rgb_model.get("weights")
    if weights is not None and (not isinstance(weights, str) or weights.lower() == "r3m"):
        wrong["weights"] = weights
    if wrong:
        raise ValueError(f"obs_encoder.rgb_model has unsupported values {wrong}; only {supported} with weights None "
                         "or a torchvision weight name (the checkpoint holds the trained weights) is implemented")
    return MultiImageObsEncoder(
        shape_meta, resize_shape=cfg.get("resize_shape"), crop_shape=cfg.get("crop_shape"),
        random_crop=_check_bool(cfg, "random_crop", True), use_group_norm=_check_bool(cfg, "use_group_norm", False),
        share_rgb_model=_check_bool(cfg, "share_rgb_model", False),
        imagenet_norm=_check_bool(cfg, "imagenet_norm", False))


def robomimic_encoder_from_dp(policy_cfg: Mapping[str, Any], shape_meta: Mapping[str, Any]) -> RobomimicObsEncoder:
    """A :class:`RobomimicObsEncoder` from DP's resolved ``cfg.policy`` of a hybrid image policy.

    The encoder depends on ``crop_shape``, ``obs_encoder_group_norm`` and ``eval_fixed_crop`` only: DP takes the
    rest from robomimic's fixed ``bc_rnn`` / image / square / ph config (VisualCore, ResNet18Conv without
    pretraining or coord conv, SpatialSoftmax with 32 keypoints, temperature 1 and no noise, Linear to 64,
    one crop without position encoding). Other policy fields configure the denoiser and are not read here.
    """
    target = policy_cfg.get("_target_", HYBRID_POLICY_TARGETS[0])
    if target not in HYBRID_POLICY_TARGETS:
        raise ValueError(f"policy._target_ is {target!r}; the robomimic encoder is built by "
                         f"{list(HYBRID_POLICY_TARGETS)}")
    _check_same_obs(policy_cfg, shape_meta, "policy")
    crop_shape = policy_cfg.get("crop_shape", (76, 76))
    return RobomimicObsEncoder(shape_meta, crop_shape=crop_shape,
                               use_group_norm=_check_bool(policy_cfg, "obs_encoder_group_norm", False),
                               eval_fixed_crop=_check_bool(policy_cfg, "eval_fixed_crop", False))


def build_obs_encoder(spec: Mapping[str, Any]) -> nn.Module:
    """An encoder from its ``spec``: ``{"kind": "dp_multi_image" | "robomimic" | "lerobot", **constructor args}``."""
    args = dict(spec)
    kind = args.pop("kind", None)
    if kind == "dp_multi_image":
        return MultiImageObsEncoder(**args)
    if kind == "robomimic":
        return RobomimicObsEncoder(**args)
    if kind == "lerobot":
        from para_policy.models.lerobot_vision import LeRobotObsEncoder

        return LeRobotObsEncoder(**args)
    raise ValueError(f"unknown obs encoder kind {kind!r}; expected 'dp_multi_image', 'robomimic' or 'lerobot'")
