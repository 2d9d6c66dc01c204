"""Prometheus metrics of actor hosts: what a `Dispatcher` does, read when scraped.

```python
from prometheus_client import start_http_server
from actor_sdk import Dispatcher, metrics

async with Dispatcher(microgrid_id=1, broker="mqtt://actor:pw@edge:1883") as dispatcher:
    metrics.register(dispatcher)          # prometheus_client's default registry
    start_http_server(9464, "127.0.0.1")  # or the host's own metrics endpoint
    ...
```

Nothing here runs while actors start and stop: the dispatcher only counts (plain
integers in `ActorCounts`, the broker link's connections, the view's arrival time
of the last live status); a scrape reads those and the dispatcher's state and turns them into
metric families. Every name starts with `dispatch_sdk_`; every series carries the
dispatcher's `microgrid_id` and `actor_id` (several dispatchers of one process
share a registry); the per-type ones a `dispatch_type` too. The list, with meanings,
is `METRICS` (and docs/actor-sdk.md).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from actor_sdk._dispatcher import Dispatcher

__all__ = ["METRICS", "PER_TYPE", "register", "unregister"]

_LABELS = ("microgrid_id", "actor_id")
_TYPE_LABELS = (*_LABELS, "dispatch_type")

PER_TYPE = frozenset(
    {
        "dispatch_sdk_actors_running",
        "dispatch_sdk_actor_starts_total",
        "dispatch_sdk_actor_stops_total",
        "dispatch_sdk_actor_start_failures_total",
        "dispatch_sdk_factory_timeouts_total",
    }
)
"""The metrics with a `dispatch_type` label (one series per type ever managed)."""

METRICS: dict[str, str] = {
    "dispatch_sdk_actors_running": "Actors started and not stopped, per dispatch type.",
    "dispatch_sdk_actor_starts_total": "Actors started (factory returned, start() returned).",
    "dispatch_sdk_actor_stops_total": "Started actors asked to stop.",
    "dispatch_sdk_actor_start_failures_total": (
        "Failed starts (factory raised or timed out, or start() raised); retried later."
    ),
    "dispatch_sdk_factory_timeouts_total": "Factories cancelled at their factory_timeout.",
    "dispatch_sdk_broker_connected": "1 while connected to the broker, else 0.",
    "dispatch_sdk_broker_reconnects_total": "Broker connections made after the first.",
    "dispatch_sdk_view_in_sync": "1 once the retained state of this connection arrived.",
    "dispatch_sdk_view_live": (
        "1 while the view is live (in sync, an online status arrived live recently): "
        "actors may start."
    ),
    "dispatch_sdk_last_live_status_age_seconds": (
        "Seconds since a bridge status last arrived live (absent before the first)."
    ),
    "dispatch_sdk_bridge_clock_offset_seconds": (
        "Local clock minus the bridge's, as deadlines use it (0 until converged)."
    ),
    "dispatch_sdk_bridge_clock_converged": "1 once enough live samples fixed the offset.",
}


class _DispatcherCollector(Collector):
    """Reads the dispatchers registered with one registry at each scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dispatchers: weakref.WeakSet[Dispatcher] = weakref.WeakSet()

    def add(self, dispatcher: Dispatcher) -> None:
        with self._lock:
            self._dispatchers.add(dispatcher)

    def remove(self, dispatcher: Dispatcher) -> bool:
        with self._lock:
            self._dispatchers.discard(dispatcher)
            return not self._dispatchers

    def describe(self) -> Iterator[Metric]:
        # Names only (no samples), so that the registry refuses a clash with a
        # collector of the caller's that uses one of these names.
        return self._families()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            dispatchers = list(self._dispatchers)
        families = {family.name: family for family in self._families()}
        for dispatcher in dispatchers:
            _read(dispatcher, families)
        return iter(families.values())

    @staticmethod
    def _families() -> Iterator[Metric]:
        for name, documentation in METRICS.items():
            labels = _TYPE_LABELS if name in PER_TYPE else _LABELS
            if name.endswith("_total"):
                yield CounterMetricFamily(name, documentation, labels=labels)
            else:
                yield GaugeMetricFamily(name, documentation, labels=labels)


def _read(dispatcher: Dispatcher, families: dict[str, Metric]) -> None:
    """Add one dispatcher's samples; reads its state, never waits for it."""

    def put(name: str, value: float, *extra: str) -> None:
        family = families[name.removesuffix("_total")]
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric([str(dispatcher.microgrid_id), dispatcher.actor_id, *extra], value)

    reconciler = dispatcher._reconciler  # the SDK's own internals
    managed = dict(reconciler.managed)
    for dispatch_type, counts in sorted(dict(reconciler.counts).items()):
        actors = managed.get(dispatch_type)
        running = 0 if actors is None else actors.started_actors
        put("dispatch_sdk_actors_running", running, dispatch_type)
        put("dispatch_sdk_actor_starts_total", counts.started, dispatch_type)
        put("dispatch_sdk_actor_stops_total", counts.stopped, dispatch_type)
        put("dispatch_sdk_actor_start_failures_total", counts.failed, dispatch_type)
        put("dispatch_sdk_factory_timeouts_total", counts.factory_timeouts, dispatch_type)
    link = dispatcher._link
    put("dispatch_sdk_broker_connected", float(link.connected))
    put("dispatch_sdk_broker_reconnects_total", max(link.connections - 1, 0))
    put("dispatch_sdk_view_in_sync", float(dispatcher.in_sync))
    put("dispatch_sdk_view_live", float(dispatcher.is_live))
    heard = dispatcher._view.live_status_at
    if heard is not None:
        # On the dispatcher's clock, which stamped the arrival.
        age = (dispatcher._clock() - heard).total_seconds()
        put("dispatch_sdk_last_live_status_age_seconds", max(age, 0.0))
    put("dispatch_sdk_bridge_clock_offset_seconds", dispatcher.clock_offset.total_seconds())
    converged = dispatcher._bridge_clock.converged
    put("dispatch_sdk_bridge_clock_converged", float(converged))


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _DispatcherCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(dispatcher: Dispatcher, registry: CollectorRegistry = REGISTRY) -> CollectorRegistry:
    """Report a dispatcher's metrics in a registry (at each scrape; nothing runs between).

    Several dispatchers may share a registry: their series differ by `microgrid_id`
    and `actor_id`. A dispatcher that is garbage-collected drops out by itself.

    Args:
        dispatcher: The dispatcher.
        registry: Where to report; prometheus_client's default registry unless given.

    Returns:
        The registry.

    Raises:
        ValueError: The registry already has a metric of one of these names from
            another collector.
    """
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _DispatcherCollector()
            registry.register(collector)
            _collectors[registry] = collector
        collector.add(dispatcher)
    return registry


def unregister(dispatcher: Dispatcher, registry: CollectorRegistry = REGISTRY) -> None:
    """Stop reporting a dispatcher's metrics in a registry.

    Args:
        dispatcher: The dispatcher.
        registry: The registry it was registered with.
    """
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is not None and collector.remove(dispatcher):
            registry.unregister(collector)
            del _collectors[registry]
