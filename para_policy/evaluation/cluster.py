"""One evaluation's episodes spread over Ray workers: ``python eval.py +cluster=ray cluster.workers=N``.

The evaluator (:func:`~para_policy.evaluation.runner.evaluate`) normally rolls out every episode
in its own process. With a ``cluster`` config (``configs/cluster/ray.yaml``) it hands the
episodes of each sampler (candidate and baseline alike) to :class:`ShardedRollouts` instead:

* **Workers.** ``cluster.workers`` Ray actors, each loading the checkpoint once (with the run's
  ``device``, ``inference`` options and ``threads``), then rolling out the seeds it is given
  with the very loop a single process runs (:func:`~.episodes.roll_out_seeds`: the batched loop, or
  one Controller per episode in the ``async`` / ``rtc`` modes), with ``num_envs`` envs at a time.
* **Units of work.** The seeds still to run are cut into units of ``cluster.episodes_per_task``
  consecutive seeds (default: ``num_envs``, one batch), handed to whichever worker is idle.
  A unit's records come back when the worker returns it; each goes to the runner's
  ``on_episode`` (so ``progress.json`` is written after every returned episode, and
  ``resume_dir=`` works as in a single process), in seed order within the unit.
* **Dead workers.** A worker that dies (killed, out of memory, its node lost) loses the unit
  it was running and nothing else: no record of that unit was taken, the unit goes back to the
  front of the queue, and a fresh worker replaces the dead one (at most ``cluster.max_restarts``
  replacements over the run). So every seed is recorded exactly once. An exception *inside* a
  worker's rollout is not a death: episodes that raise are recorded as failed episodes, as in
  one process, and anything else stops the run with the worker's traceback.
* **Same results.** The noise of every policy call is drawn from (noise seed, episode seed,
  chunk index) only (:mod:`.rollout`), so an episode does not depend on the worker or on the
  other episodes, and the runner sorts the records by seed: the same seeds give the same
  ``results.json`` rewards as a single process. Bit for bit with ``num_envs=1`` (every call is
  batch 1; tested); with a larger batch up to the float summation order of a differently
  composed batch, as between any two ``num_envs``.
* **Latency stays in one place.** The runner times batch-1 calls in its own process, on the
  chunk observations the workers recorded, as without a cluster.

``cluster.address: null`` starts a local Ray instance (no dashboard, ``workers x cpus_per_worker``
CPUs, asked for on 127.0.0.1: on Linux Ray keeps it there only with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment) and stops it at the end; ``auto``
or ``<head>:6379`` joins a running cluster, whose nodes need this package installed and the
checkpoint at the same path.
A run inside a Ray task (e.g. a job of ``hydra/launcher=ray_local``) uses the Ray it is in.
"""

from __future__ import annotations

import difflib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from para_policy.evaluation.config import ControllerSettings, EvalConfigError, TaskSettings, checked_int
from para_policy.evaluation.episodes import load_checked_policy, roll_out_seeds
from para_policy.extras import MissingExtraError, require
from para_policy.samplers import SamplerConfig

#: the keys of ``configs/cluster/ray.yaml``
CLUSTER_KEYS = ("name", "workers", "address", "cpus_per_worker", "episodes_per_task", "max_restarts")
CLUSTER_NAMES = ("ray",)
#: the local instance listens here only
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ClusterSettings:
    """``cfg.cluster``, checked.

    workers: Ray actors (>= 1), each holding one copy of the policy.
    address: None (start a local instance, asked for on 127.0.0.1), ``'auto'``, ``'<host>:<port>'``
        or ``'ray://<host>:10001'`` (an existing cluster: ``ray.init(address=...)``).
    cpus_per_worker: CPUs each actor reserves; also its torch threads when ``threads`` is null.
    episodes_per_task: seeds per unit of work (None: ``num_envs``).
    max_restarts: dead workers replaced over the run before it gives up.
    """

    workers: int
    address: str | None = None
    cpus_per_worker: int = 1
    episodes_per_task: int | None = None
    max_restarts: int = 3


def cluster_settings(cfg: Mapping[str, Any]) -> ClusterSettings | None:
    """Read and check ``cfg.cluster`` (None when absent: the single-process evaluator).

    Raises:
        EvalConfigError: an unknown key or cluster name, ``workers < 1``, a bad address, ..., or Ray
            not installed (the ``[cluster]`` extra).
    """
    node = cfg.get("cluster")
    if node is None:
        return None
    if not isinstance(node, Mapping):
        raise EvalConfigError(f"cluster must be a mapping of options (+cluster=ray), got {node!r}")
    unknown = sorted(set(node) - set(CLUSTER_KEYS))
    if unknown:
        raise EvalConfigError(f"cluster has unknown keys {unknown}; known: {sorted(CLUSTER_KEYS)}")
    name = node.get("name", "ray")
    if name not in CLUSTER_NAMES:
        near = difflib.get_close_matches(str(name), CLUSTER_NAMES, n=1)
        raise EvalConfigError(f"cluster.name must be {' or '.join(map(repr, CLUSTER_NAMES))}, got {name!r}"
                              + (f" (did you mean {near[0]!r}?)" if near else ""))
    if node.get("workers") is None:
        raise EvalConfigError("cluster.workers is not set: give the number of Ray workers, e.g. cluster.workers=2")
    address = node.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise EvalConfigError(f"cluster.address must be null (a local Ray instance), 'auto', '<host>:<port>' or "
                              f"'ray://<host>:<port>', got {address!r}")
    per_task = node.get("episodes_per_task")
    settings = ClusterSettings(
        workers=checked_int(node.get("workers"), "cluster.workers", 1),
        address=None if address is None else address.strip(),
        cpus_per_worker=checked_int(node.get("cpus_per_worker", 1), "cluster.cpus_per_worker", 1),
        episodes_per_task=None if per_task is None else checked_int(per_task, "cluster.episodes_per_task", 1),
        max_restarts=checked_int(node.get("max_restarts", 3), "cluster.max_restarts", 0),
    )
    import_ray()  # not installed: the install command, before anything is loaded
    return settings


def import_ray() -> Any:
    """``ray``, or :class:`EvalConfigError` with the install command."""
    try:
        return require("ray", "cluster", "cluster=ray (an evaluation's episodes on Ray workers)")
    except MissingExtraError as e:
        raise EvalConfigError(str(e)) from None


class RolloutWorker:
    """A Ray actor's state: the policy, loaded once; :meth:`roll_out` runs seeds with it."""

    def __init__(self, checkpoint: str, task: TaskSettings, device: str, trust_pickle: bool,
                 inference: dict[str, Any], threads: int) -> None:
        import torch

        from para_policy.inference import configure_inference

        torch.set_num_threads(threads)
        self.policy = load_checked_policy(Path(checkpoint), task, device, trust_pickle)
        configure_inference(self.policy, **inference)

    def roll_out(self, spec: SamplerConfig, task: TaskSettings, seeds: list[int], ctl: ControllerSettings,
                 opts: dict[str, Any], role: str, video_seed: int | None
                 ) -> tuple[list[dict[str, Any]], list[np.ndarray] | None]:
        """The records of ``seeds`` (in the order they finished) and the video frames, if asked for."""
        records: list[dict[str, Any]] = []
        frames = roll_out_seeds(self.policy, spec, task, list(seeds), ctl, {**opts, "progress": False}, role=role,
                                on_episode=records.append, video_seed=video_seed)
        return records, frames


class ShardedRollouts:
    """:func:`~.episodes.roll_out_seeds` on Ray workers: call it like ``roll_out_seeds``, then :meth:`close`.

    Ray is started, and the workers made, on the first call (a run whose episodes are all
    resumed starts nothing). ``restarts`` counts the workers replaced after dying.
    """

    def __init__(self, settings: ClusterSettings, *, checkpoint: Path, task: TaskSettings, opts: dict[str, Any],
                 trust_pickle: bool = False) -> None:
        self.settings = settings
        self._worker_args = (str(checkpoint), task, opts["device"], bool(trust_pickle), dict(opts["inference"]),
                             opts["threads"] or settings.cpus_per_worker)
        self._ray: Any = None
        self._started_ray = False
        self._actor_class: Any = None
        self.actors: list[Any] = []
        self.restarts = 0

    # ---- Ray and the workers ---------------------------------------------------------------
    def _start(self) -> None:
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": self.settings.address, "log_to_driver": True}
            if self.settings.address is None:  # a local instance: no dashboard, sized for the workers
                kw.update(num_cpus=self.settings.workers * self.settings.cpus_per_worker, include_dashboard=False,
                          _node_ip_address=LOOPBACK)
            t0 = time.perf_counter()
            ray.init(**kw)
            self._started_ray = True
            where = "a local Ray instance" if self.settings.address is None else f"Ray at {self.settings.address}"
            print(f"cluster: started {where} in {time.perf_counter() - t0:.1f} s")
        self._actor_class = ray.remote(num_cpus=self.settings.cpus_per_worker, max_restarts=0)(RolloutWorker)
        self.actors = [self._new_actor() for _ in range(self.settings.workers)]

    def _new_actor(self) -> Any:
        return self._actor_class.remote(*self._worker_args)

    def close(self) -> None:
        """Stop the workers, and the Ray instance if this object started it."""
        if self._ray is None:
            return
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:  # already dead
                pass
        self.actors = []
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
        self._ray = None

    # ---- the runner's hook -------------------------------------------------------------------
    def __call__(self, policy: Any, spec: SamplerConfig, task: TaskSettings, seeds: list[int],
                 ctl: ControllerSettings, opts: dict[str, Any], *, role: str,
                 on_episode: Callable[[dict[str, Any]], None], video_seed: int | None) -> list[np.ndarray] | None:
        """Roll out ``seeds`` on the workers (``policy``, the runner's copy, is not used); return the video frames."""
        from tqdm.auto import tqdm

        if self._ray is None:
            self._start()
        ray = self._ray
        size = self.settings.episodes_per_task or opts["num_envs"]
        seeds = list(seeds)
        order = {s: i for i, s in enumerate(seeds)}
        units = deque(seeds[i: i + size] for i in range(0, len(seeds), size))
        idle = list(self.actors)
        in_flight: dict[Any, tuple[Any, list[int]]] = {}
        frames = None
        bar = tqdm(total=len(seeds), desc=f"{role} ({spec.name}, {len(self.actors)} Ray workers)", unit="ep",
                   disable=not opts["progress"], leave=False)
        try:
            while units or in_flight:
                while units and idle:
                    actor, unit = idle.pop(0), units.popleft()
                    ref = actor.roll_out.remote(spec, task, unit, ctl, opts, role,
                                                video_seed if video_seed in unit else None)
                    in_flight[ref] = (actor, unit)
                    self._dispatched(actor, unit)
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, unit = in_flight.pop(ref)
                try:
                    records, unit_frames = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    units.appendleft(unit)  # nothing of it was recorded: it runs again, once
                    replacement = self._replace(actor, unit, e)
                    if replacement is not None:
                        idle.append(replacement)
                    continue
                for rec in sorted(records, key=lambda r: order[r["seed"]]):
                    on_episode(rec)
                    bar.update(1)
                if unit_frames:
                    frames = unit_frames
                idle.append(actor)
        finally:
            bar.close()
        return frames

    def _replace(self, actor: Any, unit: list[int], error: BaseException) -> Any:
        """A worker died running ``unit``: drop it and return a new one (None when no more may be started)."""
        if actor in self.actors:
            self.actors.remove(actor)
        try:  # one that is only unreachable must not come back and hold a CPU
            self._ray.kill(actor)
        except Exception:
            pass
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.restarts >= self.settings.max_restarts:
            if not self.actors:
                raise RuntimeError(f"cluster: every Ray worker died (the last running seeds {unit}: {reason}); "
                                   f"{self.restarts} replaced already "
                                   f"(cluster.max_restarts={self.settings.max_restarts})") from error
            print(f"cluster: a Ray worker died running seeds {unit} ({reason}); they run again on the "
                  f"{len(self.actors)} left (cluster.max_restarts={self.settings.max_restarts} reached)")
            return None
        self.restarts += 1
        replacement = self._new_actor()
        self.actors.append(replacement)
        print(f"cluster: a Ray worker died running seeds {unit} ({reason}); they run again, on a new worker "
              f"({self.restarts}/{self.settings.max_restarts} replaced)")
        return replacement

    def _dispatched(self, actor: Any, unit: list[int]) -> None:
        """Called as each unit is handed to a worker (a seam for tests: they kill the worker here)."""
