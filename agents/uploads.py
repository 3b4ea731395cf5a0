"""The upload scanner's logic (no I/O but reading the file it is given).

A file is ``infected`` when it carries the EICAR anti-virus test string (the
standard, harmless signature every scanner detects), ``empty`` when it has
no bytes, ``oversized`` past the limit (not read), else ``clean``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

#: The EICAR test file's signature (a harmless string every scanner flags).
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

Verdict = Literal["clean", "infected", "empty", "oversized"]


def scan(path: Path, max_bytes: int) -> Verdict:
    size = path.stat().st_size
    if size == 0:
        return "empty"
    if size > max_bytes:
        return "oversized"
    return "infected" if EICAR in path.read_bytes() else "clean"
