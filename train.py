"""Train a DiffusionPolicy: ``python train.py task=pusht [overrides]`` (or ``task=pusht_image``).

A thin Hydra entry point: the config lives in ``configs/train.yaml`` (+ ``configs/task/``), the
training loop in :func:`para_policy.training.train`.  Outputs go to Hydra's run directory
(``outputs/train/<date>/<time>_<task>``, or ``hydra.run.dir=...``).

A task whose config names a ``train_config`` (``task=pusht_image``: ``train_image``, DiffusionPolicy's
image recipe) is composed from ``configs/<train_config>.yaml`` instead, as if ``--config-name`` had
been given; an explicit ``--config-name`` wins.
"""

from __future__ import annotations

import os

# On a shared CPU machine, OpenMP workers that spin while waiting for a descheduled peer make every
# parallel region wait a whole time slice, so a training step on busy cores takes many times longer
# than with passive waiting (measurements: docs/benchmarks.md, "Latency under load").  Passive
# waiting must be chosen before torch starts OpenMP; OMP_WAIT_POLICY=ACTIVE in the environment
# overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from para_policy.extras import MissingExtraError, require  # noqa: E402

try:
    require("hydra", "eval", "train.py")
except MissingExtraError as e:
    sys.exit(f"train.py: error: {e}")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def task_config_name(argv: list[str]) -> str | None:
    """The ``train_config`` named by the task that ``argv``'s ``task=<name>`` chooses.

    None when there is no such override or key, or when ``argv`` gives ``--config-name`` itself.
    """
    if any(a in ("--config-name", "-cn") or a.startswith(("--config-name=", "-cn=")) for a in argv):
        return None
    tasks = [a.split("=", 1)[1] for a in argv if a.startswith("task=")]
    path = CONFIG_DIR / "task" / f"{tasks[-1]}.yaml" if tasks else None
    if path is None or not path.is_file():  # no task override, a sweep (task=a,b) or a task Hydra will report
        return None
    from omegaconf import OmegaConf

    name = OmegaConf.load(path).get("train_config")
    return str(name) if name else None


@hydra.main(version_base=None, config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from para_policy.training import train

    summary = train(cfg)
    print(
        f"done: step {summary['step']} ({summary['stop_reason']}), train loss {summary['train_loss']}, "
        f"val loss (ema) {summary['val_loss_ema']}\ncheckpoint: {summary['checkpoint']}"
    )


if __name__ == "__main__":
    config_name = task_config_name(sys.argv[1:])
    if config_name is not None:
        sys.argv.insert(1, f"--config-name={config_name}")
    main()
