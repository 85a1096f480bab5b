"""OpenMP wait policy: passive vs spinning workers, idle and beside a CPU hog, in one interleaved run.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch is first imported, so each setting runs in
its own worker process for the whole run:

- ``PASSIVE``: idle OpenMP threads sleep at once (what eval.py and train.py choose);
- ``default``: the variable unset (libgomp spins a while, then sleeps): what a program gets
  that sets nothing, ``import para_policy`` included;
- ``ACTIVE``: idle threads keep spinning;
- ``PASSIVE after torch``: the variable set after ``import torch`` (as ``import para_policy``
  did when a program imported torch first): OpenMP has already read it.

Every worker loads the shipped PushT policy with the sequential sampler on eager PyTorch (a
loop of model calls: DDIM with ``--steps`` steps, batch 1) and times chunks on request. The
parent runs blocks of ``--chunks`` chunks, one worker at a time (the others are stopped with
SIGSTOP, so a spinning worker cannot load the one being timed), cycling through the settings
and through idle / under load (``--hogs`` processes that spin on the CPU), in alternating order
each round. Writes ``eval/results/bench_omp.{md,json}``.

    python eval/bench_omp.py                      # 8 rounds of 5 chunks per setting and load
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from para_policy.bench import write_report
from para_policy.stats import percentile

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "eval" / "results"
SETTINGS = ("PASSIVE", "default", "ACTIVE", "PASSIVE after torch")

WORKER = r"""
import json, os, sys, time
setting, steps = sys.argv[1], int(sys.argv[2])
import torch  # OpenMP starts here, reading OMP_WAIT_POLICY
if setting == "PASSIVE after torch":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
from para_policy import load_policy

policy = load_policy("para_policy/assets/pusht_lowdim.safetensors", sampler="sequential", backend="eager",
                     scheduler="ddim", num_inference_steps=steps)
obs = {"obs": torch.zeros(1, policy.n_obs_steps, policy.obs_dim)}
gen = torch.Generator().manual_seed(0)

def chunk():
    t0 = time.perf_counter()
    policy.predict_action(obs, generator=gen)
    return (time.perf_counter() - t0) * 1e3

for _ in range(3):
    chunk()
print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
for line in sys.stdin:
    n = int(line)
    print(json.dumps([chunk() for _ in range(n)]), flush=True)
"""


def hog() -> None:
    """Spin on one CPU until terminated (a competing busy process)."""
    while True:
        pass


def environment(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if setting in ("PASSIVE", "ACTIVE"):
        env["OMP_WAIT_POLICY"] = setting
    return env


def start(setting: str, steps: int) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, setting, str(steps)], cwd=ROOT, env=environment(setting),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGSTOP)
    return proc, info


def block(proc: subprocess.Popen, chunks: int) -> list[float]:
    """``chunks`` timed chunks of one worker, the only one running."""
    proc.send_signal(signal.SIGCONT)
    try:
        proc.stdin.write(f"{chunks}\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGSTOP)


def run(rounds: int, chunks: int, hogs: int, steps: int) -> tuple[dict, dict]:
    load_before = os.getloadavg()[0]
    workers = {s: start(s, steps) for s in SETTINGS}
    times: dict[str, dict[str, list[float]]] = {s: {"idle": [], "load": []} for s in SETTINGS}
    try:
        for r in range(rounds):
            for load in (("idle", "load") if r % 2 == 0 else ("load", "idle")):
                busy = [mp.Process(target=hog, daemon=True) for _ in range(hogs if load == "load" else 0)]
                for p in busy:
                    p.start()
                try:
                    for s in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                        times[s][load] += block(workers[s][0], chunks)
                finally:
                    for p in busy:
                        p.terminate()
                        p.join()
            print(f"round {r + 1}/{rounds} done", flush=True)
    finally:
        for proc, _ in workers.values():
            proc.send_signal(signal.SIGCONT)
            proc.stdin.close()
            proc.wait(timeout=60)
    info = {**next(iter(workers.values()))[1], "loadavg_1min": [load_before, os.getloadavg()[0]]}
    return times, info


def report(times: dict, info: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        "# OpenMP wait policy: passive vs spinning, idle and under load",
        "",
        f"Shipped PushT policy, sequential DDIM-{args.steps} on eager PyTorch, batch 1, {info['threads']} threads, "
        f"torch {info['torch']}, {os.cpu_count()} CPUs ({platform.machine()}). Each setting is one worker "
        f"process for the whole run; blocks of {args.chunks} chunks, one worker running at a time, settings and "
        f"idle / under load ({args.hogs} CPU hog process{'es' if args.hogs != 1 else ''}) interleaved over "
        f"{args.rounds} rounds in alternating order. Ratio: the setting's ms over PASSIVE's in the same condition "
        "(> 1: slower than passive). Host load average (1 min): "
        f"{info['loadavg_1min'][0]:.1f} before the run (other processes only), {info['loadavg_1min'][1]:.1f} at "
        "its end (the benchmark's own included): 'no hog' is an idle machine only where the first is near 0.",
        "",
        f"Command: `{command}`",
        "",
        "| OMP_WAIT_POLICY | condition | chunks | ms/chunk p50 | p95 | p50 / PASSIVE | p95 / PASSIVE |",
        "|---|---|---|---|---|---|---|",
    ]
    for load in ("idle", "load"):
        ref = times["PASSIVE"][load]
        for s in SETTINGS:
            xs = times[s][load]
            cond = "no hog" if load == "idle" else f"{args.hogs} hog{'s' if args.hogs != 1 else ''}"
            lines.append(f"| {s} | {cond} | {len(xs)} | {statistics.median(xs):.0f} | {percentile(xs, 95):.0f} | "
                         f"{statistics.median(xs) / statistics.median(ref):.2f} | "
                         f"{percentile(xs, 95) / percentile(ref, 95):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=5, help="chunks per block")
    parser.add_argument("--hogs", type=int, default=1, help="busy processes under load")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per chunk (model calls)")
    parser.add_argument("--out", type=Path, default=OUT / "bench_omp.md")
    args = parser.parse_args()
    command = "python eval/bench_omp.py " + " ".join(sys.argv[1:])
    times, info = run(args.rounds, args.chunks, args.hogs, args.steps)
    text = report(times, info, args, command.strip())
    write_report(args.out.with_suffix(""), text,
                 {"args": {k: str(v) for k, v in vars(args).items()}, "info": info, "ms": times})
    print(text)


if __name__ == "__main__":
    main()
