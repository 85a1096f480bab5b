"""Does ``paradigms`` mean the same fast method on every path? Rounds per chunk on one PushT stream.

Records a PushT observation stream with the shipped policy (sequential DDPM-100 on the
evaluator's noise keys, :func:`para_policy.bench.record_stream`), then replays it, episode by
episode, through three drop-in paths with no options beyond the preset name:

* ``load_policy(path, sampler="paradigms")`` with ``predict_action`` called in a loop (the
  policy keeps its own warm start; ``reset()`` between episodes);
* ``Controller(policy)`` (its default is the preset), ``predict_chunk`` per chunk;
* a DiffusionPolicy-style policy object (``DiffusionUnetLowdimPolicy``'s ``predict_action`` /
  ``conditional_sample`` written out over the same UNet and a diffusers scheduler), ``patch(obj)``;

and runs ``eval.py task=pusht sampler=paradigms`` on a few episodes in a subprocess (its batch-1
latency pass replays observations of its own rollouts). Each path resolves ``window='auto'``
itself; the window cache makes them agree on one machine. Writes ``bench_paths.{md,json}``.

    python eval/bench_paths.py                       # 4 episodes x 12 chunks, eval.py on 8 episodes
    python eval/bench_paths.py --episodes 2 --eval-episodes 2 --out /tmp/paths
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from para_policy import Controller, load_policy, patch  # noqa: E402
from para_policy.bench import ROLLOUT_KEYS, record_stream, write_json, write_text  # noqa: E402
from para_policy.schedule import build_scheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"


class DiffusionPolicyStyle(nn.Module):
    """DiffusionPolicy's ``DiffusionUnetLowdimPolicy`` inference path (global conditioning), written out."""

    def __init__(self, policy) -> None:
        super().__init__()
        self.model = policy.model
        self.normalizer = policy.normalizer
        self.noise_scheduler = build_scheduler(policy.config["noise_scheduler"])
        self.num_inference_steps = policy.num_inference_steps
        self.n_obs_steps, self.n_action_steps = policy.n_obs_steps, policy.n_action_steps
        self.horizon, self.action_dim = policy.horizon, policy.action_dim

    def reset(self) -> None:
        pass

    def conditional_sample(self, condition_data, condition_mask, local_cond=None, global_cond=None, generator=None,
                           **kwargs):
        trajectory = torch.randn(size=condition_data.shape, dtype=condition_data.dtype, generator=generator)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        for t in self.noise_scheduler.timesteps:
            trajectory[condition_mask] = condition_data[condition_mask]
            out = self.model(trajectory, t, local_cond=local_cond, global_cond=global_cond)
            trajectory = self.noise_scheduler.step(out, t, trajectory, generator=generator, **kwargs).prev_sample
        trajectory[condition_mask] = condition_data[condition_mask]
        return trajectory

    @torch.no_grad()
    def predict_action(self, obs_dict):
        nobs = self.normalizer.normalize("obs", obs_dict["obs"])
        B = nobs.shape[0]
        global_cond = nobs[:, : self.n_obs_steps].reshape(B, -1)
        shape = (B, self.horizon, self.action_dim)
        data, mask = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
        sample = self.conditional_sample(data, mask, global_cond=global_cond)
        action_pred = self.normalizer.unnormalize("action", sample[..., : self.action_dim])
        start = self.n_obs_steps - 1
        return {"action": action_pred[:, start: start + self.n_action_steps], "action_pred": action_pred}


def replay(stream: list[dict], seed: int, backend: str = "eager") -> dict[str, dict]:
    """Rounds per chunk of the three library paths on ``stream`` (episode by episode, in order).

    Every path runs the UNet on ``backend`` (a patched object runs its own network eagerly, so
    ``eager`` compares the paths, not runtimes: the window is measured per runtime).
    """
    episodes = sorted({c["episode"] for c in stream}, key=[c["episode"] for c in stream].index)
    by_ep = {e: [c["obs"] for c in stream if c["episode"] == e] for e in episodes}
    out: dict[str, dict] = {}

    t0 = time.perf_counter()
    policy = load_policy(ASSET, sampler="paradigms", backend=backend)
    rounds, windows = [], set()
    g = torch.Generator().manual_seed(seed)
    for e in episodes:
        policy.reset()
        for obs in by_ep[e]:
            res = policy.predict_action({"obs": torch.from_numpy(obs)[None]}, generator=g)
            rounds.append(res.stats.rounds)
            windows.add(res.spec.options["window"])
    out["load_policy + predict_action loop"] = {"rounds": rounds, "windows": sorted(windows),
                                                "spec": policy.sampler.as_dict(), "wall_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    ctl = Controller(load_policy(ASSET, backend=backend), seed=seed)
    for e in episodes:
        ctl.reset()
        for obs in by_ep[e]:
            ctl.predict_chunk(obs)
    out["Controller(policy)"] = {"rounds": [r.rounds for r in ctl.records], "windows": [ctl.spec.options["window"]],
                                 "spec": ctl.spec.as_dict(), "wall_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    dp = patch(DiffusionPolicyStyle(load_policy(ASSET, sampler="sequential")).eval())
    torch.manual_seed(seed)
    rounds = []
    for e in episodes:
        dp.reset()
        for obs in by_ep[e]:
            dp.predict_action({"obs": torch.from_numpy(obs)[None]})
            rounds.append(dp.para_stats.rounds)
    state = vars(dp)["_para_patch"]
    out["patch(DiffusionPolicy-style object)"] = {"rounds": rounds, "spec": state.spec.as_dict(),
                                                  "windows": [state.last_spec.options["window"]],
                                                  "wall_s": time.perf_counter() - t0}
    return out


def run_eval(episodes: int, out_dir: Path, backend: str = "eager") -> dict:
    """``eval.py task=pusht sampler=paradigms`` on ``episodes`` episodes (no baseline: rounds only)."""
    run_dir = out_dir / "eval_run"
    cmd = [sys.executable, str(ROOT / "eval.py"), "task=pusht", "sampler=paradigms", f"task.episodes={episodes}",
           "compare=false", "logger=none", "video.enabled=false", "progress=false", f"latency.calls={episodes * 12}",
           f"+inference.backend={backend}",
           f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"eval.py failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    cand = results["samplers"]["candidate"]
    return {"rounds_mean": cand["latency"]["rounds_per_chunk"]["mean"],
            "rollout_rounds_mean": cand["rollout_rounds_per_chunk"]["mean"], "spec": cand["spec"],
            "window_tuning_source": (results.get("window_tuning") or {}).get("source"),
            "n_calls": results["latency_method"]["n_calls"], "wall_s": time.perf_counter() - t0,
            "command": " ".join(["python", "eval.py", *cmd[2:-1]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=4, help="recorded PushT episodes (default 4)")
    ap.add_argument("--chunks", type=int, default=12, help="chunks per recorded episode (default 12)")
    ap.add_argument("--eval-episodes", type=int, default=8, help="episodes of the eval.py run (0: skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="eager", help="the UNet's runtime on every path (default eager, which a "
                    "patched object runs too)")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "bench_paths")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stream = record_stream(load_policy(ASSET, sampler="sequential"), args.episodes, args.chunks, 100000,
                           keys=ROLLOUT_KEYS)
    print(f"recorded {len(stream)} chunks of {args.episodes} episodes")
    paths = replay(stream, args.seed, args.backend)
    rows = {name: {"rounds_mean": float(np.mean(p["rounds"])), "rounds_p95": float(np.percentile(p["rounds"], 95)),
                   "chunks": len(p["rounds"]), "window": p["spec"]["options"]["window"] if "windows" not in p
                   else p["windows"], "wall_s": round(p["wall_s"], 1)} for name, p in paths.items()}
    if args.eval_episodes:
        ev = run_eval(args.eval_episodes, args.out, args.backend)
        rows["eval.py sampler=paradigms"] = {"rounds_mean": ev["rounds_mean"], "rounds_p95": None,
                                             "chunks": ev["n_calls"], "window": ev["spec"]["options"]["window"],
                                             "wall_s": round(ev["wall_s"], 1), "rollout_rounds_mean":
                                             ev["rollout_rounds_mean"], "window_source": ev["window_tuning_source"]}
    lines = ["# Rounds per chunk of `paradigms` on every path", "",
             f"Shipped PushT policy; {len(stream)} recorded chunks of {args.episodes} episodes (seeds from 100000), "
             "batch 1, DDPM-100. `python eval/bench_paths.py` "
             f"--episodes {args.episodes} --chunks {args.chunks} --eval-episodes {args.eval_episodes} "
             f"--backend {args.backend}; every path on the `{args.backend}` runtime.", "",
             "| path | rounds/chunk mean | p95 | chunks | window |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        p95 = "" if r["rounds_p95"] is None else f"{r['rounds_p95']:.0f}"
        lines.append(f"| {name} | {r['rounds_mean']:.2f} | {p95} | {r['chunks']} | {r['window']} |")
    if "eval.py sampler=paradigms" in rows:
        r = rows["eval.py sampler=paradigms"]
        lines += ["", f"eval.py: rounds on batch-1 replays of its own rollouts' observations; its batched "
                      f"rollouts took {r['rollout_rounds_mean']:.2f} rounds per chunk; window from: "
                      f"{r['window_source']}."]
    spread = max(r["rounds_mean"] for r in rows.values()) - min(r["rounds_mean"] for r in rows.values())
    lines += ["", f"Spread of the means: {spread:.2f} rounds."]
    write_json(args.out / "bench_paths.json", {"rows": rows, "paths": paths, "episodes": args.episodes,
                                               "chunks": len(stream)}, indent=2)
    write_text(args.out / "bench_paths.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
