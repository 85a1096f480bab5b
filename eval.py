"""Evaluate a diffusion policy with a parallel sampler against the sequential baseline.

    python eval.py task=pusht sampler=paradigms               # 50 PushT episodes, ParaDDPM vs sequential
    python eval.py sampler=paraddim sampler.tolerance=0.05 task.episodes=10
    python eval.py -m sampler.tolerance=0.01,0.05,0.1,0.5     # sweep; summary in the multirun folder
    python eval.py --help / --cfg job

The logic lives in para_policy.evaluation; this file is only the Hydra entry point.
"""

import hydra
from omegaconf import DictConfig

import para_policy.evaluation as evaluation  # registers the ${para_policy.asset:...} resolver


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return evaluation.main(cfg)


if __name__ == "__main__":
    main()
