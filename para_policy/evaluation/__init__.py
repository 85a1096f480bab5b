"""The evaluator behind ``python eval.py``: closed-loop rollouts, batch-1 latency, side-by-side reports.

``evaluate(cfg, output_dir)`` runs one evaluation (see :mod:`.runner`); ``main(cfg)`` is
the Hydra task function ``eval.py`` calls; :class:`.sweep.SweepSummary` summarises a
multirun. Importing this package registers the ``${para_policy.asset:NAME}`` resolver
the configs use for the shipped checkpoint.
"""

from __future__ import annotations

import sys
from typing import Any

from para_policy.extras import require

for _module in ("omegaconf", "hydra", "gymnasium", "tqdm"):
    require(_module, "eval")

from omegaconf import DictConfig  # noqa: E402

from para_policy.evaluation.config import (  # noqa: E402
    EvalConfigError,
    register_resolvers,
    sampler_config,
    task_settings,
)
from para_policy.evaluation.runner import evaluate, flat_metrics  # noqa: E402

__all__ = ["EvalConfigError", "evaluate", "flat_metrics", "main", "register_resolvers", "sampler_config",
           "task_settings"]


def main(cfg: DictConfig) -> float | None:
    """Hydra task function: evaluate into Hydra's run folder; a bad config exits with its message.

    Returns the candidate's mean score (what Hydra sweepers such as Optuna optimise).
    """
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        results: dict[str, Any] = evaluate(cfg, hc.runtime.output_dir, original_cwd=hc.runtime.cwd,
                                           overrides=list(hc.overrides.task))
    except EvalConfigError as e:  # a usage error: one line and exit code 2, as argparse does
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    return results["samplers"]["candidate"]["mean_score"]
