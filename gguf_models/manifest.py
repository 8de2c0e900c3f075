"""The manifest of prepared model files and the check made before every load.

``models/manifest.json`` records, per model name, the file and its sha256 as
written by ``models prepare``. A file is served only if its sha256 matches: a
truncated copy, a swapped file or a bit flip is refused with a clear error
instead of loading garbage weights into llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pocketembed import paths
from pocketembed.errors import ModelCorrupt, ModelNotPrepared

from .catalog import ModelSpec
from .metadata import GGUF_MAGIC

FORMAT = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_path(root: Path) -> Path:
    return paths.models_dir(root) / "manifest.json"


def load(root: Path) -> dict[str, Any]:
    p = manifest_path(root)
    if not p.exists():
        return {"format": FORMAT, "models": {}}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ModelCorrupt(f"model manifest {p} is unreadable ({e}); run `pocketembed models prepare --force`") from None
    data.setdefault("models", {})
    return data


def save(root: Path, data: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous manifest intact."""
    p = manifest_path(root)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, p)


def model_path(root: Path, spec: ModelSpec) -> Path:
    return paths.models_dir(root) / spec.file


def is_current(root: Path, spec: ModelSpec, data: dict[str, Any] | None = None) -> bool:
    """True when the file is present and matches the manifest (no error raised)."""
    try:
        verify(root, spec, data)
        return True
    except (ModelCorrupt, ModelNotPrepared):
        return False


def verify(root: Path, spec: ModelSpec, data: dict[str, Any] | None = None) -> Path:
    """The path of a model file that may be loaded, or a clear error why not."""
    path = model_path(root, spec)
    if not path.exists():
        if spec.imported:
            raise ModelNotPrepared(f"imported model {spec.name}'s file {path} is missing; {spec.remedy}")
        raise ModelNotPrepared(
            f"model {spec.name} is not prepared ({path} is missing); run `pocketembed models prepare {spec.name}`"
        )
    entry = (data or load(root))["models"].get(spec.name)
    if entry is None:
        raise ModelCorrupt(
            f"{path} is not recorded in the manifest; {spec.remedy}"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelCorrupt(f"{path} is not a GGUF file; {spec.remedy}")
    size = path.stat().st_size
    if entry.get("size") is not None and size != entry["size"]:
        raise ModelCorrupt(
            f"{path} has {size} bytes, the manifest says {entry['size']} (truncated or replaced); "
            f"{spec.remedy}"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ModelCorrupt(
            f"sha256 of {path} is {digest[:16]}…, the manifest says {entry['sha256'][:16]}…; "
            f"refusing to load it; {spec.remedy}"
        )
    return path


def record(root: Path, data: dict[str, Any], spec: ModelSpec, path: Path, **extra: Any) -> None:
    data["format"] = FORMAT
    data["models"][spec.name] = {
        "file": path.name,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "quantization": spec.quantization,
        **extra,
    }
