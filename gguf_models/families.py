"""The prompts known embedding families were trained with, found from a GGUF's own metadata.

A retrieval-tuned bi-encoder embeds a query and a document differently: it was
trained with a prefix on each side, and without it search quality drops. A GGUF
does not carry these prefixes, but its ``general.*`` names (and architecture) say
which model it is, and the model cards say which prefixes it wants. The first
matching rule wins; ``models import --query-prefix/--document-prefix`` overrides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str
    """A regex searched in the architecture and the ``general.*`` names, lower-cased."""
    query_prefix: str
    document_prefix: str
    source: str
    """Where the prompts come from (the model card)."""


BGE_EN_QUERY = "Represent this sentence for searching relevant passages: "

FAMILIES: tuple[Family, ...] = (
    Family("embeddinggemma", r"gemma[-_ ]?embedding|embeddinggemma", "task: search result | query: ",
           "title: none | text: ", "google/embeddinggemma-300m, prompts 'query' and 'document'"),
    Family("nomic-embed", r"nomic[-_ ]?(bert|embed)", "search_query: ", "search_document: ",
           "nomic-ai/nomic-embed-text-v1.5, task instruction prefixes"),
    Family("e5", r"(^|[^a-z])e5[-_ ]", "query: ", "passage: ", "intfloat/multilingual-e5-small and e5-*-v2"),
    Family("bge-m3", r"bge[-_ ]?m3", "", "", "BAAI/bge-m3 uses no instruction"),
    Family("bge-zh", r"bge[-_ ].*[-_ ]zh", "为这个句子生成表示以用于检索相关文章：", "", "BAAI/bge-*-zh-v1.5 query instruction"),
    Family("bge-en", r"bge[-_ ]", BGE_EN_QUERY, "", "BAAI/bge-*-en-v1.5 query instruction"),
    Family("arctic-embed", r"arctic[-_ ]?embed", BGE_EN_QUERY, "", "Snowflake/snowflake-arctic-embed query prefix"),
)


def detect(text: str, *, reranker: bool = False) -> Family | None:
    """The family named in ``text`` (architecture and names, lower-cased); rerankers take no prefixes."""
    if reranker or "rerank" in text:
        return None
    for fam in FAMILIES:
        if re.search(fam.pattern, text):
            return fam
    return None
