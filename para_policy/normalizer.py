"""DiffusionPolicy's LinearNormalizer: per-field affine maps, with its state_dict names.

``normalize(x) = x * scale + offset``, broadcast over the field's trailing dimensions
(``(dim,)`` for a vector, ``(1,)`` for DiffusionPolicy's image range, ``(3, 1, 1)`` for
per-channel image statistics); ``unnormalize`` is the inverse. Parameters are stored as
``params_dict.<key>.{scale, offset, input_stats.{min,max,mean,std}}``, the names
DiffusionPolicy checkpoints use, so their normalizers load unchanged.

A field can instead follow LeRobot's formulas, computed from ``input_stats`` exactly as
LeRobot computes them (so converted checkpoints give LeRobot's numbers to the last bit, not
only up to the roundoff of a refolded affine map): ``mode='mean_std'``
``(x - mean) / (std + eps)`` and back ``x * std + mean``; ``mode='min_max'`` (LeRobot >= 0.4's
processors) ``2 (x - min) / d - 1`` and back ``(y + 1) / 2 · d + min``, ``d = max - min`` with
an exact zero replaced by ``eps``; ``mode='min_max_eps'`` (LeRobot <= 0.3's normalization
buffers) ``(x - min) / (max - min + eps) · 2 - 1`` and back ``(y + 1) / 2 · (max - min) + min``;
``mode='identity'``. ``eps`` is per field, default :data:`LEROBOT_EPS`.

The statistics stay float32 (or wider) when the module is cast to half precision
(``policy.to(torch.bfloat16)``, ``.half()``): that cast is meant for the network, and statistics
rounded to bfloat16's 8-bit mantissa would move every raw action by up to 2^-9 of its range,
an error no sampler can undo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

MODES = ("affine", "mean_std", "min_max", "min_max_eps", "identity")
#: the statistics each non-affine mode reads (the affine mode reads ``scale`` and ``offset``)
MODE_STATS = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "min_max_eps": ("min", "max"), "identity": ()}
LEROBOT_EPS = 1e-8


class _InputStats(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        for name in ("min", "max", "mean", "std"):
            setattr(self, name, nn.Parameter(torch.zeros(shape), requires_grad=False))


class _FieldParams(nn.Module):
    def __init__(self, shape: tuple[int, ...], mode: str, eps: float) -> None:
        super().__init__()
        self.mode, self.eps = mode, eps
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(shape), requires_grad=False)
        self.input_stats = _InputStats(shape)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Refuse values this field's mode cannot use (:func:`check_field_values`) before any is copied in."""
        stats = MODE_STATS.get(self.mode, ())
        names = ("scale", "offset") if self.mode == "affine" else tuple(f"input_stats.{s}" for s in stats)
        check_field_values(prefix, {n: state_dict[prefix + n] for n in names if prefix + n in state_dict})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_field_values(prefix: str, values: Mapping[str, torch.Tensor]) -> None:
    """A ``ValueError`` naming the state-dict key and the value when a field's parameter would give inf or NaN.

    Why: ``unnormalize`` divides by an affine field's ``scale``, so a zero scale turns every
    sampled action into inf, and a non-finite scale or offset poisons every value; the
    statistics a LeRobot mode reads must be finite for the same reason. ``prefix``: the field's
    state-dict prefix (``'normalizer.params_dict.action.'``); ``values``: its parameters by name
    (``'scale'``, ``'offset'``, ``'input_stats.mean'``, ...).
    """
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or value.is_meta:  # a meta skeleton holds no values
            continue
        bad = ~torch.isfinite(value)
        if name == "scale":
            bad |= value == 0
        if bool(bad.any()):
            where = tuple(int(i) for i in torch.nonzero(bad)[0])
            rule = "finite and non-zero" if name == "scale" else "finite"
            field = prefix.rstrip(".").rsplit(".", 1)[-1]
            raise ValueError(f"normalizer field {field!r}: {prefix}{name} must be {rule}, got {value[where].item()} "
                             f"at index {where} (unnormalized actions would be inf or NaN)")


def field_spec(spec: int | Sequence[int] | Mapping[str, Any]) -> tuple[tuple[int, ...], str, float]:
    """``(shape, mode, eps)`` of one field given as a size, a shape, or ``{'shape', 'mode', 'eps'}``."""
    mode, eps = "affine", LEROBOT_EPS
    if isinstance(spec, Mapping):
        mode, eps = str(spec.get("mode", "affine")), float(spec.get("eps", LEROBOT_EPS))
        spec = spec["shape"]
    shape = (int(spec),) if isinstance(spec, (int, np.integer)) else tuple(int(s) for s in spec)
    if mode not in MODES:
        raise ValueError(f"normalizer mode must be one of {MODES}, got {mode!r}")
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"normalizer field shape must be non-empty with sizes >= 1, got {shape}")
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"normalizer eps must be finite and >= 0, got {eps}")
    return shape, mode, eps


def normalize_values(x: torch.Tensor, mode: str, params: Mapping[str, torch.Tensor], eps: float = LEROBOT_EPS,
                     inverse: bool = False) -> torch.Tensor:
    """One field's normalization (``inverse``: its inverse) in ``mode``, the formulas of the module docstring.

    ``params``: ``scale``, ``offset`` (affine) or the statistics ``min``, ``max``, ``mean``,
    ``std`` the mode reads, broadcasting against ``x``'s trailing dimensions.
    """
    if mode == "affine":
        return (x - params["offset"]) / params["scale"] if inverse else x * params["scale"] + params["offset"]
    if mode == "mean_std":
        return x * params["std"] + params["mean"] if inverse else (x - params["mean"]) / (params["std"] + eps)
    if mode in ("min_max", "min_max_eps"):
        span = params["max"] - params["min"]
        if mode == "min_max":
            span = torch.where(span == 0, torch.full_like(span, eps), span)
            return (x + 1) / 2 * span + params["min"] if inverse else 2 * (x - params["min"]) / span - 1
        return (x + 1) / 2 * span + params["min"] if inverse else (x - params["min"]) / (span + eps) * 2 - 1
    if mode == "identity":
        return x
    raise ValueError(f"normalizer mode must be one of {MODES}, got {mode!r}")


class LinearNormalizer(nn.Module):
    """Normalizers for named fields (``'obs'``, ``'action'``, ``'image'``, ...).

    Args:
        dims: field name → the size of its last dimension, its parameter shape (broadcast
            against the trailing dimensions of the data), or ``{'shape': ..., 'mode': ...}``
            with a mode of :data:`MODES` (default ``'affine'``).
    """

    def __init__(self, dims: Mapping[str, int | Sequence[int] | Mapping[str, Any]]) -> None:
        super().__init__()
        self.params_dict = nn.ModuleDict({key: _FieldParams(*field_spec(spec)) for key, spec in dims.items()})

    def _apply(self, fn: Any, recurse: bool = True) -> LinearNormalizer:
        """``Module._apply`` with casts to float16 / bfloat16 kept at float32 (or the tensor's wider dtype).

        Device moves and casts to float32 or float64 apply as usual (module docstring: why).
        """
        def keep_precision(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype in (torch.float16, torch.bfloat16):
                return t.to(device=out.device, dtype=torch.promote_types(t.dtype, torch.float32))
            return out

        return super()._apply(keep_precision, recurse)

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
            if field.mode != "affine" or field.scale.dim() != 1:
                raise ValueError(f"fit() fits affine vector fields; {key!r} is {field.mode} of shape "
                                 f"{tuple(field.scale.shape)}")
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
        shape = tuple(field.scale.shape)
        trailing = tuple(x.shape[x.dim() - len(shape):]) if x.dim() >= len(shape) else None
        if trailing is None or any(s != 1 and s != n for s, n in zip(shape, trailing, strict=True)):
            if len(shape) == 1:
                raise ValueError(f"{key} has last dimension {x.shape[-1]}, expected {shape[0]}")
            raise ValueError(f"{key} has shape {tuple(x.shape)}, whose trailing dimensions do not fit the "
                             f"normalizer's {shape}")
        return field

    @staticmethod
    def _params(field: _FieldParams) -> dict[str, torch.Tensor]:
        stats = field.input_stats
        return {"scale": field.scale, "offset": field.offset, "min": stats.min, "max": stats.max,
                "mean": stats.mean, "std": stats.std}

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Field ``key``'s normalization of x (..., *shape): ``x * scale + offset`` in the affine mode."""
        field = self._field(key, x)
        return normalize_values(x, field.mode, self._params(field), field.eps)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: ``(x - offset) / scale`` in the affine mode."""
        field = self._field(key, x)
        return normalize_values(x, field.mode, self._params(field), field.eps, inverse=True)
