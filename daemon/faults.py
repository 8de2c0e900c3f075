"""Failpoints: faults injected on purpose, to test that the daemon survives them.

``POCKETEMBED_FAILPOINTS="aux:stats=raise,index:search=die"`` makes the named
executor fail while it handles the named op (``*`` for any op):

* ``raise``: an ordinary exception, as a bug would raise; the executor must
  answer ``internal`` and go on;
* ``die``: an exception that ends the executor's thread; the daemon must
  answer what it holds and exit non-zero.

Read once at start; unset (the default), a check costs one dict lookup.
"""

from __future__ import annotations

import os

ENV = "POCKETEMBED_FAILPOINTS"


class InjectedFault(RuntimeError):
    """A failpoint's ``raise``."""


class InjectedDeath(BaseException):
    """A failpoint's ``die``: not an Exception, so no handler catches it."""


def _parse(spec: str) -> dict[tuple[str, str], str]:
    points: dict[tuple[str, str], str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        where, _, action = part.partition("=")
        executor, _, op = where.partition(":")
        if action not in ("raise", "die") or not executor:
            raise ValueError(f"{ENV}: {part!r} is not EXECUTOR:OP=raise|die")
        points[(executor, op or "*")] = action
    return points


_POINTS = _parse(os.environ.get(ENV, ""))


def check(executor: str, op: str) -> None:
    """Fail here if a failpoint names this executor and op."""
    if not _POINTS:
        return
    action = _POINTS.get((executor, op)) or _POINTS.get((executor, "*"))
    if action == "raise":
        raise InjectedFault(f"injected fault in {executor}:{op}")
    if action == "die":
        raise InjectedDeath(f"injected death of the {executor} executor at {op}")
