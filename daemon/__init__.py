"""pocketembed.daemon: the long-lived process and what it runs.

A request flows one way, and each file owns one step (tests/test_op_table.py
keeps the table and the handlers in step)::

    transport.py   ROUTER sockets, the I/O thread, reply backlogs; a future per request back to its caller
    http_server.py HTTP on loopback (h11 on an asyncio thread, its limits); http_api.py each endpoint's
                   body → one op's arguments, the op's result → its family's reply (OpenAI, Ollama, TEI)
    auth.py        client tokens → permissions; the bad-token block
    dispatch.py    the op table (ipc/ops.py), bound: each op's handler on the executor it names
    handlers.py    one handler per op: arguments in, a result or a future of it out
    executors.py   one thread, a bounded queue, futures; ``then`` continues work on an executor
    embedding.py   the one way into the scheduler: prefixes, text indices in errors, retries, int8 ranges
    scheduler.py   lanes, cross-request batches, decode workers (batching.py: the policy, pure functions)
    engine.py      llama.cpp: tokenize, decode, pool (llama_runtime.py: the bindings; threadpool.py)
    models.py      load and unload on demand, memory budget, keep_alive
    index.py       search and the index writes; fusion.py merges lexical and vector candidates
    jobs.py        the job queue and the runner that indexes SQLite tables in the background
    sources.py     bounded, checked reads of a caller's SQLite file
    store.py       collections and items in SQLite (binary + int8 codes); lexical.py its word index;
                   migrations.py its schema versions; quantize.py, calibration.py the codes
    power.py       the charging / idle policy and its sensors
    server.py      the wiring and the life cycle (settings.py: its configuration; metrics.py: counters)
    faults.py      failpoints for tests (hold, raise, die)
"""

import os

# One thread for numpy's bundled OpenBLAS (and for llama.cpp's, in a build made with
# BLAS): the daemon runs its own parallelism, and every OpenBLAS thread keeps a ~4 MB
# buffer resident (measured with scripts/bench_peers.py: RSS after indexing the 5,574
# SMS 122 -> 115 MB). OpenBLAS reads it once, when numpy loads: the daemon package is
# imported before anything of the daemon imports numpy, so it is set here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
