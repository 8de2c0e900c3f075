"""The scheduler seen through the real socket: merging, lanes, backpressure, deadlines."""

import asyncio

import numpy as np
import pytest

from conftest import fresh_home
from daemon_proc import DaemonProcess, DecodeGate
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


async def until_stats(client: AsyncClient, predicate, what: str, timeout: float = 120) -> dict:
    """Poll the daemon's stats until ``predicate(stats)``; the timeout only guards against a wedge."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate(stats := await client.stats()):
        assert loop.time() < deadline, f"{what}: not reached within {timeout} s: {stats['scheduler']}"
        await asyncio.sleep(0.01)
    return stats


def lane_stats(stats: dict, name: str = "interactive") -> dict:
    return stats["scheduler"]["lanes"][name]


def fan_out(endpoint: str, n_clients: int, batches: list[list[str]], gate: DecodeGate | None = None,
            held=None) -> tuple[dict, list, dict]:
    """Send every batch at once, spread over ``n_clients`` connections; stats before and after.

    With a ``gate`` (the daemon's decodes held), it is opened only once
    ``held(before, stats)`` holds: the requests are where the test wants them
    (queued, or refused) whatever this machine's speed.
    """

    async def main():
        clients = [AsyncClient(endpoint, timeout=300) for _ in range(n_clients)]
        try:
            before = await clients[0].stats()
            pending = asyncio.gather(*(clients[i % n_clients].embed(b, truncate=True) for i, b in enumerate(batches)),
                                     return_exceptions=True)
            if gate is not None:
                await until_stats(clients[0], lambda s: held(before, s), "requests held before the decodes")
                gate.release()
            results = await pending
            after = await clients[0].stats()
        finally:
            for c in clients:
                await c.close()
        return before, results, after

    return asyncio.run(main())


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_single_text_requests_from_many_clients_share_decodes(gated_daemon, engines, texts):
    d, gate = gated_daemon()
    picks = texts[:96]
    # 16 clients x 6 single-text requests, all queued while the decodes are held (however fast
    # this machine decodes, none finishes before the others arrive); then they run. Six per
    # connection: a decode that finishes 32 requests at once sends each connection at most six
    # replies, under the daemon's per-connection reply queue (REPLY_HWM, 8).
    before, results, after = fan_out(d.endpoint, 16, [[t] for t in picks], gate,
                                     held=lambda b, s: lane_stats(s)["queued_texts"] == 96)
    lost = [r for r in results if not isinstance(r, np.ndarray)]
    assert not lost, (f"{len(lost)} requests without vectors, {after.get('replies_dropped')} replies dropped", lost[:3])
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


def test_interactive_overtakes_queued_background_work(gated_daemon, texts):
    d, gate = gated_daemon()

    async def main():
        bulk = AsyncClient(d.endpoint, timeout=300)
        user = AsyncClient(d.endpoint, timeout=300)
        done: list[str] = []

        async def run(client, name, batch, priority):
            await client.embed(batch, priority=priority, truncate=True)
            done.append(name)

        try:
            background = [asyncio.create_task(run(bulk, f"bg{i}", texts[i * 16:(i + 1) * 16], "background"))
                          for i in range(30)]
            # The background requests are queued and both workers hold one of their decodes.
            stats = await until_stats(user, lambda s: lane_stats(s, "background")["queued_texts"] == 480
                                      and s["scheduler"]["busy_workers"] == 2, "background queued and running")
            interactive = asyncio.create_task(run(user, "interactive", texts[1000:1002], None))
            await until_stats(user, lambda s: lane_stats(s)["queued_texts"] == 2, "the interactive request queued")
            gate.release()
            await interactive
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


@pytest.fixture
def small_gated(gated_daemon):
    """The small daemon's settings, its decodes held at a gate."""
    return gated_daemon("--workers", "1", env={"POCKETEMBED_QUEUE_TEXTS": "40"})


def test_overload_gets_busy_and_accepted_requests_are_whole(small_gated, engines, texts):
    d, gate = small_gated
    batches = [texts[i * 4:(i + 1) * 4] for i in range(60)]  # 240 texts against a 40-text queue
    # Nothing finishes while the decodes are held: once all 60 are queued or refused, exactly 40 texts
    # (10 requests) fit and the other 50 are busy.
    # 12 connections, 5 requests each: a connection's burst of busy replies stays under the daemon's
    # per-connection reply queue (REPLY_HWM, 8), so this tests the scheduler's bound, not ZeroMQ's.
    before, results, after = fan_out(d.endpoint, 12, batches, gate,
                                     held=lambda b, s: lane_stats(s)["queued_requests"]
                                     + lane_stats(s)["rejected_busy"] - lane_stats(b)["rejected_busy"] == 60)
    busy = [r for r in results if isinstance(r, Busy)]
    ok = [(i, r) for i, r in enumerate(results) if isinstance(r, np.ndarray)]
    assert len(busy) + len(ok) == len(batches), [r for r in results if not isinstance(r, (Busy, np.ndarray))]
    assert (len(busy), len(ok)) == (50, 10)
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


def test_request_past_its_deadline_is_not_computed(small_gated, texts):
    d, gate = small_gated

    async def main():
        async with AsyncClient(d.endpoint, timeout=300) as c:
            before = await c.stats()
            # 36 long texts hold the only worker (its decode waits at the gate) ...
            long = asyncio.create_task(c.embed(texts[:36], truncate=True))
            await until_stats(c, lambda s: s["scheduler"]["busy_workers"] == 1, "the long request's decode held")
            # ... so these, allowed 30 ms, wait in the queue past their deadline ...
            late = asyncio.gather(*(c.call("embed", {"texts": [t], "timeout_ms": 30}, timeout=60)
                                    for t in texts[100:103]), return_exceptions=True)
            await until_stats(c, lambda s: lane_stats(s)["queued_requests"] == 4, "the late requests queued")
            await asyncio.sleep(0.06)  # a sleep is never shorter: their 30 ms are over when the worker is free
            gate.release()
            late = await late
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
