"""Actor execution status: the wire struct, the SDK's report, and the real broker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from actor_sdk import wire

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _status(**changes: object) -> wire.ActorStatus:
    fields: dict[str, object] = {
        "state": "running",
        "types": {
            "SET.POWER": wire.ActorTypeStatus(state="running", dispatches=(3, 9)),
            "IDLE": wire.ActorTypeStatus(state="idle", dispatches=()),
        },
        "since": T0,
        "as_of": T0,
        "host": "edge-1",
        "error": None,
        "version": "0.1.0",
    }
    fields.update(changes)
    return wire.ActorStatus(**fields)  # type: ignore[arg-type]


# --- wire ---------------------------------------------------------------------


def test_actor_status_round_trips_with_every_field_written() -> None:
    status = _status()
    raw = wire.encode_actor_status(status)
    assert wire.decode_actor_status(raw) == status
    assert raw == (
        b'{"state":"running","types":{"SET.POWER":{"state":"running","dispatches":[3,9]},'
        b'"IDLE":{"state":"idle","dispatches":[]}},"since":"2026-01-02T03:04:05Z",'
        b'"as_of":"2026-01-02T03:04:05Z","host":"edge-1","error":null,"version":"0.1.0"}'
    )


def test_actor_status_of_a_newer_sdk_decodes() -> None:
    raw = wire.encode_actor_status(_status())[:-1] + b',"later":{"x":1}}'
    assert wire.decode_actor_status(raw) == _status()


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # the cleared topic
        b"offline",
        b"\xff\xfe",
        b"[]",
        b"{}",
        # A bridge status on the wrong topic, or an older draft without `types`.
        b'{"state":"online","upstream":"connected","synced_at":null,"session":1,'
        b'"bridge":"b","version":"1","dispatches":0}',
        b'{"state":"running","since":"2026-01-02T03:04:05Z","host":"h","version":"1"}',
        b'{"state":"busy","types":{},"since":"2026-01-02T03:04:05Z",'
        b'"as_of":"2026-01-02T03:04:05Z","host":"h","error":null,"version":"1"}',
        b'{"state":"idle","types":{"A":{"state":"offline","dispatches":[]}},'
        b'"since":"2026-01-02T03:04:05Z","as_of":"2026-01-02T03:04:05Z","host":"h",'
        b'"error":null,"version":"1"}',
        b'{"state":"idle","types":{},"since":"2026-01-02T03:04:05","as_of":'
        b'"2026-01-02T03:04:05Z","host":"h","error":null,"version":"1"}',
    ],
)
def test_garbage_or_old_actor_status_is_a_wire_error(raw: bytes) -> None:
    with pytest.raises(wire.WireError, match="invalid actor status payload"):
        wire.decode_actor_status(raw)


@pytest.mark.parametrize("actor_id", ["edge-1", "A_b-9", "x" * 128])
def test_actor_ids_of_the_allowed_characters_make_topics(actor_id: str) -> None:
    topic = wire.actor_status_topic(7, actor_id)
    assert topic == f"microgrid/7/actors/{actor_id}"
    assert wire.actor_id_of(topic) == (7, actor_id)


@pytest.mark.parametrize("actor_id", ["", "a/b", "a+", "#", "host.lan", "é", "a b", "x" * 129])
def test_other_actor_ids_are_refused(actor_id: str) -> None:
    with pytest.raises(wire.WireError, match=r"invalid actor id"):
        wire.actor_status_topic(7, actor_id)


@pytest.mark.parametrize(
    "topic",
    [
        "microgrid/7/dispatch/status",
        "microgrid/x/actors/a",
        "microgrid/7/actors/a/b",
        "a/7/actors/b",
    ],
)
def test_other_topics_are_not_actor_status_topics(topic: str) -> None:
    with pytest.raises(wire.WireError):
        wire.actor_id_of(topic)


def test_actor_status_filters() -> None:
    assert wire.actor_status_filter(7) == "microgrid/7/actors/+"
    assert wire.actor_status_filter() == "microgrid/+/actors/+"
