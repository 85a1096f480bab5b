"""Scripted PushT expert: sample-based push planning with an exact physics model.

Why a planner: PushT needs ~1 px / 1 deg precision (coverage > 0.95) and the block only moves while
it is pushed (pymunk ``space.damping = 0`` removes all velocity each substep), so the task is a
sequence of quasi-static pushes.  Which push to make next is found by trying many: at each decision
we sample candidate pushes (a contact point on the T's outline or an outer corner, a push direction
near the inward normal, a push length scaled by the current pose error), expand each into a full
action sequence (retreat from the block, travel around it at a safe radius, approach along the
push direction, push, hold, back off), simulate it in a private copy of the physics and execute the
best one open loop, then re-plan.  Because every plan ends with the agent backed off (out of
contact), the next plan's simulation starts from a state the model reproduces exactly (pymunk's
contact cache, which cannot be copied, is empty then).

Cost of a candidate: ``log(mean keypoint error + 0.5) + step_cost * n_steps`` at the end of the
sequence (keypoint error = mean distance in px between the block's 9 keypoints and the goal's).

Actions are absolute agent targets in [0, 512]^2 (what gym-pusht's ``step`` takes), rounded to
float32 before being sent so that the recorded actions are bit-identical to the ones executed.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium
import numpy as np
from gym_pusht.envs.pusht import PushTEnv

from .env import GOAL_POSE, KEYPOINTS_LOCAL, make_env

# Block geometry in its local frame (see env.py).
_C = np.array([0.0, 45.0])  # centre of gravity, also the centre of the travel circle
AGENT_R = 15.0

# Edges of the T outline: (start point, end point, outward normal).  Parameter ranges are narrowed so
# that the straight approach ray along the normal clears the rest of the T for an agent of radius 15.
_EDGES = [
    ((-60.0, 0.0), (60.0, 0.0), (0.0, -1.0)),  # bar top (y = 0 side)
    ((60.0, 0.0), (60.0, 30.0), (1.0, 0.0)),  # bar right end
    ((30.0, 30.0), (60.0, 30.0), (0.0, 1.0)),  # bar underside, right of stem
    ((15.0, 45.0), (15.0, 120.0), (1.0, 0.0)),  # stem right side
    ((-15.0, 120.0), (15.0, 120.0), (0.0, 1.0)),  # stem end
    ((-15.0, 45.0), (-15.0, 120.0), (-1.0, 0.0)),  # stem left side
    ((-60.0, 30.0), (-30.0, 30.0), (0.0, 1.0)),  # bar underside, left of stem
    ((-60.0, 0.0), (-60.0, 30.0), (-1.0, 0.0)),  # bar left end
]
_S2 = math.sqrt(0.5)
_CORNERS = [
    ((60.0, 0.0), (_S2, -_S2)),
    ((-60.0, 0.0), (-_S2, -_S2)),
    ((60.0, 30.0), (_S2, _S2)),
    ((-60.0, 30.0), (-_S2, _S2)),
    ((15.0, 120.0), (_S2, _S2)),
    ((-15.0, 120.0), (-_S2, _S2)),
]


def _goal_keypoints() -> np.ndarray:
    c, s = math.cos(GOAL_POSE[2]), math.sin(GOAL_POSE[2])
    rot = np.array([[c, -s], [s, c]])
    return KEYPOINTS_LOCAL @ rot.T + GOAL_POSE[:2]


_GOAL_KP = _goal_keypoints()


def pose_error(pos: tuple[float, float] | np.ndarray, angle: float) -> float:
    """Mean keypoint distance (px) between a block pose and the goal pose."""
    c, s = math.cos(angle), math.sin(angle)
    kx = c * KEYPOINTS_LOCAL[:, 0] - s * KEYPOINTS_LOCAL[:, 1] + pos[0]
    ky = s * KEYPOINTS_LOCAL[:, 0] + c * KEYPOINTS_LOCAL[:, 1] + pos[1]
    return float(np.mean(np.hypot(kx - _GOAL_KP[:, 0], ky - _GOAL_KP[:, 1])))


class PhysicsModel:
    """A private gym-pusht physics world used to predict the outcome of an action sequence.

    Each rollout builds a fresh pymunk space (cheap next to the rollout) so no contact cache leaks
    between candidates; the PD control law and substeps are copied from ``PushTEnv.step`` with
    the same floating point operations, so out-of-contact start states are reproduced exactly.
    """

    def __init__(self) -> None:
        self.env = PushTEnv(obs_type="state")
        self.env._setup()
        self.n_sub = int(1 / (self.env.dt * self.env.control_hz))

    def rollout(
        self,
        agent_pos: np.ndarray,
        agent_vel: np.ndarray,
        block_pos: np.ndarray,
        block_angle: float,
        actions: np.ndarray,
        record: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Simulate ``actions`` (T, 2) from the given state.

        Returns:
            final state (6,) ``[agent_x, agent_y, block_x, block_y, block_angle, err]`` and, if
            ``record``, the per-step block poses (T, 3) after each action.
        """
        e = self.env
        e._setup()
        agent, block, space = e.agent, e.block, e.space
        block.angle = float(block_angle)  # angle first: the position setter then places the origin exactly
        block.position = (float(block_pos[0]), float(block_pos[1]))
        agent.position = (float(agent_pos[0]), float(agent_pos[1]))
        agent.velocity = (float(agent_vel[0]), float(agent_vel[1]))
        kp, kv, dt = float(e.k_p), float(e.k_v), e.dt
        poses = np.empty((len(actions), 3)) if record else None
        for i, a in enumerate(actions):
            ax, ay = float(a[0]), float(a[1])
            for _ in range(self.n_sub):
                px, py = agent.position
                vx, vy = agent.velocity
                accx = kp * (ax - px) + kv * (0.0 - vx)
                accy = kp * (ay - py) + kv * (0.0 - vy)
                agent.velocity = (vx + accx * dt, vy + accy * dt)
                space.step(dt)
            if record:
                poses[i] = (*block.position, block.angle)
        bp = block.position
        out = np.array([*agent.position, bp[0], bp[1], block.angle, pose_error(bp, block.angle)])
        return out, poses


def _rot(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s], [s, c]])


def _ray_exit(p: np.ndarray, d: np.ndarray, radius: float) -> float:
    """Smallest t >= 0 such that |p + d t - C| >= radius (d unit)."""
    w = p - _C
    b = float(w @ d)
    disc = b * b - float(w @ w) + radius * radius
    if disc <= 0:
        return 0.0
    return max(0.0, -b + math.sqrt(disc))


def _dist_to_t(pt: np.ndarray) -> float:
    """Distance (px) from a block-frame point to the T (0 inside)."""
    best = math.inf
    for x0, x1, y0, y1 in ((-60.0, 60.0, 0.0, 30.0), (-15.0, 15.0, 30.0, 120.0)):
        dx = max(x0 - pt[0], 0.0, pt[0] - x1)
        dy = max(y0 - pt[1], 0.0, pt[1] - y1)
        best = min(best, math.hypot(dx, dy))
    return best


def _segment_clear(a: np.ndarray, b: np.ndarray, clearance: float) -> bool:
    """Whether every point of segment a-b (block frame) is at least ``clearance`` px from the T."""
    n = max(1, int(math.ceil(float(np.linalg.norm(b - a)) / 3.0)))
    return all(_dist_to_t(a + (b - a) * (k / n)) >= clearance for k in range(n + 1))


def _segment(a: np.ndarray, b: np.ndarray, step: float) -> list[np.ndarray]:
    """Points from a (exclusive) to b (inclusive) spaced about ``step`` apart."""
    dist = float(np.linalg.norm(b - a))
    n = max(1, int(math.ceil(dist / step - 1e-9)))
    return [a + (b - a) * (k / n) for k in range(1, n + 1)]


class PushTExpert:
    """Scripted PushT expert (see module docstring).

    Args:
        seed: seeds the candidate sampler; with a seeded env the whole episode is deterministic.
        n_candidates: candidate pushes simulated per decision.
        travel_speed: px per control step when moving around the block.
        max_push_speed: px per control step while pushing.
        clear_radius: radius (px, around the block's centre of gravity) of the travel circle; the T
            reaches 76.5 px from it, the agent has radius 15.
        step_cost: cost per control step added to ``log(err + 0.5)``.
    """

    def __init__(
        self,
        seed: int = 0,
        n_candidates: int = 128,
        travel_speed: float = 22.0,
        max_push_speed: float = 12.0,
        clear_radius: float = 98.0,
        step_cost: float = 0.004,
        direct_paths: bool = True,
        direct_clearance: float = 6.0,
    ) -> None:
        self.direct_paths = direct_paths
        self.direct_clearance = direct_clearance
        self.seed = seed
        self.n_candidates = n_candidates
        self.travel_speed = travel_speed
        self.max_push_speed = max_push_speed
        self.clear_radius = clear_radius
        self.step_cost = step_cost
        self.model = PhysicsModel()
        self.reset()

    def reset(self) -> None:
        """Forget the current plan and re-seed the sampler (call at the start of every episode)."""
        self.rng = np.random.default_rng(self.seed)
        self._queue: list[np.ndarray] = []
        self._last_normal: np.ndarray | None = None
        self.n_plans = 0

    # ------------------------------------------------------------------ planning
    def _sample_push(self, err: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """One candidate push in the block frame: (contact point, push dir, outward normal, length)."""
        rng = self.rng
        if rng.random() < 0.2:
            p, n = _CORNERS[rng.integers(len(_CORNERS))]
            p, n = np.array(p), np.array(n)
            tilt = rng.uniform(-0.7, 0.7)
        else:
            a, b, n = _EDGES[rng.integers(len(_EDGES))]
            a, b, n = np.array(a), np.array(b), np.array(n)
            p = a + (b - a) * rng.random()
            tilt = rng.uniform(-0.5, 0.5) * (rng.random() < 0.7)
        d = _rot(tilt) @ (-n)
        length = float(np.clip(err * math.exp(rng.uniform(math.log(0.15), math.log(1.6))), 0.4, 160.0))
        return p, d, n, length

    def _build(
        self, agent_local: np.ndarray, p: np.ndarray, d: np.ndarray, length: float
    ) -> list[np.ndarray]:
        """Action targets (block frame) for one push: retreat, go round, approach, push, hold, back off."""
        R, v = self.clear_radius, self.travel_speed
        pts: list[np.ndarray] = []
        cur = agent_local
        gap = 4.0
        pre = p - d * (AGENT_R + gap)
        end = p - d * AGENT_R + d * length
        vp = float(np.clip(length / 3.0, 1.5, self.max_push_speed))
        far = p - d * (AGENT_R + 3.0 * self.direct_clearance)
        if self.direct_paths and _segment_clear(cur, far, AGENT_R + self.direct_clearance):
            # straight to the approach ray when that does not pass near the T
            pts += _segment(cur, far, v)
            pts += _segment(far, pre, v)
            pts += _segment(pre, end, vp)
            pts += [end, end]
            pts += _segment(end, end - d * 18.0, 9.0)
            return pts
        # 1. retreat out of the clear circle (along the last push's normal if we just pushed)
        if np.linalg.norm(cur - _C) < R:
            if self._last_normal is not None:
                rd = self._last_normal
            else:
                rd = cur - _C
                rd = rd / max(np.linalg.norm(rd), 1e-6)
            t = _ray_exit(cur, rd, R)
            nxt = cur + rd * t
            pts += _segment(cur, nxt, v)
            cur = nxt
        # 2. staging point on the approach ray, outside the clear circle
        t_s = max(_ray_exit(p, -d, R), AGENT_R + 8.0)
        stage = p - d * t_s
        # 3. travel around the circle (radius interpolated) from cur to stage
        w0, w1 = cur - _C, stage - _C
        r0, r1 = float(np.linalg.norm(w0)), float(np.linalg.norm(w1))
        th0, th1 = math.atan2(w0[1], w0[0]), math.atan2(w1[1], w1[0])
        dth = (th1 - th0 + math.pi) % (2 * math.pi) - math.pi
        arc = abs(dth) * max(r0, r1)
        straight = float(np.linalg.norm(w1 - w0))
        if abs(dth) > 0.35 or straight > 1.5 * v:
            n_arc = max(1, int(math.ceil(max(arc, straight) / v)))
            for k in range(1, n_arc + 1):
                f = k / n_arc
                th = th0 + dth * f
                r = max(r0 + (r1 - r0) * f, R if f < 1 else 0.0)
                pts.append(_C + r * np.array([math.cos(th), math.sin(th)]))
            pts[-1] = stage
        elif straight > 1e-6:
            pts.append(stage)
        cur = stage
        # 4. approach to just before contact, then push through
        if float(np.linalg.norm(pre - cur)) > 1e-6 and float((pre - cur) @ d) > 0:
            pts += _segment(cur, pre, v)
            cur = pre
        pts += _segment(cur, end, vp)
        # 5. hold so the agent settles on the target, then back off
        pts += [end, end]
        back = end - d * 18.0
        pts += _segment(end, back, 9.0)
        return pts

    def plan(self, env: gymnasium.Env) -> dict[str, Any]:
        """Sample, simulate and pick the best candidate; fills the action queue. Returns plan stats."""
        u = env.unwrapped
        apos = np.array(u.agent.position, dtype=np.float64)
        avel = np.array(u.agent.velocity, dtype=np.float64)
        bpos = np.array(u.block.position, dtype=np.float64)
        bang = float(u.block.angle)
        err0 = pose_error(bpos, bang)
        rot = _rot(bang)
        agent_local = rot.T @ (apos - bpos)
        best: tuple[float, np.ndarray, np.ndarray, float] | None = None
        for _ in range(self.n_candidates):
            p, d, n, length = self._sample_push(err0)
            local = np.array(self._build(agent_local, p, d, length))
            world = local @ rot.T + bpos
            acts = np.clip(world, 0.0, 512.0).astype(np.float32)
            out, _ = self.model.rollout(apos, avel, bpos, bang, acts)
            cost = math.log(out[5] + 0.5) + self.step_cost * len(acts)
            if best is None or cost < best[0]:
                best = (cost, acts, n, float(out[5]))
        assert best is not None
        self._queue = list(best[1])
        self._last_normal = best[2]
        self.n_plans += 1
        return {"err0": err0, "pred_err": best[3], "n_steps": len(best[1])}

    def act(self, env: gymnasium.Env) -> np.ndarray:
        """Next action (2,) float32 absolute target; plans when the current plan is used up."""
        if not self._queue:
            self.plan(env)
        return self._queue.pop(0)


def run_expert_episode(
    seed: int,
    max_steps: int = 300,
    target_coverage: float = 0.97,
    hold_steps: int = 0,
    img: bool = False,
    expert_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the expert from gym-pusht's start state for ``env.reset(seed=seed)``.

    Records DiffusionPolicy's pairing: ``states[t]`` is the observation seen before ``actions[t]``.
    Recording stops once coverage >= ``target_coverage`` (plus ``hold_steps`` steps repeating the last
    action).

    Returns:
        dict with ``states`` (N, 5) float32 (angle wrapped to [0, 2pi) as gym-pusht reports it),
        ``actions`` (N, 2) float32, ``img`` (N, 96, 96, 3) uint8 if ``img``, ``success`` (bool, target
        coverage reached), ``coverage`` (final), ``max_coverage``, ``length`` (N), ``seed``.
    """
    env = make_env(render_mode="rgb_array" if img else None, keypoints=False)
    expert = PushTExpert(seed=seed, **(expert_kwargs or {}))
    obs, _ = env.reset(seed=seed)
    states, actions, imgs = [], [], []
    coverage, max_cov, success = 0.0, 0.0, False
    hold_left = -1
    for _ in range(max_steps):
        if hold_left == 0:
            break
        action = actions[-1] if hold_left > 0 else expert.act(env)
        states.append(np.asarray(obs, dtype=np.float32))
        if img:
            imgs.append(env.unwrapped._render(visualize=False))
        actions.append(np.asarray(action, dtype=np.float32))
        obs, _, _, truncated, info = env.step(actions[-1])
        coverage = float(info["coverage"])
        max_cov = max(max_cov, coverage)
        if hold_left > 0:
            hold_left -= 1
        elif coverage >= target_coverage:
            success = True
            hold_left = hold_steps
        if truncated:
            break
    env.close()
    out: dict[str, Any] = {
        "states": np.stack(states).astype(np.float32),
        "actions": np.stack(actions).astype(np.float32),
        "success": success,
        "coverage": coverage,
        "max_coverage": max_cov,
        "length": len(actions),
        "seed": seed,
        "n_plans": expert.n_plans,
    }
    if img:
        out["img"] = np.stack(imgs).astype(np.uint8)
    return out
