"""The scaler's Prometheus metrics, collected at scrape time from its controllers.

Names follow the contract (section 5). The controllers keep plain counters and an
:class:`ingress.histogram.Histogram` of cold starts; this collector reads them when
Prometheus scrapes, like the ingress's does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from scaler.controller import ServiceController

__all__ = ["ScalerCollector"]


class ScalerCollector(Collector):
    """Metrics of the services in ``controllers`` (read at each scrape: services applied
    later appear, deleted ones go)."""

    def __init__(self, controllers: Mapping[str, ServiceController]) -> None:
        self._controllers = controllers

    def collect(self) -> Iterator[Metric]:
        instances = GaugeMetricFamily(
            "tidegate_instances",
            "Instances by state: starting (not healthy yet), ready (taking requests), "
            "draining (finishing requests before they stop).",
            labels=["service", "state"],
        )
        desired = GaugeMetricFamily(
            "tidegate_desired_instances",
            "Instances the autoscaler wants for the service.",
            labels=["service"],
        )
        cold_start = HistogramMetricFamily(
            "tidegate_cold_start_seconds",
            "From a request held with no instance to the first instance ready.",
            labels=["service"],
        )
        scale_events = CounterMetricFamily(
            "tidegate_scale_events",
            "Changes of the desired instance count, by direction.",
            labels=["service", "direction"],
        )
        instance_seconds = CounterMetricFamily(
            "tidegate_instance_seconds",
            "Instance-seconds provisioned, active (a request in flight) or idle.",
            labels=["service", "state"],
        )
        for name, controller in list(self._controllers.items()):
            counts = controller.instance_counts()
            instances.add_metric([name, "starting"], counts["starting"])
            instances.add_metric([name, "ready"], counts["ready"])
            instances.add_metric([name, "draining"], counts["draining"] + counts["stopping"])
            desired.add_metric([name], controller.desired)
            hist = controller.cold_starts
            cold_start.add_metric([name], hist.cumulative(), hist.sum)
            for direction, count in controller.scale_events.items():
                scale_events.add_metric([name, direction], count)
            instance_seconds.add_metric([name, "active"], controller.usage.active_seconds)
            instance_seconds.add_metric([name, "idle"], controller.usage.idle_seconds)
        yield instances
        yield desired
        yield cold_start
        yield scale_events
        yield instance_seconds
