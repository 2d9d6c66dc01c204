"""`dispatch-bridge run --metrics-listen`: settings, the lateness bookkeeping, a real scrape.

The end-to-end test scrapes the HTTP endpoint of a real bridge process (real
API server, real Mosquitto) and parses it with prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from frequenz.client.dispatch.types import TargetIds
from prometheus_client.parser import text_string_to_metric_families

from actor_sdk import wire
from bridge.api import create_dispatch
from bridge.config import ConfigError, SettingsSource
from bridge.metrics import BridgeMetrics, MetricsSettings, load_settings
from testkit.api_server import ApiServerHandle, dispatch_bridge_command
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from testkit.processes import free_port, wait_until

T0 = datetime(2026, 12, 2, 21, 0, tzinfo=UTC)


def settings_from(flags: dict[str, object], env: dict[str, str] | None = None) -> object:
    return load_settings(SettingsSource(flags=flags, environ=env or {}))


def test_metrics_are_off_unless_an_address_is_given() -> None:
    assert settings_from({}) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.53"])
def test_a_loopback_address_is_accepted(host: str) -> None:
    settings = settings_from({"metrics_listen": f"{host}:9464"})

    assert settings == MetricsSettings(host.strip("[]"), 9464)


def test_a_remote_address_needs_explicit_permission() -> None:
    with pytest.raises(ConfigError, match=r"not a loopback address.*--metrics-allow-remote"):
        settings_from({"metrics_listen": "0.0.0.0:9464"})

    allowed = settings_from({"metrics_listen": "0.0.0.0:9464", "metrics_allow_remote": True})
    from_env = settings_from(
        {},
        {
            "DISPATCH_BRIDGE_METRICS_LISTEN": "192.0.2.7:9464",
            "DISPATCH_BRIDGE_METRICS_ALLOW_REMOTE": "1",
        },
    )
    assert allowed == MetricsSettings("0.0.0.0", 9464)
    assert from_env == MetricsSettings("192.0.2.7", 9464)


@pytest.mark.parametrize("value", ["9464", "host:", ":9464", "127.0.0.1:99999", "x:y"])
def test_a_malformed_address_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError, match="invalid metrics-listen"):
        settings_from({"metrics_listen": value})


def snapshot(as_of: datetime) -> wire.RunningSnapshot:
    return wire.RunningSnapshot(
        microgrid_id=1, type="T", running=(), next_change=None, as_of=as_of, session=1, seq=1
    )


def sample(metrics: BridgeMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_lateness_runs_from_the_instant_to_the_acknowledgement_of_that_steps_snapshot() -> None:
    now = [T0]
    metrics = BridgeMetrics(clock=lambda: now[0])
    step = T0 + timedelta(milliseconds=1)
    metrics.due(1, T0, step)

    now[0] = T0 + timedelta(milliseconds=4)
    metrics.handed(1, snapshot(step))
    metrics.handed(1, snapshot(step - timedelta(seconds=5)))  # an older step's: not timed
    metrics.handed(1, b"a dispatch topic")  # not a snapshot: not timed

    assert sample(metrics, "dispatch_bridge_schedule_lateness_seconds_count", microgrid="1") == 1
    total = sample(metrics, "dispatch_bridge_schedule_lateness_seconds_sum", microgrid="1")
    assert total == pytest.approx(0.004)
    le_5ms = sample(
        metrics, "dispatch_bridge_schedule_lateness_seconds_bucket", microgrid="1", le="0.005"
    )
    assert le_5ms == 1


def test_only_the_latest_due_steps_are_remembered() -> None:
    metrics = BridgeMetrics(clock=lambda: T0)
    for second in range(100):
        metrics.due(1, T0, T0 + timedelta(seconds=second))

    metrics.handed(1, snapshot(T0))  # forgotten: 64 newer steps since
    metrics.handed(1, snapshot(T0 + timedelta(seconds=99)))

    assert sample(metrics, "dispatch_bridge_schedule_lateness_seconds_count", microgrid="1") == 1


# --- A real bridge, scraped ---------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            values[(found.name, tuple(sorted(found.labels.items())))] = found.value
    return values


def test_a_real_bridge_serves_its_metrics(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    now = datetime.now(UTC)

    async def create() -> None:
        async with api_server.client() as client:
            for start, target in ((now - timedelta(minutes=1), 3), (now + timedelta(seconds=3), 4)):
                await create_dispatch(
                    client,
                    microgrid_id=1,
                    type="SET.POWER",
                    start_time=start,
                    duration=timedelta(minutes=10),
                    target=TargetIds(target),
                )

    asyncio.run(create())
    port = free_port()
    bridge = bridge_factory(
        api_server, mqtt_broker, extra_args=["--metrics-listen", f"127.0.0.1:{port}"]
    )
    bridge.wait_synced()
    url = f"http://127.0.0.1:{port}/metrics"
    mg = (("microgrid", "1"),)
    power = (("microgrid", "1"), ("type", "SET.POWER"))

    # The second dispatch starts 3 s after its creation: a lateness sample then.
    values = wait_until(
        lambda: (
            found
            if (found := scrape(url)).get(("dispatch_bridge_schedule_lateness_seconds_count", mg))
            else None
        ),
        30,
        "a lateness sample",
    )

    assert values[("dispatch_bridge_dispatches", power)] == 2
    assert values[("dispatch_bridge_running", power)] == 2
    assert values[("dispatch_bridge_upstream_connected", mg)] == 1
    assert values[("dispatch_bridge_last_sync_timestamp_seconds", mg)] > now.timestamp() - 60
    assert values[("dispatch_bridge_publishes_total", mg)] >= 4
    assert values[("dispatch_bridge_publish_queue_depth", mg)] >= 0
    assert values[("dispatch_bridge_publishes_refused_total", mg)] == 0
    assert values[("dispatch_bridge_broker_reconnects_total", mg)] == 0
    assert values[("dispatch_bridge_upstream_syncs_total", mg)] >= 1
    assert values[("dispatch_bridge_cache_writes_total", mg)] >= 1
    assert values[("dispatch_bridge_schedule_lateness_seconds_sum", mg)] < 5
    info = [key for key in values if key[0] == "dispatch_bridge_info"]
    assert info and ("bridge", "test-bridge") in info[0][1]
    # A restart of the broker is a reconnect.
    mqtt_broker.restart()
    wait_until(
        lambda: scrape(url)[("dispatch_bridge_broker_reconnects_total", mg)] == 1,
        30,
        "the reconnect to be counted",
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert error.value.code == 404


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:{port}", "not a loopback address"),
        ("127.0.0.1:{port}", "cannot serve metrics on 127.0.0.1:"),
    ],
)
def test_run_refuses_a_remote_or_taken_metrics_address_with_exit_2(
    api_server: ApiServerHandle, mqtt_broker: Broker, tmp_path: Path, listen: str, message: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*dispatch_bridge_command(), "run", "--metrics-listen", listen.format(port=port)],
            env={
                "PATH": "/usr/bin:/bin",
                "MICROGRID_ID": "1",
                "DISPATCH_API_URL": api_server.url,
                "DISPATCH_API_AUTH_KEY": api_server.key or "k",
                "MQTT_URL": f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}",
                "DISPATCH_BRIDGE_STATE_DIR": str(tmp_path),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
