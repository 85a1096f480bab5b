"""The evaluation run: check config, roll out each sampler, time batch-1 calls, report.

``evaluate(cfg, output_dir)`` is what ``python eval.py`` runs (``eval.py`` only hands it
Hydra's config and run folder), and what tests call directly. In order:

1. check every config value and the checkpoint against the task (``EvalConfigError``
   before any env is stepped): :func:`_checked_run`;
2. roll out the chosen sampler (role ``candidate``) and, with ``compare=true``, the
   sequential baseline on the same schedule (role ``baseline``): same env seeds, same
   model, same noise per (episode, chunk), same ``controller`` settings (``sync``: the
   batched loop; ``async`` / ``rtc`` or the wall clock: one Controller per env,
   :mod:`.realtime`; ``controller.remote``: the candidate's through a policy server, started
   here for ``local``); progress saved to ``progress.json`` after every episode, so
   ``resume_dir=<earlier run dir>`` continues an interrupted run: :func:`_roll_out_role`;
3. time batch-1 calls of both samplers on chunk observations of the candidate's
   rollouts, with the same noise: latency and faithfulness (for image tasks the
   observations wait in ``chunk_obs/*.npz`` side files, not in the JSON files):
   :func:`_time_latency`;
4. write ``results.json``, ``summary.md``, plots and first-episode videos into the run
   folder, log them to W&B, print the comparison table: :func:`_results`, :func:`_report`.

From the end of the checks to the end of the run the folder holds ``eval.lock``
(:func:`lock_run_folder`), so two runs never write one folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from para_policy.evaluation.cluster import ClusterSettings, ShardedRollouts, cluster_settings
from para_policy.evaluation.config import (
    FINGERPRINT_PREFIX,
    FLAT_KEY,
    ControllerSettings,
    EvalConfigError,
    TaskSettings,
    baseline_config,
    checked_device,
    checked_int,
    controller_settings,
    file_fingerprint,
    resolve_path,
    sampler_config,
    spec_dict,
    task_settings,
)
from para_policy.evaluation.episodes import check_env, load_checked_policy, read_progress, roll_out_seeds
from para_policy.evaluation.latency import (
    faithfulness,
    latency_summary,
    machine_info,
    select_observations,
    time_samplers,
)
from para_policy.evaluation.realtime import remote_endpoint
from para_policy.evaluation.report import (
    CHUNK_OBS_DIR,
    SCHEMA_VERSION,
    comparison,
    format_markdown,
    format_table,
    lookup,
    make_plots,
    read_chunk_obs,
    summarize_controller,
    summarize_episodes,
    write_chunk_obs,
    write_json,
    write_text,
    write_video,
)
from para_policy.evaluation.rollout import make_task_env, stack_history, step_observation
from para_policy.evaluation.wandb_logger import NullLogger, make_logger
from para_policy.inference import check_inference_options, configure_inference
from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig
from para_policy.window import tuned_spec

PROGRESS_FILE = "progress.json"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
#: held by the run writing the folder (:func:`lock_run_folder`): JSON ``{pid, host, started}``
LOCK_FILE = "eval.lock"

# baseline rollouts already run in this process (a Hydra multirun sweeps the candidate's
# options; the sequential baseline is the same in every job), keyed by their fingerprint
_BASELINE_CACHE: dict[str, tuple[list[dict[str, Any]], Path | None]] = {}


#: the top-level keys of the eval config (configs/eval.yaml; ``inference`` is added with +inference.*)
KNOWN_KEYS = frozenset({"task", "sampler", "logger", "checkpoint", "checkpoint_trust", "device", "threads", "seed",
                        "compare", "num_envs", "progress", "latency", "video", "resume_dir", "inference",
                        "controller", "cluster"})


def _eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """The evaluator's own keys, checked."""
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise EvalConfigError(f"unknown config keys {unknown} (a typo, or +key=value of a key eval.py does not "
                              f"read); known: {sorted(KNOWN_KEYS)}")
    for key in ("latency", "video", "inference", "logger"):
        node = cfg.get(key)
        if node is not None and not isinstance(node, (DictConfig, dict)):
            raise EvalConfigError(f"{key} must be a mapping of options, got {node!r}")
    lat = cfg.get("latency") or {}
    video = cfg.get("video") or {}
    threads = cfg.get("threads")
    inference = dict(cfg.get("inference") or {})
    unknown = sorted(set(inference) - {"compile", "precision", "cuda_graphs", "backend"})
    if unknown:
        raise EvalConfigError(f"inference has unknown keys {unknown}; "
                              "known: ['backend', 'compile', 'cuda_graphs', 'precision']")
    inference = {"compile": inference.get("compile") or False, "precision": inference.get("precision") or "fp32",
                 "cuda_graphs": bool(inference.get("cuda_graphs") or False),
                 "backend": inference.get("backend") or "default"}  # resolved by _configure_inference
    try:
        check_inference_options(**inference)
    except ValueError as e:
        raise EvalConfigError(f"inference: {e}") from None
    return {
        "compare": bool(cfg.get("compare", True)),
        "num_envs": checked_int(cfg.get("num_envs", 8), "num_envs", 1),
        "seed": checked_int(cfg.get("seed", 0), "seed", 0),
        "device": checked_device(cfg.get("device", "cpu")),
        "threads": None if threads is None else checked_int(threads, "threads", 1),
        "latency_calls": checked_int(lat.get("calls", 50), "latency.calls", 0),
        "latency_warmup": checked_int(lat.get("warmup", 3), "latency.warmup", 0),
        "video": bool(video.get("enabled", True)),
        "video_size": checked_int(video.get("size", 256), "video.size", 16),
        "video_format": str(video.get("format", "mp4")),
        "progress": bool(cfg.get("progress", True)),
        "inference": inference,
    }


def _configure_inference(policy: LowdimPolicy, opts: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Apply the run's inference settings to ``policy``, which both samplers share; ``(settings, note)``.

    The settings come back with ``backend='default'`` resolved (:func:`~para_policy.inference.default_backend`),
    so the fingerprint, the Ray workers and ``results.json`` hold the backend that ran, and the
    sequential baseline runs on the candidate's backend: the headline ratio is against the fastest
    sequential sampler. ``backend`` is left out when eager, so eager runs keep the fingerprint (and
    resume) of earlier runs. The note says what runs and why, for the log and ``summary.md``.
    """
    old_threads = torch.get_num_threads()
    if opts["threads"]:  # ONNX Runtime's threads and backend='auto''s timings: the run's
        torch.set_num_threads(opts["threads"])
    try:
        configure_inference(policy, **opts["inference"])
    except ValueError as e:  # e.g. backend='onnxruntime' with device=cuda
        raise EvalConfigError(f"inference: {e}") from None
    finally:
        torch.set_num_threads(old_threads)
    backend = policy.inference.get("backend", "eager")
    applied = {k: v for k, v in opts["inference"].items() if k != "backend"}
    if backend != "eager":
        applied["backend"] = backend
    why = policy.backend_choice[1] if policy.backend_choice else f"inference.backend={opts['inference']['backend']}"
    return applied, f"backend {backend} for the candidate and the sequential baseline ({why})"


def _read_lock(lock: Path) -> dict[str, Any] | None:
    """The holder a lock file names (``pid``, ``host``, ``started``); None when it is gone or not yet written."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_is_dead(holder: dict[str, Any] | None) -> bool:
    """Whether a lock's holder is a process of this host that no longer runs (a run that crashed or was killed).

    A holder on another host may still run (a shared file system): it is never declared dead.
    """
    pid = holder.get("pid") if holder else None
    if (holder is None or holder.get("host") != socket.gethostname() or not isinstance(pid, int)
            or isinstance(pid, bool) or pid <= 0 or os.name == "nt"):  # os.kill(pid, 0) is no probe on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def _in_use(folder: Path, holder: dict[str, Any] | None) -> str:
    """The message for a folder another run holds."""
    who = (f"eval.py pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})" if holder
           else "a run that is starting")
    return (f"run folder {folder} is in use by {who}: two runs must not write one folder, so pick another one "
            f"(hydra.run.dir=...); if that run is gone, delete {folder / LOCK_FILE}")


def _check_not_in_use(folder: Path) -> None:
    """Refuse a folder a live run holds, before anything is loaded (:func:`lock_run_folder` takes it later)."""
    lock = folder / LOCK_FILE
    if lock.exists() and not _holder_is_dead(holder := _read_lock(lock)):
        raise EvalConfigError(_in_use(folder, holder))


def _remove_stale_lock(lock: Path, holder: dict[str, Any]) -> None:
    """Remove a dead run's lock with a warning; a live run's lock that replaced it meanwhile is put back.

    Moved aside rather than deleted so that, of two runs taking over one stale lock, only the
    one that moved it can remove it.
    """
    aside = lock.with_name(f"{LOCK_FILE}.{os.getpid()}.stale")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:  # another run moved it first
        return
    if _read_lock(aside) == holder:
        warnings.warn(f"{lock}: taking over the lock of eval.py pid {holder.get('pid')} on {holder.get('host')} "
                      f"(started {holder.get('started')}), which no longer runs", stacklevel=3)
    else:
        with contextlib.suppress(OSError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


def lock_run_folder(folder: Path) -> Path:
    """Take ``folder/eval.lock`` for this process (the folder is made if missing); return its path.

    Two runs started in the same folder used to overwrite each other's files. The lock is created
    with ``O_CREAT | O_EXCL``, so of two runs exactly one gets it and the other stops with an error
    naming the holder. A lock left by a run that died on this host is taken over with a warning.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):  # a stale lock moved aside, then created again (another run may get there first)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None or not _holder_is_dead(holder):
                raise EvalConfigError(_in_use(folder, holder)) from None
            _remove_stale_lock(lock, holder)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise EvalConfigError(_in_use(folder, _read_lock(lock)))


def release_run_folder(lock: Path) -> None:
    """Remove the lock :func:`lock_run_folder` took, unless it is no longer this process's."""
    holder = _read_lock(lock)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def _read_resumed(resume_dir: Path) -> dict[str, Any]:
    """The checked ``progress.json`` of ``resume_dir`` (:func:`read_progress`), refused while a run writes it."""
    _check_not_in_use(resume_dir)
    path = resume_dir / PROGRESS_FILE
    if not path.is_file():
        raise EvalConfigError(f"resume_dir={resume_dir} has no {PROGRESS_FILE}: not an eval.py run folder")
    return read_progress(path)


def _load_progress(saved: dict[str, Any], resume_dir: Path,
                   fingerprint: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Finished episodes of an earlier run of the same evaluation (failed ones are run again)."""
    old = saved["fingerprint"]
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} then, {fingerprint.get(k)!r} now" for k in diff)
        if "checkpoint" in diff and not str(old.get("checkpoint")).startswith(FINGERPRINT_PREFIX):
            details += ("; that run folder's checkpoint fingerprint hashed only part of the file, so it cannot tell "
                        "whether its checkpoint is this one: start a new run")
        raise EvalConfigError(f"cannot resume from {resume_dir}: the evaluation differs ({details})")
    return {role: [e for e in eps if e.get("error") is None] for role, eps in saved["episodes"].items()}


def _carry_chunk_obs(episodes: list[dict[str, Any]], resume_dir: Path, out: Path) -> list[dict[str, Any]]:
    """Copy the resumed run's chunk-observation side files into this run; an episode whose file is gone runs again.

    Flat tasks keep their chunk observations inline (``chunk_obs``) and pass unchanged.
    """
    kept = []
    for e in episodes:
        rel = e.get("chunk_obs_file")
        if rel is None:
            kept.append(e)
            continue
        src, dst = resume_dir / rel, out / rel
        if not src.is_file():
            print(f"resume: {src} is missing; seed {e['seed']} runs again")
            continue
        if src.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        kept.append(e)
    return kept


def _latency_inputs(episodes: list[dict[str, Any]], out: Path, k: int
                    ) -> list[tuple[np.ndarray | dict[str, np.ndarray], np.ndarray | None]]:
    """``k`` of the candidate's recorded chunk observations, each with the warm-start guess it was sampled from.

    The pool is every chunk of every finished episode, in episode then chunk order
    (:func:`select_observations` spreads ``k`` over it). A flat observation is (To, Do), read
    from the record; an image task's is ``{key: (To, *shape)}``, read from the episode's
    side file, and only the files of picked chunks are opened.
    """
    ok = [e for e in episodes if e.get("error") is None]
    if not any("chunk_obs_file" in e for e in ok):
        # each recorded chunk observation with the warm-start guess the candidate used for it
        pool = [(np.asarray(o, dtype=np.float32), None if g is None else np.asarray(g, dtype=np.float32))
                for e in ok
                for o, g in zip(e.get("chunk_obs", []), e.get("chunk_guess") or [None] * len(e.get("chunk_obs", [])),
                                strict=True)]
        return select_observations(pool, k)
    refs = [(e["chunk_obs_file"], i, None if g is None else np.asarray(g, dtype=np.float32))
            for e in ok if "chunk_obs_file" in e
            for i, g in enumerate(e.get("chunk_guess") or [None] * int(e["n_chunks"]))]
    picked = select_observations(refs, k)
    files: dict[str, dict[str, np.ndarray]] = {}
    inputs = []
    for rel, i, guess in picked:
        if rel not in files:
            files.clear()  # picked in file order: one episode's arrays in memory at a time
            files[rel] = read_chunk_obs(out / rel)
        inputs.append(({key: v[i].copy() for key, v in files[rel].items()}, guess))
    return inputs


def _resolve_window(policy: LowdimPolicy, spec: SamplerConfig, task: TaskSettings, resume_dir: Path | None,
                    saved: dict[str, Any] | None, threads: int | None) -> tuple[SamplerConfig, dict[str, Any]]:
    """Resolve ``window: auto`` before anything is fingerprinted or rolled out.

    A resumed run takes the window its earlier episodes ran with (recorded in its
    progress file, ``saved``), so it neither tunes again nor mixes windows. Otherwise the window
    comes from the policy's window cache (:func:`para_policy.window.resolve_window`: the
    same machine, policy and options give the same window) or is measured on the first
    start states at batch 1, the batch the latency is timed at.
    """
    if saved is not None:
        ran: Any = saved["fingerprint"]
        for key in ("samplers", "candidate", "options"):  # a mistyped level gives no window, and the resume is refused
            ran = ran.get(key) if isinstance(ran, dict) else None
        window = ran.get("window") if isinstance(ran, dict) else None
        if isinstance(window, int) and not isinstance(window, bool):
            tuning = dict(saved.get("window_tuning") or {"window": window, "round_shape": ran.get("round_shape")})
            print(f"window auto -> {window} (the window the resumed run's episodes used)")
            return tuned_spec(spec, window, tuning), {**tuning, "source": f"resumed from {resume_dir}"}
    env = make_task_env(task)
    shapes = policy.observation_shapes()
    try:
        windows = [stack_history([step_observation(env.reset(seed=s)[0], shapes)] * policy.n_obs_steps)
                   for s in task.seeds[:3]]
    finally:
        env.close()
    # (To, Do) arrays for a flat policy, {key: (To, *shape)} dicts for an image policy
    observations = [w[FLAT_KEY] if set(w) == {FLAT_KEY} else w for w in windows]
    old_threads = torch.get_num_threads()
    if threads:  # tuned with the threads the run times with
        torch.set_num_threads(threads)
    try:
        resolved = policy.resolve(spec, observations)
        info = policy.window_tuning(spec) or {}
    finally:
        torch.set_num_threads(old_threads)
    source = info.get("source", "measured")
    how = f"measured in {info.get('tuning_s', 0):.0f} s" if source == "measured" else f"cached in {source}"
    shape = f", {resolved.options['round_shape']} rounds" if spec.options.get("round_shape") == "auto" else ""
    print(f"window auto -> {resolved.options['window']}{shape} ({how}; predicted ms " +
          ", ".join(f"w{w}: {ms:.0f}" for w, ms in (info.get("predicted_ms") or {}).items()) + ")")
    return resolved, info


@dataclass
class _EvalRun:
    """One evaluation after its checks (:func:`_checked_run`): what the rollout, latency and report steps share.

    ``done`` holds each role's finished episode records (``progress.json``'s ``episodes``);
    ``video_files`` each role's first-episode video in the run folder.
    """

    out: Path
    task: TaskSettings
    opts: dict[str, Any]  # the runner's own keys, checked (_eval_settings)
    ctl: ControllerSettings
    shards: ClusterSettings | None
    ckpt: Path
    resume_dir: Path | None
    resumed: dict[str, Any] | None  # resume_dir's progress.json, checked (read_progress)
    trust: bool
    policy: LowdimPolicy
    inference_note: str
    specs: dict[str, SamplerConfig]  # role -> sampler: 'candidate', and 'baseline' with compare=true
    window_tuning: dict[str, Any] | None
    resolved: dict[str, Any]  # the resolved config, as results.json and W&B store it
    fingerprint: dict[str, Any] = field(default_factory=dict)
    done: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    video_files: dict[str, Path] = field(default_factory=dict)


def _checkpoint_path(cfg: DictConfig, task: TaskSettings, original_cwd: str | Path | None) -> Path:
    """``cfg.checkpoint`` resolved against the start directory; a missing one says where to get one."""
    if not cfg.get("checkpoint"):
        if task.checkpoint_asset is None:
            raise EvalConfigError(
                f"checkpoint is not set, and task {task.name!r} ships no checkpoint (there is no trained policy for it "
                f"yet): pass one with checkpoint=<path>, e.g. `python eval.py task={task.name} "
                "checkpoint=path/to/policy.safetensors` (a para_policy .safetensors or a DiffusionPolicy .ckpt)")
        raise EvalConfigError("checkpoint is not set: pass checkpoint=<path to a .safetensors policy>")
    return resolve_path(cfg.checkpoint, original_cwd)


def _run_fingerprint(run: _EvalRun) -> dict[str, Any]:
    """What a resumed run must share with the run folder it continues (``progress.json``'s ``fingerprint``)."""
    fingerprint = {
        # not the episode count: a resumed run may ask for more (or fewer) seeds from the same start
        "checkpoint": file_fingerprint(run.ckpt), "task": run.task.fingerprint(),
        "noise_seed": run.opts["seed"], "inference": run.opts["inference"],
        "samplers": {role: spec_dict(s) for role, s in run.specs.items()},
    }
    if run.ctl.fingerprint() is not None:  # sync on the steps clock keeps the fingerprint earlier runs have
        fingerprint["controller"] = run.ctl.fingerprint()
    return fingerprint


def _checked_run(cfg: DictConfig, out: Path, original_cwd: str | Path | None) -> _EvalRun:
    """Step 1: every check, cheapest first, then the checked policy with its inference settings applied."""
    candidate = sampler_config(cfg.sampler)
    task = task_settings(cfg)
    opts = _eval_settings(cfg)
    ctl = controller_settings(cfg, task)
    ctl.check_sampler(candidate)
    shards = cluster_settings(cfg)  # +cluster=ray: the episodes on Ray workers (.cluster)
    if ctl.remote is not None and shards is not None:
        raise EvalConfigError(f"controller.remote={ctl.remote} runs the candidate's episodes through one policy server "
                              "client in this process; it does not combine with +cluster=ray (drop one of them)")
    ckpt = _checkpoint_path(cfg, task, original_cwd)
    resume_dir = resolve_path(cfg.resume_dir, original_cwd) if cfg.get("resume_dir") else None
    if resume_dir is not None and not resume_dir.is_dir():
        raise EvalConfigError(f"resume_dir={resume_dir} does not exist")
    resumed = _read_resumed(resume_dir) if resume_dir is not None else None
    _check_not_in_use(out)
    trust = cfg.get("checkpoint_trust", False)
    if not isinstance(trust, bool):
        raise EvalConfigError(f"checkpoint_trust must be true or false, got {trust!r}")
    policy = load_checked_policy(ckpt, task, opts["device"], trust)
    ctl.check_policy(policy.n_action_steps)
    opts["inference"], inference_note = _configure_inference(policy, opts)
    print(f"inference: {inference_note}")
    check_env(task)
    try:
        schedule = policy.schedule_for(candidate)
    except ValueError as e:
        raise EvalConfigError(f"sampler {candidate.name!r} cannot run on this checkpoint: {e}") from None
    window_tuning = None
    if candidate.window_is_auto:
        candidate, window_tuning = _resolve_window(policy, candidate, task, resume_dir, resumed, opts["threads"])
    specs: dict[str, SamplerConfig] = {"candidate": candidate}
    if opts["compare"]:
        specs["baseline"] = baseline_config(candidate, schedule.kind, schedule.num_steps)
    run = _EvalRun(out=out, task=task, opts=opts, ctl=ctl, shards=shards, ckpt=ckpt, resume_dir=resume_dir,
                   resumed=resumed, trust=trust, policy=policy, inference_note=inference_note, specs=specs,
                   window_tuning=window_tuning, resolved=OmegaConf.to_container(cfg, resolve=True))
    run.fingerprint = _run_fingerprint(run)
    return run


def _start_progress(run: _EvalRun) -> None:
    """Make the run folder; a resumed run takes the finished episodes (and chunk files) of the folder it continues."""
    run.out.mkdir(parents=True, exist_ok=True)
    run.done = {role: [] for role in run.specs}
    if run.resume_dir is None or run.resumed is None:
        return
    run.done.update(_load_progress(run.resumed, run.resume_dir, run.fingerprint))
    if "candidate" in run.done:
        run.done["candidate"] = _carry_chunk_obs(run.done["candidate"], run.resume_dir, run.out)
    print(f"resuming from {run.resume_dir}: " + ", ".join(f"{r} {len(e)} episodes done" for r, e in run.done.items()))


def _save_progress(run: _EvalRun) -> None:
    write_json(run.out / PROGRESS_FILE, {"fingerprint": run.fingerprint, "episodes": run.done,
                                         "window_tuning": run.window_tuning,
                                         "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _record_episode(run: _EvalRun, role: str, rec: dict[str, Any]) -> None:
    """``on_episode`` of the rollouts: keep the record (an image task's chunk observations go to a side file)."""
    obs = rec.get("chunk_obs")
    if isinstance(obs, dict):  # image observations: a side file, not progress.json
        del rec["chunk_obs"]
        if rec.get("error") is None:
            rel = f"{CHUNK_OBS_DIR}/{role}_seed{rec['seed']}.npz"
            write_chunk_obs(run.out / rel, obs)
            rec["chunk_obs_file"] = rel
    run.done[role].append(rec)
    _save_progress(run)


def _baseline_cache_key(run: _EvalRun, spec: SamplerConfig) -> str:
    """The key of :data:`_BASELINE_CACHE`: what makes two runs' rollouts of ``spec`` the same episodes."""
    return json.dumps({"checkpoint": run.fingerprint["checkpoint"], "task": run.fingerprint["task"],
                       "noise_seed": run.opts["seed"], "spec": spec_dict(spec), "inference": run.opts["inference"],
                       "controller": run.ctl.fingerprint(with_remote=False)}, sort_keys=True)  # in process


def _reuse_baseline(run: _EvalRun, cache_key: str, todo: list[int]) -> tuple[list[int], Path | None]:
    """Take the seeds still to run from this process's cached baseline rollouts when it has every one of them.

    Returns the seeds left to run and the cached video (None when none is reused).
    """
    cached_eps, cached_video = _BASELINE_CACHE[cache_key]
    cached = {e["seed"]: e for e in cached_eps}
    if not all(s in cached for s in todo):
        return todo, None
    run.done["baseline"] += [cached[s] for s in todo]
    print("baseline: reusing this process's rollouts of the same checkpoint, task, seeds and noise")
    if cached_video is not None and cached_video.is_file() and run.opts["video"]:
        return [], cached_video
    return [], None


def _keep_video(run: _EvalRun, role: str, frames: list[np.ndarray] | None, name: str,
                previous: Path | None) -> None:
    """Write the first episode's video, or copy the one an earlier run (or this process) made of it."""
    if frames:
        path = write_video(frames, run.out / "videos" / name, run.task.fps)
        if path is not None:
            run.video_files[role] = path
    elif previous is not None:
        (run.out / "videos").mkdir(parents=True, exist_ok=True)
        run.video_files[role] = Path(shutil.copy2(previous, run.out / "videos" / previous.name))


def _roll_out_role(run: _EvalRun, role: str, spec: SamplerConfig, roll_out: Any) -> None:
    """Step 2 for one role: the seeds not done yet (resumed or cached ones are not run again), then its video."""
    task, opts = run.task, run.opts
    seeds_done = {e["seed"] for e in run.done[role]}
    todo = [s for s in task.seeds if s not in seeds_done]
    previous_video = None
    if run.resume_dir is not None and task.seeds[0] in seeds_done:
        old = sorted((run.resume_dir / "videos").glob(f"{role}_{spec.name}_seed{task.seeds[0]}.*"))
        previous_video = old[0] if old and opts["video"] else None
    cache_key = _baseline_cache_key(run, spec)
    if todo and role == "baseline" and cache_key in _BASELINE_CACHE:
        todo, cached_video = _reuse_baseline(run, cache_key, todo)
        previous_video = cached_video or previous_video
    frames = None
    if todo:
        record_video = opts["video"] and task.seeds[0] in todo
        served = role == "candidate" and run.ctl.remote is not None  # the baseline runs in process
        with (remote_endpoint(run.ctl, run.ckpt, spec, opts, run.out) if served
              else contextlib.nullcontext()) as remote:
            frames = roll_out(run.policy, spec, task, todo, run.ctl, opts, role=role,
                              on_episode=functools.partial(_record_episode, run, role),
                              video_seed=task.seeds[0] if record_video else None,
                              **({"remote": remote} if served else {}))
    order = {s: i for i, s in enumerate(task.seeds)}
    run.done[role] = sorted((e for e in run.done[role] if e["seed"] in order), key=lambda e: order[e["seed"]])
    _save_progress(run)
    _keep_video(run, role, frames, f"{role}_{spec.name}_seed{task.seeds[0]}.{opts['video_format']}", previous_video)
    if role == "baseline":
        _BASELINE_CACHE[cache_key] = (list(run.done[role]), run.video_files.get(role))


def _time_latency(run: _EvalRun) -> tuple[list[Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """Step 3: ``(the picked chunk inputs, each role's batch-1 timings, the machine they ran on)``."""
    picked = _latency_inputs(run.done["candidate"], run.out, run.opts["latency_calls"])
    machine_before = machine_info()
    timings = time_samplers(run.policy, run.specs, [o for o, _ in picked], guesses=[g for _, g in picked],
                            noise_seed=run.opts["seed"], warmup=run.opts["latency_warmup"],
                            progress=run.opts["progress"])
    machine = machine_info()
    machine["load_avg_before_timing"] = machine_before.get("load_avg")
    return picked, timings, machine


def _sampler_results(run: _EvalRun, timings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``results['samplers']``: each role's spec, schedule, task metrics, latency and episodes."""
    samplers: dict[str, Any] = {}
    for role, spec in run.specs.items():
        episodes = [{k: v for k, v in e.items() if k not in ("chunk_obs", "chunk_guess", "chunk_obs_file")}
                    for e in run.done[role]]
        schedule = run.policy.schedule_for(spec)
        samplers[role] = {
            "name": spec.name,
            "spec": spec_dict(spec),
            "schedule": {"kind": schedule.kind, "num_steps": schedule.num_steps},
            **summarize_episodes(episodes),
            "latency": latency_summary(timings[role], run.policy.n_action_steps) if timings[role]["ms"] else None,
            **({} if run.ctl.batched else {"controller": summarize_controller(episodes)}),
            "episodes": episodes,
        }
    return samplers


def _results(run: _EvalRun, overrides: list[str] | None, picked: list[Any], timings: dict[str, dict[str, Any]],
             machine: dict[str, Any]) -> dict[str, Any]:
    """The results dict (``results.json``; schema in :mod:`.report`), plots not yet made."""
    policy, opts, out = run.policy, run.opts, run.out
    samplers = _sampler_results(run, timings)
    faith = None
    if "baseline" in run.specs and len(timings["candidate"]["ms"]):
        faith = faithfulness(timings["candidate"]["actions"], timings["baseline"]["actions"])
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "task": run.task.name,
        "action_unit": run.task.action_unit,
        "checkpoint": str(run.ckpt),
        "seeds": run.task.seeds,
        "noise_seed": opts["seed"],
        "overrides": list(overrides or []),
        "controller": {**run.ctl.as_dict(), "label": run.ctl.label(), "n_action_steps": policy.n_action_steps},
        "inference": {**opts["inference"], "backend": opts["inference"].get("backend", "eager"),
                      "note": run.inference_note},
        "samplers": samplers,
        "comparison": comparison(samplers, faith),
        "latency_method": {"n_calls": len(picked), "warmup": opts["latency_warmup"], "batch_size": 1,
                           "n_action_steps": policy.n_action_steps,
                           **({"includes_obs_encoder": True, "observations_dir": CHUNK_OBS_DIR}
                              if getattr(policy, "obs_encoder", None) is not None else {})},
        "machine": machine,
        "videos": {role: str(p.relative_to(out)) if p.is_relative_to(out) else str(p)
                   for role, p in run.video_files.items()},
        "config": run.resolved,
    }
    if run.window_tuning is not None:
        results["window_tuning"] = run.window_tuning
    return results


def _report(run: _EvalRun, results: dict[str, Any], timings: dict[str, dict[str, Any]], logger: NullLogger) -> None:
    """Step 4: plots, ``results.json``, ``summary.md``, the W&B log and the printed table with its notes."""
    out = run.out
    plots = make_plots(results, timings, out)
    results["plots"] = {name: str(p.relative_to(out)) for name, p in plots.items()}
    write_json(out / RESULTS_FILE, results)
    write_text(out / SUMMARY_FILE, format_markdown(results))
    logger.log_results(results, flat_metrics(results), plots, run.video_files)
    print()
    print(format_table(results))
    machine = results["machine"]
    load = machine.get("load_avg")
    # the load average counts this process's own threads too: only load beyond them means other work
    others = load[0] - (machine.get("torch_threads") or 1) if load else 0.0
    if load and machine.get("cpu_count") and others > 0.5:
        print(f"note: load average {load} on {machine['cpu_count']} CPUs while timing (this run uses "
              f"{machine.get('torch_threads')} threads): latency figures are not reliable on a busy machine")
    if not run.ctl.deterministic:
        print(f"note: controller.clock=wall ({run.ctl.label()}): episodes depend on this machine's latency and load; "
              "another run gives other numbers")
    print(f"\nresults: {out / RESULTS_FILE}\nsummary: {out / SUMMARY_FILE}")


def evaluate(
    cfg: DictConfig,
    output_dir: str | Path,
    *,
    original_cwd: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` and write its files into ``output_dir``.

    Args:
        cfg: the composed eval config (``configs/eval.yaml``).
        output_dir: where results.json, summary.md, plots, videos and progress.json go.
        original_cwd: the directory relative paths (checkpoint, resume_dir) are relative
            to; the current directory by default.
        overrides: the command line overrides, recorded in the results.
    Returns:
        The results dict written to ``results.json`` (schema in :mod:`.report`).
    Raises:
        EvalConfigError: a bad config, checkpoint or task, or a run folder (``output_dir`` or
            ``resume_dir``) that another live run holds, before any rollout.
    """
    run = _checked_run(cfg, Path(output_dir), original_cwd)
    lock = lock_run_folder(run.out)  # after the checks, so a refused config leaves no folder behind
    try:
        return _run_checked(run, overrides)
    finally:
        release_run_folder(lock)


def _run_checked(run: _EvalRun, overrides: list[str] | None) -> dict[str, Any]:
    """Steps 2 to 4 of a checked run, in its locked folder: the results dict."""
    _start_progress(run)
    logger = make_logger(run.resolved.get("logger"), run.resolved, run.out)
    roll_out = roll_out_seeds if run.shards is None else ShardedRollouts(
        run.shards, checkpoint=run.ckpt, task=run.task, opts=run.opts, trust_pickle=run.trust)
    exit_code = 1
    old_threads = torch.get_num_threads()
    if run.opts["threads"]:
        torch.set_num_threads(run.opts["threads"])
    try:
        _save_progress(run)
        for role, spec in run.specs.items():
            _roll_out_role(run, role, spec, roll_out)
        picked, timings, machine = _time_latency(run)
        results = _results(run, overrides, picked, timings, machine)
        _report(run, results, timings, logger)
        exit_code = 0
        return results
    finally:
        torch.set_num_threads(old_threads)
        if run.shards is not None:
            roll_out.close()
        logger.finish(exit_code)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics with W&B names: ``candidate/mean_score``, ``ratio/latency_ms_per_chunk_p50``, …

    The sweep (``configs/sweep/tolerance.yaml``) optimises one of these names.
    """
    metrics: dict[str, Any] = {}
    paths = {
        "mean_score": "mean_score", "success_rate": "success_rate", "mean_length": "mean_length",
        "n_failed": "n_failed",
        "latency_ms_per_chunk_p50": "latency.ms_per_chunk.p50", "latency_ms_per_chunk_p95": "latency.ms_per_chunk.p95",
        "latency_ms_per_chunk_p99": "latency.ms_per_chunk.p99", "latency_ms_per_chunk_max": "latency.ms_per_chunk.max",
        "latency_ms_per_action_p50": "latency.ms_per_action.p50",
        "latency_ms_per_action_p95": "latency.ms_per_action.p95",
        "latency_ms_per_action_p99": "latency.ms_per_action.p99",
        "latency_ms_per_action_max": "latency.ms_per_action.max",
        "rounds_per_chunk": "latency.rounds_per_chunk.mean",
        "model_evals_per_chunk": "latency.model_evals_per_chunk.mean",
        "rollout_rounds_per_chunk": "rollout_rounds_per_chunk.mean",
        # controller.mode=async|rtc or the wall clock (absent in sync: the batched loop)
        "stalls_per_episode": "controller.stalls_per_episode",
        "switch_discontinuity_mean": "controller.switch_discontinuity_mean",
        "switch_discontinuity_max": "controller.switch_discontinuity_max",
        "steps_in_flight_fraction": "controller.steps_in_flight_fraction",
        "idle_steps": "controller.idle_steps",
        "late_steps": "controller.late_steps",
        "deadline_misses": "controller.deadline_misses",
        "extended_steps": "controller.extended_steps",
        # controller.remote (the candidate, served by a policy server)
        "round_trip_ms_p50": "controller.round_trip_ms_p50",
        "round_trip_ms_p95": "controller.round_trip_ms_p95",
        "overhead_ms_p50": "controller.overhead_ms_p50",
        "remote_failures": "controller.failures",
    }
    for role, s in results["samplers"].items():
        for name, path in paths.items():
            metrics[f"{role}/{name}"] = lookup(s, path)
    comp = results.get("comparison")
    if comp:
        for name, value in comp["ratios"].items():
            metrics[f"ratio/{name}"] = value
        metrics["comparison/speedup_p50"] = comp.get("speedup_p50")
        for name, value in (comp.get("faithfulness") or {}).items():
            metrics[f"faithfulness/{name}"] = value
    return {k: float(v) for k, v in metrics.items() if v is not None}
