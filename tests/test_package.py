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


def test_console_script_is_declared():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["scripts"] == {"pocketembed": "pocketembed.cli:main"}
    deps = " ".join(meta["project"]["dependencies"])
    for dep in ("llama-cpp-python", "numpy", "pyzmq", "msgpack", "psutil", "sqlite-utils", "gguf"):
        assert dep in deps
    assert "torch" not in deps  # conversion deps are an extra
