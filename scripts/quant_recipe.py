"""The q4_0 recipe sweep: which tensors must stay q8_0 for MiniLM to survive q4_0.

For each recipe it quantizes the prepared f16 GGUF with llama_model_quantize
and tensor overrides, embeds N real SMS and prints the file size and the cosine
to sentence-transformers fp32 (mean, min, 1st percentile). The recipe in
gguf_models/catalog.py is the one chosen from this table.

    python scripts/quant_recipe.py [--count 1000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from make_reference import pick  # noqa: E402
from pocketembed.sms import load_sms

from pocketembed import paths  # noqa: E402
from pocketembed.daemon.engine import Engine  # noqa: E402
from pocketembed.gguf_models import manifest  # noqa: E402
from pocketembed.gguf_models.catalog import MINILM_Q4_OVERRIDES, TensorRule as R, get  # noqa: E402
from pocketembed.gguf_models.prepare import source_model_dir  # noqa: E402
from pocketembed.gguf_models.quantize import quantize  # noqa: E402

TOK4 = R(r"^token_embd\.weight$", "q4_0")
RECIPES: dict[str, tuple[str, tuple[R, ...]]] = {
    "plain q8_0": ("q8_0", ()),
    "plain q4_0 (llama.cpp default)": ("q4_0", ()),
    "q4_0 + attn_v q8_0": ("q4_0", (R(r"\.attn_v\.weight$", "q8_0"),)),
    "q4_0 + attn_output q8_0": ("q4_0", (R(r"\.attn_output\.weight$", "q8_0"),)),
    "q4_0 + ffn_up q8_0": ("q4_0", (R(r"\.ffn_up\.weight$", "q8_0"),)),
    "q4_0 + first block q8_0": ("q4_0", (R(r"^blk\.0\.", "q8_0"),)),
    "q4_0 + last block q8_0": ("q4_0", (R(r"^blk\.5\.", "q8_0"),)),
    "token_embd q4_0 only": ("q4_0", (TOK4,)),
    "token_embd q4_0, attn_v + ffn_up q8_0": ("q4_0", (TOK4, R(r"\.attn_v\.weight$", "q8_0"), R(r"\.ffn_up\.weight$", "q8_0"))),
    "catalog recipe": ("q4_0", MINILM_Q4_OVERRIDES),
    "token_embd q4_0, all blocks q8_0": ("q4_0", (TOK4, R(r"^blk\.", "q8_0"))),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000)
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    root = paths.home()
    f16 = manifest.verify(root, get("all-minilm-l6-v2:f16"))
    texts = pick(load_sms(), args.count)
    st = SentenceTransformer(str(source_model_dir(get(None).source, root, progress=lambda m: None)), device="cpu")
    ref = st.encode(texts, batch_size=32, normalize_embeddings=True)

    print(f"{'recipe':42s} {'size MB':>8s} {'mean':>8s} {'min':>7s} {'p1':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (qtype, rules) in RECIPES.items():
            out = Path(tmp) / "candidate.gguf"
            quantize(f16, out, qtype, rules)
            with Engine(out) as engine:
                c = (engine.embed(texts, truncate=True) * ref).sum(axis=1)
            print(f"{name:42s} {out.stat().st_size / 1e6:8.2f} {c.mean():8.5f} {c.min():7.4f} {np.percentile(c, 1):7.4f}", flush=True)


if __name__ == "__main__":
    main()
