"""`dispatch-bridge watch`: a terminal view of one microgrid's dispatch topics.

Built from the retained topics alone, so it runs on any host that can reach the
broker with a read-only user, and needs no access to the Dispatch API. This
module is the command line (flags, settings, the `--once` snapshot); the parts:

- `bridge.watch_state`: `WatchState` folds topics and payloads into what is
  known, and the contract's liveness rule (pure);
- `bridge.watch_text`: the `--once` text, for scripts (pure);
- `bridge.watch_view`: what the interactive view shows, as rows and lines (pure);
- `bridge.watch_app`: the interactive view, a Textual app around those
  (imported only when it runs, so `--once` and `health` start fast).

Settings (flag / environment):

| setting | flag | environment |
|---|---|---|
| broker | `--broker mqtt://user:pass@host:port` (or `mqtts://`) | `MQTT_URL` |
| credentials | in the URL | `MQTT_USERNAME`, `MQTT_PASSWORD` (or `MQTT_PASSWORD_FILE`) |
| microgrid | `--microgrid-id M` | `MICROGRID_ID` |
| topic root | `--topic-root TEMPLATE` | `DISPATCH_BRIDGE_TOPIC_ROOT` |
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt

from actor_sdk import wire
from actor_sdk.mqtt import BrokerSettings, new_client, parse_broker_url
from actor_sdk.wall_clock import utc_now
from bridge.config import ConfigError, SettingsSource
from bridge.watch_state import WatchState
from bridge.watch_text import DEFAULT_HOURS, render

__all__ = [
    "WatchSettings",
    "add_arguments",
    "add_target_arguments",
    "broker_client",
    "collect_snapshot",
    "connect_failure",
    "is_auth_failure",
    "load_settings",
    "load_target",
    "run",
]

_logger = logging.getLogger("bridge.watch")

_AUTH_CODES = frozenset({4, 5, 134, 135})
"""CONNACK codes that mean bad credentials or no permission: retrying cannot help."""


# --- Broker connection -----------------------------------------------------------


def broker_client(settings: BrokerSettings, identifier: str) -> aiomqtt.Client:
    """Build a fresh aiomqtt client for one read-only connection.

    Args:
        settings: The broker (`actor_sdk.mqtt.parse_broker_url`).
        identifier: The MQTT client id.

    Returns:
        The client (not yet connected).
    """
    return new_client(settings, identifier=identifier)


def connect_failure(error: aiomqtt.MqttError, target: BrokerSettings) -> str:
    """Say in one line that the broker could not be reached or refused us.

    Args:
        error: The client library's error.
        target: The broker (shown without its password).

    Returns:
        The line.
    """
    return f"cannot connect to the broker {target.describe()}: {error}"


def is_auth_failure(error: aiomqtt.MqttError) -> bool:
    """Tell whether the broker refused the credentials or the permission (retrying cannot help).

    Args:
        error: The client library's error.

    Returns:
        True for CONNACK codes 4, 5 (MQTT 3.1.1), 134, 135 (MQTT 5).
    """
    code = getattr(error, "rc", None)
    value = getattr(code, "value", code)
    return isinstance(value, int) and value in _AUTH_CODES


async def collect_snapshot(
    target: BrokerSettings,
    layout: wire.TopicLayout,
    *,
    quiet: float = 0.5,
    max_wait: float = 10.0,
    clock: Callable[[], datetime] = utc_now,
) -> WatchState:
    """Subscribe, gather the retained burst, and return what it says.

    The burst is over when no message arrived for `quiet` seconds (counted
    from the subscription's acknowledgement, then from each message), or at
    `max_wait` seconds in all.

    Args:
        target: The broker.
        layout: The microgrid's topics.
        quiet: Seconds of silence that end the burst.
        max_wait: The most seconds to wait in all.
        clock: The wall clock (for event times).

    Returns:
        The state.

    Raises:
        aiomqtt.MqttError: The broker cannot be reached or refused us.
    """
    state = WatchState(layout)
    loop = asyncio.get_running_loop()
    async with broker_client(target, f"dispatch-bridge-watch-{uuid.uuid4().hex[:12]}") as client:
        await client.subscribe(layout.everything, qos=1)
        deadline = loop.time() + max_wait
        messages = aiter(client.messages)
        while True:
            wait = min(quiet, deadline - loop.time())
            if wait <= 0:
                break
            try:
                message = await asyncio.wait_for(anext(messages), wait)
            except TimeoutError:
                break
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            state.apply(message.topic.value, bytes(payload), clock())
    return state


async def refused_credentials(target: BrokerSettings) -> str | None:
    """Connect once; say why when the broker refuses our credentials, else None.

    The interactive view checks this before it takes the terminal, so the reason is
    printed on a plain screen; an unreachable broker is not refused (the view starts
    and retries).

    Args:
        target: The broker.

    Returns:
        The reason, or None.
    """
    try:
        async with broker_client(target, f"dispatch-bridge-watch-{uuid.uuid4().hex[:12]}"):
            return None
    except aiomqtt.MqttError as error:
        return connect_failure(error, target) if is_auth_failure(error) else None


def _terminal_width(override: int | None) -> int:
    if override is not None:
        return override
    return shutil.get_terminal_size((80, 24)).columns


# --- Command line -----------------------------------------------------------------


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the broker and microgrid flags that `load_target` reads.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="mqtt://user:pass@host:port or mqtts://... (env MQTT_URL); a read-only user is enough",
    )
    parser.add_argument(
        "--broker-ca-file",
        metavar="PATH",
        help="CA certificates to verify an mqtts:// broker with (env MQTT_CA_FILE)",
    )
    parser.add_argument(
        "--broker-cert-file",
        metavar="PATH",
        help="client certificate for an mqtts:// broker that requires one (env MQTT_CERT_FILE)",
    )
    parser.add_argument(
        "--broker-key-file",
        metavar="PATH",
        help="the key of --broker-cert-file, if not in that file (env MQTT_KEY_FILE)",
    )
    parser.add_argument("--microgrid-id", metavar="M", help="the microgrid (env MICROGRID_ID)")
    parser.add_argument(
        "--topic-root",
        metavar="TEMPLATE",
        help="topic root, {microgrid_id} is replaced (env DISPATCH_BRIDGE_TOPIC_ROOT; "
        f"default {wire.DEFAULT_TOPIC_ROOT})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatch-bridge watch`.

    Args:
        parser: The subcommand's parser.
    """
    add_target_arguments(parser)
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one snapshot of the retained topics and exit (for scripts)",
    )
    parser.add_argument(
        "--hours",
        type=float,
        default=None,
        help=f"how far ahead the timeline looks (default {DEFAULT_HOURS:g})",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="--once: columns to fit (default: the terminal's)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="--once: most seconds to wait for the retained topics (default 10)",
    )
    parser.epilog = (
        "Credentials may also come from MQTT_USERNAME and MQTT_PASSWORD (or MQTT_PASSWORD_FILE), "
        "which keeps the password off the command line."
    )


def _positive_int(value: Any) -> int:
    if isinstance(value, list):
        # `microgrid_id = [1]` in a config file's [bridge] table.
        if len(value) != 1:
            raise ValueError("several microgrids: pick one with --microgrid-id")
        value = value[0]
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


@dataclass(frozen=True)
class WatchSettings:
    """Everything `dispatch-bridge watch` needs, resolved from flags and environment."""

    target: BrokerSettings
    layout: wire.TopicLayout
    horizon: timedelta
    microgrid_id: int


def load_target(args: argparse.Namespace) -> tuple[BrokerSettings, wire.TopicLayout]:
    """Resolve the broker and the microgrid's topics from flags and environment.

    Shared by the read-only subcommands (`watch`, `health`); see `_resolve`.

    Args:
        args: The parsed flags.

    Returns:
        The broker and the topic layout.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    target, layout, _ = _resolve(args)
    return target, layout


def _resolve(args: argparse.Namespace) -> tuple[BrokerSettings, wire.TopicLayout, int]:
    """Resolve the broker, the microgrid's topics and its id from flags and environment.

    Shared by the read-only subcommands (`watch`, `health`). Credentials in
    the URL win; a URL without them takes `MQTT_USERNAME` and `MQTT_PASSWORD`
    (or `MQTT_PASSWORD_FILE`).

    Args:
        args: The parsed flags (`broker`, `broker_ca_file`, `broker_cert_file`,
            `broker_key_file`, `microgrid_id`, `topic_root`,
            and `config`, a TOML file whose [bridge] table is read too, if the
            subcommand has that flag).

    Returns:
        The broker, the topic layout and the microgrid id.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    source = SettingsSource.load(vars(args), getattr(args, "config", None), table="bridge")
    url = source.get("broker", env="MQTT_URL", parse=str, default=None, secret=True)
    if url is None:
        raise ConfigError("no broker: give --broker mqtt://user:pass@host:port (or MQTT_URL)")
    try:
        target = parse_broker_url(url)
    except ValueError as error:
        raise ConfigError(f"invalid broker URL: {error}") from None
    username = source.get("mqtt_username", env="MQTT_USERNAME", parse=str, default=None)
    password = source.get(
        "mqtt_password", env="MQTT_PASSWORD", parse=str, default=None, secret=True
    )
    if target.username is None and username is not None:
        target = replace(target, username=username, password=password)
    elif target.password is None and password is not None:
        target = replace(target, password=password)
    tls_files = [
        source.get(f"broker_{key}_file", env=f"MQTT_{key.upper()}_FILE", parse=str, default=None)
        for key in ("ca", "cert", "key")
    ]
    try:
        target = target.with_tls_files(*tls_files)
    except ValueError as error:
        raise ConfigError(f"invalid broker TLS settings: {error}") from None
    microgrid = source.get("microgrid_id", env="MICROGRID_ID", parse=_positive_int, default=None)
    if microgrid is None:
        raise ConfigError("no microgrid: give --microgrid-id M (or MICROGRID_ID)")
    template = source.get(
        "topic_root",
        env="DISPATCH_BRIDGE_TOPIC_ROOT",
        parse=str,
        default=wire.DEFAULT_TOPIC_ROOT,
    )
    try:
        layout = wire.TopicLayout.for_microgrid(microgrid, template)
    except (wire.WireError, KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"invalid --topic-root {template!r}: {error}") from None
    return target, layout, microgrid


def load_settings(args: argparse.Namespace) -> WatchSettings:
    """Resolve the settings from flags and environment (see `load_target`).

    Args:
        args: The parsed flags.

    Returns:
        The settings.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    target, layout, microgrid = _resolve(args)
    hours = DEFAULT_HOURS if args.hours is None else args.hours
    if not 0 < hours <= 24 * 14:
        raise ConfigError("invalid --hours: must be more than 0 and at most 336 (two weeks)")
    if args.width is not None and args.width < 20:
        raise ConfigError("invalid --width: at least 20 columns")
    if args.timeout <= 0:
        raise ConfigError("invalid --timeout: must be positive")
    return WatchSettings(target, layout, timedelta(hours=hours), microgrid)


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge watch`.

    Args:
        args: The parsed flags.

    Returns:
        0 after a snapshot or on quitting, 1 when the broker cannot be reached or
        refuses us, 2 when the interactive view has no terminal.
    """
    settings = load_settings(args)
    if not args.once:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            print(
                "dispatch-bridge watch: the interactive view needs a terminal; "
                "use --once for one snapshot as plain text",
                file=sys.stderr,
            )
            return 2
        # Imported here: Textual takes a while to import, and `--once` and `health` need none of it.
        from bridge.watch_app import WatchApp  # noqa: PLC0415

        refused = asyncio.run(refused_credentials(settings.target))
        if refused is not None:
            print(f"dispatch-bridge watch: {refused}", file=sys.stderr)
            return 1
        app = WatchApp(settings)
        app.run()
        if app.failure is not None:
            print(app.failure, file=sys.stderr)
        return app.return_code or 0
    try:
        state = asyncio.run(
            collect_snapshot(settings.target, settings.layout, max_wait=args.timeout)
        )
    except aiomqtt.MqttError as error:
        print(f"dispatch-bridge watch: {connect_failure(error, settings.target)}", file=sys.stderr)
        return 1
    for line in render(
        state,
        now=datetime.now(UTC),
        width=_terminal_width(args.width),
        horizon=settings.horizon,
    ):
        print(line)
    return 0
