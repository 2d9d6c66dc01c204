"""The wall clock the SDK and the bridge read unless given another one (tests pass their own)."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc_now"]


def utc_now() -> datetime:
    """Return now, in UTC."""
    return datetime.now(UTC)
