"""Durations and sizes as users write them."""

from __future__ import annotations

import pytest

from ingress.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("250ms", 0.25, id="ms"),
        pytest.param("5s", 5.0, id="s"),
        pytest.param("2m", 120.0, id="m"),
        pytest.param("1h", 3600.0, id="h"),
        pytest.param("1.5s", 1.5, id="fraction"),
        pytest.param("30", 30.0, id="bare-string"),
        pytest.param(7, 7.0, id="int"),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    """Each accepted spelling gives the right number of seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1s", "s", "1d", "1e3s"])
def test_bad_durations(text: str) -> None:
    """Anything else is a ValueError that shows the text."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        pytest.param("512MB", 512_000_000, id="MB"),
        pytest.param("1GB", 1_000_000_000, id="GB"),
        pytest.param("64KiB", 65536, id="KiB"),
        pytest.param("2GiB", 2 * 1024**3, id="GiB"),
        pytest.param("100", 100, id="bare"),
        pytest.param("1.5gb", 1_500_000_000, id="lowercase-fraction"),
    ],
)
def test_sizes(text: str, size: int) -> None:
    """Decimal and binary units give the right number of bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12 apples", "-5MB", "MB"])
def test_bad_sizes(text: str) -> None:
    """Anything else is a ValueError that shows the text."""
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
