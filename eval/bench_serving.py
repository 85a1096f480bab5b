"""The policy server on loopback: overhead per chunk against in-process sampling, and load from 10 Hz robots.

Starts real ``para-policy serve`` processes (one per policy) on 127.0.0.1 and measures
(``para_policy.bench.serving``):

1. overhead, PushT low-dim (the shipped policy) and a two-camera 96x96 image policy (DiffusionPolicy's
   real-robot network, random weights, saved to a temporary checkpoint): the same cold chunk, the
   same keyed noise, in process and through the server, alternating; round trip minus in-process
   latency at p50 (the issue's targets: 2 ms low-dim, 5 ms images) and p95, and the round trip
   minus the server's own sampling time per call. Images travel as uint8, as a camera gives them.
2. load, PushT low-dim: 1, 2, 4, 8, 12, ... RemoteControllers (``--levels``) in rtc mode at 10 Hz
   for ``--seconds`` each, until a level stalls, holds or fails a chunk: stalls, held steps,
   failed chunks, chunk round trips p50/p95.

Both sides sample with the same spec (default ``sequential`` on DDIM-10, the fastest sampler on
the shipped policy's DDIM schedules) and ``--threads`` intra-op threads. Writes
``bench_serving.{md,json}`` atomically.

    python eval/bench_serving.py
    python eval/bench_serving.py --quick --out /tmp/bench_serving
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import para_policy  # noqa: E402
from para_policy import ImagePolicy, load_policy, sampler_spec, save_checkpoint  # noqa: E402
from para_policy.bench import command_line, machine_info, markdown_table, write_report  # noqa: E402
from para_policy.bench.image import real_robot_config  # noqa: E402
from para_policy.bench.serving import (  # noqa: E402
    history,
    idle_round_trips,
    load_level,
    overhead_rows,
    overhead_summary,
    walk_observations,
)
from para_policy.serving.client import PolicyClient, RemoteController  # noqa: E402
from para_policy.serving.launch import ServerProcess, serve_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSET = Path(para_policy.__file__).parent / "assets" / "pusht_lowdim.safetensors"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sampler", default="sequential")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=10, help="num_inference_steps")
    p.add_argument("--backend", default="default", help="inference.backend on both sides")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on both sides")
    p.add_argument("--calls", type=int, default=200, help="overhead: chunks per policy")
    p.add_argument("--seconds", type=float, default=20.0, help="load: seconds per level")
    p.add_argument("--hz", type=float, default=10.0, help="load: control rate of each robot")
    p.add_argument("--levels", default="1,2,4,8,12,16,20,24,28,32",
                   help="load: client counts, run in order until one stalls, holds or fails a chunk")
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 calls, 3 s levels of 1 and 2 clients")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_serving"))
    args = p.parse_args()
    if args.quick:
        args.calls, args.seconds, args.levels = 20, 3.0, "1,2"
    return args


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"sampler={args.sampler}", f"sampler.scheduler={args.scheduler}",
            f"sampler.num_inference_steps={args.steps}", f"inference.backend={args.backend}"]


def measure_overhead(args: argparse.Namespace, checkpoint: Path, image: bool) -> dict:
    spec = sampler_spec(args.sampler, scheduler=args.scheduler, num_inference_steps=args.steps)
    policy = load_policy(checkpoint, sampler=spec, backend=args.backend)
    shapes = policy.observation_shapes()
    cams = [k for k in shapes if len(shapes[k]) == 3] if image else []
    steps = walk_observations(shapes, args.calls + policy.n_obs_steps, image_keys=cams)
    if cams:  # what a uint8 camera frame gives, scaled as the server scales it, on both sides
        steps = [{k: (torch.from_numpy(v).mul(255).round().div(255).numpy() if k in cams else v)
                  for k, v in s.items()} for s in steps]
    hists = [history(steps[i: i + policy.n_obs_steps]) for i in range(args.calls)]
    with ServerProcess(serve_command(checkpoint, overrides(args), ["--threads", str(args.threads)])) as server:
        client = PolicyClient(server.address, token=server.token, timeout_s=60)
        rows = overhead_rows(policy, spec, client, hists, uint8_keys=cams)
        idle = idle_round_trips(client)
        client.close()
    return {"policy": "two 96x96 cameras" if image else "PushT low-dim", **overhead_summary(rows),
            "health_round_trip_ms": idle}


def measure_load(args: argparse.Namespace) -> list[dict]:
    levels, counts = [], [int(n) for n in args.levels.split(",")]
    options = ["--threads", str(args.threads), "--max-sessions", str(max(16, *counts))]
    with ServerProcess(serve_command(ASSET, overrides(args), options)) as server:
        shapes = PolicyClient(server.address, token=server.token).metadata()["observations"]
        shapes = {k: tuple(v["shape"]) for k, v in shapes.items()}

        with RemoteController(server.address, token=server.token) as warm:  # the server's first calls: not a level
            for step in walk_observations(shapes, 3 * warm.n_action_steps):
                warm.act(step)

        def make() -> RemoteController:
            return RemoteController(server.address, token=server.token, mode="rtc", period_s=1 / args.hz,
                                    timeout_s=2.0)

        for n in counts:
            level = load_level(make, shapes, n, args.seconds, 1 / args.hz)
            levels.append(level)
            print(f"{n} clients: {level['chunks']} chunks, stalls {level['stalls']}, held {level['held_steps']}, "
                  f"failures {level['failures']}, round trip p95 {level['round_trip_ms']['p95']:.1f} ms", flush=True)
            if level["stalls"] or level["held_steps"] or level["failures"] or level["errors"]:
                break
    return levels


def report(args: argparse.Namespace, over: list[dict], levels: list[dict], machine: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["# The policy server on loopback", "", f"`{command_line('bench_serving.py', sys.argv[1:])}`", "",
             f"Sampler `{args.sampler}` on {args.scheduler.upper()}-{args.steps}, backend `{args.backend}`, "
             f"{args.threads} intra-op thread(s) on both sides; {machine['cpu_count']} CPUs ({machine['processor']}), "
             f"torch {machine['torch']}, load average before {machine['load_avg']}.", "",
             "## Overhead per chunk (ms)", ""]
    lines += markdown_table(
        ["policy", "in process p50", "round trip p50", "overhead p50", "in process p95", "round trip p95",
         "overhead p95", "round trip - server p50"],
        [[o["policy"], f(o["local_ms"]["p50"]), f(o["round_trip_ms"]["p50"]), f(o["overhead_p50_ms"]),
          f(o["local_ms"]["p95"]), f(o["round_trip_ms"]["p95"]), f(o["overhead_p95_ms"]),
          f(o["transport_ms"]["p50"])] for o in over])
    lines += ["", "A `Health` call (no sampling, no payload) back to back and after an idle gap, p50 / p95 ms: "
              "the part of the overhead that is gRPC waking up after the control period's wait.", ""]
    idle = [[o["policy"], *(f"{v['p50']:.2f} / {v['p95']:.2f}" for v in o["health_round_trip_ms"].values())]
            for o in over]
    lines += markdown_table(["policy server", *over[0]["health_round_trip_ms"]], idle)
    lines += ["", f"## Load: robots at {args.hz:g} Hz, rtc, {args.seconds:g} s per level", ""]
    lines += markdown_table(
        ["clients", "chunks", "stalls", "held steps", "failed chunks", "late ticks", "round trip p50",
         "round trip p95", "server p95", "max delay (steps)"],
        [[x["clients"], x["chunks"], x["stalls"], x["held_steps"], x["failures"], x["late_ticks"],
          f(x["round_trip_ms"]["p50"]), f(x["round_trip_ms"]["p95"]), f(x["server_ms"]["p95"]),
          x["delay_used_max"]] for x in levels])
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        image_ckpt = Path(tmp) / "two_cameras_96.safetensors"
        config = real_robot_config([256, 512, 1024], (96, 96), (84, 84))
        save_checkpoint(image_ckpt, ImagePolicy(config).state_dict(), config)
        over = [measure_overhead(args, ASSET, image=False), measure_overhead(args, image_ckpt, image=True)]
    for o in over:
        print(f"{o['policy']}: overhead p50 {o['overhead_p50_ms']:.2f} ms", flush=True)
    started = time.time()
    levels = measure_load(args)
    data = {"args": vars(args), "machine": machine, "overhead": over, "load": levels,
            "load_seconds": time.time() - started}
    path = write_report(Path(args.out) / "bench_serving", report(args, over, levels, machine), data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
