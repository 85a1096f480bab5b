"""robosuite's Panda Lift through robomimic's formats, with DiffusionPolicy's 19-d low-dim observation.

Modules (each imports what it needs; robosuite and h5py come with the ``[lift]`` extra):

* :mod:`.env`: ``LiftEnv``, a gymnasium env around robosuite Lift (DiffusionPolicy's seeding,
  robomimic's env metadata and ``reset_to``).
* :mod:`.expert`: the scripted expert (above the cube, descend, close, lift).
* :mod:`.robomimic_hdf5`: reading and writing robomimic's HDF5 dataset layout.
* :mod:`.generate`: ``python -m para_policy.tasks.lift.generate --help``.

Nothing here imports robosuite or h5py at package import time, so the error a user sees without
the extra is the install hint of :func:`require`, raised where the dependency is first needed.
"""

from __future__ import annotations

from types import ModuleType

from para_policy import extras
from para_policy.extras import MissingExtraError

INSTALL_HINT = extras.install_hint("lift")


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"robosuite"``), or raise :class:`MissingExtraError` with the install hint."""
    return extras.require(module, "lift", "task=lift (robosuite 1.4.1, mujoco 2.3.7, h5py)")


__all__ = ["INSTALL_HINT", "MissingExtraError", "require"]
