package org.pocketembed;

import java.io.BufferedReader;
import java.io.DataOutputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * Command-line check of the client: reads texts (one per line) from stdin,
 * embeds them and writes the vectors to stdout as raw little-endian float32.
 *
 * <pre>POCKETEMBED_TOKEN=pe_... java -cp ... org.pocketembed.EmbedMain tcp://127.0.0.1:5555 &lt; texts.txt &gt; vectors.f32</pre>
 */
public final class EmbedMain {
    public static void main(String[] args) throws Exception {
        List<String> texts = new ArrayList<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line; (line = in.readLine()) != null; ) {
            texts.add(line);
        }
        try (PocketEmbedClient client = new PocketEmbedClient(args[0], 30000, System.getenv("POCKETEMBED_TOKEN"))) {
            float[][] vecs = client.embedFloats(texts, args.length > 1 ? args[1] : null);
            DataOutputStream out = new DataOutputStream(System.out);
            for (float[] v : vecs) {
                for (float x : v) {
                    out.writeInt(Integer.reverseBytes(Float.floatToRawIntBits(x)));
                }
            }
            out.flush();
        } catch (DaemonException e) {
            System.err.println("pocketembed: error[" + e.code + "]: " + e.getMessage());
            System.exit(1);
        }
    }
}
