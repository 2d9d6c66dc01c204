"""Whether the broker takes what the bridge publishes, and whether another bridge publishes too.

Three checks feed the `StatusBoard` of one microgrid, on every connection:

* **Refused publishes, MQTT v5**: a PUBACK with a reason code of 0x80 or more
  (0x87 "not authorized": the ACL denies the topic) is logged as an error and
  counted in the status's `refused` (`actor_sdk.mqtt.on_refused_publish`
  calls `refused`).
* **Refused publishes, MQTT 3.1.1**: the broker acknowledges a denied publish
  and drops it. The bridge stays subscribed to its own status topic; when its
  own status (this session) has not come back within two status intervals of
  the last one it sent, that counts as a refusal.
* **Another bridge**: a live (not retained) status on this microgrid's topic
  from another bridge name or another session, not `offline`, while this
  connection is up: two bridges publish for one microgrid. Logged as an error
  and reported in the status for a minute after the last such message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from actor_sdk import mqtt, wire
from bridge.status import StatusBoard

__all__ = ["StatusWatch"]

_logger = logging.getLogger("bridge.publisher")

_LOGGED_REFUSALS = 10
"""Refused publishes logged one by one per session; later ones are only counted."""

_PEER_MEMORY = timedelta(seconds=60)
"""How long another bridge's status stays reported after it was last seen."""


class StatusWatch:
    """The refusal and peer checks of one microgrid's broker connection."""

    def __init__(
        self, board: StatusBoard, microgrid_id: int, clock: Callable[[], datetime]
    ) -> None:
        """Create the watch.

        Args:
            board: Where problems and counts go.
            microgrid_id: The microgrid (for the log).
            clock: Returns now.
        """
        self._board = board
        self._microgrid_id = microgrid_id
        self._clock = clock
        self._session = 0
        self._read_back = False
        self._sent_at: datetime | None = None
        self._echoed = True
        self._logged = 0
        self._peers: set[tuple[str, int]] = set()

    def new_session(self, session: int, *, read_back: bool) -> None:
        """Start watching a new connection.

        Args:
            session: The connection's session number.
            read_back: Check that the own status comes back (MQTT 3.1.1).
        """
        self._session = session
        self._read_back = read_back
        self._sent_at = None
        self._echoed = True
        self._logged = 0
        self._board.refused = 0
        self._board.resolve("refused")

    def refused(self, topic: str, why: str) -> None:
        """Count and report a publish the broker refused.

        Args:
            topic: The topic.
            why: The broker's reason.
        """
        board = self._board
        board.refused += 1
        text = (
            f"the MQTT broker refused {board.refused} publish(es) in this session, the latest to "
            f"{topic} ({why}): check the broker's ACL grants this bridge's user write access to "
            f"microgrid/{self._microgrid_id}/dispatch/#"
        )
        board.report("refused", text)
        if self._logged < _LOGGED_REFUSALS:
            self._logged += 1
            last = self._logged == _LOGGED_REFUSALS
            more = " (further refusals are only counted)" if last else ""
            _logger.error("microgrid %d: %s%s", self._microgrid_id, text, more)

    def status_sent(self, now: datetime) -> None:
        """Note that the own status was sent (the read-back clock starts).

        Args:
            now: When.
        """
        if self._echoed or self._sent_at is None:
            self._sent_at = now
            self._echoed = False

    def check_read_back(self, now: datetime) -> None:
        """On MQTT 3.1.1, count a refusal when the own status did not come back in time.

        Args:
            now: The current instant.
        """
        if not self._read_back or self._echoed or self._sent_at is None:
            return
        if now - self._sent_at > timedelta(seconds=2 * max(1, self._board.status_interval)):
            self.refused(
                f"microgrid/{self._microgrid_id}/dispatch/status",
                "the bridge's own status did not come back from the broker (MQTT 3.1.1 has no "
                "refusal code)",
            )
            self._sent_at = now

    def feed(self, message: mqtt.Message) -> None:
        """Look at a message on the own status topic.

        Args:
            message: The message.
        """
        if not message.payload or not isinstance(message.payload, bytes | bytearray):
            return
        try:
            status = wire.decode_status(message.payload)
        except wire.WireError:
            return
        if status.bridge == self._board.bridge and status.session == self._session:
            self._echoed = True
            return
        if message.retain or status.state == "offline":
            return
        now = self._clock()
        peer = (status.bridge, status.session)
        text = (
            f"another bridge ({status.bridge!r}, session {status.session}, state {status.state}) "
            f"publishes the status of microgrid {self._microgrid_id} too: two bridges must not "
            "serve one microgrid; stop one of them"
        )
        self._board.report("peer", text, expires=now + _PEER_MEMORY)
        if peer not in self._peers:
            self._peers.add(peer)
            _logger.error("microgrid %d: %s", self._microgrid_id, text)
