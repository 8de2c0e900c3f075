"""The bundled SMS corpus: the demo's messages, and the tests' and benchmarks' data.

The SMS Spam Collection (Almeida & Gómez Hidalgo, UCI ML Repository, CC BY 4.0;
see ``pocketembed/data/README.md``) ships inside the package so that a fresh
clone or a plain install needs nothing beside it. ``POCKETEMBED_SMS`` points
at another file of the same shape.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "data" / "SMSSpamCollection.tsv"
ENV_SMS = "POCKETEMBED_SMS"


@dataclass(frozen=True)
class Message:
    label: str
    """``ham`` or ``spam``."""
    text: str


def sms_path() -> Path:
    return Path(os.environ.get(ENV_SMS) or BUNDLED)


def load_messages(path: Path | None = None) -> list[Message]:
    """Every message in file order (5,574 in the bundled file)."""
    with open(path or sms_path(), encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        label, text = header.index("Label"), header.index("SMS")
        return [Message(r[label], r[text]) for r in rows if len(r) > max(label, text)]


def load_sms(path: Path | None = None) -> list[str]:
    """Every message text, in file order."""
    return [m.text for m in load_messages(path)]
