"""The embedding engine: one loaded llama.cpp model, many texts per decode.

The engine talks to llama.cpp through llama-cpp-python's low-level C bindings
rather than the high-level ``Llama`` class, for reasons measured on MiniLM:

* ``Llama.embed`` truncates by dropping the tail, including the closing [SEP];
  sentence-transformers keeps it, so vectors of long texts drifted.
* We fill the ``llama_batch`` from numpy arrays we own (one slice assignment per
  text) instead of one ctypes call per token.
* The scheduler (daemon/scheduler.py) forms batches across requests itself and only
  needs "encode these token lists"; the engine exposes exactly that.

Parallelism: the engine keeps one model and several llama contexts sharing
its weights. A single decode runs on context 0 with every thread (lowest
latency); a bulk job spreads its decodes over the contexts with a share of
the threads each, so concurrent requests never oversubscribe the cores. Each
context decodes on a ggml thread pool of its own (daemon/threadpool.py) whose
helpers sleep between decodes. Measured on 2 cores of an AVX512-VNNI EPYC
(scripts/bench_peers.py, scripts/profile_decode.py, q8_0 with the patched
llama.cpp): a 24-token SMS in 3.2-3.5 ms on 2 threads back to back; bulk
480-520 texts/s in-process, 570-590 through the daemon with 8 clients.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.ctypeslib  # noqa: F401  loaded now: numpy loads it lazily, and a first decode without a free fd must not fail

from pocketembed.errors import EmptyText, InvalidInput, ModelCorrupt, TextTooLong

from . import batching
from . import llama_runtime as rt
from .segments import SegmentInputs
from .threadpool import ThreadPool, make_pool


POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_DONTNEED = 4  # the same on every Linux architecture, Android's included


def physical_cores() -> int:
    """Physical cores, the thread count llama.cpp's matmuls scale with (SMT does not help)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency, but be defensive
        n = None
    return max(1, n or os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineConfig:
    """How one model is run. Defaults were tuned on MiniLM q8_0 on 2 cores."""

    max_tokens: int = 256
    """Longest accepted sequence incl. [CLS]/[SEP] (the model's training length)."""
    batch_tokens: int = 256
    """Token budget of one decode (llama.cpp n_batch == n_ubatch for encoders; raised to max_tokens).

    256 rather than 512: the same bulk throughput (scripts/bench_peers.py), and each
    context's memory scales with it (the compute buffer, and the logits llama.cpp
    zero-fills before the engine hands them back: a 31 MB passing peak, not 62)."""
    max_seqs: int = 32
    """Most texts packed into one decode."""
    threads: int | None = None
    """Threads in all (default: physical cores)."""
    contexts: int | None = None
    """llama contexts sharing the weights, for parallel decodes (default: min(2, threads))."""
    flash_attn: bool = True
    repack: bool | None = None
    """llama.cpp's load-time weight repacking (its "extra buffer types"); None = llama.cpp's default."""
    pooling: str | None = None
    """Override of the GGUF's pooling type ("mean", "cls", "last")."""
    bind_threads: bool | None = None
    """Bind each context's helper threads to CPUs of their own (None: on x86, not on ARM; see threadpool)."""


class Engine:
    """One GGUF embedding model loaded in llama.cpp.

    ``embed`` is the whole-job API (tokenize, length-sort, pack, encode, pool,
    normalize). ``tokenize`` + ``encode`` / ``encode_many`` are the pieces the
    scheduler uses to merge texts from many requests into decodes.
    """

    def __init__(self, path: str | os.PathLike[str], config: EngineConfig | None = None, *, quantized: bool = True) -> None:
        self.path = Path(path)
        self.config = config or EngineConfig()
        self._model = None
        self._contexts: list[_Context] = []
        self.output_growth = threading.Lock()
        """Held by a context whose decode grows llama.cpp's output buffer (see _Context.run)."""
        self._pool: ThreadPoolExecutor | None = None
        rt.ensure_backend()
        rt.check_build_supports_quantized(quantized)
        self.threads = max(1, self.config.threads or physical_cores())

        mparams = rt.llama.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if self.config.repack is not None:
            mparams.use_extra_bufts = bool(self.config.repack)
        self.tokens_since_release = 0
        """Tokens decoded since the model file's pages were last handed back (see ``release_file_pages``)."""
        mapped_before = read_only_mappings(self.path)
        with rt.capture_log() as captured:
            model = rt.llama.llama_model_load_from_file(os.fsencode(self.path), mparams)
        if not model:
            detail = captured.last_error() or "llama.cpp could not load it"
            raise ModelCorrupt(f"cannot load model file {self.path}: {detail}")
        self._model = model
        self._file_ranges = sorted(read_only_mappings(self.path) - mapped_before)
        self.release_file_pages()
        try:
            self._init_contexts()
        except BaseException:
            self.close()
            raise

    def _init_contexts(self) -> None:
        cfg = self.config
        llama = rt.llama
        self._use_encode = bool(llama.llama_model_has_encoder(self._model) and not llama.llama_model_has_decoder(self._model))
        self.vocab = llama.llama_model_get_vocab(self._model)
        self.dims = int(llama.llama_model_n_embd_out(self._model))
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(self._model))
        self.max_tokens = min(cfg.max_tokens, self.n_ctx_train)
        # llama.cpp aborts the process (GGML_ASSERT in ggml_mul_mat) at the first decode of a context
        # whose size is not a multiple of 32 (seen: 272, 300, 400), so the size is rounded up to one.
        self.batch_tokens = -(-max(cfg.batch_tokens, self.max_tokens) // 32) * 32
        self.max_seqs = max(1, cfg.max_seqs)
        n_contexts = max(1, min(cfg.contexts or 2, self.threads))

        cparams = llama.llama_context_default_params()
        cparams.n_ctx = self.batch_tokens
        cparams.n_batch = self.batch_tokens
        cparams.n_ubatch = self.batch_tokens
        cparams.n_seq_max = self.max_seqs
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.embeddings = True
        cparams.kv_unified = True
        cparams.no_perf = True
        cparams.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if cfg.pooling is not None:
            if cfg.pooling not in POOLING or cfg.pooling == "none":
                raise InvalidInput(f"unknown pooling {cfg.pooling!r}; use one of mean, cls, last, rank")
            cparams.pooling_type = POOLING[cfg.pooling]
        for _ in range(n_contexts):
            with rt.capture_log() as captured:
                ctx = llama.llama_init_from_model(self._model, cparams)
            if not ctx:
                raise ModelCorrupt(f"cannot create a llama.cpp context for {self.path}: {captured.last_error() or 'unknown error'}")
            pool = make_pool(self.threads, cfg.bind_threads)
            if pool is not None:
                pool.attach(ctx)
            self._contexts.append(_Context(ctx, self.batch_tokens, pool))
        self.pooling = {v: k for k, v in POOLING.items()}.get(int(llama.llama_pooling_type(self._contexts[0].ctx)), "unknown")
        if self.pooling in ("none", "unknown"):
            arch = self.metadata("general.architecture") or "?"
            raise ModelCorrupt(f"{self.path.name} ({arch}) declares no pooling; it is not a sentence-embedding model")
        self._segments: SegmentInputs | None = None
        if self.pooling == "rank":
            # A cross-encoder's "embedding" is its classifier's scores (llama.cpp's rank pooling).
            self.dims = int(llama.llama_model_n_cls_out(self._model))
            arch = self.metadata("general.architecture") or ""
            if arch == "bert" and int(self.metadata("tokenizer.ggml.token_type_count") or 0) >= 2:
                self._segments = SegmentInputs(self.path, int(llama.llama_vocab_sep(self.vocab)))
                for c in self._contexts:
                    c.buffers.use_embeddings(self._segments.n_embd)
        self.adds_eos = bool(llama.llama_vocab_get_add_eos(self.vocab) or llama.llama_vocab_get_add_sep(self.vocab))
        if n_contexts > 1:
            self._pool = ThreadPoolExecutor(n_contexts, thread_name_prefix="pe-decode")

    # -- metadata --------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = rt.llama.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def model_size(self) -> int:
        """Bytes of weights resident in memory."""
        return int(rt.llama.llama_model_size(self._model))

    # -- tokenization ----------------------------------------------------------------

    def tokenize(self, text: str, *, truncate: bool = False) -> list[int]:
        """Tokens of one text with [CLS]/[SEP]; errors or truncation past max_tokens.

        Truncation keeps the closing [SEP]: the model was trained on sequences that
        end with it, and mean pooling includes it.
        """
        if not isinstance(text, str):
            raise InvalidInput(f"text must be a string, not {type(text).__name__}")
        if not text.strip():
            raise EmptyText("text is empty")
        tokens = self.token_ids(text, special=True)
        if len(tokens) <= 2 and self.adds_eos:
            # Only [CLS][SEP]: the text held nothing the vocabulary knows (e.g. control chars).
            raise EmptyText("text has no tokens")
        if len(tokens) > self.max_tokens:
            if not truncate:
                raise TextTooLong(
                    f"text has {len(tokens)} tokens, the model takes at most {self.max_tokens}; "
                    "shorten it or ask for truncation"
                )
            tail = [tokens[-1]] if self.adds_eos else []
            tokens = tokens[: self.max_tokens - len(tail)] + tail
        return tokens

    def token_ids(self, text: str, *, special: bool = False) -> list[int]:
        """The vocabulary's ids of a text, with the model's special tokens around it when ``special``; no checks."""
        raw = text.encode("utf-8", "replace")
        cap = len(raw) + 8
        buf = (rt.llama.llama_token * cap)()
        n = rt.llama.llama_tokenize(self.vocab, raw, len(raw), buf, cap, special, False)
        if n < 0:  # pragma: no cover - cap bounds every WPM/BPE/unigram tokenization of these bytes
            cap = -n
            buf = (rt.llama.llama_token * cap)()
            n = rt.llama.llama_tokenize(self.vocab, raw, len(raw), buf, cap, special, False)
        return list(buf[:n])

    def tokenize_pair(self, query: str, document: str, *, truncate: bool = True) -> list[int]:
        """One cross-encoder input: the (query, document) pair as its tokenizer's pair template.

        BERT: ``[CLS] q [SEP] d [SEP]``; RoBERTa / XLM-R: ``<s> q </s></s> d </s>``. Built
        from the vocabulary's own flags like llama.cpp's server (BOS, EOS, SEP), with the
        closing separator that transformers adds and that server leaves out for BERT
        vocabularies. An over-long pair loses the end of the document (transformers'
        ``only_second``); a query that leaves no room for any document is an error.
        """
        for what, text in (("query", query), ("document", document)):
            if not isinstance(text, str):
                raise InvalidInput(f"{what} must be a string, not {type(text).__name__}")
            if not text.strip():
                raise EmptyText(f"{what} is empty")
        llama = rt.llama
        q = self.token_ids(query, special=False)
        d = self.token_ids(document, special=False)
        if not q:
            raise EmptyText("query has no tokens")
        if not d:
            raise EmptyText("document has no tokens")
        bos = [llama.llama_vocab_bos(self.vocab)] if llama.llama_vocab_get_add_bos(self.vocab) else []
        eos = llama.llama_vocab_eos(self.vocab)
        sep = llama.llama_vocab_sep(self.vocab)
        add_eos, add_sep = llama.llama_vocab_get_add_eos(self.vocab), llama.llama_vocab_get_add_sep(self.vocab)
        if eos < 0:
            eos = sep
        middle = ([eos] if add_eos else []) + ([sep] if add_sep else [])
        close = [eos] if add_eos else ([sep] if add_sep else [])
        room = self.max_tokens - len(bos) - len(q) - len(middle) - len(close)
        if room < 1:
            raise TextTooLong(f"query has {len(q)} tokens, leaving no room for a document within the model's "
                              f"{self.max_tokens}; shorten it")
        if len(d) > room:
            if not truncate:
                raise TextTooLong(f"query and document have {len(bos) + len(q) + len(middle) + len(d) + len(close)} "
                                  f"tokens, the model takes at most {self.max_tokens}; shorten them or ask for truncation")
            d = d[:room]
        return bos + q + middle + d + close

    def windows(self, text: str, overlap: int = 32) -> list[str]:
        """A long text as overlapping windows that each fit the model (one window when it fits).

        Windows are cut on tokens and turned back into text (lower-cased and
        re-spaced by the WordPiece detokenizer), so that each one tokenizes to at
        most ``max_tokens`` again.
        """
        if not text.strip():
            raise EmptyText("text is empty")
        raw = text.encode("utf-8", "replace")
        buf = (rt.llama.llama_token * (len(raw) + 8))()
        n = rt.llama.llama_tokenize(self.vocab, raw, len(raw), buf, len(raw) + 8, False, False)
        tokens = list(buf[: max(0, n)])
        size = self.max_tokens - 2 - 8  # room for [CLS]/[SEP] and re-tokenization drift
        if len(tokens) <= size:
            return [text]
        step = max(1, size - overlap)
        out = []
        for start in range(0, len(tokens), step):
            part = tokens[start : start + size]
            cap = 8 * len(part) + 64
            chars = ctypes.create_string_buffer(cap)
            m = rt.llama.llama_detokenize(self.vocab, (rt.llama.llama_token * len(part))(*part), len(part),
                                          chars, cap, True, False)
            piece = chars.raw[: max(0, m)].decode("utf-8", "replace").strip()
            if piece:
                out.append(piece)
            if start + size >= len(tokens):
                break
        return out

    # -- encoding --------------------------------------------------------------------

    def encode(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled (not normalized) vectors of token lists that fit one decode.

        Runs on context 0 with every thread: the latency path.
        """
        return self._contexts[0].run(self, token_lists, self.threads)

    @property
    def n_contexts(self) -> int:
        return len(self._contexts)

    def encode_on(self, context: int, token_lists: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        """Pooled vectors of one decode on a given context (the scheduler's workers).

        Each worker owns one context index, so concurrent decodes never share a
        context; an engine with fewer contexts than workers serializes on its locks.
        """
        ci = context % len(self._contexts)
        return self._contexts[ci].run(self, token_lists, max(1, threads or self.threads))

    def encode_many(self, batches: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """Pooled vectors of several decodes, spread over the contexts in parallel."""
        if self._pool is None or len(batches) < 2:
            return [self.encode(b) for b in batches]
        n = len(self._contexts)
        per = max(1, self.threads // n)
        shares = [list(range(i, len(batches), n)) for i in range(n)]

        def work(ci: int) -> list[tuple[int, np.ndarray]]:
            return [(j, self._contexts[ci].run(self, batches[j], per)) for j in shares[ci]]

        out: list[np.ndarray | None] = [None] * len(batches)
        for done in self._pool.map(work, range(n)):
            for j, arr in done:
                out[j] = arr
        return out  # type: ignore[return-value]

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Group indices into this engine's decodes (batching.plan_batches: the daemon's rule too)."""
        return batching.plan_batches(lengths, self.batch_tokens, self.max_seqs)

    def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = True,
        dims: int | None = None,
        truncate: bool = False,
    ) -> np.ndarray:
        """Embed texts into a float32 array of shape (len(texts), dims).

        All texts are validated (tokenized) before any decode runs, so one bad text
        fails the call without wasted work.
        """
        if isinstance(texts, str):
            raise InvalidInput("texts must be a list of strings, not a single string")
        out_dims = self.check_dims(dims)
        tokens = []
        for i, t in enumerate(texts):
            try:
                tokens.append(self.tokenize(t, truncate=truncate))
            except InvalidInput as e:
                raise type(e)(f"texts[{i}]: {e.message}") from None
        return postprocess(self._encode_all(tokens), normalize=normalize, dims=out_dims)

    def _encode_all(self, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled outputs of any number of token lists, planned into decodes over the contexts."""
        pooled = np.empty((len(tokens), self.dims), dtype=np.float32)
        plan = self.plan_batches([len(t) for t in tokens])
        for idx, vecs in zip(plan, self.encode_many([[tokens[i] for i in b] for b in plan])):
            pooled[idx] = vecs
        return pooled

    def rerank(self, query: str, documents: Sequence[str], *, truncate: bool = True) -> np.ndarray:
        """A cross-encoder's raw scores of (query, document) pairs: shape (len(documents), outputs)."""
        if self.pooling != "rank":
            raise InvalidInput(f"{self.path.name} is an embedding model ({self.pooling} pooling), not a reranker")
        tokens = []
        for i, d in enumerate(documents):
            try:
                tokens.append(self.tokenize_pair(query, d, truncate=truncate))
            except InvalidInput as e:
                raise type(e)(f"documents[{i}]: {e.message}") from None
        return self._encode_all(tokens)

    def check_dims(self, dims: int | None) -> int:
        if dims is None:
            return self.dims
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= self.dims:
            raise InvalidInput(f"dims must be an integer between 1 and {self.dims}, got {dims!r}")
        return dims

    # -- lifetime --------------------------------------------------------------------

    def release_file_pages(self) -> int:
        """Hand the kernel back this engine's resident pages of the model file's mapping.

        llama.cpp maps the model file and faults all of it in while loading. Weights it
        repacks (q8_0 on AVX512-VNNI, q4_0 on AVX2, both on ARM with dot products) are
        copied into a layout of their own and their pages are never read again, yet they
        stayed resident next to the copy. The mapping is read-only and file-backed, so
        this loses nothing: what decodes still read (biases, norms, the token-embedding
        rows they look up) faults back in from the page cache on first touch. Called
        after loading, and by the model registry when a model goes idle after a bulk job
        has mapped much of the file back in. Not while ``close`` runs. Returns the bytes
        advised (0 where /proc/self/maps could not be read at load).
        """
        if not self._model:
            return 0
        self.tokens_since_release = 0
        return drop_pages(self._file_ranges)

    def close(self) -> None:
        """Free the contexts and the weights; the engine is unusable afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for c in self._contexts:
            c.free()
        self._contexts = []
        if self._model:
            rt.llama.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


def read_only_mappings(path: str | os.PathLike[str]) -> set[tuple[int, int]]:
    """Address ranges of this process's read-only mappings of ``path`` (empty where /proc/self/maps is unreadable).

    Writable mappings are left out: a private one's pages may hold changes that
    dropping them would lose.
    """
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].rstrip("\n") == target and "w" not in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.add((start, end))
    return found


def drop_pages(ranges: Sequence[tuple[int, int]]) -> int:
    """``madvise(MADV_DONTNEED)`` each (start, end) range; the bytes the kernel accepted.

    Only for ranges of file-backed read-only mappings that stay mapped while this
    runs: the pages then come back from the file when touched.
    """
    dropped = 0
    for start, end in ranges:
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def postprocess(pooled: np.ndarray, *, normalize: bool, dims: int) -> np.ndarray:
    """Matryoshka truncation then L2 normalization (the GGUF does not normalize)."""
    out = pooled[:, :dims] if dims < pooled.shape[1] else pooled
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def scale_scores(logits: np.ndarray, scale: str) -> np.ndarray:
    """A reranker's first output per pair in its own scale: ``sigmoid`` of the logit, or the ``raw`` logit."""
    raw = np.asarray(logits, dtype=np.float64)[:, 0]
    return 1.0 / (1.0 + np.exp(-raw)) if scale == "sigmoid" else raw


class _Context:
    """One llama context with its own batch buffers; used by one thread at a time."""

    def __init__(self, ctx: object, capacity: int, pool: ThreadPool | None = None) -> None:
        self.ctx = ctx
        self.pool = pool
        self.lock = threading.Lock()
        self.buffers = _BatchBuffers(capacity)
        self.n_threads = 0
        self.output_high_water = 0

    def run(self, engine: Engine, token_lists: Sequence[Sequence[int]], threads: int) -> np.ndarray:
        n = len(token_lists)
        if n == 0:
            return np.zeros((0, engine.dims), dtype=np.float32)
        total = sum(len(t) for t in token_lists)
        if n > engine.max_seqs or total > engine.batch_tokens:
            raise ValueError(f"batch of {n} texts / {total} tokens exceeds {engine.max_seqs} / {engine.batch_tokens}")
        llama = rt.llama
        with self.lock:
            if not self.ctx:
                raise RuntimeError("engine is closed")
            if threads != self.n_threads:
                llama.llama_set_n_threads(self.ctx, threads, threads)
                self.n_threads = threads
            self.buffers.fill(token_lists, engine._segments.rows(token_lists) if engine._segments else None)
            mem = llama.llama_get_memory(self.ctx)
            if mem:
                llama.llama_memory_clear(mem, True)
            # A decode of more tokens than this context has seen grows llama.cpp's output buffer and
            # zero-fills its logits (31 MB at 256 tokens), which the pages dropped below give back.
            # One context grows at a time, so the contexts' growths never add up in the peak RSS.
            grows = total > self.output_high_water
            growth = engine.output_growth if grows else contextlib.nullcontext()
            with growth:
                out = self._decode(engine, n, threads)
                if grows:
                    self.output_high_water = total
                    self._drop_logits_pages()
            engine.tokens_since_release += total  # a heuristic's count: a race between contexts may lose one
        return out

    def _decode(self, engine: Engine, n: int, threads: int) -> np.ndarray:
        llama = rt.llama
        decode = llama.llama_encode if engine._use_encode else llama.llama_decode
        pinned = threads > 1 and self.pool is not None and self.pool.pin_caller()
        try:
            rc = decode(self.ctx, self.buffers.batch)
        finally:
            if pinned:
                self.pool.unpin_caller()
        if rc != 0:
            raise RuntimeError(f"llama.cpp failed to embed the batch (code {rc})")
        out = np.empty((n, engine.dims), dtype=np.float32)
        for i in range(n):
            ptr = llama.llama_get_embeddings_seq(self.ctx, i)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no embedding for sequence {i}")
            out[i] = np.ctypeslib.as_array(ptr, shape=(engine.dims,))
        return out

    def _drop_logits_pages(self) -> None:
        """Give the kernel back the pages of llama.cpp's logits buffer, which embeddings never use.

        For every decode llama.cpp reserves vocabulary x tokens floats of logits
        (62 MB per context at 512 tokens for MiniLM's 30,522-token vocabulary) and
        zero-fills them whenever the buffer grows, although a pooled-embedding
        model never writes them: that was most of the daemon's RSS growth after a
        bulk job (100 -> 246 MB). The region is bounded by the API's own pointers
        (the logits come first in the output buffer, the embeddings right after);
        dropped pages read as zeros if anything ever touches them again, and this
        runs between decodes, under the context's lock, after the outputs are read.
        """
        llama = rt.llama
        lo = ctypes.cast(llama.llama_get_logits(self.ctx), ctypes.c_void_p).value
        hi = ctypes.cast(llama.llama_get_embeddings(self.ctx), ctypes.c_void_p).value
        if not lo or not hi or hi <= lo:
            return  # another layout (or no logits at all): nothing to drop
        start = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE
        end = hi // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)

    def free(self) -> None:
        with self.lock:
            if self.ctx:
                rt.llama.llama_free(self.ctx)
                self.ctx = None
            if self.pool is not None:
                self.pool.free()
                self.pool = None


class _BatchBuffers:
    """A llama_batch whose arrays are numpy buffers we own.

    ``seq_id`` is an array of pointers, each pointing into one contiguous int32
    array, so assigning sequence ids is a numpy slice assignment too.
    """

    def __init__(self, capacity: int) -> None:
        llama = rt.llama
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.ones(capacity, dtype=np.int8)
        self.seq_ptrs = (self.seq.ctypes.data + 4 * np.arange(capacity, dtype=np.uintp)).astype(np.uintp)
        self.batch = llama.llama_batch()
        self.batch.token = self.token.ctypes.data_as(ctypes.POINTER(llama.llama_token))
        self.batch.embd = None
        self.batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama.llama_pos))
        self.batch.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.seq_id = ctypes.cast(self.seq_ptrs.ctypes.data, ctypes.POINTER(ctypes.POINTER(llama.llama_seq_id)))
        self.batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def use_embeddings(self, n_embd: int) -> None:
        """Feed input rows instead of token ids from now on (see daemon/segments.py)."""
        llama = rt.llama
        self.embd = np.zeros((len(self.token), n_embd), dtype=np.float32)
        self.batch.token = ctypes.POINTER(llama.llama_token)()
        self.batch.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def fill(self, token_lists: Sequence[Sequence[int]], rows: np.ndarray | None = None) -> None:
        at = 0
        for seq, toks in enumerate(token_lists):
            n = len(toks)
            self.token[at : at + n] = toks
            self.pos[at : at + n] = np.arange(n, dtype=np.int32)
            self.seq[at : at + n] = seq
            at += n
        if rows is not None:
            self.embd[:at] = rows
        self.batch.n_tokens = at
