"""Segment embeddings for BERT cross-encoders, which llama.cpp's graph leaves out.

A BERT cross-encoder (e.g. the ms-marco MiniLM rerankers) reads its input as
two segments, ``[CLS] query [SEP]`` and ``document [SEP]``, and adds a learned
segment ("token type") embedding per token. llama.cpp's BERT graph adds segment
0's row to every token, so the document is read as if it were more query: with
two segment rows the scores are a different function (tests/test_import.py:
Pearson 0.36 to torch on a random-weight model).

llama.cpp accepts input embeddings in place of token ids, and its graph then
still adds segment 0's row and the positions. Feeding
``token_embd[id] + token_types[segment] - token_types[0]`` makes the sum exactly
the model's own. The rows are read from the GGUF through a memory map and
dequantized per decode (a few hundred rows), so nothing the size of the
vocabulary is held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class SegmentInputs:
    """Input rows of token lists whose second segment starts after the first separator token."""

    def __init__(self, path: Path, sep_token: int) -> None:
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self._dequantize = dequantize
        reader = GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        self._tok = tensors["token_embd.weight"]
        types = np.asarray(dequantize(tensors["token_types.weight"].data, tensors["token_types.weight"].tensor_type),
                           dtype=np.float32)
        self.delta = types - types[0]
        self.n_embd = int(self.delta.shape[1])
        self.sep = sep_token

    def segments(self, tokens: Sequence[int]) -> np.ndarray:
        """0 up to and including the first separator, 1 after it (all 0 without one)."""
        seg = np.zeros(len(tokens), dtype=np.int64)
        arr = np.asarray(tokens)
        hits = np.flatnonzero(arr == self.sep)
        if hits.size:
            seg[hits[0] + 1 :] = 1
        return seg

    def rows(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """(total tokens, n_embd) float32: token rows plus each token's segment offset."""
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
        segs = np.concatenate([self.segments(t) for t in token_lists])
        raw = self._tok.data[ids]
        out = np.asarray(self._dequantize(raw, self._tok.tensor_type), dtype=np.float32).reshape(len(ids), self.n_embd)
        out += self.delta[segs]
        return out
