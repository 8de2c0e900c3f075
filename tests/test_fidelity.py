"""pocketembed's GGUF vectors against sentence-transformers fp32 on 200 real SMS.

The fixture was made by scripts/make_reference.py (sentence-transformers with the
same source weights). Thresholds are the issue's goals.
"""

from pathlib import Path

import numpy as np

from conftest import FIXTURES

REF = np.load(FIXTURES / "minilm_reference.npz")
TEXTS = [str(t) for t in REF["texts"]]


def cosines(engine) -> np.ndarray:
    vecs = engine.embed(TEXTS, truncate=True)
    return (vecs * REF["vectors"]).sum(axis=1)


def test_fixture_is_real_sms():
    assert len(TEXTS) >= 100 and REF["vectors"].shape == (len(TEXTS), 384)


def test_f16_matches_reference(engines):
    c = cosines(engines["f16"])
    assert c.min() >= 0.9999, c.min()


def test_q8_0_fidelity(engines):
    c = cosines(engines["q8_0"])
    print(f"q8_0 vs sentence-transformers: mean {c.mean():.5f} min {c.min():.5f}")
    assert c.mean() >= 0.995


def test_q4_0_fidelity_and_size(engines, home):
    c = cosines(engines["q4_0"])
    print(f"q4_0 vs sentence-transformers: mean {c.mean():.5f} min {c.min():.5f}")
    assert c.mean() >= 0.98
    assert c.min() >= 0.90
    assert Path(engines["q4_0"].path).stat().st_size < 22_000_000


def test_q4_0_recipe_is_mixed(engines):
    """The file is really q4_0 in bulk, with the measured sensitive tensors at q8_0."""
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(engines["q4_0"].path).tensors}
    assert types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.2.ffn_up.weight"] == "Q8_0"
    assert types["blk.5.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_v.bias"] == "F32"


def test_bf16_fidelity_and_type(home):
    """bf16 (the fast choice on CPUs with bf16 dot products) keeps f16's fidelity, and really is bf16."""
    from gguf import GGUFReader

    from pocketembed.daemon.models import open_engine

    spec, engine = open_engine("all-minilm-l6-v2:bf16", home)
    try:
        c = cosines(engine)
        print(f"bf16 vs sentence-transformers: mean {c.mean():.5f} min {c.min():.5f}")
        assert c.min() >= 0.9995, c.min()
        types = {t.name: t.tensor_type.name for t in GGUFReader(engine.path).tensors}
        assert types["blk.0.attn_q.weight"] == "BF16" and not spec.quantized
    finally:
        engine.close()
