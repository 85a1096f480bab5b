"""How far low-precision networks move the shipped PushT policy's actions, per sampler.

The samplers keep their state at float32 whatever the network's dtype (docs/library.md,
"Precision"), so what rounding changes is the network's predictions only. This measures what
that does to actions: for each schedule (``--schedules``, default ``ddim10 ddpm100``), each
precision setting

- ``fp32``: the network as trained;
- ``autocast bf16`` / ``autocast fp16``: ``predict_action`` under ``torch.autocast("cpu", dtype)``;
- ``bf16 weights`` / ``fp16 weights``: a copy of the policy cast with ``.to(torch.bfloat16)`` /
  ``.half()``;

and each preset (``sequential``, ``paradigms``, ``paradigms_published``, ``parataa``; a fixed
window for ``paradigms``, ``min(64, steps)``, instead of this machine's, and every call cold), it replays the
first observation of every chunk of ``--stream`` (recorded PushT chunks, ``--chunks`` of them
spread over the stream) at batch 1, with the same ``x_T`` and step noise per chunk for every row, and
reports the max and mean ``|action - fp32 sequential action|`` over the executed actions in
PushT's units (pixels), next to the sequential loop's at the same precision: the deviation
that rounding alone causes, against which a Picard sampler's is read. Eager PyTorch on the CPU.

    python eval/bench_precision.py
    python eval/bench_precision.py --chunks 4 --schedules ddim10 --out /tmp/bp.md

Writes ``eval/results/bench_precision.md`` and ``.json`` next to it (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy import load_policy
from para_policy.bench import ChunkKeys, Variant, load_stream, replay, schedule_spec, spread, write_json, write_text
from para_policy.samplers import SamplerConfig

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
OUT = ROOT / "eval" / "results" / "bench_precision.md"
SAMPLERS = ("sequential", "paradigms", "paradigms_published", "parataa")
#: setting → (autocast dtype | None, weight cast | None)
SETTINGS = {"fp32": (None, None), "autocast bf16": (torch.bfloat16, None), "autocast fp16": (torch.float16, None),
            "bf16 weights": (None, lambda m: m.to(torch.bfloat16)), "fp16 weights": (None, lambda m: m.half())}
KEYS = ChunkKeys(stream=None, offset=1000)  # chunk i of the replay: torch.manual_seed(1000 + i)


def spec(name: str, schedule: str) -> SamplerConfig:
    """``name`` on ``schedule`` (``ddim10``, ``ddpm100``, ...), every call cold, a fixed window for ``paradigms``."""
    steps = int(schedule[4:])
    options: dict[str, Any] = {"window": min(64, steps)} if name == "paradigms" else {}
    cold = {"warm_start": False} if name != "sequential" else {}
    return schedule_spec(name, schedule, **options, **cold)


def run_setting(policy: Any, setting: str, schedule: str, chunks: list[dict[str, Any]]) -> dict[str, dict]:
    """``{sampler: {'actions': (n, n_action_steps, Da), 'rounds': [...]}}`` of every chunk, at ``setting``."""
    autocast, cast = SETTINGS[setting]
    net = cast(copy.deepcopy(policy)) if cast else policy
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        records = replay(net, [Variant(name, spec(name, schedule)) for name in SAMPLERS], chunks, KEYS, warmup=0)
    return {name: {"actions": torch.from_numpy(np.stack([r["action"] for r in recs])),
                   "rounds": [r["rounds"] for r in recs]} for name, recs in records.items()}


def deviations(runs: dict[str, dict[str, dict]]) -> list[dict]:
    """One row per (setting, sampler): its deviation from float32 sequential, and sequential's at that setting."""
    ref = runs["fp32"]["sequential"]["actions"]
    rows = []
    for setting, by_sampler in runs.items():
        seq = (by_sampler["sequential"]["actions"] - ref).abs()
        for name, r in by_sampler.items():
            d = (r["actions"] - ref).abs()
            rows.append({"setting": setting, "sampler": name, "max_px": float(d.max()), "mean_px": float(d.mean()),
                         "sequential_max_px": float(seq.max()), "sequential_mean_px": float(seq.mean()),
                         "rounds_mean": float(np.mean(r["rounds"]))})
    return rows


def report(results: dict[str, list[dict]], args: argparse.Namespace, argv: list[str], n: int) -> str:
    lines = ["# Actions of low-precision networks, per sampler (shipped PushT policy)", "",
             f"Command: `{' '.join(['python eval/bench_precision.py', *argv])}`", "",
             f"{n} recorded chunk observations of `{Path(args.stream).name}`, batch 1, every call cold, the same noise "
             f"per chunk for every row; eager PyTorch {torch.__version__} on the CPU, {args.threads} thread(s). "
             "Deviation: |action - the float32 sequential action| over the executed actions, in pixels (the "
             "PushT workspace is 512 px wide); `sequential` columns: the sequential loop's at the same precision.", ""]
    for schedule, rows in results.items():
        lines += [f"## {schedule.upper()}", "",
                  "| precision | sampler | max px | mean px | sequential max px | sequential mean px | rounds |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | `{r['sampler']}` | {r['max_px']:.3f} | {r['mean_px']:.3f} | "
                  f"{r['sequential_max_px']:.3f} | {r['sequential_mean_px']:.3f} | {r['rounds_mean']:.1f} |"
                  for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--stream", default=str(STREAM), help="recorded chunks (bench_latency.py's stream.json)")
    parser.add_argument("--chunks", type=int, default=16, help="chunks replayed, spread evenly over the stream")
    parser.add_argument("--schedules", nargs="+", default=["ddim10", "ddpm100"], help="ddim<N> / ddpm<N>")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: timing is not measured)")
    parser.add_argument("--out", default=str(OUT))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint, sampler="sequential", backend="eager")
    stream, _ = load_stream(args.stream)
    picks = spread(len(stream), args.chunks)
    chunks = [stream[i] for i in picks]
    results = {}
    for schedule in args.schedules:
        runs = {}
        for setting in SETTINGS:
            runs[setting] = run_setting(policy, setting, schedule, chunks)
            print(f"{schedule} {setting}: done", flush=True)
        results[schedule] = deviations(runs)
    md = report(results, args, argv, len(chunks))
    write_json(Path(args.out).with_suffix(".json"), {"command": argv, "chunks": picks, "results": results}, indent=2)
    write_text(args.out, md)
    print(md)
    return md


if __name__ == "__main__":
    main()
