"""The SDK's Prometheus metrics (actor_sdk/metrics.py), scraped from a registry.

Every test runs a real `Dispatcher` against the session's Mosquitto, fed by a
`ScriptedBridge`, registers it with a fresh registry and scrapes that registry in
the text format an HTTP endpoint serves, parsed back with prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from frequenz.channels import Receiver
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from actor_sdk import Dispatcher, DispatchInfo, metrics
from testkit.proxy import TcpProxy
from tests.fixtures.sdk import (
    SDK_TEST_TYPE,
    ActorLog,
    RecordingActor,
    ScriptedBridge,
    dispatcher_for,
    managing,
    poll,
    utcnow,
    wire_dispatch,
)

T = SDK_TEST_TYPE
DOCS = Path(__file__).resolve().parents[1] / "docs" / "actor-sdk.md"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """(sample name, sorted labels) -> value, from the registry's text exposition."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, dispatcher: Dispatcher, **labels: str) -> float | None:
    key = {"microgrid_id": str(dispatcher.microgrid_id), "actor_id": dispatcher.actor_id, **labels}
    return samples.get((name, tuple(sorted(key.items()))))


def registered(dispatcher: Dispatcher) -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics.register(dispatcher, registry)
    return registry


async def scraped(registry: CollectorRegistry, condition: object, within: float = 10.0) -> Samples:
    """Scrape until `condition(samples)` holds (metrics follow events, not a clock)."""
    assert callable(condition)
    latest: list[Samples] = []

    def holds() -> bool:
        latest[:] = [scrape(registry)]
        return bool(condition(latest[0]))

    await poll(holds, within)
    return latest[0]


async def test_a_started_and_stopped_actor_and_a_live_view_show_in_the_metrics(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    async with managing(scripted_bridge, log) as dispatcher:
        registry = registered(dispatcher)
        await poll(lambda: dispatcher.is_live)
        await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600)])
        await log.wait_count("start", 1)

        samples = scrape(registry)
        assert value(samples, "dispatch_sdk_actors_running", dispatcher, dispatch_type=T) == 1
        assert value(samples, "dispatch_sdk_actor_starts_total", dispatcher, dispatch_type=T) == 1
        assert value(samples, "dispatch_sdk_actor_stops_total", dispatcher, dispatch_type=T) == 0
        assert value(samples, "dispatch_sdk_broker_connected", dispatcher) == 1
        assert value(samples, "dispatch_sdk_broker_reconnects_total", dispatcher) == 0
        assert value(samples, "dispatch_sdk_view_in_sync", dispatcher) == 1
        assert value(samples, "dispatch_sdk_view_live", dispatcher) == 1
        age = value(samples, "dispatch_sdk_last_live_status_age_seconds", dispatcher)
        # The scripted bridge's heartbeat is 1 s.
        assert age is not None and 0 <= age < 1.5 * scripted_bridge.status_interval + 0.5

        await scripted_bridge.running(T, [])
        await log.wait_count("stop", 1)
        samples = scrape(registry)
        assert value(samples, "dispatch_sdk_actors_running", dispatcher, dispatch_type=T) == 0
        assert value(samples, "dispatch_sdk_actor_stops_total", dispatcher, dispatch_type=T) == 1

        # Counters survive stop_managing (they never go back); the type's actors are gone.
        await scripted_bridge.running(T, [wire_dispatch(2, T, duration=600)])
        await log.wait_count("start", 2)
        await dispatcher.stop_managing(T)
        samples = scrape(registry)
        assert value(samples, "dispatch_sdk_actor_starts_total", dispatcher, dispatch_type=T) == 2
        assert value(samples, "dispatch_sdk_actor_stops_total", dispatcher, dispatch_type=T) == 2
        assert value(samples, "dispatch_sdk_actors_running", dispatcher, dispatch_type=T) == 0


class _SlowThenFailingFactory:
    """Hangs on dispatch 1 (until cancelled), raises on dispatch 2."""

    def __init__(self, log: ActorLog) -> None:
        self.log = log

    async def __call__(self, info: DispatchInfo, updates: Receiver[DispatchInfo]) -> RecordingActor:
        self.log.note_factory_call()
        if int(info._src.id) == 1:
            await asyncio.Event().wait()
        raise RuntimeError("this factory fails for the test")


async def test_failed_starts_and_factory_timeouts_are_counted(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    async with dispatcher_for(scripted_bridge) as dispatcher:
        registry = registered(dispatcher)
        await dispatcher.start_managing(
            T,
            actor_factory=_SlowThenFailingFactory(log),
            retry_interval=timedelta(seconds=60),
            factory_timeout=timedelta(seconds=0.3),
        )
        await poll(lambda: dispatcher.is_live)
        await scripted_bridge.running(
            T, [wire_dispatch(1, T, duration=600), wire_dispatch(2, T, duration=600)]
        )

        def both_failed(samples: Samples) -> bool:
            failed = value(
                samples, "dispatch_sdk_actor_start_failures_total", dispatcher, dispatch_type=T
            )
            return failed == 2

        samples = await scraped(registry, both_failed)
        assert (
            value(samples, "dispatch_sdk_factory_timeouts_total", dispatcher, dispatch_type=T) == 1
        )
        assert value(samples, "dispatch_sdk_actor_starts_total", dispatcher, dispatch_type=T) == 0
        assert value(samples, "dispatch_sdk_actors_running", dispatcher, dispatch_type=T) == 0


async def test_a_lost_broker_shows_as_disconnected_then_as_a_reconnect(
    scripted_bridge: ScriptedBridge, broker_proxy: TcpProxy
) -> None:
    await scripted_bridge.status("online")
    async with dispatcher_for(
        scripted_bridge, broker_proxy.url(scripted_bridge.broker), keepalive=2
    ) as dispatcher:
        registry = registered(dispatcher)
        await poll(lambda: dispatcher.is_live)

        await broker_proxy.cut()
        samples = await scraped(
            registry, lambda s: value(s, "dispatch_sdk_broker_connected", dispatcher) == 0
        )
        assert value(samples, "dispatch_sdk_view_live", dispatcher) == 0
        assert value(samples, "dispatch_sdk_view_in_sync", dispatcher) == 0
        before = value(samples, "dispatch_sdk_last_live_status_age_seconds", dispatcher)
        assert before is not None

        await broker_proxy.resume()
        samples = await scraped(
            registry, lambda s: value(s, "dispatch_sdk_view_live", dispatcher) == 1
        )
        assert value(samples, "dispatch_sdk_broker_connected", dispatcher) == 1
        assert value(samples, "dispatch_sdk_broker_reconnects_total", dispatcher) == 1


async def test_the_clock_offset_to_the_bridge_is_reported(scripted_bridge: ScriptedBridge) -> None:
    skew = timedelta(seconds=5)
    await scripted_bridge.status("online")
    # The host's clock runs 5 s ahead of the bridge's.
    async with dispatcher_for(scripted_bridge, clock=lambda: utcnow() + skew) as dispatcher:
        registry = registered(dispatcher)
        samples = scrape(registry)
        assert value(samples, "dispatch_sdk_bridge_clock_converged", dispatcher) == 0
        assert value(samples, "dispatch_sdk_bridge_clock_offset_seconds", dispatcher) == 0
        # Live (not retained) snapshots are the samples of the bridge's clock.
        for _ in range(4):
            await scripted_bridge.running(T, [], retain=False)

        samples = await scraped(
            registry, lambda s: value(s, "dispatch_sdk_bridge_clock_converged", dispatcher) == 1
        )
        offset = value(samples, "dispatch_sdk_bridge_clock_offset_seconds", dispatcher)
        assert offset is not None and 5.0 <= offset < 5.5


async def test_dispatchers_share_a_registry_and_leave_it(scripted_bridge: ScriptedBridge) -> None:
    await scripted_bridge.status("online")
    registry = CollectorRegistry()
    async with (
        dispatcher_for(scripted_bridge, actor_id="metrics-a") as first,
        dispatcher_for(scripted_bridge, actor_id="metrics-b") as second,
    ):
        metrics.register(first, registry)
        metrics.register(second, registry)
        samples = scrape(registry)
        assert value(samples, "dispatch_sdk_broker_connected", first) == 1
        assert value(samples, "dispatch_sdk_broker_connected", second) == 1

        metrics.unregister(first, registry)
        samples = scrape(registry)
        assert value(samples, "dispatch_sdk_broker_connected", first) is None
        assert value(samples, "dispatch_sdk_broker_connected", second) == 1
        metrics.unregister(second, registry)
        assert scrape(registry) == {}


async def test_a_name_clash_with_the_callers_metrics_is_refused(
    scripted_bridge: ScriptedBridge,
) -> None:
    registry = CollectorRegistry()
    Gauge("dispatch_sdk_view_live", "the caller's own", registry=registry)
    await scripted_bridge.status("online")
    async with dispatcher_for(scripted_bridge) as dispatcher:
        with pytest.raises(ValueError, match="dispatch_sdk_view_live"):
            metrics.register(dispatcher, registry)


def test_every_metric_is_prefixed_and_documented() -> None:
    documented = DOCS.read_text()

    for name in metrics.METRICS:
        assert name.startswith("dispatch_sdk_"), name
        assert f"`{name}`" in documented, f"{name} is not in docs/actor-sdk.md"
    assert metrics.METRICS.keys() >= metrics.PER_TYPE
