"""The op table runs the daemon: every op finds its handler and its executor, model-free.

A daemon whose table names a handler or an executor it lacks fails at start
(dispatch.Dispatcher), never on a request; these tests keep that true without
starting one.
"""

from __future__ import annotations

import inspect

import pytest

from pocketembed.daemon import dispatch
from pocketembed.daemon.handlers import Handlers
from pocketembed.daemon.server import EXECUTOR_QUEUES
from pocketembed.ipc import ops


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_each_op_has_a_handler_taking_its_args_and_an_executor(name):
    op = ops.OPS[name]
    handler = getattr(Handlers, op.handler, None)
    assert handler is not None, f"{name}: no Handlers.{op.handler}"
    params = list(inspect.signature(handler).parameters)
    assert params == ["self", "a"], f"{name}: a handler takes the op's args alone, got {params}"
    assert op.executor in ("inline", "scheduler") or op.executor in EXECUTOR_QUEUES


def test_no_handler_without_an_op():
    public = {n for n, v in vars(Handlers).items() if callable(v) and not n.startswith("_")}
    helpers = {"close", "job_collection", "check_source"}
    assert public - helpers == {op.handler for op in ops.OPS.values()}


def test_a_missing_handler_or_executor_fails_the_start(monkeypatch):
    class Few:
        job_collection = None

    with pytest.raises(RuntimeError, match="has no handler"):
        dispatch.Dispatcher(Few(), {}, models=None, auth=None)

    class All:
        job_collection = None

        def __getattr__(self, name):
            return lambda a: None

    with pytest.raises(RuntimeError, match="which the daemon does not have"):
        dispatch.Dispatcher(All(), {}, models=None, auth=None)


def test_a_stored_state_permission_needs_the_jobs_collection():
    op = ops.OPS["jobs.status"]
    args = ops.JobArgs(job=7)
    assert op.by_stored_state
    assert op.needs(args, lambda job: "sms" if job == 7 else None) == "index:sms"
    assert op.needs(args, lambda job: None) == "admin"  # no such job: what only admin has, answered unknown_job
    assert not ops.OPS["search"].by_stored_state
    assert ops.OPS["search"].needs(ops.SearchArgs(collection="c", query="q")) == "search:c"


def test_an_unknown_executor_is_refused_when_the_table_is_built():
    with pytest.raises(ValueError, match="unknown executor"):
        ops.Op("x.y", ops.NoArgs, "nowhere", None, "nothing")
    assert ops.Op("x.y", ops.NoArgs, "aux", None, "nothing").handler == "x_y"
