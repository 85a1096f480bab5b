"""DiffusionPolicy's LinearNormalizer: per-dimension affine maps, with its state_dict names.

``normalize(x) = x * scale + offset`` on the last dimension, ``unnormalize`` the inverse.
Parameters are stored as ``params_dict.<key>.{scale, offset, input_stats.{min,max,mean,std}}``,
the names DiffusionPolicy checkpoints use, so their normalizers load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


class _InputStats(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        for name in ("min", "max", "mean", "std"):
            setattr(self, name, nn.Parameter(torch.zeros(dim), requires_grad=False))


class _FieldParams(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.input_stats = _InputStats(dim)


class LinearNormalizer(nn.Module):
    """Affine normalizers for named fields (``'obs'``, ``'action'``), each of size ``dim``.

    Args:
        dims: field name → size of the last dimension.
    """

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        self.params_dict = nn.ModuleDict({key: _FieldParams(int(dim)) for key, dim in dims.items()})

    @torch.no_grad()
    def fit(
        self,
        data: Mapping[str, np.ndarray | torch.Tensor],
        output_min: float = -1.0,
        output_max: float = 1.0,
        range_eps: float = 1e-4,
    ) -> LinearNormalizer:
        """Fit DiffusionPolicy's 'limits' mode: map each dimension's [min, max] to [-1, 1].

        Dimensions whose range is below ``range_eps`` are shifted but not scaled, as
        DiffusionPolicy does. ``data[key]`` has shape (..., dim).
        """
        for key, value in data.items():
            if key not in self.params_dict:
                raise ValueError(f"normalizer has no field {key!r}; fields: {list(self.params_dict)}")
            field = self.params_dict[key]
            x = torch.as_tensor(np.asarray(value), dtype=torch.float32).reshape(-1, field.scale.shape[0])
            if x.shape[0] == 0:
                raise ValueError(f"cannot fit the normalizer's {key!r}: no data")
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                row, dim = (int(i) for i in torch.nonzero(bad)[0])
                raise ValueError(f"cannot fit the normalizer's {key!r}: {int(bad.sum())} non-finite values, the first "
                                 f"at row {row}, dimension {dim} ({x[row, dim].item()})")
            lo, hi = x.min(dim=0).values, x.max(dim=0).values
            span = hi - lo
            flat = span < range_eps
            span = torch.where(flat, torch.full_like(span, output_max - output_min), span)
            scale = (output_max - output_min) / span
            offset = output_min - scale * lo
            offset = torch.where(flat, (output_max + output_min) / 2 - lo, offset)
            field.scale.copy_(scale)
            field.offset.copy_(offset)
            stats = field.input_stats
            stats.min.copy_(lo)
            stats.max.copy_(hi)
            stats.mean.copy_(x.mean(dim=0))
            stats.std.copy_(x.std(dim=0))
        return self

    def _field(self, key: str, x: torch.Tensor) -> _FieldParams:
        if key not in self.params_dict:
            raise ValueError(f"normalizer has no field {key!r}; fields: {list(self.params_dict)}")
        field = self.params_dict[key]
        if x.shape[-1] != field.scale.shape[0]:
            raise ValueError(f"{key} has last dimension {x.shape[-1]}, expected {field.scale.shape[0]}")
        return field

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x * scale + offset`` for field ``key``; x has shape (..., dim)."""
        field = self._field(key, x)
        return x * field.scale + field.offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``(x - offset) / scale`` for field ``key``; the inverse of :meth:`normalize`."""
        field = self._field(key, x)
        return (x - field.offset) / field.scale
