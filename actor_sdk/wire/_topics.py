"""Topics: dispatch types as one level, the kinds of topic, a microgrid's tree layout."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from enum import Enum

from actor_sdk.wire._base import DEFAULT_TOPIC_ROOT, WireError
from actor_sdk.wire._requests import REQUEST_ACTIONS

_KEPT_BYTES = frozenset((string.ascii_letters + string.digits + "_-").encode())

_HEX_DIGITS = frozenset(b"0123456789ABCDEF")

_PLAIN_LEVEL = re.compile(r"[A-Za-z0-9_-]+")
"""A type of kept characters only is its own level (most are): no byte-by-byte work."""


def encode_type(dispatch_type: str) -> str:
    """Encode a dispatch type as one topic level.

    Every UTF-8 byte outside `[A-Za-z0-9_-]` becomes `%XX` (upper-case hex),
    so no `/ + # .`, space or `$` ever reaches a topic.

    >>> encode_type("SET.POWER")
    'SET%2EPOWER'

    Args:
        dispatch_type: The dispatch type.

    Returns:
        The topic level.

    Raises:
        WireError: The type is empty, or holds a lone surrogate (not UTF-8).
    """
    if _PLAIN_LEVEL.fullmatch(dispatch_type):
        return dispatch_type
    if not dispatch_type:
        raise WireError("dispatch type must not be empty")
    try:
        # Strict: a lone surrogate would encode to a level that decodes to no string.
        raw = dispatch_type.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"dispatch type {dispatch_type[:64]!r} is not valid Unicode") from None
    return "".join(chr(byte) if byte in _KEPT_BYTES else f"%{byte:02X}" for byte in raw)


def decode_type(level: str) -> str:
    """Decode a topic level made by `encode_type` back into the dispatch type.

    Only the exact output of `encode_type` is accepted, so that every type has
    one topic level and every level one type.

    >>> decode_type("SET%2EPOWER")
    'SET.POWER'

    Args:
        level: The topic level.

    Returns:
        The dispatch type.

    Raises:
        WireError: The level is not an encoded dispatch type.
    """
    if _PLAIN_LEVEL.fullmatch(level):
        return level
    raw = bytearray()
    ascii_level = level.encode("utf-8", "surrogatepass")
    index = 0
    while index < len(ascii_level):
        byte = ascii_level[index]
        if byte == ord("%"):
            digits = ascii_level[index + 1 : index + 3]
            if len(digits) != 2 or not _HEX_DIGITS.issuperset(digits):
                raise WireError(f"invalid percent escape in type level {level[:64]!r}")
            decoded = int(digits, 16)
            if decoded in _KEPT_BYTES:
                raise WireError(f"needless percent escape in type level {level[:64]!r}")
            raw.append(decoded)
            index += 3
        elif byte in _KEPT_BYTES:
            raw.append(byte)
            index += 1
        else:
            raise WireError(f"unencoded character in type level {level[:64]!r}")
    if not raw:
        raise WireError("empty type level")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"type level {level[:64]!r} is not UTF-8 once decoded") from None


class TopicKind(Enum):
    """What a topic of the contract carries."""

    RUNNING = "running"
    DISPATCH = "dispatches"
    EVENTS = "events"
    STATUS = "status"
    UPCOMING = "upcoming"
    REQUEST = "request"
    RESPONSE = "response"


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic: its kind, and the type and dispatch id it is about."""

    kind: TopicKind
    dispatch_type: str | None = None
    dispatch_id: int | None = None
    action: str | None = None
    """For a request or response topic: `resync`, `hold` or `release`."""


@dataclass(frozen=True)
class TopicLayout:
    """The topics of one microgrid under its root, e.g. `microgrid/7/dispatch`."""

    root: str

    @classmethod
    def for_microgrid(cls, microgrid_id: int, template: str = DEFAULT_TOPIC_ROOT) -> TopicLayout:
        """Build the layout of one microgrid from a root template.

        Args:
            microgrid_id: The microgrid.
            template: The root, with `{microgrid_id}` where the id goes.

        Returns:
            The layout.

        Raises:
            WireError: The resulting root is not a valid topic prefix.
        """
        root = template.format(microgrid_id=microgrid_id).rstrip("/")
        if not root or any(char in root for char in "+#\0"):
            raise WireError(f"invalid topic root {root!r}: empty, or has a wildcard or NUL")
        return cls(root)

    @property
    def status(self) -> str:
        """The bridge status topic."""
        return f"{self.root}/status"

    @property
    def everything(self) -> str:
        """A subscription filter matching every topic of this layout."""
        return f"{self.root}/#"

    def running(self, dispatch_type: str) -> str:
        """Return the running-snapshot topic of a type.

        Args:
            dispatch_type: The dispatch type.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/running"

    def dispatch(self, dispatch_type: str, dispatch_id: int) -> str:
        """Return the topic of one dispatch.

        Args:
            dispatch_type: The dispatch type.
            dispatch_id: The dispatch id.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/dispatches/{dispatch_id}"

    def dispatches(self, dispatch_type: str) -> str:
        """Return the filter of every dispatch topic of a type (`.../dispatches/+`).

        Args:
            dispatch_type: The dispatch type.

        Returns:
            The topic filter.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/dispatches/+"

    def events(self, dispatch_type: str) -> str:
        """Return the lifecycle-event topic of a type.

        Args:
            dispatch_type: The dispatch type.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/events"

    def upcoming(self, dispatch_type: str) -> str:
        """Return the upcoming-runs topic of a type.

        Args:
            dispatch_type: The dispatch type.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/upcoming"

    def request(self, action: str) -> str:
        """Return the topic of a request to the bridge (see `REQUEST_ACTIONS`).

        Args:
            action: `resync`, `hold` or `release`.

        Returns:
            The topic.
        """
        return f"{self.root}/request/{action}"

    def response(self, action: str) -> str:
        """Return the topic of the bridge's answers to one kind of request.

        Args:
            action: `resync`, `hold` or `release`.

        Returns:
            The topic.
        """
        return f"{self.root}/response/{action}"

    def parse(self, topic: str) -> TopicRef:
        """Tell which topic of this layout a topic is.

        Args:
            topic: A topic under this layout's root.

        Returns:
            What the topic carries.

        Raises:
            WireError: The topic is not one of this layout.
        """
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise WireError(f"topic {topic[:128]!r} is not under {self.root!r}")
        levels = topic[len(prefix) :].split("/")
        match levels:
            case ["status"]:
                return TopicRef(TopicKind.STATUS)
            case [level, "running"]:
                return TopicRef(TopicKind.RUNNING, decode_type(level))
            case [level, "events"]:
                return TopicRef(TopicKind.EVENTS, decode_type(level))
            case [level, "upcoming"]:
                return TopicRef(TopicKind.UPCOMING, decode_type(level))
            # No action is a kind above, so a type called "request" keeps its topics.
            case ["request" | "response" as side, action] if action in REQUEST_ACTIONS:
                return TopicRef(TopicKind(side), action=action)
            case [level, "dispatches", dispatch_id] if (
                # Canonical ids only (one dispatch, one topic); at most 20 digits (uint64),
                # which also keeps int() clear of its 4300-digit limit (ValueError).
                len(dispatch_id) <= 20
                and dispatch_id.isascii()
                and dispatch_id.isdigit()
                and str(int(dispatch_id)) == dispatch_id
            ):
                return TopicRef(TopicKind.DISPATCH, decode_type(level), int(dispatch_id))
        raise WireError(f"topic {topic[:128]!r} is not part of the dispatch contract")
