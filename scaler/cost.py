"""What a service's instances would cost on AWS App Runner: pure pricing, no I/O.

App Runner bills a container instance in two states (https://aws.amazon.com/apprunner/pricing/,
us-east-1, us-east-2, us-west-2 and eu-west-1 prices):

- **provisioned**: its memory, per GB-hour, for as long as it exists, idle or not;
- **active**: while it processes requests, its vCPUs per vCPU-hour, plus the same memory
  price (not a second one: active memory is the provisioned memory, billed once).

So the bill for an instance of ``cpu`` vCPUs and ``memory`` GB is::

    active_hours x cpu x VCPU_HOUR_USD  +  (active_hours + idle_hours) x memory x GB_HOUR_USD

tidegate counts instance-seconds the same way (:mod:`scaler.usage`): *active* while at least
one request is in flight on the instance, *idle* otherwise; provisioned is their sum.

**The always-on alternative** (our interpretation, as App Runner's examples set a service
against keeping its instances busy all the time): ``instances`` instances (default one) that
exist for the whole period and are billed as active all of it, vCPU and memory. It is what a
server sized for one instance and never scaled down would cost at the same prices.

Memory is in decimal gigabytes, ``memory_bytes / 1e9``: App Runner writes its sizes "2 GB",
and tidegate's ``memory: 2GB`` is 2 x 10^9 bytes (:mod:`ingress.units`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BYTES_PER_GB",
    "GB_HOUR_USD",
    "SECONDS_PER_HOUR",
    "VCPU_HOUR_USD",
    "ZERO",
    "Cost",
    "always_on",
    "price",
]

VCPU_HOUR_USD = 0.064  # USD per vCPU-hour, while an instance is active
GB_HOUR_USD = 0.007  # USD per GB-hour of memory, while an instance is provisioned (or active)
BYTES_PER_GB = 1e9  # decimal gigabytes, as App Runner's "2 GB"
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Cost:
    """Billable quantities and what they cost; add two to total several periods or sizes."""

    vcpu_hours: float  # active vCPU-hours
    gb_hours: float  # provisioned GB-hours (active time included)

    @property
    def compute_usd(self) -> float:
        return self.vcpu_hours * VCPU_HOUR_USD

    @property
    def memory_usd(self) -> float:
        return self.gb_hours * GB_HOUR_USD

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.memory_usd

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.vcpu_hours + other.vcpu_hours, self.gb_hours + other.gb_hours)


ZERO = Cost(0.0, 0.0)


def price(
    active_seconds: float, provisioned_seconds: float, cpu: float, memory_bytes: float
) -> Cost:
    """App Runner's bill for instance-seconds of one size: ``active_seconds`` (a request in
    flight) of the ``provisioned_seconds`` (all the time the instances existed, active
    included), each instance with ``cpu`` vCPUs and ``memory_bytes`` of memory.

    ValueError if a quantity is negative or more time was active than provisioned."""
    if min(active_seconds, provisioned_seconds, cpu, memory_bytes) < 0:
        raise ValueError(
            f"negative quantity: active {active_seconds} s, provisioned "
            f"{provisioned_seconds} s, {cpu} vCPU, {memory_bytes} bytes"
        )
    if active_seconds > provisioned_seconds:
        raise ValueError(
            f"active time {active_seconds} s exceeds provisioned time {provisioned_seconds} s"
        )
    return Cost(
        vcpu_hours=active_seconds / SECONDS_PER_HOUR * cpu,
        gb_hours=provisioned_seconds / SECONDS_PER_HOUR * memory_bytes / BYTES_PER_GB,
    )


def always_on(period_seconds: float, cpu: float, memory_bytes: float, instances: int = 1) -> Cost:
    """The always-on alternative: ``instances`` instances billed as active (vCPU and memory)
    for the whole ``period_seconds``."""
    if instances < 1:
        raise ValueError(f"instances must be at least 1 (got {instances})")
    seconds = period_seconds * instances
    return price(seconds, seconds, cpu, memory_bytes)
