"""Who may make a request: client tokens, their permissions, and a block for connections that guess.

Requests on the TCP endpoint (which every app on a phone can reach) must carry
a client token whose permissions cover the op (the op table's ``permission``;
``pocketembed/clients.py``); the token is checked before the arguments are even
decoded, so a refusal says nothing about what was refused. The Unix socket is
private to the daemon's user, whose requests are admin unless
``require_auth_unix`` is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pocketembed.clients import ClientStore, Forbidden, Unauthorized
from pocketembed.ipc import ops

from .metrics import Metrics

BAD_TOKENS_BEFORE_BLOCK = 10
"""Bad tokens a connection may send before it is refused outright for BLOCK_S."""
BLOCK_S = 60.0
MAX_TRACKED = 10_000
"""Connections whose bad tokens are remembered; past it the memory is cleared (a flood of new connections)."""


class Authenticator:
    """Tokens → permissions, with a per-connection block after BAD_TOKENS_BEFORE_BLOCK bad tokens in a row.

    A connection key is chosen by the transport, never by the client: on TCP the
    daemon's own file descriptor of the connection (ZeroMQ's SRCFD), forgotten
    when that connection closes (``forget``), so a later connection on the same fd
    starts clean; a ZMTP 2.0 peer (no fd) its routing id, apart from the fd keys.
    """

    def __init__(self, clients: ClientStore, metrics: Metrics, require_auth_unix: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clients = clients
        self.metrics = metrics
        self.require_auth_unix = require_auth_unix
        self.clock = clock
        self._bad_tokens: dict[bytes, tuple[int, float]] = {}
        """Connection → (bad tokens in a row, blocked until)."""
        self._lock = threading.Lock()
        """The ZeroMQ I/O thread and the HTTP thread both authenticate."""

    def authenticate(self, req: ops.Request, conn: bytes, unix: bool) -> tuple[str, ...]:
        """The permissions this request carries; Unauthorized without a known token where one is needed.

        Never logs the token. A blocked connection is refused without a check: a
        flood of guesses costs the daemon a dict lookup each.
        """
        if req.op is not None and req.op.permission is None:
            return ()
        if unix and not self.require_auth_unix:
            return ("admin",)  # the Unix socket is 0600 in a 0700 directory: the peer is the owner
        with self._lock:
            return self._token(req, conn)

    def _token(self, req: ops.Request, conn: bytes) -> tuple[str, ...]:
        bad, until = self._bad_tokens.get(conn, (0, 0.0))
        now = self.clock()
        if until > now:
            self.metrics.auth["blocked"] += 1
            blocked = Unauthorized(f"too many bad tokens from this connection; refused for {until - now:.0f} s")
            blocked.retry_after_ms = int((until - now) * 1000) + 1
            raise blocked
        client = self.clients.authenticate(req.auth) if req.auth else None
        if client is None:
            self.metrics.auth["unauthorized"] += 1
            if req.auth:
                bad += 1
                if len(self._bad_tokens) > MAX_TRACKED:
                    self._bad_tokens.clear()
                self._bad_tokens[conn] = (bad, now + BLOCK_S if bad >= BAD_TOKENS_BEFORE_BLOCK else 0.0)
            raise Unauthorized("this endpoint needs a client token (the request's auth; on HTTP "
                               "`Authorization: Bearer TOKEN`)"
                               + (" (this one is unknown or revoked)" if req.auth else "")
                               + "; the phone's owner creates one with `pocketembed clients add`")
        self._bad_tokens.pop(conn, None)
        return client.allow

    def forget(self, conn: bytes) -> None:
        """A connection opened or closed: no block carries over to whoever gets its key next."""
        with self._lock:
            self._bad_tokens.pop(conn, None)

    def forbidden(self, op: ops.Op) -> Forbidden:
        """The refusal of an op the caller's permissions do not cover (counted)."""
        self.metrics.auth["forbidden"] += 1
        return Forbidden(f"this client may not {op.name}" + ("" if "{" in (op.permission or "") else f" (needs {op.permission})"))
