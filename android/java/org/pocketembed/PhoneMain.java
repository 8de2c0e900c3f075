package org.pocketembed;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;

/**
 * What an SMS app does with the client, as a command-line program (token from {@code POCKETEMBED_TOKEN}):
 *
 * <pre>
 * PhoneMain enqueue ENDPOINT COLLECTION MESSAGES.tsv   # hand the whole inbox over; prints the queue job's id
 * PhoneMain status  ENDPOINT JOB                       # state, applied/total, embedded, reason
 * PhoneMain search  ENDPOINT COLLECTION QUERY K        # id, score, text per hit
 * </pre>
 *
 * The TSV is the SMS corpus's shape (a header, then label TAB text); message i (from 1) gets id i.
 * Batches of 500 are enqueued with all requests in flight at once on the one connection.
 */
public final class PhoneMain {
    public static void main(String[] args) throws Exception {
        try (PocketEmbedClient client = new PocketEmbedClient(args[1], 60_000, System.getenv("POCKETEMBED_TOKEN"))) {
            switch (args[0]) {
                case "enqueue":
                    enqueue(client, args[2], args[3]);
                    break;
                case "status": {
                    Map<String, Object> job = PocketEmbedClient.await(client.jobStatus(Long.parseLong(args[2])));
                    System.out.println(job.get("state") + "\t" + job.get("scanned") + "\t" + job.get("total") + "\t"
                            + job.get("embedded") + "\t" + (job.get("reason") == null ? "" : job.get("reason")));
                    break;
                }
                case "search":
                    for (PocketEmbedClient.Hit h : client.search(args[2], args[3], Integer.parseInt(args[4]))) {
                        System.out.println(h.id + "\t" + h.score + "\t" + (h.text == null ? "" : h.text));
                    }
                    break;
                default:
                    System.err.println("usage: PhoneMain enqueue|status|search ...");
                    System.exit(2);
            }
        } catch (DaemonException e) {
            System.err.println("pocketembed: error[" + e.code + "]: " + e.getMessage());
            System.exit(1);
        }
    }

    private static void enqueue(PocketEmbedClient client, String collection, String tsv) throws IOException {
        List<String> lines = Files.readAllLines(Paths.get(tsv), StandardCharsets.UTF_8);
        List<CompletableFuture<Map<String, Object>>> sent = new ArrayList<>();
        Map<String, Object> options = new HashMap<>();
        options.put("store_text", true);
        List<Item> batch = new ArrayList<>();
        for (int i = 1; i < lines.size(); i++) {
            String line = lines.get(i);
            batch.add(new Item((long) i, line.substring(line.indexOf('\t') + 1)));
            if (batch.size() == 500 || i == lines.size() - 1) {
                sent.add(client.indexEnqueue(collection, batch, null, options));
                batch = new ArrayList<>();
            }
        }
        Object job = null;
        long enqueued = 0;
        for (CompletableFuture<Map<String, Object>> f : sent) {
            Map<String, Object> r = PocketEmbedClient.await(f);
            job = r.get("id");
            enqueued += (Long) r.get("enqueued");
        }
        System.out.println(job + "\t" + enqueued);
    }
}
