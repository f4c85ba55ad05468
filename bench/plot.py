"""Plots of benchmark results, drawn with matplotlib (the `bench` extra: `pip install -e
'.[bench]'`).

`plot_scaleout(data, path)` draws a `bench scaleout` result, the JSON document it writes, as
four panels on one time axis: the load (clients and successful responses per second, failed
requests as red bars), the instances (ready and starting, stacked, with what the load needs
and what the scaler wants), the latency (p50 and p99 of each second, log scale) and the
queue (requests held, requests in flight). The phases are shaded and named along the top.

It reads only the JSON, so a saved result can be drawn again:

    python -m bench.plot bench/results/scaleout-20260101T120000Z.json   # writes the .png beside

matplotlib is imported only inside the functions, through its object-oriented API (no
pyplot, no global state, no display needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["available", "main", "plot_scaleout"]

_NAN = float("nan")
_PHASE_SHADES = {"step": "#fde9d9", "ramp": "#e3eefa", "idle": "#f4f4f4"}


def available() -> bool:
    """True when matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def _values(series: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [_NAN if row.get(key) is None else float(row[key]) for row in series]


def _edges(series: Sequence[Mapping[str, Any]], values: list[float]) -> tuple[list[float], ...]:
    """x and y for a step plot where each second's value holds over [t, t+1)."""
    xs = [float(row["t"]) for row in series]
    if not xs:
        return [], []
    return [*xs, xs[-1] + 1], [*values, values[-1]]


def plot_scaleout(data: Mapping[str, Any], path: Path) -> Path:
    """Draw a scale-out result (its JSON document) to the PNG at `path`; returns `path`."""
    from matplotlib.figure import Figure

    series: list[Mapping[str, Any]] = list(data["series"])
    settings: Mapping[str, Any] = data.get("settings", {})
    mc = int(settings.get("max_concurrency") or 1)
    mid = [row["t"] + 0.5 for row in series]

    fig = Figure(figsize=(11, 10.5), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True, height_ratios=[1.2, 1.0, 1.2, 0.8])
    ax_load, ax_inst, ax_lat, ax_queue = axes

    # 1. load: clients (left), ok/s and failed/s (right)
    clients = _values(series, "clients")
    ax_load.step(*_edges(series, clients), where="post", color="black", label="clients")
    ax_load.set_ylabel("clients (load)")
    ax_load.set_ylim(bottom=0)
    ax_tp = ax_load.twinx()
    ax_tp.plot(mid, _values(series, "ok"), color="tab:green", label="ok/s")
    failed = _values(series, "failed")
    if any(f > 0 for f in failed if not math.isnan(f)):
        ax_tp.bar(mid, failed, width=0.8, color="tab:red", label="failed/s")
    ax_tp.set_ylabel("responses / s")
    ax_tp.set_ylim(bottom=0)
    handles = ax_load.get_legend_handles_labels()
    more = ax_tp.get_legend_handles_labels()
    ax_load.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=8)

    # 2. instances: ready and starting stacked, with what the load needs and desired
    ready = [0.0 if math.isnan(v) else v for v in _values(series, "ready")]
    starting = [0.0 if math.isnan(v) else v for v in _values(series, "starting")]
    x, y_ready = _edges(series, ready)
    _, y_both = _edges(series, [r + s for r, s in zip(ready, starting, strict=True)])
    ax_inst.fill_between(x, 0, y_ready, step="post", color="tab:blue", alpha=0.6, label="ready")
    ax_inst.fill_between(
        x, y_ready, y_both, step="post", color="tab:orange", alpha=0.5, label="starting"
    )
    needed = [_NAN if math.isnan(c) else math.ceil(c / mc) for c in clients]
    ax_inst.step(
        *_edges(series, needed), where="post", color="black", linestyle=":", label="needed"
    )
    ax_inst.step(
        *_edges(series, _values(series, "desired")),
        where="post",
        color="tab:purple",
        linestyle="--",
        linewidth=1,
        label="desired",
    )
    ax_inst.set_ylabel("instances")
    ax_inst.set_ylim(bottom=0)
    ax_inst.legend(loc="upper right", fontsize=8)

    # 3. latency of the responses completed in each second
    ax_lat.plot(mid, _values(series, "p50_ms"), color="tab:green", marker=".", label="p50")
    ax_lat.plot(mid, _values(series, "p99_ms"), color="tab:red", marker=".", label="p99")
    hold = settings.get("hold")
    if isinstance(hold, str) and hold.endswith("ms"):
        ax_lat.axhline(float(hold[:-2]), color="grey", linewidth=0.8, linestyle=":")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency ms (log)")
    ax_lat.legend(loc="upper right", fontsize=8)

    # 4. the queue
    ax_queue.step(
        *_edges(series, _values(series, "queued")), where="post", color="tab:red", label="queued"
    )
    ax_queue.step(
        *_edges(series, _values(series, "inflight")),
        where="post",
        color="tab:blue",
        linewidth=1,
        label="in flight",
    )
    ax_queue.set_ylabel("requests")
    ax_queue.set_ylim(bottom=0)
    ax_queue.set_xlabel("seconds since the start")
    ax_queue.legend(loc="upper right", fontsize=8)

    # the phases, shaded on every panel and named on the top one
    for span in data.get("spans", []):
        start, end = float(span["start"]), float(span["end"])
        for ax in axes:
            ax.axvspan(start, end, color=_PHASE_SHADES.get(span["kind"], "white"), zorder=0)
        ax_load.text(
            (start + end) / 2,
            1.02,
            span["name"],
            transform=ax_load.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if series:
        ax_queue.set_xlim(0, series[-1]["t"] + 1)

    summary = data.get("summary", {})
    title = f"tidegate scale-out, {data.get('date', '')}"
    if summary.get("headline"):
        title += "\n" + str(summary["headline"])
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(
        prog="python -m bench.plot", description="Draw a bench scaleout result (JSON) as a PNG."
    )
    parser.add_argument("result", type=Path, help="a scaleout-<time>.json")
    parser.add_argument("--out", type=Path, default=None, help="the PNG (default: beside it)")
    args = parser.parse_args(argv)
    if not available():
        print("matplotlib is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    data = json.loads(args.result.read_text())
    if data.get("benchmark") != "scaleout":
        print(f"{args.result}: not a scaleout result", file=sys.stderr)
        return 2
    out = args.out or args.result.with_suffix(".png")
    print(plot_scaleout(data, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
