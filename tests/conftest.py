"""Shared fixtures: the prepared models and a way to run the CLI as a user would.

Models are prepared once per data directory (idempotent, ~10 s the first time),
in $POCKETEMBED_HOME when set (CI sets it) or the user's default data directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pocketembed import paths
from pocketembed.gguf_models.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "model: uses the prepared GGUF models (a real engine or daemon); "
                                       "`pytest -m 'not model'` runs the fast model-free subset")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the prepared models asks for ``home`` (directly or through a fixture)."""
    for item in items:
        if "home" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


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


def fresh_home(models_home: Path, root: Path | None = None) -> Path:
    """A data directory of its own (index.db, jobs, the daemon's lock) sharing the prepared models.

    One daemon per data directory (the daemon locks it), so each daemon a test
    starts gets its own unless the test means to share one.
    """
    root = root or Path(tempfile.mkdtemp(prefix="pe-test-home-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models_home / "models")
    return root


def run_cli(*args: str, home: Path | None = None, stdin: str | bytes | None = None, env: dict | None = None,
            text: bool = True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    if home is not None:
        full_env[paths.ENV_HOME] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "pocketembed.cli", *args],
        input=stdin, capture_output=True, text=text, env=full_env, timeout=300,
    )


SAME_EMBEDDING_COS = 0.99999
"""Per-row cosine of two computations of the same texts by the same model.

Bit-identity holds only between identical decode configurations (thread split,
batch composition): llama.cpp's CPU kernels split a matmul's rows between
threads in chunks whose kernels (e.g. AVX-512 repacked GEMM vs GEMV for the
remainder) sum in different orders, so another split moves vectors by ~1e-5 on
some CPUs (seen on AMD Zen 5) and not at all on others. A wrong model (q4_0 for
q8_0: ~0.99), a missing prefix or another pooling lands far below this bound.
"""


def mappings_rss_kb(path: str | os.PathLike[str], pid: int | str = "self") -> dict[str, int]:
    """Resident kB of each of a process's mappings of ``path``, by address range (/proc/PID/smaps)."""
    target, found, current = os.path.realpath(path), {}, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = head[0] if len(head) == 6 and head[5] == target else None
        elif current and line.startswith("Rss:"):
            found[current] = int(line.split()[1])
    return found


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same_embedding(got: np.ndarray, want: np.ndarray, min_cos: float = SAME_EMBEDDING_COS) -> None:
    """Same dtype and shape, and every row within ``min_cos`` of the reference."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    cos = row_cosines(got, want)
    assert cos.min() >= min_cos, f"row cosines {np.round(cos, 7).tolist()} below {min_cos}"


@pytest.fixture
def gated_daemon(home, tmp_path):
    """Start daemons whose decodes wait at a DecodeGate (tests/daemon_proc.py) until the test lets them through.

    ``start(*serve_args, env=..., root=..., lane=...)`` returns ``(daemon, gate)``; each has its own
    data directory unless ``root`` is given; ``lane="background"`` holds only background decodes.
    At the end every gate is opened and every daemon must stop cleanly.
    """
    from daemon_proc import DaemonProcess, DecodeGate

    started: list = []

    def start(*args: str, env: dict | None = None, root: Path | None = None, lane: str | None = None):
        n = len(started)
        gate = DecodeGate(tmp_path / f"gate{n}", lane)
        d = DaemonProcess(root or fresh_home(home, tmp_path / f"home{n}"), tmp_path / f"pe{n}.sock", *args,
                          env={**gate.env, **(env or {})})
        started.append((d, gate))
        return d.wait_ready(), gate

    yield start
    for d, gate in started:
        gate.release()
        assert d.stop() == 0
        gate.close()
