"""Eager PyTorch vs ONNX Runtime (``backend='onnxruntime'``) for the shipped PushT UNet on this CPU.

Measures, in one process and interleaved (so drifting machine load biases neither backend):

1. one denoiser call at each row count: median ms over ``--reps`` calls after warm-up, and the
   max abs difference from eager (also with ``ORT_ENABLE_EXTENDED`` instead of ``ORT_ENABLE_ALL``);
2. the export time;
3. sequential chunks at batch 1 (``policy.predict_action``, ``sampler='sequential'``) on DDIM-10
   and on the checkpoint's DDPM-100: p50 / p95 ms over ``--chunks`` calls per backend;
4. which backend ``backend='auto'`` picks per row count, and the curves it measured.

    python eval/bench_backend.py          # ~3 min on 2 CPU cores; writes eval/results/bench_backend.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from para_policy.checkpoints import atomic_write
from para_policy.inference import configure_inference
from para_policy.onnx_backend import OnnxDenoiser
from para_policy.policy import load_policy
from para_policy.samplers import sampler_spec

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
ROWS = (1, 2, 4, 8, 16, 32, 64, 100)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation between order statistics."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@torch.inference_mode()
def call_costs(fns: dict, rows: tuple[int, ...], cond_dim: int, reps: int, warmup: int
               ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """``({name: {rows: median ms}}, {name: {rows: max abs diff from eager}})``, calls interleaved."""
    g = torch.Generator().manual_seed(0)
    inputs = {n: (torch.randn(n, 16, 2, generator=g), torch.randint(0, 100, (n,), generator=g),
                  torch.randn(n, cond_dim, generator=g)) for n in rows}
    diffs = {name: {n: (fn(*inputs[n]) - fns["eager"](*inputs[n])).abs().max().item() for n in rows}
             for name, fn in fns.items() if name != "eager"}
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in rows} for name in fns}
    for rep in range(warmup + reps):
        for n in rows if rep % 2 == 0 else rows[::-1]:
            for name, fn in (fns.items() if rep % 2 == 0 else reversed(fns.items())):
                t0 = time.perf_counter()
                fn(*inputs[n])
                if rep >= warmup:
                    times[name][n].append((time.perf_counter() - t0) * 1e3)
    return {name: {n: statistics.median(ts) for n, ts in t.items()} for name, t in times.items()}, diffs


def chunk_latency(policies: dict, spec, obs: torch.Tensor, chunks: int) -> dict[str, list[float]]:
    """ms of ``predict_action`` per policy, interleaved, after one untimed call each."""
    times: dict[str, list[float]] = {name: [] for name in policies}
    for i in range(chunks + 1):
        for name, policy in policies.items():
            t0 = time.perf_counter()
            policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(i), sampler=spec)
            if i:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime intra-op) threads")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per backend and row count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=30, help="timed sequential chunks per backend and schedule")
    parser.add_argument("--no-auto", action="store_true", help="skip building backend='auto'")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_backend.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    eager = load_policy(args.checkpoint, sampler="sequential")
    onnx = load_policy(args.checkpoint, sampler="sequential")
    with torch.inference_mode():
        cond = eager.conditioning(eager.zero_observation(1))[0]
    example = (eager.trajectory_shape(1)[1:], cond)
    t0 = time.perf_counter()
    configure_inference(onnx, backend="onnxruntime")  # exports the UNet and builds the session
    export_s = time.perf_counter() - t0
    extended = OnnxDenoiser(eager.model, example=example, optimization="extended")
    fns = {"eager": eager.denoise, "onnxruntime": onnx.denoise, "onnxruntime (EXTENDED)": extended}
    ms, diffs = call_costs(fns, ROWS, cond.shape[1], args.reps, args.warmup)

    obs = torch.rand(1, eager.n_obs_steps, eager.obs_dim, generator=torch.Generator().manual_seed(1)) * 400 + 50
    chunks = {}
    for label, spec in (("DDIM-10", sampler_spec("sequential", scheduler="ddim", num_inference_steps=10)),
                        (f"DDPM-{eager.num_inference_steps} (checkpoint's)", sampler_spec("sequential"))):
        chunks[label] = chunk_latency({"eager": eager, "onnxruntime": onnx}, spec, obs, args.chunks)
        print(label, {k: round(statistics.median(v), 1) for k, v in chunks[label].items()}, flush=True)

    auto = None
    if not args.no_auto:
        t0 = time.perf_counter()
        auto_policy = configure_inference(load_policy(args.checkpoint, sampler="sequential"), backend="auto")
        auto = (auto_policy._denoiser, time.perf_counter() - t0)

    command = " ".join(["python eval/bench_backend.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# Eager PyTorch vs ONNX Runtime: the shipped PushT UNet on this CPU", "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE {command}`", "",
        f"torch {torch.__version__}, onnxruntime {extended.ort.__version__}, {args.threads} threads "
        f"({os.cpu_count()} CPUs), load average {load_start[0]:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end (other work on the machine inflates every figure alike).", "",
        f"Export (TorchScript-based exporter) + session: {export_s:.1f} s.", "",
        "## One denoiser call", "",
        f"Median ms of one call over {args.reps} calls after {args.warmup} warm-up rounds, the backends and row "
        "counts interleaved; max abs difference from eager's output on the same inputs (int64 timesteps). "
        "`ORT_ENABLE_ALL` is what `backend='onnxruntime'` uses.", "",
        "| rows | eager ms | onnxruntime ms | speed-up | ORT_ENABLE_EXTENDED ms | max abs diff (ALL) "
        "| max abs diff (EXTENDED) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in ROWS:
        e, o, x = ms["eager"][n], ms["onnxruntime"][n], ms["onnxruntime (EXTENDED)"][n]
        lines.append(f"| {n} | {e:.2f} | {o:.2f} | {e / o:.2f}x | {x:.2f} | {diffs['onnxruntime'][n]:.1e} "
                     f"| {diffs['onnxruntime (EXTENDED)'][n]:.1e} |")
    lines += ["", "## Sequential chunks at batch 1", "",
              f"`policy.predict_action` with `sampler='sequential'`, {args.chunks} timed calls per backend after one "
              "untimed, the backends interleaved.", "",
              "| schedule | backend | p50 ms | p95 ms |", "|---|---|---|---|"]
    for label, times in chunks.items():
        for name, ts in times.items():
            lines.append(f"| {label} | {name} | {statistics.median(ts):.1f} | {percentile(ts, 0.95):.1f} |")
    if auto is not None:
        d, build_s = auto
        lines += ["", "## backend='auto'", "",
                  f"Built in {build_s:.1f} s (export + both cost curves, "
                  "`RowDispatchDenoiser.measure`: 5 reps after 1 warm-up). Median ms per call as it measured them, "
                  "and the backend each row count goes to:", "",
                  "| rows | eager ms | onnxruntime ms | chosen |", "|---|---|---|---|"]
        for n in d.rows:
            lines.append(f"| {n} | {d.curves['eager'][n]:.2f} | {d.curves['onnxruntime'][n]:.2f} | {d.choice[n]} |")
    md = "\n".join(lines) + "\n"
    atomic_write(args.out, lambda p: Path(p).write_text(md))
    print(md)


if __name__ == "__main__":
    main()
