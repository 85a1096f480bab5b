"""Weights & Biases logging for the evaluator, offline unless asked otherwise.

The ``logger`` config has the shape train.py's has (``backend``, ``mode``, ``project``,
``name``) plus optional ``entity``, ``group``, ``tags``. ``backend: none`` (``logger=none``)
logs nothing. ``mode`` defaults to ``$WANDB_MODE`` or ``offline``: runs land in
``<run dir>/wandb/offline-run-*`` without an account; ``wandb sync`` uploads them later.

Both entry points log through this module: ``eval.py`` with :func:`make_logger` (one run per
evaluation; a W&B that cannot start is skipped), ``train.py`` with :class:`TrainLogger` (a
JSON-lines file plus the same records to W&B, resumed with the training run). Both start their
run with :func:`start_wandb_run`, so a ``logger`` config means the same to both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: ``logger.backend`` values that mean "no W&B run" (``logger=none``)
NO_BACKENDS = ("none", "null", "off", "false")


def logger_backend(logger_cfg: Mapping[str, Any] | None) -> str:
    """``'wandb'`` or ``'none'`` from ``logger.backend`` (absent: none); ``ValueError`` for anything else."""
    backend = str(dict(logger_cfg or {}).get("backend", "none")).lower()
    if backend in NO_BACKENDS:
        return "none"
    if backend != "wandb":
        raise ValueError(f"logger.backend must be 'wandb' or 'none', got {backend!r}")
    return backend


def start_wandb_run(logger_cfg: Mapping[str, Any] | None, config: Mapping[str, Any], output_dir: Path, *,
                    tag: str, job_type: str | None = None, resume_id: str | None = None) -> Any:
    """``wandb.init`` for a run of ``eval.py`` or ``train.py``; raises what W&B raises.

    Args:
        logger_cfg: the ``logger`` node (mode, project, name, entity, group, tags); ``mode`` and
            ``project`` default to ``offline`` and ``para_policy``.
        config: the resolved run config, stored as the W&B run config.
        output_dir: the run folder; W&B writes ``wandb/`` inside it.
        tag: added to ``logger.tags`` (``'eval'``, ``'train'``).
        job_type: W&B's job type (None: W&B's default).
        resume_id: an earlier run's id to continue (``resume='allow'``), as a resumed training does.
    """
    import wandb

    cfg = dict(logger_cfg or {})
    return wandb.init(
        project=cfg.get("project") or "para_policy",
        entity=cfg.get("entity"),
        name=cfg.get("name"),
        group=cfg.get("group"),
        tags=[*list(cfg.get("tags") or []), tag],
        mode=cfg.get("mode") or "offline",
        dir=str(output_dir),
        config=dict(config),
        job_type=job_type,
        id=resume_id,
        resume="allow" if resume_id else None,
    )


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
    if logger_backend(logger_cfg) == "none":
        return NullLogger()
    try:
        run = start_wandb_run(logger_cfg, config, output_dir, tag=job_type, job_type=job_type)
    except Exception as e:  # e.g. mode=online without credentials: keep the evaluation, say why
        print(f"warning: W&B did not start ({type(e).__name__}: {e}); logging to files only")
        return NullLogger()
    return WandbLogger(run)


class TrainLogger:
    """``train.py``'s log: one JSON object per line in ``train_log.jsonl``, and the same records to W&B.

    ``backend: none`` keeps only the file. Unlike the evaluator's, a W&B run that cannot start
    stops the training before its first step (a long run should not find out at the end that
    nothing was logged). ``resume_id`` continues the W&B run of an interrupted training.
    """

    def __init__(self, logger_cfg: Mapping[str, Any] | None, output_dir: Path, run_config: Mapping[str, Any],
                 resume_id: str | None) -> None:
        self.path = output_dir / "train_log.jsonl"
        self.run = None
        if logger_backend(logger_cfg) == "wandb":
            self.run = start_wandb_run(logger_cfg, run_config, output_dir, tag="train", resume_id=resume_id)

    @property
    def run_id(self) -> str | None:
        """The W&B run's id (stored in ``resume.pt``), None without W&B."""
        return None if self.run is None else self.run.id

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with its ``step``) to the file, and log it to W&B at that step."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
