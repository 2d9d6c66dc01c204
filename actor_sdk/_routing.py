"""Pure parts of the `Dispatcher`'s message handling: topic parsing and status wording."""

from __future__ import annotations

import logging

from actor_sdk import wire

__all__ = ["TopicParser", "bridge_status_line"]

_TOPIC_CACHE_SIZE = 1_000_000


class TopicParser:
    """Parses the topics of one microgrid, each once.

    Decoding the type level is a good part of the work per message during a
    sync of many retained dispatches.
    """

    def __init__(self, layout: wire.TopicLayout) -> None:
        """Create a parser.

        Args:
            layout: The topic layout of the microgrid.
        """
        self._layout = layout
        self._topics: dict[str, wire.TopicRef] = {}

    def parse(self, topic: str) -> wire.TopicRef:
        """Return what a topic names.

        Args:
            topic: The topic.

        Returns:
            The parsed topic.

        Raises:
            wire.WireError: The topic is not one of the layout's.
        """
        ref = self._topics.get(topic)
        if ref is None:
            ref = self._layout.parse(topic)
            if len(self._topics) >= _TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[topic] = ref
        return ref


def bridge_status_line(status: wire.BridgeStatus | None) -> tuple[int, str]:
    """Say what a new bridge status means for the actors.

    Args:
        status: The bridge status, None once it was cleared.

    Returns:
        The log level and the line.
    """
    if status is None:
        return logging.WARNING, "the retained bridge status was cleared: no live view"
    if status.state == "online":
        return logging.INFO, (
            f"bridge {status.bridge!r} is online (session {status.session}, "
            f"upstream {status.upstream})"
        )
    error = f": {status.error}" if status.error else ""
    return logging.WARNING, (
        f"bridge {status.bridge!r} is {status.state} (session {status.session}{error}): "
        "nothing new starts, running actors stop at the end of their run"
    )
