"""The broker fixture and the shipped mosquitto.conf / ACL, checked with real clients.

Publishers use aiomqtt (what the bridge uses); readers include the real
`mosquitto_sub`, a client no one here wrote.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from testkit.broker import SHIPPED_CONFIG, Broker, adapt_config
from testkit.processes import wait_until

MOSQUITTO_SUB = shutil.which("mosquitto_sub")
needs_mosquitto_sub = pytest.mark.skipif(
    MOSQUITTO_SUB is None, reason="mosquitto_sub missing: apt-get install mosquitto-clients"
)


def unique_topic(kind: str = "running") -> str:
    """A topic under the dispatch tree no other test uses."""
    return f"microgrid/1/dispatch/SMOKE_{uuid.uuid4().hex[:8]}/{kind}"


async def mosquitto_sub(
    broker: Broker, user: str | None, topic: str, wait_s: int = 10
) -> tuple[int, str, str]:
    """Read one message with the real `mosquitto_sub`; return (exit code, stdout, stderr)."""
    assert MOSQUITTO_SUB is not None
    proc = await asyncio.create_subprocess_exec(
        MOSQUITTO_SUB,
        *broker.cli_args(user),
        "-t",
        topic,
        "-C",
        "1",
        "-W",
        str(wait_s),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), wait_s + 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def publish(broker: Broker, user: str, topic: str, payload: bytes) -> None:
    """Publish one retained QoS 1 message and wait for the broker's PUBACK."""
    async with aiomqtt.Client(**broker.client_kwargs(user)) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def read_retained(broker: Broker, user: str, topic: str, within_s: float = 5.0) -> bytes:
    """Subscribe as a new client and return the retained payload of `topic`."""
    async with aiomqtt.Client(**broker.client_kwargs(user)) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(within_s):
            async for message in client.messages:
                assert message.retain, f"expected the retained message of {topic}"
                return bytes(message.payload)  # type: ignore[arg-type]
    raise AssertionError("unreachable")


def test_adapted_config_keeps_every_shipped_setting_but_paths_and_listener() -> None:
    text = adapt_config(
        SHIPPED_CONFIG.read_text(),
        listener="1234 127.0.0.1",
        persistence_dir="/tmp/x",
        password_file="/tmp/p",
        acl_file="/tmp/a",
        run_as_root=True,
    )
    settings = [line.split(None, 1) for line in text.splitlines() if line and line[0] != "#"]
    as_dict = {key: value for key, *rest in settings for value in rest}
    assert as_dict["persistence"] == "true"
    assert as_dict["autosave_interval"] == "10"
    assert as_dict["set_tcp_nodelay"] == "true"
    assert as_dict["max_queued_messages"] == "0"
    assert as_dict["allow_anonymous"] == "false"
    assert as_dict["per_listener_settings"] == "false"
    assert [v for k, v in ((s[0], s[-1]) for s in settings) if k == "listener"] == [
        "1234 127.0.0.1"
    ], "exactly one listener, on loopback"
    assert as_dict["password_file"] == "/tmp/p"
    assert as_dict["acl_file"] == "/tmp/a"
    assert as_dict["persistence_location"] == "/tmp/x/"
    assert as_dict["user"] == "root"


@needs_mosquitto_sub
async def test_retained_message_of_bridge_is_read_back_by_mosquitto_sub(
    mqtt_broker: Broker,
) -> None:
    topic = unique_topic()
    await publish(mqtt_broker, "bridge", topic, b'{"hello":"actors"}')

    code, out, err = await mosquitto_sub(mqtt_broker, "actor", topic)

    assert (code, out) == (0, '{"hello":"actors"}\n'), err


@needs_mosquitto_sub
async def test_anonymous_client_is_refused(mqtt_broker: Broker) -> None:
    mqtt_broker.require_acl()

    code, out, err = await mosquitto_sub(mqtt_broker, None, unique_topic(), wait_s=5)
    assert code != 0
    assert out == ""
    assert "not authorised" in err.lower() or "refused" in err.lower(), err

    with pytest.raises(aiomqtt.MqttError, match=r"(?i)not authori[sz]ed"):
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, timeout=5):
            pass


async def test_wrong_password_is_refused(mqtt_broker: Broker) -> None:
    mqtt_broker.require_acl()
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            mqtt_broker.host, mqtt_broker.port, username="bridge", password="wrong", timeout=5
        ):
            pass


@pytest.mark.parametrize(
    ("user", "topic"),
    [
        ("actor", unique_topic("running")),
        ("actor", "microgrid/1/dispatch/status"),
        ("bridge", "microgrid/1/not-dispatch/x"),
    ],
    ids=["actor-running", "actor-status", "bridge-outside-its-tree"],
)
async def test_publish_without_write_permission_is_acknowledged_but_not_stored(
    mqtt_broker: Broker, user: str, topic: str
) -> None:
    mqtt_broker.require_acl()
    await publish(mqtt_broker, "admin", topic, b"original")

    async with aiomqtt.Client(**mqtt_broker.client_kwargs("admin")) as watcher:
        await watcher.subscribe(topic, qos=1)
        await watcher.subscribe(topic + "/marker", qos=1)
        messages = aiomqtt_iter(watcher)
        first = await anext(messages)
        assert (first.retain, first.payload) == (True, b"original")

        # MQTT 3.1.1 has no way to refuse a publish: the PUBACK comes, the message goes.
        await publish(mqtt_broker, user, topic, b"forged")
        # Published after the broker acknowledged (and dropped) the forged one, so if the
        # forged one had been delivered, it would have arrived before this marker.
        await publish(mqtt_broker, "admin", topic + "/marker", b"marker")
        async with asyncio.timeout(5):
            nxt = await anext(messages)
        assert (str(nxt.topic), nxt.payload) == (topic + "/marker", b"marker")

    assert await read_retained(mqtt_broker, "admin", topic) == b"original"


async def aiomqtt_iter(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """The client's messages as an async generator usable with `anext`."""
    async for message in client.messages:
        yield message


async def test_actor_reads_but_bridge_topics_outside_dispatch_tree_are_invisible_to_it(
    mqtt_broker: Broker,
) -> None:
    mqtt_broker.require_acl()
    hidden = "microgrid/1/private/x"
    await publish(mqtt_broker, "admin", hidden, b"secret")
    visible = unique_topic()
    await publish(mqtt_broker, "admin", visible, b"public")

    async with aiomqtt.Client(**mqtt_broker.client_kwargs("actor")) as client:
        await client.subscribe("microgrid/#", qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                # The ACL filters per topic: the visible one arrives, the hidden never.
                assert str(message.topic) == visible
                break


async def test_clean_restart_keeps_retained_messages(mqtt_broker: Broker) -> None:
    mqtt_broker.require_control()
    topic = unique_topic()
    await publish(mqtt_broker, "bridge", topic, b"survives")

    mqtt_broker.restart()  # SIGTERM: Mosquitto saves its database before it exits

    assert await read_retained(mqtt_broker, "actor", topic) == b"survives"


@pytest.mark.slow
async def test_kill9_after_autosave_keeps_retained_messages_on_the_same_port(
    mqtt_broker: Broker,
) -> None:
    mqtt_broker.require_control()
    if mqtt_broker.kind != "mosquitto":
        pytest.skip("watches the Mosquitto log for the autosave")
    port = mqtt_broker.port
    saves_before = mqtt_broker.log().count("Saving in-memory database")
    topic = unique_topic()
    published_ns = time.time_ns()
    await publish(mqtt_broker, "bridge", topic, b"autosaved")

    # The shipped autosave_interval is 10 s; wait for the first save after the publish.
    await asyncio.to_thread(
        wait_until,
        lambda: mqtt_broker.log().count("Saving in-memory database") > saves_before,
        20,
        "a Mosquitto autosave",
    )
    # Mosquitto logs that line before it writes `<file>.new` and renames it over
    # the database: the save is complete once the database is newer than the publish.
    saved_to = Path(
        re.findall(r"Saving in-memory database to (\S+?)\.?$", mqtt_broker.log(), re.M)[-1]
    )
    await asyncio.to_thread(
        wait_until,
        lambda: saved_to.exists() and saved_to.stat().st_mtime_ns > published_ns,
        10,
        "the autosave to finish writing",
    )
    mqtt_broker.kill9()
    mqtt_broker.start()

    assert mqtt_broker.port == port
    assert await read_retained(mqtt_broker, "actor", topic) == b"autosaved"


async def test_new_subscriber_receives_every_retained_topic_beyond_default_queue_limit(
    mqtt_broker: Broker,
) -> None:
    """`max_queued_messages 0` in the shipped config: all 3,000, not the default 1,000."""
    if os.environ.get("MQTT_TEST_BROKER"):
        pytest.skip("depends on the shipped config, not an external broker's")
    root = f"microgrid/1/dispatch/MANY_{uuid.uuid4().hex[:8]}"
    count = 3000
    in_flight = asyncio.Semaphore(20)
    async with aiomqtt.Client(**mqtt_broker.client_kwargs("bridge")) as client:

        async def one(i: int) -> None:
            async with in_flight:
                await client.publish(f"{root}/dispatches/{i}", b"x" * 100, qos=1, retain=True)

        await asyncio.gather(*(one(i) for i in range(count)))

    seen: set[str] = set()
    async with aiomqtt.Client(**mqtt_broker.client_kwargs("actor")) as client:
        await client.subscribe(f"{root}/#", qos=1)
        async with asyncio.timeout(15):
            async for message in client.messages:
                seen.add(str(message.topic))
                if len(seen) == count:
                    break
    assert len(seen) == count
