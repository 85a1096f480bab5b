"""Episodes through a :class:`~para_policy.controller.Controller`: asynchronous inference and real-time chunking.

The batched loop (:func:`~.rollout.run_rollouts`) waits for every chunk, as DiffusionPolicy's
evaluation does; a robot that keeps moving while the next chunk is computed sees something
else. Here each episode runs through the Controller a robot loop would run
(``controller.mode=async|rtc``), so the evaluator measures that schedule itself, not a copy:

* **Steps clock** (``controller.clock=steps``): the Controller computes a chunk at once and
  counts it ready ``delay_steps`` control steps later, so the episode is what a robot with
  exactly that latency would do, on any machine, deterministically.
* **Wall clock** (``controller.clock=wall``): the env is stepped every ``1 / control_hz``
  seconds on a fixed grid (sleep to the next tick, never drift; a late step runs at once and
  the grid stays), the Controller samples on its worker thread and measures its delay from
  this machine's latency; stalls (``act`` waiting for a chunk) are counted. Not deterministic.
* **Same noise as the batched loop.** Each chunk's ``x_T`` and step noise come from
  :func:`~.rollout.call_noise` keyed by ``(noise seed, episode seed, chunk index)``, as in the
  batched loop (:class:`KeyedNoisePolicy`), so the candidate and the baseline get the same
  noise stream, and ``rtc`` at delay 0 gives the batched loop's sync episodes.

One env and one Controller run the episodes one after another: every chunk is a batch-1
call either way (``num_envs`` does not apply). Records have the batched loop's fields plus
the Controller's statistics of the episode (:data:`CONTROLLER_FIELDS`).

**Served** (``controller.remote``, the candidate only): the episodes run through a
:class:`~para_policy.serving.client.RemoteController`, the same loop (both are a
:class:`~para_policy.chunk_loop.ChunkLoop`) with each chunk sampled by a policy server:
``'local'`` starts ``para-policy serve`` on loopback with the candidate's resolved sampler and the
run's inference settings (:func:`local_server`), ``'HOST:PORT'`` uses a running one. Each
episode's chunks get the keyed noise of its in-process episode (``key_noise``), so on the steps
clock a served episode is its in-process episode; the records add :data:`REMOTE_FIELDS`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch

from para_policy.chunk_loop import ChunkLoop, ControllerConfigError
from para_policy.controller import Controller
from para_policy.evaluation import rollout
from para_policy.evaluation.config import REMOTE_LOCAL, ControllerSettings, EvalConfigError, TaskSettings
from para_policy.evaluation.rollout import (
    ROLLOUT_STREAM,
    EpisodeSlot,
    call_noise,
    episode_record,
    render_frame,
    step_observation,
)
from para_policy.extras import MissingExtraError
from para_policy.policy import LowdimPolicy, PolicyOutput
from para_policy.samplers import SamplerConfig
from para_policy.serve import INFERENCE_DEFAULTS, parse_value
from para_policy.serving.client import PolicyClient, RemoteController, RemoteError
from para_policy.serving.launch import ServerProcess, ServerStartError, serve_command
from para_policy.serving.protocol import TOKEN_ENV

#: per-episode Controller statistics added to a record (``switch_discontinuity_*`` in the task's action unit);
#: ``idle_steps`` is None on the wall clock; the wall clock adds :data:`WALL_FIELDS`, and ``controller.extend_plan``
#: adds ``extended_steps``
CONTROLLER_FIELDS = ("stalls", "switches", "switch_discontinuity_mean", "switch_discontinuity_max", "steps_in_flight",
                     "idle_steps", "delay_used_mean", "delay_used_max")
WALL_FIELDS = ("late_steps", "stall_wait_ms_max", "chunk_latency_ms_p50", "chunk_latency_ms_max", "deadline_misses")
#: per-episode figures of a served episode (``controller.remote``): the chunk calls' round trip as the client saw
#: it, its part beyond the server's sampling time (encoding, network, queue), in ms; failed chunk calls, sessions
#: opened again, steps that repeated the last action while a chunk was late
REMOTE_FIELDS = ("round_trip_ms_p50", "round_trip_ms_p95", "overhead_ms_p50", "failures", "reconnects", "held_steps")
#: the local server's log (its stderr and stdout) in the run folder
SERVER_LOG = "policy_server.log"
#: seconds to wait for a local server's listening line (it imports torch and loads the checkpoint first)
SERVER_START_TIMEOUT_S = 180.0
#: seconds a local server gets to stop after SIGTERM before it is killed
SERVER_STOP_TIMEOUT_S = 15.0
#: each chunk call's deadline by clock: the steps clock waits for every chunk (a timeout would end the episode
#: where in process it runs on), the wall clock gives a hung server that long before the chunk counts as failed
REMOTE_TIMEOUT_S = {"steps": 300.0, "wall": 5.0}
#: the metadata call that checks a server before the episodes
PROBE_TIMEOUT_S = 15.0


class KeyedNoisePolicy:
    """The policy as the Controller sees it, with each chunk's noise keyed as the batched loop keys it.

    The Controller draws its noise from one generator per run, so its k-th chunk would get
    noise that depends on what came before. This wrapper replaces it by
    ``call_noise(key=(ROLLOUT_STREAM, noise_seed, episode_seed, k))``, the batched loop's noise
    for the same chunk, and records each call's observation history and warm-start guess (the
    inputs of the latency pass). Everything else is the policy's (attribute lookups pass through).
    """

    def __init__(self, policy: LowdimPolicy, spec: SamplerConfig, noise_seed: int, record: bool = False) -> None:
        self._policy = policy
        self._schedule = policy.schedule_for(spec)
        self._sample_shape = tuple(policy.trajectory_shape(1)[1:])
        self._noise_seed, self._record = int(noise_seed), record
        self.begin(-1)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_policy":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._policy, name)

    def begin(self, episode_seed: int) -> None:
        """A new episode: chunk indices count from 0 again; the recorded inputs are cleared."""
        self._episode_seed, self.chunk = int(episode_seed), 0
        self.inputs: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []

    def predict_action(self, obs_dict: Mapping[str, torch.Tensor], *, generator: torch.Generator | None = None,
                       guess: torch.Tensor | None = None, **kwargs: Any) -> PolicyOutput:
        """``policy.predict_action`` on ``{key: (1, To, *shape)}`` with this chunk's keyed ``x_T`` and noise."""
        del generator  # replaced by the keyed noise
        key = (ROLLOUT_STREAM, self._noise_seed, self._episode_seed, self.chunk)
        x_T, noise = call_noise(self._schedule, self._sample_shape, [key], self._policy.device,
                                self._policy.sample_dtype)
        self.chunk += 1
        if self._record:
            history = {k: v[0].detach().cpu().numpy().astype(np.float32) for k, v in obs_dict.items()}
            self.inputs.append((history, None if guess is None else guess[0].detach().cpu().numpy()))
        return self._policy.predict_action(obs_dict, x_T=x_T, noise=noise, guess=guess, **kwargs)


def make_controller(policy: LowdimPolicy | KeyedNoisePolicy, spec: SamplerConfig, settings: ControllerSettings,
                    seed: int = 0) -> Controller:
    """The Controller ``settings`` describe (:meth:`ControllerSettings.controller_config`), sampling with
    ``spec`` (whose window is already resolved).

    ``settings.deadline_ms`` applies to Picard samplers only: the sequential baseline runs every step.
    """
    return Controller(policy, sampler=spec, config=settings.controller_config(seed=seed, with_deadline=spec.iterative))


def controller_fields(stats: Mapping[str, Any], late_steps: int | None = None) -> dict[str, Any]:
    """An episode's :data:`CONTROLLER_FIELDS` (wall clock: and :data:`WALL_FIELDS`) from ``Controller.stats()``."""
    jump, delay = stats["switch_discontinuity"], stats["delay_used"]
    out: dict[str, Any] = {
        "stalls": int(stats["stalls"]),
        "switches": int(stats["switches"]),
        "switch_discontinuity_mean": jump["mean"],
        "switch_discontinuity_max": jump["max"],
        "steps_in_flight": int(stats["steps_in_flight"]),
        "idle_steps": None if stats["idle_steps"] is None else int(stats["idle_steps"]),
        "delay_used_mean": delay["mean"],
        "delay_used_max": None if delay["max"] is None else int(delay["max"]),
    }
    if stats.get("extend_plan"):
        out["extended_steps"] = int(stats["extended_steps"])
    if stats["clock"] == "wall":
        out.update(late_steps=late_steps, stall_wait_ms_max=stats["stall_wait_ms"]["max"],
                   chunk_latency_ms_p50=stats["chunk_latency_ms"]["p50"],
                   chunk_latency_ms_max=stats["chunk_latency_ms"]["max"],
                   deadline_misses=int(stats["deadline_misses"]))
    return out


def wait_for_tick(next_tick: float, period_s: float) -> tuple[float, bool]:
    """Sleep until ``next_tick`` (a ``perf_counter`` instant on the ``t0 + k * period_s`` grid).

    Returns ``(the tick after it, whether this one was missed)``. A missed tick is not made
    up by running steps back to back: the step runs at once and the grid resumes at the next
    tick after now, so the loop never drifts and never bursts.
    """
    now = time.perf_counter()
    if now < next_tick:
        time.sleep(next_tick - now)
        return next_tick + period_s, False
    missed = math.floor((now - next_tick) / period_s)
    return next_tick + (missed + 1) * period_s, True


# ---- a policy server for the candidate (controller.remote) -----------------------------------

@dataclass(frozen=True)
class RemoteEndpoint:
    """Where the candidate's chunks are sampled: a server's ``'host:port'`` and the token to send (None: the
    client reads ``$PARA_POLICY_TOKEN``); ``local``: a server this run started (:func:`local_server`)."""

    address: str
    token: str | None = None
    local: bool = False


def override_text(value: Any) -> str:
    """A sampler or inference value as ``para-policy serve`` parses it back (:func:`para_policy.serve.parse_value`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def server_overrides(spec: SamplerConfig, inference: Mapping[str, Any]) -> list[str]:
    """``spec`` (resolved: a window, not ``auto``) and the run's inference settings as ``para-policy serve``'s
    ``sampler=NAME sampler.KEY=VALUE ... inference.KEY=VALUE``, so the server samples as the candidate in process.

    ``inference`` is the run's applied settings (``backend`` absent: eager). A value the command line cannot
    carry back unchanged is refused, naming its key, rather than served differently.
    """
    d = spec.as_dict()
    values = {"scheduler": d["scheduler"], "num_inference_steps": d["num_inference_steps"],
              "solver_order": d["solver_order"], "warm_start": d["warm_start"], **d["options"]}
    out = [f"sampler={spec.name}"]
    for key, value in values.items():
        if value is None:
            continue
        value = value.item() if isinstance(value, np.generic) else value  # numpy's repr is not a number
        text = override_text(value)
        if parse_value(text) != value or type(parse_value(text)) is not type(value):
            raise EvalConfigError(f"controller.remote=local: sampler.{key}={value!r} cannot be passed to the policy "
                                  "server on its command line unchanged; run the candidate in process (remote=null)")
        out.append(f"sampler.{key}={text}")
    settings = {**INFERENCE_DEFAULTS, "backend": "eager", **inference}
    return out + [f"inference.{k}={override_text(settings[k])}" for k in INFERENCE_DEFAULTS]


def server_command(checkpoint: Path, spec: SamplerConfig, opts: Mapping[str, Any]) -> list[str]:
    """The command line of a local server for the candidate (:func:`~para_policy.serving.launch.serve_command`):
    the run's device, threads (``opts``: the runner's checked settings) and :func:`server_overrides`."""
    options = ["--device", str(opts.get("device", "cpu"))]
    if opts.get("threads"):
        options += ["--threads", str(opts["threads"])]
    return serve_command(checkpoint, server_overrides(spec, opts.get("inference") or {}), options)


@contextlib.contextmanager
def local_server(command: Sequence[str], log_path: Path, timeout_s: float = SERVER_START_TIMEOUT_S
                 ) -> Iterator[RemoteEndpoint]:
    """Run ``command`` (:func:`server_command`) as a child process for the ``with`` block: its endpoint.

    :class:`~para_policy.serving.launch.ServerProcess`: a fresh random token in the child's environment
    (only this run talks to it), its output in ``log_path``, stopped at the end whatever happened in the
    block; a server that does not start is an :class:`EvalConfigError` with its log's last lines.
    """
    try:
        server = ServerProcess(command, log_path=log_path, start_timeout_s=timeout_s,
                               stop_timeout_s=SERVER_STOP_TIMEOUT_S)
    except ServerStartError as e:
        raise EvalConfigError(f"controller.remote=local: {e}") from None
    try:
        yield RemoteEndpoint(server.address, server.token, local=True)
    finally:
        server.stop()


@contextlib.contextmanager
def remote_endpoint(settings: ControllerSettings, checkpoint: Path, spec: SamplerConfig, opts: Mapping[str, Any],
                    run_dir: Path) -> Iterator[RemoteEndpoint | None]:
    """The candidate's server for the ``with`` block: None in process, a local server (started now, its log
    :data:`SERVER_LOG` in ``run_dir``, stopped at the end) or the running one at ``settings.remote``."""
    if settings.remote is None:
        yield None
    elif settings.remote != REMOTE_LOCAL:
        yield RemoteEndpoint(settings.remote)
    else:
        log_path = run_dir / SERVER_LOG
        with local_server(server_command(checkpoint, spec, opts), log_path) as endpoint:
            print(f"controller.remote=local: policy server at {endpoint.address} (log: {log_path})")
            yield endpoint


def served_mismatch(meta: Mapping[str, Any], policy: LowdimPolicy, spec: SamplerConfig) -> str | None:
    """What keeps a server (its ``Metadata``) from serving the candidate ``spec`` of ``policy``, or None."""
    served = (meta.get("sampler") or {}).get("name")
    if served != spec.name:
        return (f"it serves sampler {served!r} and the candidate is {spec.name!r}: start the server with "
                f"sampler={spec.name} or evaluate sampler={served}")
    shapes = {k: tuple(v["shape"]) for k, v in (meta.get("observations") or {}).items()}
    wanted = {k: tuple(v) for k, v in policy.observation_shapes().items()}
    if shapes != wanted or meta.get("n_action_steps") != policy.n_action_steps:
        return (f"its policy takes {shapes} and runs {meta.get('n_action_steps')} actions per chunk, the checkpoint's "
                f"takes {wanted} and runs {policy.n_action_steps}: another policy")
    return None


def connect_remote(endpoint: RemoteEndpoint, policy: LowdimPolicy, spec: SamplerConfig,
                   settings: ControllerSettings, noise_seed: int) -> RemoteController:
    """A :class:`RemoteController` on ``endpoint`` with ``settings``, after checking the server serves ``spec``.

    Every refusal is an :class:`EvalConfigError` naming ``controller.remote``: no server there, a wrong token,
    the ``[client]`` extra missing, another sampler or another policy's shapes.
    """
    where = f"controller.remote={settings.remote}"
    probe = None
    try:
        probe = PolicyClient(endpoint.address, token=endpoint.token, timeout_s=PROBE_TIMEOUT_S)
        problem = served_mismatch(probe.metadata(), policy, spec)
        if problem is not None:
            raise EvalConfigError(f"{where}: the policy server at {endpoint.address} does not serve the candidate: "
                                  f"{problem}")
        return RemoteController(endpoint.address, token=endpoint.token, timeout_s=REMOTE_TIMEOUT_S[settings.clock],
                                config=settings.controller_config(seed=noise_seed, with_deadline=spec.iterative))
    except MissingExtraError as e:
        raise EvalConfigError(f"{where}: {e}") from None
    except RemoteError as e:
        hint = f" (the token comes from ${TOKEN_ENV})" if e.code == "UNAUTHENTICATED" else ""
        raise EvalConfigError(f"{where}: the policy server at {endpoint.address} refused or did not answer: "
                              f"{e}{hint}") from None
    except ControllerConfigError as e:
        raise EvalConfigError(f"controller.{e} (the server's sampler)") from None
    finally:
        if probe is not None:
            probe.close()


def remote_fields(stats: Mapping[str, Any]) -> dict[str, Any]:
    """A served episode's :data:`REMOTE_FIELDS` from ``RemoteController.stats()``."""
    return {"round_trip_ms_p50": stats["round_trip_ms"]["p50"], "round_trip_ms_p95": stats["round_trip_ms"]["p95"],
            "overhead_ms_p50": stats["overhead_ms"]["p50"], "failures": int(stats["failures"]),
            "reconnects": int(stats["reconnects"]), "held_steps": int(stats["held_steps"])}


# ---- the episodes ------------------------------------------------------------------------

def _run_episode(env: gymnasium.Env, controller: ChunkLoop, slot: EpisodeSlot, shapes: Mapping[str, tuple[int, ...]],
                 max_steps: int, period: float | None) -> tuple[BaseException | None, int]:
    """Step ``slot``'s episode through ``controller`` to its end; ``(the exception it raised or None, late steps)``.

    On the wall clock (``period`` in seconds) each step waits for its tick (:func:`wait_for_tick`).
    The Controller is reset at the end either way: a chunk still in flight is waited for and dropped.
    """
    late = 0
    try:
        obs, _ = env.reset(seed=int(slot.seed))
        render_frame(slot)
        next_tick = time.perf_counter() + (period or 0.0)
        while True:
            action = controller.act(step_observation(obs, shapes))
            obs, reward, terminated, truncated, info = env.step(action)
            slot.steps += 1
            slot.rewards.append(float(reward))
            slot.success |= bool(info.get("is_success", False))
            render_frame(slot)
            if terminated or truncated or slot.steps >= max_steps:
                break
            if period is not None:
                next_tick, missed = wait_for_tick(next_tick, period)
                late += missed
    except Exception as e:  # recorded, the evaluation goes on
        return e, late
    finally:
        controller.reset()
    return None, late


@dataclass
class _Loop:
    """The loop the episodes run through: an in-process Controller over ``keyed``, or a RemoteController
    (``keyed`` None) whose chunks the server samples with the same keyed noise."""

    controller: ChunkLoop
    keyed: KeyedNoisePolicy | None
    noise_seed: int

    def begin(self, seed: int) -> None:
        """A new episode of env seed ``seed``: fresh queue and statistics, chunk indices from 0."""
        self.controller.reset()
        self.controller.reset_stats()
        if self.keyed is not None:
            self.keyed.begin(seed)
            return
        self.controller.key_noise((ROLLOUT_STREAM, int(self.noise_seed), int(seed)))

    def record(self, slot: EpisodeSlot, error: BaseException | None, late: int | None,
               record_obs: bool) -> dict[str, Any]:
        """The episode's record: the batched loop's fields over the chunks that took over the queue, plus
        :data:`CONTROLLER_FIELDS` (``late``: the wall clock's late steps, None on the steps clock), plus
        :data:`REMOTE_FIELDS` when served."""
        looped = [r for r in self.controller.records if r.start_step is not None]
        slot.chunk, slot.rounds = len(looped), [int(r.rounds) for r in looped]
        inputs = self.keyed.inputs[: len(looped)] if self.keyed is not None else []
        slot.chunk_obs = [o for o, _ in inputs]
        slot.chunk_guess = [g for _, g in inputs]
        rec = episode_record(slot, error, record_obs and bool(inputs))
        stats = self.controller.stats()
        rec.update(controller_fields(stats, late))
        if self.keyed is None:
            rec.update(remote_fields(stats))
        return rec


def _open_loop(policy: LowdimPolicy, spec: SamplerConfig, settings: ControllerSettings, noise_seed: int,
               record_obs: bool, remote: RemoteEndpoint | None) -> _Loop:
    """The in-process loop, or the served one when ``remote`` is given (then nothing is recorded for latency)."""
    if remote is None:
        keyed = KeyedNoisePolicy(policy, spec, noise_seed, record=record_obs)
        return _Loop(make_controller(keyed, spec, settings, seed=noise_seed), keyed, noise_seed)
    if record_obs:
        print(f"controller.remote={settings.remote}: the server samples the candidate's chunks, so their inputs are "
              "not recorded and the batch-1 latency table is left out (the round trips are reported instead)")
    controller = connect_remote(remote, policy, spec, settings, noise_seed)
    try:
        warm_up(controller)
    except BaseException:
        controller.close()
        raise
    return _Loop(controller, None, noise_seed)


def warm_up(remote: RemoteController) -> None:
    """One untimed chunk on zero observations before the episodes: a server's first chunk pays its lazy set-up
    (an ONNX Runtime session, allocations), which would otherwise count as the first episode's round trip and,
    on the wall clock, inflate the measured delay. Its noise is the session's and it is forgotten by ``reset``."""
    zeros = {k: np.zeros((remote.n_obs_steps, *shape), np.float32) for k, shape in remote.shapes.items()}
    try:
        remote.predict_chunk(zeros)
    except RemoteError as e:
        raise EvalConfigError(f"controller.remote: the policy server at {remote.address} failed a first chunk: "
                              f"{e}") from None
    remote.reset()
    remote.reset_stats()


def run_controller_rollouts(
    policy: LowdimPolicy,
    spec: SamplerConfig,
    task: TaskSettings,
    seeds: Sequence[int],
    settings: ControllerSettings,
    *,
    noise_seed: int = 0,
    video_seed: int | None = None,
    video_size: int = 256,
    record_obs: bool = False,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    env_factory: Callable[..., gymnasium.Env] | None = None,
    progress: bool = True,
    desc: str = "controller",
    remote: RemoteEndpoint | None = None,
) -> tuple[list[dict[str, Any]], list[np.ndarray] | None]:
    """Run one episode per seed through one Controller with ``settings``, one episode at a time.

    Args are :func:`~.rollout.run_rollouts`'s (``num_envs`` aside), plus ``settings``: the mode,
    delay and clock. ``record_obs`` keeps the observation history and warm-start guess of each
    chunk that took over the queue (``chunk_obs``, ``chunk_guess``), as the batched loop does.
    ``remote``: run through a :class:`RemoteController` on that server instead (``record_obs`` is
    then skipped: the chunks' inputs stay on the server).
    Returns:
        ``(records in seed order, frames of the video episode or None)``. A record has the
        batched loop's fields (``n_chunks`` and ``rounds_per_chunk`` count the chunks that
        took over the queue; a chunk still in flight when the episode ends is dropped) and
        :data:`CONTROLLER_FIELDS` (served: and :data:`REMOTE_FIELDS`); an episode that raised
        has ``error`` and ``traceback``.
    """
    from tqdm.auto import tqdm

    env_factory = env_factory or rollout.make_task_env  # looked up now: tests swap it
    shapes = policy.observation_shapes()
    loop = _open_loop(policy, spec, settings, noise_seed, record_obs, remote)
    record_obs = record_obs and remote is None
    period = settings.period_s
    records: dict[int, dict[str, Any]] = {}
    video: list[np.ndarray] | None = None
    env, bar = None, None
    try:
        env = env_factory(task, render=video_seed is not None, video_size=video_size)
        bar = tqdm(total=len(seeds), desc=desc, unit="ep", disable=not progress, leave=False)
        for seed in seeds:
            slot = EpisodeSlot(env, seed=int(seed), started=time.perf_counter(), active=True)
            slot.frames = [] if seed == video_seed else None
            loop.begin(seed)
            error, late = _run_episode(env, loop.controller, slot, shapes, task.max_steps, period)
            rec = records[int(seed)] = loop.record(slot, error, late if period is not None else None, record_obs)
            if slot.frames is not None and error is None:
                video = slot.frames
            bar.update(1)
            ok = [r for r in records.values() if r["error"] is None]
            bar.set_postfix(score=f"{np.mean([r['max_reward'] for r in ok]):.3f}" if ok else "-",
                            stalls=sum(r["stalls"] for r in records.values()))
            if on_episode is not None:
                on_episode(rec)
    finally:
        if bar is not None:
            bar.close()
        loop.controller.close()  # a served loop also ends its session and closes its channel
        if env is not None:
            with contextlib.suppress(Exception):
                env.close()
    order = {int(s): i for i, s in enumerate(seeds)}
    return [records[s] for s in sorted(records, key=order.__getitem__)], video
