import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import org.pocketembed.PocketEmbedClient;
import org.pocketembed.PocketEmbedClient.Hit;

/**
 * The Java client's rerank and search-with-rerank against a live daemon (tests/test_import.py).
 * Arguments: ENDPOINT RERANKER COLLECTION QUERY DOCUMENT... (the token in $POCKETEMBED_TOKEN). Prints one line:
 * the rerank scores in input order, then the reranked search's ids and rerank scores.
 */
public final class RerankCheck {
    public static void main(String[] args) throws Exception {
        String endpoint = args[0];
        String model = args[1];
        String collection = args[2];
        String query = args[3];
        List<String> docs = Arrays.asList(Arrays.copyOfRange(args, 4, args.length));
        try (PocketEmbedClient c = new PocketEmbedClient(endpoint, 60_000, System.getenv("POCKETEMBED_TOKEN"))) {
            double[] scores = PocketEmbedClient.await(c.rerank(query, docs, model, null));
            Map<String, Object> options = new HashMap<>();
            options.put("rerank", model);
            options.put("rerank_top", 20);
            List<Hit> hits = PocketEmbedClient.await(c.search(collection, query, 3, options));
            List<String> ids = new ArrayList<>();
            List<String> reranked = new ArrayList<>();
            for (Hit h : hits) {
                ids.add(String.valueOf(h.id));
                reranked.add(String.valueOf(h.rerankScore));
            }
            System.out.println("{\"scores\": " + Arrays.toString(scores) + ", \"ids\": " + ids + ", \"rerank_scores\": "
                    + reranked + "}");
        }
    }
}
