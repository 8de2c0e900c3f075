"""The scheduling policy, model-free and fast: batching.py's pure functions, and the Scheduler run
in-process on a fake engine source (the EngineSource protocol the model registry implements).

The daemon-level tests (test_scheduler.py) show the same behaviour through a real model and socket;
these pin the rules themselves, on any CPU, in well under a second.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from pocketembed.daemon import batching
from pocketembed.daemon.embedding import Embedder
from pocketembed.daemon.scheduler import BACKGROUND, INTERACTIVE, EmbedTask, LaneConfig, Scheduler, SchedulerConfig
from pocketembed.errors import Busy, Expired, InvalidInput, TextTooLong, TooLarge


@dataclass
class T:
    """A task as the policy sees it."""

    model: str
    lengths: list[int]
    state: str = "ready"
    taken: int = 0
    deadline: float | None = None
    limits: tuple[int, int] = (1 << 30, 1 << 30)
    est_tokens: int = 0
    texts: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.texts = ["x"] * len(self.lengths)
        self.tokens = [[0] * n for n in self.lengths]
        self.est_tokens = self.est_tokens or sum(self.lengths)


# -- pure functions ------------------------------------------------------------------------------


def test_plan_batches_is_longest_first_under_both_limits():
    lengths = [5, 50, 20, 20, 3, 90]
    plan = batching.plan_batches(lengths, max_tokens=100, max_seqs=3)
    assert [i for b in plan for i in b] == batching.longest_first(lengths) == [5, 1, 2, 3, 0, 4]
    for b in plan:
        assert len(b) <= 3 and (len(b) == 1 or sum(lengths[i] for i in b) <= 100)
    assert plan[0] == [5]  # 90 + 50 > 100: the longest decodes alone


def test_a_text_over_the_budget_gets_a_decode_of_its_own():
    assert batching.plan_batches([500, 10], max_tokens=100, max_seqs=8) == [[0], [1]]


def test_form_batch_takes_one_model_in_lane_order_and_splits_a_task():
    a, b, c = T("m", [40, 40, 40]), T("other", [10]), T("m", [10, 10])
    parts = batching.form_batch([a, b, c], batch_tokens=100, max_seqs=16)
    assert parts == [(a, 0, 2)]  # the third text of a does not fit: a stops the batch, c waits its turn
    a.taken = 2
    parts = batching.form_batch([a, b, c], batch_tokens=100, max_seqs=16)
    assert parts == [(a, 2, 3), (c, 0, 2)]  # b (another model) is skipped, not mixed in


def test_form_batch_respects_the_engines_own_limits_and_always_takes_one_text():
    a = T("m", [30, 30, 30], limits=(1000, 2))
    assert batching.form_batch([a], batch_tokens=1000, max_seqs=16) == [(a, 0, 2)]
    big = T("m", [5000])
    assert batching.form_batch([big], batch_tokens=100, max_seqs=16) == [(big, 0, 1)]
    assert batching.form_batch([T("m", [1], state="new")], 100, 16) == []


def test_claim_new_stops_at_a_ready_head_another_model_and_two_decodes():
    ready, new1, new2 = T("m", [5], state="ready"), T("m", [5], state="new"), T("m", [5], state="new")
    assert batching.claim_new([ready, new1], batch_tokens=100) == []
    assert batching.claim_new([new1, T("x", [5], state="new"), new2], batch_tokens=100) == [new1]
    many = [T("m", [60], state="new") for _ in range(5)]
    assert batching.claim_new(many, batch_tokens=100) == many[:4]  # 240 tokens >= 2 decodes of 100


def test_first_expired_skips_started_and_tokenizing_tasks():
    started = T("m", [1], deadline=1.0, taken=1)
    tokenizing = T("m", [1], deadline=1.0, state="tokenizing")
    late = T("m", [1], deadline=1.0)
    assert batching.first_expired([started, tokenizing, late], now=2.0) is late
    assert batching.first_expired([late], now=0.5) is None


def test_background_keeps_one_worker_free_while_interactive_traffic_is_recent():
    assert batching.background_limit(workers=2, since_interactive=0.2, grace_s=1.0) == 1
    assert batching.background_limit(workers=2, since_interactive=5.0, grace_s=1.0) == 2
    assert batching.background_limit(workers=1, since_interactive=0.0, grace_s=1.0) == 1  # never zero
    assert batching.grace_left(0.25, 1.0) == 0.75 and batching.grace_left(2.0, 1.0) is None


@pytest.mark.parametrize("text", ["a", "héllo wörld", "日本語" * 50, "\U0001f600" * 7])
def test_the_token_estimate_bounds_what_a_byte_level_tokenizer_makes(text):
    est = batching.estimate_tokens([text], None, max_tokens=512, truncate=False)
    assert est >= len(text.encode()) + 2
    assert batching.estimate_tokens([text], None, max_tokens=8, truncate=True) <= 8
    assert batching.estimate_tokens([text], "q", max_tokens=10**6, truncate=False) == est + 3


# -- the scheduler, in-process, on a fake engine source --------------------------------------------


class FakeEngine:
    """Tokens are the text's bytes; a text's vector is [len, first byte, 1, ...]: checkable, no model."""

    dims = 4
    batch_tokens = 256
    max_seqs = 64
    threads = 2

    def __init__(self, gate: threading.Semaphore | None = None) -> None:
        self.gate = gate
        self.entered = threading.Semaphore(0)
        """Released as each decode starts: a test waits for a worker to be busy, never for time."""
        self.decodes: list[int] = []

    def check_dims(self, dims: int | None) -> int:
        return dims or self.dims

    def tokenize(self, text: str, truncate: bool = False) -> list[int]:
        if text == "boom":
            raise TextTooLong("too long")
        return list(text.encode())

    def tokenize_pair(self, query: str, text: str, truncate: bool = False) -> list[int]:
        return self.tokenize(query + text, truncate)

    def encode_on(self, index: int, tokens: list[list[int]], threads: int) -> np.ndarray:
        self.entered.release()
        if self.gate is not None:
            self.gate.acquire()
        self.decodes.append(len(tokens))
        return np.array([[len(t), t[0], 1.0, 0.0] for t in tokens], np.float32)


class FakeSource:
    """The EngineSource protocol: holds counted, so a test sees every request let its model go."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.holds = 0
        self.lock = threading.Lock()

    def hold(self, name: str) -> None:
        with self.lock:
            self.holds += 1

    def unhold(self, name: str, keep_alive: float | None = None) -> None:
        with self.lock:
            self.holds -= 1

    def acquire(self, name: str) -> FakeEngine:
        return self.engine

    def release(self, name: str) -> None:
        pass


@pytest.fixture
def held():
    """A scheduler whose decodes wait at a semaphore the test releases."""
    gate = threading.Semaphore(0)
    source = FakeSource(FakeEngine(gate))
    sched = Scheduler(source, SchedulerConfig(workers=1, interactive=LaneConfig(256, 64, 4096),
                                              background=LaneConfig(64, 64, 4096)))
    sched.start()
    yield sched, source, gate
    for _ in range(1000):
        gate.release()
    sched.stop(timeout=10)
    assert source.holds == 0


def test_every_request_gets_its_own_vectors_back_through_its_future(held):
    sched, source, gate = held
    futures = [sched.submit(EmbedTask(texts=[f"t{i}", "xy" * i or "z"], model="m", normalize=False)) for i in range(6)]
    for _ in range(len(futures) * 2):
        gate.release()
    for i, f in enumerate(futures):
        vecs = f.result(timeout=10)
        assert vecs[0][0] == len(f"t{i}") and vecs[1][0] == len("xy" * i or "z")


def test_queued_requests_share_decodes(held):
    sched, source, gate = held
    first = sched.submit(EmbedTask(texts=["a"], model="m"))
    assert source.engine.entered.acquire(timeout=10)  # the only worker decodes it, held at the gate
    rest = [sched.submit(EmbedTask(texts=["b", "c"], model="m")) for _ in range(5)]
    gate.release()
    first.result(timeout=10)
    gate.release()
    for f in rest:
        f.result(timeout=10)
    assert source.engine.decodes[1] == 10  # the five queued requests went in one decode


def test_interactive_work_overtakes_queued_background_work(held):
    sched, source, gate = held
    background = [sched.submit(EmbedTask(texts=["bg"] * 20, model="m", lane=BACKGROUND)) for _ in range(3)]
    assert source.engine.entered.acquire(timeout=10)  # a background decode runs (held)
    interactive = sched.submit(EmbedTask(texts=["now"], model="m", lane=INTERACTIVE))
    order: list[str] = []
    interactive.add_done_callback(lambda f: order.append("interactive"))
    for f in background:
        f.add_done_callback(lambda f: order.append("background"))
    for _ in range(20):
        gate.release()
    interactive.result(timeout=10)
    for f in background:
        f.result(timeout=10)
    assert order.index("interactive") <= 1  # at most the request of the decode already running came first


def test_a_full_lane_refuses_at_once_and_an_oversize_request_is_too_large(held):
    sched, source, gate = held
    with pytest.raises(TooLarge):
        sched.submit(EmbedTask(texts=["x" * 5000], model="m"))
    accepted = []
    with pytest.raises(Busy) as e:
        for _ in range(100):
            accepted.append(sched.submit(EmbedTask(texts=["y" * 100], model="m")))
    assert e.value.retry_after_ms > 0 and 0 < len(accepted) < 100
    for _ in range(100):
        gate.release()
    assert all(f.result(timeout=10).shape == (1, 4) for f in accepted)  # everything accepted is answered whole


def test_a_deadline_passed_before_its_turn_is_not_computed(held):
    sched, source, gate = held
    blocker = sched.submit(EmbedTask(texts=["a"], model="m"))
    assert source.engine.entered.acquire(timeout=10)
    late = sched.submit(EmbedTask(texts=["b"], model="m", deadline=0.0))  # monotonic 0: long past
    gate.release()
    blocker.result(timeout=10)
    with pytest.raises(Expired):
        late.result(timeout=10)
    assert source.engine.decodes == [1]


def test_the_embedder_names_a_failing_text_by_its_index_and_applies_prefixes():
    class Models:
        def spec(self, name, kind=None):
            return type("S", (), {"name": "m"})

        def prefix(self, name, input_type):
            return {"query": "Q:", "document": "D:", None: ""}[input_type]

        def max_tokens(self, name):
            return 512

    source = FakeSource(FakeEngine())
    sched = Scheduler(source, SchedulerConfig(workers=1))
    sched.start()
    try:
        embedder = Embedder(sched, Models())
        with pytest.raises(TextTooLong) as e:
            embedder.embed(["fine", "boom"], "m").result(timeout=10)
        assert e.value.message.startswith("texts[1]: ")
        vec = embedder.embed(["ab"], "m", input_type="query", normalize=False).result(timeout=10)
        assert vec[0][0] == len("Q:ab") and vec[0][1] == ord("Q")
        with pytest.raises(InvalidInput):
            embedder.embed(["x"], "m", lane="nowhere")
    finally:
        sched.stop(timeout=10)
