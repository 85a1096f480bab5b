"""The latency benchmark on a CUDA machine: cost curves (fp32, bf16, CUDA graphs), rounds and latency per schedule.

Parallel sampling's home is a GPU, where a batch of 100 rows may cost about what one row does
and latency is roughly rounds × one call. On one CUDA device, within ``--time-budget-s``
(parts that would start after it are skipped, with a note in the report):

1. **Cost curves**: the median ms of one denoiser call on n = 1 … 100 rows
   (:data:`para_policy.window.DEFAULT_BATCHES`) in fp32, in bf16 (``precision='bf16'``) and
   with CUDA graphs (``cuda_graphs=True``), each set with
   :func:`para_policy.inference.configure_inference` on a policy object of its own, for two
   networks: the shipped PushT policy, and DiffusionPolicy's default network size (the shipped
   policy's config with ``down_dims`` (256, 512, 1024) and ``diffusion_step_embed_dim`` 256, so
   the same input and conditioning dims; random weights).
2. **Rounds and latency per schedule** (``--schedules``: ``ddpm100 ddim16 ddim10 ddim8``) for
   the shipped policy, replaying a recorded PushT control stream at batch 1 (``--stream``: the
   chunk observations ``eval/bench_latency.py --record-only`` saved, so no simulator is needed
   here): ``sequential`` and ``paradigms`` (its ``window='auto'`` measured by the policy's own
   tuner on that runtime) on each of ``--runtimes`` (fp32 and CUDA graphs), and ParaDiGMS as
   published on the first. It is ``eval/bench_latency.py``'s replay, summary and tables.
3. **DiffusionPolicy's default size, predicted**: its latency per schedule is not measured
   (rounds of random weights say nothing about a trained network); it is predicted from the
   shipped policy's rows per round in every replayed chunk and the default-size network's cost
   curve (:func:`para_policy.window.predict_latency`: the model calls only).

Writes ``<out>/bench_gpu.{md,json}`` (default ``eval/results/bench_gpu/``), atomically.

Without a CUDA device the same code runs on the CPU with reduced sizes (rows 1 and 2, two
chunks, one calibration chunk; CUDA-graph rows skipped, bf16 as CPU autocast), and the report
says it ran on the CPU. ``--quick`` asks for the reduced sizes on CUDA too.

    bash eval/bench_gpu.sh                              # on the CUDA machine: sets up, then runs this
    bash eval/bench_gpu.sh --quick --out /tmp/bench_gpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/bench_latency.py: the shared replay

import bench_latency as bl  # noqa: E402
import torch  # noqa: E402

from para_policy.checkpoints import atomic_write  # noqa: E402
from para_policy.inference import configure_inference  # noqa: E402
from para_policy.policy import LowdimPolicy, load_policy  # noqa: E402
from para_policy.window import DEFAULT_BATCHES  # noqa: E402

RESULTS = bl.ROOT / "eval" / "results" / "bench_gpu"
STREAM = RESULTS / "stream.json"
#: runtime name -> configure_inference settings
MODES: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "cuda-graphs": {"cuda_graphs": True},
    "bf16-cuda-graphs": {"precision": "bf16", "cuda_graphs": True},
}
DEFAULT_MODES = ("fp32", "bf16", "cuda-graphs")
DEFAULT_RUNTIMES = ("fp32", "cuda-graphs")
#: DiffusionPolicy's default ConditionalUnet1D (its low-dim PushT config), on the shipped policy's dims
DEFAULT_SIZE = {"down_dims": [256, 512, 1024], "diffusion_step_embed_dim": 256}


@dataclass(frozen=True)
class Sizes:
    """How much to measure: the full GPU run, or the reduced one (CPU fallback, ``--quick``)."""

    batches: tuple[int, ...]
    cost_reps: int
    cost_warmup: int
    episodes: int
    max_chunks: int
    calib_chunks: int
    tune_reps: int


FULL = Sizes(tuple(DEFAULT_BATCHES), cost_reps=15, cost_warmup=3, episodes=4, max_chunks=12, calib_chunks=6,
             tune_reps=10)
REDUCED = Sizes((1, 2), cost_reps=3, cost_warmup=1, episodes=1, max_chunks=2, calib_chunks=1, tune_reps=2)


class Budget:
    """Wall-clock budget of the whole run: a part starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, part: str, estimate_s: float = 0.0) -> bool:
        """Whether ``part`` may start; if not, it is noted as skipped."""
        if self.elapsed() + estimate_s <= self.seconds:
            return True
        self.skipped.append(f"{part}: skipped, time budget of {self.seconds:.0f} s (used {self.elapsed():.0f} s, "
                            f"estimated {estimate_s:.0f} s more)")
        print(f"note: {self.skipped[-1]}", flush=True)
        return False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: --device cuda, but torch sees no CUDA device")
    return torch.device(name)


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: the evaluator's machine_info where its extras exist, plus the GPU."""
    try:
        from para_policy.evaluation.latency import machine_info

        info = machine_info()
    except ImportError:  # a bare GPU machine has no eval extras
        info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "load_avg": [round(x, 2) for x in os.getloadavg()]}
    info["python"] = platform.python_version()
    info["device"] = str(device)
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def default_size_policy(shipped: LowdimPolicy, seed: int = 0) -> LowdimPolicy:
    """The shipped policy's config at DiffusionPolicy's default network size, random weights, its normalizer."""
    config = copy.deepcopy(shipped.config)
    config["model"] = {**config["model"], **DEFAULT_SIZE}
    torch.manual_seed(seed)
    policy = LowdimPolicy(config)
    policy.normalizer.load_state_dict(shipped.normalizer.state_dict())
    return policy.to(shipped.device).eval()


def n_params(policy: LowdimPolicy) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def unavailable(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` cannot run on ``device`` (None if it can)."""
    if MODES[mode].get("cuda_graphs") and device.type != "cuda":
        return "skipped: no CUDA"
    return None


def with_mode(policy: LowdimPolicy, mode: str) -> LowdimPolicy:
    """A copy of ``policy`` whose denoiser runs in ``mode`` (its own object: graphs and caches stay apart)."""
    return configure_inference(copy.deepcopy(policy), **MODES[mode])


def measure_cost(networks: Mapping[str, LowdimPolicy], modes: Sequence[str], obs: Any, sizes: Sizes,
                 budget: Budget) -> dict[str, dict[str, Any]]:
    """network -> mode -> cost curve ``{rows: ms}``, or a note saying why it is missing."""
    out: dict[str, dict[str, Any]] = {}
    for net, policy in networks.items():
        out[net] = {}
        for mode in modes:
            why = unavailable(mode, policy.device)
            if why is None and not budget.allows(f"cost curve {net} {mode}"):
                why = "skipped: time budget"
            if why is not None:
                out[net][mode] = why
                continue
            print(f"cost curve: {net} {mode} ...", flush=True)
            try:
                out[net][mode] = bl.cost_curves({mode: with_mode(policy, mode)}, obs, sizes.batches,
                                                reps=sizes.cost_reps, warmup=sizes.cost_warmup)[mode]
            except Exception as e:  # one failing runtime must not cost the rest of a GPU lease
                out[net][mode] = failure(f"cost curve {net} {mode}", e, budget)
    return out


def failure(part: str, e: BaseException, budget: Budget) -> str:
    """The note of a part that raised (printed, and listed in the report)."""
    note = f"failed: {type(e).__name__}: {e}"
    budget.skipped.append(f"{part}: {note}")
    print(f"error: {part}: {note}", flush=True)
    return note


def replay_runtimes(shipped: LowdimPolicy, names: Sequence[str], obs: Any, sizes: Sizes, budget: Budget
                    ) -> dict[str, LowdimPolicy]:
    """A policy object per runtime of the replay, each called once on every row count first.

    The calls capture a CUDA-graph runtime's graphs before anything is timed, and a runtime
    that fails here is left out with a note instead of failing every schedule.
    """
    runtimes: dict[str, LowdimPolicy] = {}
    for r in names:
        why = unavailable(r, shipped.device)
        if why:
            budget.skipped.append(f"runtime {r} of the per-schedule replay: {why}")
            continue
        try:
            policy = with_mode(shipped, r)
            bl.cost_curves({r: policy}, obs, sizes.batches, reps=1, warmup=0)
            runtimes[r] = policy
        except Exception as e:
            failure(f"runtime {r} of the per-schedule replay", e, budget)
    return runtimes


def run_schedule(runtimes: Mapping[str, LowdimPolicy], schedule: str, chunks: list[dict[str, Any]],
                 calib_obs: list[Any], sizes: Sizes, cost: Mapping[str, Mapping[str, Any]], noise_seed: int
                 ) -> list[dict[str, Any]]:
    """bench_latency's rows of one schedule on every runtime, each with its latency predicted per network.

    ``predicted_ms``: network -> Σ_rounds cost(rows) on that network's curve of the row's runtime,
    from the rows per round the shipped policy needed in each chunk (mean over chunks).
    """
    reference = next(iter(runtimes))
    windows = {r: bl.resolve_paradigms(p, schedule, calib_obs, recalibrate=True, reps=sizes.tune_reps)
               for r, p in runtimes.items()}
    variants = bl.schedule_variants(schedule, windows, reference=reference)
    bl.replay(runtimes, variants, chunks, noise_seed, progress=False)
    rows = bl.summarize(variants, runtimes[reference].n_action_steps)
    for row, v in zip(rows, variants, strict=True):
        row["predicted_ms"] = {net: bl.predicted_ms(v.records, curves[v.runtime]) for net, curves in cost.items()
                               if isinstance(curves.get(v.runtime), Mapping)}
    return rows


def predicted_speedups(rows: Sequence[dict[str, Any]], net: str) -> dict[str, float]:
    """key -> the fastest sequential row's predicted ms over this row's, on network ``net``."""
    seq = [r["predicted_ms"][net] for r in rows if r["name"] == "sequential" and net in r["predicted_ms"]]
    if not seq:
        return {}
    return {r["key"]: min(seq) / r["predicted_ms"][net] for r in rows if net in r["predicted_ms"]}


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def predicted_table(schedules: Mapping[str, Any], net: str) -> list[str]:
    """Rounds and predicted latency of every row on network ``net``, one line per (schedule, sampler, runtime)."""
    lines = ["| schedule | sampler | runtime | window (shipped policy's) | rounds/chunk | predicted ms/chunk | "
             "predicted speed-up |", "|---|---|---|---|---|---|---|"]
    for s, part in schedules.items():
        if "skipped" in part:
            lines.append(f"| {bl.schedule_label(s)} | {part['skipped']} | | | | | |")
            continue
        speed = predicted_speedups(part["rows"], net)
        for r in part["rows"]:
            ms, up = r["predicted_ms"].get(net), speed.get(r["key"])
            lines.append(f"| {bl.schedule_label(s)} | {bl.row_label(r)} | {r['runtime']} | {r['window'] or ''} | "
                         f"{r['rounds_mean']:.1f} | {_num(ms, '{:.1f}')} | {_num(up, '{:.2f}×')} |")
    return lines


READING = [
    "How to read it:", "",
    "- **runtime**: how the denoiser runs (`configure_inference`): `fp32` eager PyTorch, `bf16` under bf16 autocast, "
    "`cuda-graphs` replayed from CUDA graphs captured per power-of-two row count. Each runtime runs on a policy "
    "object of its own; every row of a schedule sees the same observations and noise.",
    "- **ms/chunk p50, p95**: wall-clock of one batch-1 `predict_action` with the actions copied to the host, over "
    "the replayed chunks, the rows interleaved. **rounds/chunk**: sequential denoiser calls (a sequential row needs "
    "one per step). **deviation**: per chunk the largest distance of an executed action from sequential on the first "
    "runtime, same schedule and noise (px of PushT's 512-px arena), mean and max over chunks. **speed-up**: the "
    "fastest sequential row of the schedule over this row, at the median.",
    "- **predicted ms (model calls)**: Σ over each chunk's rounds of the cost curve at that round's rows, on the row's "
    "runtime: what the model calls alone take. Measured minus predicted is the sampler's own time per chunk.",
    "- **DiffusionPolicy's default size**: not run; predicted from the shipped policy's rows per round (its windows, "
    "chosen on its own cost curve) and the default-size network's cost curve. Its own tuner might choose another "
    "window.",
]


def to_markdown(data: dict[str, Any]) -> str:
    meta, nets = data["meta"], data["networks"]
    info = meta["machine"]
    if meta["device"].startswith("cuda"):
        where = (f"Ran on CUDA: {info.get('gpu')}, CUDA {info.get('cuda')}, torch {info.get('torch')}, Python "
                 f"{info.get('python')} (TF32 matmul {info.get('tf32_matmul')}, TF32 cuDNN {info.get('tf32_cudnn')}).")
    else:
        where = ("**Ran on the CPU (no CUDA device): the CPU fallback, with reduced sizes; CUDA-graph rows are "
                 "skipped and bf16 is CPU autocast. These numbers say nothing about a GPU.**")
    lines = ["# GPU benchmark: cost curves, rounds and latency per schedule (batch 1)", "", where, "",
             f"Command: `{meta['command']}`", "", bl.machine_line(info), "",
             f"Sizes: {'reduced' if meta['reduced'] else 'full'} (rows "
             f"{', '.join(map(str, meta['sizes']['batches']))}; "
             f"{meta['n_chunks']} replayed chunks, {meta['n_calibration_chunks']} calibration chunks). Time: "
             f"{meta['elapsed_s']:.0f} s of a {meta['time_budget_s']:.0f} s budget.", ""]
    lines += [f"- {note}" for note in meta["skipped"]]
    lines += ["", "## Cost curves", "", "Median ms of one denoiser call on n rows:", ""]
    curves = {f"{nets[net]['label']}, {mode}": curve for net, modes in data["cost"].items()
              for mode, curve in modes.items()}
    lines += [*bl.cost_table(curves), "", "## Rounds and latency per schedule: the shipped PushT policy (measured)", ""]
    extra = [("predicted ms (model calls)", lambda r: _num(r["predicted_ms"].get("shipped"), "{:.1f}"))]
    for s, part in data["schedules"].items():
        lines += [f"### {bl.schedule_label(s)}", ""]
        if "skipped" in part:
            lines += [part["skipped"], ""]
            continue
        lines += [*bl.table(part["rows"], runtime_label="runtime", extra=extra), ""]
        lines += [f"- {bl.tuning_line(r)}" for r in part["rows"] if r["name"] == "paradigms"]
        lines.append("")
    lines += [f"## DiffusionPolicy's default size ({nets['default']['label']}): predicted, not measured", "",
              "Predicted from the shipped policy's measured rows per round and this network's cost curve "
              "(`para_policy.window.predict_latency`), per runtime:", "",
              *predicted_table(data["schedules"], "default"), "", *READING]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS), help="folder of bench_gpu.md / .json (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(bl.CHECKPOINT))
    parser.add_argument("--stream", default=str(STREAM),
                        help="recorded chunk observations, a stream.json of eval/bench_latency.py "
                             "(default: %(default)s)")
    parser.add_argument("--schedules", nargs="+", default=list(bl.DEFAULT_SCHEDULES),
                        help="schedules, ddpm<N> or ddim<N> (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=list(MODES),
                        help="runtimes of the cost curves (default: %(default)s)")
    parser.add_argument("--runtimes", nargs="+", default=list(DEFAULT_RUNTIMES), choices=list(MODES),
                        help="runtimes of the per-schedule replay, the first is the reference (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: CUDA if torch sees a device, else the CPU fallback")
    parser.add_argument("--quick", action="store_true", help="the reduced sizes of the CPU fallback, on CUDA too")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="wall-clock budget; parts that would start after it are skipped (default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=None, help="stream episodes to replay (default: 4; 1 reduced)")
    parser.add_argument("--max-chunks", type=int, default=None, help="chunks per episode (default: 12; 2 reduced)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--noise-seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        for s in args.schedules:
            bl.parse_schedule(s)
    except ValueError as e:
        parser.error(str(e))
    return args


def network_info(net: str, policy: LowdimPolicy) -> dict[str, Any]:
    shipped = net == "shipped"
    label = (f"{'shipped PushT policy' if shipped else 'DiffusionPolicy default'} ({n_params(policy) / 1e6:.1f}M, "
             f"down_dims {list(policy.config['model']['down_dims'])}{'' if shipped else ', random weights'})")
    return {"label": label, "params": n_params(policy), "model": policy.config["model"]}


def write_report(out: Path, data: dict[str, Any], budget: Budget) -> str:
    """bench_gpu.json and bench_gpu.md into ``out`` (atomically, with the time used so far); returns the md."""
    data["meta"].update(elapsed_s=budget.elapsed(), skipped=list(budget.skipped))
    md = to_markdown(data)
    text = json.dumps(data, indent=1, default=str)
    atomic_write(out / "bench_gpu.json", lambda p: Path(p).write_text(text))
    atomic_write(out / "bench_gpu.md", lambda p: Path(p).write_text(md))
    return md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    budget = Budget(args.time_budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    reduced = args.quick or device.type != "cuda"
    sizes = REDUCED if reduced else FULL
    out = Path(args.out)
    print(f"bench_gpu on {device}" + (" (reduced sizes)" if reduced else ""), flush=True)

    shipped = load_policy(args.checkpoint, device=str(device))
    networks = {"shipped": shipped, "default": default_size_policy(shipped)}
    stream, smeta = bl.load_stream(args.stream)
    chunks, calib = bl.split_stream(stream, smeta["calibration_seed"], args.episodes or sizes.episodes,
                                    args.max_chunks or sizes.max_chunks, sizes.calib_chunks)
    data: dict[str, Any] = {
        "meta": {"command": "bash eval/bench_gpu.sh " + " ".join(argv), "device": str(device),
                 "machine": machine(device), "reduced": reduced, "sizes": sizes.__dict__, "n_chunks": len(chunks),
                 "n_calibration_chunks": len(calib), "stream": {"path": str(args.stream), **smeta},
                 "time_budget_s": budget.seconds},
        "networks": {net: network_info(net, p) for net, p in networks.items()}, "cost": {}, "schedules": {}}
    data["cost"] = cost = measure_cost(networks, args.modes, chunks[0]["obs"], sizes, budget)
    write_report(out, data, budget)

    runtimes = replay_runtimes(shipped, args.runtimes, chunks[0]["obs"], sizes, budget)
    per_step_s = 0.0  # seconds per denoising step of the last schedule: the next one's estimate
    for s in args.schedules:
        steps = bl.parse_schedule(s)[1]
        if not runtimes:
            data["schedules"][s] = {"skipped": "skipped: no runtime"}
        elif not budget.allows(f"schedule {s}", per_step_s * steps):
            data["schedules"][s] = {"skipped": "skipped: time budget"}
        else:
            print(f"{bl.schedule_label(s)}: tuning and replaying ...", flush=True)
            t0 = time.perf_counter()
            try:
                data["schedules"][s] = {"rows": run_schedule(runtimes, s, chunks, [c["obs"] for c in calib], sizes,
                                                             cost, args.noise_seed)}
            except Exception as e:  # the other schedules still run
                data["schedules"][s] = {"skipped": failure(f"schedule {s}", e, budget)}
            per_step_s = (time.perf_counter() - t0) / steps
        write_report(out, data, budget)  # after every part: a lease cut short still leaves its results
    print(write_report(out, data, budget))
    return data


if __name__ == "__main__":
    main()
