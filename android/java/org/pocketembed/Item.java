package org.pocketembed;

import java.util.LinkedHashMap;
import java.util.Map;

/** One item to index: an id (a Long or a String), its text and optional JSON-like metadata. */
public final class Item {
    public final Object id;
    public final String text;
    public final Map<String, Object> metadata;

    public Item(Object id, String text, Map<String, Object> metadata) {
        if (!(id instanceof Long || id instanceof Integer || id instanceof String)) {
            throw new IllegalArgumentException("an item id is a long or a string");
        }
        this.id = id instanceof Integer ? Long.valueOf((Integer) id) : id;
        this.text = text;
        this.metadata = metadata;
    }

    public Item(Object id, String text) {
        this(id, text, null);
    }

    Map<String, Object> toMap() {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("id", id);
        m.put("text", text);
        if (metadata != null) {
            m.put("metadata", metadata);
        }
        return m;
    }
}
