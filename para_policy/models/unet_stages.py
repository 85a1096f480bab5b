"""ConditionalUnet1D cut into sequential stages at block boundaries (AsyncDiff's model split).

Why: AsyncDiff (Chen et al. 2024) runs the stages of one denoiser call on different workers
at once, stage ``i`` reading stage ``i-1``'s output from the previous denoising step. That
needs the network as a chain of stages whose whole state at each cut is explicit: the hidden
activation, plus the skip connections of the down path that a later stage consumes.

The UNet is read as a list of *units*, each one block (:func:`unet_units`)::

    down i: res1 (+ local feature at i = 0), res2 (pushes skip i), downsample
    mid j:  res
    up j:   cat(x, pop skip) -> res1, res2, upsample
    final:  final_conv

A stage holds units ``[start, stop)``. Its inputs are ``(x, t, global_cond, *skips)``: for the
first stage ``x`` is the sample (B, T, D), for the others the hidden activation (B, C, T');
``skips`` are the live skip connections at the cut (pushed before it, popped after it; level 0's
skip is never consumed, so never carried). It returns ``(x, *skips)`` at its end cut, the last
stage ``(out (B, T, D),)``. The conditioning is not carried: every stage embeds the *current*
timestep and reads the current ``global_cond`` itself, as each AsyncDiff device computes the time
embedding locally (a few small matrix products per stage), which is also what lets one stage
run for several timesteps at once (stride).

The stages share the network's modules (no copies): changing its weights changes theirs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from para_policy.models.unet1d import ConditionalUnet1D

__all__ = ["UnetStage", "balanced_cuts", "resolve_cuts", "split_unet", "time_units", "unet_units", "unit_costs"]

#: a unit: (kind, level, part); kinds 'down' (parts 0 res1, 1 res2, 2 downsample), 'mid' (part 0),
#: 'up' (0 cat + res1, 1 res2, 2 upsample) and 'final'
Unit = tuple[str, int, int]


def unet_units(model: ConditionalUnet1D) -> list[Unit]:
    """The network's blocks in execution order, each a unit a cut may fall after."""
    levels = len(model.down_modules)
    units: list[Unit] = [("down", i, p) for i in range(levels) for p in range(3)]
    units += [("mid", j, 0) for j in range(len(model.mid_modules))]
    units += [("up", j, p) for j in range(len(model.up_modules)) for p in range(3)]
    return [*units, ("final", 0, 0)]


def live_skips(model: ConditionalUnet1D, cut: int) -> list[int]:
    """The down levels whose skip connection crosses the cut before unit ``cut`` (stack order)."""
    levels = len(model.down_modules)
    consumed = range(1, levels)  # up j pops the skip of level L-1-j; level 0's is never read
    stack: list[int] = []
    for kind, level, part in unet_units(model)[:cut]:
        if kind == "down" and part == 1 and level in consumed:
            stack.append(level)
        elif kind == "up" and part == 0:
            stack.pop()
    return stack


class UnetStage(nn.Module):
    """Units ``[start, stop)`` of a :class:`ConditionalUnet1D` as one module (see the module docstring).

    ``forward(x, t (B,), global_cond (B, G) | None, *skips, local_cond=None) -> (x, *skips)``;
    ``local_cond`` (B, T, Lc) is read by the stage holding the first unit only.
    """

    def __init__(self, model: ConditionalUnet1D, start: int, stop: int) -> None:
        super().__init__()
        units = unet_units(model)
        if not 0 <= start < stop <= len(units):
            raise ValueError(f"a stage needs 0 <= start < stop <= {len(units)}, got [{start}, {stop})")
        self.network = model
        self.start, self.stop = start, stop
        self.units = units[start:stop]
        self.skips_in = len(live_skips(model, start))
        self.skips_out = len(live_skips(model, stop))
        self.first, self.last = start == 0, stop == len(units)
        self.reads_time = True  # every stage embeds the timestep it is given (a stride runs one stage at several)

    def forward(self, x: Tensor, t: Tensor, global_cond: Tensor | None = None, *skips: Tensor,
                local_cond: Tensor | None = None) -> tuple[Tensor, ...]:
        if len(skips) != self.skips_in:
            raise ValueError(f"stage [{self.start}, {self.stop}) takes {self.skips_in} skips, got {len(skips)}")
        net = self.network
        cond = net.diffusion_step_encoder(t.reshape(-1).expand(x.shape[0]))
        if global_cond is not None:
            cond = torch.cat((cond, global_cond), dim=-1)
        local_feat = None
        if self.first:
            if local_cond is not None:
                assert net.local_cond_encoder is not None, "local_cond given to a network built without it"
                local_feat = net.local_cond_encoder[0](local_cond.transpose(1, 2), cond)
            x = x.transpose(1, 2)
        stack = list(skips)
        for kind, level, part in self.units:
            x = self._unit(kind, level, part, x, cond, stack, local_feat)
        return (x, *stack)

    def _unit(self, kind: str, level: int, part: int, x: Tensor, cond: Tensor, stack: list[Tensor],
              local_feat: Tensor | None) -> Tensor:
        net = self.network
        if kind == "down":
            block = net.down_modules[level][part]
            if part == 2:
                return block(x)
            x = block(x, cond)
            if part == 0 and level == 0 and local_feat is not None:
                x = x + local_feat
            if part == 1 and level > 0:
                stack.append(x)
            return x
        if kind == "mid":
            return net.mid_modules[level](x, cond)
        if kind == "up":
            block = net.up_modules[level][part]
            if part == 0:
                return block(torch.cat((x, stack.pop()), dim=1), cond)
            return block(x) if part == 2 else block(x, cond)
        return net.final_conv(x).transpose(1, 2)


def balanced_cuts(costs: Sequence[float], num_stages: int) -> list[int]:
    """Cut points ``0 = c_0 < c_1 < … < c_N = U`` minimising the largest stage cost.

    ``costs``: one per unit (U units), any unit (seconds, FLOPs). A stage's cost is the sum of its
    units'; the pipelined step takes as long as its slowest stage, so that is what is minimised
    (linear partition by dynamic programming; ties go to the earliest cut).
    """
    U = len(costs)
    if not 1 <= num_stages <= U:
        raise ValueError(f"num_stages must be between 1 and the number of units ({U}), got {num_stages}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[n][u]: the smallest max-stage cost of units [0, u) in n stages; back[n][u] its last cut
    best = [[inf] * (U + 1) for _ in range(num_stages + 1)]
    back = [[0] * (U + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for n in range(1, num_stages + 1):
        for u in range(n, U + 1):
            for c in range(n - 1, u):
                cost = max(best[n - 1][c], prefix[u] - prefix[c])
                if cost < best[n][u]:
                    best[n][u], back[n][u] = cost, c
    cuts = [U]
    for n in range(num_stages, 0, -1):
        cuts.append(back[n][cuts[-1]])
    return cuts[::-1]


@torch.inference_mode()
def time_units(stages: Sequence[nn.Module], x0: Tensor, t: Tensor, condition: Tensor | None, reps: int
               ) -> list[float]:
    """Each one-unit stage's median wall time (seconds) over ``reps`` chains from ``x0`` (after one warm-up chain).

    ``stages[u]`` holds unit ``u`` alone (``forward(x, t, condition, *skips) -> (x, *skips)``); on a
    CUDA network each call is synchronized, so its own time is what is read.
    """
    cuda = x0.device.type == "cuda"
    times: list[list[float]] = [[] for _ in stages]
    for _ in range(reps + 1):
        carry: tuple[Tensor, ...] = (x0,)
        for u, stage in enumerate(stages):
            t0 = time.perf_counter()
            carry = stage(carry[0], t, condition, *carry[1:])
            if cuda:
                torch.cuda.synchronize(x0.device)
            times[u].append(time.perf_counter() - t0)
    return [statistics.median(ts[1:]) for ts in times]


def unit_costs(model: ConditionalUnet1D, sample_shape: Sequence[int], global_cond: Tensor | None = None, *,
               reps: int = 7) -> list[float]:
    """Each unit's median wall time (seconds) in eager PyTorch at one row, on this machine now.

    ``sample_shape``: ``(T, D)``; ``global_cond``: (1, G) or None. Why eager: it needs no export,
    and the relative cost of the blocks (what balancing reads) follows their arithmetic, which
    every backend shares. The stage's own timestep embedding is counted in its first unit.
    """
    x0 = torch.randn(1, *sample_shape, generator=torch.Generator().manual_seed(0))
    stages = [UnetStage(model, u, u + 1) for u in range(len(unet_units(model)))]
    return time_units(stages, x0, torch.tensor([10.0]), global_cond, reps)


def resolve_cuts(network: str, units: int, num_stages: int, cuts: Sequence[int] | None,
                 costs: Sequence[float] | None, measure: Callable[[], Sequence[float]] | None) -> list[int]:
    """The cut points ``0 = c_0 < … < c_N = units``: ``cuts`` checked, else :func:`balanced_cuts` of
    ``costs``, else of ``measure()`` (None: nothing to measure on; ``network`` names the caller in errors)."""
    if cuts is None:
        if costs is None:
            if measure is None:
                raise ValueError(f"{network} needs cuts=, costs= or sample_shape= (to measure the units' costs)")
            costs = measure()
        if len(costs) != units:
            raise ValueError(f"costs must give one number per unit ({units}), got {len(costs)}")
        cuts = balanced_cuts(costs, num_stages)
    cuts = [int(c) for c in cuts]
    if len(cuts) != num_stages + 1 or cuts[0] != 0 or cuts[-1] != units or any(a >= b for a, b in pairwise(cuts)):
        raise ValueError(f"cuts must rise strictly from 0 to {units} in {num_stages} stages, got {cuts}")
    return cuts


def split_unet(model: ConditionalUnet1D, num_stages: int, *, costs: Sequence[float] | None = None,
               cuts: Sequence[int] | None = None, sample_shape: Sequence[int] | None = None,
               global_cond: Tensor | None = None) -> list[UnetStage]:
    """``model`` cut into ``num_stages`` :class:`UnetStage` s whose chain computes ``model``'s output.

    The cut points are ``cuts`` (``0 = c_0 < … < c_N`` = the number of units) when given, else
    :func:`balanced_cuts` of ``costs`` (one per unit of :func:`unet_units`), else of
    :func:`unit_costs` measured now on ``sample_shape`` ``(T, D)`` and ``global_cond`` (1, G).
    """
    if not isinstance(model, ConditionalUnet1D):
        raise TypeError(f"split_unet cuts a ConditionalUnet1D, got {type(model).__name__}")
    measure = None if sample_shape is None else (lambda: unit_costs(model, sample_shape, global_cond))
    cuts = resolve_cuts("split_unet", len(unet_units(model)), num_stages, cuts, costs, measure)
    return [UnetStage(model, a, b) for a, b in pairwise(cuts)]
