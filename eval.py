"""Evaluate a diffusion policy with a parallel sampler against the sequential baseline.

    python eval.py task=pusht sampler=paradigms               # 50 PushT episodes, paradigms vs sequential
    python eval.py sampler.scheduler=ddim sampler.num_inference_steps=16 task.episodes=10
    python eval.py -m sampler.tolerance=0.01,0.05,0.1,0.5     # sweep; summary in the multirun folder
    python eval.py --help / --cfg job

The logic lives in para_policy.evaluation; this file is only the Hydra entry point.
"""

import os

# Passive OpenMP waiting, before torch starts OpenMP: spinning workers on a busy machine made every
# chunk several times slower (see train.py). OMP_WAIT_POLICY=ACTIVE in the environment overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

from para_policy.extras import MissingExtraError, require  # noqa: E402

try:
    require("hydra", "eval", "eval.py")
except MissingExtraError as e:
    sys.exit(f"eval.py: error: {e}")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import para_policy.evaluation as evaluation  # noqa: E402  (registers the ${para_policy.asset:...} resolver)


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return evaluation.main(cfg)


if __name__ == "__main__":
    main()
