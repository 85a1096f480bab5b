"""Picard vs ParaTAA on real PushT observations: rounds and model evaluations per chunk.

Rounds (sequential model calls) and model evaluations (denoiser rows) do not depend on
the machine, so this benchmark counts them and never times anything.

1. **Observation stream.** The policy is rolled out in PushT with the sequential DDIM sampler
   (16 steps by default), a few episodes (env seeds 100000+) of up to ``--max-chunks`` chunks
   each (:func:`para_policy.bench.record_stream`).
2. **Replay.** Every chunk is sampled again at batch 1 on the checkpoint's own schedule
   (DDPM-100 for DiffusionPolicy) with the sequential loop (the reference), Picard
   (``paradigms_published`` with each sample's own window) and ParaTAA (``parataa``), for every
   window × tolerance, cold and warm started, all on the same ``x_T`` and step noise
   (:func:`para_policy.bench.replay`). The warm start is what a controller would use: the
   setting's own previous chunk's normalized trajectory shifted by ``n_action_steps`` with its
   end padded by the last point, turned into an initial iterate by ``warm_start_init``.
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
from pathlib import Path
from typing import Any

import torch

from para_policy import load_policy
from para_policy.bench import ChunkKeys, Variant, deviations, record_stream, replay, write_text
from para_policy.samplers import sampler_spec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "eval" / "results"
FINAL_CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
RUN_CHECKPOINT = ROOT / "runs" / "pusht_ship" / "checkpoints" / "latest.safetensors"
PRESETS = {"picard": "paradigms_published", "taa": "parataa"}  # sampler -> its preset (options below)
REPLAY_STREAM = 7  # noise-key stream of the replays (distinct from the recording's)


def variants(S: int, windows: list[int], tolerances: list[float], memory: int, ridge: float) -> list[Variant]:
    """The sequential reference, then Picard and ParaTAA per window × tolerance × cold/warm (the functions' defaults).

    Picard is ``picard_sample``'s defaults (each sample its own window, no linear solve);
    ParaTAA ``taa_sample``'s with ``memory`` and ``ridge``. Names: ``picard w16 tol0.1 warm``.
    """
    rows = [Variant("sequential", sampler_spec("sequential"))]
    for name, preset in PRESETS.items():
        extra = {"memory": memory, "ridge": ridge} if name == "taa" else {"per_sample_windows": True}
        for w in sorted({min(w, S) for w in windows}):
            for tol in tolerances:
                for start in ("cold", "warm"):
                    spec = sampler_spec(preset, window=w, tolerance=tol, warm_start=start == "warm", **extra)
                    rows.append(Variant(f"{name} w{w} tol{tol} {start}", spec))
    return rows


def summarize(rows: list[Variant], records: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean rounds / evals and action deviations per setting, over chunks with a predecessor."""
    ref = records["sequential"]
    out = []
    for v in rows[1:]:
        recs = records[v.name]
        bad = [f"{r['episode']}/{r['chunk']}" for r in recs if not r["converged"]]
        if bad:
            raise RuntimeError(f"{v.name} did not converge on chunks {bad}")
        keep = [i for i, r in enumerate(recs) if r["chunk"] > 0]
        dev = deviations([recs[i] for i in keep], [ref[i] for i in keep], how="max_abs")
        rs = [recs[i] for i in keep]
        name, _, _, start = v.name.split()
        out.append({"sampler": name, "window": v.spec.options["window"], "tolerance": v.spec.options["tolerance"],
                    "start": start, "chunks": len(rs), "rounds": statistics.mean(r["rounds"] for r in rs),
                    "rounds_max": max(r["rounds"] for r in rs),
                    "model_evals": statistics.mean(r["model_evals"] for r in rs), "dev_max": max(dev),
                    "dev_mean": statistics.mean(dev)})
    picard = {(r["window"], r["tolerance"], r["start"]): r["rounds"] for r in out if r["sampler"] == "picard"}
    for r in out:
        base = picard.get((r["window"], r["tolerance"], r["start"]))
        r["vs_picard"] = r["rounds"] / base if base else float("nan")
    out.sort(key=lambda r: (r["window"], r["tolerance"], r["start"], r["sampler"]))
    return out


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


def parse_args(argv: list[str]) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint) if args.checkpoint else (
        FINAL_CHECKPOINT if FINAL_CHECKPOINT.exists() else RUN_CHECKPOINT)
    data = checkpoint.read_bytes()  # hash exactly the bytes loaded (a training run may rewrite the file)
    sha = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / checkpoint.name
        snapshot.write_bytes(data)
        policy = load_policy(snapshot)
    recorder = sampler_spec("sequential", scheduler="ddim", num_inference_steps=args.ddim_steps)
    chunks = record_stream(policy, args.episodes, args.max_chunks, args.seed_start, spec=recorder,
                           keys=ChunkKeys(stream=None, noise_seed=args.noise_seed))
    S = policy.schedule_for(sampler_spec("sequential")).num_steps  # the checkpoint's own schedule
    rows = variants(S, args.windows, args.tolerances, args.memory, args.ridge)
    records = replay(policy, rows, chunks, ChunkKeys(REPLAY_STREAM, args.noise_seed), warmup=0, progress=True)
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
    md = to_markdown(summarize(rows, records), meta)
    write_text(args.out, md)
    print(md)


if __name__ == "__main__":
    main()
