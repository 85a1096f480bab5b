"""para_policy.bench (issue 27): the benchmarks' replay loop, noise keys, stream files and report writer.

The replay loop is checked against independent references built from the public API alone:
``predict_action`` on noise drawn here from the documented seeds, the warm start built here
from the previous chunk's trajectory. The shipped PushT policy on DDIM-8 and three chunks of
the committed stream keep it to seconds.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from para_policy import load_policy
from para_policy.bench import (
    ChunkKeys,
    Variant,
    deviations,
    load_stream,
    parse_schedule,
    percentile_summary,
    replay,
    sampler_call,
    save_stream,
    schedule_label,
    schedule_spec,
    seed_for,
    split_stream,
    spread,
    write_report,
)
from para_policy.samplers import draw_noise, shift_trajectory

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
KEYS = ChunkKeys(stream=5, noise_seed=3)


@pytest.fixture(scope="module")
def policy():
    return load_policy(CHECKPOINT, backend="eager")


@pytest.fixture(scope="module")
def chunks():
    stream, _ = load_stream(STREAM)
    first = stream[0]["episode"]
    return [c for c in stream if c["episode"] == first][:3]


def reference_noise(policy, spec, seed):
    """``x_T`` and noise as the module docstring of para_policy.bench.noise says: a CPU generator, draw_noise."""
    return draw_noise(policy.schedule_for(spec), policy.trajectory_shape(1), torch.Generator().manual_seed(seed))


def test_seeds_are_the_evaluators_hash_of_the_chunk_key_or_a_positional_offset():
    chunk = {"episode": 100003, "chunk": 7}
    state = np.random.SeedSequence([5, 3, 100003, 7]).generate_state(2, dtype=np.uint32)
    assert KEYS.seed(chunk, 0) == (int(state[0]) << 31) ^ int(state[1]) == seed_for(5, 3, 100003, 7)
    assert KEYS.seed(chunk, 9) == KEYS.seed(chunk, 0)  # the key names the chunk, not its position
    assert KEYS.seed(chunk, 0, row=1) == seed_for(5, 3, 100003, 7, 1) != KEYS.seed(chunk, 0)
    assert ChunkKeys(stream=None, noise_seed=3).key(chunk) == (3, 100003, 7)
    assert ChunkKeys(stream=None, offset=1000).seed(chunk, 4) == 1004
    with pytest.raises(ValueError):
        ChunkKeys(stream=None, offset=1000).seed(chunk, 4, row=1)


def test_a_replayed_sequential_variant_is_predict_action_on_the_chunks_noise(policy, chunks):
    spec = schedule_spec("sequential", "ddim8")
    records = replay(policy, [Variant("seq", spec)], chunks, KEYS, warmup=0)["seq"]
    assert [(r["episode"], r["chunk"]) for r in records] == [(c["episode"], c["chunk"]) for c in chunks]
    for i, (rec, ch) in enumerate(zip(records, chunks, strict=True)):
        x_T, noise = reference_noise(policy, spec, KEYS.seed(ch, i))
        out = policy.predict_action({"obs": torch.from_numpy(ch["obs"])[None]}, x_T=x_T, noise=noise, sampler=spec)
        np.testing.assert_array_equal(rec["action"], out["action"][0].numpy())
        assert rec["rounds"] == 8 and rec["model_evals"] == 8 and not rec["warm"] and rec["ms"] > 0


def test_a_warm_started_variant_starts_cold_then_from_its_own_previous_chunk(policy, chunks):
    warm = schedule_spec("paradigms", "ddim8", window=8, tolerance=0.5)
    cold = warm.with_options(warm_start=False)
    exact = warm.with_options(tolerance=0.0)
    variants = [Variant("seq", schedule_spec("sequential", "ddim8")), Variant("warm", warm), Variant("cold", cold),
                Variant("exact", exact)]
    records = replay(policy, variants, chunks, KEYS, warmup=1)
    assert [r["warm"] for r in records["warm"]] == [False, True, True]  # the episode's first chunk is cold
    assert not any(r["warm"] for r in records["cold"])
    # chunk 0 of the warm variant is the cold one; chunk 1 starts from the warm variant's own chunk 0
    np.testing.assert_array_equal(records["warm"][0]["action"], records["cold"][0]["action"])
    obs = [torch.from_numpy(c["obs"])[None] for c in chunks]
    noise = [reference_noise(policy, warm, KEYS.seed(c, i)) for i, c in enumerate(chunks)]
    first = policy.predict_action({"obs": obs[0]}, x_T=noise[0][0], noise=noise[0][1], sampler=warm, warm_start=False)
    second = policy.predict_action({"obs": obs[1]}, x_T=noise[1][0], noise=noise[1][1], sampler=warm,
                                   guess=shift_trajectory(first.trajectory, policy.n_action_steps))
    np.testing.assert_array_equal(records["warm"][1]["action"], second["action"][0].numpy())
    assert records["warm"][1]["rounds"] == second.stats.rounds
    # at tolerance 0 a warm-started Picard sampler is the sequential loop on the same noise
    assert max(deviations(records["exact"], records["seq"])) < 1e-3


def test_variants_alternate_their_order_chunk_by_chunk(policy, chunks):
    calls = []

    @contextlib.contextmanager
    def log(variant, _policy):
        calls.append(variant.name)
        yield {"logged": True}

    spec = schedule_spec("sequential", "ddim8")
    records = replay(policy, [Variant("a", spec), Variant("b", spec)], chunks, KEYS, warmup=0, instrument=log)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert all(r["logged"] for r in records["a"])
    with pytest.raises(ValueError, match="unique"):
        replay(policy, [Variant("a", spec), Variant("a", spec)], chunks, KEYS)


def test_sampler_call_samples_as_predict_action_does(policy, chunks):
    spec = schedule_spec("paradigms", "ddim8", window=8)
    records = replay(policy, [Variant("predict", spec), Variant("sampler", spec, call=sampler_call())], chunks, KEYS,
                     warmup=0)
    for a, b in zip(records["predict"], records["sampler"], strict=True):
        np.testing.assert_allclose(a["action"], b["action"], atol=1e-5, rtol=0)
        assert (a["rounds"], a["warm"]) == (b["rounds"], b["warm"])


def test_stream_files_round_trip_and_split_off_the_calibration_episode(tmp_path):
    chunks = [{"episode": e, "chunk": c, "obs": np.full((2, 3), e + c, dtype=np.float32)}
              for e in (10, 11, 12) for c in range(3)]
    save_stream(tmp_path / "s.json", chunks, {"calibration_seed": 12})
    back, meta = load_stream(tmp_path / "s.json")
    assert meta == {"calibration_seed": 12} and len(back) == 9 and back[4]["obs"].dtype == np.float32
    np.testing.assert_array_equal(back[4]["obs"], chunks[4]["obs"])
    replayed, calib = split_stream(back, 12, episodes=1, max_chunks=2, calib_chunks=1)
    assert [(c["episode"], c["chunk"]) for c in replayed] == [(10, 0), (10, 1)]
    assert [(c["episode"], c["chunk"]) for c in calib] == [(12, 0)]
    assert spread(9, 3) == [0, 4, 8] and spread(2, 5) == [0, 1] and spread(0, 3) == []


def test_schedule_names():
    assert parse_schedule("ddim10") == ("ddim", 10) and parse_schedule("dpm2-16") == ("dpmsolver++", 16)
    assert schedule_label("ddpm100") == "DDPM-100" and schedule_label("dpm3-10") == "DPM-Solver++(3)-10"
    assert schedule_spec("paradigms", "dpm2-5", window=5).solver_order == 2
    for bad in ("ddim", "dpm4-10", "ddim0", "euler10"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_percentile_summary_matches_numpy_and_is_empty_safe():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 100.0]
    s = percentile_summary(values)
    assert s["n"] == 6 and s["max"] == 100.0 and s["min"] == 1.0
    for p in (50, 95, 99):
        assert s[f"p{p}"] == pytest.approx(float(np.percentile(values, p)))
    assert percentile_summary([])["p50"] is None and percentile_summary([])["n"] == 0


def test_write_report_writes_json_then_markdown_and_a_failed_write_keeps_the_old_files(tmp_path, monkeypatch):
    stem = tmp_path / "out" / "bench_x"
    write_report(stem, "# old\n", {"v": np.float32(1.5), "path": tmp_path})
    assert json.loads((tmp_path / "out" / "bench_x.json").read_text()) == {"v": 1.5, "path": str(tmp_path)}
    real = Path.write_text

    def torn(self, text, *args, **kwargs):  # half the text reaches the disk, then the process dies
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        write_report(stem, "# new and longer\n", {"v": 2.5})
    monkeypatch.undo()
    assert (tmp_path / "out" / "bench_x.md").read_text() == "# old\n"
    assert json.loads((tmp_path / "out" / "bench_x.json").read_text())["v"] == 1.5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench_x.json", "bench_x.md"]  # no temp file


def test_the_package_imports_no_evaluation_extras():
    heavy = ("para_policy.evaluation", "gymnasium", "hydra", "wandb")
    code = (f"import sys; import para_policy.bench; bad = [m for m in sys.modules if m.startswith({heavy!r})]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
