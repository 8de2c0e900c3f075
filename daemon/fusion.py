"""Hybrid search: the lexical and the vector side's candidates fused into one ranking.

Pure functions over candidates the store has already found, so the policy is tested
without a model or a database (tests/test_fusion.py) and measured by
scripts/eval_hybrid.py.

Why not reciprocal-rank fusion: RRF gives a lexical rank-1 the weight of a vector rank-1
whatever the query. For a paraphrase ("are you still at the library?" for a message that
says none of those words) the lexical side ranks noise — messages sharing "you" or
"still" — and RRF puts that noise at the top (issue 29: paraphrase MRR 0.87 → 0.29).

Here every candidate keeps its own cosine (the vector side's score, computed for the
lexical-only candidates too), and the lexical side *adds* to it in proportion to how
much of the query it matched, weighted by rarity:

    score = cosine + weight(query) × coverage,   coverage = Σ idf(matched terms) / Σ idf(query terms)

so a message holding the query's phone number (its rarest term: most of the IDF mass)
rises by nearly the whole weight, while one sharing only "you" rises by almost nothing.
The weight depends on the query: a number, a price, a code, a quoted phrase or a one- or
two-word query is someone looking for the exact thing (``EXACT_WEIGHT``); a sentence is
someone describing a meaning, where exact words are a hint (``HINT_WEIGHT``). Both are
chosen on scripts/search_queries.json by scripts/eval_hybrid.py (docs/search.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .lexical import Query

EXACT_WEIGHT = 0.6
"""Coverage weight for a query that names an exact thing: a number, code or price, a quoted
phrase, or one or two words. A full match lifts a message by 0.6 cosine: past any paraphrase."""
HINT_WEIGHT = 0.12
"""Coverage weight for a sentence: exact words break near-ties among similar meanings."""
SHORT_QUERY_TERMS = 2
LEXICAL_CANDIDATES = 50
"""Candidates the lexical side brings (at least k): read while the query embeds, so they cost little."""
VECTOR_CANDIDATES = 20
"""Candidates the vector side brings (at least k): past 2k, a cosine seldom climbs into the top k."""


@dataclass(frozen=True)
class Fused:
    id: Any
    score: float
    matched: tuple[str, ...]
    """"lexical" when the lexical side found it, "vector" when it is among the vector side's candidates."""


def query_weight(query: Query) -> float:
    """How much an exact match counts for this query (see the module docstring)."""
    exact = (query.phrases or len(query.terms) <= SHORT_QUERY_TERMS
             or any(any(ch.isdigit() for ch in t) for t in query.terms))
    return EXACT_WEIGHT if exact else HINT_WEIGHT


def coverage(matched: Sequence[str], idfs: Mapping[str, float]) -> float:
    """The share of the query's IDF mass that a candidate's matched terms carry (0..1)."""
    total = sum(idfs.values())
    return sum(idfs.get(t, 0.0) for t in set(matched)) / total if total > 0 else 0.0


def fuse(vector: Mapping[Any, float], lexical: Mapping[Any, Sequence[str]], cosines: Mapping[Any, float],
         idfs: Mapping[str, float], weight: float, k: int) -> list[Fused]:
    """The k best of both sides' candidates by cosine + weight × coverage.

    ``vector``: the vector side's candidates (id → cosine); ``lexical``: the lexical side's
    (id → the query terms it matched); ``cosines``: the cosine of every lexical candidate
    that the vector side did not bring. Ties go to the vector side's order.
    """
    order = {i: n for n, i in enumerate(vector)}
    scored = []
    for item in dict.fromkeys([*vector, *lexical]):
        cos = vector[item] if item in vector else cosines.get(item)
        if cos is None:
            continue  # deleted between the two reads
        lex = coverage(lexical[item], idfs) if item in lexical else 0.0
        matched = tuple(side for side, hit in (("lexical", item in lexical), ("vector", item in vector)) if hit)
        scored.append(Fused(item, cos + weight * lex, matched))
    scored.sort(key=lambda f: (-f.score, order.get(f.id, len(order))))
    return scored[:k]
