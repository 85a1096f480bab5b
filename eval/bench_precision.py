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
import json
import sys
from pathlib import Path

import numpy as np
import torch

from para_policy.evaluation.report import write_json, write_text
from para_policy.policy import load_policy
from para_policy.samplers import sampler_spec

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
OUT = ROOT / "eval" / "results" / "bench_precision.md"
SAMPLERS = ("sequential", "paradigms", "paradigms_published", "parataa")
#: setting → (autocast dtype | None, weight cast | None)
SETTINGS = {"fp32": (None, None), "autocast bf16": (torch.bfloat16, None), "autocast fp16": (torch.float16, None),
            "bf16 weights": (None, lambda m: m.to(torch.bfloat16)), "fp16 weights": (None, lambda m: m.half())}


def spec(name: str, schedule: str):
    """``name`` on ``schedule`` (``ddim10``, ``ddpm100``, ...), with a fixed window for ``paradigms``."""
    kind, steps = schedule[:4], int(schedule[4:])
    return sampler_spec(name, scheduler=kind, num_inference_steps=steps,
                        **({"window": min(64, steps)} if name == "paradigms" else {}))


def replay(policy, setting: str, schedule: str, observations: list[torch.Tensor]) -> dict[str, dict]:
    """``{sampler: {'actions': (n, n_action_steps, Da), 'rounds': [...]}}`` of every chunk, at ``setting``."""
    autocast, cast = SETTINGS[setting]
    net = cast(copy.deepcopy(policy)) if cast else policy
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    out: dict[str, dict] = {name: {"actions": [], "rounds": []} for name in SAMPLERS}
    with context:
        for i, obs in enumerate(observations):
            for name in SAMPLERS:
                s = spec(name, schedule)
                r = net.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(1000 + i), sampler=s,
                                       **({"warm_start": False} if s.iterative else {}))
                out[name]["actions"].append(r["action"][0])
                out[name]["rounds"].append(r.stats.rounds)
    return {name: {"actions": torch.stack(v["actions"]), "rounds": v["rounds"]} for name, v in out.items()}


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
    stream = json.loads(Path(args.stream).read_text())["chunks"]
    picks = np.linspace(0, len(stream) - 1, min(args.chunks, len(stream))).round().astype(int)
    observations = [torch.tensor(stream[i]["obs"], dtype=torch.float32)[None] for i in picks]
    results = {}
    for schedule in args.schedules:
        runs = {}
        for setting in SETTINGS:
            runs[setting] = replay(policy, setting, schedule, observations)
            print(f"{schedule} {setting}: done", flush=True)
        results[schedule] = deviations(runs)
    md = report(results, args, argv, len(observations))
    write_text(args.out, md)
    write_json(Path(args.out).with_suffix(".json"), {"command": argv, "chunks": picks.tolist(), "results": results})
    print(md)
    return md


if __name__ == "__main__":
    main()
