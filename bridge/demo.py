"""`dispatch-bridge demo`: the whole system on this machine, with nothing set up.

It starts, in this order, and stops in the reverse order on Ctrl-C or SIGTERM:

1. the local Dispatch API server (in this process; SQLite in a temporary
   directory, or in `--dir`), with a generated key and signing secret;
2. a broker: the `mosquitto` binary when installed (started with the
   repository's `mosquitto.conf` adapted to the demo directory, a free port,
   and the users `bridge` and `actor` with generated passwords and the ACL of
   `deploy/mosquitto/acl`, and its WebSockets listener on another free port
   serving the field view), else the embedded pure-Python broker
   (`--embedded-broker` forces it; no web page then); or none with
   `--broker URL` (`bridge/demo_broker.py`);
3. the bridge, `dispatch-bridge run`, as a child process;

then it creates sample dispatches (`bridge/demo_samples.py`) and prints the
commands to watch the topics, the field view's URL (the reader's credentials in
its fragment), how to create more dispatches, and an actor to paste. The passwords, key and
secret are throw-away values of this one run, so they are printed.

A temporary directory is removed at the end; a `--dir` is kept (its database,
and the bridge's cache, are the point of giving one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from actor_sdk import mqtt, wire
from actor_sdk.mqtt import parse_broker_url
from bridge.api import AuthConfig, ServerStartError, serve
from bridge.config import ConfigError
from bridge.demo_broker import (
    DemoBroker,
    DemoError,
    adapt_mosquitto_config,
    find_mosquitto,
    start_broker,
    stop_process,
    tail,
)
from bridge.demo_samples import Sample, create_samples

__all__ = ["DemoError", "adapt_mosquitto_config", "add_arguments", "find_mosquitto", "run"]

_logger = logging.getLogger("bridge.demo")


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


# --- The bridge ----------------------------------------------------------------------


@asynccontextmanager
async def _bridge(
    broker: DemoBroker, api_url: str, auth: AuthConfig, microgrid_id: int, directory: Path
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
        await stop_process(process, "the bridge")


async def _wait_online(
    broker: DemoBroker,
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
                f"the bridge exited with code {bridge.returncode}; its log {log}:\n" + tail(log)
            )
        try:
            settings = mqtt.BrokerSettings(broker.host, broker.port, name, password)
            async with mqtt.new_client(settings, timeout=5) as client:
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
        except mqtt.MqttError:
            await asyncio.sleep(0.2)
        except TimeoutError:
            break
    raise DemoError(
        f"the bridge did not come online within {within:g} s; its log {log}:\n" + tail(log)
    )


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
    broker: DemoBroker,
    layout: wire.TopicLayout,
    microgrid_id: int,
    api_url: str,
    auth: AuthConfig,
    directory: Path,
    temporary: bool,
    samples: list[tuple[int, Sample]] | None,
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
    page = broker.page_url(microgrid_id)
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
        "The same in a browser (the page Mosquitto serves; reader credentials in the fragment):",
        f"  {page}" if page else "  (needs the demo's Mosquitto: this broker has no web page)",
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
        broker = await stack.enter_async_context(
            start_broker(
                broker_url=options.broker_url,
                embedded=options.embedded,
                port=options.mqtt_port,
                within=options.startup_timeout,
                directory=directory,
            )
        )
        bridge = await stack.enter_async_context(
            _bridge(broker, api.url, auth, options.microgrid_id, directory)
        )
        log = directory / "bridge.log"
        await _wait_online(broker, layout, bridge, log, options.startup_timeout)
        samples = await create_samples(api.url, auth, options.microgrid_id)
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
                + tail(log)
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
