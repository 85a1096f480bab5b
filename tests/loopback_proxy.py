"""A small TCP proxy on loopback that injects network faults between a client and the policy server.

It forwards bytes both ways, each chunk of bytes after ``delay_s`` (order kept, as on a slow link);
``hang = True`` stops forwarding while keeping the connections open (a hung server, or a link that
drops every packet: TCP retransmits, nothing arrives); :meth:`cut` resets every connection (a
server that died, or a link that went down). Real sockets and a real gRPC stack on both sides.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque


class LoopbackProxy:
    """Listen on ``127.0.0.1:port`` (0: a free port) and forward to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int, delay_s: float = 0.0, port: int = 0) -> None:
        self.target_port, self.delay_s, self.hang = target_port, delay_s, False
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Read from ``src``; send each chunk to ``dst`` once its delay has passed (a sender thread keeps order)."""
        queue: deque[tuple[float, bytes]] = deque()  # FIFO: a changed delay never reorders bytes
        ready = threading.Condition()

        def send() -> None:
            while True:
                with ready:
                    while not queue or self.hang or queue[0][0] > time.monotonic():
                        ready.wait(0.005)
                        if self._closed:
                            return
                    _, data = queue.popleft()
                if data == b"":
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with ready:
                queue.append((time.monotonic() + self.delay_s, data))
                ready.notify()
            if not data:
                return

    def cut(self) -> None:
        """Reset every open connection (new ones are still accepted)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
