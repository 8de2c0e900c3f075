package org.pocketembed;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.Value;
import org.msgpack.value.ValueFactory;
import org.zeromq.ZMQ;

/**
 * Android-side client of the pocketembed daemon (protocol v1, ipc/PROTOCOL.md).
 *
 * <p>JeroMQ is pure Java and has no Unix-domain ipc:// transport, so an Android
 * app connects to the daemon's loopback TCP endpoint (start it with
 * {@code pocketembed serve --tcp 127.0.0.1:PORT}). Every app on the phone can
 * reach that port, so the daemon serves it only to requests carrying a client
 * token ({@code pocketembed clients add NAME --allow ...} in Termux prints one).
 * One DEALER socket; one request in flight at a time per client. Not thread-safe.
 */
public final class PocketEmbedClient implements AutoCloseable {

    /** An error reply from the daemon, carrying its stable code. */
    public static final class DaemonException extends IOException {
        public final String code;

        DaemonException(String code, String message) {
            super("[" + code + "] " + message);
            this.code = code;
        }
    }

    private final ZMQ.Context context;
    private final ZMQ.Socket socket;
    private final int timeoutMs;
    private final String token;
    private long nextId = 1;

    /** One search result: the item's id (a Long or a String), its score and, when asked for, its text. */
    public static final class Hit {
        public final Object id;
        public final double score;
        public final String text;

        Hit(Object id, double score, String text) {
            this.id = id;
            this.score = score;
            this.text = text;
        }
    }

    public PocketEmbedClient(String endpoint, int timeoutMs) {
        this(endpoint, timeoutMs, null);
    }

    /** @param token the client token the daemon's TCP endpoint requires (null: none) */
    public PocketEmbedClient(String endpoint, int timeoutMs, String token) {
        this.token = token;
        this.context = ZMQ.context(1);
        this.socket = context.socket(ZMQ.DEALER);
        this.socket.setLinger(0);
        this.socket.setReceiveTimeOut(timeoutMs);
        this.socket.connect(endpoint);
        this.timeoutMs = timeoutMs;
    }

    /** Embeds texts with the daemon's default model; returns n vectors of float32. */
    public float[][] embed(List<String> texts, String model) throws IOException {
        MessageBufferPacker p = MessagePack.newDefaultBufferPacker();
        long id = header(p, "embed");
        p.packMapHeader(model == null ? 2 : 3);
        p.packString("texts").packArrayHeader(texts.size());
        for (String t : texts) {
            p.packString(t);
        }
        p.packString("dtype").packString("float32");
        if (model != null) {
            p.packString("model").packString(model);
        }
        p.close();
        Map<Value, Value> result = call(p.toByteArray(), id);

        List<Value> shape = result.get(ValueFactory.newString("shape")).asArrayValue().list();
        int n = shape.get(0).asIntegerValue().toInt();
        int dims = shape.get(1).asIntegerValue().toInt();
        byte[] data = result.get(ValueFactory.newString("data")).asBinaryValue().asByteArray();
        ByteBuffer buf = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
        float[][] out = new float[n][dims];
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < dims; j++) {
                out[i][j] = buf.getFloat();
            }
        }
        return out;
    }

    /** The k items of {@code collection} nearest to {@code query}, best first, with their texts where kept. */
    public List<Hit> search(String collection, String query, int k) throws IOException {
        MessageBufferPacker p = MessagePack.newDefaultBufferPacker();
        long id = header(p, "search");
        p.packMapHeader(4);
        p.packString("collection").packString(collection);
        p.packString("query").packString(query);
        p.packString("k").packInt(k);
        p.packString("with_text").packBoolean(true);
        p.close();
        Map<Value, Value> result = call(p.toByteArray(), id);
        List<Hit> hits = new ArrayList<>();
        for (Value v : result.get(ValueFactory.newString("hits")).asArrayValue()) {
            Map<Value, Value> h = v.asMapValue().map();
            Value hid = h.get(ValueFactory.newString("id"));
            Value text = h.get(ValueFactory.newString("text"));
            hits.add(new Hit(hid.isIntegerValue() ? (Object) hid.asIntegerValue().toLong() : hid.asStringValue().asString(),
                    h.get(ValueFactory.newString("score")).asFloatValue().toDouble(),
                    text == null || text.isNilValue() ? null : text.asStringValue().asString()));
        }
        return hits;
    }

    /** Writes the envelope of a request up to its args (the caller packs them) and returns its id. */
    private long header(MessageBufferPacker p, String op) throws IOException {
        long id = nextId++;
        p.packMapHeader(token == null ? 4 : 5);
        p.packString("v").packInt(1);
        p.packString("id").packLong(id);
        p.packString("op").packString(op);
        if (token != null) {
            p.packString("auth").packString(token);
        }
        p.packString("args");
        return id;
    }

    private Map<Value, Value> call(byte[] request, long id) throws IOException {
        if (!socket.send(request, 0)) {
            throw new IOException("could not send the request");
        }
        while (true) {
            byte[] frame = socket.recv(0);
            if (frame == null) {
                throw new DaemonException("timeout", "no reply within " + timeoutMs + " ms");
            }
            MessageUnpacker u = MessagePack.newDefaultUnpacker(frame);
            Map<Value, Value> reply = u.unpackValue().asMapValue().map();
            u.close();
            Value rid = reply.get(ValueFactory.newString("id"));
            if (rid == null || !rid.isIntegerValue() || rid.asIntegerValue().toLong() != id) {
                continue; // a late reply to an earlier request
            }
            if (reply.get(ValueFactory.newString("ok")).asBooleanValue().getBoolean()) {
                return reply.get(ValueFactory.newString("result")).asMapValue().map();
            }
            Map<Value, Value> err = reply.get(ValueFactory.newString("error")).asMapValue().map();
            throw new DaemonException(err.get(ValueFactory.newString("code")).asStringValue().asString(),
                    err.get(ValueFactory.newString("message")).asStringValue().asString());
        }
    }

    @Override
    public void close() {
        socket.close();
        context.term();
    }
}
