"""TransformerForDiffusion cut into sequential stages at layer boundaries (AsyncDiff's model split).

Why: AsyncDiff (Chen et al. 2024) runs the stages of one denoiser call on different workers
at once, stage ``i`` reading stage ``i-1``'s output from the previous denoising step. That
needs the network as a chain of stages whose whole state at each cut is explicit, as
:mod:`para_policy.models.unet_stages` does for the UNet.

The transformer is read as a list of *units* (:func:`transformer_units`)::

    embed:    decoder form: memory = encoder(time token ++ cond tokens + cond_pos_emb),
              x = input_emb(sample) + pos_emb;
              encoder-only form: x = (time token ++ input_emb(sample)) + pos_emb
    layer i:  decoder layer i on (x, memory), or encoder layer i on x (encoder-only)
    head:     (encoder-only: drop the time token,) ln_f, head

A stage holds units ``[start, stop)``. Its inputs are ``(x, t (B,), cond (B, To, cond_dim) | None,
*skips)``: for the first stage ``x`` is the sample (B, T, input_dim), for the others the hidden
tokens (B, T, n_emb) (B, T + 1, n_emb in the encoder-only form, the time token first). It returns
``(x, *skips)`` at its end cut, the last stage ``(out (B, T, output_dim),)``.

The carried state (``skips``) is the decoder's ``memory`` (B, T_cond, n_emb), the encoded time
and observation tokens, at every cut that has a decoder layer after it (the encoder-only form
carries nothing: its time token travels in the hidden tokens). ``memory`` is carried from the
stage that computes it rather than recomputed by each stage from the current ``t`` and ``cond``:
a stage reading a stale carry (stage ``i-1``'s output at step ``k-1``) then reads a consistent
pair, the hidden tokens together with the memory they were computed against, as the whole network
would at step ``k-1``; and the memory encoder (an MLP, or ``n_cond_layers`` transformer layers)
runs once per step, in the first stage, not once per stage. The cost: only the first stage reads
``t`` and ``cond``; later stages ignore them, so a later stage run at several timesteps at once
(the sampler's stride) returns the same output for each.

The masks are the model's own buffers, passed to each layer exactly as
``TransformerForDiffusion.forward`` has ``nn.TransformerEncoder`` / ``nn.TransformerDecoder``
pass them (``mask``, ``memory_mask``, the ``is_causal`` hint of ``model._is_causal()``), so the
chain of stages reproduces ``model(sample, t, cond)`` exactly.

The stages share the network's modules (no copies): changing its weights changes theirs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise

import torch
from torch import Tensor, nn

from para_policy.models.transformer import TransformerForDiffusion
from para_policy.models.unet_stages import Unit, resolve_cuts, time_units

__all__ = ["TransformerStage", "carried_state", "split_transformer", "transformer_unit_costs",
           "transformer_units"]


def _layers(model: TransformerForDiffusion) -> nn.ModuleList:
    """The trajectory-side layers: the decoder's, or the encoder's in the encoder-only form."""
    return model.encoder.layers if model.encoder_only else model.decoder.layers


def transformer_units(model: TransformerForDiffusion) -> list[Unit]:
    """The network's parts in execution order, each a unit a cut may fall after.

    ``('embed', 0, 0)``, ``('layer', i, 0)`` per decoder layer (encoder layer in the encoder-only
    form), ``('head', 0, 0)``: ``n_layer + 2`` units.
    """
    return [("embed", 0, 0), *(("layer", i, 0) for i in range(len(_layers(model)))), ("head", 0, 0)]


def carried_state(model: TransformerForDiffusion, cut: int) -> list[str]:
    """What crosses the cut before unit ``cut`` besides the hidden tokens: ``['memory']`` or ``[]``.

    The memory is made by the embed unit (unit 0) and read by every decoder layer (units
    ``1 … n_layer``), so it is live at cuts ``1 … n_layer`` of the decoder form only.
    """
    return [] if model.encoder_only or not 1 <= cut <= len(_layers(model)) else ["memory"]


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool "may not attend" mask as the additive float mask (``nn.TransformerEncoder``'s canonical form)."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


@contextmanager
def _plain_layers_if_exporting() -> Iterator[None]:
    """PyTorch's fused attention / encoder-layer kernels off while this forward is traced for ONNX.

    They have no ONNX form (``aten::_native_multi_head_attention``), and
    :class:`~para_policy.stages.OnnxStage` exports a stage as it is, where
    :func:`~para_policy.onnx_backend.export_onnx` turns them off around the whole model's export.
    The plain layers compute the same attention; eager calls are left alone.
    """
    if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        yield
        return
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class TransformerStage(nn.Module):
    """Units ``[start, stop)`` of a :class:`TransformerForDiffusion` as one module (see the module docstring).

    ``forward(x, t (B,), cond (B, To, cond_dim) | None, *skips) -> (x, *skips)``; ``t`` and ``cond``
    are read by the stage holding the embed unit only.
    """

    def __init__(self, model: TransformerForDiffusion, start: int, stop: int) -> None:
        super().__init__()
        if not isinstance(model, TransformerForDiffusion):
            raise TypeError(f"a TransformerStage cuts a TransformerForDiffusion, got {type(model).__name__}")
        units = transformer_units(model)
        if not 0 <= start < stop <= len(units):
            raise ValueError(f"a stage needs 0 <= start < stop <= {len(units)}, got [{start}, {stop})")
        self.network = model
        self.start, self.stop = start, stop
        self.units = units[start:stop]
        self.skips_in = len(carried_state(model, start))
        self.skips_out = len(carried_state(model, stop))
        self.first, self.last = start == 0, stop == len(units)
        self.reads_time = self.first  # later stages read the timestep from the carried memory only

    def forward(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None = None,
                *skips: Tensor) -> tuple[Tensor, ...]:
        if len(skips) != self.skips_in:
            raise ValueError(f"stage [{self.start}, {self.stop}) takes {self.skips_in} skips, got {len(skips)}")
        memory = skips[0] if skips else None
        with _plain_layers_if_exporting():
            for kind, index, _ in self.units:
                if kind == "embed":
                    x, memory = self._embed(x, t, cond)
                elif kind == "layer":
                    x = self._layer(index, x, memory)
                else:
                    x = self._head(x)
        return (x, memory) if self.skips_out else (x,)

    def _embed(self, sample: Tensor, t: Tensor | int | float, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``sample (B, T, input_dim)`` -> hidden tokens, and the memory (B, T_cond, n_emb) or None
        (``TransformerForDiffusion.forward`` up to its encoder / decoder)."""
        net = self.network
        t = t if torch.is_tensor(t) else torch.tensor([t], device=sample.device)
        t = t.reshape(-1).to(sample.device).expand(sample.shape[0])
        time_token = net.time_emb(t).to(sample.dtype).unsqueeze(1)  # (B, 1, n_emb)
        tokens = net.input_emb(sample)
        if net.encoder_only:
            x = torch.cat([time_token, tokens], dim=1)
            return net.drop(x + net.pos_emb[:, : x.shape[1]]), None
        memory = time_token
        if net.obs_as_cond:
            if cond is None:
                raise ValueError("this TransformerForDiffusion is conditioned on observations: pass cond")
            memory = torch.cat([memory, net.cond_obs_emb(cond)], dim=1)
        memory = net.encoder(net.drop(memory + net.cond_pos_emb[:, : memory.shape[1]]))
        return net.drop(tokens + net.pos_emb[:, : tokens.shape[1]]), memory

    def _layer(self, i: int, x: Tensor, memory: Tensor | None) -> Tensor:
        """Layer ``i`` on the hidden tokens, with the arguments ``nn.TransformerEncoder`` /
        ``nn.TransformerDecoder`` give it inside ``TransformerForDiffusion.forward``."""
        net = self.network
        is_causal = net._is_causal() is True  # what their _detect_is_causal_mask makes of the hint
        if net.encoder_only:
            mask = _float_mask(net.mask, x.dtype)
            return net.encoder.layers[i](x, src_mask=mask, is_causal=is_causal, src_key_padding_mask=None)
        return net.decoder.layers[i](x, memory, tgt_mask=net.mask, memory_mask=net.memory_mask,
                                     tgt_is_causal=is_causal, memory_is_causal=False)

    def _head(self, x: Tensor) -> Tensor:
        """Hidden tokens -> ``(B, T, output_dim)`` (the stack's final norm, if any, then ln_f and head)."""
        net = self.network
        stack = net.encoder if net.encoder_only else net.decoder
        if stack.norm is not None:
            x = stack.norm(x)
        if net.encoder_only:
            x = x[:, 1:]
        return net.head(net.ln_f(x))


def transformer_unit_costs(model: TransformerForDiffusion, sample_shape: Sequence[int], cond: Tensor | None = None,
                           *, reps: int = 7) -> list[float]:
    """Each unit's median wall time (seconds) in eager PyTorch at one row, on this machine now.

    ``sample_shape``: ``(T, input_dim)``; ``cond``: (1, To, cond_dim) or None. Eager for the
    reasons of :func:`~para_policy.models.unet_stages.unit_costs`.
    """
    p = next(model.parameters())
    x0 = torch.randn(1, *sample_shape, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    stages = [TransformerStage(model, u, u + 1) for u in range(len(transformer_units(model)))]
    return time_units(stages, x0, torch.tensor([10.0], device=p.device),
                      None if cond is None else cond.to(p.device, p.dtype), reps)


def split_transformer(model: TransformerForDiffusion, num_stages: int, *, costs: Sequence[float] | None = None,
                      cuts: Sequence[int] | None = None, sample_shape: Sequence[int] | None = None,
                      cond: Tensor | None = None) -> list[TransformerStage]:
    """``model`` cut into ``num_stages`` :class:`TransformerStage` s whose chain computes ``model``'s output.

    The cut points are ``cuts`` (``0 = c_0 < … < c_N`` = the number of units) when given, else
    :func:`~para_policy.models.unet_stages.balanced_cuts` of ``costs`` (one per unit of
    :func:`transformer_units`), else of :func:`transformer_unit_costs` measured now on
    ``sample_shape`` ``(T, input_dim)`` and ``cond`` (1, To, cond_dim).
    """
    if not isinstance(model, TransformerForDiffusion):
        raise TypeError(f"split_transformer cuts a TransformerForDiffusion, got {type(model).__name__}")
    measure = None if sample_shape is None else (lambda: transformer_unit_costs(model, sample_shape, cond))
    cuts = resolve_cuts("split_transformer", len(transformer_units(model)), num_stages, cuts, costs, measure)
    return [TransformerStage(model, a, b) for a, b in pairwise(cuts)]
