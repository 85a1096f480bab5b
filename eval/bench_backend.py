"""Eager PyTorch vs ONNX Runtime (``backend='onnxruntime'``) for the shipped PushT UNet on this CPU.

Measures, in one process and interleaved (so drifting machine load biases neither backend):

1. one denoiser call at each row count: median ms over ``--reps`` calls after warm-up, and the
   max abs difference from eager (also with ``ORT_ENABLE_EXTENDED`` instead of ``ORT_ENABLE_ALL``);
2. the export time;
3. sequential chunks at batch 1 (``policy.predict_action``, ``sampler='sequential'``) on DDIM-10
   and on the checkpoint's DDPM-100: p50 / p95 ms over ``--chunks`` calls per backend;
4. which backend ``backend='auto'`` picks per row count, and the curves it measured;
5. ``load_policy``'s default backend (``'default'``: ``'auto'`` on this CPU with onnxruntime) against
   eager: load time (a machine's first load, which times ``auto``'s curves, and later ones, which
   read them) and batch-1 ``predict_action`` p50 / p95 on recorded PushT chunks for sequential
   DDIM-10 and ``paradigms`` on DDPM-100, every variant interleaved.

    python eval/bench_backend.py          # ~4 min on 2 CPU cores; writes eval/results/bench_backend.md
    python eval/bench_backend.py --parts default --out eval/results/bench_backend_default.md   # part 5 alone
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy import window
from para_policy.bench import (
    ChunkKeys,
    Variant,
    load_stream,
    percentile,
    replay,
    resolve_paradigms,
    schedule_spec,
    shown_path,
    split_stream,
    write_text,
)
from para_policy.inference import configure_inference, make_denoiser
from para_policy.loading import load_policy
from para_policy.onnx_backend import OnnxDenoiser
from para_policy.samplers import sampler_spec

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
ROWS = (1, 2, 4, 8, 16, 32, 64, 100)
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
PARTS = ("calls", "auto", "default")
KEYS = ChunkKeys(stream=11)  # part 5's replay noise (stream 11, as bench_latency's replays)


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


def part_calls_and_chunks(args: argparse.Namespace) -> tuple[list[str], str]:
    """Parts 1-3: one call per row count, export time, sequential chunks; ``(markdown lines, ort version)``."""
    eager = load_policy(args.checkpoint, sampler="sequential", backend="eager")
    onnx = load_policy(args.checkpoint, sampler="sequential", backend="eager")
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
    lines = [
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
            lines.append(f"| {label} | {name} | {statistics.median(ts):.1f} | {percentile(ts, 95):.1f} |")
    return lines, extended.ort.__version__


def part_auto(args: argparse.Namespace) -> list[str]:
    """Part 4: what ``backend='auto'`` measures and picks per row count (timed now: the curve cache is off)."""
    with cache_folder("off"):
        t0 = time.perf_counter()
        policy = load_policy(args.checkpoint, sampler="sequential", backend="eager")
        with torch.inference_mode():
            example = (policy.trajectory_shape(1)[1:], policy.conditioning(policy.zero_observation(1))[0])
        d = make_denoiser(policy.model, backend="auto", example=example, condition_kw=policy.condition_kw)
        build_s = time.perf_counter() - t0
    lines = ["## backend='auto'", "",
             f"Built in {build_s:.1f} s (export + both cost curves, "
             "`RowDispatchDenoiser.measure`: 5 reps after 1 warm-up). Median ms per call as it measured them, "
             "and the backend each row count goes to:", "",
             "| rows | eager ms | onnxruntime ms | chosen |", "|---|---|---|---|"]
    for n in d.rows:
        lines.append(f"| {n} | {d.curves['eager'][n]:.2f} | {d.curves['onnxruntime'][n]:.2f} | {d.choice[n]} |")
    return lines


@contextlib.contextmanager
def cache_folder(folder: str) -> Iterator[None]:
    """``$PARA_POLICY_CACHE_DIR`` set to ``folder`` (windows and ``auto``'s curves) for the block."""
    old = os.environ.get(window.CACHE_ENV)
    os.environ[window.CACHE_ENV] = folder
    window._MEMORY.clear()
    try:
        yield
    finally:
        window._MEMORY.clear()
        if old is None:
            os.environ.pop(window.CACHE_ENV, None)
        else:
            os.environ[window.CACHE_ENV] = old


def load_times(checkpoint: str, reps: int) -> dict[str, Any]:
    """Seconds of ``load_policy`` with the default backend and with eager, and of each one's first call.

    In an empty cache folder: the first default load times ``auto``'s curves (a machine's first
    load); the later ones, alternating with eager loads, read them and export on the first call.
    """
    from para_policy.inference import default_backend

    t0 = time.perf_counter()
    first = load_policy(checkpoint)
    out: dict[str, Any] = {"first_default_s": time.perf_counter() - t0, "choice": first.backend_choice,
                           "default_s": [], "eager_s": [], "first_call_s": {}}
    assert default_backend(first.model)[0] == first.inference.get("backend", "eager")
    policies = {}
    for i in range(reps):
        for name in ("default", "eager") if i % 2 == 0 else ("eager", "default"):
            t0 = time.perf_counter()
            policies[name] = load_policy(checkpoint, backend=name)
            out[f"{name}_s"].append(time.perf_counter() - t0)
    obs = {"obs": torch.zeros(1, first.n_obs_steps, first.obs_dim)}
    for name, policy in policies.items():  # the last loads: the default one exports its graph now
        t0 = time.perf_counter()
        policy.predict_action(obs, sampler="sequential", scheduler="ddim", num_inference_steps=10)
        out["first_call_s"][name] = time.perf_counter() - t0
    return out


def part_default(args: argparse.Namespace) -> list[str]:
    """Part 5: ``load_policy``'s default backend against eager: load time, and chunks on recorded PushT."""
    with tempfile.TemporaryDirectory(prefix="bench_backend_") as folder, cache_folder(folder):
        loads = load_times(args.checkpoint, args.load_reps)
        policies = {"default": load_policy(args.checkpoint), "eager": load_policy(args.checkpoint, backend="eager")}
        chunks, meta = load_stream(args.stream)
        replayed, calib = split_stream(chunks, meta["calibration_seed"], args.replay_episodes, args.replay_chunks, 4)
        variants = []
        for runtime, policy in policies.items():
            variants.append(Variant(f"sequential | {runtime}", schedule_spec("sequential", "ddim10"), runtime))
            spec, _ = resolve_paradigms(policy, schedule_spec("paradigms", "ddpm100"), [c["obs"] for c in calib])
            variants.append(Variant(f"paradigms | {runtime}", spec, runtime))
        records = replay(policies, variants, replayed, KEYS)
    choice = loads["choice"]
    lines = ["## load_policy's default backend against eager", "",
             f"`load_policy(checkpoint)` picked `{choice[0] if choice else 'eager'}` "
             f"({choice[1] if choice else 'no choice recorded'}).", "",
             f"Load time, in an empty cache folder: the first default load {loads['first_default_s']:.2f} s (it times "
             "`auto`'s cost curves and caches them); then, alternating, "
             f"{len(loads['default_s'])} loads each: default p50 {statistics.median(loads['default_s']):.2f} s, "
             f"eager p50 {statistics.median(loads['eager_s']):.2f} s. The first call (sequential DDIM-10, which "
             f"exports the default's graph): default {loads['first_call_s']['default']:.2f} s, eager "
             f"{loads['first_call_s']['eager']:.2f} s.", "",
             f"Chunks: batch-1 `predict_action` on {len(replayed)} recorded PushT chunk observations "
             f"({shown_path(args.stream, ROOT)}, "
             f"{args.replay_episodes} episodes), the same noise per chunk for both backends, `paradigms` warm-started "
             "from the backend's own previous chunk, every variant interleaved (order alternating per chunk) after "
             "one untimed call each; `paradigms`' window tuned by each policy on 4 calibration chunks.", "",
             "| schedule, sampler | backend | window | rounds (mean) | p50 ms | p95 ms | eager / default p50 "
             "| eager / default p95 | max action distance between backends (px) |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_key = {(v.name.split(" | ")[0], v.policy): v for v in variants}
    for name, label in (("sequential", "DDIM-10, sequential"), ("paradigms", "DDPM-100, `paradigms`")):
        ms = {rt: [r["ms"] for r in records[f"{name} | {rt}"]] for rt in policies}
        acts = {rt: np.stack([r["action"] for r in records[f"{name} | {rt}"]]) for rt in policies}
        diff = float(np.abs(acts["default"] - acts["eager"]).max())
        for rt in policies:
            v = by_key[(name, rt)]
            ratio = (f"{statistics.median(ms['eager']) / statistics.median(ms['default']):.2f}x",
                     f"{percentile(ms['eager'], 95) / percentile(ms['default'], 95):.2f}x")
            lines.append(f"| {label} | {rt} ({policies[rt].inference.get('backend', 'eager')}) "
                         f"| {v.spec.options.get('window', '-')} "
                         f"| {statistics.mean(r['rounds'] for r in records[v.name]):.1f} "
                         f"| {statistics.median(ms[rt]):.1f} | {percentile(ms[rt], 95):.1f} "
                         f"| {ratio[0] if rt == 'default' else ''} | {ratio[1] if rt == 'default' else ''} "
                         f"| {f'{diff:.2g}' if rt == 'default' else ''} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime intra-op) threads")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per backend and row count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=30, help="timed sequential chunks per backend and schedule")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="calls: parts 1-3 (row counts, export, sequential chunks); auto: part 4; "
                             "default: part 5 (load_policy's default against eager)")
    parser.add_argument("--stream", default=str(STREAM), help="recorded chunks for part 5 (bench_latency's stream)")
    parser.add_argument("--replay-episodes", type=int, default=4)
    parser.add_argument("--replay-chunks", type=int, default=12, help="chunks per episode replayed in part 5")
    parser.add_argument("--load-reps", type=int, default=5, help="loads per backend timed in part 5")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_backend.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    body, ort = [], None
    if "calls" in args.parts:
        lines, ort = part_calls_and_chunks(args)
        body += lines
    if "auto" in args.parts:
        body += ["", *part_auto(args)]
    if "default" in args.parts:
        body += ["", *part_default(args)]
    if ort is None:
        from para_policy.onnx_backend import import_onnxruntime

        ort = import_onnxruntime().__version__
    command = " ".join(["python eval/bench_backend.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# Eager PyTorch vs ONNX Runtime: the shipped PushT UNet on this CPU", "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE {command}`", "",
        f"torch {torch.__version__}, onnxruntime {ort}, {args.threads} threads "
        f"({os.cpu_count()} CPUs), load average {load_start[0]:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end (other work on the machine inflates every figure alike).", "",
        *(body[1:] if body and body[0] == "" else body),
    ]
    md = "\n".join(lines) + "\n"
    write_text(args.out, md)
    print(md)


if __name__ == "__main__":
    main()
