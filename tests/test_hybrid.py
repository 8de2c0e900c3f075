"""Hybrid search: the fusion policy alone (no model), and `search`'s three modes against a real daemon."""

from __future__ import annotations

import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess
from pocketembed.daemon import fusion
from pocketembed.daemon.lexical import parse_query
from pocketembed.ipc import InvalidRequest
from pocketembed.sms import load_sms

Q8 = "all-minilm-l6-v2:q8_0"


# -- the policy, model-free -----------------------------------------------------------


def test_a_number_a_price_a_quote_or_a_short_query_asks_for_the_exact_thing():
    for q in ("09050000327", "£1000", 'the "library card"', "Nokia", "txt STOP to 87239"):
        assert fusion.query_weight(parse_query(q)) == fusion.EXACT_WEIGHT, q
    for q in ("are you still at the library tonight?", "sorry running late stuck in traffic"):
        assert fusion.query_weight(parse_query(q)) == fusion.HINT_WEIGHT, q


def test_coverage_is_the_share_of_the_querys_rarity_matched():
    idfs = {"call": 0.5, "09050000327": 7.5}
    assert fusion.coverage(["09050000327"], idfs) == pytest.approx(7.5 / 8)
    assert fusion.coverage(["call"], idfs) == pytest.approx(0.5 / 8)
    assert fusion.coverage([], idfs) == 0 and fusion.coverage(["x"], {}) == 0


def test_an_exact_number_beats_closer_meanings_and_common_words_do_not():
    idfs = {"call": 0.5, "09050000327": 7.5}
    vector = {"a": 0.52, "b": 0.50, "c": 0.49}
    lexical = {"n": ["call", "09050000327"], "b": ["call"]}
    fused = fusion.fuse(vector, lexical, {"n": 0.30}, idfs, fusion.EXACT_WEIGHT, k=3)
    assert [f.id for f in fused] == ["n", "b", "a"]
    assert fused[0].matched == ("lexical",) and fused[1].matched == ("lexical", "vector")


def test_a_sentence_keeps_the_vector_order_when_only_common_words_match():
    idfs = {"you": 0.3, "still": 1.0, "library": 4.0}
    vector = {"target": 0.70, "near": 0.69}
    lexical = {"noise": ["you", "still"]}  # shares the query's common words, not its meaning
    fused = fusion.fuse(vector, lexical, {"noise": 0.40}, idfs, fusion.HINT_WEIGHT, k=3)
    assert [f.id for f in fused] == ["target", "near", "noise"]


def test_a_candidate_gone_between_the_two_reads_is_left_out():
    fused = fusion.fuse({"a": 0.5}, {"gone": ["x"]}, {}, {"x": 1.0}, 0.6, k=5)
    assert [f.id for f in fused] == ["a"]


# -- the op, against a real daemon ---------------------------------------------------


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid")
    d = DaemonProcess(fresh_home(home, tmp / "home"), tmp / "pe.sock", "--model", Q8).wait_ready()
    texts = load_sms()[:1000]
    with d.client(timeout=120) as c:
        for store_text in (True, False):
            name = "kept" if store_text else "private"
            for at in range(0, len(texts), 250):
                c.index_add(name, [{"id": i + 1, "text": t, "metadata": {"spam": "prize" in t.lower()}}
                                   for i, t in enumerate(texts[at:at + 250], start=at)], store_text=store_text)
    yield d, texts
    assert d.stop() == 0


def holding(texts: list[str], needle: str) -> set[int]:
    return {i + 1 for i, t in enumerate(texts) if needle in t}


@pytest.mark.parametrize("collection", ["kept", "private"])
def test_a_number_in_the_messages_is_found_first_by_hybrid_and_lexical(daemon, collection):
    d, texts = daemon
    number = "08000930705"
    want = holding(texts, number)
    assert want
    with d.client() as c:
        for mode in ("hybrid", "lexical"):
            hits = c.search(collection, number, k=5, mode=mode)
            assert hits[0]["id"] in want and "lexical" in hits[0]["matched"], (mode, hits[:2])
        vector = c.search(collection, number, k=5, mode="vector")
        assert all(h["matched"] == ["vector"] for h in vector)


def test_hybrid_keeps_the_meaning_of_a_sentence(daemon):
    d, texts = daemon
    with d.client() as c:
        query = "what time does the film start tonight?"
        vector = [h["id"] for h in c.search("kept", query, k=5, mode="vector")]
        hybrid = [h["id"] for h in c.search("kept", query, k=5)]
    assert hybrid[0] in vector[:3]  # a sentence's exact words only break near-ties


def test_query_syntax_is_text_in_every_mode(daemon):
    d, _ = daemon
    with d.client() as c:
        for q in ('"unbalanced', 'NEAR(win prize)', "-free *", "col:umn ^2", "'; DROP TABLE items; --", '""'):
            for mode in ("hybrid", "lexical", "vector"):
                hits = c.search("kept", q, k=3, mode=mode)
                assert isinstance(hits, list), (q, mode)


def test_filter_and_text_work_in_every_mode(daemon):
    d, texts = daemon
    with d.client() as c:
        for mode in ("hybrid", "lexical", "vector"):
            hits = c.search("kept", "win a prize call now", k=5, mode=mode, filter={"spam": True}, with_text=True)
            assert hits and all(h["metadata"] == {"spam": True} for h in hits), mode
            assert all(h["text"] == texts[h["id"] - 1] for h in hits), mode
        with pytest.raises(InvalidRequest) as e:
            c.search("kept", "x", mode="fuzzy")
        assert e.value.code == "invalid_input"
