"""Start ``para-policy serve`` as a child process on loopback and stop it: for the evaluator and the benchmarks.

A real server process (not a thread of the caller) so that what is measured is what a robot meets:
its own interpreter, its own GIL, messages through the kernel's loopback. The child gets a random
token through its environment (never on the command line, where other users of the machine see
it) and imports this very ``para_policy`` (the checkout on its ``PYTHONPATH``); its stdout and
stderr go to a log file; :meth:`ServerProcess.stop` ends it with SIGTERM (then SIGKILL) whatever
happened.
"""

from __future__ import annotations

import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from para_policy.serving.protocol import TOKEN_ENV

#: what ``para-policy serve`` prints once bound, before ``HOST:PORT``
LISTENING = "para_policy server listening on "
ROOT = str(Path(__file__).resolve().parents[2])  # the checkout (or site-packages) holding this para_policy


class ServerStartError(RuntimeError):
    """The server exited, or said nothing, before it listened; the message ends with its log's last lines."""


def serve_command(checkpoint: str | os.PathLike, overrides: Sequence[str] = (), options: Sequence[str] = ()
                  ) -> list[str]:
    """``python -m para_policy.serve serve CHECKPOINT --host 127.0.0.1 --port 0 [options] [overrides]``.

    ``overrides``: ``sampler=NAME``, ``sampler.KEY=VALUE``, ``inference.KEY=VALUE`` (as ``eval.py`` spells
    them); ``options``: more flags (``--threads 1``, ``--device cpu``, ...).
    """
    return [sys.executable, "-m", "para_policy.serve", "serve", str(checkpoint), "--host", "127.0.0.1",
            "--port", "0", *options, *overrides]


def log_tail(path: Path, n: int = 6) -> str:
    """The last ``n`` non-empty lines of a log, joined by `` | `` (empty when it cannot be read)."""
    try:
        kept = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(kept[-n:])


class ServerProcess:
    """A ``para-policy serve`` child (:func:`serve_command`): ``address``, ``port``, ``token``, :meth:`stop`.

    Waits for its listening line (up to ``start_timeout_s``: it imports torch, loads the checkpoint,
    tunes ``window='auto'``); raises :class:`ServerStartError` with the log's last lines when it
    exits first or stays silent. A context manager: stopped on exit.
    """

    def __init__(self, command: Sequence[str], *, log_path: str | os.PathLike | None = None,
                 start_timeout_s: float = 300.0, stop_timeout_s: float = 15.0) -> None:
        self.token = secrets.token_hex(16)
        self.stop_timeout_s = stop_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        env = {**os.environ, TOKEN_ENV: self.token,
               "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path or os.devnull, "ab") as log:
            self.proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                         env=env, text=True)
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._forward, args=(self.proc.stdout,), daemon=True,
                                        name="para_policy-server-log")
        self._reader.start()
        try:
            self.address = self._wait_listening(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _forward(self, stream: IO[str]) -> None:
        """The child's stdout, line by line, to the waiting constructor and the log; None at the end."""
        try:
            for line in stream:
                self._lines.put(line)
                if self.log_path is not None:
                    with open(self.log_path, "a") as log:
                        log.write(line)
        except (OSError, ValueError):  # the pipe closed under us: the server is being stopped
            pass
        finally:
            self._lines.put(None)

    def _wait_listening(self, timeout_s: float) -> str:
        where = f" (log: {self.log_path})" if self.log_path is not None else ""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the server exited
                code = self.proc.wait()
                tail = log_tail(self.log_path) if self.log_path is not None else ""
                raise ServerStartError(f"the policy server exited with status {code} before it listened: "
                                       f"{tail}{where}")
            if line.startswith(LISTENING):
                return line[len(LISTENING):].strip()
        tail = log_tail(self.log_path) if self.log_path is not None else ""
        raise ServerStartError(f"the policy server did not listen within {timeout_s:g} s{where}: {tail}")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self) -> int | None:
        """SIGTERM (a graceful stop), SIGKILL after ``stop_timeout_s``; its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5.0)
        self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once: a server that dies (fault tests)."""
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["LISTENING", "ServerProcess", "ServerStartError", "log_tail", "serve_command"]
