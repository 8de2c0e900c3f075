"""Every op and every error code reaches the document, both Python clients, the Java client and the CLI.

The op table (ipc/ops.py ``OPS``) and the error-code registry (ipc/protocol.py
``ERRORS``) are the two lists the protocol is made of. An op or a code added
there and forgotten in one of the places below fails here, one test per op or
code and place, with what to add. Fast and model-free: no daemon runs; the
clients' transport and the CLI's client are replaced by recorders.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
from pathlib import Path

import msgspec
import pytest

import pocketembed.errors as engine_errors
import pocketembed.ipc as ipc
from pocketembed import cli
from pocketembed.ipc import client as py_client
from pocketembed.ipc import ops
from pocketembed.ipc import protocol as P

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "ipc" / "PROTOCOL.md").read_text()
JAVA_DIR = REPO / "android" / "java" / "org" / "pocketembed"
JAVA_CLIENT = (JAVA_DIR / "PocketEmbedClient.java").read_text()
JAVA_ERRORS = (JAVA_DIR / "DaemonException.java").read_text()

OP_NAMES = list(ops.OPS)
CODES = list(P.ERRORS)

# -- error codes -----------------------------------------------------------------------

PY_CLASS = {"request": "InvalidRequest", "model": "ModelError", "busy": "Busy", "timeout": "DaemonTimeout",
            "storage": "StorageFailed", "unavailable": "Unavailable", "access": "AccessDenied", "internal": "DaemonError"}
JAVA_CLASS = {"request": "InvalidRequest", "model": "ModelError", "busy": "Busy", "timeout": "Timeout",
              "storage": "Storage", "unavailable": "Unavailable", "access": "AccessDenied", "internal": "DaemonException"}
"""The exception class each kind of code (protocol.KINDS) is raised as, in Python and in Java."""

ENGINE_ONLY_CODES = {"prepare_failed", "import_refused"}
"""Codes of pocketembed.errors that only the CLI prints: the daemon neither prepares nor imports models."""


def test_the_registry_is_the_modules_constants_and_its_kinds_have_classes():
    constants = {v for k, v in vars(P).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z_]+", v)}
    assert constants == set(P.ERRORS), constants ^ set(P.ERRORS)
    assert set(PY_CLASS) == set(JAVA_CLASS) == set(P.KINDS)
    assert set(py_client._BY_KIND) == set(P.KINDS)


@pytest.mark.parametrize("code", CODES)
def test_error_code_is_in_protocol_md(code):
    section = DOC[DOC.index("## Error codes"):DOC.index("## Clients")]
    assert re.search(rf"^\| `{code}` \| ", section, re.M), f"PROTOCOL.md's error table lacks {code}: " \
                                                           "run `python -m pocketembed.ipc.ops`"


@pytest.mark.parametrize("code", CODES)
def test_error_code_is_raised_by_the_python_client_as_its_class(code):
    want = getattr(py_client, PY_CLASS[P.ERRORS[code].kind])
    assert py_client._BY_CODE.get(code) is want, f"ipc/client.py's _BY_CODE does not map {code} to {want.__name__}"
    with pytest.raises(want) as info:
        py_client._raise_for({"ok": False, "error": {"code": code, "message": "m", "retry_after_ms": 5}})
    assert info.value.code == code and info.value.details == {"retry_after_ms": 5}
    assert type(info.value) is want and want.__name__ in ipc.__all__


def java_cases() -> dict[str, str]:
    """Code → the class DaemonException.of returns for it, read off the switch's ``case``/``return`` lines."""
    switch = JAVA_ERRORS[JAVA_ERRORS.index("switch (code)"):]
    found, pending = {}, []
    for line in switch.splitlines():
        if m := re.match(r'\s*case "([a-z_]+)":', line):
            pending.append(m.group(1))
        elif m := re.match(r"\s*return new (\w+)\(", line):
            found.update(dict.fromkeys(pending, m.group(1)))
            pending = []
        if line.strip() == "}":
            break
    return found


@pytest.mark.parametrize("code", CODES)
def test_error_code_is_known_to_the_java_client(code):
    assert re.search(rf'public static final String {code.upper()} = "{code}";', JAVA_ERRORS), \
        f"DaemonException.java has no constant {code.upper()}"
    assert java_cases().get(code) == JAVA_CLASS[P.ERRORS[code].kind], \
        f'DaemonException.of has no `case "{code}":` returning {JAVA_CLASS[P.ERRORS[code].kind]}'


def test_the_engines_error_codes_are_in_the_registry():
    """A PocketEmbedError the daemon passes on keeps its code: it must be one the clients know."""
    classes, todo = set(), [engine_errors.PocketEmbedError]
    while todo:
        cls = todo.pop()
        classes.add(cls)
        todo.extend(cls.__subclasses__())
    codes = {c.code for c in classes if c.__module__ == engine_errors.__name__}
    assert not codes - set(P.ERRORS) - ENGINE_ONLY_CODES, codes - set(P.ERRORS) - ENGINE_ONLY_CODES


# -- ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OP_NAMES)
def test_op_is_in_protocol_md(op):
    headings = [line for line in DOC.splitlines() if line.startswith("#")]
    assert any(f"`{op}`" in h for h in headings), f"PROTOCOL.md has no section heading naming `{op}`"
    assert re.search(rf"^\| `{re.escape(op)}` \|", DOC, re.M), f"PROTOCOL.md's op table lacks {op}"


VECTORS = P.encode_vectors(__import__("numpy").ones((1, 4), "float32"), "float32")


def clients_table() -> dict[str, dict[str, list[str]]]:
    """PROTOCOL.md's Clients table: op → {"python": [methods], "java": [methods], "command": [words]}."""
    m = re.search(r"<!-- clients -->\n(.*?)<!-- /clients -->", DOC, re.S)
    assert m, "PROTOCOL.md has no <!-- clients --> table"
    rows = {}
    for line in m.group(1).splitlines()[2:]:
        op, python, java, command = (c.strip() for c in line.strip().strip("|").split("|"))
        rows[op.strip("`")] = {"python": re.findall(r"`(\w+)`", python), "java": re.findall(r"`(\w+)`", java),
                               "command": command.strip("`").split()}
    return rows


CLIENTS = clients_table()

SAMPLE_ARGS: dict[str, tuple[tuple, dict]] = {
    "ping": ((), {}),
    "models.list": ((), {}),
    "embed": ((["hello"],), {"dims": 4, "input_type": "query"}),
    "rerank": (("q", ["a document"], "a-reranker"), {}),
    "models.load": (("all-minilm-l6-v2:q8_0",), {"keep_alive": "5m"}),
    "models.unload": (("all-minilm-l6-v2:q8_0",), {}),
    "stats": ((), {}),
    "search": (("sms", "dinner"), {"k": 3, "filter": {"a": 1}, "mode": "vector"}),
    "index.add": (("sms", [{"id": 1, "text": "hi", "metadata": {"from": "x"}}]), {"store_text": True}),
    "index.delete": (("sms", [1, "b"]), {}),
    "index.enqueue": (("sms", [{"id": 1, "text": "hi"}]), {"delete": [2]}),
    "collections.list": ((), {}),
    "collections.drop": (("sms",), {}),
    "collections.stats": (("sms",), {}),
    "jobs.submit": (("/tmp/sms.db", "sms", "id", "body"), {"where": "id > 3"}),
    "jobs.list": ((), {"limit": 5}),
    "jobs.status": ((7,), {}),
    "jobs.pause": ((7,), {}),
    "jobs.resume": ((7,), {}),
    "jobs.cancel": ((7,), {}),
}
"""Op → the arguments of a call of its Python methods (PROTOCOL.md's Clients table names them)."""

RESULT = {"hits": [], "deleted": 2, "scores": [0.5], **VECTORS}
"""One reply result that serves every method (each reads its own keys)."""


class RecordingClient(py_client.Client):
    """Client with its transport replaced: records each request, answers RESULT."""

    def __init__(self) -> None:
        self.timeout, self.sent = 30.0, []

    def call(self, op, args=None, *, timeout=None):
        self.sent.append((op, args or {}))
        return RESULT

    def close(self) -> None:
        pass


class RecordingAsyncClient(py_client.AsyncClient):
    def __init__(self) -> None:
        self.timeout, self.sent = 30.0, []

    async def call(self, op, args=None, *, timeout=None):
        self.sent.append((op, args or {}))
        return RESULT


def test_the_clients_table_and_the_samples_name_every_op():
    assert list(CLIENTS) == OP_NAMES, "PROTOCOL.md's Clients table must have a row per op, in the op table's order"
    assert set(SAMPLE_ARGS) == set(ops.OPS) == set(CLI_ARGS), "add the op's sample arguments here"


def assert_valid_request(op: str, sent: list) -> None:
    assert [name for name, _ in sent] == [op], sent
    # The args the client built are ones the daemon accepts: decoded as the router decodes them.
    msgspec.msgpack.decode(P.pack(sent[0][1]), type=ops.OPS[op].args)


def python_methods(op: str) -> list[str]:
    methods = CLIENTS.get(op, {}).get("python")
    assert methods, f"PROTOCOL.md's Clients table names no Python method for {op}"
    return methods


@pytest.mark.parametrize("op", OP_NAMES)
def test_op_has_a_client_method(op):
    args, kwargs = SAMPLE_ARGS[op]
    for method in python_methods(op):
        c = RecordingClient()
        assert hasattr(c, method), f"Client has no method {method} (for {op})"
        getattr(c, method)(*args, **kwargs)
        assert_valid_request(op, c.sent)


@pytest.mark.parametrize("op", OP_NAMES)
def test_op_has_an_async_client_method(op):
    args, kwargs = SAMPLE_ARGS[op]
    for method in python_methods(op):
        c = RecordingAsyncClient()
        assert hasattr(c, method), f"AsyncClient has no method {method} (for {op})"
        asyncio.run(getattr(c, method)(*args, **kwargs))
        assert_valid_request(op, c.sent)


def java_methods() -> dict[str, set[str]]:
    """Public method of PocketEmbedClient → the op names its body sends (``call("op"``, ``jobOp("op"``)."""
    found: dict[str, set[str]] = {}
    parts = re.split(r"\n    public (?:static )?(?:<\w+> )?[\w<>, ?\[\]]+ (\w+)\(", JAVA_CLIENT)
    for name, body in zip(parts[1::2], parts[2::2]):
        found.setdefault(name, set()).update(re.findall(r'(?:call|jobOp)\("([a-z.]+)"', body))
    return found


@pytest.mark.parametrize("op", OP_NAMES)
def test_op_has_a_java_client_method(op):
    methods = CLIENTS.get(op, {}).get("java")
    assert methods, f"PROTOCOL.md's Clients table names no Java method for {op}"
    sends = java_methods()
    for method in methods:
        assert op in sends.get(method, set()), f"PocketEmbedClient.{method} does not send {op!r}"


CLI_ARGS: dict[str, list[str]] = {
    "ping": [], "models.list": [], "embed": ["hello"], "rerank": ["a query", "a document", "--model", "a-reranker"],
    "models.load": ["all-minilm-l6-v2:q8_0"], "models.unload": ["all-minilm-l6-v2:q8_0"], "stats": [],
    "search": ["dinner", "-c", "sms"], "index.add": ["-c", "sms"], "index.delete": ["-c", "sms", "1"],
    "index.enqueue": ["-c", "sms"], "collections.list": [], "collections.drop": ["sms"],
    "collections.stats": ["sms"],
    "jobs.submit": ["--db", "sms.db", "--table", "sms", "--id", "id", "--text", "body"], "jobs.list": [],
    "jobs.status": ["7"], "jobs.pause": ["7"], "jobs.resume": ["7"], "jobs.cancel": ["7"],
}
"""Op → the arguments its command (PROTOCOL.md's Clients table) is run with here; ``items`` reads stdin."""


class RefusingClient(RecordingClient):
    """The CLI's client: records the first request and answers it with an error, so no reply shape matters."""

    def __init__(self, endpoint=None, *, timeout=30.0, context=None, token=None) -> None:
        super().__init__()
        SENT.clear()
        self.sent = SENT

    def call(self, op, args=None, *, timeout=None):
        self.sent.append((op, args or {}))
        raise py_client.InvalidRequest(P.INVALID_ARGS, "recorded")

    def __enter__(self):
        return self


SENT: list = []


@pytest.mark.parametrize("op", OP_NAMES)
def test_op_has_a_cli_command(op, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ipc, "Client", RefusingClient)
    monkeypatch.setenv("POCKETEMBED_HOME", str(tmp_path))
    monkeypatch.delenv("POCKETEMBED_TOKEN", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"id": 1, "text": "hi"}\n'))
    command = CLIENTS.get(op, {}).get("command")
    assert command and command[0] == "pocketembed", f"PROTOCOL.md's Clients table names no command for {op}"
    code = cli.main([*command[1:], *CLI_ARGS[op], "--socket", "tcp://127.0.0.1:9"])
    assert code == cli.EXIT_ERROR and "error[invalid_input]: recorded" in capsys.readouterr().err
    assert_valid_request(op, SENT)
