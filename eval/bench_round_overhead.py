"""What a Picard round costs outside the model, and what compiling the round does, on this machine.

On a GPU a round is worth one model call only if the host does not wait on the device inside it
and launches few kernels besides the model's. This counts, per round and for every sampler
variant, the host syncs, host-to-device copies and torch operations outside the model
(:class:`~para_policy.samplers.host_sync.HostSyncCounter`), and times the chunk and its share
outside the model on the shipped PushT policy, replaying a recorded control stream (batch 1,
each variant warm-started from its own previous chunk as ``paradigms`` is in a control loop, the
same noise for every variant of a chunk, variants interleaved chunk by chunk).

Variants: ``sequential`` (eager, and with the model ``torch.compile``'d), ``paradigms`` with
compacting rounds (eager, and with the model compiled) and with fixed-shape rounds (eager, and
the whole round compiled with ``fullgraph=True``: model and bookkeeping). Compiling takes
minutes on a CPU; ``--no-compile`` leaves those variants out.

    python eval/bench_round_overhead.py                      # writes eval/results/bench_round_overhead.{md,json}
    python eval/bench_round_overhead.py --chunks 4 --no-compile --out /tmp/overhead
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from para_policy import load_policy
from para_policy.bench import ChunkKeys, Variant, load_stream, percentile_summary, replay, write_report
from para_policy.samplers import sampler_spec
from para_policy.samplers.host_sync import HostSyncCounter

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
SCHEDULES = {"ddpm100": ("ddpm", 100, 100), "ddim10": ("ddim", 10, 10)}  # kind, steps, window
#: name -> (policy: 'eager' | 'compiled model', sampler preset, options)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "sequential": ("eager", "sequential", {}),
    "sequential, model compiled": ("compiled model", "sequential", {}),
    "paradigms compact": ("eager", "paradigms", {}),
    "paradigms compact, model compiled": ("compiled model", "paradigms", {}),
    "paradigms fixed": ("eager", "paradigms", {"round_shape": "fixed"}),
    "paradigms fixed, round compiled": ("eager", "paradigms", {"round_shape": "fixed", "compile_round": True}),
}
KEYS = ChunkKeys(stream=None, offset=1000)  # chunk i of the replay: torch.manual_seed(1000 + i)
WARMUP = 3  # untimed chunks per variant first: compilation (minutes on a CPU) stays out of the timings


class Timed:
    """The policy's denoiser, timed: how much of a chunk the model calls take."""

    def __init__(self, denoise: Any) -> None:
        self.denoise, self.ms = denoise, 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        start = time.perf_counter()
        out = self.denoise(x, t, c)
        self.ms += (time.perf_counter() - start) * 1e3
        return out


@contextlib.contextmanager
def counting(v: Variant, policy: Any) -> Iterator[dict[str, Any]]:
    """Host syncs, host-to-device copies and torch operations per round, between two model calls."""
    counter = HostSyncCounter()
    policy.denoise = counter.wrap(policy.denoise)
    extra: dict[str, Any] = {}
    try:
        with counter:
            yield extra
    finally:
        del policy.denoise
    between = counter.between or [counter.after]
    for name in ("syncs", "copies", "ops"):
        extra[name] = statistics.mean(getattr(c, name) for c in between)


@contextlib.contextmanager
def timing(v: Variant, policy: Any) -> Iterator[dict[str, Any]]:
    """The model calls' own ms of the chunk (not where the model runs inside a compiled round)."""
    if "round compiled" in v.name:
        yield {}
        return
    timed = Timed(policy.denoise)
    policy.denoise = timed
    extra: dict[str, Any] = {}
    try:
        yield extra
    finally:
        del policy.denoise
    extra["model_ms"] = timed.ms


def measure(policies: dict[str, Any], specs: dict[str, Any], chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts (one replay, the counter cannot see inside compiled code) and interleaved timings (a second one)."""
    def variants(names: list[str]) -> list[Variant]:
        return [Variant(n, specs[n], VARIANTS[n][0]) for n in names]

    counted = replay(policies, variants([n for n in specs if "compiled" not in n]), chunks, KEYS, warmup=WARMUP,
                     instrument=counting)
    timed = replay(policies, variants(list(specs)), chunks, KEYS, warmup=WARMUP, instrument=timing)
    rows = {}
    for name, recs in timed.items():
        rows[name] = {"rounds": [r["rounds"] for r in recs], "ms": [r["ms"] for r in recs],
                      "outside_ms": [(r["ms"] - r["model_ms"]) / r["rounds"] for r in recs if "model_ms" in r],
                      **{k: [r[k] for r in counted.get(name, [])] for k in ("syncs", "copies", "ops")}}
    return rows


def summarize(rows: dict[str, Any]) -> dict[str, Any]:
    base = percentile_summary(rows["sequential"]["ms"])["p50"]
    out = {}
    for name, r in rows.items():
        ms = percentile_summary(r["ms"])
        counted = bool(r["syncs"])
        out[name] = {"rounds_mean": statistics.mean(r["rounds"]),
                     "syncs_per_round": statistics.mean(r["syncs"]) if counted else None,
                     "copies_per_round": statistics.mean(r["copies"]) if counted else None,
                     "ops_per_round": statistics.mean(r["ops"]) if counted else None,
                     "outside_model_ms_per_round_p50":
                         percentile_summary(r["outside_ms"])["p50"] if r["outside_ms"] else None,
                     "ms_p50": ms["p50"], "ms_p95": ms["p95"], "speedup_p50_vs_sequential": base / ms["p50"]}
    return out


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = ["# Per-round overhead and compiled rounds (CPU)", "",
             f"`{meta['command']}`; {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); "
             f"{meta['chunks']} chunks of the recorded PushT stream at batch 1, warm-started per variant, "
             "variants interleaved chunk by chunk. Counts are per round, between two model calls (the sequential "
             "loop: per step): host syncs (device-to-host reads), host-to-device copies, torch operations "
             "outside the model (not counted inside compiled code: '—'). 'outside ms' is a round's wall "
             "time minus its model call ('—' where the model runs inside the compiled round).", ""]
    for schedule, res in results.items():
        lines += [f"## {schedule} (window {meta['windows'][schedule]})", "",
                  "| variant | rounds | syncs | copies | ops | outside ms/round p50 | ms/chunk p50 | p95 "
                  "| vs sequential p50 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, s in res.items():
            def num(key: str, fmt: str, s: dict = s) -> str:
                return "—" if s[key] is None else format(s[key], fmt)

            lines.append(f"| {name} | {num('rounds_mean', '.2f')} | {num('syncs_per_round', '.2f')} | "
                         f"{num('copies_per_round', '.2f')} | {num('ops_per_round', '.0f')} | "
                         f"{num('outside_model_ms_per_round_p50', '.2f')} | {s['ms_p50']:.1f} | {s['ms_p95']:.1f} | "
                         f"{s['speedup_p50_vs_sequential']:.2f}× |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=16, help="chunks of the recorded stream to replay (default 16)")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled variants (minutes to compile)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                    help=f"variants to run (default all: {', '.join(VARIANTS)}); 'sequential' is always run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    chunks, _ = load_stream(STREAM)
    chunks = chunks[: args.chunks]
    names = [n for n in VARIANTS if (n == "sequential" or n in args.variants)
             and not (args.no_compile and "compiled" in n)]
    policies = {"eager": load_policy(CHECKPOINT, sampler="sequential", backend="eager")}
    if any(VARIANTS[n][0] == "compiled model" for n in names):
        policies["compiled model"] = load_policy(CHECKPOINT, sampler="sequential", backend="eager")
        policies["compiled model"].set_inference(compile=True)
    results, windows = {}, {}
    for schedule in args.schedules:
        kind, steps, window = SCHEDULES[schedule]
        windows[schedule] = window
        specs = {}
        for name in names:
            _, preset, options = VARIANTS[name]
            extra = {} if preset == "sequential" else {"window": window, **options}
            specs[name] = sampler_spec(preset, scheduler=kind, num_inference_steps=steps, **extra)
        print(f"{schedule}: {len(chunks)} chunks x {len(specs)} variants (compiling first where asked)", flush=True)
        results[schedule] = summarize(measure(policies, specs, chunks))
    meta = {"command": "python eval/bench_round_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{os.cpu_count()}-core {os.uname().machine}", "torch": torch.__version__,
            "threads": args.threads, "chunks": len(chunks), "windows": windows}
    text = markdown(results, meta)
    write_report(args.out / "bench_round_overhead", text, {"meta": meta, "results": results})
    print(text)


if __name__ == "__main__":
    main()
