"""Reward against inference delay: waiting (sync), naive asynchronous inference and real-time chunking.

A robot that keeps moving while its next chunk is computed executes that chunk from an
observation ``d`` control steps old. This benchmark asks what that costs on the shipped PushT
policy, and what real-time chunking (``rtc``: the ``d`` actions that run meanwhile frozen into
the new chunk, the old chunk's plan after them guiding it with RTC's soft mask) wins back over
switching to a freely sampled chunk (``async``). It runs the
evaluator (``para_policy.evaluation.evaluate``, the function behind ``eval.py``) once per point:

* ``sync`` at delay 0: today's protocol (the robot waits for every chunk; batched envs);
* each mode of ``--modes`` (:data:`MODES`: ``async``, ``rtc-hard``, ``rtc`` by default; also
  ``rtc-noised``, ``rtc-hard-noised``) at each delay of ``--delays`` (default 1, 2, 4) on the
  steps clock, and single points ``--also MODE:DELAY``: the latency is simulated as exactly
  ``d`` control steps, so the grid is deterministic and the same on every machine;
* with ``--realtime``: ``rtc`` on the wall clock at 10 Hz with the ``paradigms`` preset on the
  checkpoint's schedule, the delay measured from this machine's latency, stalls counted (not
  deterministic). An episode takes at least ``max_steps / 10`` seconds; where a chunk takes
  longer than ``n_action_steps / 2`` control periods the loop is stall-bound (the measured
  delay grows, each chunk adds fewer new actions) and an episode takes several times that.

Every point runs the same env seeds (100000 on) and the same noise per (episode, chunk), with
``compare=false``: the grid is the comparison. The grid's sampler defaults to ``sequential`` on
DDIM with 10 steps (``--sampler``, ``--scheduler``, ``--steps``): on the shipped policy it scores
like the checkpoint's DDPM-100 (``eval/results/pusht_sequential_ddim10``) at a tenth of the model
calls, which keeps seven points of 50 episodes affordable on a CPU; the delay's effect is the
schedule's, not the sampler's. Each point's run folder (``<out>/runs/<point>/``: results.json,
summary.md, progress.json) is resumed when the benchmark is run again with the same ``--out``.

Writes ``bench_realtime.json`` (every point's scores and Controller statistics),
``bench_realtime.md`` (the table: mode, delay, mean score, success rate, switch jump mean / max,
stalls) and ``bench_realtime.png`` (mean score against delay, one line per mode, sync as the
reference line; the switch jump below), atomically.

    python eval/bench_realtime.py                              # the grid, 50 episodes per point
    python eval/bench_realtime.py --realtime                   # and the real-time point
    python eval/bench_realtime.py --episodes 2 --out /tmp/bench_realtime
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from para_policy.bench import machine_info, write_json, write_text  # noqa: E402
from para_policy.checkpoints import atomic_write  # noqa: E402
from para_policy.evaluation import EvalConfigError, evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ASSET = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
DELAYS = (1, 2, 4)
#: the grid's modes: name -> (controller.mode, its other controller overrides)
MODES: dict[str, tuple[str, list[str]]] = {
    "async": ("async", []),
    "rtc-hard": ("rtc", ["controller.soft_masking=false"]),  # frozen actions only, imposed clean
    "rtc-hard-noised": ("rtc", ["controller.soft_masking=false", "controller.prefix_mode=noised"]),
    "rtc-noised": ("rtc", ["controller.prefix_mode=noised"]),  # soft masking, frozen actions at each step's level
    "rtc": ("rtc", []),  # the default: soft masking, frozen actions imposed clean
}
DEFAULT_MODES = ("async", "rtc-hard", "rtc")


def point_name(mode: str, delay: int | None, clock: str = "steps") -> str:
    """Folder name of a point: ``sync_d0``, ``rtc_d2``, ``rtc_wall``."""
    return f"{mode}_wall" if clock == "wall" else f"{mode}_d{delay}"


def grid_points(delays: Sequence[int], modes: Sequence[str] = DEFAULT_MODES) -> list[dict[str, Any]]:
    """``sync`` at delay 0, then every mode of ``modes`` (names of :data:`MODES`) at every delay (steps clock)."""
    points = [{"mode": "sync", "delay": 0, "clock": "steps"}]
    points += [{"mode": m, "delay": int(d), "clock": "steps"} for m in modes for d in delays]
    return points


def point_overrides(point: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The eval.py overrides of one point (what ``python eval.py ...`` would be given)."""
    ov = [f"checkpoint={args.checkpoint}", f"task.episodes={point['episodes']}", "compare=false", "logger=none",
          "video.enabled=false", "latency.calls=0", f"progress={str(not args.quiet).lower()}",
          f"controller.clock={point['clock']}"]
    mode, extra = MODES.get(point["mode"], (point["mode"], []))
    ov += [f"controller.mode={mode}", *extra]
    if args.max_steps is not None:
        ov.append(f"task.max_steps={args.max_steps}")
    if args.threads is not None:
        ov.append(f"threads={args.threads}")
    if point["clock"] == "wall":
        ov += [f"sampler={args.realtime_sampler}", f"controller.control_hz={args.control_hz:g}",
               *args.realtime_override]
    else:
        ov.append(f"sampler={args.sampler}")
        if args.scheduler:
            ov.append(f"sampler.scheduler={args.scheduler}")
        if args.steps:
            ov.append(f"sampler.num_inference_steps={args.steps}")
        if point["mode"] != "sync":
            ov.append(f"controller.delay_steps={point['delay']}")
        ov += list(args.override)
    return ov


def run_point(point: dict[str, Any], overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Evaluate one point into ``run_dir`` (resuming it if it holds an earlier run); its row of the table.

    The evaluator's own printout goes to ``run_dir/eval_stdout.txt``; its progress bars stay on stderr.
    """
    ov = list(overrides)
    if (run_dir / "progress.json").is_file():
        ov.append(f"resume_dir={run_dir}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=ov)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "eval_stdout.txt", "w") as log, contextlib.redirect_stdout(log):
        results = evaluate(cfg, run_dir, original_cwd=ROOT, overrides=ov)
    wall_s = time.perf_counter() - t0
    cand = results["samplers"]["candidate"]
    ctl = cand.get("controller") or {}
    ok = [e for e in cand["episodes"] if e.get("error") is None]
    scores = np.asarray([e["max_reward"] for e in ok], dtype=np.float64)
    return {
        "name": point_name(point["mode"], point["delay"], point["clock"]),
        "mode": point["mode"], "delay": point["delay"], "clock": point["clock"],
        "label": results["controller"]["label"], "sampler": cand["name"], "schedule": cand["schedule"],
        "episodes": cand["n_episodes"], "n_failed": cand["n_failed"],
        "mean_score": cand["mean_score"], "success_rate": cand["success_rate"],
        # standard error of the mean score: how far apart two points must be to mean something
        "score_sem": float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else None,
        "mean_length": cand["mean_length"],
        "switch_discontinuity_mean": ctl.get("switch_discontinuity_mean"),
        "switch_discontinuity_max": ctl.get("switch_discontinuity_max"),
        "stalls": ctl.get("stalls"), "idle_steps": ctl.get("idle_steps"), "late_steps": ctl.get("late_steps"),
        "steps_in_flight_fraction": ctl.get("steps_in_flight_fraction"),
        "delay_used_mean": ctl.get("delay_used_mean"), "delay_used_max": ctl.get("delay_used_max"),
        "chunk_latency_ms_p50": ctl.get("chunk_latency_ms_p50"),
        "chunk_latency_ms_max": ctl.get("chunk_latency_ms_max"), "switches": ctl.get("switches"),
        # controller.extend_plan / controller.deadline_ms (None where not set)
        "extended_steps": ctl.get("extended_steps"), "deadline_misses": ctl.get("deadline_misses"),
        # the episodes run in this call (a resumed point only runs the missing ones)
        "episode_wall_s_mean": float(np.mean([e["wall_time_s"] for e in ok])) if ok else None,
        "wall_s": round(wall_s, 1), "run_dir": str(run_dir), "command": "python eval.py " + " ".join(overrides),
    }


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_markdown(rows: list[dict[str, Any]], realtime: dict[str, Any] | None, args: argparse.Namespace,
                    command: str, unit: str = "px") -> str:
    """bench_realtime.md: what ran, the table, how to read it."""
    first = rows[0] if rows else realtime
    sched = first["schedule"] if first else {}
    lines = ["# Reward against inference delay: sync, async, real-time chunking", "",
             f"- checkpoint: `{args.checkpoint}`",
             f"- grid sampler: `{args.sampler}` on {sched.get('kind')} × {sched.get('num_steps')} steps; "
             f"{args.episodes} episodes per point (env seeds from 100000), same noise per (episode, chunk) "
             "at every point",
             f"- command: `{command}`", "",
             f"| mode | delay (steps) | mean score | ± sem | success rate | switch jump mean ({unit}) | "
             f"switch jump max ({unit}) | stalls |", "|---|---|---|---|---|---|---|---|"]
    for r in rows + ([realtime] if realtime else []):
        if r["clock"] == "wall":
            mode = f"{r['mode']}, wall clock {args.control_hz:g} Hz, `{r['sampler']}`"
            delay = f"measured: mean {_fmt(r['delay_used_mean'], '{:.1f}')}, max {_fmt(r['delay_used_max'], '{}')}"
        else:
            mode, delay = r["mode"], str(r["delay"])
        stalls = "every chunk (waits)" if r["mode"] == "sync" and r["clock"] == "steps" else _fmt(r["stalls"], "{}")
        lines.append(f"| {mode} | {delay} | {_fmt(r['mean_score'], '{:.3f}')} | {_fmt(r['score_sem'], '{:.3f}')} | "
                     f"{_fmt(r['success_rate'], '{:.2f}')} | {_fmt(r['switch_discontinuity_mean'], '{:.2f}')} | "
                     f"{_fmt(r['switch_discontinuity_max'], '{:.2f}')} | {stalls} |")
    lines += ["", "How to read it: `sync` is DiffusionPolicy's protocol, the robot standing still while each chunk "
              "is computed (in simulation the world waits too, so its score does not depend on latency). At delay "
              "d the next chunk is computed from the observation d steps before the queue runs out and takes over "
              "from its action d. `async` samples it freely; `rtc` freezes the d queued actions into it and lets the "
              "old chunk's plan after them guide the next positions with decaying weights (RTC's soft mask), so its "
              "first new action continues the executed ones; `rtc-hard` freezes them without the soft mask; "
              "`-noised` imposes the frozen actions at each step's noise level instead of clean. "
              "Switch jump: the distance between the new chunk's action "
              "and the old plan's at the switch step (smaller is smoother). Stalls: switches that had "
              "to wait for the chunk (none on the steps clock while d <= n_action_steps / 2). The steps-clock "
              "points are deterministic; ± sem is the standard error of the mean score over episodes."]
    if realtime:
        lines += ["", f"Real-time point: the env stepped every {1 / args.control_hz:g} s on a fixed grid, the "
                  "Controller sampling on its worker thread with the delay measured from this machine's latency "
                  f"(chunk latency p50 {_fmt(realtime['chunk_latency_ms_p50'], '{:.0f}')} ms, "
                  f"max {_fmt(realtime.get('chunk_latency_ms_max'), '{:.0f}')} ms; "
                  f"{_fmt(realtime['stalls'], '{}')} stalls in {_fmt(realtime.get('switches'), '{}')} switches; "
                  f"{_fmt(realtime['late_steps'], '{}')} late steps"
                  + ("" if realtime.get("extended_steps") is None else
                     f"; {realtime['extended_steps']} steps ran the old plan past n_action_steps (extend_plan)")
                  + ("" if realtime.get("deadline_misses") is None else
                     f"; {realtime['deadline_misses']} chunks stopped at the deadline")
                  + "). Not deterministic: it depends on the machine and its load."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], realtime: dict[str, Any] | None, path: Path, unit: str = "px") -> Path | None:
    """bench_realtime.png: mean score (± sem) against delay per mode, sync dashed; the switch jump below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    sync = next((r for r in rows if r["mode"] == "sync"), None)
    if sync is not None and sync["mean_score"] is not None:
        ax.axhline(sync["mean_score"], color="gray", ls="--", label=f"sync (waits), {sync['mean_score']:.3f}")
        ax.plot([0], [sync["mean_score"]], "o", color="gray")
    for mode, marker in zip(MODES, ("s", "v", "x", "D", "^"), strict=True):
        pts = sorted((r for r in rows if r["mode"] == mode and r["mean_score"] is not None), key=lambda r: r["delay"])
        if not pts:
            continue
        xs = [r["delay"] for r in pts]
        ax.errorbar(xs, [r["mean_score"] for r in pts], yerr=[r["score_sem"] or 0.0 for r in pts], marker=marker,
                    capsize=3, label=mode)
        jumps = [(r["delay"], r["switch_discontinuity_mean"]) for r in pts
                 if r["switch_discontinuity_mean"] is not None]
        if jumps:
            bx.plot(*zip(*jumps, strict=True), marker=marker, label=mode)
    if realtime is not None and realtime["mean_score"] is not None and realtime["delay_used_mean"] is not None:
        ax.plot([realtime["delay_used_mean"]], [realtime["mean_score"]], "*", ms=12, color="C3",
                label=f"rtc real time ({realtime['sampler']}, measured delay)")
    ax.set_ylabel("mean score (max reward)")
    if rows:
        sched = rows[0]["schedule"]
        ax.set_title(f"PushT, {rows[0]['sampler']} ({sched['kind']} × {sched['num_steps']}) on the steps clock")
    ax.legend(fontsize=8, loc="lower left")
    bx.set_xlabel("inference delay (control steps)")
    bx.set_ylabel(f"switch jump mean ({unit})")
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50, help="episodes per point (default 50, DP's protocol)")
    ap.add_argument("--delays", type=int, nargs="+", default=list(DELAYS), help="delays in control steps (1 2 4)")
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=list(MODES),
                    help=f"modes of the grid (default {' '.join(DEFAULT_MODES)}; sync always runs)")
    ap.add_argument("--also", action="append", default=[], metavar="MODE:DELAY",
                    help="one more steps-clock point outside the grid, e.g. rtc-hard:4 (repeatable)")
    ap.add_argument("--sampler", default="sequential", help="the grid's sampler preset (default sequential)")
    ap.add_argument("--scheduler", default="ddim", help="the grid's schedule kind (default ddim; '' = checkpoint's)")
    ap.add_argument("--steps", type=int, default=10, help="the grid's denoising steps (default 10; 0 = checkpoint's)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra eval.py override for the grid points, e.g. sampler.tolerance=0.1 (repeatable)")
    ap.add_argument("--realtime", action="store_true", help="also run rtc on the wall clock (not deterministic)")
    ap.add_argument("--realtime-sampler", default="paradigms", help="the real-time point's preset (paradigms)")
    ap.add_argument("--realtime-episodes", type=int, default=None, help="its episodes (default: --episodes)")
    ap.add_argument("--realtime-override", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra eval.py override for the real-time point, e.g. sampler.scheduler=ddim")
    ap.add_argument("--control-hz", type=float, default=10.0, help="the real-time point's control rate (10)")
    ap.add_argument("--checkpoint", type=Path, default=ASSET, help="policy (default: the shipped PushT policy)")
    ap.add_argument("--max-steps", type=int, default=None, help="episode length (default: the task's, 300)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true", help="no per-episode progress bars")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "bench_realtime")
    args = ap.parse_args(argv)
    args.checkpoint, args.out = args.checkpoint.resolve(), args.out.resolve()
    command = "python eval/bench_realtime.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.episodes < 1 or any(d < 1 for d in args.delays):
        ap.error("--episodes and --delays must be >= 1 (sync is the delay-0 point)")
    args.out.mkdir(parents=True, exist_ok=True)
    points = [{**p, "episodes": args.episodes} for p in grid_points(sorted(set(args.delays)), args.modes)]
    for extra in args.also:
        mode, _, delay = extra.partition(":")
        if mode not in MODES or not delay.isdigit() or int(delay) < 1:
            ap.error(f"--also {extra!r}: expected MODE:DELAY with MODE one of {list(MODES)} and DELAY >= 1")
        if not any(p["mode"] == mode and p["delay"] == int(delay) for p in points):
            points.append({"mode": mode, "delay": int(delay), "clock": "steps", "episodes": args.episodes})
    if args.realtime:
        points.append({"mode": "rtc", "delay": None, "clock": "wall",
                       "episodes": args.realtime_episodes or args.episodes})
    rows: list[dict[str, Any]] = []
    realtime = None
    t_start = time.perf_counter()
    for i, point in enumerate(points, 1):
        name = point_name(point["mode"], point["delay"], point["clock"])
        print(f"[{i}/{len(points)}] {name}: {point['episodes']} episodes ...", flush=True)
        try:
            row = run_point(point, point_overrides(point, args), args.out / "runs" / name)
        except EvalConfigError as e:
            sys.exit(f"bench_realtime.py: error at {name}: {e}\n(an earlier run in {args.out / 'runs' / name} with "
                     "other settings? pass a fresh --out)")
        print(f"    mean score {_fmt(row['mean_score'], '{:.3f}')} ± {_fmt(row['score_sem'], '{:.3f}')}, success "
              f"{_fmt(row['success_rate'], '{:.2f}')}, switch jump mean "
              f"{_fmt(row['switch_discontinuity_mean'], '{:.2f}')}, stalls {_fmt(row['stalls'], '{}')}; "
              f"{row['wall_s']:.0f} s "
              f"({_fmt(row['episode_wall_s_mean'], '{:.1f}')} s per episode)", flush=True)
        if point["clock"] == "wall":
            realtime = row
        else:
            rows.append(row)
    summary = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "points": rows, "realtime": realtime, "machine": machine_info(),
               "wall_s": round(time.perf_counter() - t_start, 1), "command": command}
    write_json(args.out / "bench_realtime.json", summary, indent=2)
    md = format_markdown(rows, realtime, args, command)
    write_text(args.out / "bench_realtime.md", md)
    plot(rows, realtime, args.out / "bench_realtime.png")
    print(md)
    print(f"written: {args.out / 'bench_realtime.md'}, .json, .png")
    return summary


if __name__ == "__main__":
    main()
