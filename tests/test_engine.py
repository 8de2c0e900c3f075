"""The embedding engine on the real q8_0 model: batching, pooling, limits."""

import numpy as np
import pytest

from conftest import mappings_rss_kb
from pocketembed.daemon import llama_runtime
from pocketembed.daemon.engine import Engine, EngineConfig, physical_cores, postprocess
from pocketembed.errors import EmptyText, InvalidInput, TextTooLong, UnsupportedBuild

TEXTS = [
    "Ok lar... Joking wif u oni...",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005",
    "U dun say so early hor... U c already then say...",
    "Nah I don't think he goes to usf, he lives around here though",
    "Even my brother is not like to speak with me.",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight",
    "Had your mobile 11 months or more? U R entitled to Update to the latest colour mobiles",
]


def test_batched_equals_one_at_a_time(engines):
    e = engines["q8_0"]
    batched = e.embed(TEXTS)
    single = np.vstack([e.embed([t]) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 384) and batched.dtype == np.float32
    # ggml picks another matmul kernel for one row than for many: agreement is ~1e-4, not exact.
    cos = batched @ single.T
    assert np.min(np.diag(cos)) > 0.999
    assert (cos.argmax(axis=1) == np.arange(len(TEXTS))).all()  # no text got another's vector


def test_a_text_barely_moves_with_the_batch_it_is_decoded_in(engines):
    """q8_0 quantizes every matmul's activations, so a tiny difference upstream (a packed batch's
    attention against a lone text's) can flip roundings and grow. Rounding each block's scale to
    f16, as ggml's q8_0 does, absorbs most of them: with the repacked VNNI kernel keeping the
    scale in f32 instead, the mean 1 - cosine below was 6.0e-5; rounded, and with tinyBLAS, 2.1e-5."""
    from pocketembed.sms import load_sms

    e = engines["q8_0"]
    texts = load_sms()[:200]
    cos = (e.embed(texts) * np.vstack([e.embed([t]) for t in texts])).sum(1)
    assert 1 - cos.mean() < 4e-5 and cos.min() > 0.9995, (1 - cos.mean(), cos.min())


def test_texts_share_decodes(engines):
    e = engines["q8_0"]
    lengths = [len(e.tokenize(t)) for t in TEXTS * 10]
    plan = e.plan_batches(lengths)
    assert len(plan) < len(lengths) / 4  # many texts per decode
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= e.max_seqs and sum(lengths[i] for i in b) <= e.batch_tokens


def test_parallel_contexts_give_the_same_vectors(home):
    from pocketembed.daemon.models import open_engine

    _, one = open_engine(None, home, contexts=1)
    _, two = open_engine(None, home, contexts=2)
    try:
        texts = TEXTS * 20  # several decodes
        a, b = one.embed(texts), two.embed(texts)
        assert np.min((a * b).sum(1)) > 0.9999
    finally:
        one.close()
        two.close()


def test_normalized_by_default_and_raw_on_request(engines):
    e = engines["q8_0"]
    v = e.embed(TEXTS[:2])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    raw = e.embed(TEXTS[:2], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), v, atol=1e-5)


def test_matryoshka_truncates_then_renormalizes(engines):
    e = engines["q8_0"]
    raw = e.embed(TEXTS[:3], normalize=False)
    v = e.embed(TEXTS[:3], dims=64)
    assert v.shape == (3, 64)
    expected = raw[:, :64] / np.linalg.norm(raw[:, :64], axis=1, keepdims=True)
    assert np.allclose(v, expected, atol=1e-5)
    for bad in (0, 385, -1, 2.5, True):
        with pytest.raises(InvalidInput):
            e.embed(TEXTS[:1], dims=bad)


def test_long_text_is_an_error_unless_truncation_is_asked(engines):
    e = engines["q8_0"]
    long = "word " * 400
    with pytest.raises(TextTooLong, match="402 tokens.*at most 256"):
        e.embed([long])
    toks = e.tokenize(long, truncate=True)
    assert len(toks) == 256
    sep = e.tokenize("word")[-1]
    assert toks[-1] == sep  # the closing [SEP] is kept, unlike llama-cpp-python's truncation
    assert e.embed([long], truncate=True).shape == (1, 384)


def test_limit_is_the_sentence_transformers_length_not_the_gguf_context(engines):
    e = engines["q8_0"]
    assert e.n_ctx_train == 512 and e.max_tokens == 256


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_text_is_an_error(engines, bad):
    with pytest.raises(EmptyText):
        engines["q8_0"].embed(["fine", bad])


def test_wrong_types_are_errors(engines):
    e = engines["q8_0"]
    with pytest.raises(InvalidInput):
        e.embed("a single string")
    with pytest.raises(InvalidInput):
        e.embed([b"bytes"])
    with pytest.raises(InvalidInput):
        e.embed([None])


def test_unicode_and_odd_text(engines):
    v = engines["q8_0"].embed(["émoji 🎉 ok", "日本語のテキスト", "a\x00b"])
    assert np.isfinite(v).all()


def test_threads_default_to_physical_cores(engines):
    assert engines["q8_0"].threads == physical_cores()


def test_refuses_amx_build_for_quantized_models(monkeypatch):
    monkeypatch.setattr(llama_runtime, "system_info", lambda: "CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    monkeypatch.delenv(llama_runtime.ALLOW_AMX_ENV, raising=False)
    with pytest.raises(UnsupportedBuild, match="AMX"):
        llama_runtime.check_build_supports_quantized(True)
    llama_runtime.check_build_supports_quantized(False)  # f16 is unaffected


def test_installed_build_has_no_amx():
    assert not llama_runtime.cpu_features().get("AMX_INT8")


def test_postprocess_handles_zero_vectors():
    out = postprocess(np.zeros((1, 8), dtype=np.float32), normalize=True, dims=8)
    assert np.isfinite(out).all()


def test_not_an_embedding_model_is_refused(tmp_path):
    from pocketembed.errors import ModelCorrupt

    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelCorrupt):
        Engine(bogus, EngineConfig())


def test_idle_engine_burns_no_cpu_after_a_long_text(engines):
    """A daemon on a phone idles between requests: no thread pool may keep spinning.

    A text of 32+ tokens takes llama.cpp's BLAS path when the build has one, whose
    threads would spin for ~0.1 s after each call without OPENBLAS_THREAD_TIMEOUT.
    """
    import resource
    import time

    e = engines["q8_0"]
    long_text = " ".join(TEXTS[1:4])
    assert len(e.tokenize(long_text)) >= 32
    burnt = []
    for _ in range(5):
        e.embed([long_text])
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(0.3)
        after = resource.getrusage(resource.RUSAGE_SELF)
        burnt.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    assert sorted(burnt)[2] < 0.03, f"CPU seconds used while idle for 0.3 s: {burnt}"


def test_installed_build_uses_ggml_threads_not_openmp():
    """setup.sh builds with GGML_OPENMP=OFF: OpenMP's passive barriers doubled a short decode's latency."""
    assert "OPENMP = 1" not in llama_runtime.system_info()


def test_a_full_decode_leaves_no_logits_buffer_resident(home):
    """llama.cpp zero-fills vocab x tokens floats of logits per context (62 MB at 512 tokens); the
    engine hands those pages back, so a bulk job does not leave the daemon 60 MB bigger per context."""
    import re
    from pathlib import Path

    from pocketembed.daemon.models import open_engine

    def rss_mb() -> float:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    _, e = open_engine(None, home, contexts=1, batch_tokens=512)
    try:
        e.embed(TEXTS[:1])
        before = rss_mb()
        texts = [" ".join(TEXTS)] * 3  # 3 texts of 144 tokens: one decode of 432 tokens
        assert e.plan_batches([len(e.tokenize(t)) for t in texts]) == [[0, 1, 2]]
        assert sum(len(e.tokenize(t)) for t in texts) > 400
        e.embed(texts)
        grown = rss_mb() - before
        logits_mb = 30522 * 400 * 4 / 2**20  # what the buffer would hold resident: > 46 MB
        assert grown < logits_mb / 3, f"RSS grew {grown:.1f} MB over one 432-token decode"
    finally:
        e.close()


def test_contexts_decode_on_their_own_thread_pools_which_close_frees(home):
    """One ggml pool per context (its helpers live between decodes, then go with the engine), and
    making a pool leaves the calling thread free to run on every CPU (ggml binds it otherwise)."""
    import os
    from pathlib import Path

    from pocketembed.daemon.models import open_engine

    def os_threads() -> int:
        return len(list(Path("/proc/self/task").iterdir()))

    allowed = os.sched_getaffinity(0)
    before = os_threads()
    _, e = open_engine(None, home, threads=2, contexts=2)
    try:
        assert [c.pool.n_threads for c in e._contexts] == [2, 2]
        assert os.sched_getaffinity(0) == allowed
        one = e.encode_on(0, [e.tokenize(TEXTS[1])], 2)
        two = e.encode_on(1, [e.tokenize(TEXTS[1])], 2)
        assert os.sched_getaffinity(0) == allowed  # a decode binds its caller only while it runs
        assert float((one @ two.T)[0, 0] / np.linalg.norm(one) / np.linalg.norm(two)) > 0.99999
        helpers = os_threads() - before
        assert 2 <= helpers <= 3  # a helper per pool (and the engine's executor thread)
    finally:
        e.close()
    assert os_threads() <= before + 1


def _mapped_rss_kb(path) -> int:
    return sum(mappings_rss_kb(path).values())


def test_dropped_pages_leave_the_rss_and_read_back_unchanged(tmp_path):
    """Read-only file mappings are found and their pages fault back in intact; a private writable
    mapping (whose pages may hold changes) is never among them."""
    import mmap

    from pocketembed.daemon.engine import drop_pages, read_only_mappings

    data = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ro, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as cow:
        assert ro[:] == data  # every page resident
        cow[:5] = b"edit!"
        assert _mapped_rss_kb(path) >= 4096
        ranges = read_only_mappings(path)
        assert len(ranges) == 1  # the read-only mapping only
        assert drop_pages(sorted(ranges)) == len(data)
        assert _mapped_rss_kb(path) < 64  # the copy-on-write one kept its single page
        assert ro[:] == data and cow[:5] == b"edit!" and cow[5:] == data[5:]
    assert read_only_mappings(tmp_path / "not-mapped.bin") == set()


def test_loading_leaves_the_model_file_out_of_the_rss(home, engines):
    """llama.cpp faults the whole GGUF in while loading; the engine hands those pages back (the
    repacked weights' originals are never read again), and decodes fault in what they read."""
    from pocketembed.daemon.models import open_engine

    reference = engines["q8_0"]  # maps the same file: only the new engine's mapping counts
    before = mappings_rss_kb(reference.path)
    _, e = open_engine(None, home, contexts=1)
    try:
        assert e.path == reference.path
        size_kb = e.path.stat().st_size / 1024
        mine = {r: kb for r, kb in mappings_rss_kb(e.path).items() if r not in before}
        assert mine, "the engine's model file is not mapped"
        assert sum(mine.values()) < size_kb * 0.1, f"{mine} kB of {size_kb:.0f} kB resident"
        cos = (e.embed(TEXTS) * reference.embed(TEXTS)).sum(1)
        assert cos.min() > 0.9999  # the same model, whatever it had to fault back in
        assert e.tokens_since_release >= sum(len(e.tokenize(t)) for t in TEXTS)
        assert e.release_file_pages() > 0 and e.tokens_since_release == 0
        assert sum(kb for r, kb in mappings_rss_kb(e.path).items() if r not in before) < size_kb * 0.1
        cos = (e.embed(TEXTS) * reference.embed(TEXTS)).sum(1)
        assert cos.min() > 0.9999
    finally:
        e.close()
