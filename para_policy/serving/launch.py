"""Start ``para-policy serve`` as a child process on loopback and stop it: for the evaluator and the benchmarks.

A real server process (not a thread of the caller) so that what is measured is what a robot meets:
its own interpreter, its own GIL, messages through the kernel's loopback. The child gets a random
token through its environment (never on the command line, where ``ps`` shows it), its stderr goes to a
log file, and :meth:`ServerProcess.stop` ends it with SIGTERM (then SIGKILL) whatever happened.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

from para_policy.serving.protocol import TOKEN_ENV

LISTENING = "para_policy server listening on "


class ServerProcess:
    """A ``para-policy serve`` child on ``127.0.0.1``: ``address``, ``token``, :meth:`stop`; a context manager.

    Args:
        checkpoint: what ``load_policy`` reads.
        overrides: ``sampler=NAME``, ``sampler.KEY=VALUE``, ``inference.KEY=VALUE`` (as ``eval.py`` spells them).
        options: more command-line options (``--control-hz 10``, ...).
        log_path: where the child's stderr goes (None: discarded).
        start_timeout_s: how long to wait for its listening line (loading, ONNX export, window tuning).
    """

    def __init__(self, checkpoint: str | os.PathLike, overrides: Sequence[str] = (), *,
                 options: Sequence[str] = (), log_path: str | os.PathLike | None = None,
                 start_timeout_s: float = 300.0, env: dict[str, str] | None = None) -> None:
        self.token = secrets.token_hex(16)
        child_env = {**os.environ, **(env or {}), TOKEN_ENV: self.token}
        child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        cmd = [sys.executable, "-m", "para_policy.serve", "serve", str(checkpoint), "--port", "0", *options,
               *overrides]
        self._log: IO[Any] | None = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log or subprocess.DEVNULL,
                                     env=child_env, text=True)
        try:
            self.address = self._wait_listening(start_timeout_s, log_path)
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._drain, daemon=True).start()  # keep its stdout from filling up

    def _wait_listening(self, timeout_s: float, log_path: Any) -> str:
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith(LISTENING):
                    found.append(line[len(LISTENING):].strip())
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not found:
            status = self.proc.poll()
            why = f"exited with status {status}" if status is not None else f"did not listen within {timeout_s:g} s"
            where = f" (its log: {log_path})" if log_path is not None else ""
            raise RuntimeError(f"the policy server {why}{where}")
        return found[0]

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it is still there; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once: a server that dies (fault tests and benchmarks)."""
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["LISTENING", "ServerProcess"]
