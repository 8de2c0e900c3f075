"""The HTTP transport: loopback HTTP/1.1 for the endpoints of http_api.py, over the same op table as ZeroMQ.

One thread runs an asyncio loop; each connection is a coroutine speaking
HTTP/1.1 through h11. For each request it only reads (within limits),
authenticates with the same Authenticator and client tokens as TCP (a Bearer
token; the same block after repeated bad tokens, per connection), checks the
op's permission before it decodes the body, translates the body into the op's
arguments (http_api.py) and hands the request to the same dispatcher as the
ZeroMQ transport; the dispatcher's future is awaited, never a worker held. So a
slow client costs a coroutine and a connection slot, both bounded:

* a body over ``max_body_bytes`` is refused 413 from its Content-Length (or as
  it passes the limit, chunked) before any of it is parsed; JSON nesting is
  bounded by each body's schema (and msgspec's recursion guard for skipped
  fields); headers are capped in bytes (431) and count;
* a request must arrive whole within ``request_s`` of its first byte (else
  408), an idle keep-alive connection is closed after ``idle_s``, a reply the
  client does not read within ``write_s`` drops the connection, and a
  connection serves at most ``max_requests`` requests;
* at most ``max_connections`` are open; one more is answered 503 and closed.

Why h11 rather than a web framework: it is pure Python (installs on Termux as
anywhere), sans-I/O, and the HTTP parser httpx and uvicorn use; the limits above
are this module's to enforce, and uvicorn has no request-read deadline, which
the trickling client needs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import h11
import msgspec

from pocketembed.clients import allows
from pocketembed.errors import PocketEmbedError
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

from . import http_api as api
from .auth import Authenticator
from .executors import as_error
from .metrics import Metrics

log = logging.getLogger("pocketembed.http")


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = api.MAX_BODY_BYTES
    max_header_bytes: int = 16 * 1024
    max_headers: int = 64
    max_connections: int = 64
    request_s: float = 10.0
    """A request's headers and body must all arrive within this of its first byte."""
    idle_s: float = 5.0
    """A keep-alive connection with no new request for this long is closed."""
    write_s: float = 30.0
    max_requests: int = 1000
    """Requests per connection; the last reply says ``Connection: close``."""


class HttpTransport:
    """The HTTP listener and its thread; ``dispatch(request, permissions)`` → a future of the result."""

    def __init__(self, address: str, allow_remote: bool, auth: Authenticator,
                 dispatch: Callable[[ops.Request, tuple[str, ...]], Future], metrics: Metrics,
                 spec: Callable[..., Any], model_list: Callable[[], list[dict[str, Any]]],
                 on_death: Callable[[str], None], limits: HttpLimits = HttpLimits()) -> None:
        from .transport import check_address

        self.host, self.port = check_address(address, allow_remote, "--http")
        self.auth = auth
        self.dispatch = dispatch
        self.metrics = metrics
        self.spec = spec
        self.model_list = model_list
        self.on_death = on_death
        self.limits = limits
        self.ready = False
        """Set once the start-up models are loaded: until then /health is 503 and requests get ``loading``."""
        self._stopping = False
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed: asyncio.Event | None = None
        self._conns: set[asyncio.Task] = set()
        self._answering: set[asyncio.Task] = set()
        """Connections with a request read and its reply not yet written: the ones a stop waits for."""
        self._ids = itertools.count(1)
        self._counts = {"requests": 0, "connections_refused": 0, "timeouts": 0, "too_large": 0}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def bind(self) -> None:
        """Listen now (on the caller's thread, so a port in use fails the start)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.create_server((self.host, int(self.port)), family=family, backlog=128)
        self.port = str(self._sock.getsockname()[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def set_ready(self) -> None:
        self.ready = True

    def request_stop(self) -> None:
        """New requests get ``shutting_down``; those in flight finish."""
        self._stopping = True

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, let replies in flight go out (up to ``timeout``), end the thread."""
        self._stopping = True
        if self._loop is not None and self._closed is not None and self._thread is not None:
            try:
                self._loop.call_soon_threadsafe(self._closed.set)
            except RuntimeError:  # the loop has ended
                pass
            self._thread.join(timeout + 1)
        elif self._sock is not None:
            self._sock.close()

    def stats(self) -> dict[str, Any]:
        return {"http": {"address": self.address, "connections": len(self._conns), **self._counts}}

    # -- the loop's thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:
            log.exception("the HTTP thread failed")
            self.on_death("http")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._sock)
        log.info("serving HTTP on http://%s", self.address)
        async with server:
            await self._closed.wait()
            server.close()
            for task in self._conns - self._answering:  # idle keep-alive connections: nothing to finish
                task.cancel()
            if self._answering:
                await asyncio.wait(list(self._answering), timeout=5.0)
            for task in list(self._conns):
                task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.limits.max_connections or self._stopping:
            self._counts["connections_refused"] += 1
            self.metrics.count("connections_refused")
            conn = h11.Connection(h11.SERVER)
            code = P.SHUTTING_DOWN if self._stopping else P.BUSY
            message = ("too many HTTP connections are open; retry shortly" if code == P.BUSY
                       else "the daemon is shutting down")
            # 503, not busy's 429: the whole server is full, not this client over a quota
            await self._close_with(conn, writer, *self._error("openai", code, message, retry_after_ms=1000, status=503))
            return
        self._conns.add(task)
        key = b"http:%d" % next(self._ids)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            for served in range(self.limits.max_requests):
                got = await self._read_request(conn, reader, writer, first=served == 0)
                if got is None:
                    break
                request, body, received = got
                self._answering.add(task)
                status, headers, payload = await self._answer(request, body, key, received)
                last = served + 1 == self.limits.max_requests or self._stopping
                if last:
                    headers.append((b"connection", b"close"))
                await self._write(conn, writer, status, headers, payload)
                self._answering.discard(task)
                if last or conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, asyncio.TimeoutError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self.auth.forget(key)
            self._conns.discard(task)
            self._answering.discard(task)
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            first: bool) -> tuple[h11.Request, bytes, float] | None:
        """The next request whole, or None when the connection is to close (an error already answered)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.limits.request_s if first else self.limits.idle_s)
        started = first
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint in (400, 413, 414, 431) else 400
                message = "request headers too large" if status == 431 else f"malformed HTTP request ({e})"
                await self._close_with(conn, writer, status, [], _json(api.error_reply("openai", P.INVALID_ARGS,
                                                                                       message)[1]))
                return None
            if event is h11.NEED_DATA:
                left = deadline - loop.time()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    data = await asyncio.wait_for(reader.read(65536), left)
                except asyncio.TimeoutError:
                    if started or request is not None:  # a request that trickles in: cut, with a 408
                        self._counts["timeouts"] += 1
                        await self._close_with(conn, writer, 408, [], _json(api.error_reply(
                            "openai", P.TIMEOUT, f"the request did not arrive within {self.limits.request_s:g} s")[1]))
                    return None
                if not started:
                    started = True
                    deadline = loop.time() + self.limits.request_s
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
                # h11's own cap only sees headers that arrive in pieces; one read can bring them all
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if len(event.headers) > self.limits.max_headers or size > self.limits.max_header_bytes:
                    await self._close_with(conn, writer, 431, [], _json(api.error_reply(
                        "openai", P.TOO_LARGE, f"request headers over {self.limits.max_headers} fields or "
                                               f"{self.limits.max_header_bytes:,} bytes")[1]))
                    return None
                length = _header(event.headers, b"content-length")
                if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
                    await self._too_large(conn, writer)
                    return None
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    await self._too_large(conn, writer)
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body), time.perf_counter()
            else:  # ConnectionClosed, PAUSED
                return None

    async def _too_large(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        self._counts["too_large"] += 1
        await self._close_with(conn, writer, *self._error(
            "openai", P.TOO_LARGE, f"the request body is over {self.limits.max_body_bytes:,} bytes"))

    async def _answer(self, request: h11.Request, body: bytes, key: bytes,
                      received: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One request's status, extra headers and JSON body."""
        self._counts["requests"] += 1
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        family = "ollama" if path.startswith("/api/") else "tei" if path in ("/embed", "/rerank") else "openai"
        routes = api.ROUTES.get(path)
        if routes is None:
            return self._error(family, P.UNKNOWN_OP, f"no endpoint {path[:100]}; see docs/http.md", status=404)
        method = request.method.decode("latin-1")
        endpoint = routes.get(method)
        if endpoint is None:
            status, headers, payload = self._error(family, P.INVALID_ARGS, f"{path} takes {' or '.join(routes)}",
                                                   status=405)
            return status, [*headers, (b"allow", ", ".join(routes).encode())], payload
        if not endpoint.op:  # /health: no token, no op
            if self.ready and not self._stopping:
                return 200, [], _json({"status": "ok"})
            return 503, [(b"retry-after", b"1")], _json({"status": "stopping" if self._stopping else "loading"})
        op = ops.OPS[endpoint.op]
        try:
            if not self.ready:
                raise PocketEmbedError("the daemon is still loading its models; retry shortly", code=P.LOADING)
            if self._stopping:
                raise PocketEmbedError("the daemon is shutting down", code=P.SHUTTING_DOWN)
            # Authenticate, then authorise, then read the body: a refusal says nothing about what was refused.
            req = ops.Request(None, op, None, _bearer(request.headers))
            granted = self.auth.authenticate(req, key, unix=False)
            peek = msgspec.msgpack.encode({"collection": api.peek_collection(body)} if "{" in (op.permission or "") else {})
            if not op.allowed_before_args(granted, peek):
                raise self.auth.forbidden(op)
            parsed = api.decode_body(endpoint, body)
            ctx = api.Context(spec=self.spec, reranker=lambda: api.default_reranker(self.model_list()),
                              received=received)
            try:
                req.raw_args = msgspec.msgpack.encode(endpoint.args(parsed, ctx))
            except OverflowError:  # JSON integers are unbounded; the ops' are 64-bit
                raise P.ProtocolError(P.INVALID_ARGS, "a number in the body is out of range") from None
            ops.decode_args(req)
            if not op.by_stored_state and not allows(granted, op.needs(req.args)):
                raise self.auth.forbidden(op)
            result = await asyncio.wrap_future(self.dispatch(req, granted))
            reply = _json(endpoint.reply(result, parsed, ctx))
        except P.ProtocolError as e:
            self.metrics.record(op.name, False, received)
            return self._error(endpoint.family, e.code, e.message, retry_after_ms=e.extra.get("retry_after_ms"))
        except Exception as e:
            error = e if isinstance(e, PocketEmbedError) else as_error(e, op.name)
            if error.code == P.INTERNAL:
                self.metrics.count("internal_errors")
                log.error("HTTP %s failed: %s", path, error.message)
            self.metrics.record(op.name, False, received)
            return self._error(endpoint.family, error.code, error.message,
                               retry_after_ms=getattr(error, "retry_after_ms", None))
        self.metrics.record(op.name, True, received)
        return 200, [], reply

    def _error(self, family: str, code: str, message: str, retry_after_ms: float | None = None,
               status: int | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        http, body = api.error_reply(family, code, message)
        headers = []
        if retry_after_ms is not None or code in (P.BUSY, P.LOADING):
            headers.append((b"retry-after", str(max(1, math.ceil((retry_after_ms or 1000) / 1000))).encode()))
        return status or http, headers, _json(body)

    async def _write(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                     headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
        data = conn.send(h11.Response(status_code=status, headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]))
        data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.limits.write_s)

    async def _close_with(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                          headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
        """Answer an error and end the connection (the rest of the request is never read)."""
        headers = [*headers, (b"connection", b"close")]
        try:
            if conn.our_state is h11.SEND_RESPONSE:
                await self._write(conn, writer, status, headers, payload)
            else:  # no request was read whole (h11 answers only a request): the bytes by hand
                writer.write(_raw_response(status, headers, payload))
                await asyncio.wait_for(writer.drain(), self.limits.write_s)
        except (ConnectionError, asyncio.TimeoutError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()


def _raw_response(status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> bytes:
    reason = _REASONS.get(status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: application/json",
             b"content-length: %d" % len(payload), *(k + b": " + v for k, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    value = _header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token[:256] if scheme.lower() == "bearer" and token else None
