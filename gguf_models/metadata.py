"""Read what a GGUF file says about itself, without loading it into llama.cpp.

``models list`` shows these values next to the catalog's, so the catalog can never
silently disagree with the file it points at; ``models import`` decides from them
whether a file can be an embedding model or a reranker at all.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pocketembed.errors import ModelCorrupt

POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 32: "bf16"}
GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file (the manifest's load check uses it too)."""


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    dims: int
    pooling: str
    """From ``{arch}.pooling_type``; "none" when the file does not say."""
    context_length: int
    file_type: str
    tensor_types: dict[str, int]
    names: dict[str, str] = field(default_factory=dict)
    """``general.*`` strings that say which model this is (name, basename, finetune, ...)."""
    tokenizer: str = ""
    """``tokenizer.ggml.model``: bert (WordPiece), t5 (SentencePiece unigram), gpt2 (BPE), llama (SPM), ..."""
    token_types: int = 0
    """``tokenizer.ggml.token_type_count``: segment embeddings (llama.cpp feeds segment 0 to every token)."""
    labels: tuple[str, ...] = ()
    """``{arch}.classifier.output_labels``: a classification head's outputs."""
    has_classifier: bool = False
    """A rank head's tensors (``cls.output.weight`` or ``cls.weight``)."""
    causal: bool | None = None
    """``{arch}.attention.causal``, when the file says."""

    def family_text(self) -> str:
        """Every name-like string, lower-cased: what family detection reads."""
        return " ".join([self.architecture, *self.names.values()]).lower()


NAME_KEYS = ("general.name", "general.basename", "general.finetune", "general.size_label", "general.organization",
             "general.base_model.0.name", "general.base_model.0.repo_url", "general.source.url", "general.url",
             "general.source.huggingface.repository", "general.repo_url")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_WANTED_ARRAYS = ("classifier.output_labels",)


class _Header:
    """A GGUF header parsed straight from a memory map: every key/value except long arrays, and the tensor table.

    gguf's own GGUFReader builds a Python object for every element of every array (a
    30,000-token vocabulary takes it ~1 s); listing and importing need none of them,
    so arrays are skipped by their lengths. Every read is bounds-checked: a cut or
    garbled header is an error, never a read past the file.
    """

    def __init__(self, path: Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES

        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        self.pos = 0
        try:
            if self._take(4) != GGUF_MAGIC:
                raise ValueError("bad magic")
            version = self._num("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            n_tensors, n_kv = self._num("<Q"), self._num("<Q")
            self.fields: dict[str, object] = {}
            for _ in range(n_kv):
                key = self._str()
                self.fields[key] = self._value(self._num("<I"), keep=key.endswith(_WANTED_ARRAYS))
            self.tensors: list[tuple[str, int, int]] = []  # name, ggml type, bytes
            offsets = []
            for _ in range(n_tensors):
                name = self._str()
                dims = [self._num("<Q") for _ in range(self._num("<I"))]
                ggml_type, offset = self._num("<I"), self._num("<Q")
                block, type_size = GGML_QUANT_SIZES.get(ggml_type, (1, 0))
                count = 1
                for d in dims:
                    count *= d
                self.tensors.append((name, ggml_type, count // block * type_size))
                offsets.append(offset)
            align = int(self.fields.get("general.alignment") or 32)
            self.data_start = -(-self.pos // align) * align
            self.data_end = max((self.data_start + o + t[2] for o, t in zip(offsets, self.tensors)), default=self.data_start)
        finally:
            if isinstance(self.buf, mmap.mmap):
                self.buf.close()

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"header runs past the end of the file at byte {self.pos:,}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def _num(self, fmt: str) -> int:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _str(self) -> str:
        return self._take(self._num("<Q")).decode("utf-8", "replace")

    def _value(self, vtype: int, keep: bool = True) -> object:
        if vtype in _SCALARS:
            return self._num(_SCALARS[vtype])
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            item, n = self._num("<I"), self._num("<Q")
            if keep:
                return [self._value(item) for _ in range(n)]
            if item in _SCALARS:
                self._take(n * struct.calcsize(_SCALARS[item]))
            else:
                for _ in range(n):
                    self._value(item, keep=False)
            return None
        raise ValueError(f"unknown value type {vtype}")


def read(path: Path) -> GGUFInfo:
    """Header fields of a GGUF file; a clear error for anything that is not one, or is cut short."""
    from gguf.constants import GGMLQuantizationType

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelCorrupt(f"cannot read {path}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise ModelCorrupt(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        header = _Header(path)
    except (ValueError, OverflowError, MemoryError) as e:
        raise ModelCorrupt(f"{path} is not a readable GGUF file; truncated or damaged? ({e})") from None
    if header.data_end > header.size:
        raise ModelCorrupt(f"{path} is truncated: its tensors need {header.data_end:,} bytes, the file has {header.size:,}")

    fields = header.fields
    arch = str(fields.get("general.architecture") or "?")
    counts: dict[str, int] = {}
    for _, ggml_type, _ in header.tensors:
        try:
            tname = GGMLQuantizationType(ggml_type).name.lower()
        except ValueError:
            tname = str(ggml_type)
        counts[tname] = counts.get(tname, 0) + 1
    names_of_tensors = {t[0] for t in header.tensors}
    pooling = fields.get(f"{arch}.pooling_type")
    ftype = fields.get("general.file_type")
    labels = fields.get(f"{arch}.classifier.output_labels") or []
    causal = fields.get(f"{arch}.attention.causal")
    return GGUFInfo(
        architecture=arch,
        dims=int(fields.get(f"{arch}.embedding_length") or 0),
        pooling=POOLING_NAMES.get(pooling, "none") if pooling is not None else "none",
        context_length=int(fields.get(f"{arch}.context_length") or 0),
        file_type=FILE_TYPES.get(ftype, str(ftype)),
        tensor_types=counts,
        names={k: v for k in NAME_KEYS if isinstance(v := fields.get(k), str) and v},
        tokenizer=str(fields.get("tokenizer.ggml.model") or ""),
        token_types=int(fields.get("tokenizer.ggml.token_type_count") or 0),
        labels=tuple(str(x) for x in labels),
        has_classifier=bool({"cls.output.weight", "cls.weight"} & names_of_tensors),
        causal=bool(causal) if causal is not None else None,
    )
