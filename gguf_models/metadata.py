"""Read what a GGUF file says about itself, without loading it into llama.cpp.

``models list`` shows these values next to the catalog's, so the catalog can never
silently disagree with the file it points at; ``models import`` decides from them
whether a file can be an embedding model or a reranker at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pocketembed.errors import ModelCorrupt

POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 32: "bf16"}
GGUF_MAGIC = b"GGUF"


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


def read(path: Path) -> GGUFInfo:
    """Header fields of a GGUF file; a clear error for anything that is not one, or is cut short."""
    from gguf import GGUFReader

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelCorrupt(f"cannot read {path}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise ModelCorrupt(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct/IndexError on a cut or garbled header
        raise ModelCorrupt(f"{path} is not a readable GGUF file; truncated or damaged? ({type(e).__name__}: {e})") from None

    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ModelCorrupt(f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}")

    def field_(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:  # a malformed field reads as absent
            return default

    arch = str(field_("general.architecture", "?"))
    counts: dict[str, int] = {}
    names_of_tensors = set()
    for t in reader.tensors:
        counts[t.tensor_type.name.lower()] = counts.get(t.tensor_type.name.lower(), 0) + 1
        names_of_tensors.add(t.name)
    pooling = field_(f"{arch}.pooling_type")
    ftype = field_("general.file_type")
    labels = field_(f"{arch}.classifier.output_labels") or []
    causal = field_(f"{arch}.attention.causal")
    return GGUFInfo(
        architecture=arch,
        dims=int(field_(f"{arch}.embedding_length", 0)),
        pooling=POOLING_NAMES.get(pooling, "none") if pooling is not None else "none",
        context_length=int(field_(f"{arch}.context_length", 0)),
        file_type=FILE_TYPES.get(ftype, str(ftype)),
        tensor_types=counts,
        names={k: str(v) for k in NAME_KEYS if isinstance(v := field_(k), str) and v},
        tokenizer=str(field_("tokenizer.ggml.model", "")),
        token_types=int(field_("tokenizer.ggml.token_type_count", 0) or 0),
        labels=tuple(str(x) for x in labels),
        has_classifier=bool({"cls.output.weight", "cls.weight"} & names_of_tensors),
        causal=bool(causal) if causal is not None else None,
    )
