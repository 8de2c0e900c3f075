"""A real SMS app's database for the tests: messages(id, address, date, body) from the SMS corpus."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from pocketembed.sms import load_messages


def sms_rows() -> list[dict]:
    return [{"id": i + 1, "address": "spam" if m.label == "spam" else f"+4479{i % 97:05d}", "date": 1_700_000_000 + 60 * i,
             "body": m.text} for i, m in enumerate(load_messages())]


def make_sms_db(path: Path, limit: int | None = None) -> Path:
    """An SMS app's database in WAL mode, as Android's telephony provider keeps it."""
    db = sqlite_utils.Database(path)
    db.execute("PRAGMA journal_mode=WAL")
    db["messages"].insert_all(sms_rows()[:limit], pk="id")
    db.conn.close()
    return path


def source_ids(path: Path, where: str = "1") -> set[int]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute(f"SELECT id FROM messages WHERE {where}")}
