"""A fault-injecting HTTP proxy in front of an S3 server (moto).

It forwards every request to the upstream unchanged, except the next N requests that
match a rule: those get a 503 SlowDown, a 500 InternalError, a connection reset, or a
canned response. It counts every request it receives, so tests can prove that nothing
reached the server (path checks happen before any I/O).

    proxy = FaultProxy("http://127.0.0.1:5000").start()
    proxy.fail_next(2, method="GET", path=r"list-type=2", action="503")
    proxy.request_count  # requests received so far
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error.</Message><RequestId>fault</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}

#: ``responder(method, path, body) -> (status, content_type, body)`` for canned answers.
Responder = Callable[[str, str, bytes], tuple[int, str, bytes]]


@dataclass
class Rule:
    """Answer the next ``remaining`` requests matching ``method`` and ``path`` with ``action``.

    ``action`` is ``"503"``, ``"500"``, ``"reset"`` (before answering), ``"truncate"`` (the
    real answer cut off by a reset halfway through its body), ``"respond"`` (uses
    ``responder``) or ``"hold"`` (see :meth:`FaultProxy.hold_next`).
    ``path`` is a regex searched in the request target (path and query).
    """

    action: str
    remaining: int
    method: str | None = None
    path: re.Pattern[str] = field(default_factory=lambda: re.compile(""))
    responder: Responder | None = None
    fired: int = 0
    hold: Hold | None = None


@dataclass
class Hold:
    """Requests caught by :meth:`FaultProxy.hold_next`: each waits until :meth:`release`.

    With ``forward=True`` the request reaches the upstream first (it has taken effect)
    and only the answer is held; otherwise it never reaches the upstream and is
    answered with a 503 SlowDown once released.
    """

    forward: bool
    rule: Rule | None = None
    arrived: int = 0
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, count: int = 1, timeout: float = 60) -> bool:
        """True once ``count`` held requests have arrived (and, if forwarded, taken effect)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.arrived >= count:
                    return True
            time.sleep(0.02)
        return False

    def release(self) -> None:
        self.released.set()

    def disarm(self) -> None:
        """Catch no further request (those already held stay held until released)."""
        if self.rule is not None:
            self.rule.remaining = 0

    def _arrive(self) -> None:
        with self._lock:
            self.arrived += 1
        self.reached.set()


class FaultProxy:
    """A threaded proxy on 127.0.0.1 forwarding to ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []
        self.faults_fired = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------
    def start(self) -> FaultProxy:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def fail_next(
        self, n: int, *, action: str = "503", method: str | None = None, path: str = ""
    ) -> Rule:
        """Inject ``action`` into the next ``n`` requests matching ``method``/``path``."""
        if action not in ("503", "500", "reset", "truncate"):
            raise ValueError(f"unknown action {action!r}")
        rule = Rule(action, n, method, re.compile(path))
        with self._lock:
            self.rules.append(rule)
        return rule

    def respond_next(
        self, n: int, responder: Responder, *, method: str | None = None, path: str = ""
    ) -> Rule:
        """Answer the next ``n`` matching requests with ``responder`` (not forwarded)."""
        rule = Rule("respond", n, method, re.compile(path), responder)
        with self._lock:
            self.rules.append(rule)
        return rule

    def hold_next(
        self, n: int, *, method: str | None = None, path: str = "", forward: bool = False
    ) -> Hold:
        """Hold the next ``n`` matching requests until ``hold.release()`` (see :class:`Hold`):
        a test can kill the client at the moment a request is in flight."""
        hold = Hold(forward)
        rule = Rule("hold", n, method, re.compile(path), hold=hold)
        hold.rule = rule
        with self._lock:
            self.rules.append(rule)
        return hold

    def reset(self) -> None:
        """Forget rules and counters (between tests)."""
        with self._lock:
            self.rules.clear()
            self.requests.clear()
            self.faults_fired = 0

    # -- request handling ------------------------------------------------------------
    def _match(self, method: str, target: str) -> Rule | None:
        with self._lock:
            self.requests.append((method, target))
            for rule in self.rules:
                if rule.remaining <= 0:
                    continue
                if rule.method is not None and rule.method != method:
                    continue
                if not rule.path.search(target):
                    continue
                rule.remaining -= 1
                rule.fired += 1
                self.faults_fired += 1
                return rule
        return None

    def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            length = str(len(body))
            for name, value in headers:
                if name.lower() == "content-length" and self.command == "HEAD":
                    length = value  # HEAD announces the object's size, with no body
                elif name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            # SO_LINGER 0 makes close() send a TCP RST: the client sees "connection reset".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _handle(self) -> None:
            body = self._body()
            rule = proxy._match(self.command, self.path)
            if rule is None:
                status, headers, data = proxy._forward(
                    self.command, self.path, list(self.headers.items()), body
                )
                self._send(status, headers, data)
            elif rule.action == "hold":
                assert rule.hold is not None
                hold = rule.hold
                forwarded = None
                if hold.forward:
                    forwarded = proxy._forward(
                        self.command, self.path, list(self.headers.items()), body
                    )
                hold._arrive()
                hold.released.wait(120)
                with contextlib.suppress(OSError):  # the client may have been killed
                    if forwarded is not None:
                        self._send(*forwarded)
                    else:
                        self._send(503, [("Content-Type", "application/xml")], SLOWDOWN)
            elif rule.action == "reset":
                self._reset()
            elif rule.action == "truncate":
                # the real answer's headers and half its body, then a TCP reset
                status, headers, data = proxy._forward(
                    self.command, self.path, list(self.headers.items()), body
                )
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self._reset()
            elif rule.action == "respond":
                assert rule.responder is not None
                status, ctype, data = rule.responder(self.command, self.path, body)
                self._send(status, [("Content-Type", ctype)], data)
            else:
                data = SLOWDOWN if rule.action == "503" else INTERNAL
                self._send(int(rule.action), [("Content-Type", "application/xml")], data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        def finish(self) -> None:
            with contextlib.suppress(OSError):  # the socket was reset on purpose
                super().finish()

    return Handler
