"""Model management through the real daemon: two models, unload, eviction, keep_alive, corrupt files."""

import asyncio
import os
import shutil
import threading
import time

import numpy as np
import pytest

from conftest import fresh_home, SAME_EMBEDDING_COS, assert_same_embedding, mappings_rss_kb, row_cosines, run_cli
from daemon_proc import DaemonProcess, wait_until
from pocketembed.daemon.models import parse_keep_alive
from pocketembed.errors import InvalidInput
from pocketembed.ipc import AsyncClient, ModelError

Q8, Q4 = "all-minilm-l6-v2:q8_0", "all-minilm-l6-v2:q4_0"
SMS = ["Ok lar... Joking wif u oni...", "Free entry in 2 a wkly comp to win FA Cup final tkts",
       "U dun say so early hor... U c already then say...", "Nah I don't think he goes to usf"]


def loaded(client) -> set[str]:
    return {m["name"] for m in client.models() if m["loaded"]}


def test_keep_alive_parsing():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive("90s") == 90
    assert parse_keep_alive(0) == 0 and parse_keep_alive(-1) < 0 and parse_keep_alive("-1") < 0 and parse_keep_alive("45") == 45
    for bad in ("soon", "5 minutes", True, None, [1]):
        with pytest.raises(InvalidInput):
            parse_keep_alive(bad)


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    d = DaemonProcess(fresh_home(home), tmp_path_factory.mktemp("models") / "pe.sock", "--model", Q8, "--model", Q4).wait_ready()
    yield d
    assert d.stop() == 0


def test_two_models_at_once(daemon, engines):
    with daemon.client() as c:
        assert loaded(c) >= {Q8, Q4}
        a = c.embed(SMS, model=Q8)
        b = c.embed(SMS, model=Q4)
        assert_same_embedding(a, engines["q8_0"].embed(SMS))
        assert_same_embedding(b, engines["q4_0"].embed(SMS))
        assert row_cosines(a, b).min() < SAME_EMBEDDING_COS  # the tolerance tells the two models apart
        stats = c.stats()
    assert {Q8, Q4} <= set(stats["models"]) and stats["memory"]["used_bytes"] > 40e6


def test_unload_while_requests_are_queued(gated_daemon, engines):
    """The decodes are held, so the ten requests are still queued when the unload comes, on any machine."""
    d, gate = gated_daemon("--model", Q8, "--model", Q4)
    texts = [f"message number {i} about dinner plans and the weather" for i in range(200)]

    async def main():
        async with AsyncClient(d.endpoint, timeout=300) as c:
            queued = [asyncio.create_task(c.embed(texts[i:i + 20], model=Q4)) for i in range(0, 200, 20)]
            while (await c.stats())["scheduler"]["lanes"]["interactive"]["queued_texts"] < 200:
                await asyncio.sleep(0.01)  # the I/O thread has them all (a wedge ends in the client's timeout)
            unload = asyncio.create_task(c.call("models.unload", {"model": Q4}, timeout=300))
            # Until the control thread has begun the unload, a request for Q4 is still accepted
            # (and served: it was queued before the unload); from then on it is refused.
            before_unload = []
            while True:
                probe = asyncio.create_task(c.embed(["too late"], model=Q4))
                done, _ = await asyncio.wait([probe], timeout=0.05)
                if done and isinstance(probe.exception(), ModelError):
                    late = probe.exception()
                    break
                assert not done, probe.result()  # nothing is decoded while the gate is shut
                before_unload.append(probe)
                assert len(before_unload) < 2000, "the unload never began"
            await asyncio.sleep(0.1)  # a sleep is never shorter: time enough for an unload that did not wait
            assert not unload.done()  # it waits for the queued requests, which wait at the gate
            gate.release()
            results = await asyncio.gather(*queued, return_exceptions=True)
            early = await asyncio.gather(*before_unload, return_exceptions=True)
            return await unload, late, results, early

    unloaded, late, results, early = asyncio.run(main())
    assert unloaded == {"model": Q4, "loaded": False}
    # every request queued before the unload was answered with its vectors
    assert all(isinstance(r, np.ndarray) and r.shape == (20, 384) for r in results), results
    assert all(isinstance(r, np.ndarray) and r.shape == (1, 384) for r in early), early
    # merged across requests into other decodes than the in-process engine's: the promise is cosine > 0.999
    assert_same_embedding(np.vstack(results), engines["q4_0"].embed(texts), min_cos=0.999)
    # a request that arrived while it drained got a clear error
    assert late.code == "model_unloading", late
    with d.client() as c:
        assert Q4 not in loaded(c)  # the queued requests ran before it went, not on an on-demand reload
        c.embed(["back again"], model=Q4)  # on-demand reload after the unload
        assert Q4 in loaded(c)


def test_models_load_and_unload_from_the_cli(daemon, home):
    sock = str(daemon.socket_path)
    r = run_cli("models", "unload", Q4, "--socket", sock, home=home)
    assert r.returncode == 0 and "unloaded" in r.stdout
    r = run_cli("models", "unload", Q4, "--socket", sock, home=home)
    assert r.returncode == 1 and "error[model_not_loaded]" in r.stderr
    r = run_cli("models", "load", Q4, "--keep-alive", "-1", "--socket", sock, home=home)
    assert r.returncode == 0 and "loaded" in r.stdout and "forever" in r.stdout


def test_keep_alive_zero_unloads_after_the_request(daemon):
    """Through the socket: a request's keep_alive and a load's keep_alive reach the registry, which
    unloads once they pass (how long "not before" is, the registry's own clock test below shows)."""
    with daemon.client() as c:
        c.embed(["short lived"], model=Q4, keep_alive=0)
        wait_until(lambda: Q4 not in loaded(c), "q4_0 unloaded after its keep_alive=0 request")
        c.embed(["stay"], model=Q8)  # its own keep_alive (5 min) starts again now
        res = c.load(Q4, keep_alive="1s")
        assert res["newly_loaded"] and res["keep_alive_s"] == 1
        wait_until(lambda: Q4 not in loaded(c), "q4_0 unloaded 1 s after its load")
        q8 = {m["name"]: m for m in c.models()}[Q8]
        assert q8["loaded"] and q8["keep_alive_s"] == 300  # the other model kept its own keep_alive


class FakeClock:
    """Monotonic seconds that move only when the test moves them; counts the keep-alive thread's reads."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.reaper_reads = 0
        self._cv = threading.Condition()

    def __call__(self) -> float:
        with self._cv:
            if threading.current_thread().name == "pe-keepalive":
                self.reaper_reads += 1
                self._cv.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self._cv:
            self.now += seconds

    def acted_on(self, registry) -> None:
        """Return once the keep-alive thread has acted on the clock as it reads now.

        Woken twice (``recheck``), it reads the clock twice: the second read comes only
        after whatever the first one made due (unloads, page hand-backs) is done.
        """
        for _ in range(2):
            with self._cv:
                target = self.reaper_reads + 1
            registry.recheck()
            with self._cv:
                assert self._cv.wait_for(lambda: self.reaper_reads >= target, timeout=60), "the keep-alive thread is stuck"


def test_keep_alive_counts_idle_time_on_the_registry_clock(home):
    """Each model unloads once idle past its own keep_alive, and not a moment before: the registry's
    clock is a fake one here, so "before" is a clock reading, not a race with the keep-alive thread."""
    from pocketembed.daemon.models import ModelRegistry

    clock = FakeClock()
    reg = ModelRegistry(home, keep_alive=120.0, threads=1, contexts=1, budget_bytes=1 << 30, clock=clock)
    reg.start()
    try:
        reg.load(Q8)
        reg.load(Q4, keep_alive=30)
        clock.advance(29.9)
        clock.acted_on(reg)
        assert reg.loaded() == sorted([Q8, Q4])  # idle 29.9 s of 30 s: still loaded
        assert reg.describe()[Q4]["expires_in_s"] == 0.1 and reg.describe()[Q8]["expires_in_s"] == 90.1
        reg.acquire(Q8)
        reg.release(Q8)  # a use: q8_0 idles from now on
        clock.advance(0.2)
        clock.acted_on(reg)
        assert reg.loaded() == [Q8]  # q4_0 past its 30 s; q8_0 0.2 s into its 120 s
        clock.advance(119.7)
        clock.acted_on(reg)
        assert reg.loaded() == [Q8]  # 119.9 s idle
        clock.advance(0.2)
        clock.acted_on(reg)
        assert reg.loaded() == []
    finally:
        reg.close()


def test_file_pages_go_back_after_idle_bulk_work_on_the_registry_clock(home):
    """The hand-back decision of the test below without its sleeps: a few queries never trigger it,
    a bulk job's tokens do, and only once the model has idled ``release_after`` on the registry's clock."""
    from pocketembed.daemon.models import ModelRegistry
    from pocketembed.sms import load_sms

    clock = FakeClock()
    reg = ModelRegistry(home, keep_alive=-1, threads=1, contexts=1, budget_bytes=1 << 30, clock=clock,
                        release_after=2.0, release_tokens=2000)
    reg.start()
    try:
        reg.load(Q8)
        engine = reg.acquire(Q8)
        calls = []
        real = engine.release_file_pages
        engine.release_file_pages = lambda: calls.append(clock.now) or real()
        engine.embed(SMS)  # a few queries: ~60 tokens
        reg.release(Q8)
        clock.advance(10)
        clock.acted_on(reg)
        assert calls == []
        reg.acquire(Q8)
        engine.embed(load_sms()[:200], truncate=True)  # a bulk job's worth: past the 2,000 tokens
        reg.release(Q8)
        clock.advance(1.9)
        clock.acted_on(reg)
        assert calls == []  # idle 1.9 s of 2 s
        clock.advance(0.2)
        clock.acted_on(reg)
        assert len(calls) == 1 and engine.tokens_since_release == 0
        clock.advance(10)
        clock.acted_on(reg)
        assert len(calls) == 1  # once per bulk job
    finally:
        reg.close()


def test_bad_keep_alive_is_invalid_input(daemon):
    with daemon.client() as c:
        with pytest.raises(Exception) as e:
            c.embed(["x"], keep_alive="whenever")
    assert e.value.code == "invalid_input"


def test_eviction_under_a_small_budget(home, tmp_path):
    # q8_0 needs ~41 MB and q4_0 ~34 MB by the registry's estimate: a 60 MB budget holds one.
    d = DaemonProcess(fresh_home(home), tmp_path / "pe.sock", "--model", Q8, "--memory-budget-mb", "60").wait_ready()
    try:
        with d.client() as c:
            assert loaded(c) == {Q8}
            c.embed(SMS, model=Q4)  # loads q4_0 on demand, evicting the idle q8_0
            assert loaded(c) == {Q4}
            c.embed(SMS, model=Q8)
            assert loaded(c) == {Q8}
    finally:
        assert d.stop() == 0
    d = DaemonProcess(fresh_home(home), tmp_path / "pe2.sock", "--model", Q8, "--memory-budget-mb", "30").wait_ready()
    try:
        with d.client() as c:
            assert loaded(c) == set()  # q8_0 does not fit at all; the daemon still runs
            for name in (Q8, Q4):
                with pytest.raises(ModelError) as e:
                    c.load(name)
                assert e.value.code == "memory_budget" and "memory budget is 31 MB" in e.value.message
            assert c.ping()["pong"]
    finally:
        assert d.stop() == 0


def test_corrupt_model_is_refused_and_the_daemon_keeps_serving(home, tmp_path, engines):
    # A private data directory holding a good q8_0 and a damaged q4_0.
    root = tmp_path / "home"
    shutil.copytree(home / "models", root / "models")
    q4 = next((root / "models").glob("*q4_0*.gguf"))
    with open(q4, "r+b") as f:
        f.seek(os.path.getsize(q4) // 2)
        f.write(b"\0" * 4096)
    d = DaemonProcess(root, tmp_path / "pe.sock", "--model", Q8).wait_ready()
    try:
        with d.client() as c:
            for attempt in (lambda: c.load(Q4), lambda: c.embed(SMS, model=Q4)):
                with pytest.raises(ModelError) as e:
                    attempt()
                assert e.value.code == "model_corrupt" and "sha256" in e.value.message
            assert_same_embedding(c.embed(SMS, model=Q8), engines["q8_0"].embed(SMS))
            q4.unlink()
            with pytest.raises(ModelError) as e:
                c.load(Q4)
            assert e.value.code == "model_not_prepared"
            assert loaded(c) == {Q8}
    finally:
        assert d.stop() == 0


def test_on_demand_off_and_per_model_settings(home, tmp_path, engines):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model."{Q4}"]\nquery_prefix = "search_query: "\nthreads = 1\nkeep_alive = -1\n')
    d = DaemonProcess(fresh_home(home), tmp_path / "pe.sock", "--model", Q8, "--no-on-demand", "--config", str(cfg)).wait_ready()
    try:
        with d.client() as c:
            with pytest.raises(ModelError) as e:
                c.embed(SMS, model=Q4)
            assert e.value.code == "model_not_loaded" and "pocketembed models load" in e.value.message
            c.load(Q4)
            info = {m["name"]: m for m in c.models()}[Q4]
            assert info["keep_alive_s"] < 0 and info["expires_in_s"] is None
            got = c.embed(SMS, model=Q4, input_type="query")
            assert_same_embedding(got, engines["q4_0"].embed(["search_query: " + t for t in SMS]))
            doc = c.embed(SMS, model=Q4, input_type="document")
            assert_same_embedding(doc, engines["q4_0"].embed(SMS))
            assert row_cosines(got, doc).max() < SAME_EMBEDDING_COS  # a missing prefix would be caught
    finally:
        assert d.stop() == 0


def _model_file_rss_kb(pid: int, path) -> int:
    return sum(mappings_rss_kb(path, pid).values())


def test_model_file_pages_go_back_after_a_bulk_job_not_after_queries(home, tmp_path, engines):
    """The engine hands the model file's pages back at load; a bulk job's decodes map much of it
    in again, and the daemon hands it back once the model has idled ~2 s after 20,000+ tokens.
    A few queries stay below that count and keep their pages (re-faulting them costs latency)."""
    from pocketembed.sms import load_sms

    path, size_kb = engines["q8_0"].path, engines["q8_0"].path.stat().st_size / 1024
    d = DaemonProcess(fresh_home(home), tmp_path / "pe.sock", "--model", Q8).wait_ready()
    try:
        pid = d.proc.pid
        assert _model_file_rss_kb(pid, path) < size_kb * 0.1  # handed back at load
        with d.client() as c:
            c.embed(SMS, model=Q8)
            time.sleep(3)
            after_queries = _model_file_rss_kb(pid, path)
            assert after_queries > 0  # the pages the decodes read came back...
            assert _model_file_rss_kb(pid, path) >= after_queries  # ...and stay: not a bulk job's worth
            texts = load_sms()[:1200]  # ~25 tokens each: past the 20,000
            during = 0
            for s in range(0, len(texts), 64):
                c.embed(texts[s:s + 64], model=Q8, truncate=True)
                # The peak over the job: a reading after the last request alone could come after the
                # hand-back, were this process held up for the 2 s idle time (a loaded machine).
                during = max(during, _model_file_rss_kb(pid, path))
            wait_until(lambda: _model_file_rss_kb(pid, path) < size_kb * 0.1, "the file's pages handed back after the bulk job")
            released = _model_file_rss_kb(pid, path)
            assert released < size_kb * 0.1 <= during, (during, released, size_kb)
            assert_same_embedding(np.asarray(c.embed(SMS, model=Q8)), engines["q8_0"].embed(SMS))
    finally:
        assert d.stop() == 0
