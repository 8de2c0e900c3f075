"""Shared fixtures: the prepared models and a way to run the CLI as a user would.

Models are prepared once per data directory (idempotent, ~10 s the first time),
in $POCKETEMBED_HOME when set (CI sets it) or the user's default data directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketembed import paths
from pocketembed.gguf_models.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMS_TSV = REPO.parent / "shared" / "data" / "SMSSpamCollection.tsv"


@pytest.fixture(scope="session")
def home() -> Path:
    root = paths.home()
    prepare(root=root, progress=lambda m: None)
    return root


@pytest.fixture(scope="session")
def engines(home):
    """One engine per quantization, shared by the tests that only read from them."""
    from pocketembed.daemon.models import open_engine

    opened = {q: open_engine(f"all-minilm-l6-v2:{q}", home)[1] for q in ("q8_0", "q4_0", "f16")}
    yield opened
    for e in opened.values():
        e.close()


def run_cli(*args: str, home: Path | None = None, stdin: str | bytes | None = None, env: dict | None = None,
            text: bool = True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    if home is not None:
        full_env[paths.ENV_HOME] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "pocketembed.cli", *args],
        input=stdin, capture_output=True, text=text, env=full_env, timeout=300,
    )
