"""DiffusionPolicy (Chi et al.) integration: read its workspace ``.ckpt`` files, patch live policies.

Why: people who trained with DiffusionPolicy have ``.ckpt`` workspace checkpoints and
running ``DiffusionUnetLowdimPolicy`` objects. This module lets them keep both:

* :func:`read_diffusion_policy_checkpoint` turns a ``.ckpt`` into the ``(state_dict,
  config)`` pair of para_policy's own :class:`~para_policy.policy.LowdimPolicy`, without
  importing ``diffusion_policy`` (it is not on PyPI). ``load_policy('x.ckpt')`` uses it.
* :func:`patch_diffusion_policy` swaps the sampling loop of a live DiffusionPolicy policy
  object (``conditional_sample``) for para_policy's samplers; :func:`unpatch` restores it.

The ``.ckpt`` format (``BaseWorkspace.save_checkpoint``): ``torch.save(payload,
pickle_module=dill)`` of ``{'cfg': DictConfig (Hydra config, possibly unresolved),
'state_dicts': {'model', 'ema_model' (when training.use_ema), 'optimizer'}, 'pickles':
{'global_step', 'epoch'} (dill bytes)}``. Policy weights are ``model.*`` (the
ConditionalUnet1D) and ``normalizer.params_dict.{obs,action}.*``.

Security: a ``.ckpt`` is a pickle, and plain unpickling runs code chosen by whoever wrote
the file. It is read with a restricted unpickler (:mod:`.restricted_pickle`) that rebuilds
only tensors, the OmegaConf config and plain data and refuses any other global before it
runs; ``trust_pickle=True`` opts into full unpickling. para_policy's own ``.safetensors``
checkpoints hold no pickle at all; convert once with
``save_checkpoint(path, policy.state_dict(), policy.config)``.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from para_policy.policy_config import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_FEATURE_DIM,
    MAX_INTERPOLATION_CHARS,
    MAX_INTERPOLATIONS,
    MAX_RESOLVED_NODES,
    PolicyConfig,
    config_int,
    plain_config,
)
from para_policy.samplers import SamplerConfig, SampleStats, draw_noise, sampler_spec
from para_policy.schedule import Schedule
from para_policy.session import SamplingSession, WindowIdentity
from para_policy.window import Problem, calibrate_window, model_fingerprint

LOWDIM_TARGET = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
TRANSFORMER_LOWDIM_TARGET = ("diffusion_policy.policy.diffusion_transformer_lowdim_policy."
                             "DiffusionTransformerLowdimPolicy")
IMAGE_TARGET = "diffusion_policy.policy.diffusion_unet_image_policy.DiffusionUnetImagePolicy"
HYBRID_TARGET = "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"
UNET_TARGET = "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"
TRANSFORMER_TARGET = "diffusion_policy.model.diffusion.transformer_for_diffusion.TransformerForDiffusion"
UNET_ARGS = ("input_dim", "local_cond_dim", "global_cond_dim", "diffusion_step_embed_dim", "down_dims",
             "kernel_size", "n_groups", "cond_predict_scale")
TRANSFORMER_ARGS = ("input_dim", "output_dim", "horizon", "n_obs_steps", "cond_dim", "n_layer", "n_head", "n_emb",
                    "p_drop_emb", "p_drop_attn", "causal_attn", "time_as_cond", "obs_as_cond", "n_cond_layers")
REQUIRED_POLICY_KEYS = ("model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
                        "n_obs_steps")
OPTIONAL_POLICY_KEYS = ("num_inference_steps", "obs_as_local_cond", "obs_as_global_cond", "pred_action_steps_only",
                        "oa_step_convention", "obs_as_cond")
IMAGE_POLICY_KEYS = ("shape_meta", "noise_scheduler", "horizon", "n_action_steps", "n_obs_steps")
IMAGE_OPTIONAL_KEYS = ("num_inference_steps", "obs_as_global_cond", "diffusion_step_embed_dim", "down_dims",
                       "kernel_size", "n_groups", "cond_predict_scale")
#: DiffusionUnet(Hybrid)ImagePolicy's UNet arguments and their defaults
IMAGE_UNET_DEFAULTS = {"diffusion_step_embed_dim": 256, "down_dims": [256, 512, 1024], "kernel_size": 5, "n_groups": 8,
                       "cond_predict_scale": True}
IMAGE_ENCODER_KEYS = {IMAGE_TARGET: ("obs_encoder",),
                      HYBRID_TARGET: ("crop_shape", "obs_encoder_group_norm", "eval_fixed_crop")}
IGNORED_WEIGHTS = ("_dummy_variable", "mask_generator._dummy_variable", "model._dummy_variable")
WEIGHT_PREFIXES = ("model.", "normalizer.params_dict.obs.", "normalizer.params_dict.action.")
IMAGE_WEIGHT_PREFIXES = ("model.", "obs_encoder.", "normalizer.params_dict.")

# ---- a restricted evaluator for DiffusionPolicy's ${eval:...} expressions ---------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
#: an ${eval:...} computes with integers of at most this many bits (a config's sizes and counts), so
#: ``((10**64)**64)**64`` is refused at its first power instead of computing a number of millions of digits
EVAL_INT_BITS = 64
#: nesting of an ${eval:...} expression (parentheses, operators)
EVAL_MAX_DEPTH = 50


class _Arithmetic:
    """One ``${eval:...}`` expression, evaluated node by node with every intermediate result bounded."""

    def __init__(self, expression: str) -> None:
        self.expression = expression

    def fail(self, what: str) -> ValueError:
        shown = self.expression if len(self.expression) <= 100 else self.expression[:100] + "..."
        return ValueError(f"${{eval:...}}: {what} in {shown!r}")

    def number(self, v: Any) -> Any:
        if isinstance(v, (int, float)):  # bool is an int
            return v
        raise self.fail(f"arithmetic on a non-number {str(v)[:40]!r}")

    def bounded(self, v: Any) -> Any:
        """``v`` if it is an integer of at most :data:`EVAL_INT_BITS` bits or a finite float."""
        if isinstance(v, int) and v.bit_length() > EVAL_INT_BITS:
            raise self.fail(f"a result of {v.bit_length()} bits is too large (at most {EVAL_INT_BITS})")
        if isinstance(v, float) and not math.isfinite(v) or isinstance(v, complex):
            raise self.fail(f"the result {v!r} is not a finite real number")
        return v

    def binary(self, node: ast.BinOp, depth: int) -> Any:
        a, b = self.number(self.ev(node.left, depth)), self.number(self.ev(node.right, depth))
        if isinstance(node.op, ast.Pow):
            if abs(b) > 64:
                raise self.fail(f"exponent {b} too large")
            if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 \
                    and b * math.log2(abs(a)) > EVAL_INT_BITS:
                raise self.fail(f"{a}**{b} is too large (results are integers of at most {EVAL_INT_BITS} bits)")
        try:
            return self.bounded(_BINARY[type(node.op)](a, b))
        except (ArithmeticError, ValueError) as e:  # division by zero, float overflow
            if isinstance(e, ValueError) and str(e).startswith("${eval"):
                raise
            raise self.fail(f"{type(e).__name__}: {e}") from None

    def boolean(self, node: ast.BoolOp, depth: int) -> Any:
        stop_on = not isinstance(node.op, ast.And)  # and: stop at the first falsy value; or: at the first truthy
        value: Any = not stop_on
        for e in node.values:
            value = self.ev(e, depth)
            if bool(value) == stop_on:
                return value
        return value

    def compare(self, node: ast.Compare, depth: int) -> bool:
        left = self.ev(node.left, depth)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.ev(right_node, depth)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def ev(self, node: ast.AST, depth: int = 0) -> Any:
        if depth > EVAL_MAX_DEPTH:
            raise self.fail(f"expression nested more than {EVAL_MAX_DEPTH} levels")
        depth += 1
        if isinstance(node, ast.Expression):
            return self.ev(node.body, depth)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return self.bounded(node.value) if isinstance(node.value, (int, float)) else node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.ev(e, depth) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            v = self.ev(node.operand, depth)
            return _UNARY[type(node.op)](v if isinstance(node.op, ast.Not) else self.number(v))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.binary(node, depth)
        if isinstance(node, ast.BoolOp):
            return self.boolean(node, depth)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            return self.compare(node, depth)
        if isinstance(node, ast.IfExp):
            return self.ev(node.body, depth) if self.ev(node.test, depth) else self.ev(node.orelse, depth)
        raise self.fail(f"{type(node).__name__} is not allowed; only arithmetic, comparisons, and/or/not, "
                        "conditionals and literals are evaluated")


def safe_eval(expression: Any) -> Any:
    """Evaluate the arithmetic / conditional expressions DiffusionPolicy configs put in ``${eval:...}``.

    Why not Python's ``eval`` (which DiffusionPolicy registers): a config is data, and a
    resolver that runs arbitrary code would make loading one run that code. This accepts
    literals (numbers, strings, True/False/None), ``+ - * / // % **`` on numbers,
    ``not/and/or``, comparisons, ``a if c else b`` and tuples/lists of those, e.g.
    ``'2 if False or True else 20 + 2'``; anything else (names, calls, attributes,
    subscripts) raises ``ValueError``. Work is bounded: at most ``MAX_INTERPOLATION_CHARS``
    characters, :data:`EVAL_MAX_DEPTH` levels, integers of :data:`EVAL_INT_BITS` bits (a power is
    refused before it is computed) and finite floats. Non-string values (an interpolation that
    resolved to a number) are returned unchanged.
    """
    if not isinstance(expression, str):
        return expression
    if len(expression) > MAX_INTERPOLATION_CHARS:
        raise ValueError(f"${{eval:...}}: an expression of {len(expression)} characters, more than "
                         f"{MAX_INTERPOLATION_CHARS} (MAX_INTERPOLATION_CHARS)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"${{eval:...}}: cannot parse {expression[:100]!r}: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ValueError(f"${{eval:...}}: cannot parse {expression[:100]!r}: nested too deeply") from None
    return _Arithmetic(expression).ev(tree)


def register_eval_resolver() -> bool:
    """Register :func:`safe_eval` as OmegaConf's ``eval`` resolver unless one is registered already.

    Returns True when it registered. An ``eval`` resolver registered earlier (e.g. by
    DiffusionPolicy's own training script) is left in place.
    """
    from omegaconf import OmegaConf

    if OmegaConf.has_resolver("eval"):
        return False
    OmegaConf.register_new_resolver("eval", safe_eval)
    return True


# ---- .ckpt → LowdimPolicy config and state dict ----------------------------------------

def _resolved(cfg: Any, key: str, problems: list[str]) -> Any:
    """``cfg[key]`` (a dotted key) resolved to plain Python, or None (absent, or a problem recorded in one line)."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as e:  # omegaconf raises several kinds for bad interpolations
        where = getattr(e, "full_key", None) or key
        message = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        problems.append(f"cfg.{where} cannot be resolved ({type(e).__name__}: {message})")
        return None


# ---- checking a workspace cfg before OmegaConf resolves any of it ------------------------

#: the keys this module resolves: the policy section and the EMA flag
RESOLVED_KEYS = ("policy", "training.use_ema")
#: the resolvers a checkpoint's config may use. OmegaConf's own (``oc.env``, ``oc.decode``, ``oc.create``,
#: ...) and any other registered in the process read the environment, files or state, so a file's config
#: never reaches them; ``${eval:...}`` is evaluated by :func:`safe_eval` whatever ``eval`` resolver the
#: process registered (DiffusionPolicy's own is Python's ``eval``).
ALLOWED_RESOLVERS = frozenset({"eval"})
#: the private name :func:`safe_eval` is registered under for reading files
SAFE_EVAL_RESOLVER = "para_policy.safe_eval"
_Path = tuple[Any, ...]


def _dotted(path: _Path) -> str:
    return "cfg" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path)


def _omegaconf_content(value: Any) -> Any:
    """An OmegaConf node's raw content (a container's dict / list / None / string, a leaf's value), unresolved.

    Read from the node's ``__dict__``: OmegaConf's accessors would resolve interpolations, and an
    unpickled node's internals are whatever the file wrote.
    """
    from omegaconf import Container, ValueNode

    if isinstance(value, Container):
        return object.__getattribute__(value, "__dict__").get("_content")
    if isinstance(value, ValueNode):
        return object.__getattribute__(value, "__dict__").get("_val")
    return value


def _parse_interpolations(text: str, where: str) -> tuple[list[tuple[int, list[str]]], list[Any], bool]:
    """A string's references ``(leading dots, keys)``, its resolver-name nodes and whether it is one reference."""
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as G
    from omegaconf.grammar_parser import parse

    if len(text) > MAX_INTERPOLATION_CHARS:
        raise ValueError(f"{where} is a string of {len(text)} characters with interpolations, more than "
                         f"{MAX_INTERPOLATION_CHARS} (MAX_INTERPOLATION_CHARS)")
    try:
        tree = parse(text)
    except Exception as e:  # GrammarParseError, RecursionError
        raise ValueError(f"{where} is not a valid interpolation ({type(e).__name__})") from None
    refs: list[tuple[int, list[str]]] = []
    names: list[Any] = []
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        children = list(node.getChildren()) if hasattr(node, "getChildren") else []
        dynamic = isinstance(node, (G.ConfigKeyContext, G.ResolverNameContext)) and any(
            isinstance(c, G.InterpolationContext) for c in children)
        if dynamic:
            raise ValueError(f"{where} computes a key or resolver name from an interpolation, which is not read "
                             "from a checkpoint's config")
        if isinstance(node, G.ResolverNameContext):
            names.append(node)
        elif isinstance(node, G.InterpolationNodeContext):
            keys = [c.getText() for c in children if isinstance(c, G.ConfigKeyContext)]
            first = next((i for i, c in enumerate(children) if isinstance(c, G.ConfigKeyContext)), len(children))
            refs.append((sum(c.getText() == "." for c in children[:first]), keys))
            stack.extend(c for c in children if isinstance(c, G.ConfigKeyContext))
            continue
        stack.extend(children)
    whole = len(refs) == 1 and not names and text.startswith("${") and text.endswith("}") \
        and text.count("${") == 1
    return refs, names, whole


class _Interpolations:
    """What resolving :data:`RESOLVED_KEYS` of a plain config tree would do, worked out without resolving.

    Every string with interpolations that those keys reach is parsed with OmegaConf's own grammar;
    a resolver other than :data:`ALLOWED_RESOLVERS` is refused naming the key (nothing is resolved,
    so no value can appear in the message). OmegaConf resolves a reference each time it is reached:
    the count of resolutions and the size of the text they produce are added up over the
    references (each node worked out once), and a key whose resolution would exceed
    :data:`MAX_INTERPOLATIONS` or :data:`MAX_CONFIG_BYTES` is refused. The nodes reached are kept
    (:meth:`pruned`), at most :data:`MAX_RESOLVED_NODES`.
    """

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree
        self.memo: dict[_Path, tuple[int, int]] = {}
        self.active: set[_Path] = set()
        self.rewritten: dict[_Path, str] = {}

    def node(self, path: _Path) -> Any:
        node: Any = self.tree
        for key in path:
            node = node[key]
        return node

    def child(self, path: _Path, key: str) -> _Path | None:
        """``path + (key,)`` as the tree spells the key (a list index, a dict's string or integer key), or None."""
        node = self.node(path)
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            return (*path, int(key))
        if isinstance(node, dict):
            for candidate in (key, int(key) if key.lstrip("-").isdigit() else key):
                if candidate in node:
                    return (*path, candidate)
        return None

    def locate(self, path: _Path, dots: int, keys: list[str], depth: int) -> tuple[_Path, list[_Path]]:
        """The node a reference in the string at ``path`` names, and the references it looks through."""
        where, hops = _dotted(path), []
        container = path[:-1]
        if dots - 1 > len(container):
            raise ValueError(f"{where} refers above the config's root")
        current = () if dots == 0 else container[:len(container) - (dots - 1)]
        for key in keys:
            node = self.node(current)
            while isinstance(node, str):  # ${a.b} where a is itself ${x}: OmegaConf follows x
                refs, _, whole = _parse_interpolations(node, _dotted(current)) if "${" in node else ([], [], False)
                if not whole or len(hops) > MAX_CONFIG_DEPTH:
                    raise ValueError(f"{where} looks inside {_dotted(current)}, which is not a mapping or a list")
                hops.append(current)
                current, more = self.locate(current, *refs[0], depth + 1)
                hops += more
                node = self.node(current)
            found = self.child(current, key)
            if found is None:
                raise ValueError(f"{where} refers to {'.' * dots}{'.'.join(keys)}, which is not in the config")
            current = found
        return current, hops

    def visit(self, path: _Path, depth: int, direct: bool) -> tuple[int, int]:
        """``(interpolations resolved, bytes produced)`` in resolving ``path``; refused past the limits."""
        if depth > 2 * MAX_CONFIG_DEPTH:
            raise ValueError(f"{_dotted(path)}: its interpolations nest more than {2 * MAX_CONFIG_DEPTH} levels")
        if path not in self.memo:
            if path in self.active:
                raise ValueError(f"{_dotted(path)}: its interpolations refer back to it")
            self.active.add(path)
            node = self.node(path)
            if isinstance(node, (dict, list)):
                keys = node if isinstance(node, dict) else range(len(node))
                totals = [self.visit((*path, k), depth + 1, direct) for k in keys]
                self.memo[path] = (sum(t[0] for t in totals), sum(t[1] for t in totals) + 8)
            elif isinstance(node, str) and "${" in node:
                self.memo[path] = self.string(path, node, depth)
            else:
                self.memo[path] = (0, len(node) if isinstance(node, (str, bytes)) else 8)
            self.active.discard(path)
        count, size = self.memo[path]
        if direct and count > MAX_INTERPOLATIONS:
            raise ValueError(f"{_dotted(path)}: resolving it would expand {count} interpolations, more than "
                             f"{MAX_INTERPOLATIONS} (MAX_INTERPOLATIONS; OmegaConf resolves a reference each time "
                             "it is reached)")
        if direct and size > MAX_CONFIG_BYTES:
            raise ValueError(f"{_dotted(path)}: resolving it would produce about {size} bytes, more than "
                             f"{MAX_CONFIG_BYTES} (MAX_CONFIG_BYTES)")
        return count, size

    def string(self, path: _Path, text: str, depth: int) -> tuple[int, int]:
        refs, names, _ = _parse_interpolations(text, _dotted(path))
        refused = sorted({n.getText() for n in names} - ALLOWED_RESOLVERS)
        if refused:
            raise ValueError(f"{_dotted(path)} uses the resolver ${{{refused[0]}:...}}, which is not resolved from a "
                             f"checkpoint's config (allowed: {sorted(ALLOWED_RESOLVERS)} and references to other "
                             "keys); nothing was resolved")
        for name in sorted(names, key=lambda n: n.start.start, reverse=True):  # eval → the private safe_eval
            text = text[:name.start.start] + SAFE_EVAL_RESOLVER + text[name.stop.stop + 1:]
        self.rewritten[path] = text
        count, size = 1, len(text)
        for dots, keys in refs:
            target, hops = self.locate(path, dots, keys, depth)
            for reached in (*hops, target):
                more, produced = self.visit(reached, depth + 1, False)
                count, size = count + more, size + produced
        return count, size

    def pruned(self) -> dict[str, Any]:
        """The tree cut to the nodes reached, ``${eval:`` renamed; list items not reached become None."""
        if len(self.memo) > MAX_RESOLVED_NODES:
            raise ValueError(f"cfg: its policy section reaches {len(self.memo)} nodes, more than "
                             f"{MAX_RESOLVED_NODES} (MAX_RESOLVED_NODES)")
        reached = {path[:i] for path in self.memo for i in range(len(path) + 1)}

        def cut(node: Any, path: _Path) -> Any:
            if path not in reached:
                return None
            if path in self.rewritten:
                return self.rewritten[path]
            if isinstance(node, dict):
                return {k: cut(v, (*path, k)) for k, v in node.items() if (*path, k) in reached}
            if isinstance(node, list):
                return [cut(v, (*path, i)) for i, v in enumerate(node)]
            return node

        return cut(self.tree, ())


def _as_config(cfg: Any) -> Any:
    """A workspace ``cfg`` (a DictConfig, or a mapping) as a fresh DictConfig of what this module resolves.

    Why: the cfg of a ``.ckpt`` is the file's data. It is copied to plain data within bounds first
    (:func:`~para_policy.policy_config.plain_config`: depth, nodes, bytes), then the resolution of
    :data:`RESOLVED_KEYS` is worked out (:class:`_Interpolations`), and only then is OmegaConf
    given the part they reach.
    """
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg) and not isinstance(cfg, Mapping):
        raise ValueError(f"cfg must be an OmegaConf DictConfig or a dict, got {type(cfg).__name__}")
    tree = plain_config(cfg, "cfg", unwrap=_omegaconf_content)
    if not isinstance(tree, dict):
        raise ValueError(f"cfg must be a mapping, got {type(tree).__name__}")
    interpolations = _Interpolations(tree)
    for key in RESOLVED_KEYS:
        path: _Path = ()
        for part in key.split("."):
            node = interpolations.node(path)
            if not isinstance(node, dict) or part not in node:
                break
            path = (*path, part)
        else:
            interpolations.visit(path, 0, True)
    if not OmegaConf.has_resolver(SAFE_EVAL_RESOLVER):
        OmegaConf.register_new_resolver(SAFE_EVAL_RESOLVER, safe_eval)
    return OmegaConf.create(interpolations.pruned())


def _checked_scheduler(policy: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``cfg.policy.noise_scheduler`` as a dict, built once to check it (a failure is added to ``problems``)."""
    from para_policy.schedule import build_scheduler

    scheduler = dict(policy.get("noise_scheduler") or {})
    if "noise_scheduler" in policy:
        try:
            build_scheduler(scheduler)
        except Exception as e:  # unknown _target_, bad kwargs
            problems.append(f"cfg.policy.noise_scheduler: {e}")
    return scheduler


def diffusion_policy_config(cfg: Any) -> dict[str, Any]:
    """LowdimPolicy's config dict from a DiffusionPolicy workspace ``cfg`` (DictConfig or dict).

    Reads ``cfg.policy`` (its ``_target_``, ``model.*`` UNet arguments, ``noise_scheduler.*``
    and the policy arguments). Only ``DiffusionUnetLowdimPolicy`` with global conditioning
    or inpainting is supported. Raises ``ValueError`` listing every problem found.
    """

    register_eval_resolver()
    cfg = _as_config(cfg)
    problems: list[str] = []
    policy = _resolved(cfg, "policy", problems)
    if not isinstance(policy, Mapping):
        if not problems:
            problems.append("cfg has no 'policy' section")
        raise ValueError("not a usable DiffusionPolicy checkpoint config: " + "; ".join(problems))
    target = str(policy.get("_target_", ""))
    if target in (IMAGE_TARGET, HYBRID_TARGET):
        return _image_policy_config(policy, target)
    if target not in (LOWDIM_TARGET, TRANSFORMER_LOWDIM_TARGET):
        name = target.rsplit(".", 1)[-1] or "(none)"
        raise ValueError(
            f"unsupported DiffusionPolicy policy _target_ {target!r} ({name}); para_policy reads "
            + ", ".join(t.rsplit(".", 1)[-1] for t in SUPPORTED_TARGETS) + " checkpoints"
        )
    transformer = target == TRANSFORMER_LOWDIM_TARGET
    missing = [k for k in REQUIRED_POLICY_KEYS if k not in policy]
    if missing:
        problems.append(f"cfg.policy is missing {missing}")
    extra = sorted(set(policy) - {"_target_", *REQUIRED_POLICY_KEYS, *OPTIONAL_POLICY_KEYS})
    if extra:
        problems.append(f"cfg.policy has scheduler.step arguments {extra}, which para_policy does not support")
    if policy.get("obs_as_local_cond", False):
        problems.append("obs_as_local_cond=True (local conditioning) is not supported; expected global "
                        "conditioning or inpainting")
    model = dict(policy.get("model") or {})
    net_target, net_args = (TRANSFORMER_TARGET, TRANSFORMER_ARGS) if transformer else (UNET_TARGET, UNET_ARGS)
    model_target = str(model.pop("_target_", net_target))
    if model_target != net_target:
        problems.append(f"cfg.policy.model._target_ is {model_target!r}, expected {net_target}")
    unknown_args = sorted(set(model) - set(net_args))
    if unknown_args:
        problems.append(f"cfg.policy.model has arguments {net_target.rsplit('.', 1)[-1]} does not take: "
                        f"{unknown_args}")
    if "model" in policy and "input_dim" not in model:
        problems.append("cfg.policy.model is missing input_dim")
    if model.get("local_cond_dim") is not None:
        problems.append("cfg.policy.model.local_cond_dim is set (local conditioning is not supported)")
    model.pop("local_cond_dim", None)
    scheduler = _checked_scheduler(policy, problems)
    if problems:
        raise ValueError("cannot convert this DiffusionPolicy checkpoint: " + "; ".join(problems))
    return {
        # passed as the file has them: PolicyConfig refuses 16.7 or a string rather than truncating or parsing it
        **{key: policy[key] for key in ("horizon", "n_obs_steps", "n_action_steps", "obs_dim", "action_dim")},
        # DiffusionPolicy's defaults (they differ from LowdimPolicy's), set explicitly; its transformer
        # policy calls it obs_as_cond and always starts the executed actions at n_obs_steps - 1
        "model_type": "transformer" if transformer else "unet",
        "num_inference_steps": policy.get("num_inference_steps"),
        "obs_as_global_cond": policy.get("obs_as_cond" if transformer else "obs_as_global_cond", False),
        "pred_action_steps_only": policy.get("pred_action_steps_only", False),
        "oa_step_convention": True if transformer else policy.get("oa_step_convention", False),
        "model": model,
        "noise_scheduler": scheduler,
        "source": {"format": "diffusion_policy.ckpt", "policy_target": target},
    }


SUPPORTED_TARGETS = (LOWDIM_TARGET, TRANSFORMER_LOWDIM_TARGET, IMAGE_TARGET, HYBRID_TARGET)


def _image_policy_config(policy: Mapping[str, Any], target: str) -> dict[str, Any]:
    """ImagePolicy's config from the resolved ``cfg.policy`` of an image or hybrid-image policy."""
    from para_policy.models.vision import multi_image_encoder_from_dp, robomimic_encoder_from_dp

    problems = []
    missing = [k for k in (*IMAGE_POLICY_KEYS, *IMAGE_ENCODER_KEYS[target][:1]) if k not in policy]
    if missing:
        problems.append(f"cfg.policy is missing {missing}")
    extra = sorted(set(policy) - {"_target_", *IMAGE_POLICY_KEYS, *IMAGE_OPTIONAL_KEYS, *IMAGE_ENCODER_KEYS[target]})
    if extra:
        problems.append(f"cfg.policy has scheduler.step arguments {extra}, which para_policy does not support")
    if not policy.get("obs_as_global_cond", True):
        problems.append("obs_as_global_cond=False (inpainting image features) is not supported")
    shape_meta = policy.get("shape_meta") or {}
    obs_meta = shape_meta.get("obs") if isinstance(shape_meta, Mapping) else None
    action_shape = list((shape_meta.get("action") or {}).get("shape", [])) if isinstance(shape_meta, Mapping) else []
    if not isinstance(obs_meta, Mapping) or not obs_meta:
        problems.append("cfg.policy.shape_meta.obs is missing or empty")
    if len(action_shape) != 1:
        problems.append(f"cfg.policy.shape_meta.action.shape must be [action_dim], got {action_shape}")
    for key, meta in obs_meta.items() if isinstance(obs_meta, Mapping) else ():
        shape = meta.get("shape") if isinstance(meta, Mapping) else None
        if not isinstance(shape, list) or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_FEATURE_DIM for d in shape):
            problems.append(f"cfg.policy.shape_meta.obs.{key}.shape must be a list of integers from 1 to "
                            f"{MAX_FEATURE_DIM} (MAX_FEATURE_DIM), got {str(shape)[:60]}")
    scheduler = _checked_scheduler(policy, problems)
    encoder = None
    if not problems:
        try:
            with torch.device("meta"):  # the spec and feature size, without allocating the network
                if target == IMAGE_TARGET:
                    encoder = multi_image_encoder_from_dp(dict(policy["obs_encoder"]), dict(shape_meta))
                else:
                    encoder = robomimic_encoder_from_dp(dict(policy), dict(shape_meta))
        except ValueError as e:
            problems.append(f"cfg.policy observation encoder: {e}")
    if problems:
        raise ValueError("cannot convert this DiffusionPolicy checkpoint: " + "; ".join(problems))
    obs_keys = {str(k): {"shape": [int(d) for d in v["shape"]], "type": str(v.get("type", "low_dim"))}
                for k, v in obs_meta.items()}
    normalizer = {k: {"shape": [1] if v["type"] == "rgb" else v["shape"], "mode": "affine"}
                  for k, v in obs_keys.items()}
    normalizer["action"] = {"shape": action_shape, "mode": "affine"}
    n_obs_steps = config_int("n_obs_steps", policy["n_obs_steps"], "MAX_OBS_STEPS")
    action_dim, feature_dim = config_int("action_dim", action_shape[0], "MAX_FEATURE_DIM"), int(encoder.feature_dim)
    # the network's arguments as the file has them: PolicyConfig checks them, naming the key
    unet = {"input_dim": action_dim, "local_cond_dim": None, "global_cond_dim": feature_dim * n_obs_steps,
            **{key: policy.get(key, default) for key, default in IMAGE_UNET_DEFAULTS.items()}}
    return {
        "horizon": policy["horizon"],
        "n_obs_steps": n_obs_steps,
        "n_action_steps": policy["n_action_steps"],
        "obs_dim": feature_dim,
        "action_dim": action_dim,
        "model_type": "unet",
        "num_inference_steps": policy.get("num_inference_steps"),
        "obs_as_global_cond": True,
        "pred_action_steps_only": False,
        "oa_step_convention": True,  # DiffusionUnet(Hybrid)ImagePolicy executes from n_obs_steps - 1
        "model": unet,
        "noise_scheduler": scheduler,
        "obs_keys": obs_keys,
        "obs_encoder": encoder.spec,
        "normalizer": normalizer,
        "source": {"format": "diffusion_policy.ckpt", "policy_target": target},
    }


def _load_payload(path: Path, trust_pickle: bool) -> Mapping[str, Any]:
    """The workspace payload ``{'cfg', 'state_dicts', ...}`` of a ``.ckpt``, unpickled safely unless trusted."""
    from para_policy.extras import require

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for module in ("dill", "omegaconf"):
        require(module, "diffusion-policy", "reading a DiffusionPolicy .ckpt")
    from para_policy.integrations import restricted_pickle

    try:
        if trust_pickle:
            warnings.warn(f"{path}: unpickling with trust_pickle=True runs any code the file holds", stacklevel=3)
            payload = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            payload = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except restricted_pickle.UnsafeCheckpointError as e:
        raise ValueError(f"{path}: {e}") from None
    except ModuleNotFoundError as e:
        raise ValueError(f"{path}: unpickling needs module {e.name!r}, which is not installed") from e
    except Exception as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict):  # a plain dict: a crafted mapping's methods are not called
        raise ValueError(f"{path}: expected a DiffusionPolicy workspace payload dict, got {type(payload).__name__}")
    problems = [f"payload has no {key!r} (keys: {sorted(map(str, payload))})"
                for key in ("cfg", "state_dicts") if key not in payload]
    if problems:
        raise ValueError(f"{path} is not a DiffusionPolicy workspace checkpoint: " + "; ".join(problems))
    return payload


def _weights_source(path: Path, cfg: Any, state_dicts: Mapping[str, Any], use_ema: bool | None) -> str:
    """``'ema_model'`` or ``'model'``: the state dict DiffusionPolicy's evaluation would run."""
    if not isinstance(state_dicts, dict):
        raise ValueError(f"{path}: state_dicts must be a dict of state dicts, got {type(state_dicts).__name__}")
    if use_ema is None:
        register_eval_resolver()
        flag = _resolved(_as_config(cfg), "training.use_ema", [])
        use_ema = bool(flag) if flag is not None else "ema_model" in state_dicts
    source = "ema_model" if use_ema else "model"
    if source not in state_dicts or not isinstance(state_dicts[source], dict):
        raise ValueError(
            f"{path}: state_dicts has no {source!r} (use_ema={use_ema}); it has {sorted(map(str, state_dicts))[:10]}"
        )
    return source


def _policy_weights(path: Path, raw: Mapping[str, Any], config: dict[str, Any], source: str
                    ) -> dict[str, torch.Tensor]:
    """The policy's tensors of ``state_dicts[source]``; an image policy's normalizer shapes set in ``config``.

    Refuses entries the policy class does not have (an optimizer state, another network).
    """
    state_dict: dict[str, torch.Tensor] = {}
    unexpected = []
    image = "obs_encoder" in config
    for key, value in raw.items():
        if key in IGNORED_WEIGHTS:
            continue
        if not key.startswith(IMAGE_WEIGHT_PREFIXES if image else WEIGHT_PREFIXES) \
                or not isinstance(value, torch.Tensor):
            unexpected.append(key)
            continue
        state_dict[key] = value
    if unexpected:
        raise ValueError(
            f"{path}: state_dicts[{source!r}] has entries a {config['source']['policy_target'].rsplit('.', 1)[-1]} "
            f"does not: {unexpected[:10]}"
            + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
        )
    if image:  # the normalizer's parameter shapes are the file's (DiffusionPolicy's image range is (1,))
        for field, meta in config["normalizer"].items():
            scale = state_dict.get(f"normalizer.params_dict.{field}.scale")
            if scale is None:
                raise ValueError(f"{path}: state_dicts[{source!r}] has no normalizer for {field!r}")
            meta["shape"] = list(scale.shape)
    return state_dict


def read_diffusion_policy_checkpoint(
    path: str | os.PathLike, use_ema: bool | None = None, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a DiffusionPolicy workspace ``.ckpt``: returns ``(state_dict, config)`` for LowdimPolicy.

    The file is unpickled by :class:`~para_policy.integrations.restricted_pickle.RestrictedUnpickler`:
    only tensors, the OmegaConf config and plain data are rebuilt; a file that names any other
    global (``os.system``, ``eval``, ...) is refused before anything runs.

    Args:
        trust_pickle: unpickle with torch's full unpickler instead (runs whatever the file
            says: only for files you trust that hold something the restricted reader refuses).
        use_ema: take ``state_dicts['ema_model']`` (True) or ``['model']`` (False); None
            follows ``cfg.training.use_ema`` as DiffusionPolicy's evaluation does (and, when the
            cfg does not say, takes ``ema_model`` if present).
    Returns:
        ``state_dict`` with ``model.*`` and ``normalizer.params_dict.{obs,action}.*`` tensors
        (DiffusionPolicy's names, which LowdimPolicy shares), and the config as a plain dict
        (:func:`diffusion_policy_config`; :func:`read_diffusion_policy` gives a ``PolicyConfig``).
    Raises:
        FileNotFoundError, or ValueError listing what is wrong with the file.
    """
    path = Path(path)
    payload = _load_payload(path, trust_pickle)
    cfg = payload["cfg"]
    try:
        config = diffusion_policy_config(cfg)
        PolicyConfig.from_dict(config)  # every value checked before the weights are looked at
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    state_dicts = payload["state_dicts"]
    source = _weights_source(path, cfg, state_dicts, use_ema)
    state_dict = _policy_weights(path, state_dicts[source], config, source)
    config["source"]["weights"] = source
    return state_dict, config


# ---- the reader :func:`para_policy.loading.load_policy` uses ------------------------------

def can_read_diffusion_policy(path: Path) -> bool:
    """Whether ``path`` is a ``*.ckpt`` file (DiffusionPolicy's workspace checkpoints are named so)."""
    path = Path(path)
    return path.is_file() and path.suffix == ".ckpt"


def read_diffusion_policy(path: str | os.PathLike, *, trust_pickle: bool = False, use_ema: bool | None = None,
                          **kwargs: Any) -> tuple[dict[str, torch.Tensor], PolicyConfig]:
    """:func:`read_diffusion_policy_checkpoint` with the config as a :class:`PolicyConfig` (other ``kwargs`` unused)."""
    state_dict, config = read_diffusion_policy_checkpoint(path, use_ema=use_ema, trust_pickle=trust_pickle)
    try:
        return state_dict, PolicyConfig.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ---- patching live policy objects --------------------------------------------------------

def refuse_patches(spec: SamplerConfig) -> None:
    """``ValueError`` for the ``patches`` family: a patched object's network (DiffusionPolicy's or LeRobot's
    own UNet class) is not split into patches; :func:`~para_policy.loading.load_policy` runs it."""
    if spec.family.patched:
        raise ValueError(f"sampler {spec.name!r} (patches of the horizon at once) runs on para_policy policies "
                         "only, not on a patched DiffusionPolicy or LeRobot object: load the checkpoint with "
                         "para_policy.load_policy(path, sampler='patches'), or patch with another sampler")


class SamplingPatch:
    """What :func:`patch` installed on a policy object, what it needs to undo it, and the session it samples with.

    Attributes:
        owner: the object given to ``patch`` (its ``para_stats`` is set after every call).
        target: the object whose ``conditional_sample`` was replaced (the policy itself for
            DiffusionPolicy, ``policy.diffusion`` for LeRobot).
        session: the :class:`~para_policy.session.SamplingSession` every call samples through
            (spec, schedules, ``window='auto'``, warm start); ``spec``: its sampler spec.
        stats: the :class:`SampleStats` of the last call; last_spec: the spec it ran (window resolved).

    Warm start (``spec.warm_start``, on in the ``paradigms`` preset): each call keeps its
    clean trajectory shifted by ``n_action_steps`` (actions executed between calls), and the
    next call with the same batch shape and schedule starts from it. The owner's ``reset()``
    (DiffusionPolicy's, and LeRobot's, which clears its action queue) also forgets it;
    :meth:`reset` does it directly.
    """

    ATTRIBUTE = "_para_patch"

    def __init__(self, owner: Any, target: Any, spec: SamplerConfig, n_action_steps: int) -> None:
        refuse_patches(spec)
        self.owner = owner
        self.target = target
        self.session = SamplingSession(spec, n_action_steps)
        self.saved: dict[tuple[Any, str], tuple[bool, Any]] = {}
        self.stats: SampleStats | None = None
        self.last_spec: SamplerConfig | None = None
        self._model_id: str | None = None
        #: the ``asyncdiff`` stage pipelines: stage count -> (what they were built for, pipeline)
        self.pipelines: dict[int, tuple[Any, Any]] = {}

    @property
    def spec(self) -> SamplerConfig:
        return self.session.spec

    def set_spec(self, spec: SamplerConfig) -> None:
        """Sample with ``spec`` from the next call on (the warm start is forgotten)."""
        refuse_patches(spec)
        self.session.set_spec(spec)

    def reset(self) -> None:
        """Forget the previous call's trajectory: the next call starts cold."""
        self.session.reset()

    def schedule(self, noise_scheduler: Any, steps: int, eta: float = 0.0) -> Schedule:
        """The schedule of the policy's diffusers ``noise_scheduler`` (or its twin the spec's kind names) at
        ``steps``; cached."""
        return self.session.schedule_for(self.spec, noise_scheduler, steps, eta)

    def _identity(self, model: torch.nn.Module) -> WindowIdentity:
        """The window cache's identity of the patched network: its weights digest and device, the plain model."""
        if self._model_id is None:
            self._model_id = model_fingerprint(model)
        return WindowIdentity(self._model_id, next(model.parameters()).device)

    def run(self, denoiser: Any, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
            condition: torch.Tensor | None, inpaint: tuple | None, model: torch.nn.Module) -> torch.Tensor:
        """Sample through the session (window resolved, warm-started when it can be): the sample (B, T, D).

        ``x_T`` (B, T, D), ``noise`` (B, S, T, D), ``condition`` (B, ...), ``inpaint``
        ``(data, mask)`` (B, T, D). The stats go to ``owner.para_stats``; a sample holding NaN or
        inf raises a ``ValueError`` instead of reaching the caller's unnormalization.
        """
        problem = Problem(tuple(x_T.shape), condition, inpaint)
        if self.spec.family.staged:
            denoiser = self.offer_stages(denoiser, model, tuple(x_T.shape[1:]), condition)
        with torch.inference_mode():
            spec = self.session.resolve(
                self.spec, schedule, x_T.shape[0], lambda: self._identity(model),
                lambda auto: calibrate_window(denoiser, schedule, auto, [problem], device=x_T.device))
            sample, _, stats, _ = self.session.run(
                denoiser, spec, schedule, x_T, noise, condition=condition, inpaint=inpaint,
                hint="check the conditioning's scale against the policy's normalizer")
        self.stats, self.last_spec = stats, spec
        vars(self.owner)["para_stats"] = stats
        # samplers run in inference mode; a clone made here is an ordinary tensor, so caller code
        # that edits the result in place (as the original loop's output allowed) keeps working
        return sample.clone() if not torch.is_inference_mode_enabled() else sample

    def offer_stages(self, denoiser: Callable[..., torch.Tensor], model: torch.nn.Module,
                     sample_shape: tuple[int, ...], condition: torch.Tensor | None) -> Callable[..., torch.Tensor]:
        """``denoiser`` with ``staged(n)``: ``model`` cut into n stages, what the ``asyncdiff`` sampler runs.

        Built on first use (:func:`~para_policy.stages.stage_pipeline`, on ``sample_shape`` (T, D) and
        one row of ``condition``) and again when the weights, device, dtype or shapes change.
        """
        from para_policy.cuda_graphs import weights_identity
        from para_policy.stages import cached_pipeline, stage_pipeline

        if condition is not None and not condition.is_floating_point():
            raise ValueError("sampler 'asyncdiff' runs a network's stages on global_cond / cond only; this call "
                             "passes local_cond, which the stages do not carry: use another sampler")
        weights = [*model.parameters(), *model.buffers()]
        if weights[0].dtype != torch.float32:
            raise ValueError(f"sampler 'asyncdiff' runs the network's stages in float32; this network is "
                             f"{weights[0].dtype}: use another sampler, or the network in float32")
        identity = (sample_shape, None if condition is None else tuple(condition.shape[1:]),
                    str(weights[0].device), weights[0].dtype, weights_identity(weights))

        cond = None if condition is None else condition[:1]

        def staged(num_stages: int) -> Any:
            return cached_pipeline(self.pipelines, num_stages, identity,
                                   lambda: stage_pipeline(model, num_stages, sample_shape, cond))

        def call(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            return denoiser(x, t, c)

        call.staged = staged  # type: ignore[attr-defined]
        return call

    def _replace(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        self.saved[(obj, name)] = (name in vars(obj), vars(obj).get(name))
        vars(obj)[name] = fn  # an instance attribute shadows the method

    def install(self, fn: Callable[..., torch.Tensor]) -> None:
        self._replace(self.target, "conditional_sample", fn)
        reset = getattr(self.owner, "reset", None)
        if callable(reset):
            def patched_reset(*args: Any, **kwargs: Any) -> Any:
                self.reset()
                return reset(*args, **kwargs)

            self._replace(self.owner, "reset", patched_reset)
        vars(self.owner)[self.ATTRIBUTE] = self
        vars(self.owner)["para_stats"] = None

    def remove(self) -> None:
        for _, pipeline in self.pipelines.values():
            pipeline.close()
        self.pipelines.clear()
        for (obj, name), (had_own, original) in self.saved.items():
            if had_own:
                vars(obj)[name] = original
            else:
                vars(obj).pop(name, None)
        vars(self.owner).pop(self.ATTRIBUTE, None)
        vars(self.owner).pop("para_stats", None)


def in_model_dtype(denoiser: Callable[..., torch.Tensor], model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``denoiser`` with ``x`` (N, T, D) and a float condition in ``model``'s parameter dtype, its output in ``x``'s.

    The samplers keep their state in float32 while a patched object's network may be cast to
    bfloat16 or float16 (or run under autocast, whose output dtype is autocast's): the network
    sees only its own dtype, the sampler only its own. No-op casts at float32.
    """
    weights = next(model.parameters()).dtype

    def cast(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if c is not None and c.is_floating_point():
            c = c.to(weights)
        return denoiser(x.to(weights), t, c).to(x.dtype)

    return cast


def _step_kwargs(kwargs: Mapping[str, Any]) -> float:
    """DiffusionPolicy passes ``**kwargs`` on to ``scheduler.step``; only DDIM's ``eta`` is understood."""
    unknown = sorted(set(kwargs) - {"eta"})
    if unknown:
        raise TypeError(f"patched conditional_sample does not support scheduler.step arguments {unknown}; "
                        "it takes only eta (DDIM)")
    return float(kwargs.get("eta", 0.0))


def patch_diffusion_policy(policy: Any, sampler: str = "paradigms", **options: Any) -> Any:
    """Replace ``policy.conditional_sample`` of a DiffusionPolicy policy object with para_policy sampling.

    Duck-typed: any object with ``conditional_sample``, ``model``, ``noise_scheduler`` and
    ``num_inference_steps`` (``DiffusionUnetLowdimPolicy``, and the image/hybrid policies,
    whose ``conditional_sample`` has the same contract; ``DiffusionTransformerLowdimPolicy``,
    which passes ``cond=`` (B, To, Do) instead and calls ``model(x, t, cond)``). The replacement
    keeps the original's signature ``(condition_data (B,T,D), condition_mask (B,T,D) bool,
    local_cond=None, global_cond=None, generator=None, **kwargs) -> (B,T,D)``: it draws
    ``x_T`` and the step noise from ``generator`` (or torch's global RNG) in the original
    loop's order, so a seed gives the same sample as before patching (up to ``tolerance``).
    Precision: ``x_T``, the noise, the sampler's state and the returned sample are float32
    (float64 if ``condition_data`` is) whatever the network's dtype; each network call gets its
    input and conditioning in the network's parameter dtype (:func:`in_model_dtype`), so a
    policy cast to bfloat16 or run under ``torch.autocast`` samples with the sampler's
    arithmetic at float32. Stats of the last call are in ``policy.para_stats``. With the ``paradigms`` preset each
    call warm-starts from the previous one (same batch shape), shifted by
    ``policy.n_action_steps``; ``policy.reset()`` forgets it. Undo with :func:`unpatch`.
    """
    spec = sampler_spec(sampler, **options)
    existing = vars(policy).get(SamplingPatch.ATTRIBUTE)
    if existing is not None:  # re-patching changes the sampler, keeps the saved original
        existing.set_spec(spec)
        return policy
    state = SamplingPatch(policy, policy, spec, getattr(policy, "n_action_steps", 0))

    def conditional_sample(condition_data: torch.Tensor, condition_mask: torch.Tensor,
                           local_cond: torch.Tensor | None = None, global_cond: torch.Tensor | None = None,
                           generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        transformer = "cond" in kwargs  # DiffusionTransformerLowdimPolicy passes cond=, its model takes it third
        cond = kwargs.pop("cond", None)
        eta = _step_kwargs(kwargs)
        model = policy.model
        schedule = state.schedule(policy.noise_scheduler, policy.num_inference_steps, eta)
        sample_dtype = torch.promote_types(condition_data.dtype, torch.float32)  # DP's dtype when it is float32
        x_T, noise = draw_noise(schedule, tuple(condition_data.shape), generator,
                                device=condition_data.device, dtype=sample_dtype)
        if transformer:
            condition = cond

            def denoiser(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
                return model(x, t, c)
        elif local_cond is None:
            condition = global_cond

            def denoiser(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
                return model(x, t, local_cond=None, global_cond=c)
        else:  # rows carry their batch index; both conditionings are gathered by it
            condition = torch.arange(condition_data.shape[0], device=condition_data.device)
            weights = next(model.parameters()).dtype
            local = local_cond.to(weights)
            glob = None if global_cond is None else global_cond.to(weights)

            def denoiser(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
                return model(x, t, local_cond=local[c], global_cond=None if glob is None else glob[c])
        inpaint = (condition_data.to(sample_dtype), condition_mask.to(torch.bool))
        return state.run(in_model_dtype(denoiser, model), schedule, x_T, noise, condition, inpaint, model)

    state.install(conditional_sample)
    return policy


def unpatch(policy: Any) -> Any:
    """Undo :func:`patch`: the object's ``conditional_sample`` is the one it had before, exactly."""
    state = vars(policy).get(SamplingPatch.ATTRIBUTE)
    if state is None:
        raise ValueError(f"{type(policy).__name__} object is not patched by para_policy")
    state.remove()
    return policy
