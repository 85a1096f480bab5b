"""Weights & Biases logging for the evaluator, offline unless asked otherwise.

The ``logger`` config has the shape train.py's has (``backend``, ``mode``, ``project``,
``name``) plus optional ``entity``, ``group``, ``tags``. ``backend: none`` (``logger=none``)
logs nothing. ``mode`` defaults to ``$WANDB_MODE`` or ``offline``: runs land in
``<run dir>/wandb/offline-run-*`` without an account; ``wandb sync`` uploads them later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing (``logger=none``)."""

    enabled = False

    def log(self, metrics: Mapping[str, Any]) -> None:
        pass

    def log_results(self, results: Mapping[str, Any], metrics: Mapping[str, Any], plots: Mapping[str, Path],
                    videos: Mapping[str, Path]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """One W&B run per evaluation: resolved config, metrics, the comparison table, plots, videos."""

    enabled = True

    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, metrics: Mapping[str, Any]) -> None:
        self.run.log(dict(metrics))

    def log_results(self, results: Mapping[str, Any], metrics: Mapping[str, Any], plots: Mapping[str, Path],
                    videos: Mapping[str, Path]) -> None:
        import wandb

        from para_policy.evaluation.report import table_rows

        header, rows = table_rows(results)
        payload: dict[str, Any] = dict(metrics)
        payload["comparison_table"] = wandb.Table(columns=header, data=rows)
        columns = ["role", "sampler", "seed", "max_reward", "success", "length", "error"]
        episodes = [(role, s, e) for role, s in results["samplers"].items() for e in s["episodes"]]
        # episodes run through a Controller (controller.mode=async|rtc, or the wall clock) add its statistics
        extra = [k for k in ("stalls", "switches", "switch_discontinuity_mean", "switch_discontinuity_max",
                             "idle_steps", "late_steps") if any(k in e for _, _, e in episodes)]
        episode_rows = [[role, s["name"], *(e.get(k) for k in columns[2:] + extra)] for role, s, e in episodes]
        payload["episodes"] = wandb.Table(columns=columns + extra, data=episode_rows)
        for name, path in plots.items():
            payload[f"plots/{name}"] = wandb.Image(str(path))
        for role, path in videos.items():
            payload[f"videos/{role}"] = wandb.Video(str(path), format=Path(path).suffix.lstrip("."))
        self.run.log(payload)
        self.run.summary.update(dict(metrics))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_logger(logger_cfg: Mapping[str, Any] | None, config: Mapping[str, Any], output_dir: Path,
                job_type: str = "eval") -> NullLogger:
    """Start the configured logger; a W&B that cannot start is reported and skipped, not fatal.

    Args:
        logger_cfg: the ``logger`` node (backend, mode, project, name, entity, group, tags).
        config: the resolved run config, stored as the W&B run config.
        output_dir: the Hydra run folder; W&B writes ``wandb/`` inside it.
    """
    cfg = dict(logger_cfg or {})
    backend = str(cfg.get("backend", "none")).lower()
    if backend in ("none", "null", "off", "false"):
        return NullLogger()
    if backend != "wandb":
        raise ValueError(f"logger.backend must be 'wandb' or 'none', got {backend!r}")
    import wandb

    try:
        run = wandb.init(
            project=cfg.get("project") or "para_policy",
            entity=cfg.get("entity"),
            name=cfg.get("name"),
            group=cfg.get("group"),
            tags=[*list(cfg.get("tags") or []), job_type],
            mode=cfg.get("mode") or "offline",
            dir=str(output_dir),
            config=dict(config),
            job_type=job_type,
        )
    except Exception as e:  # e.g. mode=online without credentials: keep the evaluation, say why
        print(f"warning: W&B did not start ({type(e).__name__}: {e}); logging to files only")
        return NullLogger()
    return WandbLogger(run)
