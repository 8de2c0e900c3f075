"""The op table, bound: each op's handler on the executor the table names.

The transport hands a decoded, authenticated request here and gets a future of
its result back; it knows nothing else of the op. At start every op of
``ops.OPS`` must find its handler and its executor (a missing one fails the
start, not a request).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pocketembed.clients import allows
from pocketembed.errors import UnknownJob
from pocketembed.ipc import ops

from .auth import Authenticator
from .executors import Executor, as_error, failed, resolve
from .handlers import Handlers
from .models import ModelRegistry


class Dispatcher:
    """``dispatch(request, permissions)`` → a future of the reply's result."""

    def __init__(self, handlers: Handlers, executors: dict[str, Executor], models: ModelRegistry,
                 auth: Authenticator) -> None:
        self.executors = executors
        self.models = models
        self.auth = auth
        self.job_collection = handlers.job_collection
        self.routes: dict[str, Callable[[Any], Any]] = {}
        for op in ops.OPS.values():
            handler = getattr(handlers, op.handler, None)
            if handler is None:
                raise RuntimeError(f"op {op.name} has no handler Handlers.{op.handler}")
            if op.executor not in ("inline", "scheduler") and op.executor not in executors:
                raise RuntimeError(f"op {op.name} runs on executor {op.executor!r}, which the daemon does not have")
            self.routes[op.name] = handler

    def dispatch(self, req: ops.Request, granted: tuple[str, ...]) -> Future:
        """Run the request's handler where the op table says; Busy (raised) when that executor is full.

        Inline and scheduler ops run their handler here, on the I/O thread (a
        scheduler op only queues its texts); the rest queue on their executor.
        """
        op, args = req.op, req.args
        for model in (getattr(args, "model", None), getattr(args, "rerank", None)):
            if model is not None:
                self.models.spec(model)  # unknown_model now, before anything is queued
        handler = self.routes[op.name]
        if op.by_stored_state:
            handler = self._checked(op, handler, granted)
        if op.executor in ("inline", "scheduler"):
            out: Future = Future()
            try:
                resolve(out, handler(args))
            except Exception as e:
                return failed(as_error(e, op.name))
            return out
        return self.executors[op.executor].submit(lambda: handler(args), op.name)

    def _checked(self, op: ops.Op, handler: Callable[[Any], Any], granted: tuple[str, ...]) -> Callable[[Any], Any]:
        """The handler behind a permission of stored state (``index:{job}``), checked on the executor first.

        A job of another collection and no job at all get the same answer: nothing to learn.
        """
        def run(args: Any) -> Any:
            need = op.needs(args, self.job_collection)
            if not allows(granted, need):
                if need != "admin":  # the job exists: a refusal worth counting
                    self.auth.metrics.auth["forbidden"] += 1
                raise UnknownJob(f"no job {args.job}" + ("" if "admin" in granted else " that this client may read"))
            return handler(args)

        return run
