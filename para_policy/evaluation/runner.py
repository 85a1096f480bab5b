"""The evaluation run: check config, roll out each sampler, time batch-1 calls, report.

``evaluate(cfg, output_dir)`` is what ``python eval.py`` runs (``eval.py`` only hands it
Hydra's config and run folder), and what tests call directly. In order:

1. check every config value and the checkpoint against the task (``EvalConfigError``
   before any env is stepped);
2. roll out the chosen sampler (role ``candidate``) and, with ``compare=true``, the
   sequential baseline on the same schedule (role ``baseline``): same env seeds, same
   model, same noise per (episode, chunk), same ``controller`` settings (``sync``: the
   batched loop; ``async`` / ``rtc`` or the wall clock: one Controller per env,
   :mod:`.realtime`); progress saved to ``progress.json`` after every episode, so
   ``resume_dir=<earlier run dir>`` continues an interrupted run;
3. time batch-1 calls of both samplers on chunk observations of the candidate's
   rollouts, with the same noise: latency and faithfulness (for image tasks the
   observations wait in ``chunk_obs/*.npz`` side files, not in the JSON files);
4. write ``results.json``, ``summary.md``, plots and first-episode videos into the run
   folder, log them to W&B, print the comparison table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from para_policy.evaluation.cluster import ShardedRollouts, cluster_settings
from para_policy.evaluation.config import (
    FLAT_KEY,
    ControllerSettings,
    EvalConfigError,
    TaskSettings,
    _int,
    baseline_config,
    controller_settings,
    file_fingerprint,
    format_shapes,
    observation_mismatch,
    resolve_path,
    sampler_config,
    spec_dict,
    task_settings,
)
from para_policy.evaluation.latency import (
    faithfulness,
    latency_summary,
    machine_info,
    select_observations,
    time_samplers,
)
from para_policy.evaluation.realtime import run_controller_rollouts
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
from para_policy.evaluation.rollout import make_task_env, run_rollouts, stack_history, step_observation
from para_policy.inference import check_inference_options, configure_inference
from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig
from para_policy.window import tuned_spec

PROGRESS_FILE = "progress.json"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"

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
        "num_envs": _int(cfg.get("num_envs", 8), "num_envs", 1),
        "seed": _int(cfg.get("seed", 0), "seed", 0),
        "device": str(cfg.get("device", "cpu")),
        "threads": None if threads is None else _int(threads, "threads", 1),
        "latency_calls": _int(lat.get("calls", 50), "latency.calls", 0),
        "latency_warmup": _int(lat.get("warmup", 3), "latency.warmup", 0),
        "video": bool(video.get("enabled", True)),
        "video_size": _int(video.get("size", 256), "video.size", 16),
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


def load_checked_policy(path: Path, task: TaskSettings, device: str, trust_pickle: bool = False) -> LowdimPolicy:
    """Load the checkpoint and refuse one made for another observation or action size."""
    from para_policy.policy import load_policy

    if not path.is_file() and not (path / "config.json").is_file():
        raise EvalConfigError(
            f"checkpoint not found: {path}. Pass checkpoint=<path to a para_policy .safetensors policy, a "
            "DiffusionPolicy .ckpt or a LeRobot policy directory> "
            f"(train one with `python train.py task={task.name}`)")
    try:  # eager until the run's inference settings are applied (_configure_inference), under its threads
        policy = load_policy(path, device=device, trust_pickle=trust_pickle, backend="eager")
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise EvalConfigError(f"cannot load checkpoint {path}: {e}") from None
    wanted = policy.observation_shapes()
    flat_policy = set(wanted) == {FLAT_KEY}
    if task.obs_shapes is None and flat_policy:  # low-dim policy, low-dim task
        if policy.obs_dim != task.obs_dim or policy.action_dim != task.action_dim:
            raise EvalConfigError(
                f"checkpoint {path.name} has obs_dim={policy.obs_dim}, action_dim={policy.action_dim} but task "
                f"{task.name!r} has obs_dim={task.obs_dim}, action_dim={task.action_dim}: a policy for another task "
                "or observation type")
        return policy
    given = task.observation_shapes
    if flat_policy:
        raise EvalConfigError(
            f"checkpoint {path.name} is a low-dim policy (observation {FLAT_KEY!r} of shape {wanted[FLAT_KEY]}) but "
            f"task {task.name!r} gives dict observations ({format_shapes(given)}): pass an image policy checkpoint, "
            "or evaluate this one on a low-dim task (task=pusht)")
    if task.obs_shapes is None:
        raise EvalConfigError(
            f"checkpoint {path.name} is an image policy observing {format_shapes(wanted)} but task {task.name!r} "
            f"gives flat observations of shape {given[FLAT_KEY]} (obs_type={task.obs_type}): evaluate it on an image "
            "task (task=pusht_image)")
    problem = observation_mismatch(wanted, given)
    if problem is not None:
        raise EvalConfigError(f"checkpoint {path.name} does not fit task {task.name!r}'s observation: {problem}")
    if policy.action_dim != task.action_dim:
        raise EvalConfigError(f"checkpoint {path.name} has action_dim={policy.action_dim} but task {task.name!r} has "
                              f"action_dim={task.action_dim}: a policy for another task")
    return policy


def env_observation_shapes(env: Any) -> dict[str, tuple[int, ...]]:
    """The observation keys and shapes an env declares: ``{key: shape}`` (a Dict space) or ``{'obs': shape}``."""
    space = env.observation_space
    sub = getattr(space, "spaces", None)
    if isinstance(sub, dict):
        return {str(k): tuple(v.shape or ()) for k, v in sub.items()}
    return {FLAT_KEY: tuple(space.shape or ())}


def _check_env(task: TaskSettings) -> None:
    """The env's observation must be what the task (and so the policy) says.

    A task whose optional dependencies are missing (Lift without the ``[lift]`` extra) stops
    here with the install hint.
    """
    from para_policy.tasks.lift import MissingExtraError

    try:
        env = make_task_env(task)
    except MissingExtraError as e:
        raise EvalConfigError(str(e)) from e
    try:
        shapes = env_observation_shapes(env)
    finally:
        env.close()
    if task.obs_shapes is None:
        shape = shapes.get(FLAT_KEY)
        if shape != (task.obs_dim,):
            raise EvalConfigError(f"env {task.env_id} (obs_type={task.obs_type}) gives observations of shape "
                                  f"{shape if shape is not None else format_shapes(shapes)}, but task.obs_dim is "
                                  f"{task.obs_dim}")
        return
    # the task's shapes are what the policy was checked against (load_checked_policy): the env must give them
    problem = observation_mismatch(task.obs_shapes, shapes)
    if problem is not None:
        raise EvalConfigError(f"env {task.env_id} (obs_type={task.obs_type}) does not give task.obs_shapes: {problem}")


def _load_progress(resume_dir: Path, fingerprint: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Finished episodes of an earlier run of the same evaluation (failed ones are run again)."""
    path = resume_dir / PROGRESS_FILE
    if not path.is_file():
        raise EvalConfigError(f"resume_dir={resume_dir} has no {PROGRESS_FILE}: not an eval.py run folder")
    saved = json.loads(path.read_text())
    old = saved.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} then, {fingerprint.get(k)!r} now" for k in diff)
        raise EvalConfigError(f"cannot resume from {resume_dir}: the evaluation differs ({details})")
    return {role: [e for e in eps if e.get("error") is None] for role, eps in saved.get("episodes", {}).items()}


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


def _resolve_window(policy: LowdimPolicy, spec: SamplerConfig, task: TaskSettings,
                    resume_dir: Path | None, threads: int | None) -> tuple[SamplerConfig, dict[str, Any]]:
    """Resolve ``window: auto`` before anything is fingerprinted or rolled out.

    A resumed run takes the window its earlier episodes ran with (recorded in its
    progress file), so it neither tunes again nor mixes windows. Otherwise the window
    comes from the policy's window cache (:func:`para_policy.window.resolve_window`: the
    same machine, policy and options give the same window) or is measured on the first
    start states at batch 1, the batch the latency is timed at.
    """
    if resume_dir is not None and (resume_dir / PROGRESS_FILE).is_file():
        saved = json.loads((resume_dir / PROGRESS_FILE).read_text())
        ran = saved.get("fingerprint", {}).get("samplers", {}).get("candidate", {}).get("options", {})
        window = ran.get("window")
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
        EvalConfigError: a bad config, checkpoint or task, before any rollout.
    """
    out = Path(output_dir)
    # ---- 1. checks, cheapest first ----------------------------------------------------
    candidate = sampler_config(cfg.sampler)
    task = task_settings(cfg)
    opts = _eval_settings(cfg)
    ctl = controller_settings(cfg, task)
    ctl.check_sampler(candidate)
    shards = cluster_settings(cfg)  # +cluster=ray: the episodes on Ray workers (.cluster)
    if not cfg.get("checkpoint"):
        if task.checkpoint_asset is None:
            raise EvalConfigError(
                f"checkpoint is not set, and task {task.name!r} ships no checkpoint (there is no trained policy for it "
                f"yet): pass one with checkpoint=<path>, e.g. `python eval.py task={task.name} "
                "checkpoint=path/to/policy.safetensors` (a para_policy .safetensors or a DiffusionPolicy .ckpt)")
        raise EvalConfigError("checkpoint is not set: pass checkpoint=<path to a .safetensors policy>")
    ckpt = resolve_path(cfg.checkpoint, original_cwd)
    resume_dir = resolve_path(cfg.resume_dir, original_cwd) if cfg.get("resume_dir") else None
    if resume_dir is not None and not resume_dir.is_dir():
        raise EvalConfigError(f"resume_dir={resume_dir} does not exist")
    trust = cfg.get("checkpoint_trust", False)
    if not isinstance(trust, bool):
        raise EvalConfigError(f"checkpoint_trust must be true or false, got {trust!r}")
    policy = load_checked_policy(ckpt, task, opts["device"], trust)
    ctl.check_policy(policy.n_action_steps)
    opts["inference"], inference_note = _configure_inference(policy, opts)
    print(f"inference: {inference_note}")
    _check_env(task)
    try:
        schedule = policy.schedule_for(candidate)
    except ValueError as e:
        raise EvalConfigError(f"sampler {candidate.name!r} cannot run on this checkpoint: {e}") from None
    window_tuning = None
    if candidate.window_is_auto:
        candidate, window_tuning = _resolve_window(policy, candidate, task, resume_dir, opts["threads"])
    specs: dict[str, SamplerConfig] = {"candidate": candidate}
    if opts["compare"]:
        specs["baseline"] = baseline_config(candidate, schedule.kind, schedule.num_steps)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = {
        # not the episode count: a resumed run may ask for more (or fewer) seeds from the same start
        "checkpoint": file_fingerprint(ckpt), "task": task.fingerprint(),
        "noise_seed": opts["seed"], "inference": opts["inference"],
        "samplers": {role: spec_dict(s) for role, s in specs.items()},
    }
    if ctl.fingerprint() is not None:  # sync on the steps clock keeps the fingerprint earlier runs have
        fingerprint["controller"] = ctl.fingerprint()

    # ---- 2. rollouts ---------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[dict[str, Any]]] = {role: [] for role in specs}
    if resume_dir is not None:
        done.update(_load_progress(resume_dir, fingerprint))
        if "candidate" in done:
            done["candidate"] = _carry_chunk_obs(done["candidate"], resume_dir, out)
        print(f"resuming from {resume_dir}: " + ", ".join(f"{r} {len(e)} episodes done" for r, e in done.items()))

    def save_progress() -> None:
        write_json(out / PROGRESS_FILE, {"fingerprint": fingerprint, "episodes": done, "window_tuning": window_tuning,
                                         "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    from para_policy.evaluation.wandb_logger import make_logger

    logger = make_logger(resolved.get("logger"), resolved, out)
    roll_out = _roll_out if shards is None else ShardedRollouts(shards, checkpoint=ckpt, task=task, opts=opts,
                                                                trust_pickle=trust)
    exit_code = 1
    old_threads = torch.get_num_threads()
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    try:
        video_files: dict[str, Path] = {}
        save_progress()
        for role, spec in specs.items():
            seeds_done = {e["seed"] for e in done[role]}
            todo = [s for s in task.seeds if s not in seeds_done]
            video_name = f"{role}_{spec.name}_seed{task.seeds[0]}.{opts['video_format']}"
            previous_video = None
            if resume_dir is not None and task.seeds[0] in seeds_done:
                old = sorted((resume_dir / "videos").glob(f"{role}_{spec.name}_seed{task.seeds[0]}.*"))
                previous_video = old[0] if old and opts["video"] else None
            cache_key = json.dumps({"checkpoint": fingerprint["checkpoint"], "task": fingerprint["task"],
                                    "noise_seed": opts["seed"], "spec": spec_dict(spec), "inference": opts["inference"],
                                    "controller": ctl.fingerprint()}, sort_keys=True)
            if todo and role == "baseline" and cache_key in _BASELINE_CACHE:
                cached_eps, cached_video = _BASELINE_CACHE[cache_key]
                cached = {e["seed"]: e for e in cached_eps}
                if all(s in cached for s in todo):
                    done[role] += [cached[s] for s in todo]
                    todo = []
                    if cached_video is not None and cached_video.is_file() and opts["video"]:
                        previous_video = cached_video
                    print("baseline: reusing this process's rollouts of the same checkpoint, task, seeds and noise")
            frames = None
            if todo:
                record_video = opts["video"] and task.seeds[0] in todo

                def on_episode(rec: dict[str, Any], role: str = role) -> None:
                    obs = rec.get("chunk_obs")
                    if isinstance(obs, dict):  # image observations: a side file, not progress.json
                        del rec["chunk_obs"]
                        if rec.get("error") is None:
                            rel = f"{CHUNK_OBS_DIR}/{role}_seed{rec['seed']}.npz"
                            write_chunk_obs(out / rel, obs)
                            rec["chunk_obs_file"] = rel
                    done[role].append(rec)
                    save_progress()

                frames = roll_out(policy, spec, task, todo, ctl, opts, role=role, on_episode=on_episode,
                                  video_seed=task.seeds[0] if record_video else None)
            order = {s: i for i, s in enumerate(task.seeds)}
            done[role] = sorted((e for e in done[role] if e["seed"] in order), key=lambda e: order[e["seed"]])
            save_progress()
            if frames:
                path = write_video(frames, out / "videos" / video_name, task.fps)
                if path is not None:
                    video_files[role] = path
            elif previous_video is not None:
                (out / "videos").mkdir(parents=True, exist_ok=True)
                video_files[role] = Path(shutil.copy2(previous_video, out / "videos" / previous_video.name))
            if role == "baseline":
                _BASELINE_CACHE[cache_key] = (list(done[role]), video_files.get(role))

        # ---- 3. batch-1 latency and faithfulness ----------------------------------------
        picked = _latency_inputs(done["candidate"], out, opts["latency_calls"])
        machine_before = machine_info()
        timings = time_samplers(policy, specs, [o for o, _ in picked], guesses=[g for _, g in picked],
                                noise_seed=opts["seed"], warmup=opts["latency_warmup"], progress=opts["progress"])
        machine = machine_info()
        machine["load_avg_before_timing"] = machine_before.get("load_avg")

        # ---- 4. results ----------------------------------------------------------------------
        samplers: dict[str, Any] = {}
        for role, spec in specs.items():
            episodes = [{k: v for k, v in e.items() if k not in ("chunk_obs", "chunk_guess", "chunk_obs_file")}
                        for e in done[role]]
            samplers[role] = {
                "name": spec.name,
                "spec": spec_dict(spec),
                "schedule": {"kind": policy.schedule_for(spec).kind, "num_steps": policy.schedule_for(spec).num_steps},
                **summarize_episodes(episodes),
                "latency": latency_summary(timings[role], policy.n_action_steps) if timings[role]["ms"] else None,
                **({} if ctl.batched else {"controller": summarize_controller(episodes)}),
                "episodes": episodes,
            }
        faith = None
        if "baseline" in specs and len(timings["candidate"]["ms"]):
            faith = faithfulness(timings["candidate"]["actions"], timings["baseline"]["actions"])
        results: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "task": task.name,
            "action_unit": task.action_unit,
            "checkpoint": str(ckpt),
            "seeds": task.seeds,
            "noise_seed": opts["seed"],
            "overrides": list(overrides or []),
            "controller": {**ctl.as_dict(), "label": ctl.label(), "n_action_steps": policy.n_action_steps},
            "inference": {**opts["inference"], "backend": opts["inference"].get("backend", "eager"),
                          "note": inference_note},
            "samplers": samplers,
            "comparison": comparison(samplers, faith),
            "latency_method": {"n_calls": len(picked), "warmup": opts["latency_warmup"], "batch_size": 1,
                               "n_action_steps": policy.n_action_steps,
                               **({"includes_obs_encoder": True, "observations_dir": CHUNK_OBS_DIR}
                                  if getattr(policy, "obs_encoder", None) is not None else {})},
            "machine": machine,
            "videos": {role: str(p.relative_to(out)) if p.is_relative_to(out) else str(p)
                       for role, p in video_files.items()},
            "config": resolved,
        }
        if window_tuning is not None:
            results["window_tuning"] = window_tuning
        plots = make_plots(results, timings, out)
        results["plots"] = {name: str(p.relative_to(out)) for name, p in plots.items()}
        write_json(out / RESULTS_FILE, results)
        write_text(out / SUMMARY_FILE, format_markdown(results))
        metrics = flat_metrics(results)
        logger.log_results(results, metrics, plots, video_files)
        print()
        print(format_table(results))
        load = machine.get("load_avg")
        # the load average counts this process's own threads too: only load beyond them means other work
        others = load[0] - (machine.get("torch_threads") or 1) if load else 0.0
        if load and machine.get("cpu_count") and others > 0.5:
            print(f"note: load average {load} on {machine['cpu_count']} CPUs while timing (this run uses "
                  f"{machine.get('torch_threads')} threads): latency figures are not reliable on a busy machine")
        if not ctl.deterministic:
            print(f"note: controller.clock=wall ({ctl.label()}): episodes depend on this machine's latency and load; "
                  "another run gives other numbers")
        print(f"\nresults: {out / RESULTS_FILE}\nsummary: {out / SUMMARY_FILE}")
        exit_code = 0
        return results
    finally:
        torch.set_num_threads(old_threads)
        if shards is not None:
            roll_out.close()
        logger.finish(exit_code)


def _roll_out(policy: LowdimPolicy, spec: SamplerConfig, task: TaskSettings, seeds: list[int],
              ctl: ControllerSettings, opts: dict[str, Any], *, role: str, on_episode: Any,
              video_seed: int | None) -> list[np.ndarray] | None:
    """Run ``seeds`` with ``spec`` under the controller settings; return the video frames (or None).

    ``sync`` on the steps clock is the batched loop, exactly as before the controller modes
    existed; the others run one Controller per env (:func:`run_controller_rollouts`), with
    the batched loop's noise per (episode, chunk).
    """
    common = dict(noise_seed=opts["seed"], video_seed=video_seed, video_size=opts["video_size"],
                  record_obs=(role == "candidate"), on_episode=on_episode, progress=opts["progress"])
    if ctl.batched:
        _, frames = run_rollouts(policy, spec, task, seeds, num_envs=opts["num_envs"], desc=f"{role} ({spec.name})",
                                 **common)
    else:
        _, frames = run_controller_rollouts(policy, spec, task, seeds, ctl, desc=f"{role} ({spec.name}, "
                                            f"{ctl.label()})", **common)
    return frames


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
