"""Training of a DiffusionPolicy: ``train_diffusion_unet_lowdim`` and, for image tasks, ``train_diffusion_unet_image``.

Why here and not in ``train.py``: the loop is importable and testable without Hydra's launcher;
``train.py`` only composes the config and calls :func:`train`.

The recipe (Chi et al.'s PushT low-dim UNet): windows of ``horizon`` steps padded at episode
boundaries (:mod:`para_policy.dataset`), a normalizer fitted to the whole buffer, the epsilon-MSE
DDPM loss of :meth:`LowdimPolicy.compute_loss`, AdamW with betas (0.95, 0.999) and weight decay
1e-6, a per-step learning-rate schedule (cosine with linear warm-up), and an exponential moving
average of the weights with DiffusionPolicy's power warm-up.  The EMA weights are what ship.

Image tasks (``task.obs_type: pixels_agent_pos``, ``configs/train_image.yaml``) run the same loop on
DiffusionPolicy's image recipe: :class:`~para_policy.dataset.PushTImageDataset` windows, an
:class:`~para_policy.image_policy.ImagePolicy` whose observation encoder (``policy.obs_encoder``,
DP's ``MultiImageObsEncoder``) trains with the UNet, the agent position and action normalizer fitted
to the buffer and DP's fixed image range normalizer ([0, 1] to [-1, 1]).  Random crops draw from
the global torch RNG (as DP's do), whose state ``resume.pt`` keeps too.

Outputs (in the run directory, Hydra's by default)::

    checkpoints/latest.safetensors   EMA policy, rewritten every ``checkpoint_every`` steps
    checkpoints/final.safetensors    EMA policy at the end of the run
    checkpoints/resume.pt            full training state for ``resume=true`` (tensors and primitive
                                     containers only: ``torch.load(weights_only=True)`` reads it)
    train_log.jsonl                  one JSON object per logged step / validation / rollout

Every write is atomic (temp file + rename), so a run killed at any moment leaves the previous
files intact and can be resumed.  Given the seed (and the number of CPU threads, which changes
floating-point summation order) a run is deterministic, and a resumed run continues exactly as an
uninterrupted one would: the data order, the loss noise and all optimizer state are restored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from para_policy.checkpoints import atomic_write, save_checkpoint
from para_policy.dataset import (
    IMAGE_RANGE_NORMALIZER,
    LowdimDataset,
    PushTImageDataset,
    PushTLowdimDataset,
    RobomimicLowdimDataset,
    SequenceDataset,
)
from para_policy.evaluation.config import PIXELS_OBS_TYPE
from para_policy.evaluation.wandb_logger import TrainLogger
from para_policy.image_policy import RGB, ImagePolicy
from para_policy.policy import LowdimPolicy
from para_policy.policy_config import PolicyConfig
from para_policy.samplers import sampler_spec

RESUME_FORMAT = "para_policy.train_state"
RESUME_VERSION = 1
RESUME_NAME = "resume.pt"


# ----------------------------------------------------------------------------- config
def _plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a DictConfig (or any mapping)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(cfg)


def is_image_task(task: Mapping[str, Any]) -> bool:
    """Whether a task config observes images (``obs_type: pixels_agent_pos``, e.g. ``task=pusht_image``)."""
    return str(task.get("obs_type", "")) == PIXELS_OBS_TYPE


def build_policy_config(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The policy config dict (what :class:`LowdimPolicy` takes and checkpoints store) from a train config.

    ``model.input_dim`` and ``model.global_cond_dim`` are derived (obs as global conditioning:
    the UNet denoises actions only, conditioned on ``n_obs_steps`` flattened observations).
    Image tasks get an :class:`ImagePolicy` config (:func:`build_image_policy_config`).
    """
    cfg = _plain(cfg)
    task, pol = cfg["task"], cfg["policy"]
    if is_image_task(task):
        return build_image_policy_config(cfg)
    obs_dim, action_dim, n_obs = int(task["obs_dim"]), int(task["action_dim"]), int(cfg["n_obs_steps"])
    if not pol.get("obs_as_global_cond", True):
        raise ValueError("training supports obs_as_global_cond=true only (DiffusionPolicy's PushT low-dim recipe)")
    model = {"input_dim": action_dim, "global_cond_dim": obs_dim * n_obs, **pol["model"]}
    model["down_dims"] = list(model["down_dims"])
    return {
        "task": task["name"],
        "horizon": int(cfg["horizon"]),
        "n_obs_steps": n_obs,
        "n_action_steps": int(cfg["n_action_steps"]),
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "num_inference_steps": int(pol["num_inference_steps"]),
        "obs_as_global_cond": True,
        "oa_step_convention": bool(pol.get("oa_step_convention", True)),
        "model": model,
        "noise_scheduler": dict(pol["noise_scheduler"]),
    }


def build_image_policy_config(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The :class:`ImagePolicy` config of an image task: DiffusionPolicy's ``DiffusionUnetImagePolicy``.

    ``obs_keys`` come from ``task.obs_shapes`` (3-d shapes are ``rgb`` cameras, the rest ``low_dim``);
    the encoder spec is ``policy.obs_encoder`` with the task's ``shape_meta``; ``obs_dim`` is the
    encoder's features per step F (512 per ResNet-18 camera plus the low-dim sizes) and the UNet's
    ``global_cond_dim`` is F * n_obs_steps; the normalizer has DP's fields (images (1,), vectors
    their size, ``action``).
    """
    from para_policy.models.vision import build_obs_encoder

    cfg = _plain(cfg)
    task, pol = cfg["task"], cfg["policy"]
    if not pol.get("obs_as_global_cond", True):
        raise ValueError("image policies train with obs_as_global_cond=true only (DiffusionUnetImagePolicy)")
    encoder_cfg = dict(pol.get("obs_encoder") or {})
    if not encoder_cfg:
        raise ValueError(
            f"task {task['name']!r} observes images but policy.obs_encoder is not set: train it with "
            f"configs/train_image.yaml (python train.py task={task['name']} picks it; or --config-name train_image)"
        )
    shapes = task.get("obs_shapes")
    if not isinstance(shapes, Mapping) or not shapes:
        raise ValueError(f"task {task['name']!r} has no obs_shapes (e.g. {{image: [3, 96, 96], agent_pos: [2]}})")
    obs_keys = {str(k): {"shape": [int(d) for d in v], "type": RGB if len(v) == 3 else "low_dim"}
                for k, v in shapes.items()}
    spec = {"kind": encoder_cfg.pop("kind", "dp_multi_image"), "shape_meta": {"obs": obs_keys}, **encoder_cfg}
    with torch.device("meta"):  # the spec checked and the feature size known, without allocating the network
        encoder = build_obs_encoder(spec)
    features, action_dim, n_obs = int(encoder.feature_dim), int(task["action_dim"]), int(cfg["n_obs_steps"])
    model = {"input_dim": action_dim, "global_cond_dim": features * n_obs, **pol["model"]}
    model["down_dims"] = list(model["down_dims"])
    normalizer = {k: {"shape": [1] if v["type"] == RGB else v["shape"], "mode": "affine"} for k, v in obs_keys.items()}
    normalizer["action"] = {"shape": [action_dim], "mode": "affine"}
    return {
        "task": task["name"],
        "horizon": int(cfg["horizon"]),
        "n_obs_steps": n_obs,
        "n_action_steps": int(cfg["n_action_steps"]),
        "obs_dim": features,
        "action_dim": action_dim,
        "model_type": "unet",
        "num_inference_steps": int(pol["num_inference_steps"]),
        "obs_as_global_cond": True,
        "oa_step_convention": bool(pol.get("oa_step_convention", True)),
        "model": model,
        "noise_scheduler": dict(pol["noise_scheduler"]),
        "obs_keys": obs_keys,
        "obs_encoder": encoder.spec,
        "normalizer": normalizer,
    }


def _abs_path(path: str) -> Path:
    """A config path made absolute against the directory the command was started from."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except Exception:  # Hydra missing or not initialised the usual way
        return Path(path).resolve()


def make_datasets(
    cfg: Mapping[str, Any] | DictConfig,
) -> tuple[LowdimDataset | PushTImageDataset, SequenceDataset | PushTImageDataset]:
    """Training and validation windows for ``cfg.task`` (pad_before = To-1, pad_after = Ta-1, as DP).

    PushT reads a zarr replay buffer, Lift a robomimic HDF5 file (``task.obs_keys`` concatenated),
    PushT's image task the zarr buffer's frames (the first ``n_obs_steps`` of each window).
    """
    cfg = _plain(cfg)
    task = cfg["task"]
    kwargs: dict[str, Any] = {
        "horizon": int(cfg["horizon"]),
        "pad_before": int(cfg["n_obs_steps"]) - 1,
        "pad_after": int(cfg["n_action_steps"]) - 1,
        "val_ratio": float(task.get("val_ratio", 0.0)),
        "seed": int(task.get("split_seed", 42)),
        "max_train_episodes": task.get("max_train_episodes"),
    }
    path = _abs_path(task["dataset_path"])
    if is_image_task(task):
        if task["name"] != "pusht_image":
            raise ValueError(f"no image dataset loader for task {task['name']!r}; known: ['pusht_image']")
        image_set = PushTImageDataset.from_path(path, n_obs_steps=int(cfg["n_obs_steps"]), **kwargs)
        expected = {str(k): tuple(int(d) for d in v) for k, v in (task.get("obs_shapes") or {}).items()}
        if image_set.obs_shapes() != expected or image_set.action.shape[1] != int(task["action_dim"]):
            raise ValueError(
                f"dataset {path} has observations {image_set.obs_shapes()} and action_dim="
                f"{image_set.action.shape[1]} but task {task['name']!r} says obs_shapes={expected}, "
                f"action_dim={task['action_dim']} (the frames must be the env's size)"
            )
        return image_set, image_set.get_validation_dataset()
    if task["name"] == "pusht":
        ds: LowdimDataset = PushTLowdimDataset.from_path(path, **kwargs)
    elif task["name"] == "lift":
        ds = RobomimicLowdimDataset.from_path(path, obs_keys=task.get("obs_keys"), **kwargs)
    else:
        raise ValueError(f"no dataset loader for task {task['name']!r}; known: ['lift', 'pusht']")
    if ds.obs.shape[1] != int(task["obs_dim"]) or ds.action.shape[1] != int(task["action_dim"]):
        raise ValueError(
            f"dataset {path} has obs_dim={ds.obs.shape[1]}, action_dim={ds.action.shape[1]} but task "
            f"{task['name']!r} says obs_dim={task['obs_dim']}, action_dim={task['action_dim']}"
        )
    return ds, ds.get_validation_dataset()


# ----------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's weights with DiffusionPolicy's decay warm-up.

    ``decay(k) = clamp(1 - (1 + s / inv_gamma) ** -power, min_value, max_value)`` with
    ``s = k - update_after_step - 1`` (and 0 while ``s <= 0``), for the k-th update: the average
    follows the weights closely early on and ever more slowly later (power 3/4 reaches 0.999 at
    about 10k steps).  Parameters that do not require grad (the normalizer) and buffers are copied.

    Args:
        averaged: the module holding the average (a deep copy of the trained one); set to eval.
    """

    def __init__(
        self,
        averaged: torch.nn.Module,
        update_after_step: int = 0,
        inv_gamma: float = 1.0,
        power: float = 0.75,
        min_value: float = 0.0,
        max_value: float = 0.9999,
    ):
        self.averaged = averaged.eval().requires_grad_(False)
        self.update_after_step = int(update_after_step)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.optimization_step = 0
        self.decay = 0.0

    def get_decay(self, optimization_step: int) -> float:
        """Decay used for update number ``optimization_step`` (0-based)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        value = 1 - (1 + step / self.inv_gamma) ** -self.power
        return max(self.min_value, min(value, self.max_value))

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        """Fold ``model``'s current weights into the average."""
        self.decay = self.get_decay(self.optimization_step)
        avg_params = dict(self.averaged.named_parameters())
        trained, averaged = [], []
        for name, p in model.named_parameters():
            q = avg_params[name]
            if p.requires_grad:
                trained.append(p.detach())
                averaged.append(q)
            else:
                q.copy_(p)
        if trained:
            torch._foreach_mul_(averaged, self.decay)
            torch._foreach_add_(averaged, trained, alpha=1.0 - self.decay)
        avg_buffers = dict(self.averaged.named_buffers())
        for name, b in model.named_buffers():
            avg_buffers[name].copy_(b)
        self.optimization_step += 1

    def state_dict(self) -> dict[str, Any]:
        """Counters only; the averaged weights are the averaged module's own state dict."""
        return {"optimization_step": self.optimization_step, "decay": self.decay}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimization_step = int(state["optimization_step"])
        self.decay = float(state["decay"])


# ----------------------------------------------------------------------------- helpers
def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule from diffusers (``cosine`` = linear warm-up then half a cosine to 0)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


@torch.no_grad()
def validation_loss(
    policy: LowdimPolicy,
    dataset: SequenceDataset | PushTImageDataset,
    batch_size: int,
    seed: int,
    max_batches: int | None = None,
) -> float | None:
    """Mean loss over the validation windows, with the same noise draws every time it is called.

    A fixed-seed generator makes successive values comparable (only the weights change) and keeps
    validation from consuming the training noise stream.  None if there are no validation windows.
    """
    if len(dataset) == 0:
        return None
    was_training = policy.training
    policy.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(dataset), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        batch = {k: v.to(policy.device) for k, v in dataset.get_batch(idx).items()}
        total += float(policy.compute_loss(batch, generator=gen)) * len(idx)
        count += len(idx)
    policy.train(was_training)
    return total / count


def rollout(
    policy: LowdimPolicy,
    episodes: int,
    seed_start: int = 0,
    max_steps: int = 300,
    predict_kwargs: Mapping[str, Any] | None = None,
    task: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` episodes of the task with the evaluator's rollout loop (:func:`run_rollouts`).

    DiffusionPolicy's multi-step protocol, one batched ``predict_action`` per chunk for all
    episodes; episode ``i`` is reset with seed ``seed_start + i``; ``predict_kwargs`` choose
    the sampler (``{'sampler': 'sequential', 'scheduler': 'ddim', 'num_inference_steps': 16}``,
    :func:`~para_policy.samplers.sampler_spec`); ``task`` is the task config (default PushT; an
    image task's env gives the dict observations an :class:`ImagePolicy` takes).

    Returns:
        ``{'mean_max_reward': float, 'max_rewards': [float] * episodes, 'success_rate': float}``;
        an episode's score is its maximum reward and its success the env's ``info['is_success']``,
        as in the evaluator.
    """
    from para_policy.evaluation.config import task_settings
    from para_policy.evaluation.rollout import run_rollouts

    kwargs = dict(predict_kwargs or {})
    spec = sampler_spec(kwargs.pop("sampler", "sequential"), **kwargs)
    settings = task_settings(OmegaConf.create({"task": {**dict(task or {"name": "pusht",
                                                                        "env_id": "gym_pusht/PushT-v0"}),
                                                        "episodes": episodes, "seed_start": seed_start,
                                                        "max_steps": max_steps}}))
    was_training = policy.training
    policy.eval()
    try:
        records, _ = run_rollouts(policy, spec, settings, settings.seeds, noise_seed=seed_start,
                                  num_envs=episodes, progress=False, desc="rollout")
    finally:
        policy.train(was_training)
    failed = [r for r in records if r["error"] is not None]
    if failed:
        raise RuntimeError(f"training rollout of seed {failed[0]['seed']} failed: {failed[0]['error']}")
    best = np.array([r["max_reward"] for r in records])
    return {"mean_max_reward": float(best.mean()), "max_rewards": best.tolist(),
            "success_rate": float(np.mean([r["success"] for r in records]))}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def _command() -> str:
    """The command line that started this process (``python train.py <overrides>``)."""
    return " ".join(["python", *(shlex.quote(a) for a in sys.argv)])


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("train() needs output_dir when not run under Hydra (python train.py ...)")
    return Path(HydraConfig.get().runtime.output_dir)


# ----------------------------------------------------------------------------- training
def train(cfg: DictConfig | Mapping[str, Any], output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train a policy as configured by ``configs/train.yaml`` (image tasks: ``train_image.yaml``); returns a summary.

    Args:
        cfg: the composed train config (``task``, ``policy``, ``optimizer``, ``ema``, ``training``,
            ``logger``, ``resume``, ``resume_from``).
        output_dir: where checkpoints and logs go (default: Hydra's run directory).
    Returns:
        ``{'output_dir', 'checkpoint' (final EMA .safetensors), 'resume_path', 'step',
        'stop_reason', 'train_loss' (mean of the last 100 steps), 'val_loss', 'val_loss_ema',
        'rollout' (last rollout result or None), 'policy_config'}``.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, output_dir)
    finally:
        torch.set_num_threads(threads)  # training.num_threads applies to this run only


@dataclass
class _TrainRun:
    """One training run: its config, data, networks, optimizer, RNGs and loop counters.

    Why one object: the steps of :func:`_train` (restore, step, validate, save) all read and
    advance the same state, and ``resume.pt`` is exactly this state (:func:`_save_all`). Built by
    :func:`_start_run`; the counters (``step``, ``epoch``, ``pos``, ``perm``, ``recent``,
    ``wall_time_before``, ``sessions``) come from ``resume.pt`` when resuming (:func:`_restore`).
    """

    cfg: dict[str, Any]  # the resolved run config
    output_dir: Path
    device: torch.device
    train_set: LowdimDataset | PushTImageDataset
    val_set: SequenceDataset | PushTImageDataset
    policy_config: PolicyConfig
    policy: LowdimPolicy
    ema_policy: LowdimPolicy  # the averaged copy (what ships); a plain copy when EMA is off
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    data_gen: torch.Generator  # the data order
    noise_gen: torch.Generator  # the loss noise
    fingerprint: str  # the dataset's sha256 (:func:`_fingerprint`)
    perm: torch.Tensor  # this epoch's window order; ``pos`` is the next batch's start in it
    step: int = 0
    epoch: int = 0
    pos: int = 0
    wall_time_before: float = 0.0  # training seconds of earlier sessions of a resumed run
    recent: list[float] = field(default_factory=list)  # the last 100 losses
    window: list[float] = field(default_factory=list)  # the losses since the last logged step
    wandb_id: str | None = None
    sessions: list[dict[str, Any]] = field(default_factory=list)  # every invocation of a resumed run
    last: dict[str, Any] = field(default_factory=lambda: {"val_loss": None, "val_loss_ema": None, "rollout": None,
                                                          "val_step": None})
    logger: TrainLogger | None = None
    t0: float = field(default_factory=time.monotonic)

    @property
    def tcfg(self) -> dict[str, Any]:
        return self.cfg["training"]

    @property
    def seed(self) -> int:
        return int(self.tcfg["seed"])

    @property
    def max_steps(self) -> int:
        return int(self.tcfg["max_steps"])

    @property
    def batch_size(self) -> int:
        return int(self.tcfg["batch_size"])

    @property
    def ckpt_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def elapsed(self) -> float:
        """Seconds since this session's loop started."""
        return time.monotonic() - self.t0


def _ema_options(cfg: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """``(enabled, EMA keyword arguments)`` from ``cfg.ema``."""
    ecfg = dict(cfg.get("ema") or {})
    return bool(ecfg.pop("enabled", True)), ecfg


def _read_resume_state(run_cfg: Mapping[str, Any], ckpt_dir: Path) -> dict[str, Any] | None:
    """``resume.pt``'s contents with ``resume=true`` (None otherwise), read before any expensive work."""
    if not run_cfg.get("resume"):
        return None
    resume_path = Path(run_cfg.get("resume_from") or ckpt_dir / RESUME_NAME)
    if not resume_path.is_file():
        raise FileNotFoundError(
            f"resume=true but there is no training state at {resume_path}. Pass the earlier run's "
            f"directory (hydra.run.dir=<run dir>) or resume_from=<path to {RESUME_NAME}>."
        )
    resume_state = torch.load(resume_path, map_location="cpu", weights_only=True)
    if resume_state.get("format") != RESUME_FORMAT or int(resume_state.get("version", -1)) > RESUME_VERSION:
        raise ValueError(f"{resume_path} is not a para_policy training state (format {RESUME_FORMAT!r})")
    return resume_state


def _make_policy(run_cfg: dict[str, Any], train_set: LowdimDataset | PushTImageDataset,
                 device: torch.device) -> tuple[PolicyConfig, LowdimPolicy]:
    """The policy config and a freshly initialised policy (seeded) with its normalizer fitted to ``train_set``."""
    torch.manual_seed(int(run_cfg["training"]["seed"]))  # model initialisation
    policy_config = PolicyConfig.from_dict(build_policy_config(run_cfg))  # checked here; checkpoints store to_dict()
    policy = (ImagePolicy if policy_config.is_image else LowdimPolicy)(policy_config)
    fit_normalizer(policy, train_set)
    policy.to(device).train()
    return policy_config, policy


def _start_run(run_cfg: dict[str, Any], output_dir: Path) -> _TrainRun:
    """Data, policy, EMA copy, optimizer, learning-rate schedule and generators of a fresh run."""
    tcfg = run_cfg["training"]
    device = torch.device(tcfg.get("device", "cpu"))
    seed = int(tcfg["seed"])
    train_set, val_set = make_datasets(run_cfg)
    if len(train_set) == 0:
        raise ValueError(f"no training windows in {train_set.path} (horizon {train_set.horizon})")
    policy_config, policy = _make_policy(run_cfg, train_set, device)
    ema_policy = copy.deepcopy(policy)
    use_ema, ecfg = _ema_options(run_cfg)
    ema = EMA(ema_policy, **ecfg) if use_ema else None
    ocfg = run_cfg["optimizer"]
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=float(ocfg["lr"]),
        betas=tuple(float(b) for b in ocfg["betas"]),
        eps=float(ocfg.get("eps", 1e-8)),
        weight_decay=float(ocfg["weight_decay"]),
    )
    lr_scheduler = make_lr_scheduler(
        optimizer, tcfg.get("lr_scheduler", "cosine"), int(tcfg.get("lr_warmup_steps", 0)), int(tcfg["max_steps"])
    )
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(train_set), generator=data_gen)
    return _TrainRun(cfg=run_cfg, output_dir=output_dir, device=device, train_set=train_set, val_set=val_set,
                     policy_config=policy_config, policy=policy, ema_policy=ema_policy, ema=ema,
                     optimizer=optimizer, lr_scheduler=lr_scheduler, data_gen=data_gen, noise_gen=noise_gen,
                     fingerprint=_fingerprint(train_set), perm=perm)


def _restore(run: _TrainRun, resume_state: Mapping[str, Any]) -> None:
    """Continue where ``resume.pt`` left off; refuse a run whose policy config or dataset changed."""
    saved_config = PolicyConfig.from_dict(json.loads(resume_state["policy_config"])).to_dict()
    current = run.policy_config.to_dict()  # both with every default written out, so older runs compare equal
    if saved_config != current:
        changed = sorted(k for k in set(saved_config) | set(current) if saved_config.get(k) != current.get(k))
        raise ValueError(f"cannot resume: the policy config differs from the saved run's in {changed}")
    if resume_state.get("dataset_sha256") != run.fingerprint:
        raise ValueError(
            f"cannot resume: the dataset at {run.train_set.path} is not the one the run was trained on "
            f"(sha256 {run.fingerprint[:12]}… != {str(resume_state.get('dataset_sha256'))[:12]}…)"
        )
    run.policy.load_state_dict(resume_state["model"])
    run.ema_policy.load_state_dict(resume_state["ema_model"])
    if run.ema is not None:
        run.ema.load_state_dict(resume_state["ema"])
    run.optimizer.load_state_dict(resume_state["optimizer"])
    run.lr_scheduler.load_state_dict(resume_state["lr_scheduler"])
    run.data_gen.set_state(resume_state["rng"]["data"])
    run.noise_gen.set_state(resume_state["rng"]["noise"])
    if "torch" in resume_state["rng"]:  # the global RNG: the image encoder's random crops
        torch.set_rng_state(resume_state["rng"]["torch"])
    run.step, run.epoch, run.pos = int(resume_state["step"]), int(resume_state["epoch"]), int(resume_state["pos"])
    run.perm = resume_state["perm"]
    run.wall_time_before = float(resume_state["wall_time"])
    run.recent = list(resume_state["recent_losses"])
    run.wandb_id = resume_state.get("wandb_id")
    run.sessions = [json.loads(x) for x in resume_state.get("sessions", [])]


def _dataset_info(run: _TrainRun) -> dict[str, Any]:
    return {
        "path": str(run.train_set.path),
        "episodes": int(len(run.train_set.episode_ends)),
        "steps": int(len(run.train_set.action)),
        "train_episodes": run.train_set.n_episodes,
        "val_episodes": run.val_set.n_episodes,
        "train_windows": len(run.train_set),
        "val_windows": len(run.val_set),
        "sha256": run.fingerprint,
    }


def _provenance(run: _TrainRun, stop_reason: str | None) -> dict[str, Any]:
    """The ``training`` block a checkpoint's config carries: how, on what and for how long it was trained."""
    tcfg = run.tcfg
    use_ema, ecfg = _ema_options(run.cfg)
    return {
        "command": run.sessions[0]["command"],
        "overrides": run.sessions[0]["overrides"],
        "sessions": run.sessions if len(run.sessions) > 1 else [],  # every invocation of a resumed run
        "seed": run.seed,
        "steps": run.step,
        "epochs": run.epoch,
        "batch_size": run.batch_size,
        "optimizer": {"name": "AdamW", **run.cfg["optimizer"]},
        "lr_scheduler": tcfg.get("lr_scheduler", "cosine"),
        "lr_warmup_steps": int(tcfg.get("lr_warmup_steps", 0)),
        "max_steps": run.max_steps,
        "max_minutes": tcfg.get("max_minutes"),
        "ema": {"enabled": use_ema, **ecfg},
        "wall_time_s": round(run.wall_time_before + run.elapsed(), 1),
        "num_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": str(run.device),
        "dataset": _dataset_info(run),
        "final_train_loss": _mean(run.recent[-100:]),
        "final_val_loss": run.last["val_loss"],
        "final_val_loss_ema": run.last["val_loss_ema"],
        "last_rollout": run.last["rollout"],
        "stop_reason": stop_reason,
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def _save_all(run: _TrainRun, final: bool, stop_reason: str | None) -> None:
    """The shipped policy (``latest``, and ``final`` at the end) and ``resume.pt``, each written atomically."""
    cfg_out = {**run.policy_config.to_dict(), "training": _provenance(run, stop_reason)}
    state = (run.policy if run.ema is None else run.ema_policy).state_dict()
    save_checkpoint(run.ckpt_dir / "latest.safetensors", state, cfg_out)
    if final:
        save_checkpoint(run.ckpt_dir / "final.safetensors", state, cfg_out)
    train_state = {
        "format": RESUME_FORMAT,
        "version": RESUME_VERSION,
        "step": run.step,
        "epoch": run.epoch,
        "pos": run.pos,
        "perm": run.perm,
        "model": run.policy.state_dict(),
        "ema_model": run.ema_policy.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else {"optimization_step": 0, "decay": 0.0},
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "rng": {"data": run.data_gen.get_state(), "noise": run.noise_gen.get_state(), "torch": torch.get_rng_state()},
        "wall_time": run.wall_time_before + run.elapsed(),
        "recent_losses": run.recent[-100:],
        "wandb_id": run.logger.run_id,
        "sessions": [json.dumps(x) for x in run.sessions],
        "policy_config": json.dumps(run.policy_config.to_dict()),
        "dataset_sha256": run.fingerprint,
    }
    atomic_write(run.ckpt_dir / RESUME_NAME, lambda tmp: torch.save(train_state, tmp))


def _validate_and_roll_out(run: _TrainRun, force_val: bool = False) -> dict[str, Any]:
    """Validation losses every ``val_every`` steps (and at the last), rollouts every ``rollout_every``: the record."""
    tcfg, step = run.tcfg, run.step
    val_every, rollout_every = int(tcfg.get("val_every") or 0), int(tcfg.get("rollout_every") or 0)
    record: dict[str, Any] = {}
    if val_every and (force_val or step % val_every == 0 or step == run.max_steps):
        run.last["val_step"] = step
        vb = tcfg.get("val_batches")
        run.last["val_loss"] = validation_loss(run.policy, run.val_set, run.batch_size, run.seed + 2, vb)
        if run.ema is not None:
            run.last["val_loss_ema"] = validation_loss(run.ema_policy, run.val_set, run.batch_size, run.seed + 2, vb)
        record.update(val_loss=run.last["val_loss"], val_loss_ema=run.last["val_loss_ema"])
    if rollout_every and step % rollout_every == 0:
        result = rollout(
            run.policy if run.ema is None else run.ema_policy,
            int(tcfg.get("rollout_episodes", 4)),
            int(tcfg.get("rollout_seed_start", 0)),
            int(run.cfg["task"].get("max_steps", 300)),
            tcfg.get("rollout_predict") or {},
            task=run.cfg["task"],
        )
        run.last["rollout"] = {"step": step, **result}
        record.update(rollout_mean_max_reward=result["mean_max_reward"], rollout_success=result["success_rate"])
    return {k: v for k, v in record.items() if v is not None}


def _train_step(run: _TrainRun) -> float:
    """One optimizer step on the next batch of the epoch's order (a new order after the last); the loss."""
    if run.pos >= len(run.perm):
        run.perm = torch.randperm(len(run.train_set), generator=run.data_gen)
        run.pos, run.epoch = 0, run.epoch + 1
    idx = run.perm[run.pos : run.pos + run.batch_size]
    run.pos += run.batch_size
    batch = {k: v.to(run.device) for k, v in run.train_set.get_batch(idx).items()}
    loss = run.policy.compute_loss(batch, generator=run.noise_gen)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {float(loss)} at step {run.step}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.step(run.policy)
    run.step += 1
    value = loss.detach().item()
    run.recent.append(value)
    del run.recent[:-100]
    run.window.append(value)
    return value


def _log_step(run: _TrainRun, bar: Any) -> None:
    """Log the step's record (mean loss every ``log_every`` steps, validation, rollouts), if it has one."""
    log_every = max(1, int(run.tcfg.get("log_every") or 1))
    record: dict[str, Any] = {}
    if run.step % log_every == 0:
        record.update(
            train_loss=_mean(run.window), lr=run.lr_scheduler.get_last_lr()[0], epoch=run.epoch,
            elapsed_s=round(run.wall_time_before + run.elapsed(), 2),
        )
        run.window = []
    record.update(_validate_and_roll_out(run))
    if not record:
        return
    run.logger.log({"step": run.step, **record})
    if "val_loss" in record:
        bar.write(
            f"step {run.step}: train {_mean(run.recent[-log_every:]):.4f}  val {record['val_loss']:.4f}"
            + (f"  val(ema) {record['val_loss_ema']:.4f}" if "val_loss_ema" in record else "")
        )


def _loop(run: _TrainRun) -> str:
    """Steps until ``max_steps`` or ``max_minutes``; the stop reason. Ctrl-C saves ``resume.pt`` first."""
    max_minutes = run.tcfg.get("max_minutes")
    ckpt_every = int(run.tcfg.get("checkpoint_every") or 0)
    stop_reason = "max_steps"
    bar = tqdm(total=run.max_steps, initial=run.step, desc="train", mininterval=1.0,
               disable=not run.tcfg.get("progress", True))
    try:
        while run.step < run.max_steps:
            if max_minutes is not None and run.elapsed() >= 60.0 * float(max_minutes):
                stop_reason = "max_minutes"
                break
            value = _train_step(run)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            _log_step(run, bar)
            if ckpt_every and run.step % ckpt_every == 0 and run.step < run.max_steps:
                _save_all(run, final=False, stop_reason=None)
    except KeyboardInterrupt:
        bar.close()
        _save_all(run, final=False, stop_reason="interrupted")  # resume=true picks up from here
        run.logger.finish()
        raise
    finally:
        bar.close()
    return stop_reason


def _train(cfg: DictConfig | Mapping[str, Any], output_dir: str | os.PathLike | None) -> dict[str, Any]:
    """:func:`train`'s body: set up (or resume) the run, loop, validate the last weights, save, summarise."""
    run_cfg = _plain(cfg)
    tcfg = run_cfg["training"]
    output_dir = Path(output_dir) if output_dir is not None else _hydra_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    if tcfg.get("num_threads"):
        torch.set_num_threads(int(tcfg["num_threads"]))
    resume_state = _read_resume_state(run_cfg, output_dir / "checkpoints")  # a missing file fails first
    run = _start_run(run_cfg, output_dir)
    if resume_state is not None:
        _restore(run, resume_state)
    run.sessions.append({"command": _command(), "overrides": _hydra_overrides(), "start_step": run.step})
    run.logger = TrainLogger(run_cfg.get("logger") or {}, output_dir, run_cfg, run.wandb_id)
    run.t0 = time.monotonic()
    stop_reason = _loop(run)
    if int(tcfg.get("val_every") or 0) and run.last["val_step"] != run.step:  # stopped by the time budget: validate
        run.logger.log({"step": run.step, **_validate_and_roll_out(run, force_val=True)})
    _save_all(run, final=True, stop_reason=stop_reason)
    run.logger.log({"step": run.step, "event": "done", "stop_reason": stop_reason,
                    "wall_time_s": round(run.wall_time_before + run.elapsed(), 1)})
    run.logger.finish()
    return {
        "output_dir": str(output_dir),
        "checkpoint": str(run.ckpt_dir / "final.safetensors"),
        "resume_path": str(run.ckpt_dir / RESUME_NAME),
        "step": run.step,
        "stop_reason": stop_reason,
        "train_loss": _mean(run.recent[-100:]),
        "val_loss": run.last["val_loss"],
        "val_loss_ema": run.last["val_loss_ema"],
        "rollout": run.last["rollout"],
        "policy_config": run.policy_config.to_dict(),
    }


def fit_normalizer(policy: LowdimPolicy, dataset: SequenceDataset | PushTImageDataset) -> None:
    """DP's normalizer: 'limits' fitted to the whole buffer; an image policy's cameras DP's fixed [0, 1] range."""
    policy.normalizer.fit(dataset.get_normalizer_data())
    if not isinstance(policy, ImagePolicy):
        return
    r = IMAGE_RANGE_NORMALIZER
    with torch.no_grad():
        for key, (_, kind) in policy.obs_keys.items():
            if kind != RGB:
                continue
            field = policy.normalizer.params_dict[policy.normalizer_fields[key]]
            field.scale.fill_(r["scale"])
            field.offset.fill_(r["offset"])
            for stat in ("min", "max", "mean", "std"):
                getattr(field.input_stats, stat).fill_(r[stat])


def _fingerprint(dataset: SequenceDataset | PushTImageDataset) -> str:
    """sha256 of the episode ends, observations and actions: names the exact data a checkpoint saw."""
    h = hashlib.sha256()
    arrays = dataset.fingerprint_arrays() if hasattr(dataset, "fingerprint_arrays") else (
        dataset.episode_ends, dataset.obs.numpy(), dataset.action.numpy())
    for arr in arrays:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except Exception:
        pass
    return []


__all__ = [
    "EMA",
    "build_image_policy_config",
    "build_policy_config",
    "fit_normalizer",
    "is_image_task",
    "make_datasets",
    "make_lr_scheduler",
    "rollout",
    "train",
    "validation_loss",
]
