"""The distribution's shape: one namespace, a client side free of llama.cpp."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_folders_install_under_one_namespace():
    import pocketembed.daemon
    import pocketembed.gguf_models
    import pocketembed.ipc

    assert Path(pocketembed.daemon.__file__).parent == REPO / "daemon"
    assert Path(pocketembed.ipc.__file__).parent == REPO / "ipc"
    assert Path(pocketembed.gguf_models.__file__).parent == REPO / "gguf_models"
    # no generic top-level names are installed (checked away from the checkout's cwd)
    code = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('ipc', 'gguf_models')))"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_client_side_does_not_import_llama_cpp():
    code = (
        "import sys, pocketembed.ipc, pocketembed.gguf_models.catalog, pocketembed.gguf_models.manifest, pocketembed.cli;"
        "bad = [m for m in sys.modules if m.startswith(('llama_cpp', 'pocketembed.daemon'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_script_and_the_dependency_split_are_declared():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["scripts"] == {"pocketembed": "pocketembed.cli:main"}
    base = " ".join(meta["project"]["dependencies"])
    daemon = " ".join(meta["project"]["optional-dependencies"]["daemon"])
    for dep in ("numpy", "pyzmq", "msgpack"):
        assert dep in base
    for dep in ("llama-cpp-python", "psutil", "sqlite-utils", "gguf"):
        assert dep in daemon and dep not in base  # the client side installs no inference stack
    assert "torch" not in base + daemon  # conversion deps are the prepare extra


def test_a_plain_install_is_the_client_side(tmp_path):
    """`pip install <checkout>` in a clean virtualenv: no llama.cpp, yet the clients and client commands work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, cli = venv / "bin" / "python", venv / "bin" / "pocketembed"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    code = ("import importlib.util as u, sys; from pocketembed.ipc import Client, AsyncClient; "
            "from pocketembed.ipc import sqlite; from pocketembed.sms import load_sms; "
            "missing = [m for m in ('llama_cpp', 'psutil', 'sqlite_utils', 'gguf') if u.find_spec(m) is None]; "
            "print(len(load_sms()), ' '.join(missing))")
    check = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd="/")
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["5574", "llama_cpp", "psutil", "sqlite_utils", "gguf"]
    # A client command answers as a client would; a daemon command names the extra it needs.
    client_cmd = subprocess.run([str(cli), "search", "-c", "sms", "hello", "--socket", str(tmp_path / "none.sock")],
                                capture_output=True, text=True)
    assert client_cmd.returncode == 1 and "error[no_daemon]" in client_cmd.stderr, client_cmd.stderr
    daemon_cmd = subprocess.run([str(cli), "serve", "--socket", str(tmp_path / "pe.sock")], capture_output=True, text=True)
    assert daemon_cmd.returncode == 1 and "error[missing_dependency]" in daemon_cmd.stderr, daemon_cmd.stderr
    assert "pocketembed[daemon]" in daemon_cmd.stderr and "Traceback" not in daemon_cmd.stderr
