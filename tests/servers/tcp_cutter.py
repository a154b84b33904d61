"""A TCP relay on 127.0.0.1 that can cut every connection through it (a TCP reset on
both sides), for protocols the HTTP fault proxy cannot speak (SFTP over SSH).

    cutter = TcpCutter("127.0.0.1", 2222).start()
    cutter.cut_after(200_000)  # reset everything once the server has sent 200 kB more
    cutter.port                # point the client here
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # A pump blocked in recv() on this socket holds the kernel file open: close() alone
    # would send nothing until that recv returns (never, if the peer waits for us).
    # SHUT_RD wakes it; the close then takes effect and sends the reset.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class TcpCutter:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0  # accepted so far
        self.cuts = 0  # times every open connection was reset
        self.down_bytes = 0  # server -> client, in total
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut_at: list[int] = []  # down_bytes thresholds still to fire
        self.accept_at_most: int | None = None  # later connections are reset at once
        self.on_cut: Callable[[], None] | None = None  # runs right before a cut_after cut
        self.stalls = 0
        self._stall_at: list[int] = []
        self._silent: set[socket.socket] = set()  # stalled server sockets (kept alive)
        self.refused = 0
        self._lock = threading.Lock()

    def start(self) -> TcpCutter:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def cut_after(self, more_bytes: int) -> None:
        """Reset every open connection once the server has sent ``more_bytes`` more."""
        with self._lock:
            self._cut_at.append(self.down_bytes + more_bytes)

    def stall_after(self, more_bytes: int) -> None:
        """Once the server has sent ``more_bytes`` more, every connection open then goes
        silent: what the server sends on it is swallowed, nothing is closed (a black
        hole: a NAT that dropped the flow). Connections made later work."""
        with self._lock:
            self._stall_at.append(self.down_bytes + more_bytes)

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.accept_at_most is not None and self.connections >= self.accept_at_most:
                self.refused += 1  # a server's per-user connection limit
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, server))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if down and src in self._silent:
                continue  # stalled: swallowed
            try:
                dst.sendall(data)
            except OSError:
                return
            if down:
                fire = False
                with self._lock:
                    self.down_bytes += len(data)
                    if self._cut_at and self.down_bytes >= self._cut_at[0]:
                        self._cut_at.pop(0)
                        fire = True
                    if self._stall_at and self.down_bytes >= self._stall_at[0]:
                        self._stall_at.pop(0)
                        self._silent.update(server for _client, server in self._pairs)
                        self.stalls += 1
                if fire:
                    if self.on_cut is not None:
                        self.on_cut()
                    self.cut()
