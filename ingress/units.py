"""Durations and sizes as users write them: "250ms", "5s", "2m"; "512MB", "64KiB".

Shared by the ingress's flags and the scaler's service files, so both read a value the same
way. Decimal units are powers of 1000 and binary ones (KiB, MiB, GiB) powers of 1024, as in
App Runner's and Docker's documentation.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_duration(text: str | float | int) -> float:
    """Seconds from "250ms", "5s", "2m", "1h" or a bare number of seconds; ValueError otherwise."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"duration must not be negative (got {text})")
        return float(text)
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 5s, 2m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str | int) -> int:
    """Bytes from "512MB", "64KiB", "1GB" or a bare number of bytes; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative (got {text})")
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MB, 64KiB, 2GB)")
    unit = (match.group(2) or "").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
