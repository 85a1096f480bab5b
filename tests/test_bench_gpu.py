"""The per-schedule latency benchmarks (issue 13): eval/bench_gpu.sh's CPU fallback and eval/bench_latency.py.

Both with tiny sizes on the shipped PushT policy: seconds per run. bench_gpu runs through its
bash wrapper in a subprocess (what a GPU machine runs); bench_latency in this process.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STEPS = {"ddim8": 8, "ddim10": 10}


@pytest.fixture
def eval_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "eval"))
    return importlib.import_module


def test_bench_gpu_cpu_fallback_writes_cost_curves_per_network_and_rounds_per_schedule(tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": ""}
    # the captured part runs the first of its schedules only (reduced sizes): DDIM-4, the cheapest
    proc = subprocess.run(["bash", str(ROOT / "eval" / "bench_gpu.sh"), "--quick", "--out", str(tmp_path),
                           "--schedules", *STEPS, "--captured-schedules", "ddim4", "ddim8", "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    md = (tmp_path / "bench_gpu.md").read_text()
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert "Ran on the CPU (no CUDA device)" in md and data["meta"]["reduced"] is True
    nets = data["networks"]
    assert nets["default"]["model"]["down_dims"] == [256, 512, 1024]
    assert nets["default"]["params"] > 10 * nets["shipped"]["params"]
    for net in ("shipped", "default"):
        label = nets[net]["label"]
        assert f"| {label}, fp32 | " in md and f"| {label}, bf16 | " in md
        assert f"| {label}, cuda-graphs | skipped: no CUDA |" in md
        assert sorted(int(n) for n in data["cost"][net]["fp32"]) == [1, 2]
    for s, steps in STEPS.items():
        label = f"DDIM-{steps}"
        rows = data["schedules"][s]["rows"]
        assert [r["name"] for r in rows] == ["sequential", "paradigms", "paradigms_published"]
        seq = rows[0]
        assert seq["rounds_mean"] == steps and seq["dev_max_px"] == 0 and seq["chunks"] == 2
        assert f"### {label}" in md and f"| {label} | sequential | fp32 |" in md  # measured and predicted tables
        # the default-size network costs more per call, so its predicted chunks take longer
        assert all(r["predicted_ms"]["default"] > r["predicted_ms"]["shipped"] > 0 for r in rows)
    check_captured_part(data, md)


def check_captured_part(data, md):
    """The captured part on the CPU: the first schedule only, static buffers run eagerly, every variant's row."""
    part = data["captured"]
    assert part["capture"] is False and list(part["schedules"]) == ["ddim4"] and part["n_chunks"] == 2
    res = part["schedules"]["ddim4"]
    assert res["windows"] == [4] and res["failed"] == {}  # 'full' and 16, clipped to the 4 steps
    rows = {r["key"]: r for r in res["rows"]}
    assert len(rows) == 8 and all(r["chunks"] == 2 for r in rows.values())
    for p in ("fp32", "bf16"):
        for execution in ("eager", "captured"):
            seq, par = rows[f"sequential | {execution} | {p}"], rows[f"paradigms | {execution} | {p} | w4"]
            assert seq["rounds_mean"] == seq["rounds_max"] == 4
            assert 1 <= par["rounds_mean"] <= par["rounds_max"] <= 4 and par["warm_chunks"] == 1
            assert all(0 <= r["dev_max_px"] < 5 and r["ms_p50"] > 0 for r in (seq, par))
    assert rows["sequential | eager | fp32"]["dev_max_px"] == 0
    assert rows["sequential | captured | fp32"]["dev_max_px"] < 1e-3  # the same loop on static buffers
    assert res["best"]["speedup_p50"] > 0
    costs = {c["key"]: c for c in res["round_cost"]}
    assert set(costs) == {k for k in rows if " | captured | " in k}
    assert all(c["rows"] == (4 if c["sampler"] == "paradigms" else 1) and c["unit_ms"] > 0 and c["model_ms"] > 0
               for c in costs.values())
    assert "## The honest GPU baseline" in md and "`capture=False`" in md
    assert "| DDIM-4 | sequential, captured whole, fp32 | " in md
    assert "| DDIM-4 | `paradigms`, captured rounds (fixed), bf16, window 4 | " in md
    assert "### The round's own cost beside the model's" in md and "| DDIM-4 | `paradigms` round | fp32 | 4 | " in md


def test_bench_gpu_skips_what_does_not_fit_the_time_budget(eval_module, tmp_path):
    bench = eval_module("bench_gpu")
    data = bench.main(["--quick", "--out", str(tmp_path), "--schedules", "ddim8", "--time-budget-s", "0",
                       "--device", "cpu"])
    assert data["schedules"]["ddim8"] == {"skipped": "skipped: time budget"}
    assert data["captured"]["schedules"]["ddim8"] == {"skipped": "skipped: time budget"}
    assert data["cost"]["shipped"]["fp32"] == "skipped: time budget"
    md = (tmp_path / "bench_gpu.md").read_text()
    assert "schedule ddim8: skipped, time budget of 0 s" in md and "| DDIM-8 | skipped: time budget |" in md
    with pytest.raises(SystemExit):
        bench.parse_args(["--captured-windows", "full", "0"])


def test_bench_latency_tiny_run_reports_each_schedule_and_caches_its_scores(eval_module, tmp_path, monkeypatch):
    bench = eval_module("bench_latency")
    out = tmp_path / "bl"
    bench.main(["--episodes", "1", "--max-chunks", "2", "--schedules", *STEPS, "--backends", "eager", "--cost-reps",
                "2", "--scores", "--score-episodes", "1", "--score-max-steps", "24", "--score-envs", "1",
                "--out", str(out)])
    md = (out / "bench_latency.md").read_text()
    data = json.loads((out / "bench_latency.json").read_text())
    assert "## Summary" in md and "## Closed-loop scores" in md and "How to read the columns" in md
    for s, steps in STEPS.items():
        assert f"## DDIM-{steps}" in md and f"| DDIM-{steps} | " in md  # its table and its summary line
        rows = {r["name"]: r for r in data["rows"] if r["schedule"] == s}
        assert set(rows) == {"sequential", "paradigms", "paradigms_published"}
        seq = rows["sequential"]
        assert seq["dev_mean_px"] == seq["dev_max_px"] == 0 and seq["rounds_mean"] == steps and seq["chunks"] == 2
        assert seq["speedup_p50"] == 1  # the only sequential row is the fastest
        assert rows["paradigms"]["window"] in (1, 8, steps) and rows["paradigms_published"]["window"] == 16
        window = rows["paradigms"]["window"]
        for name in (f"{s}_sequential", f"{s}_paradigms_w{window}"):
            score = data["scores"][name]
            assert score["episodes"] == 1 and 0 <= score["mean_score"] <= 1
            assert (out / "scores" / name / "score.json").is_file()
    assert (out / "latency_vs_score.png").stat().st_size > 0 and (out / "stream.json").is_file()
    assert not (out / "latency_vs_tolerance.png").exists()  # only with --ablations

    # the report re-renders from its JSON alone
    bench.main(["--report-only", str(out / "bench_latency.json")])
    assert (out / "bench_latency.md").read_text() == md
    # scores added to it later (here from the cache) are said so, with their command, once
    later = ["--report-only", str(out / "bench_latency.json"), "--scores", "--score-episodes", "1",
             "--score-max-steps", "24", "--score-envs", "1"]
    bench.main(later)
    bench.main(later)
    added = (out / "bench_latency.md").read_text()
    assert added.count("Scores added by: `python eval/bench_latency.py --report-only") == 1
    rescored = json.loads((out / "bench_latency.json").read_text())["scores"]
    assert {n: sc["mean_score"] for n, sc in rescored.items()} == {
        n: sc["mean_score"] for n, sc in data["scores"].items()}
    assert all(sc["computed"] == 0 for sc in rescored.values())  # from the cache

    # a rerun reuses a cached score; another setting recomputes it
    from para_policy.evaluation import rollout
    from para_policy.loading import load_policy

    ran: list[list[int]] = []
    monkeypatch.setattr(rollout, "run_rollouts", lambda policy, spec, task, seeds, **kw: ran.append(list(seeds)))
    policy = load_policy(CHECKPOINT)
    spec = bench.schedule_spec("sequential", "ddim8")
    folder = out / "scores" / "ddim8_sequential"
    again = bench.run_score(policy, spec, "ddim8_sequential", folder, CHECKPOINT, 1, 100000, num_envs=1,
                            max_steps=24, progress=False)
    assert ran == [] and again["computed"] == 0
    assert again["mean_score"] == data["scores"]["ddim8_sequential"]["mean_score"]
    bench.run_score(policy, spec, "ddim8_sequential", folder, CHECKPOINT, 1, 100000, num_envs=1, max_steps=16,
                    progress=False)
    assert ran == [[100000]]


def test_backends_that_cannot_run_are_skipped_with_a_note(eval_module, monkeypatch):
    bench = eval_module("bench_latency")

    def no_backend(policy, **kw):
        raise TypeError("configure_inference() got an unexpected keyword argument 'backend'")

    monkeypatch.setattr(bench, "configure_inference", no_backend)
    policies, skipped = bench.backend_policies(CHECKPOINT, ["auto"])
    assert list(policies) == ["eager"] and "unexpected keyword argument 'backend'" in skipped["auto"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--schedules", "ddim10", "--ablations"])  # ablations compare with DDPM-100
    with pytest.raises(SystemExit):
        bench.parse_args(["--schedules", "ddim"])
