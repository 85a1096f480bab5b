"""ConditionalUnet1D run on patches of the horizon, each reading its neighbours' halos (DistriFusion's split).

Why: DistriFusion (Li et al. 2024) and PCPP (Zhang et al. 2024) split the input into patches, one
per worker; every convolution of a patch needs a few columns of its neighbours' input (the
*halo*), and every GroupNorm the statistics of the whole input. Read from the *previous*
denoising step (displaced patch parallelism), both are at hand when a step starts, so the
patches run at once. Here the patches are P equal slices of the trajectory's time axis.

Halos, per temporal operator of the ConditionalUnet1D (time length ``n`` of a patch at its level)::

    Conv1dBlock conv (kernel k, same padding):   k // 2 columns each side
    Downsample1d (kernel 3, stride 2, pad 1):    1 column each side (only the left one is read)
    Upsample1d (transposed, kernel 4, stride 2): 1 column each side
    1x1 convolutions, FiLM:                      none

Each level halves ``n``, so a patch's columns at level ``i`` are ``T / (P 2^i)``; that must be at
least the halo (``k // 2``), and every patch boundary must fall on a column of every level
(``T`` divisible by ``P 2^(L-1)``). A sequence end is a zero halo, which is exactly the
network's zero padding.

GroupNorm: each patch computes its own per-group mean and mean of squares; the full statistics
are ``(own + sum of the others') / P`` (equal patches). With the others' from the previous step
and one's own fresh, this is DistriFusion's ``corrected_async_gn`` (a negative variance falls
back to the patch's own). Unlike DistriFusion's, the variance is the biased one nn.GroupNorm uses,
so with current inputs the patches reproduce the network.

The exchange is packed into flat tensors so one patch is one graph call with a fixed signature:

* ``left``, ``right`` (B, H): the halos of every temporal operator in execution order, each
  flattened (C·h), ``left`` the columns just before the patch, ``right`` just after;
* ``others`` (B, 2, S): the other patches' per-group (mean, mean of squares) summed, S groups in all;

and a patch emits ``(out (B, n, D), left_edge (B, H), right_edge (B, H), local (B, 2, S))``: its
own first and last ``h`` columns of each operator's input and its own statistics, which
:func:`neighbour_inputs` turns into the neighbours' next inputs. :meth:`PatchUnet.full` runs the
whole horizon at once (exact; warm-up steps) and emits every patch's exchange from it.
Local conditioning (``local_cond``) is not supported: its encoder would need halos too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from para_policy.models.unet1d import ConditionalResidualBlock1D, ConditionalUnet1D, Conv1dBlock

__all__ = ["ExchangeContext", "PatchExchange", "PatchUnet", "neighbour_inputs"]

#: one patch's emitted exchange: ``(left_edge (B, H), right_edge (B, H), local (B, 2, S))``
PatchExchange = tuple[Tensor, Tensor, Tensor]


class ExchangeContext:
    """What one forward reads and emits at each temporal operator (see the module docstring).

    ``patches``: P. In patch mode (``inputs`` given) each operator's halo is read from ``left`` /
    ``right`` and the group statistics from ``others``; in full mode (``inputs`` None) the input
    spans every patch, the halos are the sequence ends' zeros, and each patch's edges and
    statistics are sliced out of the whole.
    """

    def __init__(self, patches: int, inputs: tuple[Tensor, Tensor, Tensor] | None = None,
                 layout: Sequence[tuple[str, int, int]] | None = None) -> None:
        self.patches = patches
        self.full = inputs is None
        self.inputs = inputs
        self.given_layout = layout  # patch mode reads sizes from it: Python constants, no shape ops in a graph
        self.halo_at = 0  # read offsets into the flat inputs
        self.stat_at = 0
        self.edges: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in range(patches if self.full else 1)]
        self.stats: list[list[Tensor]] = [[] for _ in range(patches if self.full else 1)]
        self.layout: list[tuple[str, int, int]] = []  # ("halo", channels, h) or ("gn", channels, groups)

    def sizes(self, x: Tensor, kind: str, second: int) -> tuple[int, int]:
        """``(channels, second)`` of the next exchanged operator (second: the halo h or the groups G)."""
        if self.given_layout is not None:
            entry = self.given_layout[len(self.layout)]
            if entry[0] != kind:
                raise RuntimeError(f"exchange layout mismatch at operator {len(self.layout)}: {entry} vs {kind}")
            self.layout.append(entry)
            return entry[1], entry[2]
        self.layout.append((kind, x.shape[1], second))
        return x.shape[1], second

    def halo(self, x: Tensor, h: int) -> Tensor:
        """``x`` (B, C, n) with ``h`` halo columns each side: (B, C, n + 2h); records this patch's edges."""
        C, h = self.sizes(x, "halo", h)
        if self.full:
            m = x.shape[-1] // self.patches
            for p, (lefts, rights) in enumerate(self.edges):
                lefts.append(x[:, :, p * m: p * m + h].flatten(1))
                rights.append(x[:, :, (p + 1) * m - h: (p + 1) * m].flatten(1))
            return F.pad(x, (h, h))
        left, right, _ = self.inputs  # type: ignore[misc]
        a, b = self.halo_at, self.halo_at + C * h
        self.halo_at = b
        self.edges[0][0].append(x[:, :, :h].flatten(1))
        self.edges[0][1].append(x[:, :, -h:].flatten(1))
        return torch.cat((left[:, a:b].reshape(-1, C, h), x, right[:, a:b].reshape(-1, C, h)), dim=-1)

    def group_norm(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        """``norm(x)`` with the whole horizon's statistics (exact in full mode, the others' stale in patch mode)."""
        G = norm.num_groups
        C, _ = self.sizes(x, "gn", G)
        if self.full:
            B, n = x.shape[0], x.shape[-1]
            xg = x.reshape(B, G, C // G, self.patches, n // self.patches)
            for p, stats in enumerate(self.stats):
                part = xg[:, :, :, p]
                stats.append(torch.stack((part.mean((2, 3)), part.square().mean((2, 3))), dim=1))
            return F.group_norm(x, G, norm.weight, norm.bias, norm.eps)
        # per-channel time means, then per group: only constant shapes (a lean graph)
        local = torch.stack((x.mean(-1), x.square().mean(-1)), dim=1).reshape(-1, 2, G, C // G).mean(-1)
        self.stats[0].append(local)  # (B, 2, G)
        others = self.inputs[2][:, :, self.stat_at: self.stat_at + G]  # type: ignore[index]
        self.stat_at += G
        total = (local + others) / self.patches
        mean = total[:, 0]
        var = total[:, 1] - mean.square()
        var = torch.where(var < 0, local[:, 1] - local[:, 0].square(), var)
        rstd = torch.rsqrt(var + norm.eps)
        scale = rstd.repeat_interleave(C // G, dim=1) * norm.weight  # (B, C)
        shift = norm.bias - mean.repeat_interleave(C // G, dim=1) * scale
        return torch.addcmul(shift[..., None], x, scale[..., None])

    def emitted(self) -> list[PatchExchange]:
        """Each patch's ``(left_edge, right_edge, local)`` (one entry in patch mode, P in full mode)."""
        return [(torch.cat(lefts, 1), torch.cat(rights, 1), torch.cat(stats, 2))
                for (lefts, rights), stats in zip(self.edges, self.stats, strict=True)]


def conv_block(block: Conv1dBlock, x: Tensor, ctx: ExchangeContext) -> Tensor:
    """Conv1dBlock on a patch: (B, C_in, n) -> (B, C_out, n)."""
    conv, norm, act = block.block
    k = conv.kernel_size[0]
    y = F.conv1d(ctx.halo(x, k // 2), conv.weight, conv.bias)
    return act(ctx.group_norm(norm, y))


def res_block(block: ConditionalResidualBlock1D, x: Tensor, cond: Tensor, ctx: ExchangeContext) -> Tensor:
    """ConditionalResidualBlock1D on a patch: (B, C_in, n), cond (B, cond_dim) -> (B, C_out, n)."""
    out = conv_block(block.blocks[0], x, ctx)
    film = block.cond_encoder(cond)
    if block.cond_predict_scale:
        scale, bias = film.split(block.out_channels, dim=1)
        out = scale * out + bias
    else:
        out = out + film
    out = conv_block(block.blocks[1], out, ctx)
    return out + block.residual_conv(x)


def downsample(conv: nn.Conv1d, x: Tensor, ctx: ExchangeContext) -> Tensor:
    """Downsample1d on a patch: (B, C, n) -> (B, C, n/2) (halo 1; the right one is never read)."""
    return F.conv1d(ctx.halo(x, 1), conv.weight, conv.bias, stride=2)


def upsample(conv: nn.ConvTranspose1d, x: Tensor, ctx: ExchangeContext) -> Tensor:
    """Upsample1d on a patch: (B, C, n) -> (B, C, 2n): the transposed conv over the haloed input, trimmed."""
    y = F.conv_transpose1d(ctx.halo(x, 1), conv.weight, conv.bias, stride=2, padding=1)
    return y[:, :, 2:-2]  # (B, C, 2n + 4): the ends belong to the neighbours


class PatchUnet(nn.Module):
    """A :class:`ConditionalUnet1D` run on ``num_patches`` slices of the horizon (module docstring).

    ``forward(x (B, n, D), t (B,), cond (B, G) | None, left (B, H), right (B, H), others (B, 2, S))
    -> (out (B, n, D), left_edge (B, H), right_edge (B, H), local (B, 2, S))`` runs one patch of
    ``n = T / P`` columns; :meth:`full` runs the whole horizon and emits every patch's exchange.
    Shares the network's modules (no copies).
    """

    def __init__(self, model: ConditionalUnet1D, num_patches: int = 2) -> None:
        super().__init__()
        if not isinstance(model, ConditionalUnet1D):
            raise TypeError(f"PatchUnet splits a ConditionalUnet1D, got {type(model).__name__}")
        if model.local_cond_encoder is not None:
            raise ValueError("PatchUnet does not support local conditioning (its encoder would need halos too)")
        if num_patches < 1:
            raise ValueError(f"num_patches must be >= 1, got {num_patches}")
        self.unet = model
        self.patches = int(num_patches)
        kernel = model.down_modules[0][0].blocks[0].block[0].kernel_size[0]
        self.max_halo = max(kernel // 2, 1)
        # the smallest horizon that splits: P patches of max_halo columns at the deepest level
        self.horizon_multiple = self.patches * self.max_halo * model.horizon_multiple
        self.layout = self.exchange_layout()
        self.halo_size = sum(c * h for kind, c, h in self.layout if kind == "halo")
        self.stat_size = sum(g for kind, _, g in self.layout if kind == "gn")

    def check_horizon(self, horizon: int) -> None:
        """``ValueError`` unless ``horizon`` splits into patches whose every level holds a halo."""
        if horizon <= 0 or horizon % self.horizon_multiple:
            raise ValueError(f"horizon {horizon} does not split into {self.patches} patches: it must be a multiple "
                             f"of {self.horizon_multiple} (patches x halo x 2^(levels-1))")

    @torch.no_grad()
    def exchange_layout(self) -> list[tuple[str, int, int]]:
        """Each exchanged operator in execution order: ``('halo', channels, h)`` or ``('gn', channels, groups)``."""
        net = self.unet
        x = torch.zeros(1, self.horizon_multiple, net.input_dim)
        cond = None if net.global_cond_dim is None else torch.zeros(1, net.global_cond_dim)
        ctx = ExchangeContext(self.patches)
        self.run(x, torch.zeros(1), cond, ctx)
        return ctx.layout

    def run(self, x: Tensor, t: Tensor, cond: Tensor | None, ctx: ExchangeContext) -> Tensor:
        """The network's forward on ``x`` (B, n, D) with ``ctx`` supplying halos and statistics: (B, n, D)."""
        net = self.unet
        c = net.diffusion_step_encoder(t.reshape(-1).expand(x.shape[0]))
        if cond is not None:
            c = torch.cat((c, cond), dim=-1)
        h = x.transpose(1, 2)
        skips = []
        for res1, res2, down in net.down_modules:
            h = res_block(res2, res_block(res1, h, c, ctx), c, ctx)
            skips.append(h)
            if not isinstance(down, nn.Identity):
                h = downsample(down.conv, h, ctx)
        for mid in net.mid_modules:
            h = res_block(mid, h, c, ctx)
        for res1, res2, up in net.up_modules:
            h = torch.cat((h, skips.pop()), dim=1)
            h = upsample(up.conv, res_block(res2, res_block(res1, h, c, ctx), c, ctx), ctx)
        block, out_conv = net.final_conv
        return out_conv(conv_block(block, h, ctx)).transpose(1, 2)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None, left: Tensor, right: Tensor, others: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx = ExchangeContext(self.patches, (left, right, others), self.layout)
        out = self.run(x, t, cond, ctx)
        return (out, *ctx.emitted()[0])

    def full(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> tuple[Tensor, list[PatchExchange]]:
        """The whole network on ``x`` (B, T, D): ``(out (B, T, D), every patch's exchange)`` (exact)."""
        self.check_horizon(x.shape[1])
        ctx = ExchangeContext(self.patches)
        out = self.run(x, t, cond, ctx)
        return out, ctx.emitted()


def neighbour_inputs(exchanges: Sequence[PatchExchange]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each patch's ``(left, right, others)`` from every patch's emitted exchange (module docstring).

    Patch ``p`` reads patch ``p-1``'s right edge as its left halo and patch ``p+1``'s left edge as
    its right halo (zeros at the sequence ends), and the sum of the other patches' statistics.
    """
    zeros = torch.zeros_like(exchanges[0][0])
    out = []
    for p in range(len(exchanges)):
        left = exchanges[p - 1][1] if p > 0 else zeros
        right = exchanges[p + 1][0] if p + 1 < len(exchanges) else zeros
        others = [ex[2] for q, ex in enumerate(exchanges) if q != p]
        out.append((left, right, sum(others[1:], others[0]) if others else torch.zeros_like(exchanges[0][2])))
    return out
