"""Duration and size text formats ("250ms", "1m30s", "32k").

Kept apart from the schema because it is plain text parsing with no knowledge of where a value sits
in the file or how to report a problem: each function returns the number, or None when the text is
not in the format. The schema (fastmesh.config.schema) decides what numbers mean and words the
errors.
"""
from __future__ import annotations

import re

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE = re.compile(r"(\d+)([kmg]?)b?", re.IGNORECASE)
_UNIT_BYTES = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def duration_seconds(text: str) -> float | None:
    """Seconds for "250ms", "5s", "1.5s", "1m", "1h" or compound "1m30s"; None if malformed."""
    text = text.strip()
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text))


def size_bytes(text: str) -> int | None:
    """Bytes for "512", "32k", "1m", "1g" (powers of 1024, optional trailing "b"); None if malformed."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        return None
    return int(match.group(1)) * _UNIT_BYTES[match.group(2).lower()]
