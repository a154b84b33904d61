"""The production server of ``ocore-storage api``: waitress, guarded against slow clients.

Why waitress (figures in docs/performance.md, settings in docs/serving.md): its
event loop reads every request completely, headers and body, before the request takes
one of the request threads, so a client that sends half a request line and goes silent
costs a socket, not a thread. gunicorn's threaded worker read requests in its threads
with no timeout: 16 such clients froze every route.

What this module adds to waitress:

* **read timeouts** (:class:`Limits`): a request line and headers must arrive within
  ``header_timeout`` of the first byte (of the accept, for a new connection), however
  slowly they trickle; a body may pause at most ``body_timeout``; a kept-alive
  connection may idle ``keepalive_timeout``; a client that stops reading a response the
  server can no longer buffer is cut after ``send_timeout``. Checked every second.
* **connection caps**: at most ``max_connections_per_client`` open connections per client
  address (closed at accept beyond it) and ``max_connections`` in all; at most
  ``keepalive_requests`` requests on one connection (the last says ``Connection: close``).
* **body limits before spooling**: a body is buffered in memory up to
  :data:`MEMORY_BUFFER` bytes and spooled to a temporary file beyond (``TMPDIR``). Only the
  upload route may send a large body (up to the app's ``MAX_CONTENT_LENGTH``, the
  upload limit), and only with a valid token: its ``Authorization`` header is checked
  when the headers are in, so nobody without a token makes the server spool gigabytes.
  Every other request body is limited to :data:`api.params.MAX_JSON_BYTES`.
* the server's own errors (400, 401, 413, 431, 501...) in the API's JSON error shape;
* graceful stop on SIGTERM/SIGINT: stop accepting, close idle connections, finish the
  requests in flight (``Connection: close``) for up to :data:`GRACEFUL_TIMEOUT` s.

Limits come from ``OCORE_API_*`` environment variables (:meth:`Limits.from_env`).
"""

from __future__ import annotations

import gc
import json
import logging
import re
import resource
import signal
import socket
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import FrameType
from typing import Any

from flask import Flask
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import Error, RequestEntityTooLarge

from api.params import MAX_JSON_BYTES
from api.upload import tune_allocator

log = logging.getLogger(__name__)

#: Bytes of a request body kept in memory; the rest goes to a temporary file.
MEMORY_BUFFER = 256 * 1024
#: Request line and headers together (a JWT is a few KiB at most).
MAX_HEADER_BYTES = 64 * 1024
#: Seconds a stopping server gives the requests in flight.
GRACEFUL_TIMEOUT = 30.0
#: How often the timeouts are checked (seconds).
CHECK_INTERVAL = 1.0
#: Routes whose body may be as large as the app's MAX_CONTENT_LENGTH (token checked first).
UPLOAD_PATH = re.compile(r"/api/storage/destinations/[^/]+/upload")
#: waitress error code -> the API's error code (api.errors).
ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    413: "payload_too_large",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


@dataclass(frozen=True)
class Limits:
    """What a client may cost the server. Seconds, counts; 0 turns a cap off."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    send_timeout: float = 60.0
    keepalive_requests: int = 1000
    max_connections: int = 1000
    max_connections_per_client: int = 64

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Limits:
        """``OCORE_API_<FIELD>`` (e.g. ``OCORE_API_HEADER_TIMEOUT=10``) over the defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"OCORE_API_{f.name.upper()}"
            raw = environ.get(name)
            if raw is None or not raw.strip():
                continue
            kind = float if f.type in (float, "float") else int
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}: {raw!r} is not a number") from None
            if value < 0 or (kind is float and not 0 < value < 86400):
                raise ValueError(f"{name}: must be above 0 (seconds, below a day)")
            values[f.name] = value
        return cls(**values)


class _Refused(Error):
    code = 401
    reason = "Unauthorized"


class _Parser(HTTPRequestParser):
    """waitress's parser, with a body limit chosen per request once the headers are in."""

    max_body: int | None = None
    error: Error | None = None

    def __init__(self, adj: Adjustments, server: _Server) -> None:
        super().__init__(adj)
        self.server = server

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        if self.error is None and self.headers_finished and self.max_body is None:
            self.max_body, self.error = self.server.body_limit(self)
        body = max(self.content_length, self.body_bytes_received)  # announced or received
        if self.error is None and self.max_body is not None and body > self.max_body:
            self.error = RequestEntityTooLarge(f"the body is limited to {self.max_body} bytes")
        if self.error is not None:
            self.completed = True
            self.expect_continue = False  # no "100 Continue" for a refused body
        return consumed


class _ErrorTask(ErrorTask):
    """waitress's own error answers, as the API's JSON error body."""

    def execute(self) -> None:
        err = self.request.error
        body = json.dumps(
            {"error": ERROR_CODES.get(err.code, "bad_request"), "message": str(err.body)}
        ).encode()
        self.status = f"{err.code} {err.reason}"
        self.response_headers.extend(
            [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
        )
        if err.code == 401:
            self.response_headers.append(
                ("WWW-Authenticate", 'Bearer realm="ocore", error="invalid_token"')
            )
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Task(WSGITask):
    def start(self) -> None:
        super().start()
        channel: _Channel = self.channel
        channel.served += 1
        limit = channel.server.limits.keepalive_requests
        if channel.server.stopping or (limit and channel.served >= limit):
            self.set_close_on_finish()  # "Connection: close" on this response


class _Channel(HTTPChannel):
    task_class = _Task
    error_task_class = _ErrorTask
    server: _Server
    served = 0
    counted = False
    began = False

    def __init__(
        self, server: _Server, sock: socket.socket, addr: Any, adj: Adjustments, map: Any
    ) -> None:
        self.request_started = time.time()
        super().__init__(server, sock, addr, adj, map=map)

    def parser_class(self, adj: Adjustments) -> _Parser:
        return _Parser(adj, self.server)

    def received(self, data: bytes) -> bool:
        before = self.request
        result: bool = super().received(data)
        if self.request is not None and self.request is not before:
            if self.began:  # the first request's clock started at the accept
                self.request_started = time.time()
            self.began = True
        return result

    def del_channel(self, map: Any = None) -> None:
        super().del_channel(map)
        if self.counted:
            self.counted = False
            self.server.forget(self.addr)

    def expired(self, now: float, limits: Limits) -> str | None:
        """Why this connection must close now, or None."""
        if self.requests:  # queued or in a request thread
            stalled = self.total_outbufs_len > self.adj.outbuf_high_watermark
            if stalled and now - self.last_activity > limits.send_timeout:
                return "send timeout"
            return None
        if self.total_outbufs_len:  # a response still going out
            return "send timeout" if now - self.last_activity > limits.send_timeout else None
        request = self.request
        if request is None:
            if self.served:
                idle = limits.keepalive_timeout
                return "keep-alive timeout" if now - self.last_activity > idle else None
            return "header timeout" if now - self.request_started > limits.header_timeout else None
        if not request.headers_finished:
            return "header timeout" if now - self.request_started > limits.header_timeout else None
        return "body timeout" if now - self.last_activity > limits.body_timeout else None


class _Server(TcpWSGIServer):
    channel_class = _Channel

    def __init__(
        self, app: Flask, limits: Limits, adj: Adjustments, dispatcher: ThreadedTaskDispatcher
    ) -> None:
        self.limits = limits
        self.per_client: Counter[str] = Counter()
        self.at_cap: set[str] = set()
        self.stopping = False
        self.upload_max = int(app.config.get("MAX_CONTENT_LENGTH") or 0)
        self.settings = app.extensions["ocore"].settings
        super().__init__(app, map={}, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0])

    # -- accept: the per-client cap
    def handle_accept(self) -> None:
        try:
            pair = self.accept()
            if pair is None:
                return
            conn, addr = pair
            self.set_socket_options(conn)
        except OSError:
            return
        host = str(addr[0])
        cap = self.limits.max_connections_per_client
        if cap and self.per_client[host] >= cap:
            if host not in self.at_cap:
                self.at_cap.add(host)
                log.warning("%s has %d connections open: refusing more", host, cap)
            conn.close()
            return
        self.per_client[host] += 1
        try:
            channel = self.channel_class(self, conn, addr, self.adj, map=self._map)
        except OSError:
            self.forget(addr)
            conn.close()
            return
        channel.counted = True

    def forget(self, addr: Any) -> None:
        host = str(addr[0])
        self.per_client[host] -= 1
        if self.per_client[host] <= 0:
            del self.per_client[host]
        if self.per_client[host] < self.limits.max_connections_per_client:
            self.at_cap.discard(host)

    # -- timeouts
    def maintenance(self, now: float) -> None:
        for channel in list(self.active_channels.values()):
            why = channel.expired(now, self.limits)
            if why is not None:
                log.debug("closing %s: %s", channel.addr, why)
                channel.will_close = True  # closed by the loop (handle_write)
        if self.stopping:  # nothing more will come on an idle connection
            for channel in list(self.active_channels.values()):
                if (
                    not channel.requests
                    and not channel.total_outbufs_len
                    and (channel.request is None or not channel.request.header_plus)
                ):
                    channel.will_close = True

    # -- body limits, when a request's headers are in
    def body_limit(self, request: _Parser) -> tuple[int, Error | None]:
        if not UPLOAD_PATH.fullmatch(request.path or "") or not self.upload_max:
            return MAX_JSON_BYTES, None
        if request.chunked or request.content_length > 0:
            problem = self._token_problem(request.headers.get("AUTHORIZATION", ""))
            if problem is not None:
                return self.upload_max, _Refused(problem)
        return self.upload_max, None

    def _token_problem(self, header: str) -> str | None:
        from api.auth import decode_token
        from api.errors import ApiError

        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "an upload needs an Authorization: Bearer token"
        try:
            decode_token(token.strip(), self.settings)
        except ApiError as err:
            return err.message
        return None


def _file_limit(wanted: int) -> int:
    """Raise the open-files limit toward what ``wanted`` connections may use (a socket and
    up to two spooled bodies each); the connections the limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted * 3 + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    allowed = max(16, (soft - 256) // 3)
    log.warning("open-files limit %d: at most %d connections (not %d)", soft, allowed, wanted)
    return allowed


def build_server(
    app: Flask, bind: str, *, threads: int = 16, limits: Limits | None = None
) -> _Server:
    """The listening server (not yet serving): ``bind`` is ``host:port``."""  # fmt: skip
    limits = limits or Limits()
    host, _, port = bind.rpartition(":")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    adj = Adjustments(
        listen=f"{host}:{port}",
        threads=threads,
        connection_limit=_file_limit(limits.max_connections) + 1,  # + the listener
        channel_timeout=86400,  # ours are in _Channel.expired
        cleanup_interval=CHECK_INTERVAL,
        asyncore_use_poll=True,  # select() stops at file descriptor 1024
        max_request_header_size=MAX_HEADER_BYTES,
        # a backstop: _Parser refuses bodies over their route's limit first
        max_request_body_size=max(app.config.get("MAX_CONTENT_LENGTH") or 0, MAX_JSON_BYTES) * 2,
        inbuf_overflow=MEMORY_BUFFER,
        ident="",  # no Server header
        log_socket_errors=False,  # clients that go away are not errors
    )
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    return _Server(app, limits, adj, dispatcher)


def run(server: _Server) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully (module docstring)."""
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)  # the loop wakes within its 1 s poll timeout

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop:
            wasyncore.loop(timeout=CHECK_INTERVAL, map=server._map, use_poll=True, count=1)
        log.info("stopping: %d connection(s) open", len(server.active_channels))
        server.stopping = True
        server.accepting = False
        wasyncore.dispatcher.close(server)  # the listening socket only; the trigger stays
        server.next_channel_cleanup = 0
        deadline = time.monotonic() + GRACEFUL_TIMEOUT
        while server.active_channels and time.monotonic() < deadline:
            server.maintenance(time.time())
            wasyncore.loop(timeout=0.2, map=server._map, use_poll=True, count=1)
        if server.active_channels:
            log.warning("%d connection(s) still open at exit", len(server.active_channels))
    finally:
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        server.trigger.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def http_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve_api(app: Flask, bind: str, *, threads: int = 16) -> None:
    """Serve ``app`` on ``bind`` (``host:port``) with request threads, until SIGTERM/SIGINT.

    Prints where it listens (``API on http://host:port``, and its ``/metrics``) once
    bound. Limits from ``OCORE_API_*`` (:meth:`Limits.from_env`). Everything loaded so far (the
    app, SQLAlchemy, boto3...) is moved out of the garbage collector's reach first
    (``gc.freeze``): a full collection over those long-lived objects paused every request
    in flight for ~50 ms, which was most of the API's p99."""
    import os

    limits = Limits.from_env(os.environ)
    server = build_server(app, bind, threads=threads, limits=limits)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a queue is not an error
    tune_allocator()  # upload buffers go back to the system when freed (api.upload)
    url = http_url(str(server.effective_host), int(server.effective_port))
    # on stdout, for whoever started it (the first line `serve` and `api` print)
    print(f"API on {url}\nAPI metrics on {url}/metrics", flush=True)
    log.info("serving on %s (%d threads)", url, threads)
    gc.collect()
    gc.freeze()
    run(server)
