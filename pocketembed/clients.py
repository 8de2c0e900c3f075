"""Client credentials: who may call the daemon over TCP, and what each may do.

Every app on a phone can reach a loopback TCP port, so the daemon's TCP
endpoint serves only requests carrying a client token (the envelope's
``auth``). ``pocketembed clients add NAME --allow PERM ...`` makes a client and
prints its token once; only its SHA-256 is stored, in ``<home>/clients.json``
(mode 0600). A token is 32 random bytes, so a fast hash is enough: nobody can
guess one from its hash, and checking costs a microsecond.

Permissions: ``embed``; ``search:COLLECTION`` and ``index:COLLECTION``
(``COLLECTION`` may be ``*``); ``admin`` (everything). The daemon re-reads the
file when it changes, so a revoked token is refused on its next request.

Stdlib only: the CLI manages clients on a client-only install too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketembed.errors import InvalidInput, PocketEmbedError

log = logging.getLogger("pocketembed.clients")

ENV_TOKEN = "POCKETEMBED_TOKEN"
TOKEN_PREFIX = "pe_"
_PERM = re.compile(r"^(embed|admin|(search|index):(\*|[^\s:][^\s]{0,127}))$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Unauthorized(PocketEmbedError):
    """No token, or one the daemon does not know."""

    code = "unauthorized"


class Forbidden(PocketEmbedError):
    """A valid token whose permissions do not cover the request (or a path outside the allowed ones)."""

    code = "forbidden"


def clients_path(home: Path) -> Path:
    return home / "clients.json"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_permission(value: str) -> str:
    if not _PERM.match(value):
        raise InvalidInput(f"unknown permission {value!r}; use embed, admin, search:COLLECTION or index:COLLECTION "
                           "(COLLECTION may be *)")
    return value


def allows(granted: list[str] | tuple[str, ...], needed: str | None) -> bool:
    """Whether permissions ``granted`` cover ``needed`` (None: needs nothing)."""
    if needed is None or "admin" in granted:
        return True
    if needed in granted:
        return True
    kind, _, _ = needed.partition(":")
    return kind in ("search", "index") and f"{kind}:*" in granted


@dataclass(frozen=True)
class ClientInfo:
    name: str
    allow: tuple[str, ...]
    created: float


class ClientStore:
    """The clients file: add, list, revoke (the CLI), and token checks (the daemon)."""

    def __init__(self, home: Path) -> None:
        self.path = clients_path(home)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[tuple[str, ClientInfo]] = []

    # -- the CLI's side ---------------------------------------------------------------

    def add(self, name: str, allow: list[str]) -> str:
        """Create a client; returns its token (shown once, never stored)."""
        if not _NAME.match(name):
            raise InvalidInput(f"client name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if not allow:
            raise InvalidInput("give the client at least one permission with --allow")
        perms = sorted({check_permission(p) for p in allow})
        data = self._read()
        if name in data["clients"]:
            raise InvalidInput(f"a client named {name!r} exists; revoke it first or choose another name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        data["clients"][name] = {"token_sha256": _digest(token), "allow": perms, "created": time.time()}
        self._write(data)
        return token

    def revoke(self, name: str) -> None:
        data = self._read()
        if name not in data["clients"]:
            raise InvalidInput(f"no client named {name!r}")
        del data["clients"][name]
        self._write(data)

    def list(self) -> list[ClientInfo]:
        return [ClientInfo(n, tuple(c["allow"]), c["created"]) for n, c in sorted(self._read()["clients"].items())]

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"clients": {}}
        except OSError as e:
            raise _Unreadable(f"cannot read the clients file {self.path}: {e}") from None
        except ValueError as e:
            raise PocketEmbedError(f"cannot read the clients file {self.path}: {e}", code="invalid_config") from None
        if not isinstance(data, dict) or not isinstance(data.get("clients"), dict):
            raise PocketEmbedError(f"{self.path} is not a clients file", code="invalid_config")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        """Atomically, private to the owner: the daemon never sees a half-written file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".clients.", suffix=".json")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- the daemon's side ------------------------------------------------------------

    def authenticate(self, token: str) -> ClientInfo | None:
        """The client holding ``token``, or None. Compared in constant time against every client."""
        entries = self._current()
        digest = _digest(token)
        found = None
        for stored, info in entries:  # no early exit: the time does not depend on which one matched
            if hmac.compare_digest(stored, digest):
                found = info
        return found

    def _current(self) -> list[tuple[str, ClientInfo]]:
        """The clients, re-read when the file changed (a stat per call: revocations act at once).

        A read that fails for want of a resource (no file descriptors left, an I/O
        error) keeps the last table that was read and is tried again on the next
        request: a passing shortage must not lock every app out until a restart. A
        file that reads but is not a clients file authenticates nobody until it
        changes again (fail closed: it may be a botched revocation).
        """
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            log.warning("cannot stat the clients file (%s); keeping the clients read before", e.strerror)
            return self._entries
        with self._lock:
            if stamp != self._stamp:
                try:
                    data = self._read() if stamp is not None else {"clients": {}}
                    self._entries = [(c["token_sha256"], ClientInfo(n, tuple(c["allow"]), c["created"]))
                                     for n, c in data["clients"].items()]
                except _Unreadable as e:
                    log.warning("%s; keeping the clients read before and retrying on the next request", e.message)
                    return self._entries
                except (PocketEmbedError, KeyError, TypeError):
                    log.error("%s is not a valid clients file; no token is accepted until it is fixed", self.path)
                    self._entries = []
                self._stamp = stamp
            return self._entries


class _Unreadable(PocketEmbedError):
    """The clients file exists but could not be read just now (EMFILE, EIO, ...)."""

    code = "invalid_config"
