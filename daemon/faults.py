"""Failpoints: faults injected on purpose, to test that the daemon survives them.

``POCKETEMBED_FAILPOINTS="aux:stats=raise,index:search=die"`` makes the named
executor fail while it handles the named op (``*`` for any op):

* ``raise``: an ordinary exception, as a bug would raise; the executor must
  answer ``internal`` and go on;
* ``die``: an exception that ends the executor's thread; the daemon must
  answer what it holds and exit non-zero;
* ``hold``: the thread waits at a gate until the test lets it through
  (``scheduler:decode=hold`` holds every decode worker before its decode,
  ``scheduler:decode:background=hold`` only decodes of background work).

``hold`` exists so that tests control time instead of racing it: a test that
needs work *queued* or *in flight* at some moment (requests to merge, a
deadline to pass, a SIGTERM or SIGKILL to land mid-job) holds the decodes
rather than betting that the machine is slow enough. The gate is a FIFO named
by ``POCKETEMBED_FAILPOINT_GATE``, since the test runs in another process:
each byte written to it lets one held thread through, and the byte ``R``
opens the gate for good. A held thread blocks in ``read``: no polling.

Read once at start; unset (the default), a check costs one dict lookup.
"""

from __future__ import annotations

import os

ENV = "POCKETEMBED_FAILPOINTS"
GATE_ENV = "POCKETEMBED_FAILPOINT_GATE"


class InjectedFault(RuntimeError):
    """A failpoint's ``raise``."""


class InjectedDeath(BaseException):
    """A failpoint's ``die``: not an Exception, so no handler catches it."""


def _parse(spec: str) -> dict[tuple[str, str], str]:
    points: dict[tuple[str, str], str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        where, _, action = part.partition("=")
        executor, _, op = where.partition(":")
        if action not in ("raise", "die", "hold") or not executor:
            raise ValueError(f"{ENV}: {part!r} is not EXECUTOR:OP=raise|die|hold")
        points[(executor, op or "*")] = action
    return points


class _Gate:
    """The FIFO a ``hold`` failpoint waits on (see the module docstring)."""

    def __init__(self, path: str) -> None:
        # O_RDWR: the open never blocks waiting for a writer, and reads never see EOF
        # when the test closes its end (Linux semantics, Android included).
        self._fd = os.open(path, os.O_RDWR)
        self._open = False

    def wait(self) -> None:
        if self._open:
            return
        if os.read(self._fd, 1) == b"R":
            self._open = True
            os.write(self._fd, b"R")  # pass the release on to the next thread blocked here


_POINTS = _parse(os.environ.get(ENV, ""))
_GATE: _Gate | None = None
if "hold" in _POINTS.values():
    if not os.environ.get(GATE_ENV):
        raise ValueError(f"{ENV}: a hold failpoint needs {GATE_ENV}=PATH of a FIFO")
    _GATE = _Gate(os.environ[GATE_ENV])


def check(executor: str, op: str) -> None:
    """Fail, or wait at the gate, here if a failpoint names this executor and op."""
    if not _POINTS:
        return
    action = _POINTS.get((executor, op)) or _POINTS.get((executor, "*"))
    if action == "raise":
        raise InjectedFault(f"injected fault in {executor}:{op}")
    if action == "die":
        raise InjectedDeath(f"injected death of the {executor} executor at {op}")
    if action == "hold" and _GATE is not None:
        _GATE.wait()
