"""Load the SMS Spam Collection (../shared/data) for scripts and tests."""

from __future__ import annotations

import csv
import os
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "SMSSpamCollection.tsv"


def sms_path() -> Path:
    return Path(os.environ.get("POCKETEMBED_SMS", DEFAULT))


def load_sms(path: Path | None = None) -> list[str]:
    """All 5,574 message texts, in file order."""
    with open(path or sms_path(), encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        col = header.index("SMS")
        return [r[col] for r in rows if len(r) > col]
