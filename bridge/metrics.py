"""Prometheus metrics of `dispatch-bridge run`: `--metrics-listen HOST:PORT`.

Off by default. Served over plain HTTP at `/metrics` in the Prometheus text
format (the `prometheus-client` library renders it), from the bridge's own
event loop, so every value is read between two steps and never half-updated.
The endpoint has no authentication and tells which dispatch types a site has:
it listens on a loopback address unless `--metrics-allow-remote` is given.

Most values are read from the pipeline's parts when Prometheus scrapes (a
collector over counters the parts keep anyway); only the schedule lateness is
recorded as it happens, through two hooks: the schedule loop reports each step
that ran for a due instant (`due`), and the publisher each retained value the
broker acknowledged (`handed`). The lateness of a running snapshot is the time
from its instant to that acknowledgement.

Series (all labelled `microgrid`):

| series | kind | meaning |
|---|---|---|
| `dispatch_bridge_info{version,bridge}` | gauge | always 1 |
| `dispatch_bridge_upstream_connected` | gauge | 1 while the Dispatch API stream is up |
| `dispatch_bridge_vouching` | gauge | 1 while the status says `online` (the bridge vouches) |
| `dispatch_bridge_last_sync_timestamp_seconds` | gauge | last good API listing (unix time) |
| `dispatch_bridge_knowledge_timestamp_seconds` | gauge | when the dispatches were confirmed |
| `dispatch_bridge_dispatches{type}` | gauge | dispatches held |
| `dispatch_bridge_running{type}` | gauge | dispatches running now, as published (0 if held) |
| `dispatch_bridge_type_on_hold{type}` | gauge | 1 while the type is held (`bridge.requests`) |
| `dispatch_bridge_skipped_dispatches` | gauge | dispatches that could not be converted |
| `dispatch_bridge_publish_queue_depth` | gauge | topics and events waiting to be sent |
| `dispatch_bridge_publishes_total` | counter | publishes the broker acknowledged |
| `dispatch_bridge_publishes_refused_total` | counter | refused by the broker (per session) |
| `dispatch_bridge_broker_reconnects_total` | counter | broker connections after the first |
| `dispatch_bridge_upstream_syncs_total` | counter | full listings from the Dispatch API |
| `dispatch_bridge_cache_writes_total` | counter | writes of the offline cache |
| `dispatch_bridge_schedule_lateness_seconds` | histogram | scheduled instant to broker ack |
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actor_sdk import wire
from actor_sdk.wall_clock import utc_now
from bridge.cache_writer import CacheWriter
from bridge.config import ConfigError, SettingsSource
from bridge.publisher import Publisher
from bridge.service import MicrogridService
from bridge.upstream import Upstream

__all__ = [
    "BridgeMetrics",
    "MetricsSettings",
    "MicrogridParts",
    "add_arguments",
    "load_settings",
    "serve",
    "start",
]

_logger = logging.getLogger("bridge.metrics")

LATENESS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; the budget for a scheduled change is a few milliseconds."""

_PENDING_INSTANTS = 64
"""Due steps remembered per microgrid until their snapshots are acknowledged."""


# --- Settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsSettings:
    """Where the metrics endpoint listens."""

    host: str
    port: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--metrics-listen` and `--metrics-allow-remote` to `dispatch-bridge run`.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; off by default; a loopback "
        "host unless --metrics-allow-remote (env DISPATCH_BRIDGE_METRICS_LISTEN)",
    )
    parser.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        default=None,
        help="allow a non-loopback --metrics-listen host: the endpoint has no authentication "
        "(env DISPATCH_BRIDGE_METRICS_ALLOW_REMOTE=1)",
    )


def _parse_listen(value: Any) -> tuple[str, int]:
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port_text)


def _parse_flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(source: SettingsSource) -> MetricsSettings | None:
    """Resolve the metrics settings (flags, environment, `[bridge]` table).

    Args:
        source: The settings source of `dispatch-bridge run`.

    Returns:
        The settings, None when metrics are off.

    Raises:
        ConfigError: The address is invalid, or not loopback without permission.
    """
    listen = source.get(
        "metrics_listen", env="DISPATCH_BRIDGE_METRICS_LISTEN", parse=_parse_listen, default=None
    )
    if listen is None:
        return None
    remote = source.get(
        "metrics_allow_remote",
        env="DISPATCH_BRIDGE_METRICS_ALLOW_REMOTE",
        parse=_parse_flag,
        default=False,
    )
    host, port = listen
    if not remote and not _is_loopback(host):
        raise ConfigError(
            f"--metrics-listen {host}:{port} is not a loopback address and the metrics endpoint "
            "has no authentication: give --metrics-allow-remote to serve it there anyway"
        )
    return MetricsSettings(host, port)


# --- What is measured ------------------------------------------------------------------


@dataclass(frozen=True)
class MicrogridParts:
    """The parts of one microgrid's pipeline the collector reads at each scrape."""

    microgrid_id: int
    service: MicrogridService
    publisher: Publisher
    upstream: Upstream
    cache_writer: CacheWriter


def _timestamp(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


class _PipelineCollector(Collector):
    """Reads the pipelines' own counters and state when Prometheus scrapes."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.parts: list[MicrogridParts] = []
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, text: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=["microgrid", *extra])

        def counter(name: str, text: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, text, labels=["microgrid"])

        connected = gauge("dispatch_bridge_upstream_connected", "1 while the API stream is up")
        vouching = gauge("dispatch_bridge_vouching", "1 while the bridge vouches (online)")
        synced = gauge("dispatch_bridge_last_sync_timestamp_seconds", "Last good API listing")
        knowledge = gauge(
            "dispatch_bridge_knowledge_timestamp_seconds", "When the dispatches were confirmed"
        )
        held = gauge("dispatch_bridge_dispatches", "Dispatches held", ("type",))
        running = gauge("dispatch_bridge_running", "Dispatches running now", ("type",))
        on_hold = gauge("dispatch_bridge_type_on_hold", "1 while the type is held", ("type",))
        skipped = gauge("dispatch_bridge_skipped_dispatches", "Dispatches not convertible")
        queue = gauge("dispatch_bridge_publish_queue_depth", "Topics and events waiting")
        published = counter("dispatch_bridge_publishes", "Publishes the broker acknowledged")
        refused = counter(
            "dispatch_bridge_publishes_refused", "Publishes the broker refused (this session)"
        )
        reconnects = counter("dispatch_bridge_broker_reconnects", "Broker connections after one")
        syncs = counter("dispatch_bridge_upstream_syncs", "Full listings from the API")
        writes = counter("dispatch_bridge_cache_writes", "Writes of the offline cache")
        now = self._clock()
        for part in self.parts:
            label = str(part.microgrid_id)
            board = part.publisher.board
            connected.add_metric([label], float(board.upstream == "connected"))
            vouching.add_metric([label], float(board.vouches(now)))
            for family, moment in ((synced, board.synced_at), (knowledge, board.knowledge_at)):
                if (value := _timestamp(moment)) is not None:
                    family.add_metric([label], value)
            core = part.service.core
            types = Counter(dispatch.type for dispatch in core.dispatches())
            for dispatch_type, count in sorted(types.items()):
                hold = core.holds.of(dispatch_type)
                held.add_metric([label, dispatch_type], count)
                running.add_metric(
                    [label, dispatch_type], 0 if hold else len(core.running_ids(dispatch_type))
                )
                on_hold.add_metric([label, dispatch_type], float(hold is not None))
            skipped.add_metric([label], board.skipped)
            queue.add_metric([label], part.publisher.pending)
            published.add_metric([label], part.publisher.published)
            refused.add_metric([label], board.refused)
            reconnects.add_metric([label], max(part.publisher.connections - 1, 0))
            syncs.add_metric([label], part.upstream.syncs)
            writes.add_metric([label], part.cache_writer.writes)
        yield from (connected, vouching, synced, knowledge, held, running, on_hold, skipped, queue)
        yield from (published, refused, reconnects, syncs, writes)


class BridgeMetrics:
    """The bridge's metrics: one registry, the pipelines it reads, the lateness it records."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = "",
        bridge: str = "",
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Create the metrics.

        Args:
            registry: Where to register (default: a new one, not the global one).
            version: The bridge's version, for `dispatch_bridge_info`.
            bridge: The bridge's name, for `dispatch_bridge_info`.
            clock: The wall clock (lateness is measured against dispatch instants).
        """
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._collector = _PipelineCollector(clock)
        self.registry.register(self._collector)
        info = GaugeMetricFamily(
            "dispatch_bridge_info", "The bridge's version and name", labels=["version", "bridge"]
        )
        info.add_metric([version, bridge], 1)
        self.registry.register(_Constant(info))
        self._lateness = Histogram(
            "dispatch_bridge_schedule_lateness_seconds",
            "From a scheduled start or stop to the broker's acknowledgement of its snapshot",
            ["microgrid"],
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self._due: dict[int, OrderedDict[datetime, datetime]] = {}

    def add_microgrid(self, parts: MicrogridParts) -> None:
        """Read one more microgrid's pipeline at each scrape, and hook its lateness.

        Args:
            parts: Its parts, before they start.
        """
        self._collector.parts.append(parts)
        self._due[parts.microgrid_id] = OrderedDict()
        parts.service.on_due = functools.partial(self.due, parts.microgrid_id)
        parts.publisher.on_handed = functools.partial(self.handed, parts.microgrid_id)

    def due(self, microgrid_id: int, instant: datetime, step: datetime) -> None:
        """Note that the schedule loop stepped at `step` for the due `instant`.

        Args:
            microgrid_id: The microgrid.
            instant: The scheduled change.
            step: The step's clock reading (the `as_of` of its snapshots).
        """
        pending = self._due.setdefault(microgrid_id, OrderedDict())
        pending[step] = instant
        while len(pending) > _PENDING_INSTANTS:
            pending.popitem(last=False)

    def handed(self, microgrid_id: int, value: object) -> None:
        """Note that the broker acknowledged a retained value; times due snapshots.

        Args:
            microgrid_id: The microgrid.
            value: What was published (only running snapshots of a due step count).
        """
        if not isinstance(value, wire.RunningSnapshot):
            return
        pending = self._due.get(microgrid_id)
        instant = None if pending is None else pending.get(value.as_of)
        if instant is not None:
            late = (self._clock() - instant).total_seconds()
            self._lateness.labels(str(microgrid_id)).observe(max(late, 0.0))

    def render(self) -> bytes:
        """The Prometheus text of every series.

        Returns:
            The body of a scrape.
        """
        return generate_latest(self.registry)


class _Constant(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterator[Metric]:
        yield self._metric


# --- The endpoint ----------------------------------------------------------------------


async def _answer(
    metrics: BridgeMetrics, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if method not in ("GET", "HEAD"):
            status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif path.split("?")[0] in ("/metrics", "/"):
            status, body, kind = "200 OK", metrics.render(), CONTENT_TYPE_LATEST
        else:
            status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + (b"" if method == "HEAD" else body))
        await writer.drain()
    except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
        pass  # a scraper that went away or sent garbage: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(metrics: BridgeMetrics, settings: MetricsSettings) -> asyncio.Server:
    """Start the endpoint.

    Args:
        metrics: What to serve.
        settings: Where to listen.

    Returns:
        The listening server (close it to stop).

    Raises:
        ConfigError: The address cannot be listened on (in use, not this host's).
    """
    try:
        server = await asyncio.start_server(
            lambda r, w: _answer(metrics, r, w), settings.host, settings.port
        )
    except OSError as error:
        raise ConfigError(
            f"cannot serve metrics on {settings.host}:{settings.port}: {error.strerror or error}"
        ) from None
    port = server.sockets[0].getsockname()[1]
    _logger.info("serving Prometheus metrics on http://%s:%d/metrics", settings.host, port)
    return server


async def start(
    settings: MetricsSettings, parts: list[MicrogridParts], *, version: str, bridge: str
) -> asyncio.Server:
    """Measure the given pipelines and serve their metrics (what `run` calls).

    Args:
        settings: Where to listen.
        parts: Each microgrid's parts, before they start.
        version: The bridge's version.
        bridge: The bridge's name.

    Returns:
        The listening server (close it to stop).

    Raises:
        ConfigError: The address cannot be listened on.
    """
    metrics = BridgeMetrics(version=version, bridge=bridge)
    for part in parts:
        metrics.add_microgrid(part)
    return await serve(metrics, settings)
