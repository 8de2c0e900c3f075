"""docs/http.md's curl examples run against a real daemon and print what the page says.

Each fenced ``bash`` block preceded by ``<!-- curl -->`` is run line by line
with bash, against a daemon set up as the page's set-up block says (a token for
``notes`` that may embed and search ``notes``; a collection ``notes`` of two
texts). The page's port 8750 becomes the test's free port. Every line must exit
0 and print JSON (a trailing ``%{http_code}`` is split off); where the block is
followed by a plain fenced block, the output must be exactly that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess
from test_auth import add_client, free_port

PAGE = Path(__file__).resolve().parents[1] / "docs" / "http.md"
MARK = "<!-- curl -->"


def curl_blocks(text: str) -> list[tuple[list[str], str | None]]:
    """(the block's curl lines, the output block that follows it or None), in page order."""
    blocks = []
    parts = text.split(MARK)[1:]
    for part in parts:
        m = re.match(r"\s*```bash\n(.*?)\n```\n", part, re.S)
        assert m, f"{MARK} must be followed by a ```bash block"
        lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
        rest = part[m.end():]
        out = re.match(r"(?:[^`\n][^\n]*\n|\n)*?```\n(.*?)\n```", rest, re.S)
        expected = out.group(1) if out and not rest.lstrip().startswith(("```bash", MARK)) else None
        blocks.append((lines, expected))
    return blocks


BLOCKS = curl_blocks(PAGE.read_text())


def test_the_page_has_curl_examples():
    assert sum(len(lines) for lines, _ in BLOCKS) >= 8
    assert all(ln.startswith("curl ") for lines, _ in BLOCKS for ln in lines)


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    assert shutil.which("curl"), "these tests run the page's curl commands: install curl"
    tmp = tmp_path_factory.mktemp("httpdocs")
    root = fresh_home(home, tmp / "home")
    port = free_port()
    d = DaemonProcess(root, tmp / "pe.sock", "--http", f"127.0.0.1:{port}").wait_ready()
    with d.client() as owner:
        owner.index_add("notes", [{"id": 1, "text": "Dentist appointment moved to Friday 9:30"},
                                  {"id": 2, "text": "Buy milk and bread on the way home"}], store_text=True)
        owner.index_add("sms", [{"id": 1, "text": "a message the notes tool may not read"}])
    d.port = port
    d.token = add_client(root, "notes", "embed", "search:notes")
    yield d
    assert d.stop() == 0


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_curl_example_runs(daemon, block):
    lines, expected = BLOCKS[block]
    outputs = []
    for line in lines:
        cmd = line.replace("127.0.0.1:8750", f"127.0.0.1:{daemon.port}")
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PE_TOKEN": daemon.token})
        assert r.returncode == 0, (line, r.stderr)
        body = r.stdout
        if "%{http_code}" in line:
            body, code = body.rstrip("\n").rsplit("}", 1)
            body += "}"
            assert code.isdigit(), (line, r.stdout)
        reply = json.loads(body)
        assert not (isinstance(reply, dict) and "error" in reply) or expected is not None, (line, body)
        outputs.append(r.stdout.rstrip("\n"))
    if expected is not None:
        assert "\n".join(outputs) == expected


def test_search_example_finds_the_note(daemon):
    """The page's search line is answered with the right hit, not merely with JSON."""
    line = next(ln for lines, _ in BLOCKS for ln in lines if "/v1/search" in ln and '"notes"' in ln)
    r = subprocess.run(["bash", "-c", line.replace("127.0.0.1:8750", f"127.0.0.1:{daemon.port}")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PE_TOKEN": daemon.token})
    hits = json.loads(r.stdout)["hits"]
    assert [h["id"] for h in hits] == [1] and "Dentist" in hits[0]["text"]
