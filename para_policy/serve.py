"""``para-policy serve CHECKPOINT``: serve a policy to robots over gRPC (:mod:`para_policy.serving.server`).

Why a plain argparse CLI and not Hydra: a server is one long process with a handful of options, and
it must start fast and fail fast. Sampler and inference settings are spelled as ``eval.py`` spells
them (``sampler=paradigms sampler.window=8 sampler.tolerance=0.1 inference.backend=onnxruntime``) and
checked by the same functions (:func:`~para_policy.samplers.sampler_spec`,
:func:`~para_policy.inference.check_inference_options`) before the checkpoint is loaded.

Prints ``para_policy server listening on HOST:PORT`` once bound (a parent process can wait for the
line); SIGTERM or SIGINT stops it gracefully with exit status 0. Bad input exits 2 with
``para-policy serve: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from para_policy.extras import MissingExtraError, require
from para_policy.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT, TOKEN_ENV

PROG = "para-policy"
#: the inference settings ``inference.<key>=`` may set, with eval.py's defaults
INFERENCE_DEFAULTS = {"compile": False, "precision": "fp32", "cuda_graphs": False, "backend": "default"}
EXAMPLES = """\
examples:
  para-policy serve policy.safetensors                      # 127.0.0.1:50051, the paradigms sampler
  para-policy serve policy.safetensors --host 0.0.0.0 --token-file ~/.para_policy_token \\
      --tls-cert server.pem --tls-key server.key            # reachable from the robot, encrypted
  para-policy serve policy.safetensors sampler=sequential sampler.scheduler=ddim sampler.num_inference_steps=16
  para-policy serve policy.safetensors sampler.window=8 sampler.tolerance=0.1 inference.backend=onnxruntime
"""


class UsageError(Exception):
    """Bad command-line input: reported as ``para-policy serve: error: ...`` with exit status 2."""


def parse_value(text: str) -> Any:
    """An override's value as Hydra reads it: ``null``, ``true``/``false``, an int, a float, else the string."""
    lowered = text.strip().lower()
    if lowered in ("null", "none", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(overrides: Sequence[str], sampler: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``sampler=NAME``, ``sampler.KEY=VALUE``, ``inference.KEY=VALUE`` → ``(sampler node, inference settings)``."""
    node: dict[str, Any] = {"name": sampler}
    inference = dict(INFERENCE_DEFAULTS)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UsageError(f"override {item!r} is not KEY=VALUE (e.g. sampler.window=8, inference.backend=eager)")
        group, _, name = key.partition(".")
        if key == "sampler":
            if sampler is not None and text != sampler:
                raise UsageError(f"--sampler {sampler} and sampler={text} disagree: give one")
            node["name"] = text
        elif group == "sampler" and name:
            node[name] = parse_value(text)
        elif group == "inference" and name in INFERENCE_DEFAULTS:
            inference[name] = parse_value(text)
        else:
            raise UsageError(f"unknown override {key!r}: expected sampler=NAME, sampler.<option>=VALUE or "
                             f"inference.<{'|'.join(INFERENCE_DEFAULTS)}>=VALUE")
    node["name"] = node["name"] or "paradigms"
    return node, inference


def checked_settings(node: dict[str, Any], inference: dict[str, Any]) -> Any:
    """The sampler spec of ``node``, after both are checked as eval.py checks them (errors name the key)."""
    from para_policy.inference import check_inference_options
    from para_policy.samplers import SamplerOptionError, sampler_spec

    try:
        check_inference_options(**inference)
    except ValueError as e:
        raise UsageError(f"inference: {e}") from None
    try:
        return sampler_spec({k: v for k, v in node.items() if v is not None})
    except SamplerOptionError as e:
        if e.key is not None and e.detail.startswith(e.key):
            raise UsageError(f"sampler.{e.detail}") from None
        raise UsageError(f"sampler: {e}") from None


def read_token(token_file: str | None) -> str | None:
    """The shared secret: ``--token-file``'s contents, else ``$PARA_POLICY_TOKEN``, stripped; None if neither."""
    if token_file is not None:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--token-file {token_file!r} cannot be read: {e}") from None
        where = f"--token-file {token_file!r}"
    elif os.environ.get(TOKEN_ENV) is not None:
        token, where = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if not token:
        raise UsageError(f"{where} holds an empty token; put the shared secret in it")
    return token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="para_policy's command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "serve", help="serve a policy to robots over gRPC", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a policy checkpoint over gRPC (safetensors + JSON messages, no pickle). Binds 127.0.0.1 "
                    "unless told otherwise; beyond loopback a token is required.")
    p.add_argument("checkpoint", help="a checkpoint load_policy reads (.safetensors, DP .ckpt, LeRobot dir)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="eval.py's spelling: sampler=NAME, sampler.<option>=VALUE (window, tolerance, scheduler, "
                        "num_inference_steps, warm_start, ...), "
                        "inference.<backend|precision|compile|cuda_graphs>=VALUE")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    p.add_argument("--token-file", help=f"file holding the shared secret (default: ${TOKEN_ENV}, if set)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--sampler", help="sampler preset (paradigms, sequential, ...; default paradigms)")
    p.add_argument("--control-hz", type=float, help="the robot's control rate, reported to clients")
    p.add_argument("--max-sessions", type=int, default=16, help="most open client sessions (default 16)")
    p.add_argument("--max-pending", type=int, default=8, help="most chunk requests queued for the model (default 8)")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="seconds before an idle session is dropped")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="largest request")
    p.add_argument("--device", default="cpu", help="torch device of the policy (default cpu)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def warm_up(policy: Any, spec: Any) -> None:
    """One chunk on zero observations before the server listens, so that what a first call builds lazily (an
    ONNX Runtime session per row count, allocations) does not land on a robot's first chunk."""
    import torch

    obs = {k: torch.zeros((1, policy.n_obs_steps, *shape)) for k, shape in policy.observation_shapes().items()}
    policy.predict_action(obs, sampler=spec, warm_start=False, generator=torch.Generator().manual_seed(0))


def start(args: argparse.Namespace) -> Any:
    """Check everything, load the policy, bind: the running :class:`~para_policy.serving.server.ServerHandle`."""
    node, inference = parse_overrides(args.overrides, args.sampler)
    spec = checked_settings(node, inference)
    token = read_token(args.token_file)
    checkpoint = Path(args.checkpoint).expanduser()
    if not checkpoint.exists():
        raise UsageError(f"checkpoint {str(checkpoint)!r} does not exist")
    if args.port < 0 or args.port > 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    try:
        require("grpc", "serve")
    except MissingExtraError as e:
        raise UsageError(str(e)) from None
    import torch

    from para_policy.inference import configure_inference
    from para_policy.loading import load_policy
    from para_policy.serving.server import is_loopback, serve

    if not is_loopback(args.host) and token is None:  # before the checkpoint loads: fail fast
        raise UsageError(f"refusing to serve on {args.host!r} without a token: give --token-file or ${TOKEN_ENV}, "
                         "or bind 127.0.0.1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        policy = load_policy(checkpoint, sampler=spec, device=args.device, backend="eager")
        configure_inference(policy, **inference)
        spec = policy.resolve(spec)  # window='auto' tuned now, not on a client's first chunk
        warm_up(policy, spec)
        return serve(policy, host=args.host, port=args.port, token=token, tls_cert=args.tls_cert,
                     tls_key=args.tls_key, sampler=spec, control_hz=args.control_hz, max_sessions=args.max_sessions,
                     max_pending=args.max_pending, max_workers=max(16, args.max_pending + 8),
                     idle_timeout_s=args.idle_timeout, max_message_bytes=args.max_message_bytes)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: ``para-policy serve CHECKPOINT [KEY=VALUE ...] [options]``; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("serve", "-h", "--help"):
        argv.insert(0, "serve")  # python -m para_policy.serve CHECKPOINT ...
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # KEY=VALUE overrides may follow options too
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        print(f"{PROG} serve: error: unrecognized arguments: {' '.join(stray)} (see {PROG} serve --help)",
              file=sys.stderr, flush=True)
        return 2
    args.overrides = [*args.overrides, *(a for a in extra if a not in stray)]
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        handle = start(args)
    except UsageError as e:
        print(f"{PROG} serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"para_policy server listening on {handle.address}", flush=True)
    while not stop.wait(0.5):
        pass
    handle.stop(grace=2.0)
    print("para_policy server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
