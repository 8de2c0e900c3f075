package org.pocketembed;

import java.io.IOException;
import java.util.ArrayList;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.msgpack.core.MessageBufferPacker;
import org.msgpack.value.Value;

/** Plain Java values to msgpack and back: what the protocol's args and results are made of. */
final class Msgpack {
    private Msgpack() {
    }

    /** Packs null, Boolean, integers, Float/Double, String, byte[], Collection, Object[] and Map (string keys). */
    static void pack(MessageBufferPacker p, Object v) throws IOException {
        if (v == null) {
            p.packNil();
        } else if (v instanceof Boolean) {
            p.packBoolean((Boolean) v);
        } else if (v instanceof Long || v instanceof Integer || v instanceof Short || v instanceof Byte) {
            p.packLong(((Number) v).longValue());
        } else if (v instanceof Number) {
            p.packDouble(((Number) v).doubleValue());
        } else if (v instanceof String) {
            p.packString((String) v);
        } else if (v instanceof byte[]) {
            byte[] b = (byte[]) v;
            p.packBinaryHeader(b.length);
            p.writePayload(b);
        } else if (v instanceof Map) {
            Map<?, ?> m = (Map<?, ?>) v;
            p.packMapHeader(m.size());
            for (Map.Entry<?, ?> e : m.entrySet()) {
                p.packString(String.valueOf(e.getKey()));
                pack(p, e.getValue());
            }
        } else if (v instanceof Collection) {
            Collection<?> c = (Collection<?>) v;
            p.packArrayHeader(c.size());
            for (Object x : c) {
                pack(p, x);
            }
        } else if (v instanceof Object[]) {
            Object[] a = (Object[]) v;
            p.packArrayHeader(a.length);
            for (Object x : a) {
                pack(p, x);
            }
        } else if (v instanceof Item) {
            pack(p, ((Item) v).toMap());
        } else {
            throw new IllegalArgumentException("cannot send a " + v.getClass().getName() + " to the daemon");
        }
    }

    /** A msgpack value as plain Java: null, Boolean, Long, Double, String, byte[], List, Map. */
    static Object toJava(Value v) {
        switch (v.getValueType()) {
            case NIL:
                return null;
            case BOOLEAN:
                return v.asBooleanValue().getBoolean();
            case INTEGER:
                return v.asIntegerValue().isInLongRange() ? (Object) v.asIntegerValue().toLong() : v.asIntegerValue().toBigInteger();
            case FLOAT:
                return v.asFloatValue().toDouble();
            case STRING:
                return v.asStringValue().asString();
            case BINARY:
                return v.asBinaryValue().asByteArray();
            case ARRAY: {
                List<Object> out = new ArrayList<>();
                for (Value x : v.asArrayValue()) {
                    out.add(toJava(x));
                }
                return out;
            }
            case MAP: {
                Map<String, Object> out = new LinkedHashMap<>();
                for (Map.Entry<Value, Value> e : v.asMapValue().entrySet()) {
                    out.put(e.getKey().isStringValue() ? e.getKey().asStringValue().asString() : e.getKey().toString(),
                            toJava(e.getValue()));
                }
                return out;
            }
            default:
                return v.toString();
        }
    }
}
