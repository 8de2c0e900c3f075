"""Generate the fidelity fixture: sentence-transformers fp32 vectors for real SMS.

Run once (needs the `reference` extra and the model wheel, no network beyond
PyPI); the output is committed as tests/fixtures/minilm_reference.npz and the
fidelity test compares pocketembed's GGUF vectors against it.

    python scripts/make_reference.py [--count 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pocketembed.sms import load_sms

from pocketembed.gguf_models.prepare import source_model_dir  # noqa: E402
from pocketembed.gguf_models.catalog import get  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"


def pick(texts: list[str], count: int) -> list[str]:
    """Evenly spaced messages: short and long, ham and spam, no cherry-picking."""
    idx = np.linspace(0, len(texts) - 1, count).round().astype(int)
    return [texts[i] for i in idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    model_dir = source_model_dir(get("all-minilm-l6-v2:f16").source)
    st = SentenceTransformer(str(model_dir), device="cpu")
    texts = pick(load_sms(), args.count)
    vecs = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, texts=np.array(texts), vectors=vecs)
    print(f"wrote {args.out}: {vecs.shape[0]} texts x {vecs.shape[1]} dims")


if __name__ == "__main__":
    main()
