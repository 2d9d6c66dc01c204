"""The async shell of the requests to the bridge: resync, hold, release (`bridge.requests`).

One `RequestHandler` per microgrid. The publisher subscribes to the three
request topics on every connection and hands their messages here; each is
answered, not retained, on the matching `response/` topic:

* a **resync** asks the upstream to list the Dispatch API again (at once, not
  after its backoff), waits for that listing to be applied (or to fail), then
  has the publisher send every retained topic it holds again and answers once
  the broker acknowledged all of it. A failed listing is answered with its
  reason as soon as it fails (the tree is republished from what is held all
  the same);
* a **hold** or **release** changes the `HoldBook`, publishes new running
  snapshots of the types concerned, saves the holds to `holds.json` in the
  microgrid's state directory and answers at once. A hold file that cannot be
  written is said in the answer (the hold is in force until the bridge stops).

A request with the retain flag (a replay of a retained request, e.g. after a
reconnect) is ignored with a log line; a request that cannot be read is
answered with an error and a null transaction when none could be read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from actor_sdk import mqtt, wire
from actor_sdk.wall_clock import utc_now
from bridge.requests import (
    HoldBook,
    Parsed,
    answer,
    decode_hold_file,
    encode_hold_file,
    parse_request,
)
from bridge.service import MicrogridService
from bridge.store import atomic_write, describe_error

__all__ = ["HOLD_FILE", "RequestHandler", "load_holds"]

_logger = logging.getLogger("bridge.requests")

HOLD_FILE = "holds.json"

LISTING_TIMEOUT = 30.0
"""The longest a resync waits for the API's listing before it answers with an error."""

ACK_TIMEOUT = 120.0
"""The longest a resync waits for the broker to acknowledge the republish."""


class _Publisher(Protocol):
    listeners: dict[str, Callable[[mqtt.Message], None]]

    def event(self, topic: str, payload: bytes) -> None: ...

    def republish(self) -> None: ...

    async def flushed(self) -> None: ...


class _Upstream(Protocol):
    def resync(self) -> None: ...


def load_holds(directory: Path, microgrid_id: int, now: datetime) -> HoldBook:
    """Read the holds kept in a microgrid's state directory.

    A hold file that exists but cannot be read holds every type (a site's stop
    must not be lost to a damaged file) until an operator releases them.

    Args:
        directory: The microgrid's state directory.
        microgrid_id: The microgrid.
        now: The current instant (the `since` of a hold made for a damaged file).

    Returns:
        The holds.
    """
    path = directory / HOLD_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return HoldBook()
    except OSError as error:
        problem = describe_error(error)
    else:
        try:
            book = HoldBook(decode_hold_file(microgrid_id, data))
        except ValueError as error:
            problem = str(error)
        else:
            if book:
                _logger.warning(
                    "microgrid %d: holds kept in %s: %s",
                    microgrid_id,
                    path,
                    _describe_holds(book.snapshot()),
                )
            return book
    reason = f"the hold file {path} cannot be read ({problem}): every type held until released"
    _logger.error("microgrid %d: %s; `dispatch-bridge release --all` ends it", microgrid_id, reason)
    book = HoldBook()
    book.hold(None, reason, now)
    return book


def _describe_holds(holds: wire.Holds) -> str:
    parts = [] if holds.all_types is None else [f"every type ({holds.all_types.reason})"]
    parts += [f"{name!r} ({hold.reason})" for name, hold in holds.types.items()]
    return ", ".join(parts) or "none"


class RequestHandler:
    """Answers the requests to the bridge of one microgrid."""

    listing_timeout = LISTING_TIMEOUT
    ack_timeout = ACK_TIMEOUT

    on_hold: Callable[[str, str | None, str, datetime], None] | None = None
    """Told `(held | released, type or None for every type, reason, now)` (the journal)."""

    def __init__(
        self,
        layout: wire.TopicLayout,
        directory: Path,
        service: MicrogridService,
        publisher: _Publisher,
        upstream: _Upstream,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Create the handler: load the holds, subscribe to the requests (via the publisher).

        Created before the service starts, so that its first snapshots honour the holds.

        Args:
            layout: The microgrid's topics.
            directory: Its state directory (for the hold file).
            service: Its schedule loop (the core's `holds` are this handler's).
            publisher: Its broker side.
            upstream: Its Dispatch API side.
            clock: Returns now.
        """
        self.microgrid_id = microgrid_id = service.core.microgrid_id
        self._layout = layout
        self._path = directory / HOLD_FILE
        self._service = service
        self._publisher = publisher
        self._upstream = upstream
        self._clock = clock
        self._listing: asyncio.Future[str | None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._saving = asyncio.Lock()
        service.core.holds = load_holds(directory, microgrid_id, clock())
        service.on_listing = self._listed
        for action in wire.REQUEST_ACTIONS:
            publisher.listeners[layout.request(action)] = self._on_message

    @property
    def holds(self) -> HoldBook:
        """The holds in force."""
        return self._service.core.holds

    def _on_message(self, message: mqtt.Message) -> None:
        topic = message.topic.value
        action = topic.rsplit("/", 1)[-1]
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        if message.retain:
            _logger.warning(
                "microgrid %d: ignoring a retained %s request on %s (requests are acted on "
                "once, when published; clear it with `mosquitto_pub -r -n -t %s`)",
                self.microgrid_id,
                action,
                topic,
                topic,
            )
            return
        try:
            self.handle(action, bytes(payload))
        except Exception:  # a bug here must not take the broker connection down
            _logger.exception(
                "microgrid %d: handling a %s request failed; not answered",
                self.microgrid_id,
                action,
            )

    def handle(self, action: str, payload: bytes) -> None:
        """Carry out one request; it is answered from a task (once saved, or resynced).

        Args:
            action: `resync`, `hold` or `release`.
            payload: The request's payload.
        """
        parsed = parse_request(action, payload)
        if not isinstance(parsed, Parsed):
            error, transaction = parsed
            _logger.error(
                "microgrid %d: cannot read a %s request (%s): answered with an error",
                self.microgrid_id,
                action,
                error,
            )
            self._answer(action, transaction, error)
            return
        _logger.info(
            "microgrid %d: %s request (transaction %r%s)",
            self.microgrid_id,
            action,
            parsed.transaction,
            "" if parsed.dispatch_type is None else f", type {parsed.dispatch_type!r}",
        )
        if action == "resync":
            self._spawn(self._resync(parsed))
        else:
            # In force at once, in the order the requests came; saved and answered after.
            refused = self._change_hold(parsed)
            self._spawn(self._save_and_answer(parsed, refused, HoldBook(self.holds.snapshot())))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer(self, action: str, transaction: Any, error: str | None, **facts: Any) -> None:
        payload = answer(
            action, transaction, error, microgrid_id=self.microgrid_id, now=self._clock(), **facts
        )
        self._publisher.event(self._layout.response(action), payload)

    # ---- resync -------------------------------------------------------------------

    def _listed(self, error: str | None) -> None:
        if self._listing is not None and not self._listing.done():
            self._listing.set_result(error)
        self._listing = None

    async def _resync(self, request: Parsed) -> None:
        # Requests that arrive while a listing is awaited share its outcome.
        if self._listing is None:
            self._listing = asyncio.get_running_loop().create_future()
        listing = self._listing
        self._upstream.resync()
        try:
            error = await asyncio.wait_for(asyncio.shield(listing), self.listing_timeout)
        except TimeoutError:
            error = f"no listing from the Dispatch API within {self.listing_timeout:g} s"
        if error is not None:
            error = f"Dispatch API: {error}; republished the dispatches held instead"
        self._publisher.republish()
        try:
            await asyncio.wait_for(self._publisher.flushed(), self.ack_timeout)
        except TimeoutError:
            late = f"the broker did not acknowledge the republish within {self.ack_timeout:g} s"
            error = error or late
        service = self._service
        if error is None:
            _logger.info(
                "microgrid %d: resync done: %d dispatches listed and republished",
                self.microgrid_id,
                len(service.core),
            )
        else:
            _logger.warning("microgrid %d: resync: %s", self.microgrid_id, error)
        self._answer(
            "resync",
            request.transaction,
            error,
            dispatches=len(service.core),
            synced_at=service.synced_at,
        )

    # ---- hold and release --------------------------------------------------------------

    def _change_hold(self, request: Parsed) -> str | None:
        book = self.holds
        name = request.dispatch_type
        now = self._clock()
        if request.action == "hold":
            book.hold(name, request.reason, now)
            error = None
        else:
            error = book.release(name)
        if self.on_hold is not None and error is None:
            self.on_hold(
                "held" if request.action == "hold" else "released", name, request.reason, now
            )
        self._service.refresh(None if name is None else [name])
        what = "every type" if name is None else f"type {name!r}"
        _logger.warning(
            "microgrid %d: %s %s (%s); holds now: %s",
            self.microgrid_id,
            "held" if request.action == "hold" else "released",
            what,
            request.reason,
            _describe_holds(book.snapshot()),
        )
        return error

    async def _save_and_answer(self, request: Parsed, error: str | None, book: HoldBook) -> None:
        # One write at a time, each of the holds as they are then: the last write wins.
        async with self._saving:
            data = encode_hold_file(self.microgrid_id, self.holds)
            try:
                await asyncio.to_thread(atomic_write, self._path, data)
            except OSError as problem:
                saved = (
                    f"the holds could not be saved to {self._path} ({describe_error(problem)}): "
                    "in force until the bridge stops, not after a restart"
                )
                _logger.error("microgrid %d: %s", self.microgrid_id, saved)
                error = saved if error is None else f"{error}; {saved}"
        self._answer(request.action, request.transaction, error, holds=book)
