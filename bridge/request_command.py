"""`dispatch-bridge resync | hold | release`: send a request to the bridge, print its answer.

One module for the three commands (`bridge.cli` registers it under each
name): they differ only in the request. Each connects to the broker,
subscribes to the answer topic *before* it publishes the request (QoS 1, not
retained) with a fresh transaction, and waits for the answer that carries
that transaction. Exit 0 when the bridge answers `ok`, 1 on an `error`
answer or none in time (default 10 s), 2 for a usage mistake.

The user needs the right to publish requests: `operator` in the shipped ACL.
A broker drops a publish its ACL denies without telling an MQTT 3.1.1
client, so a denied request looks like a bridge that never answers.

Settings as for `watch` and `health`: `--broker`, `MQTT_USERNAME`,
`MQTT_PASSWORD(_FILE)`, `--microgrid-id`, `--topic-root`, `--config`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any

import msgspec

from actor_sdk import mqtt, wire
from bridge.config import ConfigError
from bridge.watch import add_target_arguments, broker_client, load_target

__all__ = ["RefusedError", "ask", "describe", "run"]

DEFAULT_TIMEOUT = 10.0


class RefusedError(Exception):
    """The broker refused this user's subscription or request."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `resync`, `hold` or `release` (told apart by the parser's name).

    Args:
        parser: The subcommand's parser.
    """
    action = parser.prog.rsplit(" ", 1)[-1]
    add_target_arguments(parser)
    for option in parser._actions:  # the shared flag's help says a reader is enough
        if option.dest == "broker":
            option.help = (
                "mqtt://user:pass@host:port or mqtts://... (env MQTT_URL); a user that may "
                "publish requests (`operator` in the shipped ACL)"
            )
    if action in ("hold", "release"):
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--type", metavar="T", help=f"the dispatch type to {action}")
        which.add_argument("--all", action="store_true", help=f"{action} every type")
    if action == "hold":
        parser.add_argument(
            "--reason", metavar="TEXT", help="why; shown in the held types' running snapshots"
        )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the answer as the bridge sent it"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file; broker, microgrid_id, topic_root and credentials from its [bridge] table",
    )
    parser.set_defaults(request_action=action)
    parser.epilog = (
        "Exit 0 when the bridge answers ok, 1 on an error or no answer in time. The user "
        "must be allowed to publish requests (`operator` in the shipped ACL): a denied "
        "request is dropped silently by the broker. Credentials may also come from "
        "MQTT_USERNAME and MQTT_PASSWORD (or MQTT_PASSWORD_FILE)."
    )


async def ask(
    target: mqtt.BrokerSettings,
    layout: wire.TopicLayout,
    action: str,
    request: dict[str, Any],
    within: float,
) -> tuple[wire.RequestAnswer | None, bytes]:
    """Send one request and wait for its answer.

    Args:
        target: The broker.
        layout: The microgrid's topics.
        action: `resync`, `hold` or `release`.
        request: The request's fields, without `transaction` (a fresh one is added).
        within: Seconds to wait for the answer once the request is sent.

    Returns:
        The answer and its raw payload, or `(None, b"")` when none came in time.

    Raises:
        mqtt.MqttError: The broker cannot be reached.
        RefusedError: The broker refused the subscription to the answers, or closed the
            connection (as Mosquitto does when its ACL denies a subscription or publish).
    """
    transaction = uuid.uuid4().hex
    payload = msgspec.json.encode({"transaction": transaction, **request})
    connected = False
    try:
        async with broker_client(target, f"dispatch-bridge-{action}-{transaction[:12]}") as client:
            connected = True
            granted = await client.subscribe(layout.response(action), qos=1)
            if any(getattr(code, "value", code) >= 0x80 for code in granted):
                raise RefusedError(
                    f"the broker refused the subscription to {layout.response(action)}"
                )
            await client.publish(layout.request(action), payload, qos=1)
            return await _answer(client, transaction, within)
    except mqtt.MqttError as error:
        if not connected:
            raise
        # Mosquitto closes the connection of a client whose subscription or publish its
        # ACL denies (MQTT 3.1.1 has no other way to say so).
        raise RefusedError(f"the broker closed the connection ({error})") from None


async def _answer(
    client: mqtt.Client, transaction: str, within: float
) -> tuple[wire.RequestAnswer | None, bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    messages = aiter(client.messages)
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(anext(messages), left)
        except TimeoutError:
            break
        raw = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            answer = wire.decode_answer(raw)
        except wire.WireError:
            continue  # not an answer of this contract: not ours
        if answer.transaction == transaction and not message.retain:
            return answer, bytes(raw)
    return None, b""


def describe(answer: wire.RequestAnswer) -> str:
    """One line saying what the bridge answered.

    Args:
        answer: The answer.

    Returns:
        The line.
    """
    head = f"{answer.request} {answer.status} (microgrid {answer.microgrid_id})"
    if answer.error is not None:
        return f"{head}: {answer.error}"
    if answer.holds is not None:
        holds = answer.holds
        named = [f"{name!r} ({hold.reason})" for name, hold in holds.types.items()]
        if holds.all_types is not None:
            named.insert(0, f"every type ({holds.all_types.reason})")
        return f"{head}: held now: {', '.join(named) or 'nothing'}"
    synced = "never" if answer.synced_at is None else answer.synced_at.isoformat()
    return f"{head}: {answer.dispatches} dispatches, listed at {synced}, republished"


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge resync`, `hold` or `release`.

    Args:
        args: The parsed flags.

    Returns:
        0 when the bridge answered ok, 1 otherwise.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    if not 0 < args.timeout <= 3600:
        raise ConfigError("invalid --timeout: must be more than 0 and at most 3600 seconds")
    action: str = args.request_action
    request: dict[str, Any] = {}
    if getattr(args, "type", None) is not None:
        try:
            wire.encode_type(args.type)
        except wire.WireError as error:
            raise ConfigError(f"invalid --type: {error}") from None
        request["type"] = args.type
    if getattr(args, "reason", None) is not None:
        request["reason"] = args.reason
    target, layout = load_target(args)
    try:
        answer, raw = asyncio.run(ask(target, layout, action, request, args.timeout))
    except mqtt.MqttError as error:
        print(f"broker unreachable: {target.describe()}: {error}", flush=True)
        return 1
    except RefusedError as error:
        print(
            f"{error}: may this user send requests and read the answers (`operator` in "
            "the shipped ACL)?",
            flush=True,
        )
        return 1
    if answer is None:
        print(
            f"no answer on {layout.response(action)} within {args.timeout:g} s: is the bridge "
            "running, and may this user publish requests (`operator` in the shipped ACL)? "
            "A broker drops a denied publish without a word",
            flush=True,
        )
        return 1
    if args.json:
        print(json.dumps(json.loads(raw), indent=2), flush=True)
    else:
        print(describe(answer), flush=True)
    return 0 if answer.status == "ok" else 1
