"""The interactive `dispatch-bridge watch`: a Textual app around `bridge.watch_view`.

The shell only connects, folds messages into a `WatchState` and puts what the
pure view functions answer on the screen; it decides nothing itself. One
broker connection at a time, a fresh state on each (the broker resends every
retained topic), the last known state kept on screen while reconnecting.

Keys: `/` types a filter (a type, or a dispatch id), `t` cycles through the
types, `Esc` clears the filter, arrows or a click select a dispatch (its details
show on the right), `q` or Ctrl-C quits.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import aiomqtt
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from actor_sdk import wire
from actor_sdk.mqtt import Backoff
from bridge.watch import WatchSettings, broker_client, connect_failure, is_auth_failure
from bridge.watch_state import Liveness, WatchState
from bridge.watch_view import (
    actor_rows,
    bridge_line,
    detail_lines,
    dispatch_rows,
    event_lines,
    running_rows,
    timeline_lines,
    type_cycle,
)

__all__ = ["WatchApp"]

_REFRESH_S = 0.2
"""How often news is put on screen, at most."""

_CLOCK_S = 1.0
"""How often the times left and the liveness verdict are redrawn without news."""

_LIST_REFRESH = timedelta(seconds=30)
"""The dispatch list is rebuilt at least this often (next starts pass)."""

_LEVEL_STYLES = {
    Liveness.LIVE: "bold green",
    Liveness.UNCONFIRMED: "bold yellow",
    Liveness.STALE: "bold red",
    Liveness.SYNCING: "bold yellow",
    Liveness.OFFLINE: "bold red",
    Liveness.UNKNOWN: "bold red",
}


class WatchApp(App[None]):
    """The live, interactive view of one microgrid's topics."""

    TITLE = "dispatch-bridge watch"
    CSS = """
    #top, #bridge { height: 1; padding: 0 1; }
    #filter { height: 3; }
    #middle { height: 1fr; }
    #left { width: 2fr; }
    #detail-box { width: 1fr; min-width: 36; max-width: 64; border: round $secondary; }
    .title { height: 1; padding: 0 1; text-style: bold; }
    #running { height: auto; max-height: 10; }
    #dispatches { height: 1fr; }
    #timeline-box { height: auto; max-height: 16; padding: 0 1; border-top: solid $secondary; }
    #timeline { height: auto; }
    #bottom { height: 9; border-top: solid $secondary; }
    #actors-box { width: 3fr; }
    #events { width: 2fr; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_filter", "filter"),
        Binding("t", "next_type", "next type"),
        Binding("escape", "clear_filter", "clear filter"),
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
    ]

    def __init__(self, settings: WatchSettings) -> None:
        """Create the app.

        Args:
            settings: The broker, the topics, the microgrid and the timeline's horizon.
        """
        super().__init__()
        self._settings = settings
        self._microgrid_id = settings.microgrid_id
        self.state = WatchState(settings.layout, settings.microgrid_id)
        self.connection = f"connecting to {settings.target.describe()}"
        self.failure: str | None = None
        """Why the view ended on its own (refused credentials); the caller prints it."""
        self._dirty = True
        self._filter = ""
        self._selected: tuple[str, int] | None = None
        self._row_keys: dict[str, tuple[str, int]] = {}
        self._connections = 0
        self._listed: tuple[int, int, str] | None = None
        self._listed_at = datetime.min.replace(tzinfo=UTC)

    def compose(self) -> ComposeResult:
        """Lay the view out."""
        yield Static(id="top")
        yield Static(id="bridge")
        yield Input(
            placeholder="filter: a type or #id  (/ to type, t: next type, Esc: clear)", id="filter"
        )
        with Horizontal(id="middle"):
            with Vertical(id="left"):
                yield Static("Running now", classes="title")
                yield DataTable(id="running", cursor_type="none", zebra_stripes=True)
                yield Static("Dispatches", id="dispatches-title", classes="title")
                yield DataTable(id="dispatches", cursor_type="row")
            with VerticalScroll(id="detail-box"):
                yield Static(id="detail")
        with VerticalScroll(id="timeline-box"):
            yield Static(id="timeline")
        with Horizontal(id="bottom"):
            with Vertical(id="actors-box"):
                yield Static(id="actors-title", classes="title")
                yield DataTable(id="actors", cursor_type="none")
            yield Static(id="events")
        yield Footer()

    def on_mount(self) -> None:
        """Set the tables up, start listening and redrawing."""
        self.query_one("#running", DataTable).add_columns(
            "type", "id", "until, time left", "actors running it", "target"
        )
        self.query_one("#dispatches", DataTable).add_columns("type", "id", "when", "rule")
        self.query_one("#actors", DataTable).add_columns(
            "actor", "state", "runs", "host", "since", "error"
        )
        self.query_one("#dispatches", DataTable).focus()
        self.run_worker(self._listen(), name="mqtt", exclusive=True)
        self.set_interval(_REFRESH_S, self._refresh_if_dirty)
        self.set_interval(_CLOCK_S, self._tick)

    # --- Broker ------------------------------------------------------------------

    async def _listen(self) -> None:
        settings = self._settings
        backoff = Backoff(initial=1.0, cap=30.0)
        while True:
            identifier = f"dispatch-bridge-watch-{uuid.uuid4().hex[:12]}"
            try:
                async with broker_client(settings.target, identifier) as client:
                    await client.subscribe(settings.layout.everything, qos=1)
                    await client.subscribe(wire.actor_status_filter(self._microgrid_id), qos=1)
                    # The broker resends every retained topic: start from scratch,
                    # keeping the warnings and events seen so far.
                    self.state = WatchState(
                        settings.layout,
                        self._microgrid_id,
                        warnings=self.state.warnings,
                        events=self.state.events,
                    )
                    self._connections += 1
                    self.connection = f"connected to {settings.target.describe()}"
                    backoff.reset()
                    self._dirty = True
                    async for message in client.messages:
                        payload = message.payload
                        raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                        self.state.apply(
                            message.topic.value, raw, datetime.now(UTC), retained=message.retain
                        )
                        self._dirty = True
            except aiomqtt.MqttError as error:
                if is_auth_failure(error):
                    # Printed by the caller once the terminal is back: a message handed to
                    # Textual's exit() could land on the alternate screen and vanish.
                    self.failure = (
                        f"dispatch-bridge watch: {connect_failure(error, settings.target)}"
                    )
                    self.exit(return_code=1)
                    return
                delay = backoff.next()
                self.connection = (
                    f"DISCONNECTED, retrying in {delay:.0f} s, last known state shown "
                    f"({settings.target.describe()}: {error})"
                )
                self._dirty = True
                await asyncio.sleep(delay)

    # --- Keys and selection --------------------------------------------------------

    def _focus(self, selector: str) -> None:
        # At once, not on the next turn of the message loop as `Widget.focus` does,
        # so that keys typed right after `/` already go to the filter.
        self.screen.set_focus(self.query_one(selector))

    def action_focus_filter(self) -> None:
        """Put the cursor in the filter."""
        self._focus("#filter")

    def action_clear_filter(self) -> None:
        """Show every type again, and go back to the dispatch list."""
        self.query_one("#filter", Input).value = ""
        self._focus("#dispatches")

    def action_next_type(self) -> None:
        """Filter on the next known type (after the last one: everything)."""
        self.query_one("#filter", Input).value = type_cycle(self.state.types(), self._filter)

    def on_input_changed(self, event: Input.Changed) -> None:
        """Apply the filter as it is typed."""
        self._filter = event.value
        self._dirty = True

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in the filter: go to the dispatch list."""
        self._focus("#dispatches")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Show the dispatch under the cursor in full."""
        if event.data_table.id == "dispatches" and event.row_key.value is not None:
            self._selected = self._row_keys.get(event.row_key.value)
            self._draw_detail(datetime.now(UTC))

    # --- Drawing -----------------------------------------------------------------------

    def _tick(self) -> None:
        self._dirty = True

    def _refresh_if_dirty(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        now = datetime.now(UTC)
        state = self.state
        self.query_one("#top", Static).update(
            Text(f"{state.layout.root}  {now:%Y-%m-%d %H:%M:%SZ}  {self.connection}")
        )
        verdict, line, details = bridge_line(state, now)
        bridge = Text("bridge ")
        bridge.append(line, style=_LEVEL_STYLES[verdict])
        bridge.append(f"  {details}")
        self.query_one("#bridge", Static).update(bridge)
        self._draw_running(now)
        self._draw_dispatches(now)
        self._draw_detail(now)
        width = max(self.query_one("#timeline", Static).content_size.width, 40)
        self.query_one("#timeline", Static).update(
            Text("\n".join(timeline_lines(state, now, width, self._settings.horizon, self._filter)))
        )
        self._draw_actors(now)
        self.query_one("#events", Static).update(
            Text("\n".join(event_lines(state, now, self._filter)[-7:]))
        )

    def _draw_running(self, now: datetime) -> None:
        table = self.query_one("#running", DataTable)
        table.clear()
        for row in running_rows(self.state, now, self._filter):
            who = Text(f"! {row.flag}", style="bold red") if row.flag else Text(row.actors)
            table.add_row(
                Text(row.dispatch_type), f"#{row.dispatch_id}", row.left, who, Text(row.target)
            )

    def _draw_dispatches(self, now: datetime) -> None:
        listed = (self._connections, self.state.revision, self._filter)
        if listed == self._listed and now - self._listed_at < _LIST_REFRESH:
            return
        self._listed, self._listed_at = listed, now
        table = self.query_one("#dispatches", DataTable)
        rows, total = dispatch_rows(self.state, now, self._filter)
        shown = "" if len(rows) == total else f", {len(rows)} listed: narrow with the filter"
        self.query_one("#dispatches-title", Static).update(f"Dispatches: {total}{shown}")
        table.clear()
        self._row_keys = {}
        for row in rows:
            key = f"{row.dispatch_id}/{row.dispatch_type}"
            self._row_keys[key] = (row.dispatch_type, row.dispatch_id)
            table.add_row(Text(row.type_label), f"#{row.dispatch_id}", row.when, row.rule, key=key)
        # Keep the selected dispatch if it is still listed, else select the first one.
        selected = self._selected
        wanted = None if selected is None else f"{selected[1]}/{selected[0]}"
        if wanted in self._row_keys:
            table.move_cursor(row=table.get_row_index(wanted))
        else:
            self._selected = self._row_keys[next(iter(self._row_keys))] if rows else None

    def _draw_detail(self, now: datetime) -> None:
        detail = self.query_one("#detail", Static)
        if self._selected is None:
            detail.update("no dispatch listed" if self._filter else "no dispatch published")
            return
        detail.update(Text("\n".join(detail_lines(self.state, *self._selected, now))))

    def _draw_actors(self, now: datetime) -> None:
        table = self.query_one("#actors", DataTable)
        table.clear()
        rows = actor_rows(self.state, now, self._filter)
        self.query_one("#actors-title", Static).update(
            f"Actors: {len(rows)}"
            if rows
            else f"Actors: none reports its status ({wire.actor_status_filter(self._microgrid_id)})"
        )
        for row in rows:
            style = "bold red" if row.state in ("failed", "offline") else ""
            table.add_row(
                Text(row.actor_id),
                Text(row.state, style=style),
                Text(row.runs),
                Text(row.host),
                row.since,
                Text(row.error),
            )
