"""MQTT client I/O side by side: publish rate and retained catch-up, one Mosquitto, one run.

    .venv/bin/python bench/mqtt_io.py [--quick] [--messages N] [--topics N] [--rounds R]

Against a Mosquitto this bench starts (the repo's config: TCP_NODELAY, no queue
limit), each client in turn:

* **publish**: N messages of 600 bytes, QoS 1, retained, each on its own topic;
  the time from the first publish to the last acknowledgement.
* **retained catch-up**: a tree of N retained topics (600 bytes each) is there;
  the time from connecting to having received every one (QoS 1 subscription).

Clients: aiomqtt awaiting each call (as the tools use it), aiomqtt's publish
with the bridge's window of 100 in flight (the bridge's path until 2026-12-04),
`actor_sdk.mqtt` (`AckedPublishes` with that window, the SDK's arrival-stamped
queue drained per wake-up: the path the project uses), paho's
own network loop (a thread), gmqtt, and the C clients `mosquitto_pub -l` and
`mosquitto_sub` (the reference column; `mosquitto_sub` is the floor of the
catch-up). Each figure is the median of `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt
import gmqtt
import paho.mqtt.client as paho
from gmqtt.storage import PersistentStorage
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actor_sdk import mqtt
from bench._harness import MOSQUITTO_PUB, MOSQUITTO_SUB, Mosquitto, Stack, progress
from bench._table import Table, command_line

PAYLOAD = b"x" * 600
WINDOW = 100
CATCH_UP_BUDGET = "≤ 2 × mosquitto_sub"  # noqa: RUF001
"""The issue's budget for the SDK's catch-up (#13)."""
GMQTT_WINDOW = 19
"""Mosquitto's receive maximum (20) less one: gmqtt refuses the 20th."""
TIMEOUT = 120.0


def _settings(broker: Mosquitto) -> mqtt.BrokerSettings:
    return mqtt.parse_broker_url(broker.url("admin"))


def _paho_client(broker: Mosquitto) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.username_pw_set("admin", broker.passwords["admin"])
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    return client


# --- publishing ------------------------------------------------------------------------


async def publish_aiomqtt_each(broker: Mosquitto, topics: list[str]) -> float:
    settings = _settings(broker)
    async with aiomqtt.Client(
        settings.host, settings.port, username=settings.username, password=settings.password
    ) as client:
        start = time.perf_counter()
        for topic in topics:
            await client.publish(topic, PAYLOAD, qos=1, retain=True)
        return time.perf_counter() - start


async def publish_aiomqtt_window(broker: Mosquitto, topics: list[str]) -> float:
    # As bridge.publisher did until 2026-12-04: `WINDOW` workers each awaiting aiomqtt's publish.
    async with mqtt.new_client(_settings(broker), v5=True, max_inflight=WINDOW) as client:
        todo = iter(topics)

        async def worker() -> None:
            for topic in todo:
                await client.publish(topic, PAYLOAD, qos=1, retain=True)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(WINDOW)))
        return time.perf_counter() - start


async def publish_project(broker: Mosquitto, topics: list[str]) -> float:
    # As bridge.publisher does: MQTT v5, `WINDOW` workers each awaiting one acknowledgement,
    # no limit of the client's own.
    async with mqtt.new_client(_settings(broker), v5=True, max_inflight=0) as client:
        acks = mqtt.AckedPublishes(client)
        todo = iter(topics)

        async def worker() -> None:
            for topic in todo:
                await acks.publish(topic, PAYLOAD, retain=True)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(WINDOW)))
        return time.perf_counter() - start


def publish_paho(broker: Mosquitto, topics: list[str]) -> float:
    client = _paho_client(broker)
    acked = 0
    done = threading.Event()

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(topics):
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        start = time.perf_counter()
        for topic in topics:
            client.publish(topic, PAYLOAD, qos=1, retain=True)
        if not done.wait(TIMEOUT):
            raise TimeoutError(f"paho: {acked} of {len(topics)} acknowledged")
        return time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()


class _AckedStore(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of unacknowledged publishes, telling when one is acknowledged.

    gmqtt has no acknowledgement callback and refuses a publish beyond the
    broker's receive maximum (Mosquitto: 20) instead of queueing it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.acked = asyncio.Event()

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self.acked.set()


async def publish_gmqtt(broker: Mosquitto, topics: list[str]) -> float:
    storage = _AckedStore()
    client = gmqtt.Client("bench-gmqtt-pub", persistent_storage=storage)
    client.set_auth_credentials("admin", broker.passwords["admin"])
    await client.connect("127.0.0.1", broker.port)
    try:
        start = time.perf_counter()
        for topic in topics:
            while len(storage.get_all()) >= GMQTT_WINDOW:
                storage.acked.clear()
                await asyncio.wait_for(storage.acked.wait(), TIMEOUT)
            client.publish(topic, PAYLOAD, qos=1, retain=True)
        await asyncio.wait_for(storage.wait_empty(), TIMEOUT)
        return time.perf_counter() - start
    finally:
        await client.disconnect()


def publish_mosquitto_pub(broker: Mosquitto, count: int) -> float:
    # `-l`: one message per stdin line, all on one topic (C, no Python; it waits for
    # each acknowledgement in turn, so it is no ceiling for windowed clients).
    lines = (PAYLOAD + b"\n") * count
    start = time.perf_counter()
    subprocess.run(
        [MOSQUITTO_PUB, *broker.sub_args(), "-t", "bench/pub/c", "-q", "1", "-r", "-l"],
        input=lines,
        check=True,
        timeout=TIMEOUT,
    )
    return time.perf_counter() - start


# --- retained catch-up -----------------------------------------------------------------


async def catch_up_aiomqtt_iterating(broker: Mosquitto, count: int) -> float:
    settings = _settings(broker)
    start = time.perf_counter()
    async with aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        max_queued_incoming_messages=0,
    ) as client:
        await client.subscribe("bench/tree/#", qos=1)
        seen = 0
        async for _ in client.messages:
            seen += 1
            if seen == count:
                break
    return time.perf_counter() - start


async def catch_up_project(broker: Mosquitto, count: int) -> float:
    # As actor_sdk's broker link does: one `anext`, then everything queued meanwhile.
    start = time.perf_counter()
    client, received = mqtt.receiving_client(_settings(broker))
    async with client:
        await client.subscribe("bench/tree/#", qos=1)
        messages = aiter(client.messages)
        seen = 0
        while seen < count:
            await anext(messages)
            seen += 1
            while seen < count and not received.empty():
                received.get_nowait()
                seen += 1
    return time.perf_counter() - start


def catch_up_paho(broker: Mosquitto, count: int) -> float:
    client = _paho_client(broker)
    seen = 0
    done = threading.Event()

    def on_message(*_: object) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe("bench/tree/#", qos=1)
    start = time.perf_counter()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        if not done.wait(TIMEOUT):
            raise TimeoutError(f"paho: {seen} of {count} received")
        return time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()


async def catch_up_gmqtt(broker: Mosquitto, count: int) -> float:
    seen = 0
    done = asyncio.Event()

    def on_message(*_: object) -> int:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()
        return 0

    client = gmqtt.Client("bench-gmqtt-sub")
    client.on_message = on_message
    client.set_auth_credentials("admin", broker.passwords["admin"])
    start = time.perf_counter()
    await client.connect("127.0.0.1", broker.port)
    try:
        client.subscribe("bench/tree/#", qos=1)
        await asyncio.wait_for(done.wait(), TIMEOUT)
        return time.perf_counter() - start
    finally:
        await client.disconnect()


def catch_up_mosquitto_sub(broker: Mosquitto, count: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [MOSQUITTO_SUB, *broker.sub_args(), "-t", "bench/tree/#", "-q", "1", "-C", str(count)],
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=TIMEOUT,
    )
    return time.perf_counter() - start


# --- the run ---------------------------------------------------------------------------


def _median(rounds: int, measure: Callable[[int], float]) -> float:
    return statistics.median(measure(number) for number in range(rounds))


def _run(coroutine: Callable[[], Awaitable[float]]) -> float:
    return asyncio.run(coroutine())  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2,000 messages, one round")
    parser.add_argument("--messages", type=int, help="publishes per client (default 20,000)")
    parser.add_argument("--topics", type=int, help="retained topics to catch up (default 10,000)")
    parser.add_argument("--rounds", type=int, help="rounds per figure, median kept (default 3)")
    args = parser.parse_args()
    messages = args.messages or (2_000 if args.quick else 20_000)
    topics = args.topics or (2_000 if args.quick else 10_000)
    rounds = args.rounds or (1 if args.quick else 3)
    table = Table(f"MQTT client I/O ({messages:,} publishes, {topics:,} retained)", command_line())
    with Stack() as stack:
        broker = stack.start_mosquitto()

        def names(client: str, number: int) -> list[str]:
            return [f"bench/pub/{client}/{number}/{index}" for index in range(messages)]

        progress(f"publishing {messages:,} messages per client, {rounds} round(s)")
        floor = _median(rounds, lambda _: publish_mosquitto_pub(broker, messages))
        publishers: dict[str, Callable[[int], float]] = {
            "aiomqtt, awaiting each publish": lambda n: _run(
                lambda: publish_aiomqtt_each(broker, names("each", n))
            ),
            f"aiomqtt's publish, {WINDOW} in flight (the project's until 2026-12-04)": lambda n: (
                _run(lambda: publish_aiomqtt_window(broker, names("window", n)))
            ),
            f"actor_sdk.mqtt.AckedPublishes ({WINDOW} in flight): the project's": lambda n: _run(
                lambda: publish_project(broker, names("project", n))
            ),
            f"paho-mqtt's own loop ({WINDOW} in flight)": lambda n: publish_paho(
                broker, names("paho", n)
            ),
            f"gmqtt ({GMQTT_WINDOW} in flight, the broker's maximum)": lambda n: _run(
                lambda: publish_gmqtt(broker, names("gmqtt", n))
            ),
        }
        for name, measure in publishers.items():
            progress(f"publish: {name}")
            elapsed = _median(rounds, measure)
            table.add(f"publish rate, {name}", messages / elapsed, messages / floor, "/s")
        table.add("publish rate, mosquitto_pub -l (C)", messages / floor, None, "/s")

        progress(f"filling a tree of {topics:,} retained topics")
        # Filled through the project's path: paho's own queue of 100k publishes outlasts TIMEOUT.
        _run(lambda: publish_project(broker, [f"bench/tree/{index}" for index in range(topics)]))
        floor = _median(rounds, lambda _: catch_up_mosquitto_sub(broker, topics))
        subscribers: dict[str, Callable[[int], float]] = {
            "aiomqtt, iterating messages": lambda _: _run(
                lambda: catch_up_aiomqtt_iterating(broker, topics)
            ),
            "actor_sdk.mqtt (aiomqtt, queue drained per wake-up): the project's": lambda _: _run(
                lambda: catch_up_project(broker, topics)
            ),
            "paho-mqtt's own loop": lambda _: catch_up_paho(broker, topics),
            "gmqtt": lambda _: _run(lambda: catch_up_gmqtt(broker, topics)),
        }
        for name, measure in subscribers.items():
            progress(f"catch-up: {name}")
            budget = CATCH_UP_BUDGET if "project" in name else ""
            table.add(f"retained catch-up, {name}", _median(rounds, measure), floor, "s", budget)
        table.add("retained catch-up, mosquitto_sub (C, the floor)", floor, None, "s")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    table.note(f"reference = the C client of the same run; load average at the end: {load}")
    table.print()


if __name__ == "__main__":
    main()
