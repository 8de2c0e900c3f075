"""Quantized search through the real daemon, on the 5,574 real SMS.

One daemon (own data directory) indexes the SMS database with a job, as the
phone does while charging; the tests then search it through the Python client,
the SQL adapter and the CLI, and write to their own collections.
"""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest

from conftest import fresh_home, run_cli
from daemon_proc import DaemonProcess
from pocketembed.ipc import InvalidRequest, ModelError
from pocketembed.ipc import sqlite as pe_sqlite
from sms_db import make_sms_db, sms_rows

Q8 = "all-minilm-l6-v2:q8_0"
Q4 = "all-minilm-l6-v2:q4_0"


@pytest.fixture(scope="module")
def indexed(home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    root = fresh_home(home, tmp / "home")
    db = make_sms_db(tmp / "sms.db")
    d = DaemonProcess(root, tmp / "pe.sock", "--model", Q8, env={"POCKETEMBED_JOB_SOURCES": str(tmp)}).wait_ready()
    with d.client() as c:
        job = c.index_table(str(db), "messages", "id", "body", collection="sms")
        deadline = time.monotonic() + 300
        while c.job(job["id"])["state"] != "done":
            assert c.job(job["id"])["state"] in ("queued", "running", "waiting") and time.monotonic() < deadline
            time.sleep(0.2)
    yield d, db
    assert d.stop() == 0


def test_one_entry_per_source_id_after_indexing_and_a_rerun(indexed):
    d, db = indexed
    with d.client() as c:
        info = {x["name"]: x for x in c.collections()}["sms"]
        assert info["items"] == info["vectors"] == 5574 and info["bytes_per_vector"] == 48 + 384
        job = c.index_table(str(db), "messages", "id", "body", collection="sms")
        while (job := c.job(job["id"]))["state"] != "done":
            time.sleep(0.1)
        assert (job["unchanged"], job["embedded"]) == (5574, 0)
        assert {x["name"]: x for x in c.collections()}["sms"]["items"] == 5574


def test_messages_used_as_queries_find_their_neighbours(indexed, engines):
    d, _ = indexed
    rows = sms_rows()
    texts = [r["body"] for r in rows]
    vec = engines["q8_0"].embed(texts)
    rng = np.random.default_rng(7)
    good = total = 0
    with d.client() as c:
        for q in rng.choice(len(texts), 25, replace=False):
            hits = c.search("sms", texts[q], k=10, mode="vector")  # the vectors alone, against exact cosines
            assert len(hits) == 10 and all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(9))
            assert texts[hits[0]["id"] - 1] == texts[q]  # itself (or an identical message) first
            exact = vec @ vec[q]
            tenth = np.sort(exact)[-10]
            good += sum(exact[h["id"] - 1] >= tenth - 1e-3 for h in hits)
            total += 10
    assert good / total >= 0.9, good / total


def test_sql_adapter_and_cli_give_the_clients_ids(indexed):
    d, _ = indexed
    query = "sorry i'll call you later, in a meeting"
    with d.client() as c:
        ids = [h["id"] for h in c.search("sms", query, k=5)]
        conn = sqlite3.connect(":memory:")
        pe_sqlite.register(conn, client=c)
        rows = conn.execute("SELECT value ->> 'id' FROM json_each(pe_search('sms', ?, 5))", [query]).fetchall()
        assert [r[0] for r in rows] == ids
    r = run_cli("search", "--socket", str(d.socket_path), "--collection", "sms", "-k", "5", "--json", query)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [h["id"] for h in out] == ids and all({"id", "score"} <= set(h) for h in out)


def test_results_carry_the_messages_text_when_asked(indexed):
    d, db = indexed
    bodies = {r["id"]: r["body"] for r in sms_rows()}
    with d.client() as c:
        plain = c.search("sms", "are we meeting for dinner tonight?", k=5)
        assert all("text" not in h for h in plain)  # only on request
        hits = c.search("sms", "are we meeting for dinner tonight?", k=5, with_text=True)
        assert [h["id"] for h in hits] == [h["id"] for h in plain]
        assert all(h["text"] == bodies[h["id"]] for h in hits)  # read back from the job's source rows
        # The texts of index.add items are kept only by a collection made with store_text.
        items = [{"id": "a", "text": "The plumber comes on Tuesday morning"}, {"id": "b", "text": "Lunch at noon?"}]
        c.index_add("private", items)
        c.index_add("kept", items, store_text=True)
        assert [h["text"] for h in c.search("private", "plumber visit", k=2, with_text=True)] == [None, None]
        kept = c.search("kept", "plumber visit", k=2, with_text=True)
        assert [(h["id"], h["text"]) for h in kept] == [("a", items[0]["text"]), ("b", items[1]["text"])]
        info = {x["name"]: x for x in c.collections()}
        assert (info["private"]["store_text"], info["kept"]["store_text"]) == (False, True)
        with pytest.raises(InvalidRequest) as e:  # fixed when the collection is made
            c.index_add("private", items, store_text=True)
        assert e.value.code == "collection_mismatch"
        c.drop_collection("private")
        c.drop_collection("kept")
    with sqlite3.connect(d.home / "index.db") as conn:  # nothing of the user's text stays behind unasked
        assert conn.execute("SELECT COUNT(*) FROM items WHERE text IS NOT NULL").fetchone()[0] == 0
    r = run_cli("search", "--socket", str(d.socket_path), "--collection", "sms", "-k", "3", "dinner tonight?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["SCORE", "MATCHED", "ID", "TEXT", "METADATA"]
    shown = r.stdout.splitlines()[1:]
    assert len(shown) == 3 and all(" ".join(bodies[int(line.split()[2])].split())[:40] in line for line in shown)
    assert all(line.split()[1] in ("vector", "lexical", "lexical+vector") for line in shown)


def test_upsert_delete_readd_and_metadata_filter(indexed):
    d, _ = indexed
    with d.client() as c:
        items = [{"id": "m1", "text": "Dinner at Luigi's at 8, I booked a table", "metadata": {"from": "ann"}},
                 {"id": "m2", "text": "Your parcel will be delivered tomorrow", "metadata": {"from": "shop"}},
                 {"id": 3, "text": "Happy birthday mum, flowers are on the way", "metadata": {"from": "ann"}}]
        res = c.index_add("inbox", items)
        assert (res["added"], res["embedded"]) == (3, 3)
        assert c.search("inbox", "restaurant booking tonight", k=1)[0] == {"id": "m1", "score": pytest.approx(
            c.search("inbox", "restaurant booking tonight", k=1)[0]["score"]), "metadata": {"from": "ann"},
            "matched": ["vector"]}
        assert [h["id"] for h in c.search("inbox", "delivery", k=3, filter={"from": "ann"})] in (["m1", 3], [3, "m1"])
        # Same texts again: nothing is embedded; a new text that the store already holds is reused.
        again = c.index_add("inbox", items + [{"id": "m4", "text": items[1]["text"]}])
        assert (again["unchanged"], again["added"], again["embedded"], again["reused"]) == (3, 1, 0, 1)
        # Upsert by id: m2 is now about something else.
        c.index_add("inbox", [{"id": "m2", "text": "The football match is cancelled because of rain"}])
        assert c.search("inbox", "game called off, weather", k=1)[0]["id"] == "m2"
        assert c.index_delete("inbox", ["m2", "nope"]) == 1
        assert "m2" not in [h["id"] for h in c.search("inbox", "game called off, weather", k=10)]
        c.index_add("inbox", [{"id": "m2", "text": "The football match is cancelled because of rain"}])
        assert c.search("inbox", "game called off, weather", k=1)[0]["id"] == "m2"
        assert {x["name"]: x for x in c.collections()}["inbox"]["items"] == 4
        stats = c.stats()["index"]["query_cache"]
        assert stats["hits"] >= 2 and stats["hit_rate"] > 0  # the repeated queries did not run the model
        assert c.drop_collection("inbox")["dropped"] == 4
        with pytest.raises(InvalidRequest) as e:
            c.search("inbox", "anything")
        assert e.value.code == "unknown_collection"


def test_long_texts_chunked_on_request(indexed):
    d, _ = indexed
    filler = " ".join(f"The committee discussed item {i} of the quarterly budget at length." for i in range(40))
    long_text = filler + " Finally: the penguin escaped from the zoo and swam to the harbour."
    with d.client() as c:
        with pytest.raises(InvalidRequest) as e:
            c.index_add("docs", [{"id": "long", "text": long_text}])
        assert e.value.code == "text_too_long"
        res = c.index_add("docs", [{"id": "long", "text": long_text},
                                   {"id": "short", "text": "a bird flew over the lake"}], chunk=True)
        assert res["vectors"] > 3
        hits = c.search("docs", "penguin escaped from the zoo", k=2)
        assert hits[0]["id"] == "long" and len({h["id"] for h in hits}) == 2  # one entry per item: its best chunk
        c.drop_collection("docs")


def test_bad_search_input_gets_clear_errors(indexed):
    d, _ = indexed
    with d.client() as c:
        c.index_add("q4", [{"id": 1, "text": "hello there"}], model=Q4)
        for args, code in [
            (("nope", "hello"), "unknown_collection"),
            (("sms", ""), "empty_text"),
            (("sms", "   "), "empty_text"),
        ]:
            with pytest.raises(InvalidRequest) as e:
                c.search(*args)
            assert e.value.code == code
        for k in (0, -1, 10**6):
            with pytest.raises(InvalidRequest) as e:
                c.search("sms", "hello", k=k)
            assert e.value.code == "invalid_input" and "$.k" in e.value.message  # names the argument
        with pytest.raises(InvalidRequest) as e:
            c.call("search", {"collection": "q4", "query": "hello", "model": Q8})
        assert e.value.code == "collection_mismatch"
        with pytest.raises(InvalidRequest) as e:
            c.index_add("q4", [{"id": 2, "text": "hi"}], model=Q8)
        assert e.value.code == "collection_mismatch"
        with pytest.raises(ModelError):
            c.call("search", {"collection": "sms", "query": "hello", "model": "no-such-model"})
        with pytest.raises(InvalidRequest) as e:
            c.index_add("x", [{"id": True, "text": "hi"}])
        assert e.value.code == "invalid_input"
        assert c.search("q4", "hello there", k=1)[0]["id"] == 1
        assert c.ping()["pong"]
