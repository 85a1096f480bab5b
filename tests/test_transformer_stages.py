"""AsyncDiff's stage split of TransformerForDiffusion: recombination, balancing, bad arguments, stale carries, ONNX."""

from __future__ import annotations

import pytest
import torch

from para_policy.models.transformer import TransformerForDiffusion
from para_policy.models.transformer_stages import (
    TransformerStage,
    carried_state,
    split_transformer,
    transformer_unit_costs,
    transformer_units,
)
from para_policy.models.unet1d import ConditionalUnet1D

T, D, TO, C = 8, 2, 2, 5
#: the three forms: observation-conditioned decoder, causal decoder with an encoder, encoder-only
FORMS = {
    "obs_decoder": dict(n_obs_steps=TO, cond_dim=C),
    "causal_decoder": dict(n_obs_steps=TO, cond_dim=C, causal_attn=True, n_cond_layers=1),
    "encoder_only": dict(time_as_cond=False, causal_attn=True),
}


def tiny_transformer(form: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> TransformerForDiffusion:
    torch.manual_seed(seed)
    return TransformerForDiffusion(input_dim=D, output_dim=D, horizon=T, n_layer=4, n_head=4, n_emb=32,
                                   **FORMS[form]).to(dtype).eval()


def inputs(model: TransformerForDiffusion, rows: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, T, D, generator=g, dtype=dtype)
    t = torch.randint(0, 100, (rows,), generator=g).to(dtype)
    cond = torch.randn(rows, TO, C, generator=g, dtype=dtype) if model.obs_as_cond else None
    return x, t, cond


def chain(stages, x, t, cond):
    carry = (x,)
    with torch.inference_mode():
        for s in stages:
            carry = s(carry[0], t, cond, *carry[1:])
    return carry


@pytest.mark.parametrize("form", list(FORMS))
def test_every_split_recombines_to_the_whole_network(form: str) -> None:
    model = tiny_transformer(form)
    U = len(transformer_units(model))
    for rows in (3, 1):
        x, t, cond = inputs(model, rows)
        with torch.inference_mode():
            whole = model(x, t, cond)
        for n in (1, 2, 3):
            stages = split_transformer(model, n, costs=[1.0] * U)
            assert len(stages) == n and stages[0].first and stages[-1].last
            (out,) = chain(stages, x, t, cond)
            assert out.shape == (rows, T, D)
            assert (out - whole).abs().max().item() <= 1e-6, (form, n)
        for cut in range(1, U):
            (out,) = chain(split_transformer(model, 2, cuts=[0, cut, U]), x, t, cond)
            assert (out - whole).abs().max().item() <= 1e-6, (form, cut)
        (out,) = chain(split_transformer(model, 3, cuts=[0, 1, U - 1, U]), x, t, cond)
        assert (out - whole).abs().max().item() <= 1e-6, form


def test_units_and_what_each_cut_carries() -> None:
    dec, enc = tiny_transformer("obs_decoder"), tiny_transformer("encoder_only")
    expected = [("embed", 0, 0), *(("layer", i, 0) for i in range(4)), ("head", 0, 0)]
    assert transformer_units(dec) == transformer_units(enc) == expected
    assert [carried_state(dec, c) for c in range(7)] == [[], *[["memory"]] * 4, [], []]
    assert all(carried_state(enc, c) == [] for c in range(7))
    stages = split_transformer(dec, 3, cuts=[0, 2, 5, 6])
    assert [(s.skips_in, s.skips_out) for s in stages] == [(0, 1), (1, 0), (0, 0)]
    assert all(s.network is dec for s in stages) and stages[1].units == expected[2:5]
    x, t, cond = inputs(dec, 2)
    hidden, memory = chain(stages[:1], x, t, cond)
    assert hidden.shape == (2, T, 32) and memory.shape == (2, 1 + TO, 32)
    (hidden,) = chain(split_transformer(enc, 2, cuts=[0, 3, 6])[:1], *inputs(enc, 2))
    assert hidden.shape == (2, T + 1, 32)  # the time token travels first


def test_balanced_cuts_on_given_and_measured_costs() -> None:
    model = tiny_transformer("obs_decoder")
    cuts = lambda stages: [stages[0].start, *(s.stop for s in stages)]  # noqa: E731
    assert cuts(split_transformer(model, 2, costs=[3, 1, 1, 1, 1, 1])) == [0, 2, 6]
    assert cuts(split_transformer(model, 3, costs=[3, 1, 1, 1, 1, 1])) == [0, 1, 3, 6]
    assert cuts(split_transformer(model, 3, costs=[1, 2, 2, 2, 2, 1])) == [0, 2, 4, 6]
    assert cuts(split_transformer(model, 6, costs=[1] * 6)) == list(range(7))
    x, t, cond = inputs(model, 1)
    costs = transformer_unit_costs(model, (T, D), cond, reps=1)
    assert len(costs) == 6 and all(c > 0 for c in costs)
    stages = split_transformer(model, 2, sample_shape=(T, D), cond=cond)
    with torch.inference_mode():
        assert (chain(stages, x, t, cond)[0] - model(x, t, cond)).abs().max().item() <= 1e-6


def test_bad_arguments_are_named() -> None:
    model = tiny_transformer("obs_decoder")
    unet = ConditionalUnet1D(D, diffusion_step_embed_dim=8, down_dims=(8, 16), kernel_size=3, n_groups=4)
    with pytest.raises(TypeError, match="cuts a TransformerForDiffusion, got ConditionalUnet1D"):
        split_transformer(unet, 2, cuts=[0, 1, 6])
    with pytest.raises(TypeError, match="got ConditionalUnet1D"):
        TransformerStage(unet, 0, 1)
    for bad in ([0, 0, 6], [0, 3, 5], [1, 3, 6], [0, 4, 3, 6], [0, 6]):
        with pytest.raises(ValueError, match="cuts must rise strictly from 0 to 6 in 2 stages"):
            split_transformer(model, 2, cuts=bad)
    with pytest.raises(ValueError, match=r"costs must give one number per unit \(6\), got 5"):
        split_transformer(model, 2, costs=[1] * 5)
    with pytest.raises(ValueError, match="needs cuts=, costs= or sample_shape="):
        split_transformer(model, 2)
    with pytest.raises(ValueError, match="num_stages"):
        split_transformer(model, 7, costs=[1] * 6)
    with pytest.raises(ValueError, match=r"0 <= start < stop <= 6, got \[3, 7\)"):
        TransformerStage(model, 3, 7)
    first, second = split_transformer(model, 2, cuts=[0, 3, 6])
    x, t, cond = inputs(model, 2)
    hidden, memory = chain([first], x, t, cond)
    with pytest.raises(ValueError, match=r"stage \[3, 6\) takes 1 skips, got 0"):
        second(hidden, t, cond)
    with pytest.raises(ValueError, match=r"stage \[0, 3\) takes 0 skips, got 1"):
        first(x, t, cond, memory)
    with pytest.raises(ValueError, match="pass cond"):
        first(x, t, None)


@pytest.mark.parametrize("form", ["causal_decoder", "encoder_only"])
def test_a_stage_on_a_stale_carry_runs_on_the_pair_it_was_given(form: str) -> None:
    model = tiny_transformer(form)
    stages = split_transformer(model, 3, cuts=[0, 2, 4, 6])
    x_old, t_old, cond = inputs(model, 2, seed=1)
    x_new, t_new, _ = inputs(model, 2, seed=2)
    stale = chain(stages[:1], x_old, t_old, cond)  # stage 0's carry from the previous step
    fresh = chain(stages[:1], x_new, t_new, cond)
    with torch.inference_mode():
        mid = stages[1](stale[0], t_new, cond, *stale[1:])
        assert [m.shape for m in mid] == [f.shape for f in fresh]
        (out,) = stages[2](mid[0], t_new, cond, *mid[1:])
        assert out.shape == (2, T, D) and torch.isfinite(out).all()
        # the carried memory goes with its hidden tokens: the stale chain is the whole network at the old step
        assert (out - model(x_old, t_old, cond)).abs().max().item() <= 1e-6
        assert (out - model(x_new, t_new, cond)).abs().max().item() > 1e-3


@pytest.mark.parametrize("form", ["causal_decoder", "encoder_only"])
def test_the_stages_export_to_onnx_as_onnx_stages(form: str) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from para_policy.onnx_backend import export_onnx
    from para_policy.stages import OnnxStage

    model = tiny_transformer(form, dtype=torch.float32)
    x, t, cond = inputs(model, 2, dtype=torch.float32)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    carry: tuple[torch.Tensor, ...] = (x,)
    for stage in split_transformer(model, 3, cuts=[0, 2, 4, 6]):
        example = (carry[0], t, cond, *carry[1:])
        try:
            runner = OnnxStage(stage, example)
        except RuntimeError as stage_error:
            try:
                export_onnx(model, (T, D), None if cond is None else (TO, C), "cond")
            except Exception as e:  # noqa: BLE001 - the whole network does not export here either
                pytest.skip(f"TransformerForDiffusion itself does not export to ONNX here: {e}")
            raise stage_error
        with torch.inference_mode():
            carry = stage(*example)
        got = runner(example)
        assert len(got) == len(carry)
        for a, b in zip(got, carry, strict=True):
            assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    assert torch.backends.mha.get_fastpath_enabled() == fastpath and not model.training
