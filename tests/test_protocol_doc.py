"""PROTOCOL.md's tables of ops and arguments agree with the op table the daemon validates against."""

from pathlib import Path

from pocketembed.ipc import ops

PROTOCOL = Path(__file__).resolve().parents[1] / "ipc" / "PROTOCOL.md"


def test_generated_tables_are_current():
    text = PROTOCOL.read_text()
    assert ops.update_protocol_md(text) == text, "run `python -m pocketembed.ipc.ops` to regenerate PROTOCOL.md's tables"


def test_every_op_has_its_argument_table():
    text = PROTOCOL.read_text()
    for name in ops.OPS:
        if name in ("jobs.pause", "jobs.resume", "jobs.cancel"):  # documented with jobs.status: the same args
            assert ops.OPS[name].args is ops.OPS["jobs.status"].args
            continue
        assert f"<!-- gen:args:{name} -->" in text, name
    assert "<!-- gen:ops -->" in text
