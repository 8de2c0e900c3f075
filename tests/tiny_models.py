"""Tiny random-weight transformers models, built in a test, for fidelity checks without trained weights.

No trained weights of the models users import (bge, e5, nomic, bge-reranker, ...)
can be fetched here, but their *architectures* can be built from a config with
random weights. Each builder writes a Hugging Face model folder (config,
tokenizer, safetensors, and the sentence-transformers pooling config the
converter reads), which the tests convert with the project's own converter,
import, and compare with torch on the same weights.

Weights are drawn wider than transformers' default (``initializer_range``
0.02): with the default every text maps to nearly the same vector, and a
cosine of 0.999 against torch would prove nothing. ``diversity`` measures that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 1234
INIT_RANGE = 0.2


@dataclass
class TinyModel:
    kind: str
    """"embed" or "rerank"."""
    path: Path
    pooling: str
    tokenizer: str
    architecture: str


def _pooling_config(path: Path, pooling: str, dims: int) -> None:
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dims,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
    }))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _bert_tokenizer(source: Path, out: Path):
    """MiniLM's WordPiece tokenizer files, as they are (the converter recognizes its pre-tokenizer by them)."""
    import shutil

    from transformers import AutoTokenizer

    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    return AutoTokenizer.from_pretrained(out)


def bert_cls(out: Path, tokenizer_dir: Path) -> TinyModel:
    """A BERT bi-encoder with CLS pooling (bge's layout), WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    tok = _bert_tokenizer(tokenizer_dir, out)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, initializer_range=INIT_RANGE)
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(out)
    _pooling_config(out, "cls", cfg.hidden_size)
    return TinyModel("embed", out, "cls", "WordPiece (bert)", "BertModel")


def bert_reranker(out: Path, tokenizer_dir: Path, type_vocab_size: int = 1) -> TinyModel:
    """A BertForSequenceClassification cross-encoder with one output (the ms-marco layout).

    ``type_vocab_size`` 1 by default: llama.cpp adds segment 0's embedding to every
    token, so a model with a second segment embedding is computed inexactly
    (tests/test_import.py measures by how much).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED + 1)
    out.mkdir(parents=True, exist_ok=True)
    tok = _bert_tokenizer(tokenizer_dir, out)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, initializer_range=INIT_RANGE,
                     num_labels=1, type_vocab_size=type_vocab_size)
    BertForSequenceClassification(cfg).eval().save_pretrained(out)
    return TinyModel("rerank", out, "rank (CLS → pooler → classifier)", "WordPiece (bert)", "BertForSequenceClassification")


def xlmr_mean(out: Path, corpus: list[str]) -> TinyModel:
    """An XLMRobertaModel bi-encoder with mean pooling and a SentencePiece unigram tokenizer trained on ``corpus``."""
    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    out.mkdir(parents=True, exist_ok=True)
    text = out / "corpus.txt"
    text.write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "spm"), vocab_size=1000, model_type="unigram",
                                   character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
                                   num_threads=1, minloglevel=2, input_sentence_size=100000, shuffle_input_sentence=False)
    text.unlink()
    (out / "spm.model").rename(out / "sentencepiece.bpe.model")  # the file name XLM-R models ship it under
    (out / "spm.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(out)  # transformers builds the fast tokenizer from the SentencePiece model
    tok.save_pretrained(out)
    torch.manual_seed(SEED + 2)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=130, initializer_range=INIT_RANGE,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           type_vocab_size=1)
    XLMRobertaModel(cfg, add_pooling_layer=False).eval().save_pretrained(out)
    _pooling_config(out, "mean", cfg.hidden_size)
    return TinyModel("embed", out, "mean", "SentencePiece unigram (XLM-R)", "XLMRobertaModel")


def llama_causal(out: Path, sp_model_from: Path) -> TinyModel:
    """A causal LM (LlamaForCausalLM) with no pooling: what ``models import`` must refuse."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model_from, out / "tokenizer.model")
    tok = LlamaTokenizer(vocab_file=str(out / "tokenizer.model"))
    tok.save_pretrained(out)
    torch.manual_seed(SEED + 3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=128, max_position_embeddings=128)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return TinyModel("lm", out, "none", "SentencePiece (llama)", "LlamaForCausalLM")


# -- torch references ------------------------------------------------------------------


def torch_embed(model: TinyModel, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Pooled vectors as sentence-transformers computes them (not normalized)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.path)
    net = AutoModel.from_pretrained(model.path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = net(**enc).last_hidden_state
            if model.pooling == "cls":
                out.append(hidden[:, 0])
            else:
                mask = enc["attention_mask"].unsqueeze(-1).float()
                out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out).numpy().astype(np.float64)


def torch_rerank(model: TinyModel, query: str, docs: list[str], max_length: int = 128) -> np.ndarray:
    """The cross-encoder's raw logits for (query, doc) pairs, as transformers computes them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.path)
    net = AutoModelForSequenceClassification.from_pretrained(model.path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(docs), 32):
            enc = tok([query] * len(docs[i:i + 32]), docs[i:i + 32], padding=True, truncation="only_second",
                      max_length=max_length, return_tensors="pt")
            if net.config.type_vocab_size == 1:
                enc.pop("token_type_ids", None)  # one segment embedding: every token is segment 0
            out.append(net(**enc).logits[:, 0])
    return torch.cat(out).numpy().astype(np.float64)


def diversity(vectors: np.ndarray) -> float:
    """Mean cosine between different texts' vectors: far below a fidelity bound means that bound can fail."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = v @ v.T
    n = len(v)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
