package org.pocketembed;

import java.util.List;

/**
 * Command-line check of the client's search: prints one line per hit, {@code id<TAB>score<TAB>text}.
 *
 * <pre>POCKETEMBED_TOKEN=pe_... java -cp ... org.pocketembed.SearchMain tcp://127.0.0.1:5555 sms "dinner tonight?" 5</pre>
 */
public final class SearchMain {
    public static void main(String[] args) throws Exception {
        try (PocketEmbedClient client = new PocketEmbedClient(args[0], 30000, System.getenv("POCKETEMBED_TOKEN"))) {
            List<PocketEmbedClient.Hit> hits = client.search(args[1], args[2], Integer.parseInt(args[3]));
            for (PocketEmbedClient.Hit h : hits) {
                System.out.println(h.id + "\t" + h.score + "\t" + (h.text == null ? "" : h.text));
            }
        } catch (DaemonException e) {
            System.err.println("pocketembed: error[" + e.code + "]: " + e.getMessage());
            System.exit(1);
        }
    }
}
