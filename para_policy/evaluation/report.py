"""Turning episode records and timings into results.json, summary.md, the printed table and plots.

``results.json`` schema (``SCHEMA_VERSION``)::

    schema_version, task, action_unit, checkpoint, seeds, noise_seed, overrides, config (resolved),
    latency_method {n_calls, warmup, batch_size, n_action_steps[, includes_obs_encoder,
                    observations_dir]}           # the last two for image policies
    machine {torch, torch_threads, cpu_count, platform, processor, load_avg}
    controller {mode, delay_steps, clock, control_hz, prefix_mode, soft_masking, period_s, deterministic,
                label, n_action_steps[, remote]}      # remote: 'local' or 'HOST:PORT' where set
    inference {backend, compile, precision, cuda_graphs, note}   # how the denoiser ran, for both samplers
    samplers {role: {                        # role: 'candidate' (the chosen sampler), 'baseline'
        name, spec {name, scheduler, num_inference_steps, options}, schedule {kind, num_steps},
        n_episodes, n_failed, mean_score, success_rate, mean_length,
        failures [{seed, error}], episodes [{seed, max_reward, success, length, n_chunks,
        rounds_per_chunk, wall_time_s, error[, <CONTROLLER_FIELDS>]}],
        rollout_rounds_per_chunk {n, mean, std, min, max, p50, p95, p99},
        latency {ms_per_chunk, ms_per_action, rounds_per_chunk, model_evals_per_chunk} | null,
        controller {episodes, stalls, stalls_per_episode, switches, switch_discontinuity_mean,
                    switch_discontinuity_max, steps_in_flight, steps_in_flight_fraction, idle_steps,
                    delay_used_mean, delay_used_max, extended_steps[, late_steps, stall_wait_ms_max,
                    chunk_latency_ms_p50, chunk_latency_ms_max, deadline_misses][, round_trip_ms_p50,
                    round_trip_ms_p95, overhead_ms_p50, failures, reconnects, held_steps]} | null }}
                                             # the round trips only for a served candidate
                                             # (controller.remote; realtime.REMOTE_FIELDS per episode)
                                             # 'controller' only where the run was not sync on the
                                             # steps clock (the batched loop); the episodes then
                                             # carry the Controller's per-episode statistics
                                             # (para_policy.evaluation.realtime.CONTROLLER_FIELDS)
    comparison {candidate, baseline, faithfulness {mean_px, max_px, n_calls},   # in action_unit
                                                                              # (key names from PushT)
                ratios {<metric>: candidate / baseline}} | null

Image tasks record the candidate's chunk observations for latency timing in
``chunk_obs/<role>_seed<seed>.npz`` (:func:`write_chunk_obs`), one file per finished
episode, not in results.json or progress.json (whose records point at the file in
``chunk_obs_file``); flat observations stay inline in progress.json (``chunk_obs``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from para_policy.checkpoints import atomic_write
from para_policy.stats import percentile_summary

SCHEMA_VERSION = 1
#: folder of the run that holds image tasks' recorded chunk observations
CHUNK_OBS_DIR = "chunk_obs"
_CHUNK_OBS_META = "__meta__"

# (label, path in a role summary, format); the table's rows and the ratio fields
ROWS: list[tuple[str, str, str]] = [
    ("mean score", "mean_score", "{:.3f}"),
    ("success rate", "success_rate", "{:.3f}"),
    ("mean episode length", "mean_length", "{:.1f}"),
    ("failed episodes", "n_failed", "{:d}"),
    ("latency ms/chunk p50", "latency.ms_per_chunk.p50", "{:.2f}"),
    ("latency ms/chunk p95", "latency.ms_per_chunk.p95", "{:.2f}"),
    ("latency ms/chunk p99", "latency.ms_per_chunk.p99", "{:.2f}"),
    ("latency ms/chunk max", "latency.ms_per_chunk.max", "{:.2f}"),
    ("latency ms/action p50", "latency.ms_per_action.p50", "{:.2f}"),
    ("latency ms/action p95", "latency.ms_per_action.p95", "{:.2f}"),
    ("latency ms/action p99", "latency.ms_per_action.p99", "{:.2f}"),
    ("latency ms/action max", "latency.ms_per_action.max", "{:.2f}"),
    ("rounds/chunk (batch 1)", "latency.rounds_per_chunk.mean", "{:.2f}"),
    ("model evals/chunk (batch 1)", "latency.model_evals_per_chunk.mean", "{:.1f}"),
    ("rounds/chunk (rollouts)", "rollout_rounds_per_chunk.mean", "{:.2f}"),
]
#: rows added where the episodes ran through a Controller (controller.mode=async|rtc, or the wall clock)
CONTROLLER_ROWS: list[tuple[str, str, str]] = [
    ("stalls/episode", "controller.stalls_per_episode", "{:.2f}"),
    ("switches/episode", "controller.switches_per_episode", "{:.2f}"),
    ("switch jump mean ({unit})", "controller.switch_discontinuity_mean", "{:.3f}"),
    ("switch jump max ({unit})", "controller.switch_discontinuity_max", "{:.3f}"),
    ("steps in flight (fraction)", "controller.steps_in_flight_fraction", "{:.3f}"),
    ("idle steps (simulated)", "controller.idle_steps", "{:d}"),
    ("delay used mean (steps)", "controller.delay_used_mean", "{:.2f}"),
    ("late steps (wall clock)", "controller.late_steps", "{:d}"),
    ("chunks stopped at the deadline", "controller.deadline_misses", "{:d}"),
    ("steps run past n_action_steps (extend_plan)", "controller.extended_steps", "{:d}"),
    ("round trip ms/chunk p50 (server)", "controller.round_trip_ms_p50", "{:.2f}"),
    ("round trip ms/chunk p95 (server)", "controller.round_trip_ms_p95", "{:.2f}"),
    ("network overhead ms/chunk p50", "controller.overhead_ms_p50", "{:.2f}"),
    ("failed chunk calls (server)", "controller.failures", "{:d}"),
    ("reconnects (server)", "controller.reconnects", "{:d}"),
    ("held steps (server late)", "controller.held_steps", "{:d}"),
]
RATIO_KEYS: dict[str, str] = {
    "mean_score": "mean_score",
    "success_rate": "success_rate",
    "mean_length": "mean_length",
    "latency_ms_per_chunk_p50": "latency.ms_per_chunk.p50",
    "latency_ms_per_chunk_p95": "latency.ms_per_chunk.p95",
    "latency_ms_per_chunk_p99": "latency.ms_per_chunk.p99",
    "latency_ms_per_chunk_max": "latency.ms_per_chunk.max",
    "latency_ms_per_action_p50": "latency.ms_per_action.p50",
    "rounds_per_chunk": "latency.rounds_per_chunk.mean",
    "model_evals_per_chunk": "latency.model_evals_per_chunk.mean",
}


def lookup(d: Mapping[str, Any] | None, path: str) -> Any:
    """``d['a']['b']`` for ``path='a.b'``; None if any part is missing."""
    for part in path.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def ratio(a: Any, b: Any) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is 0 (JSON has no inf)."""
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def summarize_episodes(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Task metrics over the episodes that ran to the end (failed ones are counted, not averaged)."""
    ok = [e for e in episodes if e.get("error") is None]
    failed = [e for e in episodes if e.get("error") is not None]
    rounds = [r for e in ok for r in e.get("rounds_per_chunk", [])]
    return {
        "n_episodes": len(episodes),
        "n_failed": len(failed),
        "mean_score": float(np.mean([e["max_reward"] for e in ok])) if ok else None,
        "success_rate": float(np.mean([bool(e["success"]) for e in ok])) if ok else None,
        "mean_length": float(np.mean([e["length"] for e in ok])) if ok else None,
        "failures": [{"seed": e["seed"], "error": e["error"]} for e in failed],
        "rollout_rounds_per_chunk": percentile_summary(rounds),
    }


def summarize_controller(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The Controller's statistics over the episodes that ran to the end (None when none has them).

    Totals of stalls, switches, steps in flight and idle steps; the switch discontinuity
    (``|a_new - a_old|`` at a switch, in the task's action unit) averaged over all switches and
    maximised; ``steps_in_flight_fraction``: the share of control steps that ran while a chunk was
    being computed (the overlap asynchronous inference buys). ``idle_steps`` is None on the wall
    clock, ``late_steps`` (steps that missed their tick) None on the steps clock. Served episodes
    (``controller.remote``) add the round trips (:func:`summarize_remote`).
    """
    ok = [e for e in episodes if e.get("error") is None and "stalls" in e]
    if not ok:
        return None

    def total(key: str) -> int | None:
        values = [e.get(key) for e in ok]
        return None if any(v is None for v in values) else int(sum(values))

    switches = sum(int(e["switches"]) for e in ok)
    jumps = [(e["switch_discontinuity_mean"], e["switches"]) for e in ok
             if e.get("switch_discontinuity_mean") is not None]
    maxima = [e["switch_discontinuity_max"] for e in ok if e.get("switch_discontinuity_max") is not None]
    delays = [(e["delay_used_mean"], e["n_chunks"]) for e in ok if e.get("delay_used_mean") is not None]
    chunks = sum(n for _, n in delays)
    steps = sum(int(e["length"]) for e in ok)
    out: dict[str, Any] = {
        "episodes": len(ok),
        "stalls": total("stalls"),
        "stalls_per_episode": float(np.mean([e["stalls"] for e in ok])),
        "switches": switches,
        "switches_per_episode": switches / len(ok),
        "switch_discontinuity_mean": sum(m * n for m, n in jumps) / sum(n for _, n in jumps) if jumps and switches
        else None,
        "switch_discontinuity_max": max(maxima) if maxima else None,
        "steps_in_flight": total("steps_in_flight"),
        "steps_in_flight_fraction": total("steps_in_flight") / steps if steps else None,
        "idle_steps": total("idle_steps"),
        "delay_used_mean": sum(m * n for m, n in delays) / chunks if chunks else None,
        "extended_steps": total("extended_steps") if any("extended_steps" in e for e in ok) else None,
        "delay_used_max": max((e["delay_used_max"] for e in ok if e.get("delay_used_max") is not None), default=None),
    }
    if any("late_steps" in e for e in ok):
        waits = [e["stall_wait_ms_max"] for e in ok if e.get("stall_wait_ms_max") is not None]
        p50 = [e["chunk_latency_ms_p50"] for e in ok if e.get("chunk_latency_ms_p50") is not None]
        lat_max = [e["chunk_latency_ms_max"] for e in ok if e.get("chunk_latency_ms_max") is not None]
        out.update(late_steps=total("late_steps"), deadline_misses=total("deadline_misses"),
                   stall_wait_ms_max=max(waits) if waits else None,
                   chunk_latency_ms_p50=float(np.median(p50)) if p50 else None,
                   chunk_latency_ms_max=max(lat_max) if lat_max else None)
    if any("round_trip_ms_p50" in e for e in ok):
        out.update(summarize_remote(ok))
    return out


def summarize_remote(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The network's figures over served episodes (``controller.remote``), as the wall clock's latencies are
    summarized: the median over episodes of each one's round-trip p50 and p95 and overhead p50 (ms per chunk
    call), and the totals of failed chunk calls, reconnects and held steps."""
    def median(key: str) -> float | None:
        values = [e[key] for e in episodes if e.get(key) is not None]
        return float(np.median(values)) if values else None

    return {"round_trip_ms_p50": median("round_trip_ms_p50"), "round_trip_ms_p95": median("round_trip_ms_p95"),
            "overhead_ms_p50": median("overhead_ms_p50"),
            **{k: int(sum(int(e.get(k) or 0) for e in episodes)) for k in ("failures", "reconnects", "held_steps")}}


def comparison(samplers: Mapping[str, Mapping[str, Any]], faith: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Ratios candidate / baseline for every metric in ``RATIO_KEYS``, plus faithfulness."""
    if "candidate" not in samplers or "baseline" not in samplers:
        return None
    c, b = samplers["candidate"], samplers["baseline"]
    ratios = {key: ratio(lookup(c, path), lookup(b, path)) for key, path in RATIO_KEYS.items()}
    speedup = ratio(lookup(b, "latency.ms_per_chunk.p50"), lookup(c, "latency.ms_per_chunk.p50"))
    return {"candidate": c["name"], "baseline": b["name"], "ratios": ratios, "speedup_p50": speedup,
            "faithfulness": dict(faith) if faith else None}


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(int(value) if fmt == "{:d}" else value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (one column per sampler, then the ratio)."""
    samplers = results["samplers"]
    roles = [r for r in ("candidate", "baseline") if r in samplers]
    names = [samplers[r]["name"] + (" (baseline)" if r == "baseline" else "") for r in roles]
    header = ["metric", *names] + (["ratio"] if len(roles) == 2 else [])
    rows = []
    for label, path, fmt in ROWS:
        row = [label] + [_fmt(lookup(samplers[r], path), fmt) for r in roles]
        if len(roles) == 2:
            row.append(_fmt(ratio(lookup(samplers["candidate"], path), lookup(samplers["baseline"], path)),
                            "{:.3f}"))
        rows.append(row)
    if any(samplers[r].get("controller") for r in roles):
        unit = results.get("action_unit", "px")
        for label, path, fmt in CONTROLLER_ROWS:
            values = [lookup(samplers[r], path) for r in roles]
            if all(v is None for v in values):
                continue  # e.g. late steps on the steps clock
            row = [label.format(unit=unit)] + [_fmt(v, fmt) for v in values]
            if len(roles) == 2:
                row.append("")
            rows.append(row)
    comp = results.get("comparison") or {}
    faith = comp.get("faithfulness")
    if faith:
        unit = results.get("action_unit", "px")
        rows.append([f"action distance mean ({unit})", _fmt(faith.get("mean_px"), "{:.4f}"), "0", ""])
        rows.append([f"action distance max ({unit})", _fmt(faith.get("max_px"), "{:.4f}"), "0", ""])
    return header, rows


def format_table(results: Mapping[str, Any]) -> str:
    """The comparison as a fixed-width text table, for the terminal."""
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths,
                                                                                          strict=True)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                               strict=True))))
    return "\n".join(out)


def format_markdown(results: Mapping[str, Any]) -> str:
    """summary.md: what ran, the comparison table, failures, how latency was measured."""
    header, rows = table_rows(results)
    md = [f"# Evaluation: {results['task']}, sampler {results['samplers']['candidate']['name']}", ""]
    md.append(f"- checkpoint: `{results['checkpoint']}`")
    seeds = results["seeds"]
    md.append(f"- episodes: {len(seeds)} (env seeds {seeds[0]}–{seeds[-1]})" if seeds else "- episodes: 0")
    for role, s in results["samplers"].items():
        spec = s["spec"]
        opts = ", ".join(f"{k}={v}" for k, v in spec["options"].items()) or "no options"
        md.append(f"- {role}: `{s['name']}` on {s['schedule']['kind']} × {s['schedule']['num_steps']} steps "
                  f"({opts})")
    ctl = results.get("controller") or {}
    if ctl and not (ctl.get("mode") == "sync" and ctl.get("clock") == "steps" and not ctl.get("remote")):
        md.append(f"- controller: `{ctl.get('label')}` (mode={ctl.get('mode')}, delay_steps={ctl.get('delay_steps')}, "
                  + (f"prefix_mode={ctl['prefix_mode']}, soft_masking={ctl.get('soft_masking')}, "
                     if ctl.get("prefix_mode") else "")
                  + f"clock={ctl.get('clock')}" + (f", {ctl.get('control_hz'):g} Hz" if ctl.get("control_hz") else "")
                  + (f", remote={ctl['remote']}" if ctl.get("remote") else "")
                  + ")" + ("" if ctl.get("deterministic") else ": real time, not deterministic"))
    inference = results.get("inference")
    if inference:
        md.append(f"- inference: {inference.get('note') or 'backend ' + str(inference.get('backend'))}")
    if results.get("overrides"):
        md.append(f"- overrides: `{' '.join(results['overrides'])}`")
    md += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    lat = results.get("latency_method") or {}
    machine = results.get("machine") or {}
    md += ["", "## How latency was measured", "", latency_note(lat, machine)]
    if ctl and not (ctl.get("mode") == "sync" and ctl.get("clock") == "steps" and not ctl.get("remote")):
        md += ["", "## How chunks were scheduled", "", controller_note(ctl)]
    failures = [(role, f) for role, s in results["samplers"].items() for f in s.get("failures", [])]
    if failures:
        md += ["", "## Failed episodes", ""]
        md += [f"- {role} seed {f['seed']}: {f['error']}" for role, f in failures]
    return "\n".join(md) + "\n"


def latency_note(lat: Mapping[str, Any], machine: Mapping[str, Any]) -> str:
    """summary.md's paragraph on how batch-1 latency was measured (``results['latency_method']``), or why not."""
    if not lat.get("n_calls"):  # a served candidate: its chunk inputs stayed on the server, no batch-1 pass
        return ("No batch-1 latency pass: the candidate's chunks were sampled by a policy server, whose round trips "
                f"are in the table above. Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, "
                f"torch {machine.get('torch')}, load average {machine.get('load_avg')} at the time.")
    note = (f"Wall-clock of one `predict_action` call at batch 1 on {lat.get('n_calls', 0)} chunk observations "
            f"recorded during the rollouts, the same noise for both samplers, {lat.get('warmup', 0)} warm-up "
            "calls excluded, samplers alternating which goes first. ms/action = ms/chunk / n_action_steps "
            f"({lat.get('n_action_steps')}). Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, "
            f"torch {machine.get('torch')} with {machine.get('torch_threads')} threads, load average "
            f"{machine.get('load_avg')} at the time (latency taken on a busy machine is not a claim).")
    if lat.get("includes_obs_encoder"):
        note += (" The policy's observation encoder (its image ResNet) runs inside every call, so these figures "
                 "include it.")
    return note


def controller_note(ctl: Mapping[str, Any]) -> str:
    """One paragraph saying what ``results['controller']`` simulated, for summary.md."""
    mode, d = ctl.get("mode"), ctl.get("delay_steps")
    what = {"sync": "each chunk is computed while the robot waits (the env does not move meanwhile)",
            "async": "the next chunk is sampled while the current one runs and switched to, time-aligned, when "
                     "the queue runs out (naive asynchronous inference)",
            "rtc": "the next chunk is sampled while the current one runs, with the actions that run meanwhile "
                   "frozen into it (real-time chunking, "
                   + ("hard masking" if ctl.get("soft_masking") is False else
                      "soft masking: the old chunk's plan guides the positions after them")
                   + (", imposed at each step's noise level)" if ctl.get("prefix_mode") == "noised"
                      else ", imposed clean)")}.get(str(mode), str(mode))
    if ctl.get("clock") == "wall":
        delay = "measured by the Controller from this machine's latency" if d is None else f"fixed at {d} steps"
        return (f"Each episode ran through one `Controller`: {what}. The env was stepped every {ctl.get('period_s')} s "
                f"on a fixed grid (sleep to the next tick; a late step runs at once, without drift), and the delay was "
                f"{delay}. Stalls are steps at which `act` waited for a chunk; late steps missed their tick. These "
                "numbers depend on the machine and its load: another run gives others." + remote_note(ctl))
    return (f"Each episode ran through one `Controller`: {what}. On the steps clock a chunk requested at step s "
            f"counts as ready at step s + {d}, so the results are deterministic and machine-independent. The noise "
            "of each chunk is keyed by (noise seed, episode seed, chunk index), as in the batched loop, so both "
            "samplers get the same noise. Switch jump: the distance between the new chunk's action and the old "
            "plan's at the switch step, in the task's action unit." + remote_note(ctl))


def remote_note(ctl: Mapping[str, Any]) -> str:
    """The sentences summary.md adds for a served candidate (``controller.remote``), else ``''``."""
    remote = ctl.get("remote")
    if not remote:
        return ""
    where = ("a policy server this run started on loopback (`para-policy serve`, its log in policy_server.log)"
             if remote == "local" else f"the policy server at {remote}")
    return (f" The candidate's chunks were sampled by {where} through a `RemoteController`, the same loop, with each "
            "chunk's noise keyed as in process; the baseline ran in process. Round trip: a chunk call as the client "
            "saw it; overhead: the round trip minus the server's sampling time (encoding, network, queue). The "
            "candidate's chunk inputs stay on the server, so the batch-1 latency rows are left out.")


def atomic_file(path: str | Path, write: Callable[[str], Any]) -> Path:
    """``write(tmp)`` then rename over ``path`` (``atomic_write``: never a torn file).

    The temporary name keeps ``path``'s suffix, so writers that pick a format from the
    file name (imageio's ffmpeg) see ``.mp4``.
    """
    path = Path(path)

    def _write(tmp: str) -> None:
        named = f"{tmp}{path.suffix}"
        try:
            write(named)
            os.replace(named, tmp)
        finally:
            if os.path.exists(named):
                os.remove(named)

    return atomic_write(path, _write)


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, atomically (readers never see half a file)."""
    text = json.dumps(data, indent=2, default=_json_default)
    return atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    """``text`` at ``path``, atomically."""
    return atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def write_chunk_obs(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """One episode's recorded chunk observations ``{key: (n_chunks, To, *shape)}`` as a compressed ``.npz``, atomically.

    An array whose values are all ``k / 255`` (an env's uint8 frame divided by 255, as
    PushT's image observation is made) is stored as those uint8 ``k``: a quarter of the size,
    and :func:`read_chunk_obs` gives back the same float32 values bit for bit. Any other
    array is stored as float32.
    """
    stored: dict[str, np.ndarray] = {}
    kinds = []
    for i, (key, value) in enumerate(arrays.items()):
        x = np.asarray(value, dtype=np.float32)
        q = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) if x.size and np.isfinite(x).all() else None
        exact = q is not None and np.array_equal(q.astype(np.float32) / 255, x)
        stored[f"a{i}"] = q if exact else x
        kinds.append([str(key), "u8/255" if exact else "f32"])
    stored[_CHUNK_OBS_META] = np.array(json.dumps({"keys": kinds}))
    return atomic_file(path, lambda tmp: np.savez_compressed(tmp, **stored))


def read_chunk_obs(path: str | Path) -> dict[str, np.ndarray]:
    """What :func:`write_chunk_obs` wrote: ``{key: (n_chunks, To, *shape) float32}``."""
    with np.load(path, allow_pickle=False) as data:
        kinds = json.loads(str(data[_CHUNK_OBS_META]))["keys"]
        out = {}
        for i, (key, kind) in enumerate(kinds):
            x = data[f"a{i}"]
            out[key] = x.astype(np.float32) / 255 if kind == "u8/255" else x.astype(np.float32)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def make_plots(results: Mapping[str, Any], timings: Mapping[str, Mapping[str, Any]], out_dir: Path
               ) -> dict[str, Path]:
    """latency.png (ms per chunk of each sampler), rewards.png (max reward per episode), rounds.png.

    Returns name → path of the plots written (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = results["samplers"]
    labels = {r: s["name"] + (" (baseline)" if r == "baseline" else "") for r, s in samplers.items()}
    paths: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{name}.png"
        atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
        plt.close(fig)
        paths[name] = path

    if any(timings.get(r, {}).get("ms") for r in samplers):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        data = [timings[r]["ms"] for r in samplers if timings.get(r, {}).get("ms")]
        names = [labels[r] for r in samplers if timings.get(r, {}).get("ms")]
        bins = np.histogram_bin_edges(np.concatenate(data), bins=30)
        for d, n in zip(data, names, strict=True):
            ax.hist(d, bins=bins, alpha=0.6, label=f"{n}: p50 {np.median(d):.1f} ms")
        ax.set_xlabel("ms per chunk (batch 1)")
        ax.set_ylabel("calls")
        ax.set_title("Policy call latency")
        ax.legend()
        save(fig, "latency")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(samplers))
    for i, (role, s) in enumerate(samplers.items()):
        eps = s["episodes"]
        x = np.arange(len(eps)) + i * width
        ax.bar(x, [e["max_reward"] for e in eps], width=width, label=labels[role])
    seeds = results["seeds"]
    step = max(1, len(seeds) // 10)
    ax.set_xticks(np.arange(0, len(seeds), step))
    ax.set_xticklabels([str(s) for s in seeds[::step]], rotation=45, fontsize=7)
    ax.set_xlabel("env seed")
    ax.set_ylabel("episode score (max reward)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    save(fig, "rewards")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for role, s in samplers.items():
        rounds = [r for e in s["episodes"] for r in e.get("rounds_per_chunk", [])]
        if rounds:
            ax.hist(rounds, bins=np.arange(0, max(rounds) + 2) - 0.5, alpha=0.6, label=labels[role])
    ax.set_xlabel("sequential model rounds per chunk (rollouts)")
    ax.set_ylabel("chunks")
    ax.legend()
    save(fig, "rounds")
    return paths


def write_video(frames: Sequence[np.ndarray], path: Path, fps: int) -> Path | None:
    """Write frames (H, W, 3) uint8 as ``path`` (.mp4 via ffmpeg; a .gif next to it if that fails)."""
    import imageio.v2 as imageio

    if not frames:
        return None
    arr = [np.asarray(f, dtype=np.uint8) for f in frames]
    try:
        atomic_file(path, lambda tmp: imageio.mimsave(tmp, arr, fps=fps, macro_block_size=1))
        return path
    except Exception as e:  # no ffmpeg: a gif still shows the episode
        gif = path.with_suffix(".gif")
        print(f"warning: could not write {path.name} ({type(e).__name__}: {e}); writing {gif.name}")
        atomic_file(gif, lambda tmp: imageio.mimsave(tmp, arr, duration=1000 / fps, loop=0))
        return gif
