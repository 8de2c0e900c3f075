"""The scheduler seen through the real socket: merging, lanes, backpressure, deadlines."""

import asyncio

import numpy as np
import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess
from pocketembed.ipc import AsyncClient, Busy, DaemonTimeout
from pocketembed.sms import load_sms

MODEL = "all-minilm-l6-v2:q8_0"


@pytest.fixture(scope="module")
def texts():
    return load_sms()


@pytest.fixture(scope="module")
def daemon(home, tmp_path_factory):
    d = DaemonProcess(fresh_home(home), tmp_path_factory.mktemp("sched") / "pe.sock").wait_ready()
    yield d
    assert d.stop() == 0


def fan_out(endpoint: str, n_clients: int, batches: list[list[str]]) -> tuple[dict, list, dict]:
    """Send every batch at once, spread over ``n_clients`` connections; stats before and after."""

    async def main():
        clients = [AsyncClient(endpoint, timeout=300) for _ in range(n_clients)]
        try:
            before = await clients[0].stats()
            results = await asyncio.gather(*(clients[i % n_clients].embed(b, truncate=True) for i, b in enumerate(batches)),
                                           return_exceptions=True)
            after = await clients[0].stats()
        finally:
            for c in clients:
                await c.close()
        return before, results, after

    return asyncio.run(main())


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_single_text_requests_from_many_clients_share_decodes(daemon, engines, texts):
    picks = texts[:96]
    # 4 clients x 24 single-text requests, all in flight at once.
    before, results, after = fan_out(daemon.endpoint, 4, [[t] for t in picks])
    got = np.vstack(results)
    want = engines["q8_0"].embed(picks, truncate=True)
    assert got.shape == (96, 384)
    # Each request got its own text's vector back. (Not bit-equal: a decode of
    # under 32 tokens runs llama.cpp's q8_0 kernels, a larger one runs BLAS sgemm.)
    assert cos(got, want).min() > 0.999  # PROTOCOL.md: merged batches agree to cosine > 0.999 (BLAS vs quantized kernels)
    assert (np.argmax(got @ want.T, axis=1) == np.arange(96)).all()
    decodes = after["scheduler"]["decodes"] - before["scheduler"]["decodes"]
    assert decodes < 96 / 3, f"{decodes} decodes for 96 requests: requests were not merged"
    assert after["scheduler"]["batch_texts"]["max"] > 1
    lane = after["scheduler"]["lanes"]["interactive"]
    assert lane["completed"] - before["scheduler"]["lanes"]["interactive"]["completed"] == 96
    assert set(lane["latency_ms"]) == {"p50", "p90", "p99"}


def test_interactive_overtakes_queued_background_work(daemon, texts):
    async def main():
        bulk = AsyncClient(daemon.endpoint, timeout=300)
        user = AsyncClient(daemon.endpoint, timeout=300)
        done: list[str] = []

        async def run(client, name, batch, priority):
            await client.embed(batch, priority=priority, truncate=True)
            done.append(name)

        try:
            background = [asyncio.create_task(run(bulk, f"bg{i}", texts[i * 16:(i + 1) * 16], "background"))
                          for i in range(30)]
            await asyncio.sleep(0.3)  # the background requests are queued and running
            stats = await user.stats()
            await run(user, "interactive", texts[1000:1002], None)
            await asyncio.gather(*background)
        finally:
            await bulk.close()
            await user.close()
        return done, stats

    done, stats = asyncio.run(main())
    assert stats["queue_depth"]["background"] > 0
    position = done.index("interactive")
    # Queued behind 30 background requests (480 texts), it finished after at most a few of them.
    assert position <= 6, f"interactive request finished {position}th of 31"


def test_background_priority_is_validated(daemon):
    async def main():
        async with AsyncClient(daemon.endpoint) as c:
            await c.embed(["hi"], priority="urgent")

    with pytest.raises(Exception) as e:
        asyncio.run(main())
    assert getattr(e.value, "code", None) == "invalid_input"


@pytest.fixture(scope="module")
def small_daemon(home, tmp_path_factory):
    """A daemon with a tiny interactive queue (40 texts) and one worker."""
    d = DaemonProcess(fresh_home(home), tmp_path_factory.mktemp("small") / "pe.sock", "--workers", "1",
                      env={"POCKETEMBED_QUEUE_TEXTS": "40"}).wait_ready()
    yield d
    assert d.stop() == 0


def test_overload_gets_busy_and_accepted_requests_are_whole(small_daemon, engines, texts):
    batches = [texts[i * 4:(i + 1) * 4] for i in range(60)]  # 240 texts against a 40-text queue
    before, results, after = fan_out(small_daemon.endpoint, 3, batches)
    busy = [r for r in results if isinstance(r, Busy)]
    ok = [(i, r) for i, r in enumerate(results) if isinstance(r, np.ndarray)]
    assert len(busy) + len(ok) == len(batches), [r for r in results if not isinstance(r, (Busy, np.ndarray))]
    assert busy and ok
    assert all(b.details["retry_after_ms"] > 0 for b in busy)
    for i, vecs in ok:
        want = engines["q8_0"].embed(batches[i], truncate=True)
        assert cos(vecs, want).min() > 0.999
    lane_b, lane_a = before["scheduler"]["lanes"]["interactive"], after["scheduler"]["lanes"]["interactive"]
    assert lane_a["completed"] - lane_b["completed"] == len(ok)
    assert lane_a["rejected_busy"] - lane_b["rejected_busy"] == len(busy)
    # Nothing accepted was computed twice or dropped: exactly the accepted texts were decoded.
    decoded = after["scheduler"]["decoded_texts"] - before["scheduler"]["decoded_texts"]
    assert decoded == 4 * len(ok)
    assert lane_a["queued_texts"] == 0


def test_request_past_its_deadline_is_not_computed(small_daemon, texts):
    async def main():
        async with AsyncClient(small_daemon.endpoint, timeout=300) as c:
            before = await c.stats()
            # 36 long texts fill the only worker for a while ...
            long = asyncio.create_task(c.embed(texts[:36], truncate=True))
            await asyncio.sleep(0.05)
            # ... so these, allowed 30 ms, expire in the queue.
            late = await asyncio.gather(*(c.call("embed", {"texts": [t], "timeout_ms": 30}, timeout=60)
                                          for t in texts[100:103]), return_exceptions=True)
            await long
            after = await c.stats()
        return before, late, after

    before, late, after = asyncio.run(main())
    assert all(isinstance(r, DaemonTimeout) and r.code == "timeout" for r in late), late
    lane_b, lane_a = before["scheduler"]["lanes"]["interactive"], after["scheduler"]["lanes"]["interactive"]
    assert lane_a["expired"] - lane_b["expired"] == 3
    assert after["scheduler"]["decoded_texts"] - before["scheduler"]["decoded_texts"] == 36


def test_a_request_larger_than_the_lane_is_too_large_not_busy(small_daemon, texts):
    async def main():
        async with AsyncClient(small_daemon.endpoint) as c:
            await c.embed(texts[:41])

    with pytest.raises(Exception) as e:
        asyncio.run(main())
    assert getattr(e.value, "code", None) == "too_large"
