"""Quantize a GGUF with llama.cpp's own quantizer, optionally with a mixed recipe.

``llama_model_quantize`` takes a NULL-terminated array of (regex, ggml type)
tensor overrides; that is how the q4_0 file keeps its most sensitive tensors at
q8_0 while the bulk is q4_0.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

from pocketembed.errors import PrepareError

from .catalog import TensorRule

FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
GGML_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0", "f32": "GGML_TYPE_F32"}


def quantize(src: Path, dst: Path, qtype: str, overrides: Sequence[TensorRule] = (), threads: int = 0) -> None:
    """Write ``dst`` as ``qtype`` from the f16/f32 GGUF ``src``."""
    from pocketembed.daemon import llama_runtime as rt

    llama = rt.llama
    rt.ensure_backend()
    if qtype not in FTYPES:
        raise PrepareError(f"cannot quantize to {qtype!r}; supported: {', '.join(FTYPES)}")
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, FTYPES[qtype])
    params.nthread = threads
    array = None
    if overrides:
        array = (llama.llama_model_tensor_override * (len(overrides) + 1))()
        for slot, rule in zip(array, overrides):
            slot.pattern = rule.pattern.encode()
            slot.type = getattr(llama, GGML_TYPES[rule.qtype])
        array[len(overrides)].pattern = None  # terminator
        params.tt_overrides = ctypes.cast(array, ctypes.POINTER(llama.llama_model_tensor_override))
    tmp = dst.with_name(dst.name + ".part")
    with rt.capture_log() as captured:
        rc = llama.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise PrepareError(f"llama_model_quantize({qtype}) failed: {captured.last_error() or rc}")
    os.replace(tmp, dst)
