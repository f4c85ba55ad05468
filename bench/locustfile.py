"""A locust file for any tidegate URL: one user that GETs a path, and step and ramp load shapes.

    pip install -e '.[bench]'     # locust and matplotlib
    locust -f bench/locustfile.py --headless --host http://127.0.0.1:8080
    TIDEGATE_SHAPE=ramp TIDEGATE_USERS=50 TIDEGATE_RAMP=60s \\
        locust -f bench/locustfile.py --headless --host http://127.0.0.1:8080 --csv out/run

Each user sends its next request as soon as the previous one ended (no think time), so N
users keep N requests in flight: the load that tidegate's `max_concurrency` counts. Responses
with a status of 400 or more count as failures (locust's default), so a 503 from a full
queue or a 502 shows up in locust's failure table with its status.

Settings, all from the environment (durations as tidegate writes them: 500ms, 20s, 2m):

| variable | default | meaning |
| --- | --- | --- |
| `TIDEGATE_PATH` | `/` | the path every request GETs (e.g. `/cgi-bin/slow?ms=50`) |
| `TIDEGATE_SHAPE` | `step` | `step`, `ramp`, or `none` (locust's own `-u`, `-r`, `-t`) |
| `TIDEGATE_STEPS` | `20` | step: users at each step, comma-separated (`5,10,20`: a staircase) |
| `TIDEGATE_STEP_TIME` | `20s` | step: how long each step lasts |
| `TIDEGATE_USERS` | `20` | ramp: users at the top |
| `TIDEGATE_RAMP` | `20s` | ramp: from 0 to the top in this long |
| `TIDEGATE_HOLD` | `0s` | ramp: stay at the top this long before stopping |
| `TIDEGATE_IDLE` | `0s` | both: no users for this long first (a cold start from zero) |

Each shape stops the test at its end, so no `--run-time` is needed. Without `--host`, the
target is `http://127.0.0.1:8080`, `tidegate up`'s default listener.

The shapes' `users_at(t)` is pure (seconds since the start -> (users, spawn rate) or None
at the end), which the unit tests check; `tick()` applies it to locust's clock.
"""

from __future__ import annotations

import math
import os
import re

from locust import HttpUser, LoadTestShape, constant, task

__all__ = ["RampShape", "StepShape", "TidegateUser", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SHAPES = ("step", "ramp", "none")


def parse_duration(text: str) -> float:
    """Seconds from "500ms", "20s", "2m" or a bare number of seconds (as tidegate reads
    them; kept here so the file runs where tidegate is not installed)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 20s, 2m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _env_duration(name: str, default: str) -> float:
    return parse_duration(os.environ.get(name, default))


def _env_users(name: str, default: str) -> list[int]:
    text = os.environ.get(name, default)
    try:
        users = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name}: comma-separated user counts, got {text!r}") from None
    if not users or any(u < 0 for u in users):
        raise ValueError(f"{name}: comma-separated user counts >= 0, got {text!r}")
    return users


def _chosen_shape() -> str:
    shape = os.environ.get("TIDEGATE_SHAPE", "step").strip().lower()
    if shape not in _SHAPES:
        raise ValueError(f"TIDEGATE_SHAPE must be one of {', '.join(_SHAPES)}, got {shape!r}")
    return shape


class TidegateUser(HttpUser):
    """GET TIDEGATE_PATH, back to back."""

    host = "http://127.0.0.1:8080"  # `--host` overrides it
    wait_time = constant(0)
    path = os.environ.get("TIDEGATE_PATH", "/")

    @task
    def get(self) -> None:
        self.client.get(self.path)


class StepShape(LoadTestShape):
    """TIDEGATE_IDLE with no users, then each of TIDEGATE_STEPS users for TIDEGATE_STEP_TIME,
    all of a step's users started at once; then the end."""

    abstract = _chosen_shape() != "step"

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # locust leaves it untyped
        self.idle_s = _env_duration("TIDEGATE_IDLE", "0s")
        self.steps = _env_users("TIDEGATE_STEPS", "20")
        self.step_s = _env_duration("TIDEGATE_STEP_TIME", "20s")
        if self.step_s <= 0:
            raise ValueError("TIDEGATE_STEP_TIME must be more than 0")

    def users_at(self, t: float) -> tuple[int, float] | None:
        if t < self.idle_s:
            return (0, 1.0)
        index = int((t - self.idle_s) // self.step_s)
        if index >= len(self.steps):
            return None
        # a spawn rate of the step's height starts (or stops) it within locust's one-second
        # tick; at least 1, which locust requires
        previous = self.steps[index - 1] if index > 0 else 0
        return (self.steps[index], float(max(1, abs(self.steps[index] - previous))))

    def tick(self) -> tuple[int, float] | None:
        return self.users_at(self.get_run_time())  # type: ignore[no-untyped-call]


class RampShape(LoadTestShape):
    """TIDEGATE_IDLE with no users, then from 0 to TIDEGATE_USERS linearly over
    TIDEGATE_RAMP, TIDEGATE_HOLD at the top; then the end."""

    abstract = _chosen_shape() != "ramp"

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # locust leaves it untyped
        self.idle_s = _env_duration("TIDEGATE_IDLE", "0s")
        (self.users,) = _env_users("TIDEGATE_USERS", "20")
        self.ramp_s = _env_duration("TIDEGATE_RAMP", "20s")
        self.hold_s = _env_duration("TIDEGATE_HOLD", "0s")
        if self.ramp_s <= 0:
            raise ValueError("TIDEGATE_RAMP must be more than 0")

    def users_at(self, t: float) -> tuple[int, float] | None:
        if t < self.idle_s:
            return (0, 1.0)
        t -= self.idle_s
        rate = max(1.0, self.users / self.ramp_s)  # users per second on the way up
        if t < self.ramp_s:
            return (min(self.users, math.ceil(self.users * t / self.ramp_s)), rate)
        if t < self.ramp_s + self.hold_s:
            return (self.users, rate)
        return None

    def tick(self) -> tuple[int, float] | None:
        return self.users_at(self.get_run_time())  # type: ignore[no-untyped-call]
