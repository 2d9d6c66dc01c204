"""What the local Dispatch API accepts: request checks and the update mask.

Pure functions over the protobuf messages: no I/O, no clock (the caller passes
`now`). A rejected request raises `InvalidRequest`, which the servicer turns
into `INVALID_ARGUMENT` with the message as the status details.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from google.protobuf.json_format import MessageToDict

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_PAYLOAD_DEPTH",
    "PAST_START_TOLERANCE",
    "UPDATABLE_PATHS",
    "InvalidRequest",
    "apply_update",
    "payload_depth",
    "validate_data",
]

MAX_PAYLOAD_BYTES = 50 * 1024
"""The API's limit on a payload, measured as its compact JSON in UTF-8."""

MAX_PAYLOAD_DEPTH = 5
"""The API's limit on payload nesting: `{"a": {"b": 1}}` has depth 2."""

MAX_TYPE_CHARS = 256
"""Longest dispatch type accepted."""

MAX_INTERVAL = 10_000
"""Largest recurrence interval accepted (the API says "typically 1 to 10,000")."""

MAX_COUNT = 4096
"""Largest recurrence count accepted (the API says 1 to 4096)."""

PAST_START_TOLERANCE = timedelta(seconds=10)
"""How far in the past a start time may be without `allow_past_start`.

The client rounds start times to the nearest second and the request takes
time to arrive, so "now" as the client saw it is slightly past here.
"""

_RECURRENCE_LISTS = ("byminutes", "byhours", "byweekdays", "bymonthdays", "bymonths")

UPDATABLE_PATHS = frozenset(
    {"start_time", "duration", "target", "is_active", "payload", "recurrence"}
    | {f"recurrence.{name}" for name in ("freq", "interval", "end_criteria", *_RECURRENCE_LISTS)}
)
"""The field-mask paths an update may name."""


class InvalidRequest(ValueError):
    """The request is invalid; the message says what to change."""


def payload_depth(value: object) -> int:
    """Return how deeply a JSON value nests objects and arrays.

    Args:
        value: A JSON value as Python objects.

    Returns:
        0 for a scalar, 1 for a flat object or array, and so on.
    """
    if isinstance(value, dict):
        return 1 + max((payload_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((payload_depth(v) for v in value), default=0)
    return 0


def _check_payload(data: pb.DispatchData) -> None:
    payload = MessageToDict(data.payload)
    size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidRequest(
            f"payload is {size} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES} bytes (50 KB)"
        )
    depth = payload_depth(payload)
    if depth > MAX_PAYLOAD_DEPTH:
        raise InvalidRequest(
            f"payload nests {depth} levels deep; the limit is {MAX_PAYLOAD_DEPTH} levels"
        )


def _check_target(data: pb.DispatchData) -> None:
    kind = data.target.WhichOneof("components") if data.HasField("target") else None
    if kind is None:
        raise InvalidRequest("target is required: component ids or component categories")
    if kind == "component_ids":
        if any(i < 0 for i in data.target.component_ids.ids):
            raise InvalidRequest("target component ids must not be negative")
    elif kind == "component_categories_types":
        if any(c.category == 0 for c in data.target.component_categories_types.categories):
            raise InvalidRequest("target component category must not be UNSPECIFIED")
    elif any(c == 0 for c in data.target.component_categories.categories):
        raise InvalidRequest("target component category must not be UNSPECIFIED")


def _check_range(name: str, values: Sequence[int], allowed: range, extra: str = "") -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise InvalidRequest(
            f"recurrence {name} {bad} out of range: allowed {allowed.start} to "
            f"{allowed.stop - 1}{extra}"
        )


def _check_recurrence(data: pb.DispatchData) -> None:
    if not data.HasField("recurrence"):
        return
    rule = data.recurrence
    others_set = (
        rule.interval != 0
        or rule.HasField("end_criteria")
        or any(len(getattr(rule, name)) for name in _RECURRENCE_LISTS)
    )
    if rule.freq == pb.RecurrenceRule.FREQUENCY_UNSPECIFIED:
        if others_set:
            raise InvalidRequest(
                "recurrence frequency is UNSPECIFIED but other recurrence fields are set: "
                "give a frequency, or clear the recurrence"
            )
        return
    if rule.freq not in pb.RecurrenceRule.Frequency.values():
        raise InvalidRequest(f"recurrence frequency {rule.freq} is unknown")
    if not 1 <= rule.interval <= MAX_INTERVAL:
        raise InvalidRequest(
            f"recurrence interval {rule.interval} is invalid with a frequency: "
            f"allowed 1 to {MAX_INTERVAL}"
        )
    if rule.HasField("end_criteria"):
        which = rule.end_criteria.WhichOneof("count_or_until")
        if which == "count" and not 1 <= rule.end_criteria.count <= MAX_COUNT:
            raise InvalidRequest(
                f"recurrence end count {rule.end_criteria.count} out of range: "
                f"allowed 1 to {MAX_COUNT}"
            )
        if which is None:
            raise InvalidRequest("recurrence end criteria needs a count or an until time")
    _check_range("byminutes", rule.byminutes, range(60))
    _check_range("byhours", rule.byhours, range(24))
    _check_range("byweekdays", rule.byweekdays, range(1, 8), " (MONDAY to SUNDAY)")
    _check_range("bymonths", rule.bymonths, range(1, 13))
    bad_days = [d for d in rule.bymonthdays if d == 0 or not -31 <= d <= 31]
    if bad_days:
        raise InvalidRequest(
            f"recurrence bymonthdays {bad_days} out of range: allowed 1 to 31 or -31 to -1"
        )
    if rule.bymonthdays and rule.freq == pb.RecurrenceRule.FREQUENCY_WEEKLY:
        raise InvalidRequest("recurrence bymonthdays must not be given with frequency WEEKLY")


def validate_data(
    data: pb.DispatchData,
    *,
    now: datetime,
    check_start: bool,
    allow_past_start: bool,
) -> None:
    """Check a dispatch as it would be stored.

    Args:
        data: The dispatch data after create or update.
        now: The server clock.
        check_start: Whether the start time was given in this request (and so
            must not lie in the past).
        allow_past_start: Accept start times in the past anyway.

    Raises:
        InvalidRequest: What is wrong.
    """
    if not data.type.strip():
        raise InvalidRequest("type must not be empty")
    if len(data.type) > MAX_TYPE_CHARS:
        raise InvalidRequest(f"type is {len(data.type)} characters; the limit is {MAX_TYPE_CHARS}")
    if not data.HasField("start_time"):
        raise InvalidRequest("start_time is required (or start_immediately)")
    if check_start and not allow_past_start:
        start = data.start_time.ToDatetime(tzinfo=now.tzinfo)
        if start < now - PAST_START_TOLERANCE:
            raise InvalidRequest(
                f"start_time {start.isoformat()} is in the past; give a time from now on "
                "(a server started with --allow-past-start accepts it)"
            )
    _check_target(data)
    _check_payload(data)
    _check_recurrence(data)


def apply_update(
    data: pb.DispatchData,
    update: pb.UpdateMicrogridDispatchRequest.DispatchUpdate,
    paths: Sequence[str],
) -> pb.DispatchData:
    """Apply the fields named by an update mask to a copy of a dispatch.

    A named field that the update leaves unset clears the stored field: `duration`
    becomes endless, `recurrence.end_criteria` open-ended, a `by...` list empty.
    `recurrence` alone replaces the whole rule.

    Args:
        data: The stored dispatch data.
        update: The update's values.
        paths: The update mask's paths.

    Returns:
        The updated copy.

    Raises:
        InvalidRequest: The mask is empty or names an unknown or read-only path.
    """
    if not paths:
        raise InvalidRequest("update_mask is empty: name the fields to update")
    for path in paths:
        if path in ("type", "is_dry_run", "dry_run"):
            raise InvalidRequest(f"update_mask path {path!r} cannot be updated")
        if path not in UPDATABLE_PATHS:
            raise InvalidRequest(
                f"update_mask path {path!r} is unknown; known paths: "
                + ", ".join(sorted(UPDATABLE_PATHS))
            )
    result = pb.DispatchData()
    result.CopyFrom(data)
    for path in paths:
        _apply_path(result, update, path)
    return result


def _apply_path(
    result: pb.DispatchData,
    update: pb.UpdateMicrogridDispatchRequest.DispatchUpdate,
    path: str,
) -> None:
    match path:
        case "start_time" | "target" | "payload":
            if update.HasField(path):
                getattr(result, path).CopyFrom(getattr(update, path))
            else:
                result.ClearField(path)
        case "duration":
            if update.HasField("duration"):
                result.duration = update.duration
            else:
                result.ClearField("duration")
        case "is_active":
            result.is_active = update.is_active
        case "recurrence":
            result.ClearField("recurrence")
            if update.HasField("recurrence"):
                source = update.recurrence
                rule = result.recurrence
                rule.freq = source.freq
                rule.interval = source.interval
                if source.HasField("end_criteria"):
                    rule.end_criteria.CopyFrom(source.end_criteria)
                for name in _RECURRENCE_LISTS:
                    getattr(rule, name).extend(getattr(source, name))
        case _:
            _apply_recurrence_path(result.recurrence, update, path.removeprefix("recurrence."))


def _apply_recurrence_path(
    rule: pb.RecurrenceRule,
    update: pb.UpdateMicrogridDispatchRequest.DispatchUpdate,
    name: str,
) -> None:
    source = update.recurrence
    if name in ("freq", "interval"):
        setattr(rule, name, getattr(source, name))
    elif name == "end_criteria":
        if source.HasField("end_criteria"):
            rule.end_criteria.CopyFrom(source.end_criteria)
        else:
            rule.ClearField("end_criteria")
    else:
        getattr(rule, name)[:] = getattr(source, name)
