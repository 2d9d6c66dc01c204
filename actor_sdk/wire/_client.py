"""From the contract's `Dispatch` to `frequenz-client-dispatch`'s (the SDK's drop-in)."""

from __future__ import annotations

from datetime import timedelta
from enum import Enum

from frequenz.client.common.microgrid.electrical_components import (
    ElectricalComponentCategory,
)
from frequenz.client.dispatch import recurrence as client_recurrence
from frequenz.client.dispatch import types as client_types

from actor_sdk.wire._base import WireError
from actor_sdk.wire._codec import payload_of
from actor_sdk.wire._messages import Dispatch, Recurrence, Target

_TYPE_ENUMS: dict[str, type[Enum]] = {
    "BATTERY": client_types.BatteryType,
    "INVERTER": client_types.InverterType,
    "EV_CHARGER": client_types.EvChargerType,
}


def _target_to_client(target: Target) -> client_types.TargetComponents:
    if target.categories is None:
        return client_types.TargetIds(*(target.ids or ()))
    items: list[client_types.TargetCategoryInputType] = []
    for item in target.categories:
        if item.type is None:
            items.append(ElectricalComponentCategory[item.category])
        else:
            items.append(_TYPE_ENUMS[item.category][item.type])  # type: ignore[arg-type]
    return client_types.TargetCategories(*items)


def _recurrence_to_client(rule: Recurrence | None) -> client_recurrence.RecurrenceRule:
    if rule is None:
        return client_recurrence.RecurrenceRule()
    end = None
    if rule.end is not None:
        end = client_recurrence.EndCriteria(count=rule.end.count, until=rule.end.until)
    return client_recurrence.RecurrenceRule(
        frequency=client_recurrence.Frequency[rule.frequency],
        interval=rule.interval,
        end_criteria=end,
        byminutes=list(rule.byminutes),
        byhours=list(rule.byhours),
        byweekdays=[client_recurrence.Weekday[day] for day in rule.byweekdays],
        bymonthdays=list(rule.bymonthdays),
        bymonths=list(rule.bymonths),
    )


def to_client(dispatch: Dispatch) -> client_types.Dispatch:
    """Convert the wire struct into a `frequenz-client-dispatch` dispatch.

    The computed state (`running`, `until`, `next_run`) has no place there and
    is dropped.

    Args:
        dispatch: The wire struct.

    Returns:
        The dispatch as the client library models it.

    Raises:
        WireError: A category or component type the client library does not know
            (a well-formed payload can still name one, e.g. from a newer bridge).
    """
    try:
        target = _target_to_client(dispatch.target)
    except KeyError as error:
        raise WireError(
            f"dispatch {dispatch.id}: unknown target category or type {error}"
        ) from None
    try:
        dispatch_id = client_types.DispatchId(dispatch.id)  # ValueError when negative
        duration = None if dispatch.duration is None else timedelta(seconds=dispatch.duration)
    except (OverflowError, ValueError) as error:
        raise WireError(f"dispatch {dispatch.id}: id or duration out of range: {error}") from None
    return client_types.Dispatch(
        id=dispatch_id,
        type=dispatch.type,
        start_time=dispatch.start_time,
        duration=duration,
        target=target,
        active=dispatch.active,
        dry_run=dispatch.dry_run,
        payload=payload_of(dispatch),
        recurrence=_recurrence_to_client(dispatch.recurrence),
        create_time=dispatch.create_time,
        update_time=dispatch.update_time,
        end_time=dispatch.end_time,
    )
