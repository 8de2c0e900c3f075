package org.pocketembed;

import java.io.IOException;
import java.util.Collections;
import java.util.Map;

/** An error reply from the daemon, carrying its stable code (ipc/PROTOCOL.md "Error codes"). */
public class DaemonException extends IOException {
    // The protocol's error codes, to compare with {@link #code} (PROTOCOL.md's error table has their meanings).
    public static final String BAD_FRAME = "bad_frame";
    public static final String BAD_VERSION = "bad_version";
    public static final String UNKNOWN_OP = "unknown_op";
    public static final String INVALID_INPUT = "invalid_input";
    public static final String TOO_LARGE = "too_large";
    public static final String EMPTY_TEXT = "empty_text";
    public static final String TEXT_TOO_LONG = "text_too_long";
    public static final String UNKNOWN_MODEL = "unknown_model";
    public static final String WRONG_MODEL_KIND = "wrong_model_kind";
    public static final String MODEL_NOT_PREPARED = "model_not_prepared";
    public static final String MODEL_CORRUPT = "model_corrupt";
    public static final String MODEL_NOT_LOADED = "model_not_loaded";
    public static final String MODEL_UNLOADING = "model_unloading";
    public static final String MEMORY_BUDGET = "memory_budget";
    public static final String UNSUPPORTED_BUILD = "unsupported_build";
    public static final String BUSY = "busy";
    public static final String TIMEOUT = "timeout";
    public static final String LOADING = "loading";
    public static final String SHUTTING_DOWN = "shutting_down";
    public static final String UNKNOWN_JOB = "unknown_job";
    public static final String INVALID_STATE = "invalid_state";
    public static final String BAD_SOURCE = "bad_source";
    public static final String UNKNOWN_COLLECTION = "unknown_collection";
    public static final String COLLECTION_MISMATCH = "collection_mismatch";
    public static final String STORAGE_FULL = "storage_full";
    public static final String STORAGE_ERROR = "storage_error";
    public static final String UNAUTHORIZED = "unauthorized";
    public static final String FORBIDDEN = "forbidden";
    public static final String INTERNAL = "internal";

    public final String code;
    /** Extra fields of the error map, e.g. {@code retry_after_ms} of {@code busy}. */
    public final Map<String, Object> details;

    public DaemonException(String code, String message, Map<String, Object> details) {
        super("[" + code + "] " + message);
        this.code = code;
        this.details = details == null ? Collections.emptyMap() : details;
    }

    /** Bad input: the request can be fixed by the caller. */
    public static final class InvalidRequest extends DaemonException {
        InvalidRequest(String code, String message, Map<String, Object> details) {
            super(code, message, details);
        }
    }

    /** The model named cannot be used (unknown, not prepared, corrupt, not loaded, over budget). */
    public static final class ModelError extends DaemonException {
        ModelError(String code, String message, Map<String, Object> details) {
            super(code, message, details);
        }
    }

    /** A queue is full: retry after {@link #retryAfterMs()}. */
    public static final class Busy extends DaemonException {
        Busy(String code, String message, Map<String, Object> details) {
            super(code, message, details);
        }

        public long retryAfterMs() {
            Object v = details.get("retry_after_ms");
            return v instanceof Number ? ((Number) v).longValue() : 500;
        }
    }

    /** No reply in time (client side), or the request's deadline passed in the daemon. */
    public static final class Timeout extends DaemonException {
        Timeout(String code, String message, Map<String, Object> details) {
            super(code, message, details);
        }
    }

    /** {@code unauthorized} (no or unknown token) or {@code forbidden} (the token does not allow it). */
    public static final class AccessDenied extends DaemonException {
        AccessDenied(String code, String message, Map<String, Object> details) {
            super(code, message, details);
        }
    }

    /** The daemon's store cannot be written or read ({@code storage_full}, {@code storage_error}). */
    public static final class Storage extends DaemonException {
        Storage(String code, String message, Map<String, Object> details) {
            super(code, message, details);
        }
    }

    /** The daemon is shutting down ({@code shutting_down}): retry against its next start. */
    public static final class Unavailable extends DaemonException {
        Unavailable(String code, String message, Map<String, Object> details) {
            super(code, message, details);
        }
    }

    /** The exception class for a code; {@code internal} and unknown codes are plain DaemonExceptions. */
    static DaemonException of(String code, String message, Map<String, Object> details) {
        switch (code) {
            case "busy":
                return new Busy(code, message, details);
            case "timeout":
                return new Timeout(code, message, details);
            case "unauthorized":
            case "forbidden":
                return new AccessDenied(code, message, details);
            case "loading":
            case "shutting_down":
                return new Unavailable(code, message, details);
            case "storage_full":
            case "storage_error":
                return new Storage(code, message, details);
            case "unknown_model":
            case "model_not_prepared":
            case "model_corrupt":
            case "model_not_loaded":
            case "model_unloading":
            case "memory_budget":
            case "wrong_model_kind":
            case "unsupported_build":
                return new ModelError(code, message, details);
            case "bad_frame":
            case "bad_version":
            case "unknown_op":
            case "invalid_input":
            case "too_large":
            case "empty_text":
            case "text_too_long":
            case "unknown_job":
            case "invalid_state":
            case "bad_source":
            case "unknown_collection":
            case "collection_mismatch":
                return new InvalidRequest(code, message, details);
            case "internal":
            default:
                return new DaemonException(code, message, details);
        }
    }
}
