"""pocketembed against what a Python user would run instead, all measured in one run.

Rows (same all-MiniLM-L6-v2 weights, 2 threads each, the first ``--texts`` SMS):

* pocketembed daemon, q8_0, q4_0 and bf16: `pocketembed serve` as its own process,
  bulk from 8 client threads sending 64 texts per request, latency one SMS per request;
* ONNX Runtime fp32 and dynamic int8, in-process, length-sorted batches of 32, with the
  `tokenizers` library. The ONNX files are exported here from the model's safetensors
  (torch.onnx.export, opset 17; onnxruntime.quantization.quantize_dynamic, QInt8) and
  cached in ~/.cache/pocketembed/bench;
* sentence-transformers fp32 (torch, batch 32, its own length sorting);
* llama-cpp-python's own server with the same q8_0 GGUF and build, over HTTP;
* the pocketembed daemon q8_0 over its HTTP endpoint (`serve --http`, OpenAI's
  `/v1/embeddings` with a token), with the same client code as the llama-cpp-python
  server's row (one keep-alive connection per client thread, JSON floats); its single-SMS
  p50 through the `openai` SDK (base64, what the SDK asks for) is printed below the table.

Each system runs in a process of its own, so its peak RSS (VmHWM) is its own; for the
daemon and the server it is the serving process's. Columns: bulk texts/s (median of
``--rounds`` passes), single-SMS latency p50/p99 (``--samples`` requests back to back),
p50 of 100 single SMS each sent after 20 ms of idleness (how a daemon's requests
arrive; in-process peers' threads go to sleep too), peak RSS, and cosine to
sentence-transformers fp32 (mean / min over the texts).

Then single-SMS latency again, interleaved: ONNX Runtime fp32 in-process and the
q8_0 and bf16 daemons, all loaded at once, take turns in blocks of 25 SMS (every
order of the three in turn, 0.1 s apart) over ``--samples`` SMS twice, so that the
machine's noise, which on a shared VM moves a system's p50 by 30% between minutes,
hits all three alike. The ratios to quote for the p50 goal are these.

Then the daemon's memory over a job: RSS idle with the model loaded, peak while it
indexes the 5,574 SMS (index.add, 64 per request), and RSS 5 s after the job; the
same three over a background job (jobs.submit) indexing them from an SQLite table; with
the anonymous part of the idle and after figures apart (the rest is mapped files: the
libraries, and those pages of the model file that decodes have read since the daemon
last handed them back, at load and 2 s after a bulk job).

    python scripts/bench_peers.py [--texts 1000] [--rounds 3] [--samples 300] [--only NAME ...]

Needs the `bench` extra (onnx, onnxruntime, onnxscript, llama-cpp-python[server]) and the
`reference` extra (sentence-transformers); the models from `pocketembed models prepare`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pocketembed.sms import load_sms

THREADS = 2
BATCH = 32
MAX_TOKENS = 256
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pocketembed" / "bench"
SYSTEMS = ["daemon-q8_0", "daemon-q4_0", "daemon-bf16", "daemon-http", "ort-fp32", "ort-int8", "st-fp32",
           "llama-server"]
TITLES = {
    "daemon-q8_0": "pocketembed daemon q8_0, 8 clients x 64 texts",
    "daemon-q4_0": "pocketembed daemon q4_0, 8 clients x 64 texts",
    "daemon-bf16": "pocketembed daemon bf16, 8 clients x 64 texts",
    "daemon-http": "pocketembed daemon q8_0 over HTTP /v1/embeddings, 8 clients x 64",
    "ort-fp32": "ONNX Runtime fp32, in-process, sorted batches of 32",
    "ort-int8": "ONNX Runtime dynamic int8, same",
    "st-fp32": "sentence-transformers fp32, batch 32",
    "llama-server": "llama-cpp-python server, same q8_0 GGUF, 8 clients x 64",
}


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with family/model and the SIMD that matters here."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or fields.get("Hardware") or platform.machine()
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm", "bf16") if f in flags]
    family = f", family {fields['cpu family']} model {fields.get('model', '?')}" if "cpu family" in fields else ""
    return f"{name}{family} [{' '.join(simd)}]"


def vm_kb(pid: int | str, field: str) -> int:
    """A VmRSS / VmHWM figure of a process, in kB (0 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def source_dir() -> Path:
    from pocketembed.gguf_models.catalog import get
    from pocketembed.gguf_models.prepare import source_model_dir

    return Path(source_model_dir(get(None).source, progress=lambda m: None))


def gguf_path(quant: str) -> Path:
    from pocketembed.paths import home, models_dir

    return models_dir(home()) / f"all-minilm-l6-v2-{quant}.gguf"


# -- ONNX export (once, cached) ---------------------------------------------------------


def onnx_files() -> tuple[Path, Path]:
    """fp32 and dynamic-int8 ONNX exports of the model's safetensors."""
    CACHE.mkdir(parents=True, exist_ok=True)
    fp32, int8 = CACHE / "minilm-fp32.onnx", CACHE / "minilm-int8.onnx"
    if not fp32.exists():
        import torch
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(str(source_dir())).eval()

        class Hidden(torch.nn.Module):  # positional inputs -> last_hidden_state
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        model = Hidden().eval()
        ids = torch.ones((2, 16), dtype=torch.long)
        tmp = fp32.with_suffix(".tmp.onnx")
        with torch.no_grad():
            torch.onnx.export(
                model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(tmp),
                input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "seq"}
                              for n in ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")},
                opset_version=17, dynamo=False,
            )
        tmp.replace(fp32)
    if not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = int8.with_suffix(".tmp.onnx")
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
        tmp.replace(int8)
    return fp32, int8


# -- measurement helpers ----------------------------------------------------------------


IDLE_GAP_S = 0.02
"""The pause before each request of the "after idle" latency: how a daemon's requests arrive."""


def latencies(embed_one: Callable[[str], object], picks: Sequence[str], gap: float = 0.0) -> list[float]:
    """Milliseconds per single-text call, back to back or each after ``gap`` seconds of idleness."""
    for t in picks[:20]:
        embed_one(t)
    out = []
    for t in picks:
        if gap:
            time.sleep(gap)
        a = time.perf_counter()
        embed_one(t)
        out.append((time.perf_counter() - a) * 1000)
    return out


def bulk_rounds(run: Callable[[], np.ndarray], rounds: int, n: int) -> tuple[list[float], np.ndarray]:
    vecs = run()  # warm-up, and the vectors compared
    rates = []
    for _ in range(rounds):
        a = time.perf_counter()
        run()
        rates.append(n / (time.perf_counter() - a))
    return rates, vecs


def concurrent(embed_chunk: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str], clients: int = 8,
               per: int = 64) -> np.ndarray:
    """``texts`` in chunks of ``per`` from ``clients`` threads at once, vectors in input order."""
    work: queue.Queue[int] = queue.Queue()
    for start in range(0, len(texts), per):
        work.put(start)
    out: list[np.ndarray | None] = [None] * len(texts)
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            try:
                start = work.get_nowait()
            except queue.Empty:
                return
            try:
                vecs = embed_chunk(texts[start : start + per])
            except BaseException as e:  # surfaced below
                errors.append(e)
                return
            for i, v in enumerate(vecs):
                out[start + i] = v

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return np.stack(out)  # type: ignore[arg-type]


# -- the systems, each run in a worker process ------------------------------------------


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[:, :, None].astype(np.float32)
    v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def ort_runner(onnx: Path) -> tuple[Callable[[Sequence[str]], np.ndarray], object]:
    """ONNX Runtime on ``onnx`` (THREADS intra-op threads): a padded batch's mean-pooled vectors, and the tokenizer."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(source_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.no_padding()

    def run_batch(batch: Sequence[str]) -> np.ndarray:
        encs = tok.encode_batch(list(batch))
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        (hidden,) = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        return mean_pool(hidden, mask)

    return run_batch, tok


def worker_ort(name: str, texts: list[str], picks: list[str], rounds: int) -> dict:
    fp32, int8 = onnx_files()
    run_batch, tok = ort_runner(fp32 if name == "ort-fp32" else int8)
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])

    def run_all() -> np.ndarray:
        out = np.empty((len(texts), 384), dtype=np.float32)
        for s in range(0, len(order), BATCH):
            idx = order[s : s + BATCH]
            out[idx] = run_batch([texts[i] for i in idx])
        return out

    rates, vecs = bulk_rounds(run_all, rounds, len(texts))
    lat = latencies(lambda t: run_batch([t]), picks)
    lat_idle = latencies(lambda t: run_batch([t]), picks[:100], IDLE_GAP_S)
    return {"rates": rates, "lat": lat, "lat_idle": lat_idle, "vecs": vecs, "peak_kb": vm_kb("self", "VmHWM")}


def worker_st(texts: list[str], picks: list[str], rounds: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    st = SentenceTransformer(str(source_dir()), device="cpu")

    def run_all() -> np.ndarray:
        return st.encode(texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True)

    rates, vecs = bulk_rounds(run_all, rounds, len(texts))
    lat = latencies(lambda t: st.encode([t], normalize_embeddings=True), picks)
    lat_idle = latencies(lambda t: st.encode([t], normalize_embeddings=True), picks[:100], IDLE_GAP_S)
    return {"rates": rates, "lat": lat, "lat_idle": lat_idle, "vecs": vecs, "peak_kb": vm_kb("self", "VmHWM")}


def worker_daemon(quant: str, texts: list[str], picks: list[str], rounds: int) -> dict:
    from pocketembed.ipc import Client

    with tempfile.TemporaryDirectory() as tmp:
        proc, sock = start_daemon(Path(tmp), quant)
        try:
            endpoint = f"ipc://{sock}"
            model = f"all-minilm-l6-v2:{quant}"
            local = threading.local()

            def embed_chunk(chunk: Sequence[str]) -> np.ndarray:
                if not hasattr(local, "c"):
                    local.c = Client(endpoint, timeout=120)
                return local.c.embed(list(chunk), model=model, truncate=True)

            rates, vecs = bulk_rounds(lambda: concurrent(embed_chunk, texts), rounds, len(texts))
            with Client(endpoint, timeout=60) as c:
                lat = latencies(lambda t: c.embed([t], model=model, truncate=True), picks)
                lat_idle = latencies(lambda t: c.embed([t], model=model, truncate=True), picks[:100], IDLE_GAP_S)
            peak = vm_kb(proc.pid, "VmHWM")
        finally:
            stop(proc)
    return {"rates": rates, "lat": lat, "lat_idle": lat_idle, "vecs": vecs, "peak_kb": peak}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_embedder(port: int, headers: dict[str, str] | None = None) -> Callable[[Sequence[str]], np.ndarray]:
    """POST /v1/embeddings on one keep-alive connection per calling thread (as the SDKs keep one)."""
    import http.client

    local = threading.local()
    headers = {"Content-Type": "application/json", **(headers or {})}

    def embed_chunk(chunk: Sequence[str]) -> np.ndarray:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = json.dumps({"input": list(chunk)}).encode()
        try:
            local.conn.request("POST", "/v1/embeddings", body, headers)
            r = local.conn.getresponse()
        except (http.client.HTTPException, OSError):  # the server closed the keep-alive connection
            local.conn.close()
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            local.conn.request("POST", "/v1/embeddings", body, headers)
            r = local.conn.getresponse()
        payload = r.read()
        if r.status != 200:
            raise OSError(f"HTTP {r.status}: {payload[:200]!r}")
        data = json.loads(payload)["data"]
        v = np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return embed_chunk


def worker_daemon_http(texts: list[str], picks: list[str], rounds: int) -> dict:
    from pocketembed.paths import ENV_HOME

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = dict(os.environ, **{ENV_HOME: str(home)})
        proc, _ = start_daemon(home, "q8_0", "--http", f"127.0.0.1:{port}")
        try:
            added = subprocess.run([sys.executable, "-m", "pocketembed.cli", "clients", "add", "bench", "--allow",
                                    "embed"], env=env, capture_output=True, text=True, check=True)
            token = added.stdout.strip().splitlines()[-1]
            embed_chunk = http_embedder(port, {"Authorization": f"Bearer {token}"})
            deadline = time.monotonic() + 60
            while True:  # the daemon reads a new client's token file on its next request
                try:
                    embed_chunk(["ready?"])
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            rates, vecs = bulk_rounds(lambda: concurrent(embed_chunk, texts), rounds, len(texts))
            lat = latencies(lambda t: embed_chunk([t]), picks)
            lat_idle = latencies(lambda t: embed_chunk([t]), picks[:100], IDLE_GAP_S)
            import openai

            sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token)
            lat_sdk = latencies(lambda t: sdk.embeddings.create(model="all-minilm-l6-v2:q8_0", input=[t]), picks)
            peak = vm_kb(proc.pid, "VmHWM")
        finally:
            stop(proc)
    return {"rates": rates, "lat": lat, "lat_idle": lat_idle, "lat_sdk": lat_sdk, "vecs": vecs, "peak_kb": peak}


def worker_server(texts: list[str], picks: list[str], rounds: int) -> dict:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path("q8_0")), "--embedding", "true",
         "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", "2048", "--n_batch", "512",
         "--n_ubatch", "512", "--host", "127.0.0.1", "--port", str(port), "--verbose", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    embed_chunk = http_embedder(port)

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                embed_chunk(["ready?"])
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("llama_cpp.server did not start")
                time.sleep(0.3)
        rates, vecs = bulk_rounds(lambda: concurrent(embed_chunk, texts), rounds, len(texts))
        lat = latencies(lambda t: embed_chunk([t]), picks)
        lat_idle = latencies(lambda t: embed_chunk([t]), picks[:100], IDLE_GAP_S)
        peak = vm_kb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
    return {"rates": rates, "lat": lat, "lat_idle": lat_idle, "vecs": vecs, "peak_kb": peak}


INTERLEAVED = ("ort-fp32", "daemon-q8_0", "daemon-bf16")
BLOCK = 25
BLOCK_PAUSE_S = 0.1
"""Between two systems' blocks: ONNX Runtime's threads spin for a while after a run, which would
slow whichever system came next, and every order of the three comes up as often."""


def worker_interleaved(picks: list[str], passes: int = 2) -> dict:
    """Single-SMS milliseconds of INTERLEAVED, taking turns in blocks of BLOCK texts."""
    from pocketembed.ipc import Client

    run_batch, _ = ort_runner(onnx_files()[0])
    calls: dict[str, Callable[[list[str]], object]] = {"ort-fp32": run_batch}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for name in INTERLEAVED[1:]:
            quant = name.split("-", 1)[1]
            proc, sock = start_daemon(Path(tmp) / quant, quant)
            stack.callback(stop, proc)
            client = stack.enter_context(Client(f"ipc://{sock}", timeout=60))
            calls[name] = functools.partial(client.embed, model=f"all-minilm-l6-v2:{quant}", truncate=True)
        took: dict[str, list[float]] = {name: [] for name in INTERLEAVED}
        for name in INTERLEAVED:
            for t in picks[:20]:
                calls[name]([t])
        orders = list(itertools.permutations(INTERLEAVED))
        sequence = picks * passes
        for b, start in enumerate(range(0, len(sequence), BLOCK)):
            block = sequence[start : start + BLOCK]
            for name in orders[b % len(orders)]:
                time.sleep(BLOCK_PAUSE_S)
                for t in block:
                    a = time.perf_counter()
                    calls[name]([t])
                    took[name].append((time.perf_counter() - a) * 1000)
    return took


def start_daemon(home: Path, quant: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    from pocketembed.ipc import Client, DaemonError
    from pocketembed.paths import ENV_HOME, home as default_home, models_dir

    home.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models_dir(default_home()))
    sock = home / "pe.sock"
    env = dict(os.environ, **{ENV_HOME: str(home)})
    proc = subprocess.Popen([sys.executable, "-m", "pocketembed.cli", "serve", "--socket", str(sock),
                             "--model", f"all-minilm-l6-v2:{quant}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with Client(f"ipc://{sock}", timeout=1) as c:
                c.embed(["warm the model up"], model=f"all-minilm-l6-v2:{quant}")
            return proc, sock
        except DaemonError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("daemon did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def memory_over_a_job(quant: str = "q8_0", settle_s: float = 5.0) -> dict:
    """The daemon's RSS idle with the model loaded, at its peak while indexing all SMS, and after."""
    from pocketembed.ipc import Client

    texts = load_sms()
    with tempfile.TemporaryDirectory() as tmp:
        proc, sock = start_daemon(Path(tmp), quant)
        try:
            time.sleep(settle_s)
            idle = vm_kb(proc.pid, "VmRSS")
            idle_anon = vm_kb(proc.pid, "RssAnon")
            a = time.perf_counter()
            with Client(f"ipc://{sock}", timeout=300) as c:
                for s in range(0, len(texts), 64):
                    c.index_add("sms", [{"id": i, "text": texts[i]} for i in range(s, min(s + 64, len(texts)))],
                                truncate=True)
            took = time.perf_counter() - a
            time.sleep(settle_s)
            after = vm_kb(proc.pid, "VmRSS")
            after_anon = vm_kb(proc.pid, "RssAnon")
            peak = vm_kb(proc.pid, "VmHWM")
        finally:
            stop(proc)
    return {"idle_kb": idle, "peak_kb": peak, "after_kb": after, "idle_anon_kb": idle_anon, "after_anon_kb": after_anon,
            "seconds": took, "n": len(texts)}


def memory_over_a_table_job(quant: str = "q8_0", settle_s: float = 5.0) -> dict:
    """The daemon's RSS idle, at its peak and after a background job (jobs.submit) indexing the SMS
    from an SQLite table, as the phone's re-indexing runs (the power source on a PC says charging)."""
    import sqlite3

    from pocketembed.ipc import Client

    texts = load_sms()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sources"
        src.mkdir()
        db = src / "sms.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
            conn.executemany("INSERT INTO messages VALUES (?, ?)", enumerate(texts, 1))
        proc, sock = start_daemon(Path(tmp) / "home", quant, "--job-source", str(src))
        try:
            time.sleep(settle_s)
            idle = vm_kb(proc.pid, "VmRSS")
            a = time.perf_counter()
            with Client(f"ipc://{sock}", timeout=60) as c:
                job = c.index_table(str(db), "messages", "id", "body")
                while (state := c.job(job["id"])["state"]) not in ("done", "failed", "cancelled"):
                    time.sleep(0.1)
            took = time.perf_counter() - a
            time.sleep(settle_s)
            after = vm_kb(proc.pid, "VmRSS")
            peak = vm_kb(proc.pid, "VmHWM")
        finally:
            stop(proc)
    return {"idle_kb": idle, "peak_kb": peak, "after_kb": after, "seconds": took, "n": len(texts), "state": state}


def run_worker(name: str, args: argparse.Namespace, out: Path) -> None:
    texts = load_sms()[: args.texts]
    rng = np.random.default_rng(1)
    picks = [texts[i] for i in rng.integers(0, len(texts), args.samples)]
    if name == "daemon-http":
        res = worker_daemon_http(texts, picks, args.rounds)
    elif name.startswith("daemon-"):
        res = worker_daemon(name.split("-", 1)[1], texts, picks, args.rounds)
    elif name.startswith("ort-"):
        res = worker_ort(name, texts, picks, args.rounds)
    elif name == "st-fp32":
        res = worker_st(texts, picks, args.rounds)
    elif name == "llama-server":
        res = worker_server(texts, picks, args.rounds)
    elif name == "interleaved":
        out.with_suffix(".json").write_text(json.dumps(worker_interleaved(picks)))
        return
    elif name == "memory":
        out.with_suffix(".json").write_text(json.dumps({**memory_over_a_job(), "job": memory_over_a_table_job()}))
        return
    else:
        raise SystemExit(f"unknown system {name}")
    np.save(out.with_suffix(".npy"), res.pop("vecs"))
    out.with_suffix(".json").write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=1000, help="bulk corpus: the first N SMS")
    ap.add_argument("--rounds", type=int, default=3, help="bulk passes per system (the median is quoted)")
    ap.add_argument("--samples", type=int, default=300, help="single-SMS requests per system")
    ap.add_argument("--only", nargs="+", choices=SYSTEMS + ["interleaved", "memory"], help="run only these rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker, args, Path(args.out))
        return

    names = args.only or SYSTEMS + ["interleaved", "memory"]
    if any(n.startswith("ort-") or n == "interleaved" for n in names):
        onnx_files()  # exported once, outside any worker's timing and RSS
    results: dict[str, dict] = {}
    vectors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = [n for n in names if n != "st-fp32"]
        for name in ["st-fp32", *run]:  # the reference first: every row's cosine is against it
            out = Path(tmp) / name
            print(f"... {name}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(out), "--texts", str(args.texts),
                   "--rounds", str(args.rounds), "--samples", str(args.samples)]
            subprocess.run(cmd, check=True)
            results[name] = json.loads(out.with_suffix(".json").read_text())
            if out.with_suffix(".npy").exists():
                vectors[name] = np.load(out.with_suffix(".npy"))

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); {THREADS} threads each; "
          f"bulk: the first {args.texts} SMS, median of {args.rounds} passes; latency: {args.samples} single SMS")
    gap = f"p50 after {IDLE_GAP_S * 1000:.0f} ms idle"
    print(f"\n| system | texts/s | 1-SMS p50 ms | p99 ms | {gap} | peak RSS MB | cos vs ST fp32 (mean / min) |")
    print("|---|---|---|---|---|---|---|")
    ref = vectors["st-fp32"]
    for name in SYSTEMS:
        if name not in vectors:
            continue
        r = results[name]
        cos = (vectors[name] * ref).sum(1) / np.linalg.norm(vectors[name], axis=1)
        print(f"| {TITLES[name]} | {statistics.median(r['rates']):.0f} | {np.percentile(r['lat'], 50):.2f} | "
              f"{np.percentile(r['lat'], 99):.2f} | {np.percentile(r['lat_idle'], 50):.2f} | {r['peak_kb'] / 1024:.0f} | "
              f"{cos.mean():.5f} / {cos.min():.4f} |")
    if "ort-fp32" in results:
        print()
        o = results["ort-fp32"]
        for name in ("daemon-q8_0", "daemon-q4_0", "daemon-bf16"):
            if name in results:
                d = results[name]
                print(f"{name.replace('-', ' ')} / ORT fp32: "
                      f"bulk {statistics.median(d['rates']) / statistics.median(o['rates']):.2f}x (goal >= 1), "
                      f"p50 {np.percentile(d['lat'], 50) / np.percentile(o['lat'], 50):.2f}x (goal <= 1), "
                      f"p99 {np.percentile(d['lat'], 99) / np.percentile(o['lat'], 99):.2f}x (goal <= 2); "
                      f"p50 after idle {np.percentile(d['lat_idle'], 50) / np.percentile(o['lat_idle'], 50):.2f}x")
    if "daemon-http" in results:
        h = results["daemon-http"]
        line = (f"\ndaemon q8_0 over HTTP: single SMS p50 {np.percentile(h['lat'], 50):.2f} ms, "
                f"through the openai SDK {np.percentile(h['lat_sdk'], 50):.2f} ms")
        if "daemon-q8_0" in results:
            z = results["daemon-q8_0"]
            line += (f"; / ZeroMQ: p50 {np.percentile(h['lat'], 50) / np.percentile(z['lat'], 50):.2f}x "
                     f"(+{np.percentile(h['lat'], 50) - np.percentile(z['lat'], 50):.2f} ms), "
                     f"bulk {statistics.median(h['rates']) / statistics.median(z['rates']):.2f}x")
        if "llama-server" in results:
            ls = results["llama-server"]
            line += (f"; / llama-cpp-python server: p50 {np.percentile(h['lat'], 50) / np.percentile(ls['lat'], 50):.2f}x, "
                     f"bulk {statistics.median(h['rates']) / statistics.median(ls['rates']):.2f}x")
        print(line)
    if "interleaved" in results:
        took = results["interleaved"]
        o = took["ort-fp32"]
        print(f"\nsingle SMS, interleaved in blocks of {BLOCK}, {BLOCK_PAUSE_S} s apart ({len(o)} each):")
        for name in INTERLEAVED:
            t = took[name]
            line = f"  {name:12s} p50 {np.percentile(t, 50):.2f} ms, p99 {np.percentile(t, 99):.2f} ms"
            if name != "ort-fp32":
                line += (f"; / ORT fp32: p50 {np.percentile(t, 50) / np.percentile(o, 50):.2f}x (goal <= 1), "
                         f"p99 {np.percentile(t, 99) / np.percentile(o, 99):.2f}x (goal <= 2)")
            print(line)
    if "memory" in results:
        m = results["memory"]
        print(f"\ndaemon memory over a job (q8_0, index.add of {m['n']} SMS in {m['seconds']:.1f} s): "
              f"idle {m['idle_kb'] / 1024:.0f} MB, peak {m['peak_kb'] / 1024:.0f} MB, "
              f"5 s after {m['after_kb'] / 1024:.0f} MB = {m['after_kb'] / m['idle_kb']:.2f}x idle (goal <= 1.25x); "
              f"of which anonymous (the rest is mapped files) "
              f"{m['idle_anon_kb'] / 1024:.0f} -> {m['after_anon_kb'] / 1024:.0f} MB = "
              f"{m['after_anon_kb'] / max(m['idle_anon_kb'], 1):.2f}x")
        j = m["job"]
        print(f"daemon memory over a background job (q8_0, jobs.submit of an SQLite table of {j['n']} SMS, "
              f"{j['state']} in {j['seconds']:.1f} s): idle {j['idle_kb'] / 1024:.0f} MB (goal <= 100), "
              f"peak {j['peak_kb'] / 1024:.0f} MB (goal <= 150), 5 s after {j['after_kb'] / 1024:.0f} MB")


if __name__ == "__main__":
    main()
