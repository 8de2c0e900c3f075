package org.pocketembed;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.PriorityQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.atomic.AtomicLong;

import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.Value;
import org.zeromq.ZMQ;

/**
 * Android-side client of the pocketembed daemon: protocol v1 whole (ipc/PROTOCOL.md).
 *
 * <p>JeroMQ is pure Java and has no Unix-domain {@code ipc://} transport, so an
 * app connects to the daemon's loopback TCP endpoint ({@code pocketembed serve
 * --tcp 127.0.0.1:PORT}). Every app on the phone can reach that port, so the
 * daemon serves it only to requests carrying a client token (made in Termux by
 * {@code pocketembed clients add NAME --allow ...}).
 *
 * <p>Every method returns a {@link CompletableFuture}; many requests are in flight
 * at once on the one DEALER socket, matched to their replies by id. A failed
 * request completes its future exceptionally with a {@link DaemonException}
 * subclass carrying the daemon's stable code. Each request has a timeout (the
 * client's default or its own): the future fails with
 * {@link DaemonException.Timeout} when no reply came in time, and embed requests
 * send it as {@code timeout_ms} so the daemon drops work nobody waits for.
 *
 * <p>Thread-safe: one I/O thread owns the socket (ZeroMQ sockets are not
 * thread-safe); callers hand it requests through a queue and an inproc wake-up.
 * It sleeps until a reply, a request or the nearest deadline: no polling.
 */
public final class PocketEmbedClient implements AutoCloseable {

    /** One search hit: the item's id (a Long or a String), score, metadata and (when asked for) text. */
    public static final class Hit {
        public final Object id;
        public final double score;
        public final Map<String, Object> metadata;
        public final String text;
        /** The reranker's score when the search named one (option {@code rerank}), else null. */
        public final Double rerankScore;
        /** Which side of the search found it: {@code "lexical"}, {@code "vector"} or both. */
        public final List<String> matched;

        Hit(Object id, double score, Map<String, Object> metadata, String text, Double rerankScore, List<String> matched) {
            this.id = id;
            this.score = score;
            this.metadata = metadata;
            this.text = text;
            this.rerankScore = rerankScore;
            this.matched = matched;
        }
    }

    /** Vectors as the daemon sent them: {@code float32}, {@code int8} or packed {@code binary}. */
    public static final class Embeddings {
        public final String dtype;
        public final int count;
        public final int dims;
        public final String model;
        private final byte[] data;

        Embeddings(String dtype, int count, int dims, String model, byte[] data) {
            this.dtype = dtype;
            this.count = count;
            this.dims = dims;
            this.model = model;
            this.data = data;
        }

        /** float32 vectors (dtype {@code float32}). */
        public float[][] floats() {
            check("float32");
            ByteBuffer buf = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
            float[][] out = new float[count][dims];
            for (float[] row : out) {
                for (int j = 0; j < dims; j++) {
                    row[j] = buf.getFloat();
                }
            }
            return out;
        }

        /** int8 vectors (dtype {@code int8}): round(x * 127) of the unit vector. */
        public byte[][] int8() {
            check("int8");
            return rows(dims);
        }

        /** Sign bits packed 8 per byte, first dimension in the most significant bit (dtype {@code binary}). */
        public byte[][] bits() {
            check("binary");
            return rows((dims + 7) / 8);
        }

        /** The raw little-endian bytes, row-major. */
        public byte[] raw() {
            return data.clone();
        }

        private byte[][] rows(int width) {
            byte[][] out = new byte[count][width];
            for (int i = 0; i < count; i++) {
                System.arraycopy(data, i * width, out[i], 0, width);
            }
            return out;
        }

        private void check(String want) {
            if (!dtype.equals(want)) {
                throw new IllegalStateException("these vectors are " + dtype + ", not " + want);
            }
        }
    }

    private static final class Pending {
        final long id;
        final long deadline;
        final CompletableFuture<Object> future;
        final String op;
        final int timeoutMs;

        Pending(long id, long deadline, CompletableFuture<Object> future, String op, int timeoutMs) {
            this.id = id;
            this.deadline = deadline;
            this.future = future;
            this.op = op;
            this.timeoutMs = timeoutMs;
        }
    }

    private final ZMQ.Context context;
    private final ZMQ.Socket wakeIn;
    private final String endpoint;
    private final int timeoutMs;
    private final String token;
    private final AtomicLong ids = new AtomicLong(1);
    private final ConcurrentLinkedQueue<Object[]> outbox = new ConcurrentLinkedQueue<>();
    private final Thread io;
    private volatile boolean closing;

    /**
     * @param endpoint  the daemon's TCP endpoint, e.g. {@code tcp://127.0.0.1:5555}
     * @param timeoutMs default timeout of each request
     * @param token     the client token the TCP endpoint requires (null: none)
     */
    public PocketEmbedClient(String endpoint, int timeoutMs, String token) {
        this.endpoint = endpoint;
        this.timeoutMs = timeoutMs;
        this.token = token;
        this.context = ZMQ.context(1);
        String wake = "inproc://pocketembed-wake-" + System.identityHashCode(this);
        ZMQ.Socket wakeOut = context.socket(ZMQ.PAIR);
        wakeOut.bind(wake);
        this.wakeIn = context.socket(ZMQ.PAIR);
        this.wakeIn.connect(wake);
        ZMQ.Socket dealer = context.socket(ZMQ.DEALER);
        dealer.setLinger(0);
        dealer.connect(endpoint);
        this.io = new Thread(() -> run(dealer, wakeOut), "pocketembed-io");
        this.io.setDaemon(true);
        this.io.start();
    }

    public PocketEmbedClient(String endpoint, int timeoutMs) {
        this(endpoint, timeoutMs, null);
    }

    // -- the ops --------------------------------------------------------------------------------

    public CompletableFuture<Map<String, Object>> ping() {
        return map(call("ping", null, timeoutMs));
    }

    /** Embeds texts; {@code options} as PROTOCOL.md's embed args (model, dims, dtype, normalize, truncate, ...). */
    public CompletableFuture<Embeddings> embed(List<String> texts, Map<String, Object> options) {
        Map<String, Object> args = argsFrom(options);
        args.put("texts", texts);
        int timeout = timeoutOf(args);
        args.put("timeout_ms", timeout);
        return call("embed", args, timeout).thenApply(r -> {
            Map<?, ?> m = (Map<?, ?>) r;
            List<?> shape = (List<?>) m.get("shape");
            return new Embeddings((String) m.get("dtype"), ((Number) shape.get(0)).intValue(),
                    ((Number) shape.get(1)).intValue(), (String) m.get("model"), (byte[]) m.get("data"));
        });
    }

    /** float32 vectors of texts with the default model. */
    public float[][] embedFloats(List<String> texts, String model) throws IOException {
        Map<String, Object> options = new HashMap<>();
        if (model != null) {
            options.put("model", model);
        }
        return await(embed(texts, options)).floats();
    }

    /**
     * A cross-encoder's score of each document against the query, in input order (the model's own scale:
     * a sigmoid of its logit unless imported with {@code --score raw}). {@code options}: truncate, priority,
     * keep_alive, timeout_ms.
     */
    public CompletableFuture<double[]> rerank(String query, List<String> documents, String model, Map<String, Object> options) {
        Map<String, Object> args = argsFrom(options);
        args.put("query", query);
        args.put("documents", documents);
        args.put("model", model);
        int timeout = timeoutOf(args);
        args.put("timeout_ms", timeout);
        return call("rerank", args, timeout).thenApply(r -> {
            List<?> scores = (List<?>) ((Map<?, ?>) r).get("scores");
            double[] out = new double[scores.size()];
            for (int i = 0; i < out.length; i++) {
                out[i] = ((Number) scores.get(i)).doubleValue();
            }
            return out;
        });
    }

    /**
     * The k best matching items; {@code options}: mode ({@code "hybrid"}, the default, {@code "vector"} or
     * {@code "lexical"}), rescore_multiplier, filter (a map), with_text, model, and rerank (a reranker's
     * name) with rerank_top to rescore the best candidates with a cross-encoder.
     */
    public CompletableFuture<List<Hit>> search(String collection, String query, int k, Map<String, Object> options) {
        Map<String, Object> args = argsFrom(options);
        args.put("collection", collection);
        args.put("query", query);
        args.put("k", k);
        return call("search", args, timeoutOf(args)).thenApply(r -> {
            List<Hit> hits = new ArrayList<>();
            for (Object o : (List<?>) ((Map<?, ?>) r).get("hits")) {
                Map<?, ?> h = (Map<?, ?>) o;
                @SuppressWarnings("unchecked")
                Map<String, Object> meta = (Map<String, Object>) h.get("metadata");
                Object rerank = h.get("rerank_score");
                List<String> matched = new ArrayList<>();
                Object sides = h.get("matched");
                if (sides instanceof List) {
                    for (Object side : (List<?>) sides) {
                        matched.add(String.valueOf(side));
                    }
                }
                hits.add(new Hit(h.get("id"), ((Number) h.get("score")).doubleValue(), meta, (String) h.get("text"),
                        rerank == null ? null : ((Number) rerank).doubleValue(), matched));
            }
            return hits;
        });
    }

    /** Blocking search with the items' texts. */
    public List<Hit> search(String collection, String query, int k) throws IOException {
        Map<String, Object> options = new HashMap<>();
        options.put("with_text", true);
        return await(search(collection, query, k, options));
    }

    /** Embeds and stores items now (options: model, dims, chunk, truncate, store_text, ...). */
    public CompletableFuture<Map<String, Object>> indexAdd(String collection, List<Item> items, Map<String, Object> options) {
        Map<String, Object> args = withCollection(collection, options);
        args.put("items", items);
        return map(call("index.add", args, Math.max(timeoutMs, 120_000)));
    }

    /** Deletes items by id; completes with the number of vectors removed. */
    public CompletableFuture<Long> indexDelete(String collection, List<Object> ids) {
        Map<String, Object> args = withCollection(collection, null);
        args.put("ids", ids);
        return call("index.delete", args, timeoutMs).thenApply(r -> ((Number) ((Map<?, ?>) r).get("deleted")).longValue());
    }

    /**
     * Queues items and deletions for background embedding (while the phone charges); completes with the
     * queue job as soon as they are committed. Follow it with {@link #jobStatus(long)}.
     */
    public CompletableFuture<Map<String, Object>> indexEnqueue(String collection, List<Item> items, List<Object> delete,
                                                              Map<String, Object> options) {
        Map<String, Object> args = withCollection(collection, options);
        args.put("items", items == null ? new ArrayList<>() : items);
        if (delete != null) {
            args.put("delete", delete);
        }
        return map(call("index.enqueue", args, timeoutMs));
    }

    public CompletableFuture<Map<String, Object>> jobsSubmit(Map<String, Object> args) {
        return map(call("jobs.submit", args, timeoutMs));
    }

    public CompletableFuture<List<Object>> jobsList(int limit) {
        Map<String, Object> args = new LinkedHashMap<>();
        args.put("limit", limit);
        return list(call("jobs.list", args, timeoutMs));
    }

    public CompletableFuture<Map<String, Object>> jobStatus(long job) {
        return jobOp("jobs.status", job);
    }

    public CompletableFuture<Map<String, Object>> jobPause(long job) {
        return jobOp("jobs.pause", job);
    }

    public CompletableFuture<Map<String, Object>> jobResume(long job) {
        return jobOp("jobs.resume", job);
    }

    public CompletableFuture<Map<String, Object>> jobCancel(long job) {
        return jobOp("jobs.cancel", job);
    }

    public CompletableFuture<List<Object>> modelsList() {
        return list(call("models.list", null, timeoutMs));
    }

    /** Loads a model; keepAlive as the protocol's (seconds, "5m", -1 = forever; null: the daemon's). */
    public CompletableFuture<Map<String, Object>> modelsLoad(String model, Object keepAlive) {
        Map<String, Object> args = new LinkedHashMap<>();
        args.put("model", model);
        if (keepAlive != null) {
            args.put("keep_alive", keepAlive);
        }
        return map(call("models.load", args, Math.max(timeoutMs, 120_000)));
    }

    public CompletableFuture<Map<String, Object>> modelsUnload(String model) {
        Map<String, Object> args = new LinkedHashMap<>();
        args.put("model", model);
        return map(call("models.unload", args, Math.max(timeoutMs, 120_000)));
    }

    public CompletableFuture<List<Object>> collectionsList() {
        return list(call("collections.list", null, timeoutMs));
    }

    public CompletableFuture<Map<String, Object>> collectionsDrop(String collection) {
        return map(call("collections.drop", withCollection(collection, null), timeoutMs));
    }

    /** One collection's size, codes, lexical index and queued items; an app's token needs search:COLLECTION. */
    public CompletableFuture<Map<String, Object>> collectionsStats(String collection) {
        return map(call("collections.stats", withCollection(collection, null), timeoutMs));
    }

    public CompletableFuture<Map<String, Object>> stats() {
        return map(call("stats", null, timeoutMs));
    }

    /**
     * Any op with its args as plain Java values (String, Long, Double, Boolean, byte[], List, Map, Item);
     * completes with the result as plain Java values.
     */
    public CompletableFuture<Object> call(String op, Map<String, Object> args, int timeoutMs) {
        CompletableFuture<Object> future = new CompletableFuture<>();
        if (closing) {
            future.completeExceptionally(new IOException("the client is closed"));
            return future;
        }
        long id = ids.getAndIncrement();
        byte[] frame;
        try {
            frame = request(id, op, args);
        } catch (IOException | IllegalArgumentException e) {
            future.completeExceptionally(e);
            return future;
        }
        outbox.add(new Object[] {new Pending(id, System.nanoTime() + timeoutMs * 1_000_000L, future, op, timeoutMs), frame});
        synchronized (wakeIn) {
            wakeIn.send(new byte[0], ZMQ.DONTWAIT);
        }
        return future;
    }

    /** Waits for a future; a daemon error is thrown as its DaemonException. */
    public static <T> T await(CompletableFuture<T> future) throws IOException {
        try {
            return future.get();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IOException("interrupted", e);
        } catch (java.util.concurrent.ExecutionException e) {
            if (e.getCause() instanceof IOException) {
                throw (IOException) e.getCause();
            }
            throw new IOException(e.getCause());
        }
    }

    // -- plumbing -------------------------------------------------------------------------------

    private byte[] request(long id, String op, Map<String, Object> args) throws IOException {
        MessageBufferPacker p = MessagePack.newDefaultBufferPacker();
        p.packMapHeader(token == null ? 4 : 5);
        p.packString("v").packInt(1);
        p.packString("id").packLong(id);
        p.packString("op").packString(op);
        if (token != null) {
            p.packString("auth").packString(token);
        }
        p.packString("args");
        Msgpack.pack(p, args == null ? new HashMap<String, Object>() : args);
        p.close();
        return p.toByteArray();
    }

    private void run(ZMQ.Socket dealer, ZMQ.Socket wakeOut) {
        Map<Long, Pending> pending = new HashMap<>();
        PriorityQueue<Pending> deadlines = new PriorityQueue<>((a, b) -> Long.compare(a.deadline, b.deadline));
        ZMQ.Poller poller = new ZMQ.Poller(2);
        poller.register(dealer, ZMQ.Poller.POLLIN);
        poller.register(wakeOut, ZMQ.Poller.POLLIN);
        try {
            while (!closing) {
                long wait = -1;
                while (!deadlines.isEmpty() && !pending.containsKey(deadlines.peek().id)) {
                    deadlines.poll();  // answered already
                }
                if (!deadlines.isEmpty()) {
                    wait = Math.max(1, (deadlines.peek().deadline - System.nanoTime()) / 1_000_000L);
                }
                poller.poll(wait);
                while (wakeOut.recv(ZMQ.DONTWAIT) != null) {
                    // a wake-up only: the outbox holds the work
                }
                Object[] next;
                while ((next = outbox.poll()) != null) {
                    Pending req = (Pending) next[0];
                    pending.put(req.id, req);
                    deadlines.add(req);
                    if (!dealer.send((byte[]) next[1], ZMQ.DONTWAIT)) {
                        pending.remove(req.id);
                        req.future.completeExceptionally(new IOException("could not send " + req.op + " to " + endpoint));
                    }
                }
                byte[] frame;
                while ((frame = dealer.recv(ZMQ.DONTWAIT)) != null) {
                    deliver(frame, pending);
                }
                long now = System.nanoTime();
                while (!deadlines.isEmpty() && deadlines.peek().deadline <= now) {
                    Pending late = deadlines.poll();
                    if (pending.remove(late.id) != null) {
                        late.future.completeExceptionally(DaemonException.of("timeout",
                                "no reply to " + late.op + " from " + endpoint + " within " + late.timeoutMs + " ms", null));
                    }
                }
            }
        } finally {
            for (Pending p : pending.values()) {
                p.future.completeExceptionally(new IOException("the client was closed"));
            }
            dealer.close();
            wakeOut.close();
        }
    }

    private static void deliver(byte[] frame, Map<Long, Pending> pending) {
        Map<?, ?> reply;
        try (MessageUnpacker u = MessagePack.newDefaultUnpacker(frame)) {
            Value v = u.unpackValue();
            if (!v.isMapValue()) {
                return;
            }
            reply = (Map<?, ?>) Msgpack.toJava(v);
        } catch (IOException e) {
            return;  // not a reply we can read: no future to complete
        }
        Object rid = reply.get("id");
        Pending req = rid instanceof Long ? pending.remove(rid) : null;
        if (req == null) {
            return;  // a late reply to a request that timed out
        }
        if (Boolean.TRUE.equals(reply.get("ok"))) {
            req.future.complete(reply.get("result"));
            return;
        }
        Map<?, ?> err = (Map<?, ?>) reply.get("error");
        Map<String, Object> details = new HashMap<>();
        for (Map.Entry<?, ?> e : err.entrySet()) {
            if (!"code".equals(e.getKey()) && !"message".equals(e.getKey())) {
                details.put(String.valueOf(e.getKey()), e.getValue());
            }
        }
        req.future.completeExceptionally(DaemonException.of(String.valueOf(err.get("code")), String.valueOf(err.get("message")),
                details));
    }

    private int timeoutOf(Map<String, Object> args) {
        Object t = args.remove("timeout_ms");
        return t instanceof Number ? ((Number) t).intValue() : timeoutMs;
    }

    private Map<String, Object> withCollection(String collection, Map<String, Object> options) {
        Map<String, Object> args = argsFrom(options);
        args.put("collection", collection);
        return args;
    }

    /** A request's args: a copy of the caller's options (null: none), which the op's own fields then join. */
    private static Map<String, Object> argsFrom(Map<String, Object> options) {
        Map<String, Object> args = new LinkedHashMap<>();
        if (options != null) {
            args.putAll(options);
        }
        return args;
    }

    private CompletableFuture<Map<String, Object>> jobOp(String op, long job) {
        Map<String, Object> args = new LinkedHashMap<>();
        args.put("job", job);
        return map(call(op, args, timeoutMs));
    }

    @SuppressWarnings("unchecked")
    private static CompletableFuture<Map<String, Object>> map(CompletableFuture<Object> f) {
        return f.thenApply(r -> (Map<String, Object>) r);
    }

    @SuppressWarnings("unchecked")
    private static CompletableFuture<List<Object>> list(CompletableFuture<Object> f) {
        return f.thenApply(r -> (List<Object>) r);
    }

    @Override
    public void close() {
        closing = true;
        synchronized (wakeIn) {
            wakeIn.send(new byte[0], ZMQ.DONTWAIT);
        }
        try {
            io.join(5000);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        wakeIn.close();
        context.term();
    }
}
