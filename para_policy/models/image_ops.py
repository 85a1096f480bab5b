"""Image operations the observation encoders share: crops, ImageNet normalization, spatial soft-argmax.

Written with plain tensor ops (no torchvision): crops are slices, a resize is
``F.interpolate(..., mode='bilinear', antialias=True)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "center_crop", "imagenet_normalize", "keypoint_grid", "resize",
           "spatial_soft_argmax"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's ``CenterCrop`` for an image no smaller than the crop: (..., H, W) → (..., height, width).

    Top/left are ``round((H - height) / 2)`` and ``round((W - width) / 2)``, as torchvision computes them.
    """
    H, W = x.shape[-2:]
    if height > H or width > W:
        raise ValueError(f"cannot crop an image of {H}x{W} to {height}x{width}")
    top = int(round((H - height) / 2.0))
    left = int(round((W - width) / 2.0))
    return x[..., top: top + height, left: left + width]


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear antialiased resize (torchvision ``Resize`` on tensors): (N, C, H, W) → (N, C, height, width)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel with ImageNet's statistics: (N, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def keypoint_grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel coordinates robomimic and LeRobot use: ``(pos_x, pos_y)``, each (height·width,), in [-1, 1].

    ``np.meshgrid(linspace(-1, 1, width), linspace(-1, 1, height))``, flattened row-major.
    """
    pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, width), np.linspace(-1.0, 1.0, height))
    return (torch.from_numpy(pos_x.reshape(height * width)).float(),
            torch.from_numpy(pos_y.reshape(height * width)).float())


def spatial_soft_argmax(features: torch.Tensor, pos_x: torch.Tensor, pos_y: torch.Tensor,
                        temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Expected (x, y) of each channel's softmax over pixels: (N, K, H, W) → (N, K, 2).

    ``pos_x``, ``pos_y``: (H·W,) coordinates (:func:`keypoint_grid`). The result flattens to
    ``x0, y0, x1, y1, ...`` per image, as robomimic's and LeRobot's ``SpatialSoftmax`` do.
    """
    N, K, H, W = features.shape
    attention = torch.softmax(features.reshape(N * K, H * W) / temperature, dim=-1)
    expected_x = torch.sum(pos_x.reshape(1, -1) * attention, dim=1, keepdim=True)
    expected_y = torch.sum(pos_y.reshape(1, -1) * attention, dim=1, keepdim=True)
    return torch.cat([expected_x, expected_y], dim=1).view(N, K, 2)
