"""What the wire contract's parts share: limits, the topic root, `WireError`, the base."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""The largest payload a decoder accepts; larger ones are refused unread."""

DEFAULT_TOPIC_ROOT = "microgrid/{microgrid_id}/dispatch"
"""The topic root of one microgrid; `{microgrid_id}` is replaced by its id."""


class WireError(ValueError):
    """A topic or payload that does not follow this contract.

    The only error the decoders and topic parsers raise: the message says what
    was wrong, never more than a short excerpt of the offending input.
    """


UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]
"""A timezone-aware instant; encoded as RFC 3339 with `Z` once in UTC."""


class _Wire(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Settings shared by every payload struct."""
