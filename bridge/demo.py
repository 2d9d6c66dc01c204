"""`dispatch-bridge demo`: the whole system on this machine, with nothing set up.

It starts, in this order, and stops in the reverse order on Ctrl-C or SIGTERM:

1. the local Dispatch API server (in this process; SQLite in a temporary
   directory, or in `--dir`), with a generated key and signing secret;
2. a broker: the `mosquitto` binary when installed (started with the
   repository's `mosquitto.conf` adapted to the demo directory, a free port,
   and the users `bridge` and `actor` with generated passwords and the ACL of
   `deploy/mosquitto/acl`), else the embedded pure-Python broker
   (`--embedded-broker` forces it); or none with `--broker URL`;
3. the bridge, `dispatch-bridge run`, as a child process;

then it creates sample dispatches and prints the commands to watch the topics,
to create more dispatches, and an actor to paste. The passwords, key and
secret are throw-away values of this one run, so they are printed.

A temporary directory is removed at the end; a `--dir` is kept (its database,
and the bridge's cache, are the point of giving one).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import aiomqtt
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.common.microgrid.electrical_components import (
    ElectricalComponentCategory,
)
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetCategories, TargetComponents, TargetIds

from actor_sdk import wire
from bridge.api import AuthConfig, ServerStartError, create_dispatch, serve
from bridge.config import ConfigError
from bridge.embedded_broker import EmbeddedBrokerError, embedded_broker
from bridge.publisher import parse_broker_url

__all__ = ["DemoError", "add_arguments", "run"]

_logger = logging.getLogger("bridge.demo")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO_ROOT / "mosquitto.conf"
SHIPPED_ACL = REPO_ROOT / "deploy" / "mosquitto" / "acl"

_STOP_TIMEOUT = 15.0

# Settings of the shipped mosquitto.conf that the demo replaces (uncommented lines).
_REPLACED = re.compile(
    r"^\s*(listener|port|bind_address|persistence_location|persistence_file|password_file"
    r"|acl_file|log_dest|pid_file|user|certfile|keyfile|cafile|capath|tls_version"
    r"|require_certificate)\b"
)


class DemoError(Exception):
    """A part of the demo could not start; the message says which and why."""


# --- Command line -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatch-bridge demo`.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="use this broker instead of starting one: mqtt://user:pass@host:port of a user "
        "that may write microgrid/+/dispatch/#",
    )
    parser.add_argument(
        "--embedded-broker",
        action="store_true",
        help="start the embedded pure-Python broker (amqtt) even when mosquitto is installed",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="keep the API database, the bridge's cache and the broker's files in DIR "
        "(kept at exit); default: a temporary directory, removed at exit",
    )
    parser.add_argument(
        "--microgrid-id", type=int, default=1, metavar="N", help="the microgrid (default 1)"
    )
    parser.add_argument(
        "--mqtt-port", type=int, default=0, metavar="PORT", help="broker port (default: a free one)"
    )
    parser.add_argument(
        "--api-port",
        type=int,
        default=0,
        metavar="PORT",
        help="Dispatch API port (default: a free one)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long each part may take to start (default 30)",
    )
    parser.epilog = "Ctrl-C (or SIGTERM) stops everything and removes the temporary files."


@dataclass(frozen=True)
class _Options:
    broker_url: str | None
    embedded: bool
    directory: Path | None
    microgrid_id: int
    mqtt_port: int
    api_port: int
    startup_timeout: float


def _options(args: argparse.Namespace) -> _Options:
    if args.broker is not None and args.embedded_broker:
        raise ConfigError("--broker and --embedded-broker exclude each other")
    if args.broker is not None:
        try:
            parse_broker_url(args.broker)
        except ValueError as error:
            raise ConfigError(f"invalid --broker: {error}") from None
    if not args.startup_timeout > 0:
        raise ConfigError("invalid --startup-timeout: must be positive")
    if args.microgrid_id <= 0:
        raise ConfigError("invalid --microgrid-id: must be a positive integer")
    for name in ("mqtt_port", "api_port"):
        if not 0 <= getattr(args, name) <= 65535:
            raise ConfigError(f"invalid --{name.replace('_', '-')}: not a port number")
    return _Options(
        broker_url=args.broker,
        embedded=args.embedded_broker,
        directory=None if args.dir is None else Path(args.dir),
        microgrid_id=args.microgrid_id,
        mqtt_port=args.mqtt_port,
        api_port=args.api_port,
        startup_timeout=args.startup_timeout,
    )


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge demo` until Ctrl-C or SIGTERM.

    Args:
        args: The parsed flags.

    Returns:
        0 after a clean stop, 1 if a part could not start or failed.
    """
    options = _options(args)
    # The parts' own chatter would drown the instructions.
    for name in ("amqtt", "transitions", "bridge.api", "bridge.embedded_broker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return asyncio.run(_demo(options, sys.stdout))
    except DemoError as error:
        print(f"dispatch-bridge demo: {error}", file=sys.stderr)
        return 1


# --- The broker -------------------------------------------------------------------


@dataclass(frozen=True)
class _Broker:
    """Where the demo's broker is, and who may use it."""

    kind: str
    host: str
    port: int
    writer: tuple[str | None, str | None]
    reader: tuple[str | None, str | None]
    pid: int | None = None

    def url(self, user: tuple[str | None, str | None], *, with_password: bool = True) -> str:
        name, password = user
        if name is None:
            return f"mqtt://{self.host}:{self.port}"
        auth = name if password is None or not with_password else f"{name}:{password}"
        return f"mqtt://{auth}@{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free now (the OS picks it).

    Args:
        host: The address to bind.

    Returns:
        The port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_mosquitto() -> str | None:
    """Return the `mosquitto` binary: on PATH, or where Debian puts it.

    Returns:
        Its path, or None when it is not installed.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _hash_password(password: str) -> str:
    """Hash the way `mosquitto_passwd` 2.0 does: `$7$`, PBKDF2-SHA512, 101 rounds."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def adapt_mosquitto_config(text: str, *, port: int, directory: Path, run_as_root: bool) -> str:
    """Rewrite the shipped mosquitto.conf for the demo's directory and port.

    Everything that makes the shipped config what it is (persistence, autosave,
    `set_tcp_nodelay`, no queue limit, no anonymous clients) stays; the
    listener, files and log destination move to the demo.

    Args:
        text: The shipped config.
        port: The port to listen on, on loopback only.
        directory: Where the password file, ACL, persistence and log go.
        run_as_root: Add `user root`: Mosquitto started as root otherwise
            switches to the `mosquitto` user, which cannot write the directory.

    Returns:
        The config text.
    """
    kept = [line for line in text.splitlines() if not _REPLACED.match(line)]
    kept += [
        "",
        "# ---- dispatch-bridge demo ----",
        f"persistence_location {directory}/",
        f"password_file {directory / 'passwd'}",
        f"acl_file {directory / 'acl'}",
        f"log_dest file {directory / 'mosquitto.log'}",
        f"listener {port} 127.0.0.1",
    ]
    if run_as_root:
        kept.append("user root")
    return "\n".join(kept) + "\n"


def _write_password_file(path: Path, users: dict[str, str]) -> None:
    tool = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if os.access("/usr/bin/mosquitto_passwd", os.X_OK) else None
    )
    path.write_text("")
    path.chmod(0o600)
    if tool is None:
        path.write_text("".join(f"{u}:{_hash_password(p)}\n" for u, p in users.items()))
        return
    for user, password in users.items():
        subprocess.run(
            [tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30
        )


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def _wait_for_port(
    host: str, port: int, within: float, alive: Callable[[], bool] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if alive is not None and not alive():
                raise DemoError(f"the process meant to listen on {host}:{port} exited") from None
            if loop.time() > deadline:
                raise DemoError(f"nothing listens on {host}:{port} after {within:.0f} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def _stop_process(process: asyncio.subprocess.Process, name: str) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            _logger.warning("%s did not stop within %.0f s: killing it", name, _STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _prepare_mosquitto(directory: Path, port: int) -> tuple[dict[str, str], Path]:
    """Write the password file, ACL and config of the demo's Mosquitto."""
    directory.mkdir(parents=True, exist_ok=True)
    passwords = {"bridge": secrets.token_hex(8), "actor": secrets.token_hex(8)}
    _write_password_file(directory / "passwd", passwords)
    shutil.copyfile(SHIPPED_ACL, directory / "acl")
    config = directory / "mosquitto.conf"
    config.write_text(
        adapt_mosquitto_config(
            SHIPPED_CONFIG.read_text(),
            port=port,
            directory=directory,
            run_as_root=os.geteuid() == 0,
        )
    )
    return passwords, config


def _alive(process: asyncio.subprocess.Process) -> Callable[[], bool]:
    return lambda: process.returncode is None


async def _start_mosquitto(
    binary: str, directory: Path, port: int, within: float
) -> tuple[asyncio.subprocess.Process, int, dict[str, str]]:
    """Start Mosquitto; with no fixed port, try again on another if one was taken meanwhile."""
    attempts = 1 if port else 3
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        passwords, config = _prepare_mosquitto(directory, chosen)
        process = await _spawn_mosquitto(binary, directory, config)
        try:
            await _wait_for_port("127.0.0.1", chosen, within, _alive(process))
        except DemoError:
            await _stop_process(process, "mosquitto")
            if attempt < attempts:
                continue
            log = _tail(directory / "mosquitto.log") or _tail(directory / "mosquitto.out")
            raise DemoError(f"mosquitto did not start on port {chosen}:\n{log}") from None
        return process, chosen, passwords
    raise AssertionError("unreachable")


async def _spawn_mosquitto(
    binary: str, directory: Path, config: Path
) -> asyncio.subprocess.Process:
    with (directory / "mosquitto.out").open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(config),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own process group: Ctrl-C reaches only the demo, which stops
            # the broker after the bridge has published its offline status.
            process_group=0,
        )
    return process


@asynccontextmanager
async def _mosquitto(
    binary: str, directory: Path, port: int, within: float
) -> AsyncIterator[_Broker]:
    process, chosen, passwords = await _start_mosquitto(binary, directory, port, within)
    try:
        yield _Broker(
            kind=f"mosquitto ({binary}, pid {process.pid})",
            host="127.0.0.1",
            port=chosen,
            writer=("bridge", passwords["bridge"]),
            reader=("actor", passwords["actor"]),
            pid=process.pid,
        )
    finally:
        await _stop_process(process, "mosquitto")


@asynccontextmanager
async def _embedded(port: int) -> AsyncIterator[_Broker]:
    passwords = {"bridge": secrets.token_hex(8), "actor": secrets.token_hex(8)}
    try:
        async with embedded_broker("127.0.0.1", port, passwords, writers={"bridge"}) as bound:
            yield _Broker(
                kind="embedded (amqtt, in this process; MQTT 3.1.1, retained messages in memory)",
                host="127.0.0.1",
                port=bound,
                writer=("bridge", passwords["bridge"]),
                reader=("actor", passwords["actor"]),
            )
    except EmbeddedBrokerError as error:
        raise DemoError(str(error)) from None


@asynccontextmanager
async def _broker(options: _Options, directory: Path) -> AsyncIterator[_Broker]:
    if options.broker_url is not None:
        settings = parse_broker_url(options.broker_url)
        user = (settings.username, settings.password)
        yield _Broker("given by --broker", settings.host, settings.port, user, user)
        return
    binary = None if options.embedded else find_mosquitto()
    if binary is not None and not (SHIPPED_CONFIG.exists() and SHIPPED_ACL.exists()):
        _logger.warning(
            "mosquitto is installed, but this installation has no mosquitto.conf and ACL of "
            "the source tree (%s): using the embedded broker",
            REPO_ROOT,
        )
        binary = None
    if binary is not None:
        async with _mosquitto(
            binary, directory / "mosquitto", options.mqtt_port, options.startup_timeout
        ) as broker:
            yield broker
    else:
        async with _embedded(options.mqtt_port) as broker:
            yield broker


# --- The bridge ----------------------------------------------------------------------


@asynccontextmanager
async def _bridge(
    broker: _Broker, api_url: str, auth: AuthConfig, microgrid_id: int, directory: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = dict(os.environ)
    # The demo's own settings only: none of the caller's bridge environment.
    for name in (
        "MQTT_URL",
        "MQTT_USERNAME_FILE",
        "MQTT_PASSWORD_FILE",
        "MQTT_CA_FILE",
        "MICROGRID_ID",
        "DISPATCH_API_URL",
        "DISPATCH_API_AUTH_KEY_FILE",
        "DISPATCH_API_SIGN_SECRET_FILE",
        "DISPATCH_BRIDGE_STATE_DIR",
        "DISPATCH_BRIDGE_TOPIC_ROOT",
        "DISPATCH_BRIDGE_NAME",
    ):
        env.pop(name, None)
    env.update(
        {
            "MQTT_USERNAME": broker.writer[0] or "",
            "MQTT_PASSWORD": broker.writer[1] or "",
            "DISPATCH_API_AUTH_KEY": auth.key or "",
            "DISPATCH_API_SIGN_SECRET": auth.sign_secret or "",
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = directory / "bridge.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge.cli",
            "run",
            "--microgrid-id",
            str(microgrid_id),
            "--dispatch-url",
            api_url,
            "--broker",
            f"mqtt://{broker.host}:{broker.port}",
            "--state-dir",
            str(directory / "bridge-state"),
            "--name",
            "demo",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,
        )
    try:
        yield process
    finally:
        await _stop_process(process, "the bridge")


async def _wait_online(
    broker: _Broker,
    layout: wire.TopicLayout,
    bridge: asyncio.subprocess.Process,
    log: Path,
    within: float,
) -> None:
    """Wait until the bridge's retained status says online."""
    name, password = broker.reader
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if bridge.returncode is not None:
            raise DemoError(
                f"the bridge exited with code {bridge.returncode}; its log {log}:\n" + _tail(log)
            )
        try:
            async with aiomqtt.Client(
                broker.host, broker.port, username=name, password=password, timeout=5
            ) as client:
                await client.subscribe(layout.status, qos=1)
                async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                    async for message in client.messages:
                        with contextlib.suppress(wire.WireError):
                            payload = message.payload
                            if isinstance(payload, bytes | bytearray) and payload:
                                status = wire.decode_status(bytes(payload))
                                if status.state == "online":
                                    return
                        if bridge.returncode is not None:
                            break
        except aiomqtt.MqttError:
            await asyncio.sleep(0.2)
        except TimeoutError:
            break
    raise DemoError(
        f"the bridge did not come online within {within:g} s; its log {log}:\n" + _tail(log)
    )


# --- Sample dispatches ------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    type: str
    start: timedelta
    duration: timedelta
    target: TargetComponents
    payload: dict[str, Any]
    recurrence: RecurrenceRule | None
    what: str


def _samples() -> list[_Sample]:
    minutely = RecurrenceRule(frequency=Frequency.MINUTELY, interval=1)
    return [
        _Sample(
            "CHARGE_BATTERY",
            -timedelta(minutes=2),
            timedelta(minutes=30),
            TargetCategories(ElectricalComponentCategory.BATTERY),
            {"power_w": 5000},
            None,
            "running now, for 30 minutes",
        ),
        _Sample(
            "HEARTBEAT",
            -timedelta(seconds=50),
            timedelta(seconds=20),
            TargetIds(7),
            {},
            minutely,
            "every minute, for 20 seconds",
        ),
        _Sample(
            "LIMIT_PV",
            timedelta(minutes=1),
            timedelta(minutes=10),
            TargetCategories(ElectricalComponentCategory.INVERTER),
            {"max_power_w": 8000},
            None,
            "starts in a minute, for 10 minutes",
        ),
        _Sample(
            "PEAK_SHAVING",
            -timedelta(minutes=1),
            timedelta(minutes=4),
            TargetIds(7, 8),
            {"limit_w": 20000},
            None,
            "running now, for 3 more minutes",
        ),
        _Sample(
            "PEAK_SHAVING",
            timedelta(minutes=2),
            timedelta(minutes=6),
            TargetIds(7, 8),
            {"limit_w": 15000},
            None,
            "in 2 minutes, for 6: overlaps the other (one merged actor runs 9 minutes)",
        ),
    ]


async def _create_samples(
    api_url: str, auth: AuthConfig, microgrid_id: int
) -> list[tuple[int, _Sample]] | None:
    """Create the samples, unless the microgrid already has dispatches (a kept `--dir`)."""
    async with DispatchApiClient(
        server_url=api_url, auth_key=auth.key, sign_secret=auth.sign_secret
    ) as client:
        async for page in client.list(MicrogridId(microgrid_id), page_size=1):
            if any(True for _ in page):
                return None
            break
        now = datetime.now(UTC).replace(microsecond=0)
        created = []
        for sample in _samples():
            dispatch = await create_dispatch(
                client,
                microgrid_id=microgrid_id,
                type=sample.type,
                start_time=now + sample.start,
                duration=sample.duration,
                target=sample.target,
                payload=sample.payload,
                recurrence=sample.recurrence,
            )
            created.append((int(dispatch.id), sample))
        return created


# --- What the user reads -----------------------------------------------------------------


def _command(name: str) -> str:
    """How to run one of this installation's console scripts from the current directory."""
    if shutil.which(name) is not None:
        return name
    script = Path(sys.executable).parent / name
    if script.exists():
        relative = os.path.relpath(script)
        return relative if not relative.startswith("..") else str(script)
    return name


def _python() -> str:
    if shutil.which("python") == sys.executable:
        return "python"
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable


def instructions(
    *,
    broker: _Broker,
    layout: wire.TopicLayout,
    microgrid_id: int,
    api_url: str,
    auth: AuthConfig,
    directory: Path,
    temporary: bool,
    samples: list[tuple[int, _Sample]] | None,
    bridge_pid: int,
) -> str:
    """The text the demo prints once everything runs: ready to paste.

    Args:
        broker: The broker.
        layout: The microgrid's topics.
        microgrid_id: The microgrid.
        api_url: The Dispatch API URL.
        auth: The API key and signing secret.
        directory: The demo directory.
        temporary: Whether the directory is removed at the end.
        samples: The sample dispatches created (None: kept from a previous run).
        bridge_pid: The bridge's process id.

    Returns:
        The text.
    """
    q = shlex.quote
    reader_name, reader_password = broker.reader
    sub = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv311"]
    if reader_name is not None:
        sub += ["-u", reader_name]
        if reader_password is not None:
            sub += ["-P", reader_password]
    sub += ["-t", layout.everything, "-v"]
    kept = "removes" if temporary else "keeps"
    who = (
        f"read-only user {reader_name!r}"
        if broker.reader != broker.writer
        else f"the --broker user {reader_name!r}"
    )
    lines = [
        f"dispatch-bridge demo is running. Ctrl-C stops everything and {kept} {directory}",
        "",
        f"  Dispatch API  {api_url}  (SQLite {directory / 'dispatch.sqlite3'})",
        f"  MQTT broker   {broker.kind}, {broker.host}:{broker.port}",
        f"  bridge        pid {bridge_pid}, microgrid {microgrid_id}, "
        f"log {directory / 'bridge.log'}",
        "",
    ]
    if samples is None:
        lines.append(f"Microgrid {microgrid_id} already had dispatches: no samples created.")
    else:
        lines.append(f"Sample dispatches of microgrid {microgrid_id}:")
        lines += [f"  #{i:<3} {s.type:<15} {s.what}" for i, s in samples]
    lines += [
        "",
        f"Watch the retained topics ({who}):",
        "  " + " ".join(q(word) for word in sub),
        "",
        "Live view for field engineers:",
        f"  {_command('dispatch-bridge')} watch --broker {q(broker.url(broker.reader))} "
        f"--microgrid-id {microgrid_id}",
        "",
        "Create more dispatches, from another shell:",
        f"  export DISPATCH_API_URL={q(api_url)} DISPATCH_API_AUTH_KEY={q(auth.key or '')} "
        f"DISPATCH_API_SIGN_SECRET={q(auth.sign_secret or '')}",
        f"  {_command('dispatch-cli')} create {microgrid_id} EXAMPLE_TYPE 7,8 'in 1 minute' "
        "'5 minutes' --payload '{\"power_w\": 3000}'",
        "",
        f"An actor managed from the topics (save as actor.py, run with {_python()} actor.py):",
    ]
    snippet = f"""\
        import asyncio
        from datetime import timedelta

        from actor_sdk import DispatchInfo, MergeByType, manage


        class PrintingActor:
            def __init__(self, info: DispatchInfo) -> None:
                self.info = info

            def start(self) -> None:
                print("started with", self.info.options, flush=True)

            async def stop(self, msg: str) -> None:
                print("stopped:", msg, flush=True)


        def create_actor(info: DispatchInfo, updates) -> PrintingActor:
            return PrintingActor(info)


        asyncio.run(
            manage(
                broker={broker.url(broker.reader)!r},
                microgrid_id={microgrid_id},
                dispatch_type="PEAK_SHAVING",
                actor_factory=create_actor,
                merge_strategy=MergeByType(),
                retry_interval=timedelta(seconds=10),
            )
        )
        """
    lines += ["    " + line if line else "" for line in textwrap.dedent(snippet).splitlines()]
    return "\n".join(lines) + "\n"


# --- The whole ------------------------------------------------------------------------------


def _temporary_directory() -> tuple[Path, Callable[[], None]]:
    path = Path(tempfile.mkdtemp(prefix="dispatch-bridge-demo-"))

    def remove() -> None:
        shutil.rmtree(path, ignore_errors=True)

    return path, remove


async def _parts(options: _Options, out: TextIO, stop: asyncio.Event, ready: asyncio.Event) -> None:
    layout = wire.TopicLayout.for_microgrid(options.microgrid_id)
    async with AsyncExitStack() as stack:
        if options.directory is None:
            directory, remove = _temporary_directory()
            stack.callback(remove)
        else:
            directory = options.directory.resolve()
            directory.mkdir(parents=True, exist_ok=True)
        print(f"starting the demo in {directory} ...", file=out, flush=True)
        auth = AuthConfig(key=secrets.token_hex(8), sign_secret=secrets.token_hex(12))
        try:
            api = await stack.enter_async_context(
                serve(
                    f"127.0.0.1:{options.api_port}",
                    directory / "dispatch.sqlite3",
                    auth,
                    allow_past_start=True,
                )
            )
        except ServerStartError as error:
            raise DemoError(f"the Dispatch API server did not start: {error}") from None
        broker = await stack.enter_async_context(_broker(options, directory))
        bridge = await stack.enter_async_context(
            _bridge(broker, api.url, auth, options.microgrid_id, directory)
        )
        log = directory / "bridge.log"
        await _wait_online(broker, layout, bridge, log, options.startup_timeout)
        samples = await _create_samples(api.url, auth, options.microgrid_id)
        out.write(
            instructions(
                broker=broker,
                layout=layout,
                microgrid_id=options.microgrid_id,
                api_url=api.url,
                auth=auth,
                directory=directory,
                temporary=options.directory is None,
                samples=samples,
                bridge_pid=bridge.pid,
            )
        )
        out.flush()
        ready.set()
        stopped = asyncio.create_task(stop.wait())
        exited = asyncio.create_task(bridge.wait())
        await asyncio.wait([stopped, exited], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        exited.cancel()
        if not stop.is_set():
            raise DemoError(
                f"the bridge exited with code {bridge.returncode}; the end of its log:\n"
                + _tail(log)
            )
        print("stopping: bridge, broker, Dispatch API server ...", file=out, flush=True)


async def _demo(options: _Options, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    ready = asyncio.Event()
    parts = asyncio.create_task(_parts(options, out, stop, ready))

    def on_signal() -> None:
        stop.set()
        if not ready.is_set():
            # Still starting: unwind whatever has started so far.
            parts.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        await parts
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print("demo stopped", file=out, flush=True)
    return 0
