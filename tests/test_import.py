"""``models import`` of any GGUF embedding model or cross-encoder, and reranking, through a real daemon.

No trained weights of the models users import can be fetched here, so the tests
build tiny random-weight models of their architectures with transformers
(tests/tiny_models.py), convert them with the project's own converter, import
them with the CLI, and compare what the daemon computes with what torch computes
from the same weights, on 200 SMS. The tiny models' directories carry real
families' names (bge-small-en-v1.5, multilingual-e5-small), which is what the
converter writes into ``general.name`` and what family detection reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from conftest import row_cosines, run_cli
from daemon_proc import DaemonProcess
from pocketembed.gguf_models import families
from pocketembed.gguf_models.catalog import get
from pocketembed.gguf_models.prepare import convert_to_gguf, source_model_dir
from pocketembed.gguf_models.quantize import quantize
from pocketembed.ipc.client import DaemonError
from pocketembed.sms import load_sms

TEXTS = load_sms()[:200]
QUERY = "are you coming to the party tonight"

EMBED_COS = 0.999
"""The issue's bar at f16: per-text cosine to torch on the same weights."""
RERANK_ABS = 1e-2
"""Max |Δ logit| to torch allowed at f16 with these weights (logits spread over 2-3 units).

Measured on AMD Zen 4: 2.9e-3 (one segment) and 4.4e-3 (two), 1.9e-3 with f32
weights: llama.cpp evaluates BERT's GELU as the tanh approximation read from an
fp16 table (ggml-cpu's GGML_GELU_FP16), where transformers uses erf. The bound
leaves room for other CPUs' f16 kernels (ARM's accumulate in f16); the defects the
test guards against are far outside it (no segment fix: 2.0; no pooler: > 0.1)."""
POOLERLESS_GAP = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, home) -> dict:
    """The tiny models, converted to f16 and q8_0 GGUF files."""
    out = tmp_path_factory.mktemp("tiny")
    tokenizer_dir = source_model_dir(get("all-minilm-l6-v2:q8_0").source, home, progress=lambda m: None)
    models = {
        "bge": tm.bert_cls(out / "bge-small-en-v1.5", tokenizer_dir),
        "e5": tm.xlmr_mean(out / "multilingual-e5-small", load_sms()[:3000]),
        "reranker": tm.bert_reranker(out / "tiny-reranker", tokenizer_dir),
        "reranker2": tm.bert_reranker(out / "tiny-reranker-2seg", tokenizer_dir, type_vocab_size=2),
    }
    files = {}
    for key, m in models.items():
        f16 = out / f"{m.path.name}-f16.gguf"
        convert_to_gguf(m.path, f16, home, progress=lambda msg: None)
        files[key] = {"f16": f16}
        if key in ("bge", "e5", "reranker"):  # q8_0 of each kind (the 2-segment model's q8_0 adds nothing new)
            files[key]["q8_0"] = out / f"{m.path.name}-q8_0.gguf"
            quantize(f16, files[key]["q8_0"], "q8_0")
    return {"models": models, "files": files, "dir": out}


@pytest.fixture(scope="module")
def imported_home(tmp_path_factory, tiny) -> Path:
    """A data directory of its own holding the imports (the shared models' manifest stays untouched)."""
    root = tmp_path_factory.mktemp("import-home")
    for key, by_q in tiny["files"].items():
        for q, f in by_q.items():
            r = run_cli("models", "import", str(f), "--name", f"tiny-{key}:{q}", home=root)
            assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def daemon(imported_home, tmp_path_factory):
    """The daemon on its Unix socket, and on loopback TCP for the Java client (an app's token: embed, search:sms)."""
    from test_java import add_client, free_port

    sock = tmp_path_factory.mktemp("sock") / "pe.sock"
    token = add_client(imported_home, "smsapp", "embed", "search:sms")
    port, http = free_port(), free_port()
    d = DaemonProcess(imported_home, sock, "--model", "none", "--tcp", f"127.0.0.1:{port}",
                      "--http", f"127.0.0.1:{http}").wait_ready()
    d.tcp, d.token, d.http = f"tcp://127.0.0.1:{port}", token, f"http://127.0.0.1:{http}"
    yield d
    assert d.stop() == 0


def test_import_reads_the_file_and_detects_families(tiny, imported_home):
    """Pooling, dims and context from the file; prefixes from the family the file's names say."""
    manifest = json.loads((imported_home / "models" / "manifest.json").read_text())["models"]
    bge = manifest["tiny-bge:f16"]["imported"]
    assert (bge["architecture"], bge["pooling"], bge["dims"], bge["tokenizer"]) == ("bert", "cls", 64, "bert")
    assert bge["query_prefix"] == families.BGE_EN_QUERY and bge["document_prefix"] == ""
    e5 = manifest["tiny-e5:f16"]["imported"]
    assert (e5["pooling"], e5["tokenizer"], e5["query_prefix"], e5["document_prefix"]) == ("mean", "t5", "query: ", "passage: ")
    rr = manifest["tiny-reranker:f16"]["imported"]
    assert (rr["pooling"], rr["dims"], rr["score"], rr["query_prefix"]) == ("rank", 1, "sigmoid", "")
    assert manifest["tiny-bge:q8_0"]["quantization"] == "q8_0"
    for entry in manifest.values():
        copy = imported_home / "models" / entry["file"]
        assert copy.stat().st_size == entry["size"]
    # With no --name the name comes from the file's own names and type.
    r = run_cli("models", "import", str(tiny["files"]["bge"]["f16"]), home=imported_home)
    assert r.returncode == 0, r.stderr
    assert "imported bge-small-en-v1.5:f16" in r.stdout and "bge-en" in r.stdout
    assert run_cli("models", "remove", "bge-small-en-v1.5:f16", home=imported_home).returncode == 0


def test_fidelity_through_the_daemon(tiny, daemon, capsys):
    """Each architecture through the daemon against torch on the same weights (the note's table)."""
    rows = []
    with daemon.client(timeout=120) as c:
        for key in ("bge", "e5"):
            model = tiny["models"][key]
            ref = tm.torch_embed(model, TEXTS)
            spread = tm.diversity(ref)
            assert spread < 0.97, f"{key}: texts map to near-identical vectors ({spread:.3f}); the bound would prove nothing"
            for q in ("f16", "q8_0"):
                got = c.embed(TEXTS, model=f"tiny-{key}:{q}", normalize=False, truncate=True).astype(np.float64)
                cos = row_cosines(got, ref)
                rows.append((f"tiny-{key}:{q}", model.architecture, f"{model.pooling} / {model.tokenizer}",
                             f"cos {cos.mean():.6f} / {cos.min():.6f} (texts' mean cos {spread:.2f})"))
                assert cos.min() >= (EMBED_COS if q == "f16" else 0.99), (key, q, cos.min())
        for key in ("reranker", "reranker2"):
            model = tiny["models"][key]
            ref = tm.torch_rerank(model, QUERY, TEXTS)
            for q in tiny["files"][key]:
                reply = c.rerank_full(QUERY, TEXTS, f"tiny-{key}:{q}")
                logits = np.array(reply["logits"])
                assert reply["scale"] == "sigmoid"
                np.testing.assert_allclose(reply["scores"], 1 / (1 + np.exp(-logits)), rtol=1e-6)
                err = np.abs(logits - ref)
                score_err = np.abs(np.array(reply["scores"]) - 1 / (1 + np.exp(-ref)))
                corr = float(np.corrcoef(logits, ref)[0, 1])
                rows.append((f"tiny-{key}:{q}", model.architecture, f"{model.pooling} / {model.tokenizer}",
                             f"score (sigmoid) max |Δ| {score_err.max():.1e}; logit max |Δ| {err.max():.1e}, "
                             f"mean {err.mean():.1e}, Pearson {corr:.5f} (logits span {np.ptp(ref):.2f})"))
                # Both: one segment embedding, and two (fed by daemon/segments.py; 2.0 off without it).
                if q == "f16":
                    assert err.max() <= RERANK_ABS, err.max()
                    assert score_err.max() <= RERANK_ABS / 4, score_err.max()  # sigmoid' <= 1/4
                    assert np.argmax(logits) == np.argmax(ref)
                assert corr > 0.99, (q, corr)
        # The same weights without the pooler (what the unamended converter writes) land far outside the bound.
        assert np.abs(_without_pooler(tiny["models"]["reranker"], QUERY, TEXTS) - tm.torch_rerank(tiny["models"]["reranker"], QUERY, TEXTS)).max() > POOLERLESS_GAP
    with capsys.disabled():
        print("\n| model | architecture | pooling / tokenizer | pocketembed through the daemon vs torch, 200 SMS |")
        print("|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")


def _without_pooler(model: tm.TinyModel, query: str, docs: list[str]) -> np.ndarray:
    """torch's classifier applied to the [CLS] state directly: the function of a GGUF that lost the pooler."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.path)
    net = AutoModelForSequenceClassification.from_pretrained(model.path).eval()
    enc = tok([query] * len(docs), docs, padding=True, truncation="only_second", max_length=128, return_tensors="pt")
    enc.pop("token_type_ids", None)
    with torch.no_grad():
        cls = net.bert(**enc).last_hidden_state[:, 0]
        return net.classifier(cls)[:, 0].numpy().astype(np.float64)


def test_prefixes_apply_through_the_daemon(daemon):
    """input_type adds the family's prefix: e5's "query: " is the same vector as embedding it by hand."""
    with daemon.client(timeout=60) as c:
        a = c.embed(["hello there"], model="tiny-e5:f16", input_type="query")
        b = c.embed(["query: hello there"], model="tiny-e5:f16")
        plain = c.embed(["hello there"], model="tiny-e5:f16")
    assert row_cosines(a, b)[0] > 0.99999
    assert row_cosines(a, plain)[0] < 0.999


def test_search_reranks_the_top_candidates(daemon):
    """search(rerank=...) returns the reranker's k best of the top candidates, with its scores."""
    with daemon.client(timeout=120) as c:
        c.index_add("sms", [{"id": i, "text": t} for i, t in enumerate(TEXTS)], model="tiny-bge:f16", store_text=True)
        plain = c.search("sms", QUERY, k=30, with_text=True)
        hits = c.search("sms", QUERY, k=5, rerank="tiny-reranker:f16", rerank_top=30)
        direct = c.rerank_full(QUERY, [h["text"] for h in plain], "tiny-reranker:f16")
    # The two requests decode the pairs in different batches: equal only to ~1e-5, so near-ties may swap.
    by_id = {h["id"]: (logit, score) for h, logit, score in zip(plain, direct["logits"], direct["scores"])}
    fifth = np.sort(direct["logits"])[-5]
    assert len({h["id"] for h in hits}) == 5 and all(by_id[h["id"]][0] >= fifth - 1e-3 for h in hits)
    got = np.array([h["rerank_score"] for h in hits])
    assert np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, [by_id[h["id"]][1] for h in hits], atol=1e-3)
    assert "text" not in hits[0]
    assert [h["id"] for h in plain[:5]] != [h["id"] for h in hits]  # the reranker did reorder


def test_model_kinds_are_enforced(daemon):
    with daemon.client(timeout=60) as c:
        for call in (lambda: c.embed(["hi"], model="tiny-reranker:f16"),
                     lambda: c.rerank("q", ["d"], "tiny-bge:f16"),
                     lambda: c.index_add("rr", [{"id": 1, "text": "x"}], model="tiny-reranker:f16"),
                     lambda: c.search("sms", "q", rerank="tiny-bge:f16")):
            with pytest.raises(DaemonError) as e:
                call()
            assert e.value.code == "wrong_model_kind", e.value
        with pytest.raises(DaemonError) as e:
            c.rerank("q", ["d"], "no-such-model")
        assert e.value.code == "unknown_model"
        listed = {m["name"]: m for m in c.models()}
        assert listed["tiny-reranker:f16"]["kind"] == "rerank" and listed["tiny-bge:f16"]["kind"] == "embed"
        assert listed["tiny-bge:f16"]["imported"] and not listed["all-minilm-l6-v2:q8_0"]["imported"]
        # Loaded, unloaded and loaded on demand like a catalog model.
        assert c.load("tiny-e5:q8_0")["loaded"]
        assert c.unload("tiny-e5:q8_0")["loaded"] is False
        assert c.embed(["again"], model="tiny-e5:q8_0").shape == (1, 64)


def test_import_errors_are_clear_and_change_nothing(tiny, home, tmp_path):
    """Each refused file or name: one clear line, exit status 1, the manifest and models folder untouched."""
    root = tmp_path / "h"
    assert run_cli("models", "import", str(tiny["files"]["bge"]["q8_0"]), "--name", "mine:q8_0", home=root).returncode == 0
    before = (root / "models" / "manifest.json").read_bytes(), sorted(p.name for p in (root / "models").iterdir())

    text = tmp_path / "notes.gguf"
    text.write_text("these are not weights\n")
    cut = tmp_path / "cut.gguf"
    data = tiny["files"]["bge"]["f16"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    lm_dir = tm.llama_causal(tmp_path / "tiny-llama", tiny["models"]["e5"].path / "sentencepiece.bpe.model")
    lm = tmp_path / "tiny-llama.gguf"
    convert_to_gguf(lm_dir.path, lm, home, progress=lambda m: None)
    cases = [
        ([str(text)], "model_corrupt", "is not a GGUF file"),
        ([str(cut)], "model_corrupt", "truncated"),
        ([str(lm)], "import_refused", "causal language model without a pooling type"),
        # A SentencePiece vocabulary without byte fallback makes llama.cpp's tokenizer abort (std::out_of_range):
        # the child process that tried it dies, the import is refused.
        ([str(lm), "--pooling", "last"], "import_refused", "llama.cpp crashed (signal 6)"),
        ([str(tiny["files"]["e5"]["f16"]), "--name", "all-minilm-l6-v2:q8_0"], "import_refused", "taken by the catalog"),
        ([str(tiny["files"]["e5"]["f16"]), "--name", "mine:q8_0"], "import_refused", "is taken (imported from"),
        ([str(tiny["files"]["e5"]["f16"]), "--name", "Bad Name"], "import_refused", "is not valid"),
        ([str(tmp_path / "missing.gguf")], "import_refused", "is not a file"),
    ]
    for argv, code, words in cases:
        r = run_cli("models", "import", *argv, home=root)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pocketembed: error[{code}]:") and words in lines[0], (argv, r.stderr)
        after = (root / "models" / "manifest.json").read_bytes(), sorted(p.name for p in (root / "models").iterdir())
        assert after == before, argv
    # --replace takes the name over and deletes the old copy.
    r = run_cli("models", "import", str(tiny["files"]["e5"]["f16"]), "--name", "mine:q8_0", "--replace", home=root)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (root / "models").glob("*.gguf"))
    assert len(files) == 1 and files != before[1]


def test_a_damaged_copy_is_refused_with_the_remedy(tiny, tmp_path):
    root = tmp_path / "h"
    assert run_cli("models", "import", str(tiny["files"]["reranker"]["f16"]), "--name", "rr:f16", home=root).returncode == 0
    copy = next((root / "models").glob("imported-rr-f16-*.gguf"))
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", "none").wait_ready()
    try:
        with d.client(timeout=60) as c, pytest.raises(DaemonError) as e:
            c.rerank("q", ["d"], "rr:f16")
        assert e.value.code == "model_corrupt" and "re-import it" in str(e.value)
    finally:
        assert d.stop() == 0
    r = run_cli("models", "remove", "rr:f16", home=root)
    assert r.returncode == 0 and not copy.exists()
    r = run_cli("models", "remove", "all-minilm-l6-v2:q8_0", home=root)
    assert r.returncode == 1 and "catalog model" in r.stderr


def test_family_detection_rules():
    """The rules read names as model makers and llama.cpp write them."""
    cases = {
        "bert bge-small-en-v1.5": "bge-en", "bert bge-m3": "bge-m3", "xlm-roberta multilingual-e5-small": "e5",
        "nomic-bert nomic-embed-text-v1.5": "nomic-embed", "gemma-embedding embeddinggemma-300m": "embeddinggemma",
        "bert bge-small-zh-v1.5": "bge-zh", "bert snowflake-arctic-embed-s": "arctic-embed", "bert all-minilm-l6-v2": None,
        "bert bge-reranker-v2-m3": None,
    }
    for text, family in cases.items():
        found = families.detect(text)
        assert (found.name if found else None) == family, text


def test_java_client_reranks(daemon, tmp_path):
    """The Android side: the Java client's rerank and search(rerank=...) agree with the Python client's."""
    from test_java import compile_java, java

    cp = compile_java(tmp_path)
    docs = TEXTS[:6]
    r = java(cp, "RerankCheck", daemon.tcp, "tiny-reranker:f16", "sms", QUERY, *docs, token=daemon.token)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout.decode().strip().splitlines()[-1].replace("'", '"'))
    with daemon.client(timeout=60) as c:
        scores = c.rerank(QUERY, docs, "tiny-reranker:f16")
        hits = c.search("sms", QUERY, k=3, rerank="tiny-reranker:f16", rerank_top=20)
    np.testing.assert_allclose(out["scores"], scores, atol=1e-6)
    assert [int(i) for i in out["ids"]] == [h["id"] for h in hits]
    np.testing.assert_allclose([float(x) for x in out["rerank_scores"]], [h["rerank_score"] for h in hits], atol=1e-6)


def test_pair_template_and_its_limits(engines):
    """[CLS] q [SEP] d [SEP]; an over-long pair loses the end of its document, never the query."""
    from pocketembed.errors import EmptyText, TextTooLong

    e = engines["q8_0"]
    q, d = e.token_ids("dinner tonight?", special=False), e.token_ids("see you at eight", special=False)
    cls, sep = e.tokenize("x")[0], e.tokenize("x")[-1]
    assert e.tokenize_pair("dinner tonight?", "see you at eight") == [cls, *q, sep, *d, sep]
    long_doc = "word " * 600
    pair = e.tokenize_pair("dinner tonight?", long_doc)
    assert len(pair) == e.max_tokens and pair[: len(q) + 2] == [cls, *q, sep] and pair[-1] == sep
    with pytest.raises(TextTooLong):
        e.tokenize_pair("dinner tonight?", long_doc, truncate=False)
    with pytest.raises(TextTooLong, match="leaving no room"):
        e.tokenize_pair("word " * 300, "short")
    with pytest.raises(EmptyText):
        e.tokenize_pair("dinner", "   ")


def test_http_rerank_scores_equal_the_rerank_op(daemon):
    """Jina's /v1/rerank and TEI's /rerank over HTTP: the rerank op's scores, in relevance order."""
    import httpx

    h = {"Authorization": f"Bearer {daemon.token}"}
    docs = TEXTS[:8]
    with daemon.client() as c:
        want = c.rerank_full(QUERY, docs, "tiny-reranker:f16")
    jina = httpx.post(f"{daemon.http}/v1/rerank", headers=h, timeout=60, json={
        "model": "tiny-reranker:f16", "query": QUERY, "documents": docs, "top_n": 3, "return_documents": True})
    assert jina.status_code == 200, jina.text
    results = jina.json()["results"]
    order = list(np.argsort(-np.array(want["scores"]), kind="stable")[:3])
    assert [r["index"] for r in results] == order
    assert [r["relevance_score"] for r in results] == [want["scores"][i] for i in order]
    assert [r["document"]["text"] for r in results] == [docs[i] for i in order]
    assert jina.json()["usage"]["total_tokens"] > len(docs)
    tei = httpx.post(f"{daemon.http}/rerank", headers=h, timeout=60, json={
        "model": "tiny-reranker:f16", "query": QUERY, "texts": docs, "raw_scores": True, "return_text": True})
    assert tei.status_code == 200, tei.text
    by_index = {r["index"]: r for r in tei.json()}
    assert [by_index[i]["score"] for i in range(len(docs))] == want["logits"]
    assert by_index[0]["text"] == docs[0]
    # Several rerankers are prepared here: a request that names none is told which.
    r = httpx.post(f"{daemon.http}/v1/rerank", headers=h, json={"query": QUERY, "documents": docs})
    assert r.status_code == 404 and "tiny-reranker:f16" in r.json()["error"]["message"]
    r = httpx.post(f"{daemon.http}/v1/rerank", headers=h, json={"model": "tiny-bge:f16", "query": QUERY,
                                                                  "documents": docs})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"


def test_rerank_limits_through_the_daemon(daemon):
    from pocketembed.ipc import ops

    with daemon.client(timeout=60) as c:
        long_doc = "word " * 2000
        assert len(c.rerank(QUERY, [long_doc, "short"], "tiny-reranker:f16")) == 2  # truncated to max_tokens
        for call, code in ((lambda: c.rerank_full(QUERY, [long_doc], "tiny-reranker:f16", truncate=False), "text_too_long"),
                           (lambda: c.rerank(QUERY, ["d"] * (ops.MAX_RERANK_DOCS + 1), "tiny-reranker:f16"), "too_large"),
                           (lambda: c.rerank(QUERY, [], "tiny-reranker:f16"), "invalid_input"),
                           (lambda: c.rerank("  ", ["d"], "tiny-reranker:f16"), "empty_text"),
                           (lambda: c.search("sms", QUERY, k=5, rerank_top=30), "invalid_input"),
                           (lambda: c.search("sms", QUERY, k=50, rerank="tiny-reranker:f16", rerank_top=30), "invalid_input")):
            with pytest.raises(DaemonError) as e:
                call()
            assert e.value.code == code, (code, e.value)
        assert c.ping()["pong"]


def test_cli_lists_imports_and_reranks(daemon, imported_home):
    r = run_cli("models", "list", home=imported_home)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("tiny-reranker:f16"))
    assert "rerank (imported)" in line and "rank" in line.split("rerank (imported)")[1]
    listed = json.loads(run_cli("models", "list", "--json", home=imported_home).stdout)["models"]
    e5 = next(m for m in listed if m["name"] == "tiny-e5:f16")
    assert e5["kind"] == "embed" and e5["query_prefix"] == "query: " and e5["source"].startswith("imported from ")
    docs = ["Dinner at 8?", "Your parcel is on its way", "see you at the party"]
    r = run_cli("rerank", QUERY, *docs, "--model", "tiny-reranker:f16", "--socket", daemon.endpoint, "--json")
    assert r.returncode == 0, r.stderr
    with daemon.client(timeout=60) as c:
        assert json.loads(r.stdout)["scores"] == pytest.approx(c.rerank(QUERY, docs, "tiny-reranker:f16"), abs=1e-6)
    r = run_cli("rerank", QUERY, *docs, "--model", "tiny-reranker:f16", "--socket", daemon.endpoint)
    scores = [float(ln.split()[0]) for ln in r.stdout.splitlines()[1:]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    r = run_cli("rerank", QUERY, "x", "--model", "tiny-bge:f16", "--socket", daemon.endpoint)
    assert r.returncode == 1 and "error[wrong_model_kind]" in r.stderr


def test_a_running_daemon_sees_imports_and_removals(daemon, imported_home, tiny):
    """The manifest is re-read when it changes: no restart to use a new import, none to stop serving a removed one."""
    r = run_cli("models", "import", str(tiny["files"]["e5"]["q8_0"]), "--name", "late-e5:q8_0", home=imported_home)
    assert r.returncode == 0, r.stderr
    with daemon.client(timeout=60) as c:
        assert c.embed(["hello"], model="late-e5:q8_0").shape == (1, 64)
        assert run_cli("models", "remove", "late-e5:q8_0", home=imported_home).returncode == 0
        with pytest.raises(DaemonError) as e:
            c.embed(["hello"], model="late-e5:q8_0")
        assert e.value.code == "unknown_model"


def test_the_header_reader_refuses_garbage_without_reading_past_the_file(tiny, tmp_path):
    """Cut anywhere, or garbled: always ModelCorrupt, never another exception or a read past the end."""
    from pocketembed.errors import ModelCorrupt
    from pocketembed.gguf_models import metadata

    good = tiny["files"]["reranker"]["f16"].read_bytes()
    rng = np.random.default_rng(3)
    bad = tmp_path / "bad.gguf"
    cases = [good[:n] for n in (4, 8, 23, 100, 5000, len(good) - 1)]
    cases += [b"GGUF" + rng.bytes(2000) for _ in range(20)]
    flipped = bytearray(good)
    for i in rng.integers(4, 4000, 40):
        flipped[i] ^= 0xFF
    cases.append(bytes(flipped))
    for data in cases:
        bad.write_bytes(data)
        try:
            metadata.read(bad)
        except ModelCorrupt:
            pass
    assert metadata.read(tiny["files"]["reranker"]["f16"]).has_classifier
