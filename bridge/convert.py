"""Into the wire contract's `Dispatch`: from the client library's and from protobuf.

`from_client` takes `frequenz-client-dispatch`'s `Dispatch`, `from_protobuf` the
Dispatch API's message. Only the bridge and the local API server convert this way,
so it lives on the bridge's side; the SDK needs only the other direction
(`actor_sdk.wire.to_client`).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar, cast

import msgspec
from frequenz.api.dispatch.v1 import dispatch_pb2
from frequenz.client.common.microgrid.electrical_components import (
    ElectricalComponentCategory,
)
from frequenz.client.dispatch import recurrence as client_recurrence
from frequenz.client.dispatch import types as client_types

from actor_sdk.wire._codec import encode_payload
from actor_sdk.wire._messages import Dispatch, EndCriteria, Recurrence, Target, TargetCategory

_Part = TypeVar("_Part")

_NO_RECURRENCE = Recurrence(frequency="UNSPECIFIED", interval=0)
"""How the API's protobuf and the client say 'no recurrence'."""


def _utc(instant: datetime) -> datetime:
    return instant.astimezone(UTC)


def _target_from_client(target: client_types.TargetComponents) -> Target:
    if isinstance(target, client_types.TargetIds):
        return Target(ids=tuple(sorted(target)))
    categories = (
        TargetCategory(
            category=item.category2.name,
            type=None if item.type is None else item.type.name,
        )
        for item in target
    )
    return Target(categories=tuple(sorted(categories, key=lambda c: (c.category, c.type or ""))))


def _recurrence_from_client(rule: client_recurrence.RecurrenceRule) -> Recurrence | None:
    end = None
    if rule.end_criteria is not None:
        criteria = rule.end_criteria
        end = EndCriteria(
            count=criteria.count,
            until=None if criteria.until is None else _utc(criteria.until),
        )
    wire_rule = Recurrence(
        frequency=rule.frequency.name,  # type: ignore[arg-type]
        interval=rule.interval,
        end=end,
        byminutes=tuple(rule.byminutes),
        byhours=tuple(rule.byhours),
        byweekdays=tuple(day.name for day in rule.byweekdays),  # type: ignore[misc]
        bymonthdays=tuple(rule.bymonthdays),
        bymonths=tuple(rule.bymonths),
    )
    # The API encodes "no recurrence" as an all-default rule.
    return None if wire_rule == _NO_RECURRENCE else wire_rule


def from_client(
    dispatch: client_types.Dispatch,
    *,
    running: bool = False,
    until: datetime | None = None,
    next_run: datetime | None = None,
) -> Dispatch:
    """Convert a `frequenz-client-dispatch` dispatch into the wire struct.

    Args:
        dispatch: The dispatch as the client library gives it.
        running: Whether it runs at the instant its state is computed for.
        until: The end of the current run.
        next_run: The next start after that instant.

    Returns:
        The wire struct.
    """
    return Dispatch(
        id=int(dispatch.id),
        type=dispatch.type,
        start_time=_utc(dispatch.start_time),
        duration=None if dispatch.duration is None else round(dispatch.duration.total_seconds()),
        target=_target_from_client(dispatch.target),
        active=dispatch.active,
        dry_run=dispatch.dry_run,
        payload=dispatch.payload,
        recurrence=_recurrence_from_client(dispatch.recurrence),
        create_time=_utc(dispatch.create_time),
        update_time=_utc(dispatch.update_time),
        end_time=None if dispatch.end_time is None else _utc(dispatch.end_time),
        running=running,
        until=None if until is None else _utc(until),
        next_run=None if next_run is None else _utc(next_run),
    )


def _pb_time(seconds: int, nanos: int) -> datetime:
    # The client library's `to_datetime`, to the same float rounding.
    return datetime.fromtimestamp(seconds + int(nanos / 1000) * 1e-6, tz=UTC)


def _pb_value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError("a payload number is infinite or NaN")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _pb_struct(value.struct_value)
    if kind == "list_value":
        return [_pb_value(item) for item in value.list_value.values]
    return None


def _pb_struct(struct: Any) -> dict[str, Any]:
    fields = struct.fields
    return {key: _pb_value(fields[key]) for key in fields}


_PB_TYPES: dict[str, tuple[str, type[Enum]]] = {
    "battery": ("BATTERY", client_types.BatteryType),
    "ev_charger": ("EV_CHARGER", client_types.EvChargerType),
    "inverter": ("INVERTER", client_types.InverterType),
}

# As the client library's `ElectricalComponentCategory.from_proto`: unknown → UNSPECIFIED.
_PB_CATEGORIES: dict[int, str] = {
    member.value: member.name for member in ElectricalComponentCategory
}


def _pb_target(target: Any) -> Target:
    which = target.WhichOneof("components")
    if which == "component_ids":
        return Target(ids=tuple(sorted(set(target.component_ids.ids))))
    items: set[tuple[str, str | None]] = set()
    if which == "component_categories":
        for value in target.component_categories.categories:
            items.add((_PB_CATEGORIES.get(value, "UNSPECIFIED"), None))
    elif which == "component_categories_types":
        for item in target.component_categories_types.categories:
            kind = item.WhichOneof("type")
            if kind in _PB_TYPES:
                category, enum = _PB_TYPES[kind]
                items.add((category, enum(getattr(item, kind)).name))
            else:  # a type the client library does not know counts as none, as there
                items.add((_PB_CATEGORIES.get(item.category, "UNSPECIFIED"), None))
    else:
        raise ValueError("Invalid target components")
    ordered = sorted(items, key=lambda item: (item[0], item[1] or ""))
    return Target(categories=tuple(TargetCategory(category=c, type=t) for c, t in ordered))


def _pb_recurrence(rule: Any) -> Recurrence | None:
    end = None
    if rule.HasField("end_criteria"):
        criteria = rule.end_criteria
        which = criteria.WhichOneof("count_or_until")
        if which == "count":
            end = EndCriteria(count=criteria.count)
        elif which == "until_time":
            until = criteria.until_time
            end = EndCriteria(until=_pb_time(until.seconds, until.nanos))
        else:
            end = EndCriteria()
    wire_rule = Recurrence(
        frequency=client_recurrence.Frequency(rule.freq).name,  # type: ignore[arg-type]
        interval=rule.interval,
        end=end,
        byminutes=tuple(rule.byminutes),
        byhours=tuple(rule.byhours),
        byweekdays=tuple(
            client_recurrence.Weekday(day).name  # type: ignore[misc]
            for day in rule.byweekdays
        ),
        bymonthdays=tuple(rule.bymonthdays),
        bymonths=tuple(rule.bymonths),
    )
    return None if wire_rule == _NO_RECURRENCE else wire_rule


def from_protobuf(pb: dispatch_pb2.Dispatch) -> Dispatch:
    """Convert the Dispatch API's protobuf dispatch straight into the wire struct.

    The same result as `from_client(client_types.Dispatch.from_protobuf(pb))` with its
    payload encoded (`wire.encode_payload`, as the schedule core holds it: the dict is
    gone before the next dispatch is converted), without building the client library's
    dataclasses in between (listing 100k dispatches spent most of its time there). Enum
    values map to names through the client library's enums, so unknown values fail or
    fall back alike.

    Args:
        pb: The protobuf dispatch, as streamed by the API (a listing converts with
            one `ListingConverter` instead).

    Returns:
        The wire struct (`running` false, no `until` or `next_run`).

    Raises:
        ValueError: A dispatch the client library could not convert either
            (no target, an unknown frequency or weekday, a NaN payload number).
    """
    return ListingConverter().convert(pb)


class ListingConverter:
    """Converts the protobufs of one listing, each distinct part once (`from_protobuf`).

    A listing of 100,000 dispatches repeats types, targets, rules and instants: each
    is converted the first time it comes, keyed by its protobuf content (a target or
    a rule by its serialized bytes; an instant is converted each time but for an
    update time equal to the creation time, and shared as itself), and the same
    object is handed out after that, so equal parts are also held once (as
    `share_parts` does for the cache; durations too). On the scale bench's mix (mostly
    distinct targets and start times) 12.1 µs per dispatch against 18.1 µs for a fresh
    conversion and `share_parts`, holding as much at the end (10.6 MB at 100k). The
    payload is converted each time and held encoded (`wire.encode_payload`, as the
    schedule core holds it). Drop the converter with the listing: nothing it holds
    outlives the dispatches that hold it.
    """

    def __init__(self) -> None:
        """Create a converter that has seen nothing yet."""
        self._types: dict[str, str] = {}
        self._durations: dict[int, int] = {}
        self._times: dict[datetime, datetime] = {}
        self._targets: dict[bytes, Target] = {}
        self._rules: dict[bytes, Recurrence | None] = {}

    def convert(self, pb: dispatch_pb2.Dispatch) -> Dispatch:
        """Convert one protobuf dispatch, as `from_protobuf` does.

        Args:
            pb: The protobuf dispatch.

        Returns:
            The wire struct (`running` false, no `until` or `next_run`).

        Raises:
            ValueError: As `from_protobuf`; nothing is kept of a part that failed.
        """
        data = pb.data
        meta = pb.metadata
        dispatch_type = data.type
        create_time = self._time(meta.create_time)
        update = meta.update_time
        duration = data.duration if data.HasField("duration") else None
        converted = Dispatch(
            id=meta.dispatch_id,
            type=self._types.setdefault(dispatch_type, dispatch_type),
            start_time=self._time(data.start_time),
            duration=None if duration is None else self._durations.setdefault(duration, duration),
            target=self._target(data.target),
            active=data.is_active,
            dry_run=data.is_dry_run,
            payload=_pb_struct(data.payload),
            recurrence=self._rule(data.recurrence),
            create_time=create_time,
            update_time=create_time if update == meta.create_time else self._time(update),
            end_time=self._time(meta.end_time) if meta.HasField("end_time") else None,
            running=False,
            until=None,
            next_run=None,
        )
        return encode_payload(converted)

    def _time(self, stamp: Any) -> datetime:
        # Keyed by the instant itself: 160k (seconds, nanos) keys of the bench's 100k
        # listing took 14 MB more at its peak than the instants alone.
        instant = _pb_time(stamp.seconds, stamp.nanos)
        return self._times.setdefault(instant, instant)

    def _target(self, target: Any) -> Target:
        key = target.SerializeToString()
        converted = self._targets.get(key)
        if converted is None:
            converted = self._targets[key] = _pb_target(target)
        return converted

    def _rule(self, rule: Any) -> Recurrence | None:
        key = rule.SerializeToString()
        if key in self._rules:
            return self._rules[key]
        converted = self._rules[key] = _pb_recurrence(rule)
        return converted


def share_parts(dispatch: Dispatch, shared: dict[Any, Any]) -> Dispatch:
    """Return the dispatch with its immutable parts taken from `shared` where equal.

    A cache of 100,000 dispatches repeats types, targets, rules and instants
    (`update_time == create_time` until the first update): held once, they cost the
    schedule core about a fifth less memory per dispatch (a listing gets the same from
    `ListingConverter`). Each part not yet in `shared` is put there; the caller drops
    `shared` with the loaded cache, so nothing outlives the dispatches that hold it.

    Args:
        dispatch: A dispatch just converted or decoded.
        shared: Parts of the dispatches before it, each mapped to itself.

    Returns:
        An equal dispatch.
    """

    def one(part: _Part) -> _Part:
        return cast(_Part, shared.setdefault(part, part))

    return msgspec.structs.replace(
        encode_payload(dispatch),
        type=one(dispatch.type),
        start_time=one(dispatch.start_time),
        duration=one(dispatch.duration),
        target=one(dispatch.target),
        recurrence=one(dispatch.recurrence),
        create_time=one(dispatch.create_time),
        update_time=one(dispatch.update_time),
        end_time=one(dispatch.end_time),
    )
