import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;

import org.pocketembed.DaemonException;
import org.pocketembed.Item;
import org.pocketembed.PocketEmbedClient;
import org.pocketembed.PocketEmbedClient.Hit;

/**
 * An SMS app's whole story in one JVM, against a daemon that may be slow (emulated): tests/test_arm_daemon.py.
 *
 * <pre>
 * PhoneFlow ENDPOINT APP_TOKEN OWNER_TOKEN MESSAGES.tsv MODEL DEADLINE_S ID...
 * </pre>
 *
 * The app (APP_TOKEN: index:sms, search:sms) enqueues every message of the TSV (a header, then label TAB
 * text; message i from 1 gets id i) into collection "sms" on battery, follows the job until the daemon
 * says it waits, prints that, and reads one line from stdin: the caller switches the battery to charging
 * first. Then it follows the job to "done", searches the text of each message ID, is refused
 * models.unload; the owner's tool (OWNER_TOKEN: admin) unloads MODEL. One tab-separated event a line:
 *
 * <pre>
 * enqueued JOB N MS          waiting STATE SCANNED TOTAL EMBEDDED REASON
 * done SCANNED EMBEDDED MS   hit ID FIRST_ID SCORE TEXT     unload_refused CODE
 * unloaded MODEL LOADED...   flow_ms MS
 * </pre>
 *
 * Every wait polls the daemon's state (no fixed sleeps standing in for progress) and gives up after
 * DEADLINE_S, printing the last state it saw.
 */
public final class PhoneFlow {
    private static final long T0 = System.nanoTime();

    static long ms() {
        return (System.nanoTime() - T0) / 1_000_000;
    }

    static void emit(Object... fields) {
        StringBuilder b = new StringBuilder();
        for (int i = 0; i < fields.length; i++) {
            b.append(i == 0 ? "" : "\t").append(fields[i] == null ? "" : String.valueOf(fields[i]).replace('\t', ' ')
                    .replace('\n', ' '));
        }
        System.out.println(b);
        System.out.flush();
    }

    interface Done {
        boolean test(Map<String, Object> job);
    }

    /** Polls the job until ``done`` holds; fails with the last state seen at the deadline. */
    static Map<String, Object> until(PocketEmbedClient app, long job, Done done, long deadlineMs, String what)
            throws Exception {
        Map<String, Object> s = null;
        while (System.nanoTime() / 1_000_000 < deadlineMs) {
            s = PocketEmbedClient.await(app.jobStatus(job));
            if (done.test(s)) {
                return s;
            }
            Thread.sleep(200);
        }
        throw new AssertionError(what + ": not reached by the deadline; last state " + s);
    }

    public static void main(String[] args) throws Exception {
        String endpoint = args[0];
        List<String> lines = Files.readAllLines(Paths.get(args[3]), StandardCharsets.UTF_8);
        String model = args[4];
        long deadlineS = Long.parseLong(args[5]);
        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        try (PocketEmbedClient app = new PocketEmbedClient(endpoint, 120_000, args[1]);
             PocketEmbedClient owner = new PocketEmbedClient(endpoint, 120_000, args[2])) {
            // The inbox in batches of 100, every request in flight at once on the one connection.
            List<CompletableFuture<Map<String, Object>>> sent = new ArrayList<>();
            Map<String, Object> options = new HashMap<>();
            options.put("store_text", true);
            List<Item> batch = new ArrayList<>();
            for (int i = 1; i < lines.size(); i++) {
                String line = lines.get(i);
                batch.add(new Item((long) i, line.substring(line.indexOf('\t') + 1)));
                if (batch.size() == 100 || i == lines.size() - 1) {
                    sent.add(app.indexEnqueue("sms", batch, null, options));
                    batch = new ArrayList<>();
                }
            }
            long job = -1;
            long enqueued = 0;
            for (CompletableFuture<Map<String, Object>> f : sent) {
                Map<String, Object> r = PocketEmbedClient.await(f);
                job = (Long) r.get("id");
                enqueued += (Long) r.get("enqueued");
            }
            emit("enqueued", job, enqueued, ms());

            long deadline = System.nanoTime() / 1_000_000 + deadlineS * 1000;
            Map<String, Object> w = until(app, job, s -> "waiting".equals(s.get("state")), deadline, "waiting");
            emit("waiting", w.get("state"), w.get("scanned"), w.get("total"), w.get("embedded"), w.get("reason"));

            String go = stdin.readLine();  // the caller has put the phone on the charger
            if (!"charging".equals(go)) {
                throw new AssertionError("expected 'charging' on stdin, got " + go);
            }
            long charged = ms();
            deadline = System.nanoTime() / 1_000_000 + deadlineS * 1000;
            Map<String, Object> d = until(app, job, s -> "done".equals(s.get("state")), deadline, "done");
            emit("done", d.get("scanned"), d.get("embedded"), ms() - charged);

            for (int a = 6; a < args.length; a++) {
                int id = Integer.parseInt(args[a]);
                String text = lines.get(id).substring(lines.get(id).indexOf('\t') + 1);
                List<Hit> hits = app.search("sms", text, 3);
                Hit first = hits.get(0);
                emit("hit", id, first.id, first.score, first.text);
            }

            try {
                PocketEmbedClient.await(app.modelsUnload(model));
                emit("unload_refused", "none");
            } catch (DaemonException e) {
                emit("unload_refused", e.code);
            }
            Map<String, Object> u = PocketEmbedClient.await(owner.modelsUnload(model));
            List<String> loaded = new ArrayList<>();
            for (Object m : PocketEmbedClient.await(owner.modelsList())) {
                Map<?, ?> entry = (Map<?, ?>) m;
                if (Boolean.TRUE.equals(entry.get("loaded"))) {
                    loaded.add(String.valueOf(entry.get("name")));
                }
            }
            emit("unloaded", u.get("model"), String.join(",", loaded));
            emit("flow_ms", ms());
        }
    }
}
