"""The scaler's status page: `tidegate status` as one read-only HTML page.

Served at ``/`` on the scaler's metrics listener (``tidegate scaler --metrics-listen``, and the
one listener of `tidegate up`) through :class:`ingress.admin.AdminServer`'s extra routes, so
the ingress itself never learns of it. Per service: its state, desired/ready/starting/draining,
requests in flight and queued, requests/s and p99, the last cold start, scale events, the last
error and each instance; then the files that could not be loaded.

Rules:

- **Plain HTML and a little inline CSS**, no script and no framework; the page reloads itself
  every :data:`REFRESH_SECONDS` (``<meta http-equiv="refresh">``) and is never cached.
- **Everything from the report is escaped**: service names are DNS labels, but reasons, errors
  and file paths are free text (an error may quote a file's content).
- :func:`render` is pure (the report and the time to print in, the page out); the handler is
  the thin shell that reads the scaler's status and the clock.
- Tolerant of a richer :class:`~scaler.messages.ServiceStatus`: if a service carries
  ``recent_scale_events`` (each with ``ago_seconds``, ``direction``, ``from_desired``,
  ``to_desired``, ``reason``) or ``recent_cold_starts`` (each with ``ago_seconds`` and
  ``seconds``), they are listed; without them the counts and the last cold start are shown.
"""

from __future__ import annotations

import datetime
import html
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from ingress.admin import Handler, Route
from scaler.messages import InstanceStatus, ServiceStatus, StatusReport

__all__ = ["REFRESH_SECONDS", "handler", "render", "routes", "utc_text"]

REFRESH_SECONDS = 2  # the page reloads itself this often (the status API is cheap to read)

# The page loads nothing else: no script, no image, only its own <style>.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_CSS = """\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
h3{font-size:1em;margin:1em 0 .3em}
.muted{color:#666}table{border-collapse:collapse;margin:.3em 0}
th,td{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;margin:.3em 0}
dt{color:#555}dd{margin:0}
.state{display:inline-block;padding:0 .5em;border-radius:.6em;font-size:.9em;background:#eee}
.running,.ready{background:#d8f0d8}.scaling,.starting{background:#fdf0c8}
.idle,.paused{background:#e8e8e8}.failing,.failed{background:#f8d0d0}
.draining,.stopping{background:#e0e8f8}.error{color:#a00}
"""


def utc_text(unix_time: float) -> str:
    """``2026-11-26 12:00:00 UTC``: how the page prints the time it was made."""
    moment = datetime.datetime.fromtimestamp(unix_time, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def render(report: StatusReport, now_text: str) -> str:
    """The whole page for ``report``, saying it was made at ``now_text``."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>tidegate status</title>",
        f"<style>\n{_CSS}</style></head><body>",
        "<h1>tidegate status</h1>",
        f'<p class="muted">{_e(now_text)}; reloads every {REFRESH_SECONDS} s. '
        "The same as <code>tidegate status</code>; metrics at "
        '<a href="/metrics">/metrics</a>.</p>',
    ]
    out.extend(_overview(report.services))
    for service in report.services:
        out.extend(_service(service))
    if report.errors:
        out.append('<h2 id="errors">Files not loaded</h2>')
        out.append("<table><tr><th>file</th><th>error</th></tr>")
        for error in report.errors:
            out.append(
                f'<tr><td>{_e(error.file)}</td><td class="error">{_e(error.error)}</td></tr>'
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def handler(
    status: Callable[[], StatusReport], *, clock: Callable[[], float] = time.time
) -> Handler:
    """An aiohttp handler serving :func:`render` of ``status()`` (read at each request)."""

    async def status_page(request: web.Request) -> web.StreamResponse:
        body = render(status(), utc_text(clock()))
        return web.Response(
            text=body,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": _CSP,
                "X-Content-Type-Options": "nosniff",
            },
        )

    return status_page


def routes(status: Callable[[], StatusReport]) -> Sequence[Route]:
    """The metrics listener's extra routes: the page at ``/``."""
    return [("/", handler(status))]


# -- pieces ---------------------------------------------------------------------------------


def _overview(services: list[ServiceStatus]) -> list[str]:
    if not services:
        return ["<p>No services.</p>"]
    out = [
        "<table><tr><th>service</th><th>state</th><th>desired</th><th>ready</th>"
        "<th>starting</th><th>draining</th><th>in flight</th><th>queued</th><th>req/s</th>"
        "<th>p99</th><th>last cold start</th><th>scaled up/down</th></tr>"
    ]
    for s in services:
        cells = [
            f'<a href="#service-{_e(s.name)}">{_e(s.name)}</a>',
            _state(s.state),
            *(_n(v) for v in (s.desired, s.ready, s.starting, s.draining, s.inflight, s.queued)),
            f'<td class="n">{s.requests_per_second:.1f}</td>',
            f'<td class="n">{_duration(s.p99_seconds)}</td>',
            f'<td class="n">{_duration(s.last_cold_start_seconds)}</td>',
            f'<td class="n">{_scale_counts(s)}</td>',
        ]
        out.append("<tr>" + "".join(_td(c) for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _service(s: ServiceStatus) -> list[str]:
    routes_text = ", ".join(s.domains) if s.domains else "the default route"
    facts: list[tuple[str, str]] = [
        ("state", _state(s.state)),
        ("runtime", _e(s.runtime)),
        ("revision", f"<code>{_e(s.revision)}</code>"),
        ("routes", _e(routes_text)),
        (
            "size",
            f"min {s.min_size}, max {s.max_size}, {s.max_concurrency} requests per instance",
        ),
        (
            "instances",
            f"desired {s.desired}: {s.ready} ready, {s.starting} starting, {s.draining} draining",
        ),
        ("why", _e(s.reason)),
        ("load", f"{s.inflight} in flight, {s.queued} queued, {s.requests_per_second:.1f} req/s"),
        ("p99", _duration(s.p99_seconds)),
        ("last cold start", _duration(s.last_cold_start_seconds)),
        ("scale events", f"{_scale_counts(s)} (up / down)"),
        (
            "instance-seconds",
            f"{s.active_instance_seconds:.0f} active, {s.idle_instance_seconds:.0f} idle",
        ),
    ]
    if s.last_error:
        facts.append(("last error", f'<span class="error">{_e(s.last_error)}</span>'))
    if s.start_failures:
        facts.append(
            (
                "back-off",
                f"{s.start_failures} failed start(s) in a row; next start in {s.retry_in:.1f} s",
            )
        )
    out = [f'<h2 id="service-{_e(s.name)}">{_e(s.name)}</h2>', "<dl>"]
    out.extend(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    out.append("</dl>")
    out.extend(_instances(s.instances))
    out.extend(_scale_history(getattr(s, "recent_scale_events", None)))
    out.extend(_cold_start_history(getattr(s, "recent_cold_starts", None)))
    return out


def _instances(instances: list[InstanceStatus]) -> list[str]:
    if not instances:
        return ['<p class="muted">No instances.</p>']
    out = [
        "<table><tr><th>instance</th><th>state</th><th>address</th><th>in flight</th>"
        "<th>revision</th><th>age</th></tr>"
    ]
    for i in instances:
        cells = [
            _e(i.id),
            _state(i.state),
            _e(i.address or "-"),
            _n(i.inflight),
            "current" if i.current else "previous (being replaced)",
            f'<td class="n">{_age(i.age_seconds)}</td>',
        ]
        out.append("<tr>" + "".join(_td(c) for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _scale_history(events: Any) -> list[str]:
    """The last scale decisions, if the status carries them (newest first)."""
    if not events:
        return []
    out = [
        "<h3>Recent scale events</h3>",
        "<table><tr><th>when</th><th>direction</th><th>desired</th><th>why</th></tr>",
    ]
    for event in events:
        before, after = getattr(event, "from_desired", None), getattr(event, "to_desired", None)
        change = "-" if before is None or after is None else f"{before} → {after}"
        cells = [
            _ago(getattr(event, "ago_seconds", None)),
            _e(str(getattr(event, "direction", "-"))),
            _e(change),
            _e(str(getattr(event, "reason", ""))),
        ]
        out.append("<tr>" + "".join(_td(c) for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _cold_start_history(cold_starts: Any) -> list[str]:
    """The last cold starts' durations, if the status carries them (newest first)."""
    if not cold_starts:
        return []
    out = ["<h3>Recent cold starts</h3>", "<table><tr><th>when</th><th>took</th></tr>"]
    for cold in cold_starts:
        seconds = getattr(cold, "seconds", None)
        took = _duration(float(seconds)) if isinstance(seconds, float | int) else "-"
        cells = [_ago(getattr(cold, "ago_seconds", None)), f'<td class="n">{took}</td>']
        out.append("<tr>" + "".join(_td(c) for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _td(cell: str) -> str:
    """Cells that made their own ``<td>`` (numbers, right-aligned) pass through."""
    return cell if cell.startswith("<td") else f"<td>{cell}</td>"


def _n(value: int) -> str:
    return f'<td class="n">{value}</td>'


def _state(state: str) -> str:
    return f'<span class="state {_e(state)}">{_e(state)}</span>'


def _scale_counts(s: ServiceStatus) -> str:
    return f"{s.scale_events.get('up', 0)} / {s.scale_events.get('down', 0)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _age(seconds: float) -> str:
    """``42s``, ``3m 12s``, ``2h 05m``, ``3d 04h``."""
    whole = int(max(seconds, 0.0))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def _ago(seconds: object) -> str:
    if not isinstance(seconds, float | int):
        return "-"
    return f"{_age(float(seconds))} ago"
