"""How low can rounds per chunk go? The warm start's distance, the error after each round, and a Newton floor.

Rounds (sequential model calls per chunk) carry over to any hardware, so the question
"how few rounds can a parallel sampler take on this policy" is asked here without a clock:

1. **Observation stream**: PushT rollouts of the policy with sequential DDIM-10
   (:func:`para_policy.bench.record_stream`, ``eval/bench_rounds.py``'s noise keys), a few
   episodes of a few chunks.
2. **How good a guess is the previous chunk?** The executed actions of the previous chunk's
   sequential sample shifted by ``n_action_steps`` (what the warm start starts from) against
   this chunk's sequential sample, and, as the scale of the policy's own spread, two
   sequential samples of the same observation on different noise (pixels; max over the
   executed actions, mean over chunks).
3. **The default** (``paradigms``: Picard, linear solve, secant slope, warm start, tolerance of
   the preset) at a full window (``window = S``, the fewest rounds): rounds, and the deviation
   of the executed actions from sequential on the same noise after 1, 2, 3, ... rounds
   (``max_iterations``; an unfinished warm-started sample returns the end of its iterate).
4. **A Newton floor**: the same iteration with each step's map linearized by its *exact*
   Jacobian at the sequential trajectory (``torch.func.jacrev`` through the denoiser, one
   (T·D)×(T·D) matrix per step). No sampler can know that Jacobian before sampling (it costs
   T·D backward passes per step, and it is taken at the answer), so its rounds are a floor
   for the Picard family under the same convergence test and warm start, not a method.
5. **Leads that a sampler could use** (issue 13's), each on the same noise and warm start:
   richer Jacobians that *are* known before sampling, in the Newton iteration of 4: the mean
   of each step's exact Jacobian over calibration chunks of other episodes (a fixed matrix per
   step, found once, as a window is: ``mean_step_jacobians``), and the previous chunk's exact
   Jacobians (a Broyden or Anderson estimate of x0 over the window can at best approach these);
   the default sampler with that mean Jacobian in its solve (``picard_sample(jacobian=...)``,
   its secant on what the Jacobian leaves over), and with the mean Jacobian's diagonal only (a
   per-entry slope); and the default sampler warm-started from the previous chunk's clean-sample
   prediction at *every* step, shifted, instead of its final sample. Also: where the mean
   Jacobian's weight sits (diagonal, within an action channel, within a time step).

    python eval/bench_rounds_floor.py
    python eval/bench_rounds_floor.py --episodes 1 --max-chunks 3 --schedules ddim10 --out /tmp/floor.md

Writes ``eval/results/bench_rounds_floor.md`` (atomically).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from para_policy import load_policy
from para_policy.bench import (
    ChunkKeys,
    executed_actions,
    keyed_noise,
    mean_max,
    parse_schedule,
    record_stream,
    schedule_spec,
    write_text,
)
from para_policy.policy import LowdimPolicy
from para_policy.samplers import (
    PRESETS,
    mean_step_jacobians,
    picard_sample,
    sequential_sample,
    shift_trajectory,
    step_jacobians,
    warm_start_init,
)
from para_policy.samplers.solves import linear_recurrence
from para_policy.schedule import Schedule

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
OUT = ROOT / "eval" / "results" / "bench_rounds_floor.md"
REPLAY_STREAM = 13  # noise-key stream of the replays
SPREAD_STREAM = 17  # a second noise draw of the same observation
CALIBRATION_STREAM = 19  # noise of the calibration chunks (mean Jacobians)


@torch.inference_mode()
def sequential_states(policy: LowdimPolicy, sched: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
                      cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The library's sequential loop, keeping every step's input and clean-sample prediction.

    :func:`sequential_sample` with a denoiser that records what it is called with (step ``k``'s
    input ``x_k``) and returns; the predictions follow from those calls without another one.
    Returns ``(sample (1,T,D), inputs (S,T,D), x0 predictions (S,T,D))``.
    """
    inputs, outputs = [], []

    def recording(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        out = policy.denoise(x, t, c)
        inputs.append(x[0])
        outputs.append(out[0])
        return out

    sample, _ = sequential_sample(recording, sched, x_T, noise, condition=cond)
    x = torch.stack(inputs)
    return sample, x, sched.predict_x0(x, torch.arange(sched.num_steps), torch.stack(outputs))


@torch.inference_mode()
def per_step_init(sched: Schedule, x0_steps: torch.Tensor, x_T: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """:func:`warm_start_init` with a clean-sample guess per step: ``x0_steps`` (S, T, D) → init (1, S, T, D).

    Step ``k`` of the initial iterate takes its model output as implied by ``x0_steps[k]``. With
    the guess fixed every step is affine, ``x_{k+1} = a_k x_k + d_k + σ_k z_k``: the library's
    warm start from each step's guess alone (``x_T = 0``, no noise) holds that step's drive
    ``d_k = x_{k+1} − a_k x_k``, and the recurrence of those drives is the per-step iterate.
    """
    S = sched.num_steps
    alone = warm_start_init(sched, x0_steps, torch.zeros_like(x0_steps))  # (S, S, T, D): row j from guess j
    before = torch.cat([torch.zeros_like(alone[:, :1]), alone[:, :-1]], dim=1)  # x_k of each row (x_0 = 0)
    a = sched.linear_coeff().to(x_T.dtype)
    k = torch.arange(S)
    drive = alone[k, k] - a.view(S, 1, 1) * before[k, k]
    drive = drive[None] + sched.noise_std.view(1, S, 1, 1).to(drive.dtype) * noise
    return linear_recurrence(a[None], x_T, drive)


def newton_sample(policy: LowdimPolicy, sched: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
                  cond: torch.Tensor | None, jac: torch.Tensor, init: torch.Tensor | None, tolerance: float
                  ) -> tuple[torch.Tensor, int]:
    """The Newton iteration: :func:`picard_sample` at a full window, step ``k`` linearized by ``jac[k]``.

    ``x_{k+1} = (a_k + J_k) x_k + h_k`` solved over the window (``linear_solve``, ``jacobian``),
    without the secant. Returns ``(sample (1,T,D), rounds)``.
    """
    out, stats = picard_sample(policy.denoise, sched, x_T, noise, window=sched.num_steps, tolerance=tolerance,
                               condition=cond, init=init, linear_solve=True, jacobian=jac)
    return out, stats.rounds


def weight_shares(jac: torch.Tensor, action_dim: int) -> dict[str, float]:
    """Where a Jacobian's weight sits: share of its squared Frobenius norm by structure.

    ``jac`` (S, T·D, T·D) over the flattened trajectory (entry ``t·D + d``): ``diagonal``
    (each entry on itself, what a per-entry secant could capture), ``channel`` (entries of the
    same dimension ``d`` at any time), ``time step`` (entries of the same ``t``).
    """
    N = jac.shape[-1]
    t, d = torch.arange(N) // action_dim, torch.arange(N) % action_dim
    total = float(jac.pow(2).sum())
    masks = {"diagonal": torch.eye(N, dtype=torch.bool), "channel": d[:, None] == d[None],
             "time step": t[:, None] == t[None]}
    return {name: float(jac.pow(2)[:, mask].sum()) / total for name, mask in masks.items()}


def calibrated_jacobians(policy: LowdimPolicy, sched: Schedule, chunks: list[dict[str, Any]], noise_seed: int
                         ) -> torch.Tensor | None:
    """``(S, TD, TD)``: :func:`mean_step_jacobians` over the sequential samples of ``chunks`` (None: no chunks)."""
    if not chunks:
        return None
    keys = ChunkKeys(CALIBRATION_STREAM, noise_seed)
    cond = torch.cat([policy.conditioning(torch.from_numpy(ch["obs"])[None])[0] for ch in chunks])
    x_T, noise = keyed_noise(sched, policy.trajectory_shape(1)[1:], [keys.seed(ch, i) for i, ch in enumerate(chunks)])
    return mean_step_jacobians(policy.denoise, sched, x_T, noise, cond)


RECORDS = ("guess", "spread", "rounds", "dev", "newton", "newton_dev", "x0_steps", "x0_steps_dev", "calibrated",
           "calibrated_dev", "calibrated_secant", "calibrated_secant_dev", "diagonal", "diagonal_dev", "previous",
           "previous_dev")


def measure(policy: LowdimPolicy, chunks: list[dict[str, Any]], schedule_name: str, tolerance: float,
            max_report_rounds: int, newton: bool, noise_seed: int,
            calibration: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every measurement of the module docstring on one schedule (the Jacobian leads need ``newton``)."""
    from tqdm import tqdm

    sched = policy.schedule_for(schedule_spec("sequential", schedule_name))
    mean_jac = calibrated_jacobians(policy, sched, calibration or [], noise_seed) if newton else None
    mean_diag = None if mean_jac is None else torch.diag_embed(torch.diagonal(mean_jac, dim1=1, dim2=2))
    rec: dict[str, list] = {key: [] for key in RECORDS}
    per_round: dict[int, list[float]] = {r: [] for r in range(1, max_report_rounds + 1)}
    previous: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    replay_keys, spread_keys = ChunkKeys(REPLAY_STREAM, noise_seed), ChunkKeys(SPREAD_STREAM, noise_seed)
    for i, ch in enumerate(tqdm(chunks, desc=schedule_name, unit="chunk")):
        cond, _ = policy.conditioning(torch.from_numpy(ch["obs"])[None])
        x_T, noise = keyed_noise(sched, policy.trajectory_shape(1)[1:], [replay_keys.seed(ch, i)])
        ref, inputs, x0s = sequential_states(policy, sched, x_T, noise, cond)
        jac = step_jacobians(policy.denoise, sched, inputs, cond) if newton else None
        before = previous.get(ch["episode"]) if ch["chunk"] > 0 else None
        previous[ch["episode"]] = (ref, x0s, jac)
        if before is None:  # the first chunk of an episode has no warm start: left out of every row
            continue
        other = keyed_noise(sched, policy.trajectory_shape(1)[1:], [spread_keys.seed(ch, i)])
        problem = Problem(policy, sched, x_T, noise, cond, ref, tolerance)
        problem.leads(rec, per_round, before, sequential_states(policy, sched, *other, cond)[0],
                      {"newton": jac, "calibrated": mean_jac, "previous": before[2]} if newton else {},
                      {"calibrated_secant": mean_jac, "diagonal": mean_diag} if newton else {})
    return {"schedule": schedule_name, "S": sched.num_steps, "chunks": len(rec["rounds"]), "records": rec,
            "per_round": per_round, "calibration_chunks": len(calibration or []) if newton else 0,
            "shares": None if mean_jac is None else weight_shares(mean_jac, policy.trajectory_shape(1)[-1])}


class Problem:
    """One warm-started chunk: its noise, conditioning and sequential sample, and the leads sampled on it."""

    def __init__(self, policy: LowdimPolicy, sched: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
                 cond: torch.Tensor | None, ref: torch.Tensor, tolerance: float) -> None:
        self.policy, self.sched, self.x_T, self.noise, self.cond, self.ref = policy, sched, x_T, noise, cond, ref
        self.tolerance = tolerance
        self.options = {k: v for k, v in PRESETS["paradigms"]["options"].items() if k not in ("window", "tolerance")}

    def px(self, sample: torch.Tensor, other: torch.Tensor | None = None) -> float:
        """Max |Δ executed action| between ``sample`` and ``other`` (default: the sequential sample), pixels."""
        p = self.policy
        a, b = (executed_actions(p, s) for s in (sample, self.ref if other is None else other))
        return float((a - b).abs().max())

    def picard(self, init: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
        """The default sampler (``paradigms``' options) at a full window from ``init``."""
        return picard_sample(self.policy.denoise, self.sched, self.x_T, self.noise, window=self.sched.num_steps,
                             tolerance=self.tolerance, condition=self.cond, init=init, **{**self.options, **kw})

    def leads(self, rec: dict[str, list], per_round: dict[int, list[float]],
              before: tuple[torch.Tensor, torch.Tensor, Any], other: torch.Tensor,
              newton: dict[str, torch.Tensor | None], secant: dict[str, torch.Tensor | None]) -> None:
        """Append this chunk's measurements to ``rec`` and ``per_round`` (see the module docstring)."""
        Na = self.policy.n_action_steps
        guess = shift_trajectory(before[0], Na)
        init = warm_start_init(self.sched, guess, self.x_T, self.noise)
        rec["guess"].append(self.px(guess))
        rec["spread"].append(self.px(other))
        out, stats = self.picard(init)
        rec["rounds"].append(stats.rounds)
        rec["dev"].append(self.px(out))
        for r in per_round:
            per_round[r].append(self.px(out if r >= stats.rounds else self.picard(init, max_iterations=r)[0]))
        out, stats = self.picard(per_step_init(self.sched, shift_trajectory(before[1], Na), self.x_T, self.noise))
        rec["x0_steps"].append(stats.rounds)
        rec["x0_steps_dev"].append(self.px(out))
        # the sampler itself: picard_sample(jacobian=...) with the preset's secant, with the mean
        # Jacobian and with its diagonal only (a per-entry slope)
        for key, linearization in secant.items():
            if linearization is not None:
                out, stats = self.picard(init, jacobian=linearization)
                rec[key].append(stats.rounds)
                rec[key + "_dev"].append(self.px(out))
        for key, linearization in newton.items():
            if linearization is not None:
                out, rounds = newton_sample(self.policy, self.sched, self.x_T, self.noise, self.cond, linearization,
                                            init, self.tolerance)
                rec[key].append(rounds)
                rec[key + "_dev"].append(self.px(out))


def to_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rounds_cols = sorted(results[0]["per_round"]) if results else []
    lines = [
        "# How low can rounds per chunk go?",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Checkpoint `{meta['checkpoint']}`. Observation stream: {meta['episodes']} PushT episodes (env seeds "
        f"{meta['seeds']}) of up to {meta['max_chunks']} chunks, rolled out with sequential DDIM-10; replay at "
        f"batch 1, every row on the same noise; the first chunk of each episode (no warm start) is left out. "
        f"Tolerance {meta['tolerance']} (the `paradigms` preset's unless changed), window = all steps. "
        "Pixels: max |Δ executed action| over the chunk's executed actions; a / b = mean over chunks / max.",
        "",
        "| schedule | chunks | previous plan vs this sample (px) | other noise, same obs (px) | default rounds "
        "(mean / max) | default dev (px) | " + " | ".join(f"dev after {r} round{'s' if r > 1 else ''}"
                                                          for r in rounds_cols)
        + " | Newton floor rounds (mean / max) | Newton dev (px) |",
        "|---|---|---|---|---|---|" + "---|" * len(rounds_cols) + "---|---|",
    ]
    for res in results:
        rec = res["records"]
        newton = (f"{statistics.mean(rec['newton']):.2f} / {max(rec['newton'])}" if rec["newton"] else "not run")
        lines.append(
            f"| {res['schedule']} | {res['chunks']} | {mean_max(rec['guess'])} | {mean_max(rec['spread'])} | "
            f"{statistics.mean(rec['rounds']):.2f} / {max(rec['rounds'])} | {mean_max(rec['dev'])} | "
            + " | ".join(mean_max(res["per_round"][r]) for r in rounds_cols)
            + f" | {newton} | {mean_max(rec['newton_dev'])} |")
    lines += [
        "",
        "How to read it: the warm start starts from the previous chunk's plan, and that plan is as far from "
        "this chunk's sample as two samples of one observation are from each other: the policy re-plans every "
        "chunk, so the first round starts tens of pixels off and the iteration, not the guess, has to close "
        "the gap. The Newton floor uses each step's exact Jacobian at the answer (an oracle): the Picard "
        "family with this warm start and this convergence test does not go below it.",
        "",
        "## Leads a sampler could use",
        "",
        f"Same chunks, noise and convergence test. Mean Jacobian: each step's exact Jacobian averaged over "
        f"{meta['calibration']}, fixed before sampling (as a window is), in the Newton iteration of the floor. "
        "Previous chunk's Jacobian: that chunk's exact Jacobians at its own sequential sample, in the same "
        "iteration (what a Broyden or Anderson estimate carried over from the previous chunk could at best "
        "know). Mean Jacobian + secant: the default sampler with the mean Jacobian in its solve "
        "(`picard_sample(jacobian=...)`), its secant estimating the slope of what that Jacobian leaves over. "
        "Its diagonal + secant: the same with only the mean Jacobian's diagonal (a fixed slope per entry and "
        "step, the most a per-entry secant could know in advance). Per-step warm start: the default sampler "
        "started from the previous chunk's clean-sample prediction at every step, shifted, instead of its "
        "final sample. Rounds mean / max; deviation (px) mean / max over chunks.",
        "",
        "| schedule | default rounds | default dev | per-step warm start rounds | its dev | mean Jacobian rounds "
        "| its dev | mean Jacobian + secant rounds | its dev | its diagonal + secant rounds | its dev "
        "| previous chunk's Jacobian rounds | its dev | Newton floor rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def rounds(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} / {max(values)}" if values else "not run"

    for res in results:
        rec = res["records"]
        lines.append(
            f"| {res['schedule']} | {rounds(rec['rounds'])} | {mean_max(rec['dev'])} | {rounds(rec['x0_steps'])} | "
            f"{mean_max(rec['x0_steps_dev'])} | {rounds(rec['calibrated'])} | {mean_max(rec['calibrated_dev'])} | "
            f"{rounds(rec['calibrated_secant'])} | {mean_max(rec['calibrated_secant_dev'])} | "
            f"{rounds(rec['diagonal'])} | {mean_max(rec['diagonal_dev'])} | "
            f"{rounds(rec['previous'])} | {mean_max(rec['previous_dev'])} | {rounds(rec['newton'])} |")
    shared = [res for res in results if res.get("shares")]
    if shared:
        lines += [
            "",
            "Where the mean Jacobian's weight sits (share of its squared Frobenius norm over all steps): on the "
            "diagonal (an entry on itself), within one action channel (the same action dimension at any time "
            "of the trajectory), within one time step (the action dimensions of the same time).",
            "",
            "| schedule | diagonal | within one channel | within one time step |",
            "|---|---|---|---|",
        ]
        for res in shared:
            sh = res["shares"]
            lines.append(f"| {res['schedule']} | {sh['diagonal']:.3f} | {sh['channel']:.3f} | {sh['time step']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--episodes", type=int, default=3, help="episodes of the observation stream")
    parser.add_argument("--max-chunks", type=int, default=6, help="chunks per episode at most")
    parser.add_argument("--seed-start", type=int, default=100000, help="env seed of the first episode")
    parser.add_argument("--calibration-episodes", type=int, default=3,
                        help="episodes (other env seeds) whose Jacobians are averaged for the mean-Jacobian lead")
    parser.add_argument("--calibration-seed-start", type=int, default=100020,
                        help="env seed of the first calibration episode")
    parser.add_argument("--schedules", nargs="+", default=["ddpm100", "ddim16", "ddim10"])
    parser.add_argument("--tolerance", type=float, default=float(PRESETS["paradigms"]["options"]["tolerance"]))
    parser.add_argument("--report-rounds", type=int, default=4, help="deviation after 1 … this many rounds")
    parser.add_argument("--no-newton", action="store_true", help="skip the Newton floor (its Jacobians are slow)")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    for name in args.schedules:
        try:
            parse_schedule(name)
        except ValueError as e:
            parser.error(f"--schedules: {e}")
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint, backend="eager")  # the Jacobians differentiate through PyTorch
    seeds = set(range(args.seed_start, args.seed_start + args.episodes))
    calibration_seeds = range(args.calibration_seed_start, args.calibration_seed_start + args.calibration_episodes)
    if not args.no_newton and seeds & set(calibration_seeds):
        raise SystemExit("--calibration-seed-start: the calibration episodes must not share env seeds with the "
                         f"replayed ones ({args.seed_start}-{args.seed_start + args.episodes - 1})")
    recorder = {"spec": schedule_spec("sequential", "ddim10"), "keys": ChunkKeys(None, args.noise_seed)}
    chunks = record_stream(policy, args.episodes, args.max_chunks, args.seed_start, **recorder)
    calibration = [] if args.no_newton else record_stream(
        policy, args.calibration_episodes, args.max_chunks, args.calibration_seed_start, **recorder)
    results = [measure(policy, chunks, name, args.tolerance, args.report_rounds, not args.no_newton,
                       args.noise_seed, calibration) for name in args.schedules]
    try:
        shown = Path(args.checkpoint).resolve().relative_to(ROOT)
    except ValueError:
        shown = Path(args.checkpoint)
    last_calibration = args.calibration_seed_start + args.calibration_episodes - 1
    meta = {"command": "python eval/bench_rounds_floor.py " + " ".join(argv), "checkpoint": shown,
            "episodes": args.episodes, "seeds": f"{args.seed_start}-{args.seed_start + args.episodes - 1}",
            "max_chunks": args.max_chunks, "tolerance": args.tolerance,
            "calibration": (f"{len(calibration)} chunks of {args.calibration_episodes} other episodes (env seeds "
                            f"{args.calibration_seed_start}-{last_calibration})"
                            if calibration else "no calibration chunks (--no-newton)")}
    md = to_markdown(results, meta)
    write_text(args.out, md)
    print(md)


if __name__ == "__main__":
    main()
