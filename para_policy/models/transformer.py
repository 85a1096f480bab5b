"""DiffusionPolicy's second denoiser family, ``TransformerForDiffusion``, with its state_dict names.

A GPT-style time-series denoiser (Chi et al.): the action trajectory ``(B, T, input_dim)`` is
embedded token per time step and decoded, with causal self-attention when ``causal_attn``,
against a memory of condition tokens: the diffusion step's sinusoidal embedding first, then one
token per observation step (``cond (B, To, cond_dim)``), passed through a small MLP
(``n_cond_layers=0``) or a transformer encoder. ``time_as_cond=False`` without observations
makes it encoder-only, with the time token prepended to the trajectory.

The attention masks are saved buffers (``mask``, ``memory_mask``), as in DiffusionPolicy, so
its checkpoints load with ``strict=True``. The layers are PyTorch's own
``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (pre-norm, GELU, batch first).

Whether ``mask`` is the causal mask is known when it is built or loaded (:attr:`mask_is_causal`)
and passed to the encoder / decoder as ``is_causal``: left to them, they would detect it on every
forward by comparing the mask with a causal one and reading the answer on the host
(``bool((mask == causal).all())``), a device sync per call that is illegal inside a CUDA graph
capture. The layers receive the same arguments as after that detection, so the outputs are the same.

Shapes: ``forward(sample (B, T, input_dim), timestep (B,) | scalar, cond (B, To, cond_dim) | None)
-> (B, T, output_dim)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from para_policy.models.unet1d import SinusoidalPosEmb


def _additive(mask: Tensor) -> Tensor:
    """A bool "may attend" mask as the float mask PyTorch adds to attention logits (0 / -inf)."""
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


def is_causal_mask(mask: Tensor | None) -> bool:
    """Whether ``mask`` (T, T) is PyTorch's causal mask (0 on and below the diagonal, -inf above), read on the host.

    What ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` detect per forward when not told
    (``torch.nn.modules.transformer._detect_is_causal_mask``); computed once here instead.
    """
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.is_meta:
        return False
    causal = nn.Transformer.generate_square_subsequent_mask(mask.shape[0], device=mask.device, dtype=mask.dtype)
    return bool((mask == causal).all())


class TransformerForDiffusion(nn.Module):
    """DiffusionPolicy's ``TransformerForDiffusion`` (same arguments, state_dict keys and outputs)."""

    def __init__(self, input_dim: int, output_dim: int, horizon: int, n_obs_steps: int | None = None,
                 cond_dim: int = 0, n_layer: int = 12, n_head: int = 12, n_emb: int = 768,
                 p_drop_emb: float = 0.1, p_drop_attn: float = 0.1, causal_attn: bool = False,
                 time_as_cond: bool = True, obs_as_cond: bool = False, n_cond_layers: int = 0) -> None:
        super().__init__()
        n_obs_steps = horizon if n_obs_steps is None else n_obs_steps
        obs_as_cond = cond_dim > 0  # as DiffusionPolicy decides it (the argument is overridden)
        if obs_as_cond and not time_as_cond:
            raise ValueError("cond_dim > 0 needs time_as_cond=True (as in DiffusionPolicy)")
        T = horizon + (0 if time_as_cond else 1)  # tokens the trajectory side sees
        T_cond = (1 if time_as_cond else 0) + (n_obs_steps if obs_as_cond else 0)

        def layer(kind: type[nn.Module]) -> nn.Module:
            return kind(d_model=n_emb, nhead=n_head, dim_feedforward=4 * n_emb, dropout=p_drop_attn,
                        activation="gelu", batch_first=True, norm_first=True)

        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, T, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb) if obs_as_cond else None
        self.cond_pos_emb = None
        self.decoder = None
        self.encoder_only = T_cond == 0
        if not self.encoder_only:
            self.cond_pos_emb = nn.Parameter(torch.zeros(1, T_cond, n_emb))
            if n_cond_layers > 0:
                self.encoder = nn.TransformerEncoder(layer(nn.TransformerEncoderLayer), num_layers=n_cond_layers,
                                                     enable_nested_tensor=False)
            else:
                self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
            self.decoder = nn.TransformerDecoder(layer(nn.TransformerDecoderLayer), num_layers=n_layer)
        else:
            self.encoder = nn.TransformerEncoder(layer(nn.TransformerEncoderLayer), num_layers=n_layer,
                                                 enable_nested_tensor=False)
        steps = torch.arange(T)
        # saved buffers when causal (DiffusionPolicy's checkpoints hold them), plain None otherwise
        self.register_buffer("mask", _additive(steps[:, None] >= steps[None, :]) if causal_attn else None)
        # trajectory step t sees the time token and the observation tokens up to t
        memory = causal_attn and time_as_cond and obs_as_cond
        self.register_buffer("memory_mask", _additive(steps[:, None] >= torch.arange(T_cond)[None, :] - 1)
                             if memory else None)
        #: whether ``mask`` is causal (it is as built; a loaded ``mask`` is checked in _load_from_state_dict)
        self.mask_is_causal = bool(causal_attn)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)
        self.T, self.T_cond, self.horizon = T, T_cond, horizon
        self.time_as_cond, self.obs_as_cond = time_as_cond, obs_as_cond

    def forward(self, sample: Tensor, timestep: Tensor | int | float, cond: Tensor | None = None,
                **kwargs: object) -> Tensor:
        """``(B, T, input_dim)`` noisy trajectory, step(s), ``(B, To, cond_dim)`` → ``(B, T, output_dim)``."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = t.reshape(-1).to(sample.device).expand(sample.shape[0])
        time_token = self.time_emb(t).to(sample.dtype).unsqueeze(1)  # (B, 1, n_emb)
        tokens = self.input_emb(sample)
        if self.encoder_only:
            x = torch.cat([time_token, tokens], dim=1)
            x = self.drop(x + self.pos_emb[:, : x.shape[1]])
            x = self.encoder(src=x, mask=self.mask, is_causal=self._is_causal())[:, 1:]
        else:
            memory = time_token
            if self.obs_as_cond:
                if cond is None:
                    raise ValueError("this TransformerForDiffusion is conditioned on observations: pass cond")
                memory = torch.cat([memory, self.cond_obs_emb(cond)], dim=1)
            memory = self.encoder(self.drop(memory + self.cond_pos_emb[:, : memory.shape[1]]))
            x = self.drop(tokens + self.pos_emb[:, : tokens.shape[1]])
            x = self.decoder(tgt=x, memory=memory, tgt_mask=self.mask, memory_mask=self.memory_mask,
                             tgt_is_causal=self._is_causal())
        return self.head(self.ln_f(x))

    def _is_causal(self) -> bool | None:
        """The ``is_causal`` hint for ``self.mask``: None without a mask (nothing to detect), else
        :attr:`mask_is_causal`."""
        return None if self.mask is None else self.mask_is_causal

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        mask = state_dict.get(prefix + "mask")
        if torch.is_tensor(mask) and not mask.is_meta:  # a checkpoint's own mask: check it once, on load
            self.mask_is_causal = is_causal_mask(mask)
