"""``python -m pocketembed.gguf_models.probe FILE POOLING FILE_TYPE``: can llama.cpp serve this file?

Run by ``models import`` as a child process, because a file llama.cpp does not
expect can make it abort the whole process (a failed GGML_ASSERT). Loads the
file with the daemon's own engine, tokenizes a text of awkward characters, embeds
one text (or scores one pair, for a reranker), checks the output is finite, and prints one JSON line: the facts the
manifest records, or ``{"error": ...}``.
"""

from __future__ import annotations

import json
import sys

import numpy as np


TORTURE = "Café ñ 日本語 Ωμέγα 🎉👍🏽\n\ttab\r\x01\x7f <s> [SEP] </s> <|endoftext|> ﬁ 1,234.5 %$#@ end"
"""Text a daemon's callers send: accents, scripts, emoji, controls, other vocabularies' special tokens."""


def main(argv: list[str]) -> int:
    path, pooling, file_type = argv[0], argv[1], argv[2]
    from pocketembed.daemon.engine import Engine, EngineConfig
    from pocketembed.errors import PocketEmbedError

    try:
        with Engine(path, EngineConfig(max_tokens=64, pooling=pooling, threads=1, contexts=1),
                    quantized=file_type not in ("f32", "f16", "bf16")) as e:
            e.token_ids(TORTURE)  # a vocabulary llama.cpp cannot handle aborts here, in this child
            if e.pooling == "rank":
                out = e.rerank("what time is the meeting", ["The meeting moved to 3 pm tomorrow."])
            else:
                out = e.embed(["The meeting moved to 3 pm tomorrow."], normalize=False)
            if not np.all(np.isfinite(out)):
                raise PocketEmbedError("its output is not finite (NaN or inf)")
            facts = {"ok": True, "dims": e.dims, "pooling": e.pooling, "n_ctx_train": e.n_ctx_train}
    except PocketEmbedError as err:
        facts = {"error": err.message}
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
