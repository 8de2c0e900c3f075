"""Scheduling policy as pure functions: which texts go into a decode, and when background work may run.

The scheduler (scheduler.py) owns the lanes, the lock and the workers; every
decision it makes about them is one of these functions of plain values, so the
policy is tested in-process without a model or a thread (tests/test_batching.py),
and the engine's own batching (Engine.plan_batches) is the same rule as the
daemon's.

A task here is anything with the scheduler's task fields: ``model``, ``texts``,
``tokens`` (token lists once tokenized), ``state`` (new → tokenizing → ready →
done), ``taken`` (texts already handed to a decode), ``est_tokens``,
``deadline`` and ``limits`` (the engine's own tokens and sequences per decode).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length (stable): the order texts are decoded in.

    One order for the engine and the scheduler, so a request that runs alone in
    the daemon gets the same bits as the in-process engine's batch of it.
    """
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def plan_batches(lengths: Sequence[int], max_tokens: int, max_seqs: int) -> list[list[int]]:
    """Group text indices into decodes: longest first, under ``max_tokens`` and ``max_seqs`` each.

    Sorting by length keeps one long outlier from sharing every decode and makes
    the decodes of one job similar in cost (parallel contexts stay evenly
    loaded). A text longer than ``max_tokens`` gets a decode of its own.
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i in longest_first(lengths):
        if cur and (len(cur) >= max_seqs or cur_tokens + lengths[i] > max_tokens):
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def first_expired(tasks: Iterable[Any], now: float) -> Any | None:
    """The first task whose deadline passed before any of its texts was handed to a decode."""
    for task in tasks:
        if task.deadline is not None and task.taken == 0 and now > task.deadline and task.state != "tokenizing":
            return task
    return None


def background_limit(workers: int, since_interactive: float, grace_s: float) -> int:
    """How many workers may run background decodes: all but one while interactive traffic is recent."""
    workers = max(1, workers)
    return workers - 1 if workers > 1 and since_interactive < grace_s else workers


def grace_left(since_interactive: float, grace_s: float) -> float | None:
    """Seconds until held-back background work becomes runnable (None: it is not held back by time)."""
    left = grace_s - since_interactive
    return left if left > 0 else None


def claim_new(tasks: Iterable[Any], batch_tokens: int) -> list[Any]:
    """New tasks at the head of a lane to tokenize: one model, about two decodes' worth.

    Stops at a ready task with texts left (the head runs first; the rest is
    tokenized later) and at a task of another model.
    """
    claimed: list[Any] = []
    tokens = 0
    for task in tasks:
        if task.state == "ready" and task.taken < len(task.texts):
            break
        if task.state == "new":
            if claimed and task.model != claimed[0].model:
                break
            claimed.append(task)
            tokens += task.est_tokens
            if tokens >= 2 * batch_tokens:
                break
    return claimed


def form_batch(tasks: Iterable[Any], batch_tokens: int, max_seqs: int) -> list[tuple[Any, int, int]]:
    """The next decode: (task, first text, end) slices of the ready tasks at the head of a lane.

    Texts of one model (the first ready task's), in lane order, under the lane's
    token budget and the engine's own limits; a task's texts may be split over
    several decodes, and a decode always takes at least one text.
    """
    parts: list[tuple[Any, int, int]] = []
    model = None
    n_tokens = n_seqs = 0
    for task in tasks:
        if task.state != "ready" or task.taken >= len(task.texts):
            continue
        if model is None:
            model = task.model
            batch_tokens, max_seqs = min(batch_tokens, task.limits[0]), min(max_seqs, task.limits[1])
        elif task.model != model:
            continue
        start = i = task.taken
        while i < len(task.texts) and n_seqs < max_seqs:
            n = len(task.tokens[i])
            if n_tokens + n > batch_tokens and n_seqs:
                break
            n_tokens += n
            n_seqs += 1
            i += 1
        if i > start:
            parts.append((task, start, i))
        if n_seqs >= max_seqs or i < len(task.texts):
            break
    return parts


def estimate_tokens(texts: Sequence[str], query: str | None, max_tokens: int, truncate: bool) -> int:
    """An upper bound of a request's tokens before it is tokenized: UTF-8 bytes + [CLS]/[SEP] per text.

    A WordPiece or BPE token is at least one byte, so the bound holds; with
    truncation a text costs at most the model's ``max_tokens``.
    """
    pair = len(query.encode("utf-8", "surrogatepass")) + 2 if query is not None else 0
    est = 0
    for t in texts:
        n = len(t.encode("utf-8", "surrogatepass")) + 2 + pair
        est += min(n, max_tokens) if truncate else n
    return est
