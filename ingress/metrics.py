"""The ingress's Prometheus metrics, collected at scrape time.

Nothing from prometheus-client runs per request: the proxy bumps plain integers on each
:class:`~ingress.router.Service` and this collector turns them into samples when Prometheus
scrapes. Names follow the contract (section 5).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ingress.accesslog import AccessLog
from ingress.router import Router

_CLASSES = ("", "1xx", "2xx", "3xx", "4xx", "5xx")


class IngressCollector(Collector):
    def __init__(self, router: Router, access_log: AccessLog | None = None) -> None:
        self._router = router
        self._access_log = access_log

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tidegate_requests",
            "Requests answered, by service and status class.",
            labels=["service", "code_class"],
        )
        inflight = GaugeMetricFamily(
            "tidegate_inflight_requests",
            "Requests in flight on each instance (WebSocket tunnels included).",
            labels=["service", "instance"],
        )
        queued = GaugeMetricFamily(
            "tidegate_queued_requests",
            "Requests held while no instance can take them.",
            labels=["service"],
        )
        errors = CounterMetricFamily(
            "tidegate_upstream_errors",
            "Failures talking to instances, by kind (connect, reset, timeout, bad_response).",
            labels=["service", "kind"],
        )
        duration = HistogramMetricFamily(
            "tidegate_request_duration_seconds",
            "Time from a request's arrival to the end of its response, queue wait included.",
            labels=["service"],
        )
        queue_wait = HistogramMetricFamily(
            "tidegate_queue_wait_seconds",
            "Time requests were held before an instance took them (0 when none was needed).",
            labels=["service"],
        )
        for service in self._router.all_services():
            name = service.name
            duration.add_metric([name], service.duration.cumulative(), service.duration.sum)
            queue_wait.add_metric([name], service.queue_wait.cumulative(), service.queue_wait.sum)
            for index in range(1, 6):
                requests.add_metric([name, _CLASSES[index]], service.codes[index])
            for instance in service.balancer.instances():
                inflight.add_metric([name, instance.id], instance.inflight)
            queued.add_metric([name], service.balancer.queued)
            for kind, count in service.errors.items():
                errors.add_metric([name, kind], count)
        unrouted = self._router.unrouted
        for index in range(1, 6):
            if unrouted[index]:
                requests.add_metric(["", _CLASSES[index]], unrouted[index])
        if self._access_log is not None:
            yield CounterMetricFamily(
                "tidegate_access_log_dropped",
                "Access log records dropped because the log could not keep up.",
                value=self._access_log.dropped,
            )
        yield requests
        yield inflight
        yield queued
        yield errors
        yield duration
        yield queue_wait
