"""Two processes with one MQTT client id: the SDK says so once, with the fix (real Mosquitto)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta

import pytest

from actor_sdk import Dispatcher
from actor_sdk._client_id_clash import SESSION_TAKEN_OVER, ClientIdClash
from testkit.broker import Broker
from testkit.processes import async_wait_until


def test_short_connections_in_a_row_are_told_once() -> None:
    clash = ClientIdClash("edge-1-power-mg7", short_s=2.0, in_a_row=3)
    assert clash.ended(0.3) is None
    assert clash.ended(0.2) is None
    line = clash.ended(0.4)
    assert line is not None
    assert "'edge-1-power-mg7'" in line and "actor_id" in line
    assert clash.ended(0.1) is None  # once


def test_a_long_connection_breaks_the_run() -> None:
    clash = ClientIdClash("c", short_s=2.0, in_a_row=3)
    for lasted in (0.3, 0.3, 60.0, 0.3, 0.3):
        assert clash.ended(lasted) is None


def test_a_failed_connect_between_short_connections_breaks_the_run() -> None:
    # A flaky link or a restarting broker: some attempt fails in between; a shared
    # id never makes a connect fail (seen as a false report in a chaos run).
    clash = ClientIdClash("c", short_s=2.0, in_a_row=3)
    for lasted in (0.3, 0.3, None, 0.3, 0.3, None, 0.3):
        if lasted is None:
            clash.failed_to_connect()
        else:
            assert clash.ended(lasted) is None


def test_session_taken_over_is_told_at_once() -> None:
    line = ClientIdClash("c").ended(30.0, reason=SESSION_TAKEN_OVER)
    assert line is not None and "took over the session" in line


def test_a_random_client_id_never_clashes() -> None:
    clash = ClientIdClash(None, in_a_row=1)
    assert clash.ended(0.1, reason=SESSION_TAKEN_OVER) is None


@pytest.mark.slow
async def test_two_dispatchers_with_one_client_id_log_an_error_once(
    mqtt_broker_session: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # Two processes of one program on one host, as two dispatchers of one process
    # given the same id: the broker throws each off when the other connects.
    client_id = f"clash-{uuid.uuid4().hex[:8]}"
    dispatchers = [
        Dispatcher(
            microgrid_id=4242,
            broker=mqtt_broker_session.url("actor"),
            actor_id=client_id,
            reconnect_delay=timedelta(seconds=0.05),
            max_reconnect_delay=timedelta(seconds=0.1),
            keepalive=1,  # connections count as short below 13.5 s
        )
        for _ in range(2)
    ]

    def errors() -> list[logging.LogRecord] | None:
        found = [r for r in caplog.records if r.levelno >= logging.ERROR]
        return [r for r in found if r.name.startswith("actor_sdk")] or None

    with caplog.at_level(logging.INFO, logger="actor_sdk"):
        for dispatcher in dispatchers:
            dispatcher.start()
        try:
            await async_wait_until(errors, timeout=60, what="an error about the client id")
        finally:
            await asyncio.gather(*(dispatcher.stop() for dispatcher in dispatchers))
    found = errors() or []
    assert 1 <= len(found) <= 2, [r.getMessage() for r in found]
    for record in found:
        message = record.getMessage()
        assert repr(client_id) in message and "actor_id" in message, message
