"""Read what a GGUF file says about itself, without loading it into llama.cpp.

``models list`` shows these values next to the catalog's, so the catalog can never
silently disagree with the file it points at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pocketembed.errors import ModelCorrupt

POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 32: "bf16"}


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    dims: int
    pooling: str
    context_length: int
    file_type: str
    tensor_types: dict[str, int]


def read(path: Path) -> GGUFInfo:
    """Header fields of a GGUF file; a clear error for anything that is not one."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on garbage
        raise ModelCorrupt(f"{path} is not a readable GGUF file ({e})") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:  # pragma: no cover - malformed field
            return default

    arch = field("general.architecture", "?")
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name.lower()] = counts.get(t.tensor_type.name.lower(), 0) + 1
    pooling = field(f"{arch}.pooling_type")
    ftype = field("general.file_type")
    return GGUFInfo(
        architecture=str(arch),
        dims=int(field(f"{arch}.embedding_length", 0)),
        pooling=POOLING_NAMES.get(pooling, "none") if pooling is not None else "none",
        context_length=int(field(f"{arch}.context_length", 0)),
        file_type=FILE_TYPES.get(ftype, str(ftype)),
        tensor_types=counts,
    )
