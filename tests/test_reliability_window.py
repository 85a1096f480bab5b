"""Issue 31: window='auto' tuning bounded at any batch size; the window cache's faults named; option bounds."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import MLPDenoiser, dp_ddpm

from para_policy import window as win
from para_policy.samplers import SamplerOptionError, draw_noise, picard_sample, sampler_spec, taa_sample
from para_policy.schedule import make_schedule

STEPS, T, D = 20, 5, 3
CANDIDATES = (1, 8, STEPS)


class CountingDenoiser:
    """An MLP denoiser that records the rows of every call."""

    def __init__(self) -> None:
        self.net = MLPDenoiser(dim=D, cond_dim=4, seed=2)
        self.rows: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.net(x, t, c)


def calibrate(batch: int, **options) -> tuple[CountingDenoiser, int, dict]:
    den = CountingDenoiser()
    cond = torch.randn(batch, 4, generator=torch.Generator().manual_seed(1))
    spec = sampler_spec("paradigms", tolerance=0.1, **options)
    window, info = win.calibrate_window(den, make_schedule(dp_ddpm(), STEPS), spec,
                                        [win.Problem((batch, T, D), cond)], CANDIDATES, reps=1)
    return den, window, info


def test_tuning_calls_the_model_on_bounded_rows_whatever_the_batch_size():
    """The cost curve stops at MAX_CURVE_ROWS, the windows run on single samples: the same calls at batch 64 or 512."""
    counts, infos = {}, {}
    for batch in (1, 64, 512):
        den, window, infos[batch] = calibrate(batch)
        assert max(den.rows) <= 100  # MAX_CURVE_ROWS (the widest window here is 20)
        assert window in CANDIDATES
        counts[batch] = sum(den.rows)
    assert counts[64] == counts[512]
    assert [infos[b]["calibration_samples"] for b in (1, 64, 512)] == [1, 1, 1]  # one per problem
    # the prediction still prices the batch: a round of window 8 at batch 512 evaluates up to 512·8 rows
    assert infos[512]["predicted_ms"][8] > infos[1]["predicted_ms"][8]


def test_a_batch_round_is_the_sum_of_its_samples_rounds():
    """Per-sample windows slide independently, so the rows of a batch's rounds add up from single samples."""
    den = MLPDenoiser(dim=D, cond_dim=4, seed=2)
    schedule = make_schedule(dp_ddpm(), STEPS)
    x_T, noise = draw_noise(schedule, (2, T, D), torch.Generator().manual_seed(3))
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(4))
    options = dict(window=8, tolerance=0.1)
    both = picard_sample(den, schedule, x_T, noise, condition=cond, **options)[1].rows_per_round
    alone = [picard_sample(den, schedule, x_T[i:i + 1], noise[i:i + 1], condition=cond[i:i + 1],
                           **options)[1].rows_per_round for i in range(2)]
    assert win.batch_trace(alone, 2)[0] == both
    runs = [[2, 2, 1], [2, 1]]
    assert win.batch_trace(runs, 1) == runs
    assert win.batch_trace(runs, 2) == [[4, 3, 1], [4, 3, 1]]
    assert win.batch_trace(runs, 3) == [[6, 5, 2], [6, 4, 1]]  # run 0 twice in chunk 0, run 1 twice in chunk 1
    assert win.batch_trace(runs, 2, shared=True) == [[4, 4, 2], [4, 4, 2]]  # the batch waits for its slowest


def tuned(window: int = 8):
    calls = []

    def tune():
        calls.append(1)
        return window, {"predicted_ms": {window: 1.0}, "round_shape": "compact"}

    return tune, calls


@pytest.mark.parametrize("entry, fault", [
    ({"window": 0}, "window=0 is not an integer >= 1"),
    ({"window": True}, "window=True is not an integer >= 1"),
    ({"window": 8, "round_shape": "round"}, "round_shape='round' is not one of"),
    ({"window": 8, "cost": {"many": 1.0}}, "not keyed by integers"),
    ("16", "window=None"),
])
def test_a_bad_cached_window_is_named_ignored_and_replaced(entry, fault, caplog):
    path = win.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": entry, "other": {"window": 4}}))
    tune, calls = tuned(8)
    with caplog.at_level(logging.WARNING, logger="para_policy.window"):
        assert win.resolve_window("key", tune)[0] == 8
    assert calls == [1] and str(path) in caplog.text and fault in caplog.text
    stored = json.loads(path.read_text())
    assert stored["key"]["window"] == 8 and stored["other"] == {"window": 4}  # replaced, the rest kept
    win._MEMORY.clear()
    assert win.resolve_window("key", tune)[0] == 8 and calls == [1]  # read back from the file


def test_a_cache_path_that_is_a_folder_warns_once_and_leaves_no_temporary_files(caplog):
    path = win.cache_path()
    path.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="para_policy.window"):
        for run in range(3):
            win._MEMORY.clear()
            assert win.resolve_window(f"key{run}", tuned(8)[0])[0] == 8
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing left beside it
    assert caplog.text.count("cannot write the cache") == 1 and str(path) in caplog.text


def test_an_unreadable_cache_file_is_named_and_rewritten(caplog):
    path = win.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="para_policy.window"):
        assert win.resolve_window("key", tuned(16)[0])[0] == 16
    assert "is not a JSON object" in caplog.text and str(path) in caplog.text
    assert json.loads(path.read_text())["key"]["window"] == 16


@pytest.mark.parametrize("tolerance", [1e200, 10.5, math.inf])
def test_a_tolerance_out_of_range_is_refused_naming_the_range(tolerance):
    expected = r"tolerance must be a finite number >= 0 and <= 10 \(in units of each step's noise std\)"
    with pytest.raises(SamplerOptionError, match=expected):
        sampler_spec("paradigms", tolerance=tolerance)
    schedule = make_schedule(dp_ddpm(), STEPS)
    x_T, noise = draw_noise(schedule, (1, T, D), torch.Generator().manual_seed(0))
    with pytest.raises(SamplerOptionError, match=expected):  # the sampler function runs the same check
        picard_sample(MLPDenoiser(dim=D), schedule, x_T, noise, tolerance=tolerance)


def test_sampler_functions_refuse_options_with_the_registrys_errors():
    schedule = make_schedule(dp_ddpm(), STEPS)
    x_T, noise = draw_noise(schedule, (1, T, D), torch.Generator().manual_seed(0))
    den = MLPDenoiser(dim=D)
    for sample, options, key in [(picard_sample, {"window": 0}, "window"),
                                 (picard_sample, {"window": "auto"}, "window"),
                                 (picard_sample, {"max_iterations": 0}, "max_iterations"),
                                 (taa_sample, {"memory": 0}, "memory"),
                                 (taa_sample, {"ridge": -1.0}, "ridge")]:
        with pytest.raises(SamplerOptionError) as raised:
            sample(den, schedule, x_T, noise, **options)
        assert raised.value.key == key
        if options != {"window": "auto"}:  # a spec takes 'auto'; otherwise the same message as a spec's
            with pytest.raises(SamplerOptionError) as spec_raised:
                sampler_spec("parataa", **options)
            assert str(raised.value).split(", got")[0] in str(spec_raised.value)


@pytest.mark.parametrize("deadline", [math.nan, math.inf, -math.inf, "soon", True])
def test_a_deadline_that_can_never_be_reached_is_refused(deadline):
    schedule = make_schedule(dp_ddpm(), STEPS)
    x_T, noise = draw_noise(schedule, (1, T, D), torch.Generator().manual_seed(0))
    for sample in (picard_sample, taa_sample):
        with pytest.raises(ValueError, match="deadline_at must be a finite time.perf_counter"):
            sample(MLPDenoiser(dim=D), schedule, x_T, noise, window=8, deadline_at=deadline)
