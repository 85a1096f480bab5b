"""What a deadline buys: deviation of the actions from the converged ones against the deadline in ms.

On a PushT stream recorded with the shipped policy (sequential DDPM-100 on the evaluator's noise
keys, :func:`para_policy.bench.record_stream`), each chunk is sampled with the ``paradigms`` preset
with no deadline (the converged actions) and then with each deadline, on the same noise and the
same warm-start guess (the converged previous chunk, shifted). A sample stopped by its deadline
returns the clean-sample estimate at its first unfinished step, never a noisy iterate. Reports, per
deadline, the mean and max distance of the actions to the converged ones (px), how many chunks hit
the deadline, the rounds run and the wall time. Writes ``bench_deadline.{md,json,png}``.

    python eval/bench_deadline.py                  # 3 episodes x 12 chunks, deadlines 0-200 ms
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from para_policy import load_policy, shift_trajectory  # noqa: E402
from para_policy.bench import ROLLOUT_KEYS, ChunkKeys, chunk_noise, record_stream, write_json, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
DEADLINES = (0, 25, 50, 100, 150, 200, 300, 400, 600)
KEYS = ChunkKeys(stream=21)  # the replay's noise: key (21, 0, episode, chunk)


def plot(summary: dict, converged_ms: list[float], path: Path) -> None:
    """Deviation against deadline, warm and cold chunks, with the converged latency marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ds = [float(d) for d in summary]
    vals = list(summary.values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ds, [v["warm_deviation_mean_px"] for v in vals], "o-", label="mean, warm chunks")
    ax.plot(ds, [v["cold_deviation_mean_px"] for v in vals], "^-", label="mean, cold (first) chunks")
    ax.plot(ds, [v["deviation_p95_px"] for v in vals], "s--", label="p95 of per-chunk max")
    ax.axvline(float(np.median(converged_ms)), color="gray", ls=":", label="converged p50 ms")
    ax.set_xlabel("deadline (ms)")
    ax.set_ylabel("action distance to converged (px)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("PushT, paradigms preset, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(policy: Any, spec: Any, stream: list[dict[str, Any]], deadlines: list[float]
            ) -> tuple[dict[float, dict[str, list[float]]], list[float]]:
    """Per deadline, per chunk: distance to the converged actions, deadline hit, rounds, ms, warm; and converged ms.

    Every deadline of a chunk runs on the chunk's noise and the converged previous chunk's guess (shifted),
    the deadlines' order alternating per chunk.
    """
    rows: dict[float, dict[str, list[float]]] = {d: {"mean_px": [], "max_px": [], "hit": [], "rounds": [], "ms": [],
                                                     "warm": []} for d in deadlines}
    converged_ms: list[float] = []
    guess = None
    for i, ch in enumerate(stream):
        if ch["chunk"] == 0:
            guess = None
        obs = torch.from_numpy(ch["obs"])[None]
        x_T, noise = chunk_noise(policy, spec, KEYS.seed(ch, i))
        warm = {"warm_start": False} if guess is None else {"guess": guess}
        t0 = time.perf_counter()
        ref = policy.predict_action({"obs": obs}, x_T=x_T, noise=noise, sampler=spec, **warm)
        converged_ms.append((time.perf_counter() - t0) * 1e3)
        for d in deadlines if i % 2 == 0 else deadlines[::-1]:
            t0 = time.perf_counter()
            out = policy.predict_action({"obs": obs}, x_T=x_T, noise=noise, sampler=spec, **warm,
                                        deadline_at=t0 + d / 1e3)
            ms = (time.perf_counter() - t0) * 1e3
            dist = (out["action"] - ref["action"]).norm(dim=-1)[0]
            for key, value in (("mean_px", dist.mean()), ("max_px", dist.max()), ("hit", out.stats.deadline_hit),
                               ("rounds", out.stats.rounds), ("ms", ms), ("warm", out.warm)):
                rows[d][key].append(float(value))
        guess = shift_trajectory(ref.trajectory, policy.n_action_steps)
    return rows, converged_ms


def summarize(rows: dict[float, dict[str, list[float]]]) -> dict[float, dict[str, float]]:
    """Per deadline: deviation (warm, cold, all chunks), how often it stopped the sampler, rounds, ms."""
    def mean_where(r: dict[str, list[float]], warm: bool) -> float:
        return float(np.mean([m for m, w in zip(r["mean_px"], r["warm"], strict=True) if bool(w) == warm]))

    return {d: {"warm_deviation_mean_px": mean_where(r, True), "cold_deviation_mean_px": mean_where(r, False),
                "deviation_mean_px": float(np.mean(r["mean_px"])),
                "deviation_p95_px": float(np.percentile(r["max_px"], 95)),
                "deviation_max_px": float(np.max(r["max_px"])),
                "deadline_hit_fraction": float(np.mean(r["hit"])), "rounds_mean": float(np.mean(r["rounds"])),
                "ms_p50": float(np.median(r["ms"])), "ms_p95": float(np.percentile(r["ms"], 95))}
            for d, r in rows.items()}


def markdown(summary: dict[float, dict[str, float]], spec: Any, n_chunks: int, converged_ms: list[float],
             args: argparse.Namespace) -> list[str]:
    lines = ["# What a deadline buys: action deviation from the converged chunk", "",
             f"Shipped PushT policy, `paradigms` preset (window {spec.options['window']}, tolerance "
             f"{spec.options['tolerance']}, warm start), {n_chunks} recorded chunks, batch 1, same noise and guess. "
             f"Converged: {np.median(converged_ms):.0f} ms p50, {np.percentile(converged_ms, 95):.0f} ms p95. "
             f"`python eval/bench_deadline.py --episodes {args.episodes} --chunks {args.chunks}`", "",
             "Warm chunks start from the previous chunk (all but each episode's first); cold ones from noise.", "",
             "| deadline ms | chunks stopped | rounds | ms p50 | ms p95 | deviation mean px: warm / cold / all | "
             "p95 of max px | max px |", "|---|---|---|---|---|---|---|---|"]
    for d, s in summary.items():
        lines.append(f"| {d:g} | {s['deadline_hit_fraction']:.0%} | {s['rounds_mean']:.1f} | {s['ms_p50']:.0f} | "
                     f"{s['ms_p95']:.0f} | {s['warm_deviation_mean_px']:.2f} / {s['cold_deviation_mean_px']:.1f} / "
                     f"{s['deviation_mean_px']:.2f} | {s['deviation_p95_px']:.1f} | "
                     f"{s['deviation_max_px']:.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--deadlines", type=float, nargs="+", default=list(DEADLINES), help="ms")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "bench_deadline")
    ap.add_argument("--report-only", action="store_true", help="redraw the plot from bench_deadline.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((args.out / "bench_deadline.json").read_text())
        plot(saved["summary"], saved["converged_ms"], args.out / "bench_deadline.png")
        return
    stream = record_stream(load_policy(ASSET, sampler="sequential"), args.episodes, args.chunks, 100000,
                           keys=ROLLOUT_KEYS)
    policy = load_policy(ASSET)  # the paradigms preset
    spec = policy.resolve(obs=torch.from_numpy(stream[0]["obs"])[None])
    print(f"{len(stream)} chunks; window {spec.options['window']}")
    rows, converged_ms = measure(policy, spec, stream, args.deadlines)
    summary = summarize(rows)
    lines = markdown(summary, spec, len(stream), converged_ms, args)
    write_json(args.out / "bench_deadline.json", {"summary": summary, "rows": rows, "converged_ms": converged_ms,
                                                  "window": spec.options["window"], "chunks": len(stream)}, indent=2)
    write_text(args.out / "bench_deadline.md", "\n".join(lines) + "\n")
    plot(summary, converged_ms, args.out / "bench_deadline.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
