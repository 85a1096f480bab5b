"""Optional dependencies: which extra brings a module, and the error that says how to install it.

The core (``pip install para_policy``) is torch, numpy, diffusers and safetensors: what a
robot's software stack needs to sample. The evaluator, training, the Lift task and reading
DiffusionPolicy ``.ckpt`` files need more; each lives in an extra, and using it without the
extra raises :class:`MissingExtraError` naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra → what it is for
EXTRAS = {
    "eval": "the evaluator and training (eval.py, train.py: Hydra, gymnasium, gym-pusht, zarr, W&B, plots, videos)",
    "lift": "the Lift task (robosuite 1.4.1, mujoco 2.3.7, h5py)",
    "diffusion-policy": "reading DiffusionPolicy .ckpt files (dill, omegaconf)",
    "serve": "serving a policy over the network (para-policy serve, para_policy.serving: grpcio)",
}


class MissingExtraError(ImportError):
    """A module of an optional extra is not installed."""


def install_hint(extra: str) -> str:
    return f"pip install 'para_policy[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming ``extra`` and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = purpose or EXTRAS.get(extra, extra)
        raise MissingExtraError(
            f"{what} needs {module!r}, which is not importable ({type(e).__name__}: {e}). "
            f"Install the [{extra}] extra: {install_hint(extra)}"
        ) from e
