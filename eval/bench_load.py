"""Latency on a busy machine: the default Controller with spinning vs passive OpenMP waiting.

Each measurement runs in a fresh process so OpenMP reads its wait policy at torch's import:
``spinning`` imports torch before para_policy (torch's default wait policy, what the library ran
with before it set one), ``passive`` imports para_policy first (it sets ``OMP_WAIT_POLICY=PASSIVE``),
``brief spin`` keeps the default policy with ``GOMP_SPINCOUNT=10000`` (spin briefly, then sleep).
Each is timed idle and with ``--busy`` competing processes that spin on the CPU, on the same
PushT start states (cold chunks: ``controller.reset()`` before each). Writes ``bench_load.{md,json}``.

    python eval/bench_load.py                    # 2 busy processes, 12 chunks per setting
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import os
mode, chunks = sys.argv[1], int(sys.argv[2])
if mode == "brief spin":
    os.environ["GOMP_SPINCOUNT"] = "10000"  # libgomp: spin 10k iterations, then sleep
if mode in ("spinning", "brief spin"):
    import torch  # OpenMP starts with torch's default wait policy
import numpy as np
import para_policy
from para_policy import Controller, load_policy
from para_policy.tasks.pusht.env import make_env
import torch

policy = load_policy(para_policy.__file__.rsplit("/", 1)[0] + "/assets/pusht_lowdim.safetensors")
env = make_env()
obs = [np.stack([env.reset(seed=100000 + i)[0]] * 2).astype(np.float32) for i in range(chunks)]
env.close()
ctl = Controller(policy, seed=0)
ctl.predict_chunk(obs[0])  # resolves the window (cached) and warms up
seq = Controller(policy, sampler="sequential", scheduler="ddim", num_inference_steps=10, seed=0)
seq.predict_chunk(obs[0])
out = {"default": [], "sequential DDIM-10": []}
for o in obs:
    for name, c in (("default", ctl), ("sequential DDIM-10", seq)):
        c.reset()
        t0 = time.perf_counter()
        c.predict_chunk(o)
        out[name].append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"ms": out, "window": ctl.spec.options["window"], "threads": torch.get_num_threads()}))
"""


def spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def measure(mode: str, chunks: int, busy: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    procs = [mp.Process(target=spin, args=(time.time() + 600,), daemon=True) for _ in range(busy)]
    for p in procs:
        p.start()
    try:
        res = subprocess.run([sys.executable, "-c", CHILD, mode, str(chunks)], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=1200)
    finally:
        for p in procs:
            p.terminate()
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--busy", type=int, default=2, help="competing busy processes")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "bench_load")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from para_policy.bench import percentile, write_json, write_text

    results = {}
    for busy in (0, args.busy):
        for mode in ("spinning", "passive", "brief spin"):
            r = measure(mode, args.chunks, busy)
            results[f"{mode}, {busy} busy"] = r
            print(mode, busy, {k: round(percentile(v, 50)) for k, v in r["ms"].items()}, flush=True)
    lines = ["# Latency on a busy machine: spinning vs passive OpenMP waiting", "",
             f"Shipped PushT policy, `Controller(policy)` (the paradigms preset) and sequential DDIM-10, cold chunks "
             f"on {args.chunks} PushT start states, {os.cpu_count()} CPUs, each setting in a fresh process. "
             f"`python eval/bench_load.py --chunks {args.chunks} --busy {args.busy}`", "",
             "| wait policy | competing busy processes | sampler | ms/chunk p50 | p95 |", "|---|---|---|---|---|"]
    for key, r in results.items():
        mode, busy = key.split(", ")
        for name, ms in r["ms"].items():
            p50, p95 = percentile(ms, 50), percentile(ms, 95)
            lines.append(f"| {mode} | {busy.split()[0]} | {name} | {p50:.0f} | {p95:.0f} |")
    write_json(args.out / "bench_load.json", results, indent=2)
    write_text(args.out / "bench_load.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
