"""`dispatch-bridge health`: the pure verdict core, then the command against real parts.

The end-to-end tests run the command as a subprocess against a real Mosquitto,
with a real bridge (`dispatch-bridge run`) and API server where the case needs
one: online, syncing (API unreachable, no cache), killed, hung (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import wire
from bridge.health import HealthCheck
from testkit.api_server import ApiServerHandle, dispatch_bridge_command
from testkit.bridge import BridgeFactory, retained_snapshot
from testkit.broker import Broker
from testkit.processes import ProcessFactory, free_port, wait_until
from tests.fixtures.cache import cache_path

LAYOUT = wire.TopicLayout.for_microgrid(1)
AS_OF = datetime(2026, 12, 2, 21, 40, 3, tzinfo=UTC)


def status(state: str = "online", **fields: object) -> bytes:
    values: dict[str, object] = {
        "state": state,
        "upstream": "connected",
        "synced_at": AS_OF,
        "session": 7,
        "bridge": "edge-1",
        "version": "0.1.0",
        "dispatches": 12,
        "as_of": AS_OF,
        "knowledge_at": AS_OF,
    }
    values.update(fields)
    return wire.encode(wire.BridgeStatus(**values))  # type: ignore[arg-type]


# --- The pure core -------------------------------------------------------------------


def test_a_live_online_status_is_healthy() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)

    verdict = check.observe(status(), retained=False)

    assert verdict is not None and verdict.healthy
    assert verdict.reason == (
        "bridge online: session 7, 12 dispatches, knowledge from 2026-12-02T21:40:03Z"
    )


def test_a_retained_online_status_alone_is_not_enough() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)

    assert check.observe(status(), retained=True) is None
    assert check.deadline == 110.0

    verdict = check.expired()
    assert not verdict.healthy
    assert verdict.reason == "no live status within 10 s (retained says online, session 7)"


def test_the_wait_is_twice_the_status_interval_the_retained_status_announces() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)

    check.observe(status(status_interval=3), retained=True)

    assert check.deadline == 106.0


def test_a_timeout_overrides_the_status_interval() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0, timeout=2.5)

    check.observe(status(status_interval=30), retained=True)

    assert check.deadline == 102.5
    assert check.expired().reason.startswith("no live status within 2.5 s")


def test_a_retained_offline_status_answers_at_once() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)

    verdict = check.observe(status("offline"), retained=True)

    assert verdict is not None and not verdict.healthy
    assert verdict.reason == "bridge offline since 2026-12-02T21:40:03Z (session 7)"


def test_a_live_syncing_status_says_why() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)
    check.observe(status(), retained=True)

    verdict = check.observe(
        status("syncing", error="Dispatch API unreachable, no cache"), retained=False
    )

    assert verdict is not None and not verdict.healthy
    assert verdict.reason == "bridge syncing: Dispatch API unreachable, no cache"


def test_a_retained_syncing_status_waits_for_a_live_one_and_reports_its_error() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)

    assert check.observe(status("syncing", error="knowledge too old"), retained=True) is None

    assert check.expired().reason == (
        "no live status within 10 s (retained says syncing, session 7: knowledge too old)"
    )


def test_an_undecodable_status_is_not_live() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)

    assert check.observe(b'{"state": "vouching-v9"}', retained=False) is None

    verdict = check.expired()
    assert not verdict.healthy
    assert verdict.reason.startswith(f"status on {LAYOUT.status} cannot be read: ")


def test_no_status_at_all_names_the_topic() -> None:
    check = HealthCheck(LAYOUT.status, started=100.0)

    assert check.observe(b"", retained=True) is None

    assert check.expired().reason == (
        f"no status on {LAYOUT.status} within 10 s (bridge never connected, or another topic root?)"
    )


# --- The command against a real broker ---------------------------------------------------


def health_command(*extra: str) -> list[str]:
    return [
        *dispatch_bridge_command(),
        "--log-level",
        "DEBUG",
        "health",
        "--microgrid-id",
        "1",
        *extra,
    ]


def health_env(broker: Broker, tmp_path: Path) -> dict[str, str]:
    """The read-only user's credentials the way a deployment gives them: env and a file."""
    secret = tmp_path / "actor-password"
    secret.write_text(f"{broker.actor_password or ''}\n")
    env = {
        "MQTT_URL": f"mqtt://{broker.host}:{broker.port}",
        "MQTT_USERNAME": broker.username("actor") or "",
        "PATH": "/usr/bin:/bin",
    }
    if broker.actor_password is not None:
        env["MQTT_PASSWORD_FILE"] = str(secret)
    return env


def run_health(
    broker: Broker, tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        health_command(*extra),
        env=env or health_env(broker, tmp_path),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


async def publish(broker: Broker, payload: bytes, *, retain: bool) -> None:
    async with aiomqtt.Client(**broker.client_kwargs("bridge")) as client:
        await client.publish(LAYOUT.status, payload, qos=1, retain=retain)


async def test_health_refuses_a_retained_online_status_without_a_live_one(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    await publish(mqtt_broker, status(status_interval=1), retain=True)

    result = await asyncio.to_thread(run_health, mqtt_broker, tmp_path)

    assert result.returncode == 1, result.stderr
    assert result.stdout == "no live status within 2 s (retained says online, session 7)\n"


async def test_health_accepts_a_live_online_status_published_while_it_waits(
    mqtt_broker: Broker, process_factory: ProcessFactory, tmp_path: Path
) -> None:
    await publish(mqtt_broker, status(), retain=True)
    health = process_factory(
        health_command("--timeout", "60"),
        name="health",
        extra_env=health_env(mqtt_broker, tmp_path),
    )
    # The broker sends the retained status on SUBSCRIBE, before any later publish.
    health.wait_for_output("waiting for a live status", timeout=20)

    await publish(mqtt_broker, status(session=8), retain=False)

    assert await asyncio.to_thread(health.wait, 30) == 0
    assert "\nbridge online: session 8, 12 dispatches" in health.program_output()


def test_health_exits_1_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [
            *dispatch_bridge_command(),
            "health",
            "--broker",
            f"mqtt://actor:secret-pw@127.0.0.1:{port}",
            "--microgrid-id",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert result.stdout.startswith(f"broker unreachable: mqtt://actor@127.0.0.1:{port}: ")
    assert result.stdout.count("\n") == 1
    assert "secret-pw" not in result.stdout + result.stderr


def test_health_exits_1_on_wrong_credentials(mqtt_broker: Broker, tmp_path: Path) -> None:
    mqtt_broker.require_acl()
    env = {**health_env(mqtt_broker, tmp_path), "MQTT_PASSWORD": "wrong"}

    result = run_health(mqtt_broker, tmp_path, env=env)

    assert result.returncode == 1
    assert result.stdout.startswith("broker unreachable: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--microgrid-id", "1"], "no broker"),
        (["--broker", "mqtt://127.0.0.1:1883"], "no microgrid"),
        (
            ["--broker", "mqtt://127.0.0.1:1883", "--microgrid-id", "1", "--timeout", "0"],
            "--timeout",
        ),
    ],
)
def test_health_usage_errors_exit_2(args: Sequence[str], message: str) -> None:
    result = subprocess.run(
        [*dispatch_bridge_command(), "health", *args],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert message in result.stderr


# --- The command against a real bridge ---------------------------------------------------


def test_health_exits_0_for_a_synced_bridge_and_reads_the_config_file(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker)
    bridge.wait_synced()
    # Broker and microgrid from the [bridge] table of the deploy example's shape.
    config = tmp_path / "dispatch-bridge.toml"
    config.write_text(
        f'[bridge]\nmicrogrid_id = [1]\nbroker = "mqtt://{mqtt_broker.host}:{mqtt_broker.port}"\n'
    )
    env = health_env(mqtt_broker, tmp_path)
    del env["MQTT_URL"]

    result = subprocess.run(
        [*dispatch_bridge_command(), "health", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("bridge online: session ")


def test_health_exits_1_while_the_bridge_cannot_reach_the_api_and_has_no_cache(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    bridge = bridge_factory(
        api_server,
        mqtt_broker,
        extra_env={"DISPATCH_API_URL": f"grpc://127.0.0.1:{free_port()}?ssl=false"},
    )
    wait_until(
        lambda: (
            bridge.process.check_alive()
            or b'"syncing"' in retained_snapshot(mqtt_broker, LAYOUT.status).get(LAYOUT.status, b"")
        ),
        30,
        "the bridge to publish a syncing status",
    )

    result = run_health(mqtt_broker, tmp_path)

    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("bridge syncing: "), result.stdout
    assert result.stdout.count("\n") == 1


def retained_error(broker: Broker) -> str | None:
    """The `error` of the retained status (raises when there is none)."""
    return wire.decode_status(retained_snapshot(broker, LAYOUT.status)[LAYOUT.status]).error


def test_a_bridge_that_cannot_write_its_cache_is_healthy_and_says_so_until_it_can(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """A full or read-only state dir (#18 item 6): from memory, in the status and health."""
    state = tmp_path / "state"
    blocker = cache_path(state, 1)
    blocker.mkdir(parents=True)  # a directory where the cache file goes: unwritable for root too
    bridge = bridge_factory(
        api_server, mqtt_broker, state_dir=state, extra_args=["--status-interval", "1"]
    )
    bridge.wait_synced()
    wait_until(
        lambda: "dispatch cache" in (retained_error(mqtt_broker) or ""),
        20,
        "the status to say the cache cannot be written",
    )

    result = run_health(mqtt_broker, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("bridge online: session "), result.stdout
    assert "; but: cannot write the dispatch cache " in result.stdout
    assert "running from memory" in result.stdout
    blocker.rmdir()  # the state dir is writable again
    wait_until(
        lambda: retained_error(mqtt_broker) is None,
        20,
        "the status to drop the cache problem",
    )
    assert "is written again" in bridge.output()
    assert bridge.stop() == 0


def test_health_exits_1_once_the_bridge_was_killed(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker)
    bridge.wait_synced()
    assert run_health(mqtt_broker, tmp_path).returncode == 0

    bridge.kill9()
    # The broker publishes the will when it notices the closed connection.
    wait_until(
        lambda: (
            b'"offline"' in retained_snapshot(mqtt_broker, LAYOUT.status).get(LAYOUT.status, b"")
        ),
        30,
        "the will to be published",
    )
    result = run_health(mqtt_broker, tmp_path)

    assert result.returncode == 1
    assert result.stdout.startswith("bridge offline since "), result.stdout


def test_health_exits_1_for_a_hung_bridge_whose_retained_status_still_says_online(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker)
    # Not only synced: the status says online after the read-back of the broker's tree.
    bridge.wait_vouching()
    bridge.process.signal(signal.SIGSTOP)
    try:
        result = run_health(mqtt_broker, tmp_path, "--timeout", "3")
    finally:
        bridge.process.signal(signal.SIGCONT)

    assert result.returncode == 1
    assert result.stdout.startswith("no live status within 3 s (retained says online, session ")
