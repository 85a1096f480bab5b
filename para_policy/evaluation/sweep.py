"""Summary across the runs of a Hydra multirun: a tolerance (or window) sweep, offline.

``python eval.py -m sampler.tolerance=0.01,0.05,0.1,0.5`` runs one evaluation per value;
:class:`SweepSummary` (a Hydra callback, configured in ``configs/eval.yaml`` under
``hydra.callbacks``) then reads every job's ``results.json`` and writes into the sweep
folder ``sweep_summary.md`` / ``sweep_summary.json`` (one row per run: the swept values,
score, success, latency, rounds, speedup, faithfulness) and ``sweep_summary.png`` (score
and latency against the first swept parameter). ``summarize_sweep(dir)`` does the same
by hand, e.g. for runs made by several launcher processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

COLUMNS: list[tuple[str, str]] = [
    ("score", "samplers.candidate.mean_score"),
    ("success", "samplers.candidate.success_rate"),
    ("baseline score", "samplers.baseline.mean_score"),
    ("ms/chunk p50", "samplers.candidate.latency.ms_per_chunk.p50"),
    ("baseline ms/chunk p50", "samplers.baseline.latency.ms_per_chunk.p50"),
    ("speedup p50", "comparison.speedup_p50"),
    ("rounds/chunk", "samplers.candidate.latency.rounds_per_chunk.mean"),
    ("model evals/chunk", "samplers.candidate.latency.model_evals_per_chunk.mean"),
    ("action dist mean px", "comparison.faithfulness.mean_px"),
    ("action dist max px", "comparison.faithfulness.max_px"),
    ("failed", "samplers.candidate.n_failed"),
]


def _lookup(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summarize_sweep(sweep_dir: str | Path) -> dict[str, Any] | None:
    """Collect ``*/results.json`` under ``sweep_dir`` and write the sweep summary files.

    Returns the summary (``{'swept': [keys], 'runs': [{'dir', 'params', <columns>}]}``),
    or None when no run finished.
    """
    from para_policy.evaluation.report import atomic_file

    sweep_dir = Path(sweep_dir)
    files = sorted(sweep_dir.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name))
    runs = []
    for f in files:
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"sweep summary: skipping {f} ({e})")
            continue
        params = {}
        for o in res.get("overrides", []):
            key, _, value = o.partition("=")
            params[key.lstrip("+~")] = _parse(value)
        runs.append({"dir": f.parent.name, "params": params,
                     **{name: _lookup(res, path) for name, path in COLUMNS}})
    if not runs:
        return None
    keys = sorted({k for r in runs for k in r["params"]})
    swept = [k for k in keys if len({json.dumps(r["params"].get(k)) for r in runs}) > 1] or keys
    runs.sort(key=lambda r: [(str(type(r["params"].get(k))), r["params"].get(k)) for k in swept])
    summary = {"sweep_dir": str(sweep_dir), "swept": swept, "runs": runs}

    header = ["run", *swept, *[name for name, _ in COLUMNS]]
    lines = ["# Sweep summary", "", f"{len(runs)} runs in `{sweep_dir}`; swept: {', '.join(swept) or '-'}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in runs:
        row = [r["dir"], *[_fmt(r["params"].get(k)) for k in swept], *[_fmt(r[name]) for name, _ in COLUMNS]]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    atomic_file(sweep_dir / "sweep_summary.md", lambda tmp: Path(tmp).write_text(text))
    atomic_file(sweep_dir / "sweep_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    _plot(runs, swept, sweep_dir / "sweep_summary.png")
    print(text)
    return summary


def _plot(runs: list[dict[str, Any]], swept: list[str], path: Path) -> None:
    """Score and latency (p50 ms per chunk) against the first numeric swept parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from para_policy.evaluation.report import atomic_file

    key = next((k for k in swept if all(isinstance(r["params"].get(k), (int, float)) for r in runs)), None)
    if key is None:
        xs, label = list(range(len(runs))), "run"
    else:
        xs, label = [float(r["params"][key]) for r in runs], key
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [r["score"] if r["score"] is not None else float("nan") for r in runs], "o-", color="C0",
            label="score")
    if any(r["baseline score"] is not None for r in runs):
        ax.plot(xs, [r["baseline score"] if r["baseline score"] is not None else float("nan") for r in runs],
                ":", color="C0", label="baseline score")
    ax.set_ylabel("mean score", color="C0")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(label)
    if key is not None and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["ms/chunk p50"] if r["ms/chunk p50"] is not None else float("nan") for r in runs], "s-",
             color="C1", label="ms/chunk p50")
    if any(r["baseline ms/chunk p50"] is not None for r in runs):
        ax2.plot(xs, [r["baseline ms/chunk p50"] or float("nan") for r in runs], ":", color="C1",
                 label="baseline ms/chunk p50")
    ax2.set_ylabel("latency ms/chunk p50 (batch 1)", color="C1")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7)
    ax.set_title("Sweep: score and latency")
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, summarise its runs (see :func:`summarize_sweep`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_absolute():
            sweep_dir = Path(OmegaConf.select(config, "hydra.runtime.cwd") or os.getcwd()) / sweep_dir
        summary = summarize_sweep(sweep_dir)
        if summary is None:
            print(f"sweep summary: no results.json under {sweep_dir}")
        else:
            print(f"sweep summary: {sweep_dir / 'sweep_summary.md'}")
