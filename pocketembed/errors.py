"""Errors with stable codes.

Every failure a user can cause maps to one code here. The CLI prints
``error[code]: message`` and exits non-zero; the daemon (a later layer) sends the
same code over the wire, so a client in any language can branch on it.
"""

from __future__ import annotations


class PocketEmbedError(Exception):
    """Base class: a user-facing failure with a stable machine-readable code."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InvalidInput(PocketEmbedError):
    """The caller sent something the engine cannot embed (empty text, bad dims, ...)."""

    code = "invalid_input"


class EmptyText(InvalidInput):
    code = "empty_text"


class TextTooLong(InvalidInput):
    code = "text_too_long"


class UnknownModel(PocketEmbedError):
    code = "unknown_model"


class ModelNotPrepared(PocketEmbedError):
    """The model is in the catalog but its file has not been prepared yet."""

    code = "model_not_prepared"


class ModelCorrupt(PocketEmbedError):
    """The file exists but is not what the manifest says (sha256, truncated, not GGUF)."""

    code = "model_corrupt"


class UnsupportedBuild(PocketEmbedError):
    """The installed llama.cpp build is known to crash with this model."""

    code = "unsupported_build"


class PrepareError(PocketEmbedError):
    code = "prepare_failed"


class ImportRefused(PocketEmbedError):
    """``models import`` will not take this file (or name); nothing was changed."""

    code = "import_refused"


class WrongModelKind(InvalidInput):
    """An embedding op named a reranker, or ``rerank`` named an embedding model."""

    code = "wrong_model_kind"


# -- the daemon's own failures -----------------------------------------------------


class Busy(PocketEmbedError):
    """A scheduler lane is full; ``retry_after_ms`` estimates when it will have room."""

    code = "busy"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class TooLarge(PocketEmbedError):
    code = "too_large"


class Expired(PocketEmbedError):
    """The request's deadline passed before it ran; it was not computed."""

    code = "timeout"


class ShuttingDown(PocketEmbedError):
    code = "shutting_down"


class ModelNotLoaded(PocketEmbedError):
    code = "model_not_loaded"


class ModelUnloading(PocketEmbedError):
    """The model is being unloaded on purpose."""

    code = "model_unloading"


class OverBudget(PocketEmbedError):
    """Loading the model would exceed the memory budget even after evictions."""

    code = "memory_budget"


class UnknownCollection(PocketEmbedError):
    code = "unknown_collection"


class CollectionMismatch(PocketEmbedError):
    """A collection is bound to one model and dims; writing another is refused."""

    code = "collection_mismatch"


class UnknownJob(PocketEmbedError):
    code = "unknown_job"


class SourceError(PocketEmbedError):
    """The source database of an index job cannot be read as asked."""

    code = "bad_source"
