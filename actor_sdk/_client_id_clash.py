"""Telling a shared MQTT client id from a flaky network (pure: the link passes the times).

When two processes connect with one client id, the broker drops the older
connection each time the other one connects: each side's connections end a few
hundred milliseconds after they were made (or, when the broker closes the socket
without a word, when a call times out or the link's probe notices), again and
again. MQTT 5 brokers may say so (DISCONNECT reason 0x8E, "session taken over");
the error the client library raises does not always carry that code, so a run of
short connections counts as well. A flaky network or a restarting broker makes
short connections too, but between them some attempt to connect fails (the broker
is away or unreachable), which a shared id never causes: the broker takes every
connect. So a failed attempt breaks the run (chaos runs, whose partitions and broker
kills made three short connections in a row, had the SDK report a clash falsely).
"""

from __future__ import annotations

__all__ = ["SESSION_TAKEN_OVER", "ClientIdClash", "reason_code"]

SESSION_TAKEN_OVER = 0x8E
"""MQTT 5 DISCONNECT reason: another connection with the same client id took over."""

SHORT_CONNECTION_S = 2.0
"""A connection that ends this soon after it was made counts as short (the default)."""

SHORT_CONNECTIONS_IN_A_ROW = 3
"""How many short connections in a row make a clash likely."""


class ClientIdClash:
    """Watches how connections of one client id end; says once when the id looks shared."""

    def __init__(
        self,
        client_id: str | None,
        *,
        short_s: float = SHORT_CONNECTION_S,
        in_a_row: int = SHORT_CONNECTIONS_IN_A_ROW,
    ) -> None:
        """Create a watch.

        Args:
            client_id: The MQTT client id (None: the client library makes a random one).
            short_s: A connection that lasts less counts as short.
            in_a_row: How many short connections in a row make a clash likely.
        """
        self._client_id = client_id
        self._short_s = short_s
        self._in_a_row = in_a_row
        self._short = 0
        self._told = False

    def failed_to_connect(self) -> None:
        """Note an attempt to connect that failed: the broker was away, not shared."""
        self._short = 0

    def ended(self, lasted_s: float, reason: int | None = None) -> str | None:
        """Note that a connection ended.

        Args:
            lasted_s: How long it lasted after it was made (seconds).
            reason: The broker's DISCONNECT reason code, if known.

        Returns:
            The line to log as an error, the first time a clash is likely; else None.
        """
        self._short = self._short + 1 if lasted_s < self._short_s else 0
        taken_over = reason == SESSION_TAKEN_OVER
        if self._told or self._client_id is None:
            return None
        if not taken_over and self._short < self._in_a_row:
            return None
        self._told = True
        why = (
            "the broker says another connection took over the session"
            if taken_over
            else f"{self._short} connections in a row ended within {self._short_s:g} s"
        )
        return (
            f"another process is probably connected with the same MQTT client id "
            f"{self._client_id!r} ({why}): the broker drops one connection each time the "
            "other connects, so both keep reconnecting; give each process its own actor_id "
            "(Dispatcher(actor_id=...) or manage(actor_id=...); the default is "
            "<host>-<program>-mg<id>, the same for two processes of one program on one host)"
        )


def reason_code(error: BaseException) -> int | None:
    """Return the MQTT reason code an error (or the error it came from) carries, if any.

    Args:
        error: The error that ended a connection.

    Returns:
        The code, or None.
    """
    seen: BaseException | None = error
    while seen is not None:
        code = getattr(seen, "rc", None)
        if code is not None:
            return int(getattr(code, "value", code))
        seen = seen.__cause__ or seen.__context__
    return None
