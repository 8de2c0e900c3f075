"""Known-item search quality and latency per search mode: vector, lexical, hybrid.

    python scripts/eval_hybrid.py [--model all-minilm-l6-v2:q8_0] [--repeat 2] [--items 100000]
    python scripts/eval_hybrid.py --check      # only verify the query set's labels against the corpus
    python scripts/eval_hybrid.py --fusion-variants   # also replay other fusion rules offline (see below)

The query set is scripts/search_queries.json: queries written by reading the
bundled SMS, of four types — ``number`` (a phone number, short code or price
that appears verbatim in messages), ``name`` (a person, place or brand),
``paraphrase`` (one specific message described in other words: no content word
of the query occurs in it) and ``mixed`` (a name or number plus a paraphrase).
Each lists every relevant message id (message i of the file, from 0, has id
i + 1, as the demo and scripts/eval_search.py index it). Before anything runs,
the labels are checked against the corpus (see ``check_queries``): a number's or
name's relevant ids are exactly the messages that contain it, a mixed query's
all contain its name or number, a paraphrase shares no content word (nor its
stem, nor as a substring of 5+ letters: "remember" in "MEREMEMBERIN") with its
messages, and no near-duplicate (difflib ratio >= 0.8; for a mixed query, among
the messages with its name or number) of a relevant message is left out.

A real `pocketembed serve` (its own process, a fresh data directory) indexes the
5,574 SMS into a collection with store_text on (index.add, 256 per request);
every query then goes through ``Client.search(collection, query, k=10,
mode=mode)`` for each mode, the modes taking turns query by query so that the
machine's noise hits all of them alike; each timed call sends a text the
daemon's query-vector cache has not seen (the query plus trailing spaces), so
every vector and hybrid search embeds its query. Printed: success@10 (a relevant message
in the top 10) and MRR (over the top 10) per query type and overall, per mode;
search latency p50/p99 as the client sees it (query embedding included). If the
client or the daemon does not know ``mode`` yet, only the daemon's one search is
measured and reported as vector.

``--items N`` then starts a second daemon on a fresh directory and indexes N
items made from the SMS repeated with small variations (round r > 0 of the
corpus: two words swapped at random and " (r)" appended, so every text is new to
the embedding cache); it prints the same latency per mode on it and the index's
size on disk per item (dbstat of the daemon's SQLite files, by table: the
lexical index's tables beside the vectors').

``--fusion-variants`` (issue 29: measure the fusion candidates, keep the best) asks
the same daemon, per query, for both sides' raw candidates — the vector side's
cosines (``mode="vector"``, k=1000, rescore_multiplier=10: at 5,574 items the whole
collection is rescored, so these are the top 1,000 int8 cosines) and the lexical
side's BM25 top 50 with their texts — and replays fusion offline: reciprocal-rank
fusion (plain, and with the lexical side weighted 0.5 and 0.3), min-max normalised
scores summed (lexical share α = 0.5 and 0.3), and the daemon's own rule
(daemon/fusion.py's ``fuse``, ``query_weight``, ``coverage``) over a grid of
(EXACT_WEIGHT, HINT_WEIGHT). Approximations, for the daemon's rule: a candidate's
matched query terms come from tokenizing its text (a digit query term of >= 4
digits also matches the longer numbers it begins, counted as matched as
lexical.search reports it; lexical.search may skip a very common term's postings,
this does not); IDFs come from tokenizing the 5,574 texts; a lexical candidate
outside the vector top 1,000 gets the 1,000th cosine (an upper bound); the vector
side is the top 20 of the fully rescored list (the daemon's rescores 200 Hamming
candidates). The daemon's own hybrid row of the same run is printed beside it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_peers import cpu_model  # scripts/ is on the path: the same CPU line as the benchmarks
from pocketembed.sms import load_messages

QUERIES = Path(__file__).resolve().parent / "search_queries.json"
TYPES = ("number", "name", "paraphrase", "mixed")
MODES = ("vector", "lexical", "hybrid")
K = 10
BATCH = 256

QUERY_SET_ABOUT = (
    "Known-item queries over the bundled SMS (pocketembed/data/SMSSpamCollection.tsv), written by reading it. "
    "Ids: message i of the file (from 0) has id i + 1. type: number | name | paraphrase | mixed. anchor: the "
    "number or name (number, name, mixed). relevant: every message that satisfies the query; for number and "
    "name queries exactly the messages containing the anchor (numbers: not next to another digit; names: "
    "case-insensitive, at a word start). target: the message a paraphrase describes (its near-duplicates are "
    "relevant too). Checked by scripts/eval_hybrid.py --check.")

# Function words (and SMS spellings of them) a paraphrase may share with its message.
STOPWORDS = set("""
a about above after again against all almost along already also although always am among an and another any
anyone anything are around as at be became because been before being below between both but by can cannot
could did do does doing don done down during each either else ever every few for from further get gets got had
has have having he her here hers herself him himself his how however i if in into is it its itself just least
less let like made make many may me might mine more most much must my myself neither no nor not now of off often
on once one only or other others our ours ourselves out over own per quite rather really same shall she should
since so some such than that the their theirs them themselves then there these they this those though through
thus till to too under until up upon us very was we well were what when where whether which while who whom whose
why will with within without would yet you your yours yourself yourselves s t d ll m re ve y
u ur r n im its dont cant wont isnt didnt doesnt
""".split())

_TOKEN = re.compile(r"[a-z0-9£$€]+")


def number_pattern(anchor: str) -> re.Pattern:
    """A number or price as it stands in a message: not next to another digit."""
    return re.compile(r"(?<!\d)" + re.escape(anchor) + r"(?!\d)")


def name_pattern(anchor: str) -> re.Pattern:
    """A name at a word start, any case ("Sony" finds "SonyEricsson", "LUCYxx")."""
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(anchor), re.I)


def is_number(anchor: str) -> bool:
    return bool(re.fullmatch(r"[£$€]?[\d][\d,.]*", anchor))


def containing(texts: list[str], anchor: str) -> list[int]:
    """Ids of the messages that contain ``anchor`` (a number or a name)."""
    pat = number_pattern(anchor) if is_number(anchor) else name_pattern(anchor)
    return [i + 1 for i, t in enumerate(texts) if pat.search(t)]


def near_duplicates(texts: list[str], target: int, ratio: float = 0.8) -> list[int]:
    """Ids of the other messages whose lower-cased text is within difflib ``ratio`` of message ``target``."""
    s = texts[target - 1].lower()
    m = difflib.SequenceMatcher(None, s, autojunk=False)
    out = []
    for i, t in enumerate(texts):
        if i + 1 == target:
            continue
        m.set_seq2(t.lower())
        if m.real_quick_ratio() >= ratio and m.quick_ratio() >= ratio and m.ratio() >= ratio:
            out.append(i + 1)
    return out


def stem(word: str) -> str:
    for suffix in ("ings", "ing", "ies", "ied", "ed", "es", "ly", "er", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_tokens(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS and len(t) > 1}


def shared_content(query: str, message: str) -> set[str]:
    """The query's content words that the message has too: as a token, by stem, or (5+ letters) inside a word."""
    q, m = content_tokens(query), content_tokens(message)
    mstems = {stem(t) for t in m}
    low = message.lower()
    return {t for t in q if t in m or stem(t) in mstems or (len(t) >= 5 and t in low)}


def check_queries(queries: list[dict], texts: list[str], verbose: bool = False) -> list[str]:
    """Every problem with the labels (empty when they hold); see the module docstring."""
    problems = []
    seen = set()
    n = len(texts)
    for q in queries:
        where = f"{q['type']} {q['query']!r}"
        rel = q["relevant"]
        if q["type"] not in TYPES:
            problems.append(f"{where}: unknown type")
        if q["query"].lower() in seen:
            problems.append(f"{where}: duplicate query")
        seen.add(q["query"].lower())
        if not rel or rel != sorted(set(rel)) or not all(1 <= i <= n for i in rel):
            problems.append(f"{where}: relevant ids must be sorted, distinct, in 1..{n}")
            continue
        if q["type"] in ("number", "name", "mixed"):
            anchor = q["anchor"]
            if anchor.lower() not in q["query"].lower():
                problems.append(f"{where}: anchor {anchor!r} not in the query")
            having = containing(texts, anchor)
            if q["type"] == "number" and not is_number(anchor):
                problems.append(f"{where}: not a number")
            if q["type"] in ("number", "name") and rel != having:
                problems.append(f"{where}: relevant {rel} but the messages containing it are {having}")
            if q["type"] == "mixed":
                if missing := sorted(set(rel) - set(having)):
                    problems.append(f"{where}: {anchor!r} not in messages {missing}")
                if verbose:
                    print(f"  mixed {q['query']!r}: {len(rel)} relevant of the {len(having)} messages with {anchor!r}")
        if q["type"] in ("paraphrase", "mixed"):
            words = q["query"]
            if q["type"] == "mixed":
                words = re.sub(re.escape(q["anchor"]), " ", words, flags=re.I)
            for i in rel:
                if shared := shared_content(words, texts[i - 1]):
                    problems.append(f"{where}: shares {sorted(shared)} with message {i}")
            if q["type"] == "paraphrase" and q.get("target") not in rel:
                problems.append(f"{where}: target not among relevant")
            for i in ([q["target"]] if q["type"] == "paraphrase" else rel):
                dups = set(near_duplicates(texts, i))
                if q["type"] == "mixed":
                    dups &= set(containing(texts, q["anchor"]))
                if left := sorted(dups - set(rel)):
                    problems.append(f"{where}: near-duplicates {left} of {i} not labelled relevant")
    return problems


def load_queries() -> list[dict]:
    return json.loads(QUERIES.read_text(encoding="utf-8"))["queries"]


# -- the daemon ------------------------------------------------------------------------------


class Daemon:
    """`pocketembed serve` in its own process on a fresh data directory (models linked from the user's)."""

    def __init__(self, tmp: Path, model: str) -> None:
        from pocketembed import paths

        self.home = tmp / "home"
        self.home.mkdir()
        (self.home / "models").symlink_to(paths.models_dir(paths.home()))
        self.sock = tmp / "pe.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.log = open(tmp / "daemon.log", "w")
        env = dict(os.environ, POCKETEMBED_HOME=str(self.home), POCKETEMBED_POWER_SOURCE="psutil")
        env.pop("POCKETEMBED_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "pocketembed.cli", "serve", "--socket", str(self.sock),
                                      "--model", model], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        from pocketembed.ipc import Client, DaemonError

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start; see {tmp / 'daemon.log'}")
            if self.sock.exists():
                try:
                    with Client(self.endpoint, timeout=2) as c:
                        c.ping()
                    return
                except DaemonError:
                    pass
            time.sleep(0.1)

    def client(self, timeout: float = 300):
        from pocketembed.ipc import Client

        return Client(self.endpoint, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def index(daemon: Daemon, collection: str, texts: list[str], labels: list[str], model: str) -> float:
    from tqdm import tqdm

    t = time.perf_counter()
    with daemon.client() as c, tqdm(total=len(texts), unit="msg", desc=f"indexing {collection}", file=sys.stderr,
                                    mininterval=1, dynamic_ncols=True) as bar:
        for at in range(0, len(texts), BATCH):
            items = [{"id": at + i + 1, "text": s, "metadata": {"label": labels[at + i]}}
                     for i, s in enumerate(texts[at : at + BATCH])]
            c.index_add(collection, items, model=model, store_text=True)
            bar.update(len(items))
    return time.perf_counter() - t


def search_fn(c, collection: str, mode: str | None):
    if mode is None:
        return lambda q: c.search(collection, q, k=K)
    return lambda q: c.search(collection, q, k=K, mode=mode)


def available_modes(c, collection: str) -> tuple[list[str | None], str]:
    """The modes this client and daemon answer; [None] (the daemon's one search, vector) when neither knows ``mode``."""
    from pocketembed.ipc import DaemonError

    modes, notes = [], []
    for mode in MODES:
        try:
            c.search(collection, "probe 123", k=1, mode=mode)
            modes.append(mode)
        except TypeError:
            return [None], "Client.search has no `mode` argument yet: only the daemon's search (vectors) is measured"
        except DaemonError as e:
            notes.append(f"mode={mode!r}: {e}")
    if not modes:
        return [None], "the daemon refuses `mode` (" + "; ".join(notes) + "): only its search (vectors) is measured"
    return modes, "; ".join(notes)


def mode_name(mode: str | None) -> str:
    return "vector" if mode is None else mode


def query_cache(c) -> dict:
    """The daemon's query-vector LRU counters (hits, misses), if its stats report them."""
    def find(d):
        if isinstance(d, dict):
            if "query_cache" in d:
                return d["query_cache"]
            for v in d.values():
                if (r := find(v)) is not None:
                    return r
        return None
    return find(c.stats()) or {}


def run_queries(c, collection: str, modes: list, queries: list[str], repeat: int) -> tuple[dict, dict, str]:
    """Every query through every mode: (mode -> per-query hits, mode -> latencies in ms, a note on the cache).

    The daemon keeps recently embedded query texts in an LRU, so a query sent a second
    time (by another mode, or another pass) would not be embedded again. The timed
    calls therefore each send a text no call sent before: the query with 1, 2, 3 ...
    trailing spaces (neither the tokenizer nor a lexical index sees them; the hits
    are the same). The modes take turns query by query, so that the machine's noise
    hits all of them alike. The hits scored are those of the first pass.
    """
    fns = {m: search_fn(c, collection, m) for m in modes}
    for m in modes:  # warm-up, on texts the timed calls never send
        for q in queries[:5]:
            fns[m]("warm up " + q)
    hits: dict = {m: [None] * len(queries) for m in modes}
    lat: dict = {m: [] for m in modes}
    before = query_cache(c)
    turn = 0
    for r in range(repeat):
        for qi, q in enumerate(queries):
            order = modes[turn % len(modes):] + modes[: turn % len(modes)]
            turn += 1
            for m in order:
                text = q + " " * (1 + r * len(modes) + modes.index(m))
                t = time.perf_counter()
                res = fns[m](text)
                lat[m].append((time.perf_counter() - t) * 1000)
                if r == 0:
                    hits[m][qi] = res
    after = query_cache(c)
    note = ""
    if before and after:
        note = (f"query-vector cache during the timed calls: {after.get('hits', 0) - before.get('hits', 0)} hits, "
                f"{after.get('misses', 0) - before.get('misses', 0)} misses")
    return hits, lat, note


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v) + 0.5) - 1))]


def quality(queries: list[dict], hits: list[list[dict]]) -> dict[str, tuple[float, float, int]]:
    by: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for q, h in zip(queries, hits):
        rel = set(q["relevant"])
        ranks = [i + 1 for i, hit in enumerate(h[:K]) if hit["id"] in rel]
        rr = 1 / ranks[0] if ranks else 0.0
        for key in (q["type"], "overall"):
            by[key].append((1 if ranks else 0, rr))
    return {key: (statistics.mean(s for s, _ in v), statistics.mean(r for _, r in v), len(v)) for key, v in by.items()}


def matched_sides(hits: list[list[dict]]) -> str:
    """How often the top hit says it was found by each side (when the daemon reports ``matched``)."""
    counts: dict[str, int] = defaultdict(int)
    for h in hits:
        if h and "matched" in h[0]:
            counts["+".join(sorted(h[0]["matched"] or [])) or "-"] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def disk_sizes(home: Path, items: int) -> list[tuple[str, int]]:
    """Bytes per table/index (dbstat) over the daemon's SQLite files, biggest first."""
    rows: dict[str, int] = defaultdict(int)
    for db in sorted(home.rglob("*.db")):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
                rows[f"{db.name}:{name}"] += size
        except sqlite3.Error as e:
            print(f"  (dbstat on {db}: {e})")
        finally:
            conn.close()
    return sorted(rows.items(), key=lambda kv: -kv[1])


def is_lexical(table: str) -> bool:
    name = table.split(":", 1)[1].lower()
    return "fts" in name or "lex" in name or "trigram" in name


def varied(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` texts: the corpus once as it is, then again and again with two words swapped and " (round)" appended."""
    rng = random.Random(seed)
    out = []
    for j in range(n):
        r, base = divmod(j, len(texts))
        text = texts[base]
        if r:
            words = text.split()
            if len(words) > 1:
                a = rng.randrange(len(words) - 1)
                words[a], words[a + 1] = words[a + 1], words[a]
            text = " ".join(words) + f" ({r})"
        out.append(text)
    return out


def print_quality(results: dict, modes: list, label: str = "mode", width: int = 8) -> None:
    print(f"\nsuccess@{K} / MRR@{K} per query type")
    head = f"{label:<{width}}" + "".join(f"{t:>16}" for t in (*TYPES, "overall"))
    print(head)
    for m in modes:
        row = results[m]
        print(f"{mode_name(m):<{width}}" + "".join(f"{row[t][0]:>9.2f} / {row[t][1]:.2f}" for t in (*TYPES, "overall")))


# -- fusion candidates, replayed offline (--fusion-variants) -------------------------------------

RRF_K = 60
POOL = 50
"""Candidates per side for the rank- and score-based variants (the daemon's lexical side brings 50)."""
EXACT_GRID = (0.3, 0.6, 1.0)
HINT_GRID = (0.0, 0.06, 0.12, 0.25)


def collect_sides(c, collection: str, queries: list[str]) -> list[tuple[list, list]]:
    """Per query: the vector side's (id, cosine) best first, k=1000 of the rescored pool, and the lexical top 50."""
    out = []
    for q in queries:
        vec = c.search(collection, q, k=1000, rescore_multiplier=10, mode="vector")
        lex = c.search(collection, q, k=POOL, mode="lexical", with_text=True)
        out.append(([(h["id"], h["score"]) for h in vec], [(h["id"], h["score"], h["text"]) for h in lex]))
    return out


def matched_terms(query, text: str) -> list[str]:
    """The query's terms a text holds, as lexical.search reports them (a >= 4-digit term also as a number's prefix)."""
    from pocketembed.daemon.lexical import tokenize

    have = set(tokenize(text))
    digits = [d for d in have if d.isdigit() and d.isascii()]
    return [t for t in query.terms if t in have or (query.prefix(t) and any(d.startswith(t) for d in digits))]


def rrf(w_lex: float):
    def rank(vec, lex, side):
        score: dict = defaultdict(float)
        for r, (i, _) in enumerate(vec):
            score[i] += 1 / (RRF_K + r + 1)
        for r, (i, _, _) in enumerate(lex):
            score[i] += w_lex / (RRF_K + r + 1)
        return sorted(score, key=lambda i: -score[i])[:K]
    return rank


def minmax(alpha: float):
    """(1 − α) × the cosine and α × the BM25, each min-max scaled over its side's candidates (0 when absent)."""
    def scale(d: dict) -> dict:
        lo, hi = min(d.values(), default=0), max(d.values(), default=0)
        return {i: (v - lo) / (hi - lo) if hi > lo else 1.0 for i, v in d.items()}

    def rank(vec, lex, side):
        cos = scale({i: side["cos"].get(i, side["floor"]) for i in [*dict(vec[:POOL]), *(i for i, _, _ in lex)]})
        bm25 = scale({i: s for i, s, _ in lex})
        score = {i: (1 - alpha) * v + alpha * bm25.get(i, 0.0) for i, v in cos.items()}
        return sorted(score, key=lambda i: -score[i])[:K]
    return rank


def daemon_rule(exact: float, hint: float):
    """daemon/fusion.py's fuse with these two weights (query_weight decides which one a query gets)."""
    from pocketembed.daemon import fusion

    def rank(vec, lex, side):
        weight = exact if fusion.query_weight(side["query"]) == fusion.EXACT_WEIGHT else hint
        lexical = {i: side["matched"][i] for i, _, _ in lex}
        cosines = {i: side["cos"].get(i, side["floor"]) for i in lexical}
        return [f.id for f in fusion.fuse(dict(vec[:max(K, fusion.VECTOR_CANDIDATES)]), lexical, cosines,
                                          side["idfs"], weight, K)]
    return rank


def fusion_variants(queries: list[dict], texts: list[str], sides: list, daemon_hybrid: list | None) -> None:
    from pocketembed.daemon import fusion
    from pocketembed.daemon.lexical import parse_query, tokenize

    df: dict[str, int] = defaultdict(int)
    for t in texts:
        for term in set(tokenize(t)):
            df[term] += 1
    prepared = []
    for q, (vec, lex) in zip(queries, sides):
        query = parse_query(q["query"])
        prepared.append((vec, lex, {
            "query": query, "cos": dict(vec), "floor": vec[-1][1] if vec else 0.0,
            "matched": {i: matched_terms(query, text or "") for i, _, text in lex},
            "idfs": {t: fusion.idf(len(texts), df.get(t, 0)) for t in query.terms}}))
    floored = sum(i not in side["cos"] for _, lex, side in prepared for i, _, _ in lex)
    methods = {"vector (replayed)": lambda vec, lex, side: [i for i, _ in vec[:K]],
               "lexical (replayed)": lambda vec, lex, side: [i for i, _, _ in lex[:K]],
               "RRF k=60": rrf(1.0), "RRF lexical×0.5": rrf(0.5), "RRF lexical×0.3": rrf(0.3),
               "minmax α=0.5": minmax(0.5), "minmax α=0.3": minmax(0.3)}
    for e in EXACT_GRID:
        for h in HINT_GRID:
            methods[f"rule E={e} H={h}" + (" *" if (e, h) == (fusion.EXACT_WEIGHT, fusion.HINT_WEIGHT) else "")] = \
                daemon_rule(e, h)
    ranked = {name: [rank(*p) for p in prepared] for name, rank in methods.items()}
    results = {name: quality(queries, [[{"id": i} for i in r] for r in lists]) for name, lists in ranked.items()}
    same = ""
    if daemon_hybrid is not None:
        results["daemon hybrid (this run)"] = quality(queries, daemon_hybrid)
        mine = ranked[next(n for n in ranked if n.endswith(" *"))]
        same = (f"; the replayed * rule's top {K} is the daemon's on "
                f"{sum(r == [h['id'] for h in d] for r, d in zip(mine, daemon_hybrid))} of {len(queries)} queries")
    print(f"\nfusion variants, replayed offline on both sides' candidates ({len(queries)} queries; "
          f"{floored} lexical candidates outside the vector top 1,000 took its last cosine; "
          f"* = daemon/fusion.py's constants{same})")
    print_quality(results, list(results), label="fusion", width=26)
    vec_mrr = results["vector (replayed)"]["paraphrase"][1]
    rules = [n for n in results if n.startswith("rule ")]
    ok = [n for n in rules if results[n]["paraphrase"][1] >= vec_mrr - 0.03]
    if ok:
        best = max(ok, key=lambda n: (results[n]["overall"][0], results[n]["overall"][1]))
        print(f"  best rule with paraphrase MRR within 0.03 of vector's {vec_mrr:.2f}: {best} "
              f"(overall s@{K} {results[best]['overall'][0]:.2f}, MRR {results[best]['overall'][1]:.2f})")


def print_latency(lat: dict, modes: list, what: str) -> None:
    print(f"\nsearch latency, {what} (client round trip, query embedding included)")
    print(f"{'mode':<8}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'× vector p50':>14}")
    base = statistics.median(lat[modes[0]])
    for m in modes:
        p50 = statistics.median(lat[m])
        print(f"{mode_name(m):<8}{len(lat[m]):>6}{p50:>9.1f}{pct(lat[m], 99):>9.1f}{p50 / base:>14.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2:q8_0")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the queries for latency (quality: the first)")
    ap.add_argument("--items", type=int, default=0, help="also measure latency and size on a collection this large")
    ap.add_argument("--check", action="store_true", help="only check the query set's labels")
    ap.add_argument("--show-misses", action="store_true", help="list the queries each mode misses")
    ap.add_argument("--fusion-variants", action="store_true",
                    help="also replay other fusion rules offline on both sides' candidates (see above)")
    args = ap.parse_args()

    messages = load_messages()
    texts = [m.text for m in messages]
    labels = [m.label for m in messages]
    queries = load_queries()
    counts = {t: sum(q["type"] == t for q in queries) for t in TYPES}
    problems = check_queries(queries, texts, verbose=args.check)
    print(f"query set {QUERIES.name}: {len(queries)} queries ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
          f"{sum(len(q['relevant']) for q in queries)} relevant ids; labels checked: "
          f"{'ok' if not problems else f'{len(problems)} problems'}")
    for p in problems:
        print("  " + p)
    if args.check or problems:
        sys.exit(1 if problems else 0)

    print(f"CPU: {cpu_model()}")
    print(f"model {args.model}; corpus {len(texts):,} SMS")
    qtexts = [q["query"] for q in queries]
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), args.model)
        try:
            secs = index(d, "sms", texts, labels, args.model)
            print(f"indexed {len(texts):,} SMS in {secs:.0f} s")
            with d.client() as c:
                modes, note = available_modes(c, "sms")
                if note:
                    print(f"note: {note}")
                hits, lat, cache_note = run_queries(c, "sms", modes, qtexts, args.repeat)
                raw_sides = collect_sides(c, "sms", qtexts) if args.fusion_variants else None
        finally:
            d.stop()
    results = {m: quality(queries, hits[m]) for m in modes}
    print_quality(results, modes)
    if len(modes) > 1 and all([x["id"] for x in hits[m][i]] == [x["id"] for x in hits[modes[0]][i]]
                              for m in modes for i in range(len(queries))):
        print("  WARNING: every mode returned the same hits for every query: the daemon accepts `mode` but does "
              "not act on it (yet)")
    for m in modes:
        if sides := matched_sides(hits[m]):
            print(f"  {mode_name(m)}: top hit matched by {sides}")
    if args.show_misses:
        for m in modes:
            print(f"\nmissed by {mode_name(m)} (no relevant in the top {K}):")
            for q, h in zip(queries, hits[m]):
                if not set(q["relevant"]) & {x["id"] for x in h[:K]}:
                    print(f"  {q['type']:<10} {q['query']!r} -> top {[x['id'] for x in h[:3]]}")
    print_latency(lat, modes, f"{len(texts):,} SMS, {args.repeat} × {len(queries)} queries per mode")
    if cache_note:
        print(f"  {cache_note}")
    if raw_sides is not None:
        fusion_variants(queries, texts, raw_sides, hits.get("hybrid"))

    if args.items:
        big = varied(texts, args.items)
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(Path(tmp), args.model)
            try:
                secs = index(d, "big", big, [labels[j % len(texts)] for j in range(len(big))], args.model)
                print(f"\nindexed {len(big):,} items (the SMS repeated with variations) in {secs:.0f} s")
                with d.client() as c:
                    modes, note = available_modes(c, "big")
                    _, lat, cache_note = run_queries(c, "big", modes, qtexts, args.repeat)
                    info = [x for x in c.collections() if x.get("name") == "big"]
                print_latency(lat, modes, f"{len(big):,} items, {args.repeat} × {len(queries)} queries per mode")
                if cache_note:
                    print(f"  {cache_note}")
                if info:
                    sizes = {k: v for k, v in info[0].items() if "byte" in k or "size" in k}
                    print(f"collections.list sizes: {sizes}")
                tables = disk_sizes(d.home, len(big))
            finally:
                d.stop()
        total = sum(s for _, s in tables)
        lex = sum(s for t, s in tables if is_lexical(t))
        print(f"\nsize on disk (dbstat), {len(big):,} items, store_text on")
        print(f"{'table / index':<48}{'MB':>9}{'bytes/item':>12}")
        for t, s in tables:
            if s >= 0.001 * total:
                print(f"{t:<48}{s / 1e6:>9.1f}{s / len(big):>12.0f}")
        print(f"{'lexical tables (fts/lex/trigram in the name)':<48}{lex / 1e6:>9.1f}{lex / len(big):>12.0f}")
        print(f"{'all the rest (vectors, text, ids, metadata)':<48}{(total - lex) / 1e6:>9.1f}"
              f"{(total - lex) / len(big):>12.0f}")


if __name__ == "__main__":
    main()
