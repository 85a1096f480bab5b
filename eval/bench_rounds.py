"""Picard vs ParaTAA on real PushT observations: rounds and model evaluations per chunk.

Rounds (sequential model calls) and model evaluations (denoiser rows) do not depend on
the machine, so this benchmark counts them and never times anything.

1. **Observation stream.** The policy is rolled out in PushT (``make_env()``) with the
   sequential DDIM sampler (16 steps by default), a few episodes (env seeds 100000+) of up
   to ``--max-chunks`` chunks each; the observation history (n_obs_steps, obs_dim) of
   every chunk is kept.
2. **Replay.** Every chunk is sampled again at batch 1 on the checkpoint's own schedule
   (DDPM-100 for DiffusionPolicy) with the sequential loop (the reference), Picard
   (``picard_sample``) and ParaTAA (``taa_sample``), for every window × tolerance, cold and
   warm started, all on the same ``x_T`` and step noise. The warm start is what a controller
   would use: the setting's own previous chunk's normalized trajectory shifted by
   ``n_action_steps`` with its end padded by the last point, turned into an initial iterate
   by :func:`para_policy.samplers.warm_start_init`.
3. **Report.** Means over the chunks that have a previous chunk (the first chunk of an
   episode cannot be warm started, so it is left out of every row alike): rounds, model
   evaluations, and the deviation of the executed actions from the sequential ones in
   pixels (unnormalized).

    python eval/bench_rounds.py
    python eval/bench_rounds.py --episodes 2 --max-chunks 5 --windows 16 100 --tolerances 0.1

Writes ``eval/results/bench_rounds.md`` (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.checkpoints import atomic_write
from para_policy.evaluation.rollout import seed_for
from para_policy.policy import LowdimPolicy, load_policy
from para_policy.samplers import (
    draw_noise,
    picard_sample,
    sampler_spec,
    sequential_sample,
    shift_trajectory,
    taa_sample,
    warm_start_init,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "eval" / "results"
FINAL_CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
RUN_CHECKPOINT = ROOT / "runs" / "pusht_ship" / "checkpoints" / "latest.safetensors"
SAMPLER_FNS = {"picard": picard_sample, "taa": taa_sample}
REPLAY_STREAM = 7  # noise-key stream of the replays (distinct from the recording's)


def record_stream(policy: LowdimPolicy, episodes: int, max_chunks: int, seed_start: int, ddim_steps: int,
                  noise_seed: int) -> list[dict[str, Any]]:
    """Roll the policy out with sequential DDIM and keep each chunk's observation history.

    Returns:
        One dict per chunk: ``episode`` (env seed), ``chunk`` (index in the episode) and
        ``obs`` ``(n_obs_steps, obs_dim)`` float32, in rollout order.
    """
    from para_policy.tasks.pusht.env import make_env

    spec = sampler_spec("sequential", scheduler="ddim", num_inference_steps=ddim_steps)
    env = make_env()
    chunks: list[dict[str, Any]] = []
    try:
        for e in range(episodes):
            seed = seed_start + e
            obs, _ = env.reset(seed=seed)
            history = deque([np.asarray(obs, dtype=np.float32)] * policy.n_obs_steps, maxlen=policy.n_obs_steps)
            for c in range(max_chunks):
                obs_hist = np.stack(list(history))
                chunks.append({"episode": seed, "chunk": c, "obs": obs_hist})
                g = torch.Generator().manual_seed(seed_for(noise_seed, seed, c))
                out = policy.predict_action({"obs": torch.from_numpy(obs_hist)[None]}, generator=g, sampler=spec)
                done = False
                for a in out["action"][0].numpy():
                    obs, _, terminated, truncated, _ = env.step(a)
                    history.append(np.asarray(obs, dtype=np.float32))
                    if terminated or truncated:
                        done = True
                        break
                if done:
                    break
    finally:
        env.close()
    return chunks


def replay(policy: LowdimPolicy, chunks: list[dict[str, Any]], windows: list[int], tolerances: list[float],
           memory: int, ridge: float, noise_seed: int) -> tuple[list[dict[str, Any]], int]:
    """Sample every chunk with every setting on shared noise; one record per (setting, chunk).

    Returns:
        ``(records, S)``: records have sampler, window, tolerance, start, episode, chunk,
        rounds, model_evals, dev_px (max |Δ action| of the executed actions vs the
        sequential loop, pixels); S is the number of denoising steps.
    """
    from tqdm import tqdm

    schedule = policy.schedule_for(sampler_spec("sequential"))  # the checkpoint's own schedule
    S = schedule.num_steps
    Na, start = policy.n_action_steps, policy.action_start
    shape = policy.trajectory_shape(1)
    settings = [(name, w, tol, init) for name in SAMPLER_FNS for w in sorted({min(w, S) for w in windows})
                for tol in tolerances for init in ("cold", "warm")]

    def executed(sample: torch.Tensor) -> torch.Tensor:
        actions = policy.normalizer.unnormalize("action", sample[..., : policy.action_dim])
        return actions[:, start: start + Na]

    records: list[dict[str, Any]] = []
    previous: dict[tuple, torch.Tensor] = {}
    for ch in tqdm(chunks, desc="replay", unit="chunk"):
        obs = torch.from_numpy(ch["obs"])[None]
        cond, inpaint = policy.conditioning(obs)
        g = torch.Generator().manual_seed(seed_for(REPLAY_STREAM, noise_seed, ch["episode"], ch["chunk"]))
        x_T, noise = draw_noise(schedule, shape, g)
        ref, _ = sequential_sample(policy.denoise, schedule, x_T, noise, condition=cond, inpaint=inpaint)
        ref_actions = executed(ref)
        for setting in settings:
            name, w, tol, init_kind = setting
            key = (setting, ch["episode"])
            init = None
            if init_kind == "warm" and ch["chunk"] > 0:
                init = warm_start_init(schedule, shift_trajectory(previous[key], Na), x_T, noise)
            out, stats = SAMPLER_FNS[name](
                policy.denoise, schedule, x_T, noise, window=w, tolerance=tol, condition=cond, inpaint=inpaint,
                init=init, **({"memory": memory, "ridge": ridge} if name == "taa" else {}))
            if not stats.all_converged:
                raise RuntimeError(f"{setting} did not converge on chunk {ch['episode']}/{ch['chunk']}")
            previous[key] = out
            records.append({"sampler": name, "window": w, "tolerance": tol, "start": init_kind,
                            "episode": ch["episode"], "chunk": ch["chunk"], "rounds": stats.rounds,
                            "model_evals": stats.model_evals,
                            "dev_px": float((executed(out) - ref_actions).abs().max())})
    return records, S


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean rounds / evals and action deviations per setting, over chunks with a predecessor."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["chunk"] > 0:
            groups.setdefault((r["sampler"], r["window"], r["tolerance"], r["start"]), []).append(r)
    rows = []
    for (name, w, tol, start), rs in groups.items():
        rows.append({"sampler": name, "window": w, "tolerance": tol, "start": start, "chunks": len(rs),
                     "rounds": statistics.mean(r["rounds"] for r in rs), "rounds_max": max(r["rounds"] for r in rs),
                     "model_evals": statistics.mean(r["model_evals"] for r in rs),
                     "dev_max": max(r["dev_px"] for r in rs), "dev_mean": statistics.mean(r["dev_px"] for r in rs)})
    picard = {(r["window"], r["tolerance"], r["start"]): r["rounds"] for r in rows if r["sampler"] == "picard"}
    for r in rows:
        base = picard.get((r["window"], r["tolerance"], r["start"]))
        r["vs_picard"] = r["rounds"] / base if base else float("nan")
    rows.sort(key=lambda r: (r["window"], r["tolerance"], r["start"], r["sampler"]))
    return rows


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Rounds per chunk: Picard vs ParaTAA on PushT observations",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Checkpoint: `{meta['checkpoint']}` (sha256 {meta['sha256'][:12]}, {meta['train_steps']} training steps). "
        f"Observation stream: {meta['episodes']} episodes (env seeds {meta['seeds']}) rolled out with sequential "
        f"DDIM-{meta['ddim_steps']}, {meta['n_chunks']} chunks in all. Replay on the checkpoint's "
        f"{meta['schedule']} schedule ({meta['S']} steps) at batch 1, every setting on the same noise; "
        f"ParaTAA memory {meta['memory']}, ridge {meta['ridge']}.",
        "",
        f"Means over the {meta['n_warm']} chunks that have a previous chunk (every row alike; the sequential "
        f"loop takes {meta['S']} rounds and {meta['S']} model evals). Warm: the setting's own previous "
        "trajectory shifted by n_action_steps, end padded, through `warm_start_init`. Action deviation: "
        "max |executed action − sequential's| in pixels (unnormalized), over the chunks.",
        "",
        "| window | tolerance | start | sampler | rounds (mean) | rounds (max) | model evals (mean) | "
        "rounds vs Picard | max dev (px) | mean dev (px) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['window']} | {r['tolerance']} | {r['start']} | {r['sampler']} | {r['rounds']:.1f} | "
                     f"{r['rounds_max']} | {r['model_evals']:.0f} | {r['vs_picard']:.2f} | {r['dev_max']:.3f} | "
                     f"{r['dev_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help=f"policy checkpoint (default: {FINAL_CHECKPOINT.relative_to(ROOT)} if it exists, "
                             f"else {RUN_CHECKPOINT.relative_to(ROOT)})")
    parser.add_argument("--episodes", type=int, default=3, help="episodes of the observation stream")
    parser.add_argument("--max-chunks", type=int, default=10, help="chunks per episode at most")
    parser.add_argument("--seed-start", type=int, default=100000, help="env seed of the first episode")
    parser.add_argument("--ddim-steps", type=int, default=16, help="steps of the sequential DDIM recording sampler")
    parser.add_argument("--windows", nargs="+", type=int, default=[16, 32, 100])
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.05, 0.1])
    parser.add_argument("--memory", type=int, default=3, help="ParaTAA memory")
    parser.add_argument("--ridge", type=float, default=1e-3, help="ParaTAA ridge")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "bench_rounds.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    checkpoint = Path(args.checkpoint) if args.checkpoint else (
        FINAL_CHECKPOINT if FINAL_CHECKPOINT.exists() else RUN_CHECKPOINT)
    data = checkpoint.read_bytes()  # hash exactly the bytes loaded (a training run may rewrite the file)
    sha = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / checkpoint.name
        snapshot.write_bytes(data)
        policy = load_policy(snapshot)
    chunks = record_stream(policy, args.episodes, args.max_chunks, args.seed_start, args.ddim_steps, args.noise_seed)
    records, S = replay(policy, chunks, args.windows, args.tolerances, args.memory, args.ridge, args.noise_seed)
    rows = summarize(records)
    try:
        shown = checkpoint.resolve().relative_to(ROOT)
    except ValueError:
        shown = checkpoint
    meta = {
        "command": "python eval/bench_rounds.py " + " ".join(argv), "checkpoint": shown, "sha256": sha,
        "train_steps": policy.config.get("training", {}).get("steps", "?"), "episodes": args.episodes,
        "seeds": f"{args.seed_start}-{args.seed_start + args.episodes - 1}", "ddim_steps": args.ddim_steps,
        "n_chunks": len(chunks), "n_warm": sum(c["chunk"] > 0 for c in chunks),
        "schedule": type(policy.noise_scheduler).__name__.replace("Scheduler", "").upper(), "S": S,
        "memory": args.memory, "ridge": args.ridge,
    }
    md = to_markdown(rows, meta)
    atomic_write(args.out, lambda p: Path(p).write_text(md))
    print(md)


if __name__ == "__main__":
    main()
