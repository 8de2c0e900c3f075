import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;

import org.pocketembed.DaemonException;
import org.pocketembed.Item;
import org.pocketembed.PocketEmbedClient;
import org.pocketembed.PocketEmbedClient.Embeddings;
import org.pocketembed.PocketEmbedClient.Hit;

/**
 * Every op of protocol v1 through the Java client's typed API, against a live daemon (tests/test_java.py).
 * Arguments: ENDPOINT ADMIN_TOKEN SEARCH_ONLY_TOKEN SOURCE_DB. Prints "ok N" when every check held.
 */
public final class ProtocolCheck {
    private static int checks = 0;

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
        checks++;
    }

    static String codeOf(CompletableFuture<?> f) {
        try {
            PocketEmbedClient.await(f);
            return "ok";
        } catch (DaemonException e) {
            return e.getClass().getSimpleName() + ":" + e.code;
        } catch (Exception e) {
            return e.toString();
        }
    }

    static Map<String, Object> opts(Object... kv) {
        Map<String, Object> m = new HashMap<>();
        for (int i = 0; i < kv.length; i += 2) {
            m.put((String) kv[i], kv[i + 1]);
        }
        return m;
    }

    public static void main(String[] args) throws Exception {
        String endpoint = args[0];
        try (PocketEmbedClient c = new PocketEmbedClient(endpoint, 60_000, args[1]);
             PocketEmbedClient limited = new PocketEmbedClient(endpoint, 60_000, args[2]);
             PocketEmbedClient anonymous = new PocketEmbedClient(endpoint, 60_000, null)) {
            check(Boolean.TRUE.equals(PocketEmbedClient.await(anonymous.ping()).get("pong")), "ping needs no token");
            List<Object> models = PocketEmbedClient.await(c.modelsList());
            check(models.stream().anyMatch(m -> "all-minilm-l6-v2:q8_0".equals(((Map<?, ?>) m).get("name"))), "models.list");

            List<String> texts = Arrays.asList("are we still on for dinner?", "your parcel is on its way");
            Embeddings f = PocketEmbedClient.await(c.embed(texts, opts("dims", 128)));
            float[][] v = f.floats();
            double norm = 0;
            for (float x : v[0]) {
                norm += x * x;
            }
            check(v.length == 2 && v[0].length == 128 && Math.abs(norm - 1) < 1e-3, "float32 dims 128, normalized");
            byte[][] i8 = PocketEmbedClient.await(c.embed(texts, opts("dtype", "int8"))).int8();
            check(i8.length == 2 && i8[0].length == 384, "int8");
            byte[][] bits = PocketEmbedClient.await(c.embed(texts, opts("dtype", "binary", "dims", 64))).bits();
            check(bits.length == 2 && bits[0].length == 8, "binary");
            StringBuilder longText = new StringBuilder();
            for (int i = 0; i < 400; i++) {
                longText.append("word ");
            }
            List<String> tooLong = Arrays.asList(longText.toString());
            check(codeOf(c.embed(tooLong, null)).equals("InvalidRequest:text_too_long"), "text_too_long");
            check(PocketEmbedClient.await(c.embed(tooLong, opts("truncate", true))).count == 1, "truncate");

            // Many requests in flight on one connection, completed out of order by id.
            List<CompletableFuture<Embeddings>> inflight = new ArrayList<>();
            for (int i = 0; i < 32; i++) {
                inflight.add(c.embed(Arrays.asList("message number " + i), null));
            }
            CompletableFuture.allOf(inflight.toArray(new CompletableFuture[0])).get();
            check(inflight.stream().allMatch(x -> x.join().count == 1), "32 requests in flight");

            // A deadline sent as timeout_ms: work nobody waits for is dropped.
            List<String> many = new ArrayList<>();
            for (int i = 0; i < 1000; i++) {
                many.add("a long queue of texts number " + i);
            }
            check(codeOf(c.embed(many, opts("timeout_ms", 1))).equals("Timeout:timeout"), "timeout_ms");

            Map<String, Object> meta = new HashMap<>();
            meta.put("from", "ann");
            List<Item> items = Arrays.asList(new Item(1L, "Dinner at Luigi's at 8?", meta),
                    new Item("m2", "The parcel arrives tomorrow"), new Item(3L, "Happy birthday mum!", meta));
            Map<String, Object> added = PocketEmbedClient.await(c.indexAdd("sms", items, opts("store_text", true)));
            check(((Number) added.get("added")).intValue() == 3, "index.add");
            List<Hit> hits = PocketEmbedClient.await(c.search("sms", "restaurant tonight", 2,
                    opts("filter", meta, "rescore_multiplier", 5, "with_text", true)));
            check(hits.size() == 2 && Long.valueOf(1).equals(hits.get(0).id) && hits.get(0).text.startsWith("Dinner"),
                    "search with filter, multiplier, text");
            check(PocketEmbedClient.await(c.indexDelete("sms", Arrays.asList((Object) "m2"))) == 1, "index.delete");

            Map<String, Object> queued = PocketEmbedClient.await(c.indexEnqueue("later",
                    Arrays.asList(new Item(1L, "see you at the station"), new Item(2L, "running late")), null, null));
            check("queue".equals(queued.get("kind")), "index.enqueue");
            long qid = (Long) queued.get("id");
            for (int i = 0; i < 600 && !"done".equals(PocketEmbedClient.await(c.jobStatus(qid)).get("state")); i++) {
                Thread.sleep(100);
            }
            check("done".equals(PocketEmbedClient.await(c.jobStatus(qid)).get("state")), "queue job done");

            Map<String, Object> job = PocketEmbedClient.await(c.jobsSubmit(opts("db", args[3], "table", "messages",
                    "id_column", "id", "text_column", "body", "collection", "table")));
            long jid = (Long) job.get("id");
            check(PocketEmbedClient.await(c.jobsList(10)).size() >= 2, "jobs.list");
            String paused = codeOf(c.jobPause(jid));
            check(paused.equals("ok") || paused.equals("InvalidRequest:invalid_state"), "jobs.pause " + paused);
            String resumed = codeOf(c.jobResume(jid));
            check(resumed.equals("ok") || resumed.equals("InvalidRequest:invalid_state"), "jobs.resume " + resumed);
            check(codeOf(c.jobStatus(999_999)).equals("InvalidRequest:unknown_job"), "unknown_job");
            String cancelled = codeOf(c.jobCancel(jid));
            check(cancelled.equals("ok") || cancelled.equals("InvalidRequest:invalid_state"), "jobs.cancel " + cancelled);

            check(Boolean.TRUE.equals(PocketEmbedClient.await(c.modelsLoad("all-minilm-l6-v2:q4_0", "1m")).get("loaded")),
                    "models.load");
            check(Boolean.FALSE.equals(PocketEmbedClient.await(c.modelsUnload("all-minilm-l6-v2:q4_0")).get("loaded")),
                    "models.unload");
            check(codeOf(c.modelsLoad("nope:q1", null)).equals("ModelError:unknown_model"), "unknown_model");
            check(PocketEmbedClient.await(c.collectionsList()).size() >= 2, "collections.list");
            check(((Number) PocketEmbedClient.await(c.collectionsDrop("later")).get("dropped")).intValue() == 2,
                    "collections.drop");
            check(PocketEmbedClient.await(c.stats()).containsKey("requests"), "stats");
            check(codeOf(c.call("no.such.op", null, 5000)).equals("InvalidRequest:unknown_op"), "unknown_op");
            check(codeOf(c.call("search", opts("collection", "sms", "query", "x", "k", 0), 5000))
                    .equals("InvalidRequest:invalid_input"), "invalid_input");

            check(limited.search("sms", "birthday", 1).get(0).id.equals(3L), "a search:sms token searches sms");
            check(codeOf(limited.embed(texts, null)).equals("AccessDenied:forbidden"), "forbidden");
            check(codeOf(anonymous.stats()).equals("AccessDenied:unauthorized"), "unauthorized");
        }
        System.out.println("ok " + checks);
    }
}
